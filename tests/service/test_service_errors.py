"""Bad input: every kind gets a 4xx problem+json that says what is wrong and what is
expected, never a 500 or a hang, and the server keeps serving."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_support import InProcess, b64, drawn_digit, encoded, make_settings, png, png_header_only

from service.app import create_app

MAX_BODY = 64 * 1024
GOOD_PNG = png(np.zeros((28, 28), np.uint8) + np.eye(28, dtype=np.uint8) * 255)
TRUNCATED_PNG = encoded(drawn_digit())[:300]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def api(tiny_store: Path) -> Iterator[InProcess]:
    settings = make_settings(
        tiny_store, max_images=4, max_samples=16, max_body_bytes=MAX_BODY, max_image_pixels=512 * 512
    )
    served = InProcess(create_app(settings))
    yield served
    served.close()


def z_row(width: int = 8, value: str = "0.0") -> str:
    return "[" + ", ".join([value] + ["0.0"] * (width - 1)) + "]"


async def _chunks(total: int) -> AsyncIterator[bytes]:
    for _ in range(total // 4096):
        yield b" " * 4096


# (name, method, url, request kwargs, status, problem type, regex the detail must match)
CASES: list[tuple[str, str, str, dict[str, Any], int, str, str]] = [
    # images that are not what they claim
    (
        "non-image bytes",
        "POST",
        "/encode",
        {"json": {"images": [b64(b"just some text")]}},
        422,
        "invalid-image",
        r"images\[0\] is not an image file .* only PNG and JPEG",
    ),
    (
        "a GIF",
        "POST",
        "/encode",
        {"json": {"images": [b64(encoded(drawn_digit(), "GIF"))]}},
        422,
        "invalid-image",
        r"a GIF; only PNG and JPEG",
    ),
    (
        "truncated PNG",
        "POST",
        "/encode",
        {"json": {"images": [b64(GOOD_PNG), b64(TRUNCATED_PNG)]}},
        422,
        "invalid-image",
        r"images\[1\] is a PNG .* truncated or corrupt",
    ),
    (
        "truncated upload",
        "POST",
        "/reconstruct",
        {"files": {"f": ("cut.png", TRUNCATED_PNG, "image/png")}},
        422,
        "invalid-image",
        r"upload 0 \(cut.png\) .* truncated",
    ),
    (
        "bomb, over our limit",
        "POST",
        "/encode",
        {"json": {"images": [b64(png_header_only(5000, 5000))]}},
        422,
        "image-too-large",
        r"5000x5000 pixels .* the limit is 262144 pixels",
    ),
    (
        "bomb, over Pillow's limit",
        "POST",
        "/encode",
        {"content": png_header_only(100_000, 100_000), "headers": {"Content-Type": "image/png"}},
        422,
        "image-too-large",
        r"limit is 262144 pixels",
    ),
    (
        "not base64",
        "POST",
        "/encode",
        {"json": {"images": ["%%%not base64%%%"]}},
        422,
        "invalid-image",
        r"images\[0\] is not valid base64",
    ),
    (
        "blank image",
        "POST",
        "/encode",
        {"json": {"images": [b64(encoded(drawn_digit(ink=255)))]}},
        422,
        "blank-image",
        r"blank: no ink",
    ),
    # latents
    (
        "wrong latent dimension",
        "POST",
        "/decode",
        {"json": {"z": [[0.0] * 5]}},
        422,
        "invalid-latents",
        r"z\[0\] has 5 numbers; model 'tiny' expects latent_dim 8",
    ),
    (
        "ragged z",
        "POST",
        "/decode?model=tiny-2d",
        {"json": {"z": [[0.0, 0.0], [0.0]]}},
        422,
        "invalid-latents",
        r"z\[1\] has 1 numbers; model 'tiny-2d' expects latent_dim 2",
    ),
    (
        "NaN in z",
        "POST",
        "/decode",
        {"content": '{"z": [' + z_row(value="NaN") + "]}", "headers": JSON},
        422,
        "validation-error",
        r"z\[0\]\[0\]: must be a finite number",
    ),
    (
        "Infinity in z",
        "POST",
        "/decode",
        {"content": '{"z": [' + z_row(value="-Infinity") + "]}", "headers": JSON},
        422,
        "validation-error",
        r"finite",
    ),
    (
        "overflowing number in z",
        "POST",
        "/decode",
        {"content": '{"z": [' + z_row(value="1e400") + "]}", "headers": JSON},
        422,
        "validation-error",
        r"finite",
    ),
    (
        "too large for float32",
        "POST",
        "/decode",
        {"json": {"z": [[1e39] + [0.0] * 7]}},
        422,
        "invalid-latents",
        r"z\[0\]\[0\] does not fit in a float32",
    ),
    ("empty z", "POST", "/decode", {"json": {"z": []}}, 422, "validation-error", r"z: .*at least 1"),
    # pixels
    (
        "NaN in pixels",
        "POST",
        "/encode",
        {
            "content": '{"pixels": [[' + ",".join([z_row(28, "NaN")] + [z_row(28)] * 27) + "]]}",
            "headers": JSON,
        },
        422,
        "validation-error",
        r"pixels\[0\]\[0\]\[0\]: must be a finite number",
    ),
    (
        "pixels out of range",
        "POST",
        "/encode",
        {"json": {"pixels": [[[255.0] * 28] * 28]}},
        422,
        "invalid-pixels",
        r"pixels\[0\]\[0\]\[0\] is 255; pixels must lie in \[0, 1\]",
    ),
    (
        "pixels of the wrong shape",
        "POST",
        "/encode",
        {"json": {"pixels": [[[0.0] * 28] * 27]}},
        422,
        "invalid-pixels",
        r"shape \[1, 27, 28\]; expected \[B\]\[28\]\[28\]",
    ),
    # sample
    (
        "n = 0",
        "POST",
        "/sample",
        {"json": {"n": 0}},
        422,
        "validation-error",
        r"n: .*greater than or equal to 1",
    ),
    ("n < 0", "POST", "/sample", {"json": {"n": -3}}, 422, "validation-error", r"n: "),
    (
        "n over the limit",
        "POST",
        "/sample",
        {"json": {"n": 17}},
        422,
        "too-many-items",
        r"n is 17; at most 16 samples .*VAE_MAX_SAMPLES",
    ),
    ("n over the limit, GET", "GET", "/sample.png?n=17", {}, 422, "too-many-items", r"at most 16"),
    ("n = 0, GET", "GET", "/sample.png?n=0", {}, 422, "validation-error", r"n: "),
    (
        "temperature 0",
        "POST",
        "/sample",
        {"json": {"n": 1, "temperature": 0}},
        422,
        "validation-error",
        r"temperature: .*greater than 0",
    ),
    (
        "temperature NaN",
        "POST",
        "/sample",
        {"content": '{"n": 1, "temperature": NaN}', "headers": JSON},
        422,
        "validation-error",
        r"temperature: must be a finite number",
    ),
    (
        "temperature NaN, GET",
        "GET",
        "/sample.png?temperature=nan",
        {},
        422,
        "validation-error",
        r"temperature",
    ),
    ("negative seed", "POST", "/sample", {"json": {"n": 1, "seed": -1}}, 422, "validation-error", r"seed: "),
    (
        "misspelt field",
        "POST",
        "/sample",
        {"json": {"n": 1, "sed": 3}},
        422,
        "validation-error",
        r"sed: Extra inputs are not permitted",
    ),
    ("missing n", "POST", "/sample", {"json": {}}, 422, "validation-error", r"n: Field required"),
    (
        "bad format",
        "POST",
        "/sample",
        {"json": {"n": 1, "format": "gif"}},
        422,
        "validation-error",
        r"format: Input should be 'png' or 'array'",
    ),
    # too many
    (
        "too many images",
        "POST",
        "/encode",
        {"json": {"images": [b64(GOOD_PNG)] * 5}},
        422,
        "too-many-items",
        r"holds 5 images; at most 4 .*VAE_MAX_IMAGES",
    ),
    (
        "too many pixel images",
        "POST",
        "/encode",
        {"json": {"pixels": [[[0.0] * 28] * 28] * 5}},
        422,
        "too-many-items",
        r"at most 4",
    ),
    (
        "too many uploads",
        "POST",
        "/encode",
        {"files": [("images", ("a.png", GOOD_PNG, "image/png"))] * 5},
        422,
        "too-many-items",
        r"more than 4 files",
    ),
    (
        "too many z rows",
        "POST",
        "/decode",
        {"json": {"z": [[0.0] * 8] * 5}},
        422,
        "too-many-items",
        r"z holds 5 rows; at most 4",
    ),
    # bodies
    (
        "body over the limit (declared)",
        "POST",
        "/decode",
        {"content": b"x" * (MAX_BODY + 1), "headers": JSON},
        413,
        "body-too-large",
        rf"{MAX_BODY + 1} bytes \(Content-Length\); .*at most {MAX_BODY} bytes",
    ),
    (
        "body over the limit (streamed)",
        "POST",
        "/encode",
        {"content": _chunks(MAX_BODY * 2), "headers": JSON},
        413,
        "body-too-large",
        rf"over {MAX_BODY} bytes",
    ),
    (
        "streamed to a JSON-only endpoint",
        "POST",
        "/sample",
        {"content": _chunks(MAX_BODY * 2), "headers": JSON},
        413,
        "body-too-large",
        r"VAE_MAX_BODY_BYTES",
    ),
    (
        "not JSON",
        "POST",
        "/decode",
        {"content": b"{z: nope", "headers": JSON},
        422,
        "validation-error",
        r"not valid JSON",
    ),
    (
        "not JSON, image endpoint",
        "POST",
        "/encode",
        {"content": b"{images", "headers": JSON},
        422,
        "invalid-request",
        r"not valid JSON",
    ),
    (
        "a JSON list",
        "POST",
        "/encode",
        {"json": [1, 2]},
        422,
        "invalid-request",
        r"a JSON list; expected an object",
    ),
    (
        "images and pixels",
        "POST",
        "/encode",
        {"json": {"images": [b64(GOOD_PNG)], "pixels": [[[0.0] * 28] * 28]}},
        422,
        "validation-error",
        r"exactly one of `images`",
    ),
    ("no images", "POST", "/reconstruct", {"json": {"images": []}}, 422, "validation-error", r"empty"),
    (
        "a url-encoded form",
        "POST",
        "/encode",
        {"data": {"model": "tiny"}, "files": {}},
        415,
        "unsupported-media-type",
        r"application/x-www-form-urlencoded",
    ),
    (
        "a query parameter twice",
        "POST",
        "/encode?invert=auto&invert=true",
        {"json": {"images": [b64(GOOD_PNG)]}},
        422,
        "invalid-request",
        r"the query parameter 'invert' is given 2 times; give it once",
    ),
    (
        "bad invert",
        "POST",
        "/encode?invert=maybe",
        {"json": {"images": [b64(GOOD_PNG)]}},
        422,
        "validation-error",
        r"invert: Input should be 'auto', 'true' or 'false'",
    ),
    # content types
    (
        "text/plain to /decode",
        "POST",
        "/decode",
        {"content": b"[[0]]", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported-media-type",
        r"'text/plain'; /decode takes a JSON body",
    ),
    (
        "no content type to /sample",
        "POST",
        "/sample",
        {"content": b'{"n": 1}'},
        415,
        "unsupported-media-type",
        r"no Content-Type",
    ),
    (
        "GIF content type to /encode",
        "POST",
        "/encode",
        {"content": GOOD_PNG, "headers": {"Content-Type": "image/gif"}},
        415,
        "unsupported-media-type",
        r"takes application/json, multipart/form-data, image/png or image/jpeg",
    ),
    # models and routes
    (
        "unknown model in body",
        "POST",
        "/sample",
        {"json": {"n": 1, "model": "mnist"}},
        404,
        "unknown-model",
        r"no model named 'mnist' is loaded; loaded models: tiny, tiny-2d",
    ),
    (
        "unknown model in query",
        "POST",
        "/encode?model=nope",
        {"json": {"images": [b64(GOOD_PNG)]}},
        404,
        "unknown-model",
        r"'nope'",
    ),
    ("unknown model, GET", "GET", "/models/nope", {}, 404, "unknown-model", r"loaded models: tiny, tiny-2d"),
    ("unknown model, PNG", "GET", "/sample.png?model=nope", {}, 404, "unknown-model", r"'nope'"),
    ("unknown route", "GET", "/nothing/here", {}, 404, "", r"no endpoint at GET /nothing/here"),
    ("wrong method", "GET", "/encode", {}, 405, "", r"GET is not allowed on /encode"),
]


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "kind", "detail"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_gets_a_clear_problem(
    api: InProcess, method: str, url: str, kwargs: dict[str, Any], status: int, kind: str, detail: str
) -> None:
    if "content" in kwargs and not isinstance(kwargs["content"], str | bytes):
        kwargs = {**kwargs, "content": _chunks(MAX_BODY * 2)}  # a generator is spent after one use
    response = api.request(method, url, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and problem["title"]
    assert problem["type"] == (f"urn:vae:problem:{kind}" if kind else "about:blank")
    assert problem["instance"] == url.split("?")[0]
    assert re.search(detail, problem["detail"]), problem["detail"]


def test_the_server_keeps_serving_after_bad_input(api: InProcess) -> None:
    for _, method, url, kwargs, *_ in CASES[:12]:
        if "content" in kwargs and not isinstance(kwargs["content"], str | bytes):
            continue
        api.request(method, url, **kwargs)
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 200
    assert api.post("/encode", json={"images": [b64(GOOD_PNG)]}).status_code == 200
    assert api.post("/sample", json={"n": 2, "seed": 0}).status_code == 200


def test_validation_problems_list_each_error(api: InProcess) -> None:
    problem = api.post("/sample", json={"n": 0, "seed": -1, "temperature": -1}).json()
    assert {e["loc"] for e in problem["errors"]} == {"n", "seed", "temperature"}
    assert all(e["msg"] and e["type"] for e in problem["errors"])
