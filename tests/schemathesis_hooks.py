"""What JSON Schema cannot say about this API, told to schemathesis.

    SCHEMATHESIS_HOOKS=tests.schemathesis_hooks schemathesis run URL/openapi.json --checks all

The OpenAPI document states every rule the schema language can hold (service.api.openapi).
Three that depend on content, not shape, it cannot:
- an uploaded image (format `image-base64`) is a PNG or JPEG file with a digit in it: a
  random string is rightly refused (422 invalid-image), so the generator draws real images;
- a row of z has the latent_dim of the model the request selects (its body's `model`, else
  the `model` query parameter, else the default), and that comes from the server: rows the
  schema admits are padded or cut to that width. Rows the schema forbids are left as they
  are, so every negative case stays negative;
- what a model can draw and judge depends on the model (from the body or the query, as
  for z): `label` must name one of its classes (and the learned prior, not `standard`),
  verdicts and `min_confidence` need its classifier, and a min_confidence is only reachable
  where the classifier can be that sure of the draws (not at temperature 100, nor at
  0.999999). Schema-valid values are mapped onto what the chosen model can do (a label
  index taken modulo its class count, a name onto one of its names, min_confidence to at
  most 0.5 at a temperature of at most 1), or left out where it can do none of it.
Without these, schemathesis' positive_data_acceptance check reports the server's correct
422s for random strings, wrong widths and impossible draws as "schema-valid request
rejected"; tests/service/test_classes_service.py tests those 422s themselves."""

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
def models(base_url: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """(default model, each model's listing), as the server lists them."""
    listing = httpx.get(f"{base_url.rstrip('/')}/models", headers=_key_header(), timeout=30).json()
    return listing["default"], {m["name"]: m for m in listing["models"]}


def latent_dims(base_url: str) -> tuple[str, dict[str, int]]:
    """(default model, latent_dim of each model)."""
    default, listed = models(base_url)
    return default, {name: m["latent_dim"] for name, m in listed.items()}


def _key_header() -> dict[str, str]:
    key = os.environ.get("VAE_API_KEY")
    return {"X-API-Key": key} if key else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _feasible(options: dict[str, Any], model: dict[str, Any] | None, drawn: bool) -> dict[str, Any]:
    """The options (a /sample body or query, or an image request's) mapped onto what `model`
    can do; `drawn`: the options of a draw (label, min_confidence, temperature, prior)."""
    if model is None:  # an unknown model stays unknown: a 404, which the checks accept
        return options
    out = dict(options)
    if not model.get("classifier"):
        out.pop("return_verdicts", None)
        out.pop("min_confidence", None)
    if not drawn:
        return out
    label = out.get("label")
    names = [c["name"] for c in model.get("classes") or []]
    if label is not None and (not (model.get("conditional") and names) or out.get("prior") == "standard"):
        del out["label"]
    elif _is_number(label) and float(label).is_integer():  # 7 or 7.0: an index, as JSON Schema reads it
        out["label"] = int(label) % len(names)
    elif isinstance(label, str) and label not in names:
        out["label"] = int(label) % len(names) if label.isascii() and label.isdigit() else names[0]
    confidence = out.get("min_confidence")
    if confidence is None:
        return out
    try:
        value = float(confidence)
    except (TypeError, ValueError):
        return out  # not a number: a negative case, left as it is
    if 0 < value < 1:  # reachable: at most 0.5, at a temperature of at most 1
        out["min_confidence"] = min(value, 0.5) if _is_number(confidence) else str(min(value, 0.5))
        temperature = out.get("temperature")
        if _is_number(temperature) and temperature > 1:
            out["temperature"] = 1.0
        elif isinstance(temperature, str):
            out["temperature"] = "1.0"
    return out


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    path = case.operation.path
    if path in ("/sample", "/sample.png", "/encode", "/reconstruct"):
        default, listed = models(case.operation.schema.get_base_url())
        query = dict(case.query or {})
        body = case.body if isinstance(case.body, dict) else None
        chosen = (body or {}).get("model") or query.get("model") or default
        model = listed.get(chosen) if isinstance(chosen, str) else None
        drawn = path.startswith("/sample")
        # Assigned only when something changed: a case whose body or query is set anew counts as
        # replaced, and a negative case's mutation would then be taken for part of the request.
        if body is not None and path != "/sample.png" and (mapped := _feasible(body, model, drawn)) != body:
            case.body = mapped
        if query and (mapped := _feasible(query, model, drawn)) != query:
            case.query = mapped
        return case
    body = case.body
    if path != "/decode" or not isinstance(body, dict):
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
