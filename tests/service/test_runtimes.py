"""VAE_RUNTIME and VAE_PRECISION: the shipped model served from its torch.export programs gives
the TorchScript runtime's answers, with the same batching and exactness; a lower precision is
chosen, measured and reported as service.model.precision says."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from PIL import Image

from service.app import create_app
from service.model import precision
from service.settings import Settings
from tests.conftest import SHIPPED_STORE
from tests.process_support import serve
from tests.service_support import InProcess, make_settings

TOLERANCE = 1e-5  # the serving form's check: the two runtimes' files round differently, no more


def settings(runtime: str, **overrides: Any) -> Settings:
    values = {"models": ["mnist:v4"], "runtime": runtime, "precision": "fp32", **overrides}
    return make_settings(SHIPPED_STORE, **values)


@pytest.fixture(scope="module")
def runtimes() -> Iterator[dict[str, InProcess]]:
    apps = {name: InProcess(create_app(settings(name))) for name in ("torchscript", "export")}
    yield apps
    for app in apps.values():
        app.close()


def post(app: InProcess, path: str, **body: Any) -> dict[str, Any]:
    response = app.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def arrays(answer: dict[str, Any], key: str) -> np.ndarray:
    return np.asarray(answer[key], np.float32)


def digit_png(seed: int) -> str:
    image = (np.random.default_rng(seed).random((28, 28)) > 0.7).astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_models_say_which_runtime_and_precision(runtimes: dict[str, InProcess]) -> None:
    for name, app in runtimes.items():
        info = app.get("/models/mnist").json()
        assert info["version"] == "v4" and info["runtime"] == name
        assert info["precision"] == "fp32"
        assert info["precision_check"]["reason"] == "VAE_PRECISION=fp32"


@pytest.mark.parametrize(
    "body",
    [
        {"n": 7, "seed": 3},
        {"n": 5, "seed": 4, "label": 7, "temperature": 0.6},
        {"n": 4, "seed": 5, "prior": "standard"},
    ],
)
def test_both_runtimes_draw_the_same_digits(runtimes: dict[str, InProcess], body: dict[str, Any]) -> None:
    answers = {
        name: post(app, "/sample", format="array", return_latents=True, return_verdicts=True, **body)
        for name, app in runtimes.items()
    }
    a, b = answers["torchscript"], answers["export"]
    assert np.abs(arrays(a, "z") - arrays(b, "z")).max() <= TOLERANCE
    assert np.abs(arrays(a, "images") - arrays(b, "images")).max() <= TOLERANCE
    assert [v["label"] for v in a["verdicts"]] == [v["label"] for v in b["verdicts"]]


def test_both_runtimes_encode_decode_and_reconstruct_alike(runtimes: dict[str, InProcess]) -> None:
    images = [digit_png(seed) for seed in range(3)]
    encoded = {name: post(app, "/encode", images=images) for name, app in runtimes.items()}
    for key in ("mu", "sigma", "kl"):
        difference = np.abs(arrays(encoded["torchscript"], key) - arrays(encoded["export"], key)).max()
        assert difference <= 1e-4, key  # kl sums 32 terms of the same rounding
    z = encoded["torchscript"]["mu"]
    decoded = {name: post(app, "/decode", z=z, format="array") for name, app in runtimes.items()}
    assert (
        np.abs(arrays(decoded["torchscript"], "images") - arrays(decoded["export"], "images")).max()
        <= TOLERANCE
    )
    rebuilt = {
        name: post(app, "/reconstruct", images=images, format="array") for name, app in runtimes.items()
    }
    difference = np.abs(arrays(rebuilt["torchscript"], "images") - arrays(rebuilt["export"], "images")).max()
    assert difference <= TOLERANCE


def test_the_export_runtime_keeps_results_independent_of_batching(runtimes: dict[str, InProcess]) -> None:
    """The exactness calibration covers the programs too: a draw's images are the same bits
    alone, inside a larger request (passes of 32 + 8 rows) and batched with others."""
    app = runtimes["export"]
    # Calibrated at warm-up as the TorchScript runtime is: passes smaller than the batch size
    state = app.app.state.vae
    sizes = state.inference.pass_sizes(state.registry.get("mnist"))
    assert set(sizes) == {"encode", "decode", "sample", "classify"}
    assert all(s[-1] == 32 and len(s) > 1 for s in sizes.values()), sizes
    alone = arrays(post(app, "/sample", n=5, seed=21, format="array"), "images")
    within = arrays(post(app, "/sample", n=40, seed=21, format="array"), "images")[:5]
    np.testing.assert_array_equal(alone, within)

    async def together() -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{}] * 6

        async def one(i: int) -> None:
            body = (
                {"n": 5, "seed": 21, "format": "array"}
                if i == 0
                else {"n": 3, "seed": 100 + i, "format": "array"}
            )
            response = await app.client.post("/sample", json=body)
            results[i] = response.json()

        async with anyio.create_task_group() as group:
            for i in range(6):
                group.start_soon(one, i)
        return results

    batched = app.run(together)
    np.testing.assert_array_equal(arrays(batched[0], "images"), alone)


def test_the_export_runtime_refuses_a_model_without_programs(tmp_path: Path) -> None:
    app = InProcess(create_app(settings("export", models=["mnist:v4", "mnist-2d:v3"])))
    try:
        loaded = [m["name"] for m in app.get("/models").json()["models"]]
        assert loaded == ["mnist"]  # mnist-2d v3 carries no model.pt2: refused, the other serves
    finally:
        app.close()


def test_a_real_server_serves_the_programs(tmp_path: Path) -> None:
    served = serve(SHIPPED_STORE, tmp_path / "serve.log", "--models", "mnist:v4", "--runtime", "export")
    try:
        import httpx

        info = httpx.get(f"{served.url}/models/mnist").json()
        assert info["runtime"] == "export"
        answer = httpx.post(f"{served.url}/sample", json={"n": 2, "seed": 1, "label": 3}).json()
        assert len(answer["images"]) == 2
        # No TorchScript deprecation notice (raised or silenced) on this path: nothing of it runs
        assert "torch.jit" not in served.log() and "deprecated" not in served.log().lower()
    finally:
        served.stop()


# ---------------------------------------------------------------------------- precision


def test_bf16_is_measured_reported_and_exact_within_itself() -> None:
    app = InProcess(
        create_app(
            make_settings(
                SHIPPED_STORE,
                models=["mnist:v4"],
                precision="bf16",
                precision_check_draws=200,
                batch_max_size=8,  # few pass shapes to calibrate: bf16 is emulated on most CPUs
            )
        )
    )
    try:
        info = app.get("/models/mnist").json()
        assert info["precision"] == "bf16"
        check = info["precision_check"]
        assert check["reason"] == "VAE_PRECISION=bf16" and check["draws"] == 200
        assert 0 < check["largest_pixel_difference"] < 0.1 and check["agreement"] >= 0.95
        assert set(check["pass_ms"]) == {"fp32", "bf16"}
        alone = arrays(post(app, "/sample", n=3, seed=9, format="array"), "images")
        within = arrays(post(app, "/sample", n=11, seed=9, format="array"), "images")[:3]
        np.testing.assert_array_equal(alone, within)  # passes of 8 + 3 rows against one of 3
    finally:
        app.close()


def test_without_a_warm_up_an_asked_precision_is_used_unmeasured_and_auto_stays_fp32() -> None:
    for asked, expected, reason in (
        ("bf16", "bf16", "VAE_PRECISION=bf16, not measured (VAE_WARMUP=false)"),
        ("auto", "fp32", "auto: not measured (VAE_WARMUP=false), so fp32"),
    ):
        app = InProcess(
            create_app(make_settings(SHIPPED_STORE, models=["mnist:v4"], precision=asked, warmup=False))
        )
        try:
            info = app.get("/models/mnist").json()
            assert info["precision"] == expected and info["precision_check"]["reason"] == reason
            assert len(post(app, "/sample", n=2, seed=1)["images"]) == 2
        finally:
            app.close()


class FakeRuntime:
    """Just what precision.choose reads, with a lower precision that is slower or worse."""

    name, latent_dim, priors, conditional, has_classifier = "fake", 2, ("standard",), False, True
    low_precision: str | None = "bf16"
    precision = "fp32"

    def __init__(self, slow: bool = False, flips: bool = False) -> None:
        self.slow, self.flips = slow, flips
        self.chosen: tuple[str, dict[str, Any]] | None = None

    def decode_in(self, which: str, z: np.ndarray) -> np.ndarray:
        if which == "bf16" and self.slow:
            sum(range(20000))  # a slower pass
        images = np.repeat(z[:, :1, None], 28, axis=1).repeat(28, axis=2)
        return -images if which == "bf16" and self.flips else images

    def prior(self, rows: np.ndarray) -> np.ndarray:
        raise AssertionError("the standard prior needs no map")

    def classify(self, x: np.ndarray) -> np.ndarray:
        positive = (x.mean(axis=(1, 2)) > 0).astype(np.float32)
        return np.stack([positive, 1 - positive], axis=1)

    def use_precision(self, which: str, check: dict[str, Any]) -> None:
        self.chosen = (which, check)


def test_auto_keeps_fp32_where_the_lower_precision_is_slower_or_reads_differently() -> None:
    slow = FakeRuntime(slow=True)
    precision.choose(slow, "auto", draws=300)
    assert slow.chosen is not None and slow.chosen[0] == "fp32" and "no faster" in slow.chosen[1]["reason"]
    flips = FakeRuntime(flips=True)
    precision.choose(flips, "bf16", draws=300)  # asked for explicitly: used, the check reported
    assert flips.chosen is not None and flips.chosen[0] == "bf16" and flips.chosen[1]["agreement"] < 0.5


def test_auto_without_a_native_lower_precision_is_fp32_without_measuring() -> None:
    runtime = FakeRuntime()
    runtime.low_precision = None
    precision.choose(runtime, "auto")
    assert runtime.chosen is not None and runtime.chosen[0] == "fp32"
    assert "no native lower precision" in runtime.chosen[1]["reason"]


def test_a_reload_under_the_export_runtime_serves_the_new_programs(tmp_path: Path) -> None:
    """The reload path builds runtimes as startup does: a new version without programs is
    refused (the old one keeps serving), one with them is served from them."""
    from tests.conftest import make_artifact
    from trainer.reexport import reexport

    make_artifact(tmp_path, "tiny", latent_dim=4, learned_prior=True)  # v1: TorchScript only
    reexport(tmp_path / "tiny" / "v1", tmp_path, None)  # v2: with programs
    app = InProcess(
        create_app(make_settings(tmp_path, runtime="export", precision="fp32", allow_reload_without_key=True))
    )
    try:
        assert app.get("/models/tiny").json()["version"] == "v2"
        make_artifact(tmp_path, "tiny", latent_dim=4, learned_prior=True, seed=5)  # v3: no programs
        report = app.post("/admin/reload").json()
        assert report["serving"] == {"tiny": "v2"}
        assert "carries no torch.export programs" in report["refused"][0]["reason"]
        reexport(tmp_path / "tiny" / "v3", tmp_path, None)  # v4: v3's weights with programs
        report = app.post("/admin/reload").json()
        assert report["serving"] == {"tiny": "v4"} and report["refused"] == []
        info = app.get("/models/tiny").json()
        assert info["version"] == "v4" and info["runtime"] == "export"
        assert len(post(app, "/sample", n=3, seed=1)["images"]) == 3
    finally:
        app.close()
