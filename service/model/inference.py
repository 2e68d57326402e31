"""Runs model calls off the event loop, on a fixed pool of worker threads, and times them.

The event loop only parses requests and writes responses; every forward pass runs on one
of `inference_threads` threads (VAE_INFERENCE_THREADS), each using up to `torch_threads`
cores inside torch. With batching on (the default), concurrent calls for the same model
and operation are merged into one forward pass first (service.model.batching); with it off,
each call is its own pass. Either way a burst of requests cannot start more forward
passes than there are threads.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from service.artifact import STANDARD_PRIOR
from service.errors import ConfidenceNotReached, RequestTimedOut
from service.metrics import REQUEST_STARTED, Metrics
from service.model import faults
from service.model.batching import (
    Batchers,
    BatchPolicy,
    Finish,
    Finished,
    Op,
    Outputs,
    needs_warm_up,
    warm_up_rows,
)
from service.model.draws import Draw, Drawn
from service.model.latents import draw_latents, draw_rows, redraw_latents
from service.model.runtime import ModelRuntime
from service.settings import Settings

T = TypeVar("T")
# Turns a request's images [B, 28, 28] into what its answer carries (service.api.images.png_base64)
ImageEncoder = Callable[[np.ndarray], object]
log = logging.getLogger("service.model.inference")

# How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms).
# Each torch call of a forward pass gives the GIL up and must take it back; with the event
# loop busy, every take-back waited up to 5 ms and a 4 ms pass took 8 to 17 ms. At 0.1 ms,
# W1 served ~30 % more requests per second (docs/performance.md).
GIL_SWITCH_INTERVAL = 0.0001


def tune_process(settings: Settings) -> Settings:
    """Process-wide tuning for a serving process, applied by vae-serve (an app embedded in
    another process keeps that process's choices): the GIL switch interval above, and, when
    VAE_TORCH_THREADS is 0, the cores but one (torch's default is one thread per core)
    shared among the inference threads, at least one each: the event loop keeps a core to
    itself instead of fighting the forward passes' threads for it (W1 on 2 cores: ~12 % more
    requests per second with 1 torch thread than with 2)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    if settings.torch_threads == 0:
        per_pass = max(1, (torch.get_num_threads() - 1) // settings.inference_threads)
        settings = settings.model_copy(update={"torch_threads": per_pass})
    return settings


class Inference:
    def __init__(
        self,
        metrics: Metrics,
        threads: int = 1,
        batching: BatchPolicy | None = None,
        timeout: float = 0.0,
        max_attempts: int = 10,
    ) -> None:
        self.metrics = metrics
        self.max_attempts = max_attempts  # VAE_MAX_DRAW_ATTEMPTS: rounds of drawing for min_confidence
        self.timeout = timeout  # VAE_REQUEST_TIMEOUT_S; 0: none
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vae-inference")
        self.batching = batching
        self._batchers = Batchers(batching, self._pool, threads, metrics) if batching else None

    @classmethod
    def from_settings(cls, metrics: Metrics, settings: Settings) -> Inference:
        policy = (
            BatchPolicy(
                max_size=settings.batch_max_size,
                max_wait=settings.batch_max_wait_ms / 1000.0,
                fill_wait=settings.batch_fill_wait_ms / 1000.0,
                queue_max=settings.queue_max,
                exact=settings.batch_exact,
                pass_sizes=settings.batch_pass_sizes,
            )
            if settings.batching
            else None
        )
        return cls(
            metrics,
            settings.inference_threads,
            policy,
            settings.request_timeout_s,
            settings.max_draw_attempts,
        )

    async def _limited(self, model: ModelRuntime, op: str, work: Awaitable[T]) -> T:
        """`work`, or 503 `timeout` once the request is VAE_REQUEST_TIMEOUT_S old (counted from
        its arrival, so the time it queued counts). Cancelling `work` drops its queued rows
        (service.model.batching) or its not yet started executor job; a running pass finishes and
        its result is discarded."""
        if self.timeout <= 0:
            return await work
        started = REQUEST_STARTED.get()
        remaining = self.timeout if started is None else self.timeout - (time.perf_counter() - started)
        # One timer that cancels this task, rather than asyncio.timeout(): the same effect at a
        # third of the cost (~3 µs against ~10 µs, on every model request).
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(max(remaining, 0.0), expire)
        try:
            return await work
        except asyncio.CancelledError:
            if not expired or task.uncancel() > 0:  # cancelled by someone else (too)
                raise
            self.metrics.timeouts.labels(model.name, op).inc()
            raise RequestTimedOut(
                f"model {model.name!r} had not computed this request's {op} {self.timeout:g} s after it "
                "arrived (VAE_REQUEST_TIMEOUT_S), so its queued work was dropped: the server is "
                "overloaded or the model is slow. Retry in a moment or on another replica",
                headers={"Retry-After": "1"},
            ) from None
        finally:
            timer.cancel()

    async def _run(
        self,
        model: ModelRuntime,
        op: str,
        batch: int,
        call: Callable[[], Outputs],
        finish: Finish | None = None,
    ) -> Finished:
        queued = time.perf_counter()

        def timed() -> Finished:
            started = time.perf_counter()
            self.metrics.queue_wait.labels(model.name, op).observe(started - queued)
            try:
                result = call()
            except Exception as exc:  # the model failed: this request alone gets 500 model-failed
                raise faults.failed(model, op, batch, exc, self.metrics) from exc
            finally:
                self.metrics.inference.labels(model.name, op).observe(time.perf_counter() - started)
            failure = faults.non_finite(model, op, result, self.metrics)
            if failure is not None:
                raise failure
            return result, None if finish is None else finish(result)

        self.metrics.batch_size.labels(model.name, op).observe(batch)
        return await asyncio.get_running_loop().run_in_executor(self._pool, timed)

    async def _call(
        self, model: ModelRuntime, op: Op, x: np.ndarray, call: Callable[[], Outputs], finish: Finish | None
    ) -> Finished:
        """The op on x: merged into a batch, or (batching off) a pass of its own."""
        if self._batchers is not None:
            work = self._batchers.get(model, op).submit(x, finish)
        else:
            work = self._run(model, op, len(x), call, finish)
        return await self._limited(model, op, work)

    async def encode(self, model: ModelRuntime, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (mu, sigma), _ = await self._call(model, "encode", x, lambda: model.encode(x), None)
        return mu, sigma

    async def decode(
        self, model: ModelRuntime, z: np.ndarray, encode_images: ImageEncoder | None = None
    ) -> tuple[np.ndarray, object]:
        """The images for latents z, and what `encode_images` made of them on the inference
        thread, after the pass (their PNGs; None without it)."""
        finish = _last(encode_images)
        (images,), encoded = await self._call(model, "decode", z, lambda: (model.decode(z),), finish)
        return images, encoded

    async def classify(self, model: ModelRuntime, x: np.ndarray) -> np.ndarray:
        """The shipped classifier's class probabilities [B, classes] for images [B, 28, 28]."""
        (probabilities,), _ = await self._call(model, "classify", x, lambda: (model.classify(x),), None)
        return probabilities

    async def sample(
        self, model: ModelRuntime, draw: Draw, encode_images: ImageEncoder | None = None
    ) -> Drawn:
        """The draw's images: noise u ~ N(0, I) from its seed, then z = temperature * u under
        the standard prior, z = model.prior(u, temperature[, class]) under the learned one;
        judged by the classifier when the draw asks for verdicts or a minimum confidence.

        With min_confidence, the draws the classifier does not accept are drawn again from
        fresh noise (latents.redraw_latents: a function of the seed, the attempt and the draw's
        index alone), up to max_attempts rounds; a draw still not accepted then is an error
        (ConfidenceNotReached), never a partial answer. `encode_images` makes the PNGs on the
        inference thread right after the pass, unless redraws may still replace some images."""
        # Drawn here, per request, with the request's own generator (a few µs for small n):
        # the noise never depends on what else is in the batch.
        u = draw_latents(draw.n, model.latent_dim, draw.seed)
        finish = None if draw.min_confidence is not None else encode_images
        z, images, encoded = await self._draw(model, draw, u, finish)
        drawn = Drawn(u, z, images, encoded)
        if not draw.judged:
            return drawn
        drawn.probabilities = await self.classify(model, images)
        if draw.min_confidence is None:
            return drawn
        while not (accepted := draw.accepted(drawn.probabilities)).all():
            if drawn.attempts >= self.max_attempts:
                self.metrics.unreached.labels(model.name).inc()
                raise ConfidenceNotReached(
                    _not_reached(model, draw, int((~accepted).sum()), self.max_attempts)
                )
            again = np.flatnonzero(~accepted)
            fresh = redraw_latents(draw.n, model.latent_dim, draw.seed, drawn.attempts)[again]
            z, images, _ = await self._draw(model, draw, fresh, None)
            drawn.u[again], drawn.z[again], drawn.images[again] = fresh, z, images
            drawn.probabilities[again] = await self.classify(model, images)
            drawn.redraws += len(again)
            drawn.attempts += 1
            self.metrics.redraws.labels(model.name).inc(len(again))
        return drawn

    async def _draw(
        self, model: ModelRuntime, draw: Draw, u: np.ndarray, encode_images: ImageEncoder | None
    ) -> tuple[np.ndarray, np.ndarray, object]:
        """(z, images, encoded) for noise u [k, latent_dim] at temperature 1, through the draw's prior."""
        if draw.prior == STANDARD_PRIOR:
            z = u if draw.temperature == 1.0 else u * np.float32(draw.temperature)
            images, encoded = await self.decode(model, z, encode_images)
            return z, images, encoded
        rows = draw_rows(u, draw.temperature, draw.label)

        def call() -> Outputs:
            z = model.prior(rows)
            return z, model.decode(z)

        (z, images), encoded = await self._call(model, "sample", rows, call, _last(encode_images))
        return z, images, encoded

    async def warm_up(self, models: list[ModelRuntime]) -> None:
        """Calibrates each model's pass sizes and runs it at every one of them before it
        serves (see batching.warm_up_rows), at startup and for a reload's new versions.
        Raises what the model raises."""
        if self._batchers is None or self.batching is None:
            return
        loop = asyncio.get_running_loop()
        for model in filter(needs_warm_up, models):
            sizes, seconds = await loop.run_in_executor(self._pool, warm_up_rows, model, self.batching)
            self._batchers.calibrated[model] = sizes
            shapes = "; ".join(f"{op} {_ranges(rows)}" for op, rows in sizes.items()) or (
                f"{self.batching.max_size} rows for every pass"
            )
            log.info(
                "model %s %s warmed up in %.2f s; pass sizes: %s", model.name, model.version, seconds, shapes
            )

    def pass_sizes(self, model: ModelRuntime) -> dict[str, tuple[int, ...]]:
        """The row counts a pass of this model may have, per op, as calibrated at its warm-up;
        empty when every pass has the batch size's rows (or batching is off)."""
        if self._batchers is None:
            return {}
        return dict(self._batchers.calibrated.get(model, {}))

    async def aclose(self) -> None:
        """Lets queued and running calls finish, then stops the threads."""
        if self._batchers is not None:
            await self._batchers.drained()
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _not_reached(model: ModelRuntime, draw: Draw, missing: int, attempts: int) -> str:
    wanted = "any class" if draw.label is None else f"class {draw.label} ({model.classes[draw.label]!r})"
    return (
        f"{missing} of the {draw.n} draws were still not read as {wanted} with confidence >= "
        f"{draw.min_confidence:g} by model {model.name!r}'s classifier after {attempts} attempts each "
        "(VAE_MAX_DRAW_ATTEMPTS); ask for a lower min_confidence or a lower temperature, or leave "
        "min_confidence out and read the verdicts"
    )


def _last(encode_images: ImageEncoder | None) -> Finish | None:
    """The Finish that encodes the images, the last of decode's and sample's outputs."""
    if encode_images is None:
        return None
    return lambda outputs: encode_images(outputs[-1])


def _ranges(sizes: tuple[int, ...]) -> str:
    """4, 6, 8, 9, 10, 11, 32 -> "4, 6, 8-11, 32": a log line that fits on a screen."""
    parts: list[str] = []
    start = previous = sizes[0]
    for size in (*sizes[1:], None):
        if size is not None and size == previous + 1:
            previous = size
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if size is not None:
            start = previous = size
    return ", ".join(parts)
