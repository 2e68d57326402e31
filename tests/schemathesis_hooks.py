"""What JSON Schema cannot say about this API, told to schemathesis.

    SCHEMATHESIS_HOOKS=tests.schemathesis_hooks schemathesis run URL/openapi.json --checks all

The OpenAPI document states every rule the schema language can hold (service.api.openapi).
Two that depend on content, not shape, it cannot:
- an uploaded image (format `image-base64`) is a PNG or JPEG file with a digit in it: a
  random string is rightly refused (422 invalid-image), so the generator draws real images;
- a row of z has the latent_dim of the model the request selects (its body's `model`, else
  the `model` query parameter, else the default), and that comes from the server: rows the
  schema admits are padded or cut to that width. Rows the schema forbids are left as they
  are, so every negative case stays negative.
Without these, schemathesis' positive_data_acceptance check reports the server's correct
422s for random strings and wrong widths as "schema-valid request rejected"."""

from __future__ import annotations

import base64
import io
import os
from functools import cache
from typing import Any

import httpx
import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

from service.api.schemas import IMAGE_FORMAT


def image_file(size: int, seed: int, kind: str) -> str:
    """A size x size image with a digit-like stroke in it, as a base64 PNG or JPEG. Grey
    paper with a white stroke and a black one: it has ink whichever way `invert` reads it
    (forced the wrong way, an image of one polarity is rightly refused as blank)."""
    rng = np.random.default_rng(seed)
    pixels = np.full((size, size), 128, np.uint8)
    width = max(2, size // 5)
    x = int(rng.integers(size // 4, size - size // 4 - width + 1))
    pixels[size // 8 : size - size // 8, x : x + width] = 255
    y = int(rng.integers(size // 8, size // 2))
    pixels[y : y + width, size // 8 : x] = 0
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=kind)
    return base64.b64encode(out.getvalue()).decode("ascii")


def images(kinds: list[str]) -> st.SearchStrategy[str]:
    return st.builds(
        image_file,
        size=st.integers(16, 96),
        seed=st.integers(0, 2**16),
        kind=st.sampled_from(kinds),
    )


schemathesis.openapi.format(IMAGE_FORMAT, images(["PNG", "JPEG"]))
# A raw image/png or image/jpeg body, or a multipart upload (format binary, which this API uses
# for nothing else): the file itself. Schemathesis' own is a blank 1x1 image.
schemathesis.openapi.format("binary", images(["PNG", "JPEG"]).map(base64.b64decode))
schemathesis.openapi.media_type("image/png", images(["PNG"]).map(base64.b64decode))
schemathesis.openapi.media_type("image/jpeg", images(["JPEG"]).map(base64.b64decode))


@cache
def latent_dims(base_url: str) -> tuple[str, dict[str, int]]:
    """(default model, latent_dim of each model), as the server lists them."""
    listing = httpx.get(f"{base_url.rstrip('/')}/models", headers=_key_header(), timeout=30).json()
    return listing["default"], {m["name"]: m["latent_dim"] for m in listing["models"]}


def _key_header() -> dict[str, str]:
    key = os.environ.get("VAE_API_KEY")
    return {"X-API-Key": key} if key else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    body = case.body
    if case.operation.path != "/decode" or not isinstance(body, dict):
        return case
    z = body.get("z")
    rows = isinstance(z, list) and z and all(isinstance(r, list) and r and all(map(_is_number, r)) for r in z)
    if not rows:
        return case
    default, dims = latent_dims(case.operation.schema.get_base_url())
    query_model = (case.query or {}).get("model")
    chosen = body.get("model") or query_model or default
    width = dims.get(chosen) if isinstance(chosen, str) else None
    if width is not None:  # an unknown model stays unknown: a 404, which the checks accept
        case.body = {**body, "z": [(row + [0.0] * width)[:width] for row in z]}
    return case
