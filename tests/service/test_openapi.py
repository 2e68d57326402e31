"""The OpenAPI document (issue 14): stable operation ids, security only where a key is set,
and schemathesis with every check finding nothing, run exactly as a new user would run it:

    schemathesis run URL/openapi.json --checks all --max-examples 300

against a real vae-serve of the shipped models, once open and once with an API key. What
JSON Schema cannot say (an image string is a real image; a row of z has the chosen model's
width) comes from tests/schemathesis_hooks.py; everything else is in the document."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_support import Served, clean_env, serve

from service.app import create_app
from tests.conftest import ROOT, SHIPPED_STORE
from tests.reliability import long_run, record
from tests.service_support import make_settings

API_KEY = "openapi-key-0123456789"
# `schemathesis run --checks all --max-examples N` against the shipped models: N=100 in every
# run of the suite (about 3 minutes for both servers), 300 in `make fuzz` (OPENAPI_EXAMPLES=300,
# about 8), whose rows the README keeps beside these.
OPENAPI_EXAMPLES = int(os.environ.get("OPENAPI_EXAMPLES") or 100)
OPERATION_IDS = {
    ("post", "/encode"): "encode",
    ("post", "/reconstruct"): "reconstruct",
    ("post", "/decode"): "decode",
    ("post", "/sample"): "sample",
    ("get", "/sample.png"): "samplePng",
    ("get", "/models"): "listModels",
    ("get", "/models/{name}"): "getModel",
    ("get", "/models/{name}/latent-map"): "getLatentMap",
    ("get", "/metrics"): "metrics",
    ("get", "/healthz"): "healthz",
    ("get", "/readyz"): "readyz",
    ("post", "/admin/reload"): "reloadModels",
}
KEYED = {op for op in OPERATION_IDS if op[1] not in ("/healthz", "/readyz")}


def document(tmp_path: Path, **settings: object) -> dict:
    return create_app(make_settings(tmp_path, **settings)).openapi()


def operations(doc: dict) -> dict[tuple[str, str], dict]:
    return {(method, path): op for path, item in doc["paths"].items() for method, op in item.items()}


def test_operation_ids_are_the_route_names_and_stable(tmp_path: Path) -> None:
    ids = {key: op["operationId"] for key, op in operations(document(tmp_path)).items()}
    assert ids == OPERATION_IDS


def test_security_is_documented_only_when_a_key_is_set(tmp_path: Path) -> None:
    open_doc = document(tmp_path)
    assert "securitySchemes" not in open_doc.get("components", {})
    for key, op in operations(open_doc).items():
        assert "security" not in op and "401" not in op["responses"], key

    keyed_doc = document(tmp_path, api_key=API_KEY)
    assert set(keyed_doc["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
    for key, op in operations(keyed_doc).items():
        assert ("security" in op) == (key in KEYED), key
        assert ("401" in op["responses"]) == (key in KEYED), key


def test_the_configured_limits_are_in_the_document(tmp_path: Path) -> None:
    doc = document(tmp_path, max_images=7, max_samples=33)
    body = doc["paths"]["/encode"]["post"]["requestBody"]["content"]
    image_request = body["application/json"]["schema"]
    assert image_request["oneOf"] == [{"required": ["images"]}, {"required": ["pixels"]}]
    assert image_request["properties"]["images"]["maxItems"] == 7
    assert image_request["properties"]["pixels"]["maxItems"] == 7
    assert body["multipart/form-data"]["schema"]["properties"]["images"]["maxItems"] == 7
    schemas = doc["components"]["schemas"]
    assert schemas["DecodeRequest"]["properties"]["z"]["maxItems"] == 7
    assert schemas["DecodeRequest"]["properties"]["z"]["items"]["minItems"] == 1
    assert schemas["SampleRequest"]["properties"]["n"]["maximum"] == 33
    (n,) = (p for p in doc["paths"]["/sample.png"]["get"]["parameters"] if p["name"] == "n")
    assert n["schema"]["maximum"] == 33


@pytest.fixture(scope="module", params=["open", "keyed"])
def shipped(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, bool]]:
    keyed = request.param == "keyed"
    # Smaller limits than the defaults keep the run short (each n up to 1024 would be a second
    # of decoding on one thread, and every image 784 generated numbers): the document states
    # them, so they are tested all the same.
    limits = {"VAE_MAX_SAMPLES": "16", "VAE_MAX_IMAGES": "4"}
    env = clean_env(VAE_API_KEY=API_KEY, **limits) if keyed else clean_env(**limits)
    log = tmp_path_factory.mktemp("schemathesis") / "serve.log"
    served = serve(SHIPPED_STORE, log, env=env)
    try:
        yield served, keyed
    finally:
        served.stop()


@pytest.mark.slow
def test_schemathesis_with_every_check_finds_nothing(
    shipped: tuple[Served, bool], tmp_path_factory: pytest.TempPathFactory
) -> None:
    served, keyed = shipped
    env = {k: v for k, v in os.environ.items() if k != "VAE_API_KEY"}
    env["SCHEMATHESIS_HOOKS"] = "tests.schemathesis_hooks"
    argv = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{served.url}/openapi.json"]
    argv += ["--checks", "all", "--max-examples", str(OPENAPI_EXAMPLES), "--seed", "1", "--no-color"]
    if keyed:
        argv += ["-H", f"X-API-Key: {API_KEY}"]
        env["VAE_API_KEY"] = API_KEY  # for the hooks' own GET /models
    # Run from a folder of its own: schemathesis keeps a cache of past crashes in .schemathesis/
    # under the working directory, and replays them; each run here starts clean.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    work = tmp_path_factory.mktemp("schemathesis-run")
    done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    summary = re.search(r"(\d+) generated, (\d+) passed", out)
    assert summary and "failure" not in out.split("SUMMARY")[-1], out[-3000:]
    record(
        "fuzzing",
        f"`schemathesis run --checks all --max-examples {OPENAPI_EXAMPLES}`, {'keyed' if keyed else 'open'} "
        "server, shipped models",
        int(summary.group(1)),
        "no findings",
        "test_openapi.py::test_schemathesis_with_every_check_finds_nothing" + long_run("OPENAPI_EXAMPLES"),
    )
