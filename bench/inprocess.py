"""The app's own cost per request, without sockets or a load generator.

Calls the ASGI app directly (lifespan, warm-up and all), `--requests` times with
`--concurrency` in flight, and prints the event loop thread's CPU time per request: the
figure that bounds W1 once the inference thread keeps up (docs/performance.md, item 10).
The scope and messages are built here rather than sent with httpx's ASGITransport (as
service.warmup does): that client's own work, ~195 µs per request on the same thread,
would be counted as the app's.
Add --profile for cProfile's top functions (they overstate Python-heavy code several times).

    python -m bench.inprocess                    # POST /sample {"n": 1}, the W1 request
    python -m bench.inprocess --ceiling          # the ceiling's constant route, for comparison
    python -m bench.inprocess --instant-model    # the model's answers precomputed: the loop alone

With --instant-model every model call returns rows computed once at startup (the real
model's), so no forward pass shares the CPU with the event loop: the loop's own CPU per
request, free of the contention that makes the figures with a real model swing by 15 %.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import time
from typing import Any

import numpy as np
from fastapi import FastAPI

from service.app import create_app
from service.model.inference import tune_process
from service.model.latents import draw_rows
from service.model.runtime import ModelRegistry, ModelRuntime, load_registry
from service.settings import Settings


async def call(app: FastAPI, path: str, body: bytes) -> int:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


async def measure(
    app: FastAPI, path: str, body: bytes, requests: int, concurrency: int, profile: bool
) -> None:
    async with app.router.lifespan_context(app):
        gate = asyncio.Semaphore(concurrency)

        async def one() -> int:
            async with gate:
                return await call(app, path, body)

        await asyncio.gather(*[one() for _ in range(500)])  # warm-up
        profiler = cProfile.Profile() if profile else None
        wall, cpu, process = time.perf_counter(), time.thread_time(), time.process_time()
        if profiler:
            profiler.enable()
        codes = await asyncio.gather(*[one() for _ in range(requests)])
        if profiler:
            profiler.disable()
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        process = time.process_time() - process
    print(
        f"POST {path}: {requests / wall:.0f} req/s in-process; CPU per request: "
        f"{process / requests * 1e6:.0f} µs in all, of which the event loop "
        f"{cpu / requests * 1e6:.0f} µs; statuses {sorted(set(codes))}"
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


class InstantModel:
    """A loaded model whose calls return precomputed rows of the real model's output."""

    def __init__(self, real: ModelRuntime, rows: int = 64) -> None:
        self.name, self.version, self.latent_dim = real.name, real.version, real.latent_dim
        self.device, self.manifest, self.priors = real.device, real.manifest, real.priors
        self.default_prior = real.default_prior
        self.classes, self.conditional, self.has_classifier = (
            real.classes,
            real.conditional,
            real.has_classifier,
        )
        u = np.random.default_rng(0).standard_normal((rows, real.latent_dim), dtype=np.float32)
        self._z = real.prior(draw_rows(u, 1.0, None)) if "learned" in real.priors else u
        self._images = real.decode(self._z)
        self._mu, self._sigma = real.encode(self._images)
        self._probabilities = real.classify(self._images) if real.has_classifier else None

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._mu[: len(x)].copy(), self._sigma[: len(x)].copy()

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self._images[: len(z)].copy()

    def prior(self, rows: np.ndarray) -> np.ndarray:
        return self._z[: len(rows)].copy()

    def classify(self, x: np.ndarray) -> np.ndarray:
        assert self._probabilities is not None
        return self._probabilities[: len(x)].copy()


def instant_registry(settings: Settings) -> ModelRegistry:
    real = load_registry(settings)
    return ModelRegistry({m.name: InstantModel(m) for m in real}, real.default)  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ceiling", action="store_true", help="the ceiling app's /constant route")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--instant-model", action="store_true", help="precomputed model answers: the event loop's cost alone"
    )
    args = parser.parse_args()
    os.environ.setdefault("VAE_ACCESS_LOG", "false")  # as in the benchmark
    settings = tune_process(Settings())  # as vae-serve does: GIL switch interval, torch threads
    if args.ceiling:
        from bench.ceiling import create

        app, path = create(), "/constant/W1"
    else:
        registry = instant_registry(settings) if args.instant_model else None
        app, path = create_app(settings, registry), "/sample"
    asyncio.run(measure(app, path, b'{"n": 1}', args.requests, args.concurrency, args.profile))


if __name__ == "__main__":
    main()
