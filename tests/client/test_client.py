"""vae_client and the vae-client command line, against the app in process."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from service_support import Direct, InProcess, decode_png, drawn_digit, encoded, png
from typer.testing import CliRunner
from vae_client import cli as client_cli
from vae_client.client import (
    AsyncVAEClient,
    Encoding,
    VAEClient,
    VAEClientError,
    grid_image,
    image_body,
    to_pil,
)

from service.api.images import grid, to_uint8

ATOL = 1e-5


def bridge(served: InProcess) -> httpx.MockTransport:
    """A sync transport into the in-process app, so the sync client can be tested without a server."""

    def handle(request: httpx.Request) -> httpx.Response:
        answer = served.request(
            request.method,
            request.url.raw_path.decode(),
            content=request.content,
            headers=dict(request.headers),
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    return httpx.MockTransport(handle)


@pytest.fixture
def vae(api: InProcess) -> Iterator[VAEClient]:
    with VAEClient("http://testserver", transport=bridge(api)) as client:
        yield client


def digits(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    out = np.zeros((n, 28, 28), np.uint8)
    out[:, 5:23, 8:20] = rng.integers(0, 256, (n, 18, 12), dtype=np.uint8)
    return out


def test_importing_the_client_does_not_import_torch() -> None:
    code = "import vae_client, vae_client.cli, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------- what gets sent


def test_float_arrays_in_0_1_go_as_exact_pixels_everything_else_as_files(tmp_path: Path) -> None:
    x = digits(2) / np.float32(255)
    assert image_body(x, None, "auto")["pixels"] == x.tolist()
    assert image_body(x[0], "tiny", True) == {
        "format": "array",
        "invert": True,
        "model": "tiny",
        "pixels": [x[0].tolist()],
    }
    path = tmp_path / "d.png"
    path.write_bytes(png(digits(1)[0]))
    body = image_body(
        [str(path), path, path.read_bytes(), Image.open(path), digits(1)[0], x[0] * 2], None, "auto"
    )
    assert "pixels" not in body and len(body["images"]) == 6
    decoded = [decode_png(base64.b64decode(s)) for s in body["images"][:5]]
    for image in decoded:
        np.testing.assert_array_equal(image, digits(1)[0])
    assert len(image_body(digits(3), None, "auto")["images"]) == 3, "a uint8 stack is several images"
    with pytest.raises(TypeError, match="cannot send a dict"):
        image_body([{}], None, "auto")  # type: ignore[list-item]


def test_image_helpers() -> None:
    batch = np.random.default_rng(0).random((5, 28, 28)).astype(np.float32)
    pil = to_pil(batch)
    assert len(pil) == 5 and pil[0].mode == "L" and pil[0].size == (28, 28)
    np.testing.assert_array_equal(np.asarray(grid_image(batch)), to_uint8(grid(batch)))
    assert grid_image(batch[0]).size == (28, 28)


# ---------------------------------------------------------------------------- sync client


def test_sync_client_matches_the_model(vae: VAEClient, tiny: Direct, tmp_path: Path) -> None:
    x = digits(3)
    mu, sigma = tiny.encode(x / np.float32(255))
    files = []
    for i, d in enumerate(x):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(png(d))
    for images in (files, x / np.float32(255), [Image.fromarray(d) for d in x]):
        enc = vae.encode(images)
        assert isinstance(enc, Encoding) and enc.model == "tiny" and enc.mu.dtype == np.float32
        np.testing.assert_allclose(enc.mu, mu, atol=ATOL)
        np.testing.assert_allclose(enc.sigma, sigma, atol=ATOL)
    rec = vae.reconstruct(files)
    np.testing.assert_allclose(rec.images, tiny.decode(mu), atol=1e-4)
    assert rec.images.shape == (3, 28, 28)
    z = np.random.default_rng(1).normal(size=(2, 8))
    np.testing.assert_allclose(vae.decode(z), tiny.decode(z), atol=ATOL)
    assert vae.decode(z[0]).shape == (1, 28, 28)
    samples = vae.sample(4, seed=9, temperature=0.5, return_latents=True)
    expected_z = torch.randn(4, 8, generator=torch.Generator().manual_seed(9)).numpy() * np.float32(0.5)
    np.testing.assert_array_equal(samples.z, expected_z)
    np.testing.assert_allclose(samples.images, tiny.decode(expected_z), atol=ATOL)
    assert samples.seed == 9 and vae.sample(2).z is None
    assert [m["name"] for m in vae.models()] == ["tiny", "tiny-2d"]
    assert vae.model("tiny-2d")["latent_dim"] == 2
    assert vae.encode(x[0] / np.float32(255), model="tiny-2d").mu.shape == (1, 2)
    assert vae.ready()


def test_errors_carry_the_problem(vae: VAEClient) -> None:
    with pytest.raises(VAEClientError, match="expects latent_dim 8") as caught:
        vae.decode(np.zeros((1, 3)))
    assert caught.value.status == 422 and caught.value.problem["type"] == "urn:vae:problem:invalid-latents"
    assert "latent_dim 8" in caught.value.detail
    with pytest.raises(VAEClientError, match="404 Unknown model") as caught:
        vae.sample(1, model="nope")
    assert caught.value.status == 404


def test_errors_without_problem_json_and_unreachable_servers() -> None:
    plain = httpx.MockTransport(lambda request: httpx.Response(502, text="bad gateway"))
    with VAEClient("http://proxy", transport=plain) as client, pytest.raises(VAEClientError) as caught:
        client.models()
    assert caught.value.status == 502 and caught.value.detail == "bad gateway"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and nothing listens on it once closed
    with VAEClient(f"http://127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(VAEClientError, match=r"cannot reach .* is vae-serve running") as caught:
            client.models()
        assert caught.value.status is None
        assert not client.ready()


# ---------------------------------------------------------------------------- async client


def test_async_client_matches_the_model(api: InProcess, tiny: Direct) -> None:
    x = digits(2)
    z = np.random.default_rng(2).normal(size=(3, 8))

    async def scenario() -> tuple:
        async with AsyncVAEClient("http://testserver", transport=httpx.ASGITransport(app=api.app)) as client:
            return (
                await client.encode(x / np.float32(255)),
                await client.decode(z),
                await client.sample(3, seed=4),
                await client.reconstruct(list(x)),
                await client.models(),
                await client.ready(),
            )

    enc, decoded, samples, rec, models, ready = api.run(scenario)
    mu, sigma = tiny.encode(x / np.float32(255))
    np.testing.assert_allclose(enc.mu, mu, atol=ATOL)
    np.testing.assert_allclose(enc.sigma, sigma, atol=ATOL)
    np.testing.assert_allclose(decoded, tiny.decode(z), atol=ATOL)
    z4 = torch.randn(3, 8, generator=torch.Generator().manual_seed(4)).numpy()
    np.testing.assert_allclose(samples.images, tiny.decode(z4), atol=ATOL)
    np.testing.assert_allclose(rec.mu, mu, atol=ATOL)
    assert len(models) == 2 and ready


# ---------------------------------------------------------------------------- vae-client


@pytest.fixture
def cli(api: InProcess, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setattr(
        client_cli, "_client", lambda url, api_key: VAEClient(url, api_key=api_key, transport=bridge(api))
    )
    return CliRunner()


def test_cli_sample_writes_the_grid_of_that_seed(cli: CliRunner, vae: VAEClient, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    result = cli.invoke(client_cli.app, ["sample", "-n", "16", "--seed", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "seed 1" in result.output
    expected = to_uint8(grid(vae.sample(16, seed=1).images))
    np.testing.assert_array_equal(decode_png(out.read_bytes()), expected)


def test_cli_encode_prints_json_or_a_table(cli: CliRunner, tiny: Direct, tmp_path: Path) -> None:
    digit = tmp_path / "digit.png"
    digit.write_bytes(png(digits(1)[0]))
    result = cli.invoke(client_cli.app, ["encode", str(digit), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    mu, _ = tiny.encode(digits(1) / np.float32(255))
    np.testing.assert_allclose(printed["mu"], mu, atol=ATOL)
    table = cli.invoke(client_cli.app, ["encode", str(digit), str(digit)])
    assert table.exit_code == 0 and table.stdout.count("KL") == 2 and "mu" in table.stdout


def test_cli_decode_reconstruct_and_models(cli: CliRunner, tiny: Direct, tmp_path: Path) -> None:
    out = tmp_path / "z.png"
    result = cli.invoke(client_cli.app, ["decode", "[[0, 0, 0, 0, 0, 0, 0, 0]]", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (
        np.abs(decode_png(out.read_bytes()).astype(int) - to_uint8(tiny.decode(np.zeros((1, 8))))[0]).max()
        <= 1
    )
    scan = tmp_path / "scan.jpg"
    scan.write_bytes(encoded(drawn_digit().convert("RGB"), "JPEG"))
    rec = tmp_path / "rec.png"
    assert cli.invoke(client_cli.app, ["reconstruct", str(scan), "-o", str(rec)]).exit_code == 0
    assert decode_png(rec.read_bytes()).shape == (28, 28)
    listed = cli.invoke(client_cli.app, ["models"])
    assert listed.exit_code == 0 and "* tiny " in listed.stdout and "tiny-2d" in listed.stdout
    assert "torchscript fp32" in listed.stdout


def test_cli_reports_server_errors_in_one_line(cli: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not really a png")
    result = cli.invoke(client_cli.app, ["encode", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: 422 Invalid image: ") and "only PNG and JPEG" in result.stderr
    assert cli.invoke(client_cli.app, ["decode", "[[1, 2]]", "-o", str(tmp_path / "x.png")]).exit_code == 1
    assert cli.invoke(client_cli.app, ["decode", "not json"]).exit_code == 2


def test_every_public_name_of_the_client_says_what_it_does() -> None:
    import inspect

    import vae_client

    missing = []
    for name in vae_client.__all__:
        obj = getattr(vae_client, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # DEFAULT_URL
        if not inspect.getdoc(obj):
            missing.append(name)
        members = vars(obj).items() if inspect.isclass(obj) else ()
        for attr, member in members:
            documented = callable(member) or isinstance(member, property)
            if not attr.startswith("_") and documented and not inspect.getdoc(member):
                missing.append(f"{name}.{attr}")
    assert not missing, f"public names without a docstring: {missing}"
