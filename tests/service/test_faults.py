"""Faults: a model that raises or returns NaN/infinity on some rows, and broken artifacts.

In process, a test double wraps the real `tiny` runtime through the ModelRuntime interface
(create_app's `registry` seam) and fails only on rows carrying a marker: with batching on
(the requests merged into one pass) and off, only the requests holding those rows get
500 model-failed, the others get exactly the real model's answer, and the server serves on.
Over real `vae-serve` processes: every kind of broken artifact is refused at startup in one
line naming it, and again at reload (SIGHUP and POST /admin/reload) while the old version
keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from conftest import make_artifact
from process_support import BIN, STARTUP_TIMEOUT, clean_env, free_port, metric, serve, start
from service_support import Direct, InProcess, make_settings, publish, store_with_v1

from service import artifact
from service.app import create_app
from service.model.runtime import ModelRegistry, ModelRuntime, load_model
from tests.reliability import record

SECRET = "internal detail /srv/weights/cache.bin"  # must never reach a client
RAISE_AT, NAN_AT, INF_AT = 101.0, 202.0, 303.0  # z[:, 0] markers for decode
PIXEL_RAISE, PIXEL_NAN = 0.25, 0.75  # x[:, 0, 0] markers for encode


class FaultyRuntime:
    """A ModelRuntime that runs the real model and then fails on marked rows: raises when
    any row is marked to raise, puts NaN or infinity in the output of marked rows. Records
    every call's rows, so that a test can see which requests shared a pass."""

    def __init__(self, inner: ModelRuntime) -> None:
        self.inner = inner
        self.name, self.version, self.latent_dim = inner.name, inner.version, inner.latent_dim
        self.device, self.manifest = inner.device, inner.manifest
        self.priors, self.default_prior = inner.priors, inner.default_prior
        self.classes, self.conditional = inner.classes, inner.conditional
        self.has_classifier = inner.has_classifier
        self.decoded: list[np.ndarray] = []

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if (x[:, 0, 0] == PIXEL_RAISE).any():
            raise RuntimeError(SECRET)
        mu, sigma = self.inner.encode(x)
        mu[x[:, 0, 0] == PIXEL_NAN] = np.nan
        return mu, sigma

    def decode(self, z: np.ndarray) -> np.ndarray:
        self.decoded.append(z.copy())
        if (z[:, 0] == RAISE_AT).any():
            raise RuntimeError(SECRET)
        images = self.inner.decode(z)
        images[z[:, 0] == NAN_AT] = np.nan
        images[z[:, 0] == INF_AT] = np.inf
        return images

    def prior(self, rows: np.ndarray) -> np.ndarray:
        return self.inner.prior(rows)

    def classify(self, x: np.ndarray) -> np.ndarray:
        return self.inner.classify(x)


def test_the_double_implements_the_runtime_interface(tiny_store: Path) -> None:
    runtime, _ = load_model(artifact.resolve(tiny_store, "tiny"), torch.device("cpu"), warm_up=False)
    assert isinstance(FaultyRuntime(runtime), ModelRuntime)


def _latents(marker: float | None, seed: int, rows: int = 2) -> list[list[float]]:
    z = np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)
    if marker is not None:
        z[-1, 0] = marker  # the last row of the request is the faulty one
    return z.tolist()


def _pixels(marker: float | None, seed: int) -> list[list[list[float]]]:
    x = np.random.default_rng(seed).random((1, 28, 28), dtype=np.float32) * 0.5
    x[0, 0, 0] = 0.0 if marker is None else marker
    return x.tolist()


# (label, path, body, marker or None): the faulty ones mixed in among good ones.
REQUESTS: list[tuple[str, str, dict[str, Any], bool]] = [
    *[(f"decode {k}", "/decode", {"z": _latents(None, k), "format": "array"}, False) for k in range(4)],
    ("decode raises", "/decode", {"z": _latents(RAISE_AT, 10), "format": "array"}, True),
    ("decode NaN", "/decode", {"z": _latents(NAN_AT, 11), "format": "array"}, True),
    ("decode inf as PNG", "/decode", {"z": _latents(INF_AT, 12), "format": "png"}, True),
    *[(f"encode {k}", "/encode", {"pixels": _pixels(None, 20 + k)}, False) for k in range(2)],
    ("encode raises", "/encode", {"pixels": _pixels(PIXEL_RAISE, 30)}, True),
    ("encode NaN", "/reconstruct", {"pixels": _pixels(PIXEL_NAN, 31), "format": "array"}, True),
]


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no-batching"])
def test_a_faulty_model_fails_only_the_requests_it_touched(
    tiny_store: Path, batching: bool, caplog: pytest.LogCaptureFixture
) -> None:
    inner, _ = load_model(artifact.resolve(tiny_store, "tiny"), torch.device("cpu"))
    double = FaultyRuntime(inner)
    # One inference thread and a long merge window: the concurrent requests share passes.
    settings = make_settings(tiny_store, batching=batching, inference_threads=1, batch_max_wait_ms=300.0)
    served = InProcess(create_app(settings, ModelRegistry({"tiny": double}, "tiny")))
    reference = Direct(tiny_store, "tiny")

    async def together() -> list[httpx.Response]:
        return list(
            await asyncio.gather(*(served.client.post(path, json=body) for _, path, body, _ in REQUESTS))
        )

    try:
        with caplog.at_level(logging.INFO, logger="service"):
            answers = served.run(together)
            after = [
                served.post("/decode", json={"z": _latents(None, 40), "format": "array"}) for _ in range(3)
            ]
            ready = served.get("/readyz")
            metrics = served.get("/metrics").text
    finally:
        served.close()

    faulty = 0
    for (label, path, body, bad), answer in zip(REQUESTS, answers, strict=True):
        if bad:
            faulty += 1
            assert answer.status_code == 500, (label, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            problem = answer.json()
            assert problem["type"] == "urn:vae:problem:model-failed" and problem["title"] == "Model failed"
            assert "model 'tiny' (v1)" in problem["detail"] and "not of the request" in problem["detail"]
            assert (
                SECRET not in answer.text
                and "Traceback" not in answer.text
                and "RuntimeError" not in answer.text
            )
            continue
        assert answer.status_code == 200, (label, answer.text)
        data = answer.json()
        if path == "/decode":
            want = reference.decode(np.asarray(body["z"], np.float32))
            np.testing.assert_allclose(data["images"], want, atol=1e-5, err_msg=label)
        else:
            mu, sigma = reference.encode(np.asarray(body["pixels"], np.float32))
            np.testing.assert_allclose(data["mu"], mu, atol=1e-5, err_msg=label)
            np.testing.assert_allclose(data["sigma"], sigma, atol=1e-5, err_msg=label)
    assert [a.status_code for a in after] == [200] * 3 and ready.status_code == 200

    if batching:  # the raising request shared a merged pass with good ones, then ran alone
        merged = [
            z for z in double.decoded if (z[:, 0] == RAISE_AT).any() and (np.abs(z[:, 0]) < 50).sum() > 2
        ]
        assert merged, "the faulty decode was never merged with other requests"
    counts = {
        (op, reason): metric(metrics, "vae_model_failures_total", model="tiny", op=op, reason=reason)
        for op in ("encode", "decode")
        for reason in ("error", "non_finite")
    }
    assert counts == {
        ("encode", "error"): 1,
        ("encode", "non_finite"): 1,
        ("decode", "error"): 1,
        ("decode", "non_finite"): 2,
    }
    lines = [r for r in caplog.records if r.name == "service.model.faults" and r.levelno == logging.ERROR]
    assert len(lines) == faulty
    for line in lines:
        text = line.getMessage()
        assert "\n" not in text and text.startswith("model tiny v1 ") and "answered 500 model-failed" in text
    assert sum(SECRET in r.getMessage() for r in lines) == 2  # the operator sees what the client does not
    record(
        "faults",
        f"model double raising / returning NaN / inf on chosen rows, batching {'on' if batching else 'off'}: "
        f"{len(REQUESTS)} concurrent requests, {faulty} faulty",
        len(REQUESTS),
        f"only the {faulty} faulty requests got 500 model-failed (no internals); "
        f"{len(REQUESTS) - faulty} others equal the model's output; kept serving; counted in /metrics",
        "test_faults.py::test_a_faulty_model_fails_only_the_requests_it_touched",
    )


# ---------------------------------------------------------------------------- broken artifacts


class RaisesOnWarmUp(torch.nn.Module):
    """Loads fine and has the contract's methods, but its encoder raises."""

    def __init__(self) -> None:
        super().__init__()
        self.latent_dim = 8

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.numel() >= 0:
            raise RuntimeError("the encoder exploded")
        return x, x

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(z.sum(1).reshape(-1, 1, 1, 1).expand(-1, 1, 28, 28))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])


def _rewrite_manifest(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _flipped_byte(path: Path) -> str:
    data = bytearray((path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(data))
    return "model.pt has sha256"


def _missing_file(path: Path) -> str:
    (path / "model.pt").unlink()
    return "model.pt is missing"


def _tampered_manifest(path: Path) -> str:
    _rewrite_manifest(path, lambda m: m.update(latent_dim=5))  # the model's latent_dim is 8
    return "manifest says latent_dim 5"


def _extra_file(path: Path) -> str:
    (path / "evil.py").write_text("import os\n")
    return "files not listed in the manifest: ['evil.py']"


def _missing_manifest(path: Path) -> str:
    (path / "manifest.json").unlink()
    return "no manifest.json"


def _not_torchscript(path: Path) -> str:
    junk = b"PK\x03\x04 this is not a TorchScript archive"
    (path / "model.pt").write_bytes(junk)
    _rewrite_manifest(path, lambda m: m["files"].update({"model.pt": hashlib.sha256(junk).hexdigest()}))
    return "is not a loadable TorchScript model"


def _raises_at_warm_up(path: Path) -> str:
    scripted = torch.jit.script(RaisesOnWarmUp())
    model_file = path / "model.pt"
    scripted.save(str(model_file))
    digest = artifact.sha256_file(model_file)
    _rewrite_manifest(path, lambda m: m["files"].update({"model.pt": digest}))
    return "RuntimeError: the encoder exploded)"


BREAKAGES: dict[str, Callable[[Path], str]] = {
    "flipped-byte": _flipped_byte,
    "missing-file": _missing_file,
    "tampered-manifest": _tampered_manifest,
    "extra-file": _extra_file,
    "missing-manifest": _missing_manifest,
    "not-torchscript": _not_torchscript,
    "raises-at-warm-up": _raises_at_warm_up,
}


def broken(store: Path, name: str, kind: str, version: str | None = None, seed: int = 0) -> tuple[Path, str]:
    """A `tiny`-shaped artifact (latent_dim 8) broken the `kind` way: its path and the words
    its refusal must contain."""
    path = make_artifact(store, name, latent_dim=8, seed=seed, version=version).path
    return path, BREAKAGES[kind](path)


@pytest.mark.slow
def test_broken_artifacts_stop_the_server_at_startup_one_line_each(tmp_path: Path) -> None:
    store = tmp_path / "store"
    expected = {kind: broken(store, kind, kind) for kind in BREAKAGES}
    log_path = tmp_path / "serve.log"
    port = free_port()
    argv = [str(BIN / "vae-serve"), "--port", str(port), "--model-store", str(store), "--device", "cpu"]
    served = start(argv, clean_env(), log_path, port)
    try:
        code = served.process.wait(timeout=STARTUP_TIMEOUT)
    except subprocess.TimeoutExpired:
        served.kill()
        pytest.fail(f"vae-serve kept running with only broken artifacts:\n{served.log()}")
    log = served.log()
    assert code == 1 and "Traceback" not in log, log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == len(BREAKAGES) + 1, log
    for kind, (path, reason) in expected.items():
        [line] = [e for e in errors if f"refusing model {kind}: " in e]
        assert str(path) in line and reason in line, line
    assert f"vae-serve cannot start: none of the {len(BREAKAGES)} model(s)" in errors[-1]
    record(
        "faults",
        "broken artifacts at startup: flipped byte, missing file, tampered manifest, extra file, "
        f"missing manifest, not TorchScript, raises at warm-up ({len(BREAKAGES)} kinds)",
        len(BREAKAGES),
        "refused, one ERROR line each naming the artifact and the check; exit status 1",
        "test_faults.py::test_broken_artifacts_stop_the_server_at_startup_one_line_each",
    )


@pytest.mark.slow
def test_a_bad_model_beside_a_good_one_and_broken_reloads(tiny_store: Path, tmp_path: Path) -> None:
    """The rule when one of two configured models is broken: the server starts and serves
    the good one, with one ERROR line for the other (docs/service.md). Then each kind of
    broken new version of the good model, by SIGHUP and by POST /admin/reload: refused, the
    reason reported, the old version serving throughout; a good version still loads after."""
    key = "faults-key"
    store = store_with_v1(tiny_store, tmp_path)
    bad_path, bad_reason = broken(store, "bad", "flipped-byte")
    served = serve(store, tmp_path / "serve.log", "--api-key", key, "--models", "tiny,bad")
    attempts = 0
    try:
        with httpx.Client(base_url=served.url, headers={"X-API-Key": key}, timeout=60) as http:
            assert http.get("/readyz").json()["models"] == ["tiny"]
            [line] = [line for line in served.log().splitlines() if "refusing model bad: " in line]
            assert " ERROR " in line and str(bad_path) in line and bad_reason in line
            for number, kind in enumerate(BREAKAGES, start=2):
                version = f"v{number}"
                built, reason = broken(
                    tmp_path / f"build-{version}", "tiny", kind, version=version, seed=number
                )
                publish(built, store)
                served.signal(signal.SIGHUP)
                served.wait_for_log(f"reload (sighup): refusing model tiny {version}, still serving v1")
                [logged] = [e for e in served.log().splitlines() if f"refusing model tiny {version}" in e]
                assert reason in logged, logged
                answer = http.post("/admin/reload")
                assert answer.status_code == 409, answer.text
                # `bad` is retried too (never served, still in the store): only tiny is looked at.
                [refused] = [r for r in answer.json()["refused"] if r["model"] == "tiny"]
                assert refused["version"] == version and reason in refused["reason"], refused
                attempts += 2
                assert http.get("/models/tiny").json()["version"] == "v1"
                assert http.post("/sample", json={"n": 2, "seed": 1}).status_code == 200
            good = make_artifact(
                tmp_path / "build-good", "tiny", 8, seed=99, version=f"v{len(BREAKAGES) + 2}"
            )
            publish(good.path, store)
            loaded = http.post("/admin/reload")
            # 409 only because `bad` is still refused; tiny's good version went live.
            assert loaded.status_code == 409 and loaded.json()["serving"] == {"tiny": good.version}
            assert loaded.json()["loaded"] == [{"model": "tiny", "previous": "v1", "version": good.version}]
            metrics = http.get("/metrics").text
        assert metric(metrics, "vae_model_reloads_total", model="tiny", result="refused") == attempts
        assert "Traceback" not in served.log()
        served.stop()
    finally:
        served.kill()
    record(
        "faults",
        f"one of two configured models broken at startup; broken new versions at reload "
        f"({len(BREAKAGES)} kinds x SIGHUP and POST /admin/reload)",
        attempts + 1,
        f"good model served, bad one refused in one line; all {attempts} reloads refused with the reason, "
        "v1 kept serving, a good version loaded after",
        "test_faults.py::test_a_bad_model_beside_a_good_one_and_broken_reloads",
    )


def test_warm_up_refusal_names_the_artifact_in_one_line(tmp_path: Path) -> None:
    path, reason = broken(tmp_path, "boom", "raises-at-warm-up")
    with pytest.raises(Exception, match="failed its warm-up run") as raised:
        load_model(path, torch.device("cpu"))
    message = str(raised.value)
    assert message.startswith(f"{path}: it failed its warm-up run (") and reason in message
    assert "\n" not in message


def test_huge_latents_are_bad_input_not_a_model_failure(api: InProcess) -> None:
    """Near float32's limit a decoder overflows to NaN: that is refused as input (422)
    before the model runs, not answered 500 model-failed after it."""
    answer = api.post("/decode", json={"z": [[3e38] + [0.0] * 7]})
    assert answer.status_code == 422 and answer.json()["type"] == "urn:vae:problem:invalid-latents"
    assert "within ±1e+06" in answer.json()["detail"]
    assert api.post("/decode", json={"z": [[1e6] + [0.0] * 7]}).status_code == 200
