"""Model reload without downtime (service.model.reload): POST /admin/reload and SIGHUP.

In process: who may reload, what a reload reports, and that every kind of broken new version
is refused while the old one keeps serving. In a real `vae-serve` process: reloads through
the endpoint and through SIGHUP while clients keep sending requests: none fails, none mixes
two versions, and once a reload is done every new request gets the new version.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import make_artifact
from process_support import BackgroundClients, Served, clean_exit, metric, serve
from service_support import Direct, InProcess, make_settings, publish, store_with_v1

from service.app import create_app

KEY = "reload-test-key"
AUTH = {"X-API-Key": KEY}
ATOL = 1e-5


# ---------------------------------------------------------------------------- in process


@pytest.fixture
def store(tiny_store: Path, tmp_path: Path) -> Path:
    return store_with_v1(tiny_store, tmp_path)


@pytest.fixture
def app_with_key(store: Path) -> Iterator[InProcess]:
    served = InProcess(create_app(make_settings(store, api_key=KEY)))
    yield served
    served.close()


def test_without_an_api_key_the_endpoint_is_off(store: Path) -> None:
    served = InProcess(create_app(make_settings(store)))
    try:
        answer = served.post("/admin/reload")
        assert answer.status_code == 403
        assert answer.headers["content-type"] == "application/problem+json"
        problem = answer.json()
        assert problem["type"] == "urn:vae:problem:forbidden"
        assert "VAE_API_KEY is unset" in problem["detail"] and "SIGHUP" in problem["detail"]
    finally:
        served.close()
    opened = InProcess(create_app(make_settings(store, allow_reload_without_key=True)))
    try:
        assert opened.post("/admin/reload").status_code == 200
    finally:
        opened.close()


def test_the_endpoint_needs_the_key_and_reports_nothing_new(app_with_key: InProcess) -> None:
    assert app_with_key.post("/admin/reload").status_code == 401
    assert app_with_key.post("/admin/reload", headers={"X-API-Key": "wrong"}).status_code == 401
    answer = app_with_key.post("/admin/reload", headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200
    report = answer.json()
    assert report["trigger"] == "api" and report["loaded"] == [] and report["refused"] == []
    assert report["serving"] == {"tiny": "v1"} and report["default"] == "tiny"


def test_a_new_version_is_served_after_a_reload(app_with_key: InProcess, store: Path) -> None:
    make_artifact(store, "tiny", latent_dim=8, seed=5)  # v2, other weights
    make_artifact(store, "tiny-new", latent_dim=2, seed=6)  # a model new to the store
    assert app_with_key.get("/models/tiny", headers=AUTH).json()["version"] == "v1"
    answer = app_with_key.post("/admin/reload", headers=AUTH)
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["loaded"] == [
        {"model": "tiny", "previous": "v1", "version": "v2"},
        {"model": "tiny-new", "previous": None, "version": "v1"},
    ]
    assert report["serving"] == {"tiny": "v2", "tiny-new": "v1"}
    v2 = Direct(store, "tiny")
    sampled = app_with_key.post("/sample", json={"n": 3, "seed": 4, "format": "array"}, headers=AUTH).json()
    assert sampled["version"] == "v2"
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(4)).numpy()
    np.testing.assert_allclose(sampled["images"], v2.decode(z), atol=ATOL)
    assert app_with_key.get("/readyz").json()["models"] == ["tiny", "tiny-new"]
    metrics = app_with_key.get("/metrics", headers=AUTH).text
    assert metric(metrics, "vae_model_reloads_total", model="tiny", result="loaded") == 1
    assert metric(metrics, "vae_reload_runs_total", trigger="api") == 1
    assert metric(metrics, "vae_model_info", model="tiny", version="v2") == 1
    assert 'vae_model_info{device="cpu",latent_dim="8",model="tiny",version="v1"}' not in metrics
    # A second reload finds nothing new.
    assert app_with_key.post("/admin/reload", headers=AUTH).json()["loaded"] == []


def _tampered(path: Path) -> str:
    with (path / "model.pt").open("ab") as f:
        f.write(b"tampered")
    return "model.pt has sha256"


def _incomplete(path: Path) -> str:
    (path / "model.pt").unlink()
    return "model.pt is missing"


def _wrong_shape(path: Path) -> str:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["latent_dim"] = 5  # the model's latent_dim is 8
    (path / "manifest.json").write_text(json.dumps(manifest))
    return "manifest says latent_dim 5, the TorchScript model says 8"


def _not_torchscript(path: Path) -> str:
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "model.pt").write_bytes(b"not a model")
    manifest["files"]["model.pt"] = __import__("hashlib").sha256(b"not a model").hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    return "is not a loadable TorchScript model"


@pytest.mark.parametrize("breakage", [_tampered, _incomplete, _wrong_shape, _not_torchscript])
def test_a_broken_new_version_is_refused_and_the_old_keeps_serving(
    app_with_key: InProcess, store: Path, tmp_path: Path, breakage, caplog: pytest.LogCaptureFixture
) -> None:
    built = make_artifact(tmp_path / "build", "tiny", latent_dim=8, seed=5, version="v2").path
    reason = breakage(built)
    publish(built, store)
    answer = app_with_key.post("/admin/reload", headers=AUTH)
    assert answer.status_code == 409
    problem = answer.json()
    assert problem["type"] == "urn:vae:problem:reload-refused"
    [refused] = problem["refused"]
    assert refused["model"] == "tiny" and refused["version"] == "v2" and refused["serving"] == "v1"
    assert reason in refused["reason"] and reason in problem["detail"]
    assert problem["loaded"] == [] and problem["serving"] == {"tiny": "v1"}
    sampled = app_with_key.post("/sample", json={"n": 1}, headers=AUTH)
    assert sampled.status_code == 200 and sampled.json()["version"] == "v1"
    [line] = [r.getMessage() for r in caplog.records if "refusing model tiny v2" in r.getMessage()]
    assert "still serving v1" in line and reason in line
    metrics = app_with_key.get("/metrics", headers=AUTH).text
    assert metric(metrics, "vae_model_reloads_total", model="tiny", result="refused") == 1


def test_with_several_worker_processes_the_endpoint_points_to_sighup(
    app_with_key: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAE_WORKER_PROCESSES", "2")  # as `vae-serve --workers 2` sets for its workers
    answer = app_with_key.post("/admin/reload", headers=AUTH)
    assert answer.status_code == 409 and answer.json()["type"] == "urn:vae:problem:reload-unavailable"
    assert "SIGHUP to the parent" in answer.json()["detail"]


def test_a_pinned_version_stays_pinned(store: Path) -> None:
    make_artifact(store, "tiny", latent_dim=8, seed=5)  # v2
    served = InProcess(create_app(make_settings(store, api_key=KEY, models=["tiny:v1"])))
    try:
        report = served.post("/admin/reload", headers=AUTH).json()
        assert report["loaded"] == [] and report["serving"] == {"tiny": "v1"}
    finally:
        served.close()


# ---------------------------------------------------------------------------- a real server


@dataclass
class Result:
    kind: str
    sent: float
    status: int
    version: str | None
    consistent: bool
    error: str = ""


class Load(BackgroundClients):
    """Clients that send /reconstruct and /sample without pause until stopped, and check each
    answer against the version it names: mu from that version's encoder, images from that
    version's decoder. An answer that mixed two versions matches neither."""

    def __init__(self, url: str, expected: dict[str, dict[str, np.ndarray]], pixels: np.ndarray) -> None:
        self.url = url
        self.expected = expected
        self.pixels = pixels
        self.results: list[Result] = []
        super().__init__(clients=3)

    def client(self, k: int) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=60) as http:
            while not self.stopping.is_set():
                kind = "reconstruct" if k % 2 == 0 else "sample"
                sent = time.monotonic()
                try:
                    if kind == "reconstruct":
                        body = {"pixels": self.pixels.tolist(), "format": "array"}
                        answer = http.post("/reconstruct", json=body)
                    else:
                        answer = http.post("/sample", json={"n": 4, "seed": 9, "format": "array"})
                except httpx.HTTPError as exc:
                    self.results.append(Result(kind, sent, 0, None, False, repr(exc)))
                    continue
                if answer.status_code != 200:
                    self.results.append(Result(kind, sent, answer.status_code, None, False, answer.text))
                    continue
                data = answer.json()
                self.results.append(Result(kind, sent, 200, data["version"], self._matches(kind, data)))

    def _matches(self, kind: str, data: dict) -> bool:
        want = self.expected.get(data["version"])
        if want is None:
            return False
        images = np.asarray(data["images"], np.float32)
        if kind == "sample":
            return bool(np.allclose(images, want["sample"], atol=ATOL))
        mu = np.asarray(data["mu"], np.float32)
        return bool(np.allclose(mu, want["mu"], atol=ATOL) and np.allclose(images, want["rec"], atol=ATOL))

    def sent_after(self, t: float) -> list[Result]:
        return [r for r in self.results if r.sent > t]


def expected_outputs(store: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    model = Direct(store, "tiny")
    mu, _ = model.encode(pixels)
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(9)).numpy()
    return {"mu": mu, "rec": model.decode(mu), "sample": model.decode(z)}


@pytest.mark.slow
def test_reloads_under_load_in_a_real_server(tiny_store: Path, tmp_path: Path) -> None:
    store = store_with_v1(tiny_store, tmp_path)
    pixels = np.random.default_rng(0).random((2, 28, 28), dtype=np.float32)
    builds: dict[str, Path] = {}
    expected = {"v1": expected_outputs(store, pixels)}
    for version, seed in (("v2", 21), ("v3", 22), ("v4", 23)):
        build_store = tmp_path / f"build-{version}"
        builds[version] = make_artifact(build_store, "tiny", 8, seed=seed, version=version).path
        expected[version] = expected_outputs(build_store, pixels)
    _tampered(builds["v4"])

    served: Served = serve(
        store, tmp_path / "serve.log", "--api-key", KEY, "--inference-threads", "2", "--models", "tiny"
    )
    try:
        with (
            Load(served.url, expected, pixels) as load,
            httpx.Client(base_url=served.url, headers=AUTH, timeout=60) as http,
        ):
            time.sleep(0.5)
            # 1. The endpoint: v2 is served once it answers.
            publish(builds["v2"], store)
            answer = http.post("/admin/reload")
            after_v2 = time.monotonic()
            assert answer.status_code == 200, answer.text
            assert answer.json()["loaded"] == [{"model": "tiny", "previous": "v1", "version": "v2"}]
            time.sleep(0.5)
            # 2. SIGHUP: v3 is served once /models says so.
            publish(builds["v3"], store)
            served.signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while http.get("/models/tiny").json()["version"] != "v3":
                assert time.monotonic() < deadline, served.log()
                time.sleep(0.02)
            after_v3 = time.monotonic()
            time.sleep(0.5)
            # 3. A tampered v4, by SIGHUP and by the endpoint: refused both times; v3 serves on.
            publish(builds["v4"], store)
            served.signal(signal.SIGHUP)
            served.wait_for_log("reload (sighup): refusing model tiny v4, still serving v3")
            refused = http.post("/admin/reload")
            assert refused.status_code == 409 and refused.json()["serving"] == {"tiny": "v3"}
            time.sleep(0.5)
            metrics = http.get("/metrics").text

        results = load.results
        failures = [r for r in results if r.status != 200]
        assert not failures, f"{len(failures)} of {len(results)} requests failed, e.g. {failures[:3]}"
        mixed = [r for r in results if not r.consistent]
        assert not mixed, f"{len(mixed)} answers do not match the version they name: {mixed[:3]}"
        seen = {r.version for r in results}
        assert seen == {"v1", "v2", "v3"}, f"versions answered: {seen}"
        assert {r.version for r in load.sent_after(after_v2)} <= {"v2", "v3"}
        assert {r.version for r in load.sent_after(after_v3)} == {"v3"}
        assert len(load.sent_after(after_v3)) >= 3, "the load kept running after the last reload"
        assert metric(metrics, "vae_model_reloads_total", model="tiny", result="loaded") == 2
        assert metric(metrics, "vae_model_reloads_total", model="tiny", result="refused") == 2
        assert metric(metrics, "vae_reload_runs_total", trigger="sighup") == 2
        log = served.log()
        assert "received SIGHUP: reloading models from" in log
        assert "reload (api): loaded model tiny v2" in log and "(was v1)" in log
        assert "reload (sighup): loaded model tiny v3" in log
        assert clean_exit(served.stop()), served.log()
    finally:
        served.kill()
