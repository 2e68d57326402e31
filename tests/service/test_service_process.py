"""A real `vae-serve` process on a free port: startup, every endpoint through the clients
and the command line, concurrency, bad input over real HTTP, and startup failures."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from process_support import STARTUP_TIMEOUT, Served, clean_env, clean_exit, command, launch, serve
from service_support import Direct, b64, decode_png, png
from vae_client.client import AsyncVAEClient, VAEClient, VAEClientError

from service.api.images import grid, to_uint8


@pytest.fixture(scope="module")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("serve") / "vae-serve.log"
    served = serve(tiny_store, log, "--inference-threads", "2", "--max-samples", "64")
    yield served
    # stop() fails the test when the server takes over 60 s after SIGTERM to stop.
    assert clean_exit(served.stop()), served.log()


def test_startup_logs_each_model_then_ready(server: Served) -> None:
    log = server.log()
    assert "loaded model tiny v1 from" in log and "latent_dim 8 on cpu, warm-up" in log
    assert "loaded model tiny-2d v1" in log
    assert "ready: serving tiny v1, tiny-2d v1 (default tiny)" in log
    assert log.index("ready: serving") < log.index("Uvicorn running on")


def test_every_endpoint_through_the_sync_client(server: Served, tiny: Direct, tmp_path: Path) -> None:
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255
    path = tmp_path / "one.png"
    path.write_bytes(png(digit))
    mu, sigma = tiny.encode(digit[None] / np.float32(255))
    with VAEClient(server.url) as vae:
        enc = vae.encode(path)
        np.testing.assert_allclose(enc.mu, mu, atol=1e-5)
        np.testing.assert_allclose(enc.sigma, sigma, atol=1e-5)
        np.testing.assert_allclose(vae.reconstruct(path).images, tiny.decode(mu), atol=1e-4)
        z = np.random.default_rng(0).normal(size=(3, 8))
        np.testing.assert_allclose(vae.decode(z), tiny.decode(z), atol=1e-5)
        samples = vae.sample(5, seed=11, return_latents=True)
        expected = torch.randn(5, 8, generator=torch.Generator().manual_seed(11)).numpy()
        np.testing.assert_array_equal(samples.z, expected)
        np.testing.assert_allclose(samples.images, tiny.decode(expected), atol=1e-5)
        assert [m["name"] for m in vae.models()] == ["tiny", "tiny-2d"]
        with pytest.raises(VAEClientError, match="at most 64 samples"):
            vae.sample(65)


def test_png_grids_over_http(server: Served) -> None:
    page = httpx.get(f"{server.url}/sample.png", params={"n": 64, "seed": 1})
    assert page.status_code == 200 and page.headers["content-type"] == "image/png"
    assert decode_png(page.content).shape == (242, 242)
    posted = httpx.post(f"{server.url}/sample", json={"n": 64, "seed": 1}, headers={"Accept": "image/png"})
    assert posted.content == page.content


def test_seeds_are_reproducible_under_concurrent_clients(server: Served, tiny: Direct) -> None:
    seeds = [3, 5, 8, 13] * 5

    async def burst() -> list:
        async with AsyncVAEClient(server.url) as vae:
            return await asyncio.gather(*[vae.sample(4, seed=s) for s in seeds])

    results = asyncio.run(burst())
    for seed, result in zip(seeds, results, strict=True):
        z = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)).numpy()
        np.testing.assert_allclose(result.images, tiny.decode(z), atol=1e-5)
        first = results[seeds.index(seed)]
        np.testing.assert_array_equal(result.images, first.images)


def test_bad_input_over_real_http_leaves_the_server_serving(server: Served) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        huge = http.post(
            "/encode", content=b"0" * (9 * 1024 * 1024), headers={"Content-Type": "application/json"}
        )
        assert huge.status_code == 413 and huge.json()["type"] == "urn:vae:problem:body-too-large"

        def stream() -> Iterator[bytes]:
            for _ in range(40):
                yield b" " * 262144

        streamed = http.post("/encode", content=stream(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413
        nan = http.post(
            "/decode",
            content=b'{"z": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}',
            headers={"Content-Type": "application/json"},
        )
        assert nan.status_code == 422 and "finite" in nan.json()["detail"]
        broken = http.post("/encode", json={"images": [b64(png(np.zeros((28, 28), np.uint8))[:40])]})
        assert broken.status_code == 422
        assert http.get("/readyz").status_code == 200
        assert http.post("/sample", json={"n": 1}).status_code == 200
        assert 'status="413"' in http.get("/metrics").text


def test_the_command_line_client(server: Served, tiny: Direct, tmp_path: Path) -> None:
    env = clean_env(VAE_URL=server.url)
    out = tmp_path / "grid.png"
    cli = command("vae-client", "vae_client")
    sampled = subprocess.run(
        [*cli, "sample", "-n", "16", "--seed", "1", "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sampled.returncode == 0, sampled.stderr
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)).numpy()
    assert (
        np.abs(decode_png(out.read_bytes()).astype(int) - to_uint8(grid(tiny.decode(z))).astype(int)).max()
        <= 1
    )
    digit = tmp_path / "digit.png"
    digit.write_bytes(png(np.eye(28, dtype=np.uint8) * 255))
    encoded = subprocess.run(
        [*cli, "encode", str(digit), "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert encoded.returncode == 0, encoded.stderr
    mu, _ = tiny.encode(np.eye(28, dtype=np.float32)[None])
    np.testing.assert_allclose(json.loads(encoded.stdout)["mu"], mu, atol=1e-5)
    refused = subprocess.run(
        [*cli, "sample", "-n", "100", "--url", server.url],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "error: 422" in refused.stderr and "at most 64" in refused.stderr


# ---------------------------------------------------------------------------- startup failures


def run_to_exit(store: Path, tmp_path: Path) -> tuple[int, str]:
    served = launch(store, tmp_path / "failed.log")
    try:
        served.process.wait(timeout=STARTUP_TIMEOUT)
    except subprocess.TimeoutExpired:
        served.kill()
        pytest.fail("vae-serve kept running with nothing to serve")
    return served.process.returncode, served.log()


def test_an_empty_store_exits_non_zero_with_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, log = run_to_exit(tmp_path / "empty", tmp_path)
    assert code == 1
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in log, log
    assert f"vae-serve cannot start: no models to serve in {tmp_path / 'empty'}" in errors[0]


def test_a_corrupt_store_exits_non_zero_naming_the_file(tiny_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(tiny_store / "tiny", store / "tiny")
    with (store / "tiny" / "v1" / "model.pt").open("ab") as f:
        f.write(b"tampered")
    code, log = run_to_exit(store, tmp_path)
    assert code == 1 and "Traceback" not in log, log
    assert "refusing model tiny: " in log and "model.pt has sha256" in log and "manifest says" in log
    assert "vae-serve cannot start: none of the 1 model(s)" in log


def test_invalid_settings_exit_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [*command("vae-serve", "service.cli"), "--max-images", "-3", "--device", "tpu"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "vae-serve cannot start: invalid settings: " in line
    assert (
        "max_images: Input should be greater than or equal to 1" in line
        and "device 'tpu' is not one of" in line
    )


@pytest.mark.slow
def test_several_workers_serve_the_same_samples(tiny_store: Path, tmp_path: Path) -> None:
    served = launch(tiny_store, tmp_path / "workers.log", "--workers", "2", "--models", "tiny")
    try:
        served.wait_for_log("ready: serving", timeout=STARTUP_TIMEOUT, count=2)
        with httpx.Client(base_url=served.url) as http:
            answers = {http.post("/sample", json={"n": 3, "seed": 2}).content for _ in range(8)}
            assert http.get("/readyz").json()["models"] == ["tiny"]
        assert len(answers) == 1, "every worker draws the same samples for a seed"
        assert served.log().count("loaded model tiny v1") == 2
    finally:
        served.stop()  # fails the test when the workers take over 60 s after SIGTERM to stop
