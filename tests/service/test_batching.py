"""Micro-batching (service.model.batching): merged requests get exactly what they would alone, a
failing request fails alone, a full queue answers 503 with Retry-After, batch sizes are
measured, and a replaced model's batcher drains and is freed. No timings are asserted:
speed is measured by the benchmark (bench/), never here."""

from __future__ import annotations

import asyncio
import gc
import io
import re
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from service_support import Direct, InProcess, StandardPriorOnly, make_settings
from vae_client.client import AsyncVAEClient

from service import artifact
from service.api.images import to_uint8
from service.app import create_app
from service.metrics import Metrics
from service.model.batching import (
    Batcher,
    BatchPolicy,
    calibrate,
    candidate_sizes,
    forward_rows,
    padding_rows,
    pass_rows,
    warm_up_rows,
)
from service.model.runtime import ModelRegistry, TorchScriptRuntime

# Long enough that requests sent together are merged into one pass even on a loaded machine.
MERGE_WAIT_MS = 300.0


class Recorder(StandardPriorOnly):
    """A ModelRuntime double (latent_dim 3) that records the rows of every call, can be held
    up by an event, and fails any call containing a row whose first number is POISON."""

    POISON = 13.0
    version = "v0"
    latent_dim = 3
    device = "cpu"

    def __init__(self, name: str = "double", value: float = 0.5) -> None:
        self.manifest: dict[str, Any] = {}
        self.name = name
        self.value = value
        self.calls: list[int] = []
        self.entered = threading.Event()  # set once a decode has started
        self.gate = threading.Event()  # decode waits for it
        self.gate.set()

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(len(x))
        return np.zeros((len(x), 3), np.float32), np.ones((len(x), 3), np.float32)

    def decode(self, z: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(30)
        self.calls.append(len(z))
        if (z[:, 0] == self.POISON).any():
            raise RuntimeError("a row the model cannot take")
        # Each image carries its latent's first number, so a mix-up between requests shows.
        return np.broadcast_to(
            z[:, :1, None] * 0 + self.value + z[:, :1, None] / 100, (len(z), 28, 28)
        ).copy()


def serve(store: Path, registry: ModelRegistry | None = None, **settings: Any) -> InProcess:
    return InProcess(create_app(make_settings(store, **settings), registry))


@pytest.fixture(scope="module")
def merging(tiny_store: Path) -> Iterator[InProcess]:
    served = serve(tiny_store, inference_threads=1, batch_max_wait_ms=MERGE_WAIT_MS)
    yield served
    served.close()


def metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(selector)}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# ---------------------------------------------------------------------------- exactness


@pytest.fixture(scope="module")
def tiny_runtime(tiny_store: Path) -> TorchScriptRuntime:
    return TorchScriptRuntime.load(artifact.resolve(tiny_store, "tiny"), torch.device("cpu"))


def test_calibrated_pass_sizes_keep_every_rows_output_independent_of_its_batch(
    tiny_runtime: TorchScriptRuntime,
) -> None:
    """The premise of exact mode, at every pass size calibration keeps: a row's output is the
    same alone as in any merged pass, wherever it sits in it and whatever shares it."""
    policy = BatchPolicy(max_size=16, exact=True)
    sizes, _seconds = warm_up_rows(tiny_runtime, policy)
    assert set(sizes) == {"encode", "decode"}  # tiny has no learned prior
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 8)).astype(np.float32)
    x = rng.random((40, 28, 28), dtype=np.float32)
    (alone,) = forward_rows(tiny_runtime, "decode", z[:1], policy, sizes=sizes["decode"])
    mu_alone, sigma_alone = forward_rows(tiny_runtime, "encode", x[:1], policy, sizes=sizes["encode"])
    for op, shapes in sizes.items():
        assert list(shapes) == sorted(set(shapes)) and shapes[-1] == policy.max_size, (op, shapes)
    # Every row count a merged pass can carry, so every calibrated size (and the chunking of
    # requests larger than max_size) is used; the lone row at the start, middle and end.
    for total in range(1, 41):
        others = rng.normal(size=(total - 1, 8)).astype(np.float32)
        images = rng.random((total - 1, 28, 28), dtype=np.float32)
        for where in {0, (total - 1) // 2, total - 1}:
            (decoded,) = forward_rows(
                tiny_runtime, "decode", np.insert(others, where, z[0], axis=0), policy, sizes=sizes["decode"]
            )
            np.testing.assert_array_equal(decoded[where], alone[0], err_msg=f"decode, {total} rows")
            mu, sigma = forward_rows(
                tiny_runtime, "encode", np.insert(images, where, x[0], axis=0), policy, sizes=sizes["encode"]
            )
            np.testing.assert_array_equal(mu[where], mu_alone[0], err_msg=f"encode, {total} rows")
            np.testing.assert_array_equal(sigma[where], sigma_alone[0], err_msg=f"encode, {total} rows")


class SizeSensitive(StandardPriorOnly):
    """A ModelRuntime double whose results change in the last bit with the pass's row count,
    as CPU kernels do: passes of an odd number of rows, or of fewer than 4, round differently."""

    name, version, latent_dim, device = "sizes", "v0", 3, "cpu"
    manifest: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu = x.reshape(len(x), -1)[:, :3].copy()
        return mu, np.ones_like(mu)

    def decode(self, z: np.ndarray) -> np.ndarray:
        self.calls.append(len(z))
        images = np.repeat(z[:, :1, None], 28, axis=1).repeat(28, axis=2).astype(np.float32) / 10 + 0.5
        if len(z) % 2 or len(z) < 4:
            images = np.nextafter(images, np.float32(2.0))
        return images


def test_calibration_keeps_only_the_sizes_that_compute_a_row_as_the_full_pass_does() -> None:
    model = SizeSensitive()
    assert calibrate(model, "decode", 16) == (4, 6, 8, 10, 12, 14, 16)
    assert calibrate(model, "encode", 16) == tuple(range(1, 17))  # encode is exact at every size
    # A lone row then runs in a pass of 4 rows, 5 rows in one of 6: the padding is counted.
    policy = BatchPolicy(max_size=16)
    sizes = (4, 6, 8, 10, 12, 14, 16)
    z = np.arange(15, dtype=np.float32).reshape(5, 3)
    model.calls.clear()
    (images,) = forward_rows(model, "decode", z, policy, sizes=sizes)
    assert model.calls == [6] and images.shape == (5, 28, 28)
    (full,) = forward_rows(model, "decode", np.concatenate([z, np.zeros((11, 3), np.float32)]), policy)
    np.testing.assert_array_equal(images, full[:5])
    assert padding_rows(5, policy, sizes) == 1 and padding_rows(37, policy, sizes) == 1
    assert padding_rows(5, policy) == 11 and padding_rows(32, policy) == 0
    assert padding_rows(5, BatchPolicy(max_size=16, exact=False), sizes) == 0
    # The sizes calibration tries: every count up to 32, then every eighth.
    assert candidate_sizes(48) == [*range(1, 33), 40]


def test_fixed_pass_sizes_pad_every_pass_to_the_batch_size() -> None:
    """VAE_BATCH_PASS_SIZES=fixed: the scheme before calibration, every pass max_size rows."""
    model = SizeSensitive()
    sizes, _seconds = warm_up_rows(model, BatchPolicy(max_size=8, pass_sizes="fixed"), runs=1)
    assert sizes == {} and set(model.calls) == {8}


def test_mixed_seeds_merged_in_one_batch_equal_each_request_alone(
    merging: InProcess, tiny_store: Path
) -> None:
    bodies = [
        {"n": n, "seed": seed, "temperature": t, "return_latents": True, "format": "array"}
        for n, seed, t in [(1, 0, 1.0), (3, 1, 0.5), (1, 2, 1.0), (7, 3, 2.0), (2, 0, 1.0), (1, 99, 1.0)]
    ]
    before = merging.get("/metrics").text

    async def together(client: httpx.AsyncClient) -> list[httpx.Response]:
        return list(await asyncio.gather(*[client.post("/sample", json=b) for b in bodies]))

    merged = merging.run(together, merging.client)
    after = merging.get("/metrics").text
    alone = [merging.post("/sample", json=b) for b in bodies]  # one at a time: batches of one request
    assert all(r.status_code == 200 for r in merged + alone)
    for body, m, a in zip(bodies, merged, alone, strict=True):
        assert m.json()["images"] == a.json()["images"], body  # bit for bit, as floats
        assert m.json()["z"] == a.json()["z"]
    # ... and they really were merged: some pass took several requests.
    labels = {"model": "tiny", "op": "decode"}
    passes = metric(after, "vae_model_batch_requests_count", **labels) - metric(
        before, "vae_model_batch_requests_count", **labels
    )
    assert passes < len(bodies)
    # The model itself agrees (to float tolerance: it ran at another batch shape).
    direct = Direct(tiny_store, "tiny")
    z = np.asarray(merged[1].json()["z"], np.float32)
    np.testing.assert_allclose(merged[1].json()["images"], direct.decode(z), atol=1e-5)


def test_binary_answers_carry_the_same_images(merging: InProcess) -> None:
    body = {"n": 5, "seed": 4, "format": "array"}
    floats = np.asarray(merging.post("/sample", json=body).json()["images"], np.float32)
    npy = merging.post("/sample", json=body, headers={"Accept": "application/x-npy"})
    assert npy.status_code == 200 and npy.headers["content-type"] == "application/x-npy"
    assert npy.headers["X-Seed"] == "4" and npy.headers["X-Shape"] == "5,28,28"
    assert npy.headers["X-Model"] == "tiny" and npy.headers["X-Model-Version"] == "v1"
    np.testing.assert_array_equal(np.load(io.BytesIO(npy.content)), floats)
    raw = merging.post("/sample", json=body, headers={"Accept": "application/octet-stream"})
    assert raw.headers["content-type"] == "application/octet-stream" and raw.headers["X-Dtype"] == "uint8"
    pixels = np.frombuffer(raw.content, np.uint8).reshape(5, 28, 28)
    np.testing.assert_array_equal(pixels, to_uint8(floats))
    # As for image/png: the q-values decide, a tie goes to the type named besides JSON.
    for accept, answered in [
        ("application/json, application/x-npy;q=0.5", "application/json"),
        ("application/json, application/x-npy", "application/x-npy"),
        ("*/*", "application/json"),
    ]:
        got = merging.post("/sample", json=body, headers={"Accept": accept}).headers["content-type"]
        assert got == answered, accept
    prefer = {"Accept": "application/json;q=0.5, application/octet-stream"}
    assert merging.post("/decode", json={"z": [[0.0] * 8]}, headers=prefer).content.__len__() == 784


def test_the_client_fetches_binary_and_gets_the_json_values(merging: InProcess) -> None:
    async def both() -> tuple[Any, Any, np.ndarray, np.ndarray]:
        transport = httpx.ASGITransport(app=merging.app)
        async with (
            AsyncVAEClient("http://testserver", transport=transport) as as_json,
            AsyncVAEClient("http://testserver", transport=transport, binary=True) as as_npy,
        ):
            z = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
            return (
                await as_json.sample(6, seed=8, temperature=0.7),
                await as_npy.sample(6, seed=8, temperature=0.7),
                await as_json.decode(z),
                await as_npy.decode(z),
            )

    js, nb, dj, db = merging.run(both)
    np.testing.assert_array_equal(nb.images, js.images)
    assert (nb.seed, nb.model, nb.version, nb.temperature) == (8, "tiny", "v1", 0.7)
    np.testing.assert_array_equal(db, dj)


# ---------------------------------------------------------------------------- failures and limits


def test_a_failing_request_in_a_batch_does_not_fail_the_others(tiny_store: Path) -> None:
    double = Recorder()
    served = serve(
        tiny_store,
        ModelRegistry({"double": double}, "double"),
        inference_threads=1,
        batch_max_wait_ms=MERGE_WAIT_MS,
    )
    transport = httpx.ASGITransport(app=served.app, raise_app_exceptions=False)
    rows = [[1.0, 0, 0], [2.0, 0, 0], [Recorder.POISON, 0, 0], [4.0, 0, 0]]

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            calls = [client.post("/decode", json={"z": [row], "format": "array"}) for row in rows]
            return list(await asyncio.gather(*calls))

    try:
        answers = served.run(together)
    finally:
        served.close()
    assert [r.status_code for r in answers] == [200, 200, 500, 200]
    for row, answer in zip(rows, answers, strict=True):
        if row[0] != Recorder.POISON:
            assert answer.json()["images"][0][0][0] == pytest.approx(0.5 + row[0] / 100)
    assert answers[2].headers["content-type"] == "application/problem+json"
    # One merged pass of 32 rows (exact mode pads), then each request alone.
    assert double.calls[0] == 32 and len(double.calls) == 1 + len(rows)


def test_a_full_queue_answers_503_with_retry_after(tiny_store: Path) -> None:
    double = Recorder()
    served = serve(
        tiny_store,
        ModelRegistry({"double": double}, "double"),
        inference_threads=1,
        batch_max_size=1,
        queue_max=2,
    )

    async def flood(client: httpx.AsyncClient) -> list[httpx.Response]:
        double.gate.clear()  # the first pass blocks, so the rest must queue
        first = asyncio.create_task(client.post("/decode", json={"z": [[0, 0, 0]]}))
        while not double.entered.is_set():  # the first request is on the model, not in the queue
            await asyncio.sleep(0.01)
        rest = [asyncio.create_task(client.post("/decode", json={"z": [[i, 0, 0]]})) for i in range(1, 6)]
        while sum(t.done() for t in rest) < 3:  # two fit in the queue, three are refused at once
            await asyncio.sleep(0.01)
        double.gate.set()
        return [await first, *[await t for t in rest]]

    try:
        answers = served.run(flood, served.client)
        text = served.get("/metrics").text
    finally:
        double.gate.set()
        served.close()
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 200, 503, 503, 503]
    refused = next(r for r in answers if r.status_code == 503)
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["type"] == "urn:vae:problem:overloaded" and "VAE_QUEUE_MAX" in problem["detail"]
    assert metric(text, "vae_model_rejected_total", model="double", op="decode") == 3


def test_batch_sizes_and_queue_appear_in_metrics(merging: InProcess) -> None:
    before = merging.get("/metrics").text
    merging.post("/sample", json={"n": 5, "seed": 1})
    text = merging.get("/metrics").text
    # A lone request of 5 rows ran in a pass of the next calibrated size, its padding counted.
    state = merging.app.state.vae
    sizes = state.inference.pass_sizes(state.registry.get("tiny"))["decode"]
    labels = {"model": "tiny", "op": "decode"}
    added = metric(text, "vae_model_padding_rows_total", **labels) - metric(
        before, "vae_model_padding_rows_total", **labels
    )
    assert added == pass_rows(5, sizes) - 5, sizes
    assert re.search(r'vae_model_batch_requests_bucket\{le="1.0",model="tiny",op="decode"\} [1-9]', text)
    assert re.search(r'vae_model_batch_size_bucket\{le="32.0",model="tiny",op="decode"\} [1-9]', text)
    assert 'vae_model_queued_rows{model="tiny",op="decode"} 0.0' in text
    assert "vae_model_rejected_total" in text


def test_batching_can_be_turned_off(tiny_store: Path) -> None:
    served = serve(tiny_store, batching=False)
    try:
        on = served.post("/sample", json={"n": 3, "seed": 5, "format": "array"})
        encoded = served.post("/encode", json={"pixels": np.zeros((2, 28, 28)).tolist()})
        text = served.get("/metrics").text
    finally:
        served.close()
    assert on.status_code == 200 and encoded.status_code == 200
    assert "vae_model_batch_requests_count" not in text  # no batcher ran


def test_the_next_pass_starts_before_the_last_ones_answers_are_delivered() -> None:
    """A finished pass frees the thread and wakes the drainer before it hands out its
    answers, so the rows queued meanwhile are already on their way to the thread when the
    first answer is built (docs/performance.md, item 9: the other order kept the inference
    thread idle while the event loop answered)."""

    async def main() -> list[int]:
        model = Recorder()
        model.gate.clear()
        executor = ThreadPoolExecutor(1)
        policy = BatchPolicy(max_size=4, exact=False, fill_wait=0.0)  # the two later rows run at once
        batcher = Batcher(model, "decode", policy, executor, asyncio.Semaphore(1), Metrics())  # type: ignore[arg-type]
        queued_when_answered: list[int] = []

        async def first() -> None:
            await batcher.submit(np.zeros((1, 3), np.float32))
            queued_when_answered.append(batcher.queued_rows)  # in the step that delivered it

        answered = asyncio.create_task(first())
        await asyncio.to_thread(model.entered.wait, 10)  # the first pass is running, held
        later = [asyncio.create_task(batcher.submit(np.full((1, 3), i, np.float32))) for i in (1, 2)]
        await asyncio.sleep(0)
        assert batcher.queued_rows == 2
        model.gate.set()
        await asyncio.wait_for(asyncio.gather(answered, *later), 10)
        executor.shutdown()
        return queued_when_answered + model.calls

    queued, *passes = asyncio.run(main())
    assert queued == 0 and passes == [1, 2]


def test_a_half_full_batch_waits_for_the_rest_and_a_small_one_runs_at_once() -> None:
    """fill_wait: with half a batch queued (a busy server) a free thread waits for the rest,
    up to fill_wait; with less (a quiet server) it runs what there is at once."""

    async def passes(first: int, later: int, fill_wait: float) -> list[int]:
        model = Recorder()
        executor = ThreadPoolExecutor(1)
        policy = BatchPolicy(max_size=8, exact=False, fill_wait=fill_wait)
        batcher = Batcher(model, "decode", policy, executor, asyncio.Semaphore(1), Metrics())  # type: ignore[arg-type]
        row = np.zeros((1, 3), np.float32)
        tasks = [asyncio.create_task(batcher.submit(row)) for _ in range(first)]
        await asyncio.sleep(0.05)  # well within fill_wait, far beyond a pass of the double
        tasks += [asyncio.create_task(batcher.submit(row)) for _ in range(later)]
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        executor.shutdown()
        return model.calls

    assert asyncio.run(passes(4, 4, fill_wait=5.0)) == [8]  # half full: waited, filled, ran at once
    assert asyncio.run(passes(3, 4, fill_wait=5.0)) == [3, 4]  # under half: no wait
    assert asyncio.run(passes(4, 2, fill_wait=0.0)) == [4, 2]  # fill_wait 0: never waits


def test_each_requests_finish_runs_on_the_inference_thread_on_its_own_rows() -> None:
    """What a request's answer makes of its rows (its PNGs) is made right after the pass, on
    the inference thread; a finish that fails fails its own request only."""

    async def main() -> list[object]:
        model = Recorder()
        model.gate.clear()
        executor = ThreadPoolExecutor(1, thread_name_prefix="vae-inference")
        batcher = Batcher(model, "decode", BatchPolicy(max_size=8), executor, asyncio.Semaphore(1), Metrics())  # type: ignore[arg-type]

        def where(outputs: tuple[np.ndarray, ...]) -> tuple[str, float]:
            return threading.current_thread().name, float(outputs[0][0, 0, 0])

        def broken(outputs: tuple[np.ndarray, ...]) -> object:
            raise ValueError("an encoding bug")

        rows = [np.full((1, 3), i, np.float32) for i in (1, 2, 3)]
        calls = [batcher.submit(rows[0], where), batcher.submit(rows[1], broken), batcher.submit(rows[2])]
        tasks = [asyncio.create_task(call) for call in calls]
        await asyncio.sleep(0.05)  # all three queued behind the gate: one pass
        model.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        executor.shutdown()
        assert model.calls == [8]  # one merged pass (a double is not calibrated: max_size rows)
        return results

    first, second, third = asyncio.run(main())
    assert isinstance(first, tuple) and first[1] == ("vae-inference_0", pytest.approx(0.5 + 1 / 100))
    assert isinstance(second, ValueError)
    assert (
        isinstance(third, tuple) and third[1] is None and third[0][0][0, 0, 0] == pytest.approx(0.5 + 3 / 100)
    )


def test_a_shut_down_executor_fails_the_requests_at_once_and_frees_the_thread_slot() -> None:
    async def main() -> None:
        executor = ThreadPoolExecutor(1)
        executor.shutdown()
        slots = asyncio.Semaphore(1)
        batcher = Batcher(Recorder(), "decode", BatchPolicy(max_size=4), executor, slots, Metrics())  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="shutdown"):
            await asyncio.wait_for(batcher.submit(np.zeros((1, 3), np.float32)), 10)
        assert not slots.locked()
        await asyncio.wait_for(batcher.drained(), 10)

    asyncio.run(main())


# ---------------------------------------------------------------------------- reload


def test_a_replaced_model_drains_its_queue_and_is_freed(tiny_store: Path) -> None:
    old, new = Recorder(value=0.25), Recorder(value=0.75)
    served = serve(tiny_store, ModelRegistry({"double": old}, "double"), inference_threads=1)
    state = served.app.state.vae

    async def swap_midway(
        client: httpx.AsyncClient, old: Recorder
    ) -> tuple[list[httpx.Response], httpx.Response]:
        old.gate.clear()
        queued = [
            asyncio.create_task(client.post("/decode", json={"z": [[i, 0, 0]], "format": "array"}))
            for i in range(4)
        ]
        while not old.entered.is_set():  # requests for the old version are queued or running
            await asyncio.sleep(0.01)
        state.registry = ModelRegistry({"double": new}, "double")  # what a reload does
        old.gate.set()
        after = await client.post("/decode", json={"z": [[9, 0, 0]], "format": "array"})
        return [await t for t in queued], after

    try:
        before, after = served.run(swap_midway, served.client, old)
        gone = weakref.ref(old)
        del old
        gc.collect()
        left = len(served.app.state.vae.inference._batchers.all())
    finally:
        served.close()
    assert all(r.status_code == 200 for r in before)
    assert [r.json()["images"][0][0][0] for r in before] == pytest.approx([0.25 + i / 100 for i in range(4)])
    assert after.json()["images"][0][0][0] == pytest.approx(0.75 + 9 / 100)
    assert gone() is None and left == 1  # the old model and its batcher are gone; the new one's stays
