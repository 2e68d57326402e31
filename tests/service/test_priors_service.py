"""/sample through both priors of a format 2 model, served exactly as before format 3: the
standard prior is exactly temperature * u, the learned one exactly prior(temperature * u)
decoded; batching changes no bit; a format 1 artifact serves the standard prior only; an
unknown prior, or `learned` on a model without one, is a 422 that names the model's priors;
the client and vae-client pass `prior` through. (Format 3, where the prior takes the
temperature and a class: tests/service/test_classes_service.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from service_support import InProcess, decode_png, make_settings
from test_batching import metric
from test_client import bridge
from typer.testing import CliRunner
from vae_client import cli as client_cli
from vae_client.client import VAEClient

from service import artifact
from service.app import create_app
from service.model.batching import BatchPolicy, forward_rows, warm_up_rows
from service.model.latents import draw_latents, draw_rows
from service.model.runtime import TorchScriptRuntime
from tests.conftest import make_artifact, make_format_2_artifact

LATENT_DIM = 6


def write_format_1(store: Path, name: str) -> Path:
    """An artifact as the service wrote them before priors (format_version 1, no `priors`).
    The manifest is not among the hashed files, so it can be rewritten as it was."""
    art = make_artifact(store, name, latent_dim=4, seed=5)
    manifest = dict(art.manifest)
    manifest["format_version"] = 1
    del manifest["priors"], manifest["default_prior"]
    (art.path / "manifest.json").write_text(json.dumps(manifest))
    return art.path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("priors")
    make_format_2_artifact(root, "learned", latent_dim=LATENT_DIM, seed=3)
    write_format_1(root, "old")
    return root


@pytest.fixture(scope="module")
def served(store: Path) -> Iterator[InProcess]:
    app = InProcess(create_app(make_settings(store, default_model="learned", batch_max_wait_ms=200.0)))
    yield app
    app.close()


@pytest.fixture(scope="module")
def learned(store: Path) -> TorchScriptRuntime:
    return TorchScriptRuntime.load(artifact.resolve(store, "learned"), torch.device("cpu"))


def format_2_prior(runtime: TorchScriptRuntime, u: np.ndarray) -> np.ndarray:
    """What format 2's prior(u) gives for noise already scaled by the temperature."""
    with torch.no_grad():
        return runtime.model.prior(torch.from_numpy(u)).numpy()


def sample(api: InProcess, **body) -> dict:
    response = api.post("/sample", json={"format": "array", "return_latents": True, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_learned_prior_is_the_default_and_is_prior_of_u(served: InProcess, learned) -> None:
    got = sample(served, n=5, seed=11, temperature=0.7)
    assert got["prior"] == "learned" and got["model"] == "learned"
    u = draw_latents(5, LATENT_DIM, 11, 0.7)
    np.testing.assert_array_equal(np.asarray(got["u"], np.float32), u)
    z = np.asarray(got["z"], np.float32)
    np.testing.assert_allclose(z, format_2_prior(learned, u), atol=1e-6)
    assert got["version"] == "v1" and learned.artifact.format_version == 2
    assert np.abs(z - u).max() > 0.1  # a real map, not the identity
    np.testing.assert_allclose(np.asarray(got["images"], np.float32), learned.decode(z), atol=1e-6)


def test_the_standard_prior_is_exactly_temperature_times_u(served: InProcess, learned) -> None:
    got = sample(served, n=4, seed=5, temperature=1.5, prior="standard")
    assert got["prior"] == "standard"
    expected = torch.randn(4, LATENT_DIM, generator=torch.Generator().manual_seed(5)).numpy() * np.float32(
        1.5
    )
    np.testing.assert_array_equal(np.asarray(got["z"], np.float32), expected)
    np.testing.assert_array_equal(np.asarray(got["u"], np.float32), expected)
    np.testing.assert_allclose(np.asarray(got["images"], np.float32), learned.decode(expected), atol=1e-6)


def test_same_seed_and_prior_give_the_same_bits_batched_or_alone(served: InProcess) -> None:
    """Requests merged into one pass (sent together, a 200 ms merge window) get exactly what
    each gets alone, for both priors."""
    bodies = [
        {"n": n, "seed": seed, "prior": prior, "format": "array", "return_latents": True}
        for n, seed, prior in [(1, 0, "learned"), (3, 1, "learned"), (2, 2, "standard"), (7, 3, "learned")]
    ]

    async def together(client: httpx.AsyncClient) -> list[dict]:
        answers = await asyncio.gather(*(client.post("/sample", json=b) for b in bodies))
        return [a.json() for a in answers]

    labels = {"model": "learned", "op": "sample"}
    before = metric(served.get("/metrics").text, "vae_model_batch_requests_count", **labels)
    merged = served.run(together, served.client)
    passes = metric(served.get("/metrics").text, "vae_model_batch_requests_count", **labels) - before
    assert passes < 3, "the three learned-prior requests were not merged into fewer passes"
    for body, got in zip(bodies, merged, strict=True):
        alone = served.post("/sample", json=body).json()
        assert got["prior"] == body["prior"]
        assert got["images"] == alone["images"] and got["z"] == alone["z"] and got["u"] == alone["u"]


def test_the_png_grid_takes_prior_and_names_it(served: InProcess) -> None:
    learned_png = served.get("/sample.png?n=4&seed=9")
    standard_png = served.get("/sample.png?n=4&seed=9&prior=standard")
    assert learned_png.headers["X-Prior"] == "learned" and standard_png.headers["X-Prior"] == "standard"
    assert learned_png.headers["X-Seed"] == "9"
    assert not np.array_equal(decode_png(learned_png.content), decode_png(standard_png.content))
    body = served.post("/sample", json={"n": 4, "seed": 9}, headers={"Accept": "image/png"})
    assert body.headers["X-Prior"] == "learned" and body.content == learned_png.content


def test_models_list_their_priors(served: InProcess) -> None:
    learned = served.get("/models/learned").json()
    assert learned["priors"] == ["standard", "learned"] and learned["default_prior"] == "learned"
    old = served.get("/models/old").json()
    assert old["priors"] == ["standard"] and old["default_prior"] == "standard"


def test_a_format_1_artifact_serves_the_standard_prior(served: InProcess, store: Path) -> None:
    old = TorchScriptRuntime.load(artifact.resolve(store, "old"), torch.device("cpu"))
    got = sample(served, n=3, seed=2, model="old")
    assert got["prior"] == "standard" and got["version"] == "v1"
    np.testing.assert_array_equal(np.asarray(got["z"], np.float32), draw_latents(3, 4, 2))
    np.testing.assert_allclose(
        np.asarray(got["images"], np.float32), old.decode(draw_latents(3, 4, 2)), atol=1e-6
    )


@pytest.mark.parametrize(
    ("query", "body", "expected"),
    [
        (
            "",
            {"n": 2, "model": "old", "prior": "learned"},
            "model 'old' (v1) has no 'learned' prior; its priors: standard",
        ),
        ("", {"n": 2, "prior": "flow"}, "prior"),
        ("", {"n": 2, "prior": None, "model": "old"}, None),
        ("?model=old&prior=learned", None, "its priors: standard"),
        ("?prior=gaussian", None, "prior"),
    ],
)
def test_an_unknown_or_missing_prior_is_a_422_naming_the_priors(
    served: InProcess, query: str, body: dict | None, expected: str | None
) -> None:
    response = (
        served.post("/sample", json=body) if body is not None else served.get(f"/sample.png{query}&n=2")
    )
    if expected is None:
        assert response.status_code == 200
        return
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert expected in problem["detail"]
    if "its priors" in expected:
        assert problem["priors"] == ["standard"]
    else:
        assert "learned" in problem["detail"] and "standard" in problem["detail"]
    assert served.get("/healthz").status_code == 200


def test_the_client_and_cli_pass_the_prior(
    served: InProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with VAEClient("http://testserver", transport=bridge(served)) as vae:
        drawn = vae.sample(3, seed=1, prior="standard", return_latents=True)
        assert drawn.prior == "standard" and np.array_equal(drawn.z, drawn.u)
        default = vae.sample(3, seed=1, return_latents=True)
        assert default.prior == "learned" and not np.array_equal(default.z, default.u)
    with VAEClient("http://testserver", transport=bridge(served), binary=True) as vae:
        binary = vae.sample(3, seed=1, prior="standard")
        assert binary.prior == "standard" and np.array_equal(binary.images, drawn.images)
    monkeypatch.setattr(
        client_cli, "_client", lambda url, api_key: VAEClient(url, api_key=api_key, transport=bridge(served))
    )
    out = tmp_path / "grid.png"
    args = ["sample", "-n", "4", "--seed", "3", "--prior", "standard", "-o", str(out)]
    result = CliRunner().invoke(client_cli.app, args)
    assert result.exit_code == 0, result.output
    assert "standard prior" in result.output and out.read_bytes()[:4] == b"\x89PNG"
    refused = CliRunner().invoke(client_cli.app, ["sample", "--model", "old", "--prior", "learned"])
    assert refused.exit_code != 0 and "its priors: standard" in refused.output


def test_a_rows_draw_through_the_learned_prior_is_independent_of_its_pass(learned) -> None:
    """Exact mode's premise for the learned prior's op, at every pass size calibration keeps:
    a row's z and image depend on that row only, wherever it sits and whatever shares the pass."""
    policy = BatchPolicy(max_size=16, exact=True)
    sizes = warm_up_rows(learned, policy)[0]["sample"]
    assert sizes[-1] == 16
    rng = np.random.default_rng(0)
    u = draw_rows(rng.normal(size=(1, LATENT_DIM)).astype(np.float32), 0.8, None)
    z_alone, x_alone = forward_rows(learned, "sample", u, policy, sizes=sizes)
    for total in range(1, 35):  # every calibrated size, and requests over max_size rows
        others = draw_rows(rng.normal(size=(total - 1, LATENT_DIM)).astype(np.float32), 1.2, None)
        for where in {0, (total - 1) // 2, total - 1}:
            z, x = forward_rows(
                learned, "sample", np.insert(others, where, u[0], axis=0), policy, sizes=sizes
            )
            np.testing.assert_array_equal(z[where], z_alone[0], err_msg=f"{total} rows")
            np.testing.assert_array_equal(x[where], x_alone[0], err_msg=f"{total} rows")
