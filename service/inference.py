"""Runs model calls off the event loop, on a fixed pool of worker threads, and times them.

The event loop only parses requests and writes responses; every forward pass runs on one
of `inference_threads` threads (VAE_INFERENCE_THREADS), each using up to `torch_threads`
cores inside torch. Calls beyond the pool's size wait in its queue, so a burst of
requests cannot start more forward passes than the machine has cores for. A later
micro-batching layer belongs here: between the routes and ModelRuntime.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from service.latents import draw_latents
from service.metrics import Metrics
from service.runtime import ModelRuntime

T = TypeVar("T")


class Inference:
    def __init__(self, metrics: Metrics, threads: int = 1) -> None:
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vae-inference")

    async def _run(self, model: ModelRuntime, op: str, batch: int, call: Callable[[], T]) -> T:
        queued = time.perf_counter()

        def timed() -> T:
            started = time.perf_counter()
            self.metrics.queue_wait.labels(model.name, op).observe(started - queued)
            try:
                return call()
            finally:
                self.metrics.inference.labels(model.name, op).observe(time.perf_counter() - started)

        self.metrics.batch_size.labels(model.name, op).observe(batch)
        return await asyncio.get_running_loop().run_in_executor(self._pool, timed)

    async def encode(self, model: ModelRuntime, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return await self._run(model, "encode", len(x), lambda: model.encode(x))

    async def decode(self, model: ModelRuntime, z: np.ndarray) -> np.ndarray:
        return await self._run(model, "decode", len(z), lambda: model.decode(z))

    async def sample(
        self, model: ModelRuntime, n: int, seed: int, temperature: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(z, images) for n latents drawn from the prior with this seed."""

        def call() -> tuple[np.ndarray, np.ndarray]:
            z = draw_latents(n, model.latent_dim, seed, temperature)
            return z, model.decode(z)

        return await self._run(model, "decode", n, call)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
