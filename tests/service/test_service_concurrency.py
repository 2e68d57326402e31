"""Concurrency: model calls run off the event loop on a bounded pool, and a seed gives the
same samples however many other requests run at the same time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from service_support import Direct, InProcess, StandardPriorOnly, make_settings

from service.app import create_app
from service.model.runtime import ModelRegistry, ModelRuntime


class SlowRuntime(StandardPriorOnly):
    """A test double for ModelRuntime: answers after a delay and records how many of its
    calls overlapped."""

    name = "slow"
    version = "v0"
    latent_dim = 3
    device = "cpu"

    def __init__(self, delay: float) -> None:
        self.manifest: dict[str, Any] = {
            "likelihood": "bernoulli",
            "dataset": {"name": "none"},
            "metrics": {"x": 1},
        }
        self.delay = delay
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()

    def _work(self) -> None:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(self.delay)  # a blocking call, as a forward pass is
        with self._lock:
            self.active -= 1

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._work()
        return np.zeros((len(x), 3), np.float32), np.ones((len(x), 3), np.float32)

    def decode(self, z: np.ndarray) -> np.ndarray:
        self._work()
        return np.full((len(z), 28, 28), 0.5, np.float32)


def serve_double(
    tiny_store: Path, delay: float, threads: int, **settings: Any
) -> tuple[InProcess, SlowRuntime]:
    runtime = SlowRuntime(delay)
    registry = ModelRegistry({"slow": runtime}, "slow")
    app = create_app(make_settings(tiny_store, inference_threads=threads, **settings), registry)
    return InProcess(app), runtime


def test_the_double_implements_the_runtime_interface() -> None:
    assert isinstance(SlowRuntime(0), ModelRuntime)


def test_inference_does_not_block_the_event_loop(tiny_store: Path) -> None:
    served, _ = serve_double(tiny_store, delay=1.0, threads=1)

    async def scenario(client: httpx.AsyncClient) -> tuple[float, bool, int]:
        slow = asyncio.create_task(client.post("/decode", json={"z": [[0, 0, 0]]}))
        await asyncio.sleep(0.1)  # the decode is now running on the worker thread
        start = time.perf_counter()
        health = await client.get("/healthz")
        elapsed = time.perf_counter() - start
        still_running = not slow.done()
        assert health.status_code == 200
        return elapsed, still_running, (await slow).status_code

    try:
        elapsed, still_running, status = served.run(scenario, served.client)
    finally:
        served.close()
    assert still_running, "the slow call must still be running while /healthz answers"
    assert elapsed < 0.5 and status == 200


@pytest.mark.parametrize("threads", [1, 3])
def test_the_inference_pool_bounds_concurrent_model_calls(tiny_store: Path, threads: int) -> None:
    # One request per forward pass (batches of 1 row), so that the calls can overlap.
    served, runtime = serve_double(tiny_store, delay=0.15, threads=threads, batch_max_size=1)

    async def burst(client: httpx.AsyncClient) -> list[int]:
        calls = [client.post("/decode", json={"z": [[0, 0, 0]]}) for _ in range(6)]
        return [r.status_code for r in await asyncio.gather(*calls)]

    try:
        assert served.run(burst, served.client) == [200] * 6
        info = served.get("/models/slow").json()
    finally:
        served.close()
    assert runtime.peak == threads
    assert info["name"] == "slow" and info["dataset"] == "none" and info["metrics"] == {"x": 1}


class BrokenRuntime(SlowRuntime):
    def decode(self, z: np.ndarray) -> np.ndarray:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_crashing_model_is_a_500_problem_and_the_server_keeps_serving(tiny_store: Path) -> None:
    registry = ModelRegistry({"broken": BrokenRuntime(0)}, "broken")
    served = InProcess(create_app(make_settings(tiny_store), registry))
    transport = httpx.ASGITransport(app=served.app, raise_app_exceptions=False)

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            crashed = await client.post("/sample", json={"n": 1})
            return (
                crashed,
                await client.post("/encode", json={"pixels": [[[0.0] * 28] * 28]}),
                await client.get("/readyz"),
            )

    try:
        crashed, encoded, ready = served.run(scenario)
    finally:
        served.close()
    assert crashed.status_code == 500 and crashed.headers["content-type"] == "application/problem+json"
    assert "the error is in its log" in crashed.json()["detail"] and "CUDA" not in crashed.text
    assert encoded.status_code == 200 and ready.status_code == 200


@pytest.fixture(scope="module")
def api(tiny_store: Path) -> Iterator[InProcess]:
    served = InProcess(create_app(make_settings(tiny_store, inference_threads=4)))
    yield served
    served.close()


def test_seeds_are_reproducible_under_concurrent_requests(api: InProcess, tiny_store: Path) -> None:
    direct = {"tiny": Direct(tiny_store, "tiny"), "tiny-2d": Direct(tiny_store, "tiny-2d")}
    seeds = [0, 1, 2, 3, 4] * 4

    def body(seed: int) -> dict[str, Any]:
        model = "tiny" if seed % 2 == 0 else "tiny-2d"
        return {"n": 3 + seed, "seed": seed, "model": model, "return_latents": True, "format": "array"}

    async def burst(client: httpx.AsyncClient) -> list[dict[str, Any]]:
        unseeded = [client.post("/sample", json={"n": 8}) for _ in range(4)]  # noise on the same pool
        responses = await asyncio.gather(*[client.post("/sample", json=body(s)) for s in seeds], *unseeded)
        assert all(r.status_code == 200 for r in responses)
        return [r.json() for r in responses[: len(seeds)]]

    stop = threading.Event()

    def disturb_global_rng() -> None:
        while not stop.is_set():
            torch.manual_seed(int(time.perf_counter_ns() % 1000))
            torch.randn(64)

    disturber = threading.Thread(target=disturb_global_rng)
    disturber.start()
    try:
        answers = api.run(burst, api.client)
    finally:
        stop.set()
        disturber.join()

    by_seed: dict[int, list[dict[str, Any]]] = {}
    for seed, answer in zip(seeds, answers, strict=True):
        by_seed.setdefault(seed, []).append(answer)
    for seed, group in by_seed.items():
        first = group[0]
        assert all(a["z"] == first["z"] and a["images"] == first["images"] for a in group[1:]), seed
        reference = direct[body(seed)["model"]]
        z = torch.randn(
            3 + seed, reference.artifact.latent_dim, generator=torch.Generator().manual_seed(seed)
        )
        np.testing.assert_array_equal(np.asarray(first["z"], np.float32), z.numpy())
        np.testing.assert_allclose(first["images"], reference.decode(z.numpy()), atol=1e-5)
