"""The explorer's server side, in process: the page and its files with their security
headers, and GET /models/{name}/latent-map (read once from the verified artifact)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_artifact, synthetic_latent_map
from service_support import InProcess, make_settings

from service import artifact
from service.api.explorer import STATIC_DIR
from service.app import create_app
from service.model import latent_map
from service.model.runtime import TorchScriptRuntime

PAGE_FILES = [
    "index.html",
    "style.css",
    "favicon.svg",
    "blank.png",
    *(f"js/{p.name}" for p in sorted((STATIC_DIR / "js").glob("*.js"))),
]


# ---------------------------------------------------------------------------- the page


def assert_page_headers(headers: dict[str, str] | object) -> None:
    csp = headers["content-security-policy"]  # type: ignore[index]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
    assert headers["x-content-type-options"] == "nosniff"  # type: ignore[index]
    assert headers["referrer-policy"] == "no-referrer"  # type: ignore[index]
    assert headers["x-frame-options"] == "DENY"  # type: ignore[index]


def test_page_is_served_at_root_with_security_headers(api: InProcess) -> None:
    response = api.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>VAE latent-space explorer</title>" in response.text
    assert_page_headers(response.headers)


@pytest.mark.parametrize("path", PAGE_FILES)
def test_static_files_have_types_and_security_headers(api: InProcess, path: str) -> None:
    response = api.get(f"/static/{path}")
    assert response.status_code == 200, path
    expected = {
        ".html": "text/html",
        ".css": "text/css",
        ".js": "javascript",
        ".svg": "image/svg+xml",
        ".png": "image/png",
    }[Path(path).suffix]
    # nosniff makes the browser trust this type: a module served as text/plain would not run.
    assert expected in response.headers["content-type"]
    assert_page_headers(response.headers)


def test_page_needs_nothing_from_elsewhere_and_no_inline_code() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert "<style" not in html and " style=" not in html, "the CSP refuses inline styles"
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "the CSP refuses inline scripts"
    assert not re.search(r"\son[a-z]+=", html), "the CSP refuses inline event handlers"
    for path in STATIC_DIR.rglob("*"):
        if path.suffix in {".html", ".css", ".js"}:
            text = path.read_text()
            assert not re.search(r"(src|href)=\"https?:|url\(https?:|import .* from \"https?:", text), path


def test_missing_static_file_is_404_with_headers_and_no_path_escapes(api: InProcess) -> None:
    missing = api.get("/static/nope.js")
    assert missing.status_code == 404
    assert_page_headers(missing.headers)
    for sneaky in ("/static/../settings.py", "/static/%2e%2e/settings.py", "/static/..%2fsettings.py"):
        response = api.get(sneaky)
        assert response.status_code == 404 or "BaseSettings" not in response.text, sneaky


def test_api_answers_keep_their_own_headers(api: InProcess) -> None:
    # The page's CSP is for pages: /docs loads Swagger UI, which needs inline scripts.
    assert "content-security-policy" not in api.get("/models").headers
    assert "content-security-policy" not in api.get("/docs").headers


def test_page_is_open_but_the_api_needs_the_key(tiny_store: Path) -> None:
    served = InProcess(create_app(make_settings(tiny_store, api_key="s3cret")))
    try:
        assert served.get("/").status_code == 200
        assert served.get("/static/js/main.js").status_code == 200
        refused = served.get("/models/tiny-2d/latent-map")
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert served.get("/models/tiny-2d/latent-map", headers={"X-API-Key": "s3cret"}).status_code == 200
    finally:
        served.close()


# ---------------------------------------------------------------------------- the latent map


def test_latent_map_of_a_2d_model(api: InProcess) -> None:
    expected = json.loads(synthetic_latent_map(2)["latent_map.json"])
    response = api.get("/models/tiny-2d/latent-map")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body == {"model": "tiny-2d", "version": "v1", "latent_dim": 2, **expected}
    listed = {m["name"]: m["latent_map"] for m in api.get("/models").json()["models"]}
    assert listed == {"tiny": False, "tiny-2d": True}


def test_model_without_a_map_is_a_404_problem(api: InProcess) -> None:
    response = api.get("/models/tiny/latent-map")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "urn:vae:problem:no-latent-map"
    assert "'tiny' has no latent map" in problem["detail"]
    unknown = api.get("/models/nope/latent-map").json()
    assert unknown["type"] == "urn:vae:problem:unknown-model" and "tiny-2d" in unknown["detail"]


def test_latent_map_is_documented(api: InProcess) -> None:
    schema = api.get("/openapi.json").json()
    operation = schema["paths"]["/models/{name}/latent-map"]["get"]
    assert "404" in operation["responses"]
    assert "LatentMapResponse" in schema["components"]["schemas"]


def test_projected_map_of_a_higher_dim_model(tmp_path: Path) -> None:
    art = make_artifact(tmp_path, "deep", latent_dim=8, report_files=synthetic_latent_map(8))
    runtime = TorchScriptRuntime.load(art.path, torch.device("cpu"))
    found = latent_map.of(runtime)
    assert found is not None and found.projected and found.points == 300
    body = json.loads(found.body)
    assert body["latent_dim"] == 8 and len(body["projection"]["axes"][0]) == 8


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.update(projection=None),  # latent_dim 8 with no projection
        lambda m: m.update(projection={"axes": [[1.0, 0.0], [0.0, 1.0]]}),  # axes of the wrong length
        lambda m: m["points"].append([0.0, 0.0, 10]),  # a label with no class name
        lambda m: m.pop("points"),
    ],
)
def test_malformed_map_is_logged_and_the_model_still_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: Callable[[dict[str, Any]], object]
) -> None:
    data = json.loads(synthetic_latent_map(8)["latent_map.json"])
    change(data)
    report = {"latent_map.json": json.dumps(data).encode()}
    art = make_artifact(tmp_path, "odd", latent_dim=8, report_files=report)
    with caplog.at_level(logging.WARNING, logger="service.model.latent_map"):
        runtime = TorchScriptRuntime.load(art.path, torch.device("cpu"))
    assert latent_map.of(runtime) is None
    assert "not serving its latent map" in caplog.text


def test_map_changed_after_verification_refuses_the_model(tmp_path: Path) -> None:
    art = make_artifact(tmp_path, "swapped", latent_dim=2, report_files=synthetic_latent_map(2))
    (art.path / "report" / "latent_map.json").write_bytes(b'{"points": []}')
    with pytest.raises(
        artifact.ArtifactError, match=r"latent_map\.json changed after the artifact was verified"
    ):
        latent_map.read(art)
    assert artifact.read_listed_file(art, "report/other.json") is None, "unlisted paths are never read"
