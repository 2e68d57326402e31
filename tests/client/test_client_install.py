"""The client as a distribution of its own (issue 14): a fresh virtual environment that installs
only client/ holds no torch, fastapi, uvicorn or starlette, ships py.typed, and its vae-client
command works against a running server.

pip fetches httpx, numpy, Pillow and typer from the package index (or its cache); where the
index cannot be reached the test skips and says so."""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from process_support import clean_env, serve

from tests.conftest import ROOT

SERVER_ONLY = {"torch", "fastapi", "uvicorn", "starlette", "vae-service"}  # pydantic comes with typer
OFFLINE = ("No matching distribution", "Could not find a version", "Failed to establish", "Temporary failure")


@pytest.mark.slow
def test_the_client_installs_alone_and_its_command_works(tiny_store: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "client-only"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    source = shutil.copytree(
        ROOT / "client", tmp_path / "client", ignore=shutil.ignore_patterns("*.egg-info")
    )
    installed = subprocess.run(  # from a copy: a build writes into the folder it builds
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if installed.returncode != 0 and any(word in installed.stderr for word in OFFLINE):
        pytest.skip(f"the package index is unreachable from here: {installed.stderr.strip()[-300:]}")
    assert installed.returncode == 0, installed.stderr

    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout
    names = {line.split("==")[0].lower() for line in listed.splitlines() if line}
    assert not names & SERVER_ONLY, f"the client pulled in server packages: {sorted(names & SERVER_ONLY)}"
    assert {"vae-service-client", "httpx", "numpy", "pillow", "typer"} <= names, sorted(names)
    typed = subprocess.run(
        [str(python), "-c", "import pathlib, vae_client; print(pathlib.Path(vae_client.__file__).parent)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert (Path(typed) / "py.typed").is_file()
    assert not Path(typed).is_relative_to(ROOT), "an installed copy, not the checkout's folder"

    served = serve(tiny_store, tmp_path / "serve.log", env=clean_env())
    try:
        cli = str(env_dir / "bin" / "vae-client")
        env = clean_env(VAE_URL=served.url)
        out = tmp_path / "grid.png"
        sampled = subprocess.run(
            [cli, "sample", "-n", "4", "--seed", "1", "-o", str(out)], env=env, capture_output=True, text=True
        )
        assert sampled.returncode == 0, sampled.stderr
        assert Image.open(out).size == (62, 62)  # 2 x 2 digits of 28 with 2-pixel gaps
        models = subprocess.run([cli, "models"], env=env, capture_output=True, text=True)
        assert models.returncode == 0 and "tiny" in models.stdout, models.stderr
        refused = subprocess.run(
            [cli, "decode", "[[1, 2]]", "-o", str(tmp_path / "x.png")],
            env=env,
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 1 and "latent_dim 8" in refused.stderr + refused.stdout
        assert np.asarray(Image.open(out)).any()
    finally:
        served.stop()
