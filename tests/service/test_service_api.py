"""The endpoints, in process: every answer equals the TorchScript model called directly."""

from __future__ import annotations

import base64
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MNIST_DIR, make_artifact, needs_mnist
from service_support import Direct, InProcess, b64, decode_png, drawn_digit, encoded, make_settings, png

from service.api.images import grid, png_bytes, to_uint8
from service.app import create_app
from service.model.runtime import NoModelsError, load_registry

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_2d(tiny_store: Path) -> Direct:
    return Direct(tiny_store, "tiny-2d")


def digits(n: int, seed: int = 0) -> np.ndarray:
    """n MNIST-like uint8 images: ink on black, a dark border."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 28, 28), np.uint8)
    out[:, 4:24, 6:22] = rng.integers(0, 256, (n, 20, 16), dtype=np.uint8)
    return out


def kl(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    return 0.5 * (mu**2 + sigma**2 - 1 - 2 * np.log(sigma)).sum(1)


# ---------------------------------------------------------------------------- probes and models


def test_health_readiness_and_models(api: InProcess) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready", "models": ["tiny", "tiny-2d"]}
    listed = api.get("/models").json()
    assert listed["default"] == "tiny", "mnist is not in the store: the first loaded model is the default"
    assert [m["name"] for m in listed["models"]] == ["tiny", "tiny-2d"]
    info = api.get("/models/tiny-2d").json()
    check = info["precision_check"]
    assert check["setting"] == "auto" and check["reason"].startswith("auto")
    assert info == {
        "name": "tiny-2d",
        "version": "v1",
        "latent_dim": 2,
        "device": "cpu",
        "runtime": "torchscript",
        "precision": "fp32",
        # make_settings leaves VAE_PRECISION at auto: fp32 without a native lower precision, or
        # (on a CPU with AMX or AVX512-BF16) fp32 because this tiny model has no classifier
        "precision_check": info["precision_check"],
        "default": False,
        "likelihood": "bernoulli",
        "dataset": "synthetic",
        "created_at": "2026-01-01T00:00:00Z",
        "metrics": {},
        "latent_map": True,
        "priors": ["standard"],
        "default_prior": "standard",
        "prior_metrics": {"standard": {}},
        "classes": [],
        "conditional": False,
        "classifier": None,
    }


# ---------------------------------------------------------------------------- encode


def test_encode_equals_the_model_for_every_input_form(api: InProcess, tiny: Direct) -> None:
    x = digits(3)
    mu, sigma = tiny.encode(x / np.float32(255))
    pngs = [png(d) for d in x]
    answers = [
        api.post("/encode", json={"images": [b64(p) for p in pngs]}),
        api.post("/encode", json={"pixels": (x / np.float32(255)).tolist()}),
        api.post("/encode", files=[("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]),
    ]
    for response in answers:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "tiny" and body["version"] == "v1" and body["latent_dim"] == 8
        np.testing.assert_allclose(body["mu"], mu, atol=ATOL)
        np.testing.assert_allclose(body["sigma"], sigma, atol=ATOL)
        np.testing.assert_allclose(body["kl"], kl(mu, sigma), rtol=1e-5, atol=1e-5)
    raw = api.post("/encode", content=pngs[1], headers={"Content-Type": "image/png"})
    np.testing.assert_allclose(raw.json()["mu"], mu[1:2], atol=ATOL)


def test_the_model_is_picked_by_body_field_or_query(api: InProcess, tiny_2d: Direct) -> None:
    x = digits(2, seed=1)
    mu, _ = tiny_2d.encode(x / np.float32(255))
    by_field = api.post("/encode", json={"images": [b64(png(d)) for d in x], "model": "tiny-2d"}).json()
    by_query = api.post("/encode?model=tiny-2d", json={"images": [b64(png(d)) for d in x]}).json()
    for body in (by_field, by_query):
        assert body["model"] == "tiny-2d" and body["latent_dim"] == 2
        np.testing.assert_allclose(body["mu"], mu, atol=ATOL)
    by_form = api.post(
        "/encode", files={"images": ("a.png", png(x[0]), "image/png")}, data={"model": "tiny-2d"}
    )
    assert by_form.json()["latent_dim"] == 2


def test_an_image_of_any_size_is_fitted_before_encoding(api: InProcess, tiny: Direct) -> None:
    from service.api.images import prepare

    data = encoded(drawn_digit((300, 240)))
    expected = prepare(data, "x", None, 1 << 30)
    mu, _ = tiny.encode(expected[None])
    np.testing.assert_allclose(api.post("/encode", json={"images": [b64(data)]}).json()["mu"], mu, atol=ATOL)
    # Forced to keep its polarity, dark ink on white paper shows no light ink at all.
    forced = api.post("/encode?invert=false", json={"images": [b64(data)]})
    assert forced.status_code == 422 and forced.json()["type"] == "urn:vae:problem:blank-image"


def test_invert_forces_the_polarity(api: InProcess, tiny: Direct) -> None:
    x = digits(2, seed=4)
    mu, _ = tiny.encode(1 - x / np.float32(255))
    for body, query in (({"invert": True}, ""), ({}, "?invert=true")):
        answer = api.post(f"/encode{query}", json={"images": [b64(png(d)) for d in x], **body}).json()
        np.testing.assert_allclose(answer["mu"], mu, atol=ATOL)
    pixels = api.post("/encode", json={"pixels": (x / np.float32(255)).tolist(), "invert": True}).json()
    np.testing.assert_allclose(pixels["mu"], mu, atol=ATOL)


# ---------------------------------------------------------------------------- decode, sample, reconstruct


def test_decode_equals_the_model(api: InProcess, tiny: Direct) -> None:
    z = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    expected = tiny.decode(z)
    arrays = api.post("/decode", json={"z": z.tolist(), "format": "array"}).json()
    assert arrays["format"] == "array"
    np.testing.assert_allclose(arrays["images"], expected, atol=ATOL)
    pngs = api.post("/decode", json={"z": z.tolist()}).json()
    assert pngs["format"] == "png" and len(pngs["images"]) == 5
    decoded = np.stack([decode_png(base64.b64decode(s)) for s in pngs["images"]])
    assert np.abs(decoded.astype(int) - to_uint8(expected).astype(int)).max() <= 1
    assert api.post("/decode?format=array", json={"z": z.tolist()}).json()["format"] == "array"


def test_sample_draws_z_from_a_private_generator(api: InProcess, tiny: Direct) -> None:
    body = {"n": 6, "seed": 123, "temperature": 0.7, "return_latents": True, "format": "array"}
    torch.manual_seed(0)  # the global RNG must not matter
    first = api.post("/sample", json=body)
    torch.manual_seed(1)
    second = api.post("/sample", json=body)
    assert first.status_code == 200 and first.content == second.content
    answer = first.json()
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(123)).numpy() * np.float32(0.7)
    np.testing.assert_array_equal(np.asarray(answer["z"], np.float32), z)
    np.testing.assert_allclose(answer["images"], tiny.decode(z), atol=ATOL)
    assert answer["seed"] == 123 and answer["temperature"] == 0.7 and first.headers["X-Seed"] == "123"


def test_sample_without_a_seed_returns_the_one_it_used(api: InProcess) -> None:
    answer = api.post("/sample", json={"n": 3, "format": "array"}).json()
    assert "z" not in answer and isinstance(answer["seed"], int)
    again = api.post("/sample", json={"n": 3, "seed": answer["seed"], "format": "array"}).json()
    assert again["images"] == answer["images"]


def test_reconstruct_is_decode_of_mu(api: InProcess, tiny: Direct) -> None:
    x = digits(4, seed=2)
    mu, sigma = tiny.encode(x / np.float32(255))
    body = api.post("/reconstruct", json={"images": [b64(png(d)) for d in x], "format": "array"}).json()
    np.testing.assert_allclose(body["mu"], mu, atol=ATOL)
    np.testing.assert_allclose(body["sigma"], sigma, atol=ATOL)
    np.testing.assert_allclose(body["images"], tiny.decode(mu), atol=1e-4)


# ---------------------------------------------------------------------------- PNG answers


def test_accept_image_png_returns_one_png_or_a_grid(api: InProcess, tiny: Direct) -> None:
    z = np.random.default_rng(3).normal(size=(1, 8)).astype(np.float32)
    single = api.post("/decode", json={"z": z.tolist()}, headers={"Accept": "image/png"})
    assert single.headers["content-type"] == "image/png"
    assert np.abs(decode_png(single.content).astype(int) - to_uint8(tiny.decode(z)[0]).astype(int)).max() <= 1
    sheet = api.post("/sample", json={"n": 10, "seed": 5}, headers={"Accept": "image/png"})
    assert sheet.headers["content-type"] == "image/png" and sheet.headers["X-Seed"] == "5"
    assert decode_png(sheet.content).shape == (3 * 30 + 2, 4 * 30 + 2)  # 4 columns, 3 rows, 2 px padding
    recon = api.post(
        "/reconstruct",
        json={"images": [b64(png(d)) for d in digits(2)]},
        headers={"Accept": "image/png, application/json;q=0.5"},
    )
    assert recon.headers["content-type"] == "image/png"
    wildcard = api.post("/decode", json={"z": z.tolist()}, headers={"Accept": "*/*"})
    assert wildcard.headers["content-type"] == "application/json"


def test_sample_png_serves_a_reproducible_grid(api: InProcess) -> None:
    first = api.get("/sample.png?n=64&seed=1")
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.headers["X-Seed"] == "1"
    assert decode_png(first.content).shape == (8 * 30 + 2, 8 * 30 + 2)
    assert api.get("/sample.png?n=64&seed=1").content == first.content
    arrays = api.post("/sample", json={"n": 64, "seed": 1, "format": "array"}).json()["images"]
    assert first.content == png_bytes(grid(np.asarray(arrays, np.float32)))
    other = api.get("/sample.png?n=4&seed=1&model=tiny-2d&temperature=0.5")
    assert other.status_code == 200 and other.content != first.content


# ---------------------------------------------------------------------------- metrics, OpenAPI


def test_metrics_count_requests_inference_and_batch_sizes(api: InProcess) -> None:
    api.post("/encode", json={"pixels": np.zeros((3, 28, 28)).tolist()})
    api.get("/models/nope")
    api.get("/no/such/path")
    text = api.get("/metrics").text
    assert re.search(r'vae_http_requests_total\{method="POST",route="/encode",status="200"\} [1-9]', text)
    assert re.search(r'vae_http_requests_total\{method="GET",route="/models/\{name\}",status="404"\} 1', text)
    assert 'route="<unmatched>"' in text and "/no/such/path" not in text
    assert re.search(
        r'vae_http_request_duration_seconds_bucket\{le="[^"]+",method="POST",route="/encode"\}', text
    )
    assert re.search(r'vae_model_inference_seconds_count\{model="tiny",op="encode"\} [1-9]', text)
    assert re.search(r'vae_model_batch_size_sum\{model="tiny",op="encode"\} [1-9]', text)
    assert 'vae_model_info{device="cpu",latent_dim="2",model="tiny-2d",version="v1"} 1.0' in text
    assert "vae_ready 1.0" in text


def test_openapi_schema_is_valid_and_documents_the_api(api: InProcess) -> None:
    from openapi_spec_validator import validate

    schema = api.get("/openapi.json").json()
    validate(schema)
    paths = schema["paths"]
    for path in (
        "/encode",
        "/decode",
        "/sample",
        "/reconstruct",
        "/sample.png",
        "/models",
        "/models/{name}",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    encode_body = paths["/encode"]["post"]["requestBody"]["content"]
    assert set(encode_body) == {"application/json", "multipart/form-data", "image/png", "image/jpeg"}
    assert encode_body["application/json"]["examples"]
    sample_schema = schema["components"]["schemas"]["SampleRequest"]
    assert sample_schema["examples"] and "seed" in sample_schema["properties"]
    errors = paths["/decode"]["post"]["responses"]["422"]["content"]
    assert errors == {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    assert "image/png" in paths["/sample"]["post"]["responses"]["200"]["content"]
    assert api.get("/docs").status_code == 200


# ---------------------------------------------------------------------------- API key and CORS


def test_an_api_key_guards_everything_but_the_probes_and_docs(tiny_store: Path) -> None:
    served = InProcess(create_app(make_settings(tiny_store, api_key="s3cret")))
    try:
        refused = served.post("/sample", json={"n": 1})
        assert refused.status_code == 401 and refused.headers["content-type"] == "application/problem+json"
        assert "X-API-Key" in refused.json()["detail"] and refused.headers["WWW-Authenticate"].startswith(
            "Bearer"
        )
        assert served.post("/sample", json={"n": 1}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert served.get("/metrics").status_code == 401
        assert served.post("/sample", json={"n": 1}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert served.get("/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
            assert served.get(open_path).status_code == 200, open_path
    finally:
        served.close()


def test_cors_headers_even_on_errors(tiny_store: Path) -> None:
    served = InProcess(
        create_app(make_settings(tiny_store, cors_origins="http://ui.example", max_body_bytes=2048))
    )
    try:
        origin = {"Origin": "http://ui.example"}
        preflight = served.request(
            "OPTIONS",
            "/sample",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
        ok = served.post("/sample", json={"n": 1}, headers=origin)
        assert ok.headers["access-control-allow-origin"] == "http://ui.example"
        assert "X-Seed" in ok.headers["access-control-expose-headers"]
        too_big = served.post(
            "/decode", content=b"[" * 4096, headers={**origin, "Content-Type": "application/json"}
        )
        assert (
            too_big.status_code == 413
            and too_big.headers["access-control-allow-origin"] == "http://ui.example"
        )
        assert (
            "access-control-allow-origin"
            not in served.get("/healthz", headers={"Origin": "http://evil"}).headers
        )
    finally:
        served.close()


# ---------------------------------------------------------------------------- loading


def test_a_corrupt_model_is_refused_in_one_line_and_the_rest_served(
    tiny_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    model_file = store / "tiny" / "v1" / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    make_artifact(store, "tiny-2d", latent_dim=2, seed=3)  # v2: the latest is loaded
    with caplog.at_level(logging.INFO, logger="service"):
        registry = load_registry(make_settings(store, default_model="tiny"))
    assert list(registry.models) == ["tiny-2d"] and registry.models["tiny-2d"].version == "v2"
    assert registry.default == "tiny-2d"
    refusals = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refusals) == 1 and "\n" not in refusals[0].getMessage()
    assert re.search(
        r"refusing model tiny: .*model\.pt has sha256 [0-9a-f]{12}…, manifest says [0-9a-f]{12}…",
        refusals[0].getMessage(),
    )
    assert any(
        "default model 'tiny' is not loaded" in r.getMessage() and r.levelno == logging.WARNING
        for r in caplog.records
    )


def test_models_can_be_chosen_and_pinned(tiny_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    make_artifact(store, "tiny", latent_dim=8, seed=5)  # v2
    registry = load_registry(make_settings(store, models="tiny:v1", warmup=False))
    assert list(registry.models) == ["tiny"] and registry.get().version == "v1"
    assert load_registry(make_settings(store, models=["tiny"])).get("tiny").version == "v2"
    with pytest.raises(NoModelsError, match="none of the 1 model"):
        load_registry(make_settings(store, models="tiny:v9"))
    with pytest.raises(NoModelsError, match="does not exist"):
        load_registry(make_settings(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------- real MNIST


@needs_mnist
def test_real_mnist_digits_encode_exactly_as_the_model_does(api: InProcess, tiny: Direct) -> None:
    from trainer.data import load_split

    x = load_split(MNIST_DIR, "test").images[:16]
    mu, sigma = tiny.encode(x / np.float32(255))
    body = api.post("/encode", json={"images": [b64(png(d)) for d in x]}).json()
    np.testing.assert_allclose(body["mu"], mu, atol=ATOL)
    np.testing.assert_allclose(body["sigma"], sigma, atol=ATOL)
    as_rgb = api.post("/encode", json={"images": [b64(png(d, "RGB")) for d in x]}).json()
    np.testing.assert_allclose(as_rgb["mu"], mu, atol=ATOL)


def test_fastapis_opentelemetry_is_on_only_where_something_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off by default (it would only ask OpenTelemetry on every request whether a provider
    has appeared); on where a provider is set, or FastAPI is asked to configure one."""
    from opentelemetry import trace

    from service.app import opentelemetry_configured

    monkeypatch.delenv("FASTAPI_OTEL_AUTO_CONFIGURE", raising=False)
    assert not opentelemetry_configured()
    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    assert opentelemetry_configured()
    monkeypatch.delenv("FASTAPI_OTEL_AUTO_CONFIGURE")

    class SdkTracerProvider(trace.TracerProvider):  # stands in for opentelemetry-sdk's
        def get_tracer(self, *args: object, **kwargs: object) -> trace.Tracer:
            return trace.NoOpTracer()

    monkeypatch.setattr(trace, "get_tracer_provider", SdkTracerProvider)
    assert opentelemetry_configured()
