"""Dynamic micro-batching: concurrent calls of one operation on one model share a forward pass.

A forward pass of 32 latents costs little more than one of a single latent, while every
request would otherwise pay a whole pass (and a trip to the worker thread) for itself. So
each (model, op) pair gets a Batcher: requests put their validated arrays in its queue and
await a future; whenever an inference thread is free, the Batcher takes up to `max_size`
rows from the queue (waiting at most `max_wait` after the oldest one arrived for more to
come), runs them through the model in one call on that thread, and hands every request its
own rows back.

- **Exact results** (`exact`, the default). CPU kernels compute a row differently, in the
  last bits, depending on how many rows share the call (matrix-vector for one row, other
  blockings and vector widths for others; which counts differ depends on the CPU, measured
  in docs/performance.md). Left alone, the same seed would give images that differ by ~1e-7
  depending on which requests it was batched with. In exact mode every pass runs at a row
  count where each row comes out bit for bit as in a pass of `max_size` rows, wherever it
  sits: the batch is padded with zero rows up to the next such count, and larger batches
  run as several passes. `calibrate` finds those counts for each model and operation when
  the model is warmed up, on the device and thread settings it serves with (on the
  project's 2-core VM: every even count from 4 for decode, every count from 4 for encode);
  with `pass_sizes="fixed"`, or for a runtime that is not calibrated, every pass has
  `max_size` rows. A row's output then depends on that row alone, so batched, unbatched and
  repeated requests agree bit for bit. The warm-up also runs every one of those shapes, so
  TorchScript's per-shape optimisation never lands on a client's request.
- **Failure isolation.** Inputs are validated before they are queued. If the merged pass
  still raises (a model bug, out of memory), each request of the batch is retried on its
  own, so only the requests whose rows fail get the error.
- **Bounded queue.** At most `queue_max` rows wait per (model, op); a request that would
  exceed it is refused at once with 503 and `Retry-After`, rather than waiting behind an
  ever longer queue (a client that retries elsewhere or later does better than one whose
  request times out).
- **Deadlines.** A request that gives up (VAE_REQUEST_TIMEOUT_S, service.model.inference) takes
  its rows out of the queue; if they are already in a pass, that pass finishes and its
  result is dropped, and a large request's remaining passes are not run.
- **Reload.** Batchers are found by the runtime object itself, weakly: a replaced model
  version keeps its batcher while requests that already hold it are in flight (their rows
  are served by that version), and both are freed once the last one has finished.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.artifact import LEARNED_PRIOR
from service.errors import ProblemError, one_line
from service.metrics import Metrics
from service.model import faults
from service.model.runtime import ModelRuntime, TorchRuntime

log = logging.getLogger("service.model.batching")

# "sample" is the learned prior's draw: rows of noise, temperature and class (latents.draw_rows)
# -> (z = prior(rows), decode(z)) in one pass. (The standard prior's draw, z = temperature * u,
# is computed per request and decoded by "decode".) "classify": images -> class probabilities.
Op = Literal["encode", "decode", "sample", "classify"]
# encode: (mu, sigma); decode: (images,); sample: (z, images); classify: (probabilities,)
Outputs = tuple[np.ndarray, ...]
# Work on one request's outputs that needs no event loop (its PNGs), done on the inference
# thread after the pass: the loop then only writes the answer.
Finish = Callable[[Outputs], object]
Finished = tuple[Outputs, object]  # a request's outputs, and what its Finish made of them (or None)
Result = Finished | BaseException  # one request's share of a pass, or what went wrong with it


class Overloaded(ProblemError):
    """The model's queue is full: answered 503 with Retry-After."""

    status, slug, title = 503, "overloaded", "Server overloaded"


@dataclass(frozen=True)
class BatchPolicy:
    """How requests are merged (Settings: VAE_BATCH_*, VAE_QUEUE_MAX)."""

    max_size: int = 32  # rows per forward pass
    max_wait: float = 0.0  # seconds to wait for more rows once a thread is free
    fill_wait: float = 0.005  # ... when at least half a batch is queued already (a busy server)
    queue_max: int = 2048  # rows waiting per (model, op) before 503
    exact: bool = True  # passes padded to a calibrated row count: results independent of batching
    pass_sizes: Literal["calibrated", "fixed"] = "calibrated"  # "fixed": every pass max_size rows


# For each op, the row counts a pass may have in exact mode, ascending, max_size last.
PassSizes = Mapping[Op, tuple[int, ...]]


def forward(model: ModelRuntime, op: Op, x: np.ndarray) -> Outputs:
    if op == "encode":
        return model.encode(x)
    if op == "sample":
        z = model.prior(x)
        return z, model.decode(z)
    if op == "classify":
        return (model.classify(x),)
    return (model.decode(x),)


class Abandoned(Exception):
    """Every request of a batch gave up (VAE_REQUEST_TIMEOUT_S) before its passes were done."""


def pass_rows(rows: int, sizes: Sequence[int]) -> int:
    """The row count of the pass that carries `rows` rows: the smallest allowed size that
    holds them (sizes ascending; rows at most the last one)."""
    return sizes[bisect.bisect_left(sizes, rows)]


def padding_rows(rows: int, policy: BatchPolicy, sizes: Sequence[int] = ()) -> int:
    """How many zero rows forward_rows adds to compute `rows` rows."""
    rest = rows % policy.max_size
    return pass_rows(rest, sizes or (policy.max_size,)) - rest if policy.exact and rest else 0


def forward_rows(
    model: ModelRuntime,
    op: Op,
    x: np.ndarray,
    policy: BatchPolicy,
    abandoned: Callable[[], bool] | None = None,
    sizes: Sequence[int] = (),
) -> Outputs:
    """The model on x, in passes of at most max_size rows; in exact mode every pass has one
    of `sizes` rows (ascending; max_size alone when empty), the rows padded with zeros up to
    it and the padding dropped. Raises Abandoned between passes once `abandoned()` says
    nobody waits for the result: a pass cannot be interrupted, but the passes left of a
    large request need not run for nobody."""
    size = policy.max_size
    if len(x) <= size and not policy.exact:
        return forward(model, op, x)
    allowed = sizes or (size,)
    parts: list[Outputs] = []
    for start in range(0, len(x), size):
        if abandoned is not None and abandoned():
            raise Abandoned
        chunk = x[start : start + size]
        rows = len(chunk)
        shape = pass_rows(rows, allowed) if policy.exact else rows
        if shape > rows:
            padded = np.zeros((shape, *x.shape[1:]), dtype=x.dtype)
            padded[:rows] = chunk
            chunk = padded
        parts.append(tuple(out[:rows] for out in forward(model, op, chunk)))
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate(outs) for outs in zip(*parts, strict=True))


@dataclass(eq=False)  # compared by identity: the queue removes the very item that timed out
class _Item:
    x: np.ndarray
    future: asyncio.Future[Finished]
    queued_at: float
    finish: Finish | None = None


class Batcher:
    """One (model, op)'s queue and the task that drains it. Created on first use."""

    def __init__(
        self,
        model: ModelRuntime,
        op: Op,
        policy: BatchPolicy,
        executor: Executor,
        slots: asyncio.Semaphore,
        metrics: Metrics,
        calibrated: weakref.WeakKeyDictionary[ModelRuntime, PassSizes] | None = None,
    ) -> None:
        # Weak: a model replaced by a reload must be freed once its last request is served;
        # queued requests hold it strongly until then.
        self._model = weakref.ref(model)
        self.name = model.name
        self.op = op
        self.policy = policy
        self._executor = executor
        self._slots = slots  # one per inference thread, shared by every Batcher of the pool
        # Warmed-up models' pass sizes (None: do not warm up here; every pass max_size rows)
        self._calibrated = calibrated
        self._queue: deque[_Item] = deque()
        self.queued_rows = 0
        self._drainer: asyncio.Task[None] | None = None
        self._full: asyncio.Future[None] | None = None  # resolved when max_size rows are queued
        self._wake: asyncio.Future[None] | None = None  # resolved when a pass ends or the batch fills
        self._running: set[asyncio.Task[None]] = set()
        # Labelled children looked up once: .labels() takes a lock and a dict lookup per call.
        self._m_batch_rows = metrics.batch_size.labels(model.name, op)
        self._m_batch_requests = metrics.batch_requests.labels(model.name, op)
        self._m_padding = metrics.padding_rows.labels(model.name, op)
        self._m_queue_wait = metrics.queue_wait.labels(model.name, op)
        self._m_inference = metrics.inference.labels(model.name, op)
        self._m_queued = metrics.queued_rows.labels(model.name, op)
        self._m_rejected = metrics.rejected.labels(model.name, op)
        self._metrics = metrics  # for service.model.faults, which counts failures by reason

    async def submit(self, x: np.ndarray, finish: Finish | None = None) -> Finished:
        """This request's rows of a pass, and what `finish` made of them on the inference
        thread (None without one)."""
        rows = len(x)
        limit = self.policy.queue_max
        # An empty queue takes any request, so that one larger than the limit still runs.
        if self.queued_rows and self.queued_rows + rows > limit:
            self._m_rejected.inc()
            raise Overloaded(
                f"model {self.name!r} has {self.queued_rows} rows queued for {self.op} and takes at most "
                f"{limit} (VAE_QUEUE_MAX); retry in a moment or spread the load over more replicas",
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        item = _Item(x, loop.create_future(), time.perf_counter(), finish)
        self._queue.append(item)
        self.queued_rows += rows
        self._m_queued.set(self.queued_rows)
        if self.queued_rows >= self.policy.max_size:
            _resolve(self._full)
            _resolve(self._wake)
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain(), name=f"batcher {self.name} {self.op}")
        try:
            return await item.future
        except asyncio.CancelledError:
            # The request gave up (VAE_REQUEST_TIMEOUT_S, or its task was cancelled): rows
            # still queued leave the queue now, so that they neither run for nobody nor hold
            # queue room that other requests are refused for. Rows already in a pass finish
            # there and are discarded.
            self._forget(item)
            raise

    def _forget(self, item: _Item) -> None:
        try:
            self._queue.remove(item)
        except ValueError:  # already taken into a pass
            return
        self.queued_rows -= len(item.x)
        self._m_queued.set(self.queued_rows)

    async def _drain(self) -> None:
        """Forms batches while requests are queued, then ends (the next submit starts a new one)."""
        try:
            while self._queue:
                if self._running and self.queued_rows < self.policy.max_size:
                    # A pass of this model and op is running: a partial batch waits for it to
                    # end (growing meanwhile), and only a full one starts beside it on another
                    # inference thread. Parallel passes of a few rows each would take the
                    # cores the event loop needs (W1 -10 % with 2 threads, docs/performance.md).
                    self._wake = asyncio.get_running_loop().create_future()
                    try:
                        await self._wake
                    finally:
                        self._wake = None
                    continue
                await self._slots.acquire()
                try:
                    await self._gather_more()
                    batch = self._take()
                except BaseException:
                    self._slots.release()
                    raise
                if not batch:
                    self._slots.release()
                    continue
                self._start(batch)
        finally:
            self._drainer = None

    def _start(self, batch: list[_Item]) -> None:
        """Hands the batch to an inference thread now, and delivers its results in a task.
        Submitted here rather than by that task, whose first step would wait in the event
        loop's queue behind every answer already being built (W1: ~2 ms of an idle thread
        per pass, docs/performance.md)."""
        loop = asyncio.get_running_loop()
        try:
            outputs = loop.run_in_executor(self._executor, self._run_batch, batch)
        except BaseException as exc:  # the executor is shut down: nobody may hang
            self._slots.release()
            _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        task = loop.create_task(self._deliver(batch, outputs))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _gather_more(self) -> None:
        """Waits for the batch to fill up: up to max_wait after the oldest queued request, and
        up to fill_wait from now when at least half a batch is queued already. Half a batch
        waiting means a busy server, whose other clients are being answered and will send
        their next requests within a few ms; a pass costs nearly the same CPU for 16 rows as
        for 32 in a busy server (its weights are read from memory once per pass, whatever the
        rows), so a full pass costs half as much per request (docs/performance.md). Fewer
        rows queued means a quiet server, where waiting would only add latency."""
        if self.queued_rows >= self.policy.max_size or not self._queue:
            return
        now = time.perf_counter()
        remaining = self._queue[0].queued_at + self.policy.max_wait - now
        if self.policy.fill_wait > 0 and 2 * self.queued_rows >= self.policy.max_size > 2:
            remaining = max(remaining, self.policy.fill_wait)
        if remaining <= 0:
            return
        loop = asyncio.get_running_loop()
        self._full = loop.create_future()
        timer = loop.call_later(remaining, _resolve, self._full)
        try:
            await self._full
        finally:
            timer.cancel()
            self._full = None

    def _take(self) -> list[_Item]:
        """Up to max_size rows from the front of the queue; at least one request, however large."""
        batch: list[_Item] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            if batch and rows + len(item.x) > self.policy.max_size:
                break
            self._queue.popleft()
            self.queued_rows -= len(item.x)
            if item.future.done():  # the client went away (cancelled) while it waited
                continue
            batch.append(item)
            rows += len(item.x)
        self._m_queued.set(self.queued_rows)
        return batch

    async def _deliver(self, batch: list[_Item], outputs: asyncio.Future[list[Result]]) -> None:
        try:
            results = await outputs
        except BaseException as exc:  # the executor itself failed (shut down): nobody may hang
            self._pass_ended()
            _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        # The thread is free again before these answers are built: the drainer's wake-up
        # goes into the event loop's queue ahead of the requests', so the next pass starts
        # while the loop answers this one's requests.
        self._pass_ended()
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _pass_ended(self) -> None:
        self._slots.release()
        task = asyncio.current_task()
        if task is not None:
            self._running.discard(task)  # before waking the drainer, which looks at _running
        _resolve(self._wake)

    def _run_batch(self, batch: list[_Item]) -> list[Result]:
        """On the inference thread: one merged pass, split back per request."""
        started = time.perf_counter()
        for item in batch:
            self._m_queue_wait.observe(started - item.queued_at)
        model = self._model()
        if model is None:  # cannot happen while requests hold it; said plainly if it ever does
            error = RuntimeError(f"model {self.name} was unloaded while requests for it were queued")
            return [error] * len(batch)
        sizes = self._pass_sizes(model)
        x = batch[0].x if len(batch) == 1 else np.concatenate([item.x for item in batch])
        self._m_batch_rows.observe(len(x))
        self._m_batch_requests.observe(len(batch))
        self._m_padding.inc(padding_rows(len(x), self.policy, sizes))
        try:
            outputs = forward_rows(model, self.op, x, self.policy, lambda: _all_done(batch), sizes)
        except Abandoned:
            return [asyncio.CancelledError()] * len(batch)  # not delivered: every future is done
        except Exception as exc:
            if len(batch) == 1:
                return [faults.failed(model, self.op, len(x), exc, self._metrics)]
            log.warning(
                "model %s: a merged %s pass of %d requests (%d rows) failed (%s); "
                "retrying each request on its own so that only the failing ones get the error",
                self.name,
                self.op,
                len(batch),
                len(x),
                one_line(exc),
            )
            return [self._alone(model, item) for item in batch]
        finally:
            self._m_inference.observe(time.perf_counter() - started)
        parts = _split(outputs, [len(item.x) for item in batch])
        # NaN or infinity is looked for in the whole pass at once (a few numpy calls rather
        # than a few per request); only when there is some, per request: a request whose
        # rows are all finite gets its answer whatever the others' rows held.
        if not all(np.isfinite(out).all() for out in outputs):
            parts = [self._finite(model, part) for part in parts]
        return [_finished(item, part) for item, part in zip(batch, parts, strict=True)]

    def _pass_sizes(self, model: ModelRuntime) -> tuple[int, ...]:
        if self._calibrated is None or not needs_warm_up(model):
            return ()
        sizes = self._calibrated.get(model)
        if sizes is None:
            # A model that did not go through Inference.warm_up (loaded by a reload): its
            # first batch pays the warm-up and calibration, once, rather than every new
            # shape a stall.
            sizes, _seconds = warm_up_rows(model, self.policy)
            self._calibrated[model] = sizes
        return sizes.get(self.op, ())

    def _finite(self, model: ModelRuntime, outputs: Outputs | BaseException) -> Outputs | BaseException:
        if isinstance(outputs, BaseException):
            return outputs
        return faults.non_finite(model, self.op, outputs, self._metrics) or outputs

    def _alone(self, model: ModelRuntime, item: _Item) -> Result:
        try:
            outputs = forward_rows(
                model, self.op, item.x, self.policy, item.future.done, self._pass_sizes(model)
            )
        except Abandoned as exc:  # its future is done: nothing is delivered, nothing failed
            return exc
        except Exception as exc:
            return faults.failed(model, self.op, len(item.x), exc, self._metrics)
        return _finished(item, self._finite(model, outputs))

    async def drained(self) -> None:
        """Returns once nothing is queued or running here."""
        while self._queue or self._running or self._drainer is not None:
            pending = [*self._running, *([self._drainer] if self._drainer else [])]
            if pending:
                await asyncio.wait(pending)
            else:
                await asyncio.sleep(0.001)


def _finished(item: _Item, outputs: Outputs | BaseException) -> Result:
    if isinstance(outputs, BaseException):
        return outputs
    if item.finish is None:
        return outputs, None
    try:
        return outputs, item.finish(outputs)
    except Exception as exc:  # a bug in the encoding: this request's 500, not the pass's
        log.exception("encoding a request's answer from its %d row(s) failed after the pass", len(item.x))
        return exc


def _all_done(batch: list[_Item]) -> bool:
    # Read on the inference thread: done() only reads the future's state, and a stale answer
    # costs at most one more pass.
    return all(item.future.done() for item in batch)


def _fail(batch: list[_Item], exc: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc)


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _split(outputs: Outputs, sizes: Sequence[int]) -> list[Outputs | BaseException]:
    if len(sizes) == 1:
        return [outputs]
    bounds = np.cumsum(sizes)[:-1]
    per_output = [np.split(out, bounds) for out in outputs]
    return [tuple(parts) for parts in zip(*per_output, strict=True)]


class Batchers:
    """The Batchers of one inference pool, by (runtime, op); runtimes are held weakly."""

    def __init__(self, policy: BatchPolicy, executor: Executor, threads: int, metrics: Metrics) -> None:
        self.policy = policy
        self._executor = executor
        self._metrics = metrics
        self._threads = threads
        self._slots: asyncio.Semaphore | None = None  # made on the event loop, at first use
        self.calibrated: weakref.WeakKeyDictionary[ModelRuntime, PassSizes] = weakref.WeakKeyDictionary()
        self._by_model: weakref.WeakKeyDictionary[ModelRuntime, dict[Op, Batcher]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, model: ModelRuntime, op: Op) -> Batcher:
        ops = self._by_model.get(model)
        if ops is None:
            ops = self._by_model[model] = {}
        batcher = ops.get(op)
        if batcher is None:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self._threads)
            batcher = ops[op] = Batcher(
                model, op, self.policy, self._executor, self._slots, self._metrics, self.calibrated
            )
        return batcher

    def all(self) -> list[Batcher]:
        return [b for ops in list(self._by_model.values()) for b in ops.values()]

    async def drained(self) -> None:
        for batcher in self.all():
            await batcher.drained()


def needs_warm_up(model: ModelRuntime) -> bool:
    """A model's torch kernels (TorchScript's or a torch.export program's) are what
    calibration measures, and TorchScript optimises per input shape on first use; other
    runtimes (test doubles) need neither."""
    return isinstance(model, TorchRuntime)


def candidate_sizes(max_size: int) -> list[int]:
    """The row counts calibration tries below max_size: every count up to 32, then every
    eighth (a few hundred passes of calibration would slow startup for little)."""
    return [k for k in range(1, max_size) if k <= 32 or k % 8 == 0]


def _probe(model: ModelRuntime, op: Op, rows: int) -> np.ndarray:
    """Calibration's inputs: distinct rows like real ones (images in [0, 1], latents and
    noise from N(0, 1)), the same every time."""
    rng = np.random.default_rng(20261202)
    if op in ("encode", "classify"):
        return rng.random((rows, 28, 28), dtype=np.float32)
    if op == "sample":  # noise, temperatures around 1, every class and "any" in turn
        probe = np.empty((rows, model.latent_dim + 2), np.float32)
        probe[:, :-2] = rng.standard_normal((rows, model.latent_dim), dtype=np.float32)
        probe[:, -2] = rng.uniform(0.5, 1.5, rows).astype(np.float32)
        classes = len(model.classes) if model.conditional else 0
        probe[:, -1] = np.arange(rows) % (classes + 1) - 1
        return probe
    return rng.standard_normal((rows, model.latent_dim), dtype=np.float32)


def _same(a: Outputs, b: Outputs) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def calibrate(model: ModelRuntime, op: Op, max_size: int) -> tuple[int, ...]:
    """The row counts at which every row of a pass comes out bit for bit as it does in a pass
    of max_size rows, wherever it sits in either: a pass of k rows is compared at both ends
    of a max_size-row reference (rows 0..k-1, and the last k rows moved to the front). The
    answer is the kernels' (which algorithm, blocking and vector width they pick for k rows on
    this device with these thread settings), not the inputs', so one probe settles it; the
    runs also warm TorchScript up at every shape kept. Ascending, max_size last."""
    probe = _probe(model, op, max_size)
    reference = forward(model, op, probe)
    if not _same(
        forward(model, op, np.roll(probe, 1, axis=0)), tuple(np.roll(r, 1, axis=0) for r in reference)
    ):
        log.warning(
            "model %s: a row's %s result depends on its position in a %d-row pass on this device; "
            "batched results may differ from unbatched ones in the last bits (VAE_BATCH_EXACT)",
            model.name,
            op,
            max_size,
        )
    sizes = [
        k
        for k in candidate_sizes(max_size)
        if all(
            _same(
                forward(model, op, probe[start : start + k]), tuple(r[start : start + k] for r in reference)
            )
            for start in (0, max_size - k)
        )
    ]
    return (*sizes, max_size)


def warm_up_rows(model: ModelRuntime, policy: BatchPolicy, runs: int = 3) -> tuple[PassSizes, float]:
    """Calibrates the pass sizes of every op (exact mode, `calibrated`), then runs each op at
    each of its shapes, `runs` times in all: TorchScript's profiling executor optimises a
    graph for a shape only after it has run it, and that first optimisation (a few ms here,
    much more on a loaded machine) must not land on a client's request. Returns the sizes
    (empty where every pass has max_size rows) and the seconds it took."""
    started = time.perf_counter()
    ops: list[Op] = ["encode", "decode"]
    if LEARNED_PRIOR in model.priors:
        ops.append("sample")
    if model.has_classifier:
        ops.append("classify")
    sizes: dict[Op, tuple[int, ...]] = {}
    calibrating = policy.exact and policy.pass_sizes == "calibrated"
    for op in ops:
        shapes = calibrate(model, op, policy.max_size) if calibrating else (policy.max_size,)
        if calibrating:
            sizes[op] = shapes
        probe = _probe(model, op, policy.max_size)
        # calibrate ran each shape it kept twice already
        for _ in range(runs - 2 if calibrating else runs):
            for rows in shapes:
                forward(model, op, probe[:rows])
    return sizes, time.perf_counter() - started
