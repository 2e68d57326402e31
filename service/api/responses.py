"""Model outputs -> HTTP responses: the "encode response" step after predicting.

JSON goes through orjson, which writes numpy float32 arrays directly (shortest float32
repr, no per-element Python work). Images come back as base64 PNGs, float arrays, or, by
the Accept header: one PNG file (a grid for several images), a `.npy` file of the float32
images (application/x-npy), or their raw uint8 pixels (application/octet-stream).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.api import images
from service.api.schemas import ImageFormat
from service.model import latent_map
from service.model.draws import Draw, Drawn
from service.model.latents import kl_to_prior
from service.model.runtime import ModelRuntime


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _quality(accept: str, wanted: str) -> float:
    """The q-value the Accept header gives exactly `wanted` (0 when it is not named)."""
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if media.lower() == wanted:
            for param in params:
                key, _, value = param.partition("=")
                if key.strip() == "q":
                    try:
                        return float(value)
                    except ValueError:
                        return 0.0
            return 1.0
    return 0.0


NPY_MEDIA_TYPE = "application/x-npy"
RAW_MEDIA_TYPE = "application/octet-stream"
Answer = Literal["json", "png", "npy", "raw"]
# Image answers other than JSON, in the order that wins a tie of q-values.
_ALTERNATIVES: tuple[tuple[Answer, str], ...] = (
    ("png", "image/png"),
    ("npy", NPY_MEDIA_TYPE),
    ("raw", RAW_MEDIA_TYPE),
)
# Encoding this many images (fast PNG path: ~10 µs each) is cheaper on the event loop than the
# trip to a worker thread and back; larger batches go to the thread pool.
INLINE_IMAGES = 16


def negotiate(request: Request) -> Answer:
    """What an image endpoint answers with: a type the Accept header names explicitly and
    prefers to JSON, else JSON. Wildcards (*/*, as curl and httpx send) keep JSON."""
    accept = request.headers.get("accept", "")
    if not accept or accept in ("*/*", "application/json"):  # the common case, without parsing
        return "json"
    json_q = _quality(accept, "application/json")
    best: Answer = "json"
    best_q = 0.0
    for answer, media in _ALTERNATIVES:
        q = _quality(accept, media)
        if q > best_q:
            best, best_q = answer, q
    return best if best_q > 0.0 and best_q >= json_q else "json"


def wants_png(request: Request) -> bool:
    """True when the client names image/png and prefers it to JSON and the binary types."""
    return negotiate(request) == "png"


async def _offload_if_large(count: int, fn: Any, *args: Any) -> Any:
    return fn(*args) if count <= INLINE_IMAGES else await run_in_threadpool(fn, *args)


def image_encoder(request: Request, fmt: ImageFormat, count: int) -> Callable[[np.ndarray], object] | None:
    """images.png_base64 when the answer will be JSON with base64 PNGs of at most
    INLINE_IMAGES images: given to the model call, it runs on the inference thread right
    after the pass (zlib gives up the GIL; the event loop only writes the answer). None
    otherwise: larger batches are encoded on the thread pool, other formats need no PNGs."""
    if fmt == "png" and count <= INLINE_IMAGES and negotiate(request) == "json":
        return images.png_base64
    return None


async def image_payload(x: np.ndarray, fmt: ImageFormat, encoded: object = None) -> list[str] | np.ndarray:
    """The images as the JSON answer carries them; `encoded`: their PNGs, made already."""
    if fmt == "array":
        return np.ascontiguousarray(x, dtype=np.float32)
    if isinstance(encoded, list):
        return encoded
    return await _offload_if_large(len(x), images.png_base64, x)


async def png_response(x: np.ndarray, headers: dict[str, str] | None = None) -> Response:
    body = await _offload_if_large(len(x), images.grid_png, x)
    return Response(body, media_type="image/png", headers=headers)


def _npy(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


async def binary_response(
    answer: Answer, x: np.ndarray, headers: dict[str, str] | None = None
) -> Response | None:
    """The images as one binary body, for bulk clients: `npy`, a .npy file of the float32
    images [B, 28, 28] (exactly format=array's values); `raw`, their uint8 pixels
    (round(255 x), as in the PNGs), row-major, shape in X-Shape. None for png and json."""
    shape = {"X-Shape": ",".join(str(d) for d in x.shape)}
    if answer == "npy":
        body = await _offload_if_large(len(x), _npy, x)
        return Response(body, media_type=NPY_MEDIA_TYPE, headers={**(headers or {}), **shape})
    if answer == "raw":
        body = await _offload_if_large(len(x), lambda: images.to_uint8(x).tobytes())
        return Response(
            body, media_type=RAW_MEDIA_TYPE, headers={**(headers or {}), **shape, "X-Dtype": "uint8"}
        )
    return None


async def image_answer(
    request: Request,
    model: ModelRuntime,
    x: np.ndarray,
    headers: dict[str, str] | None = None,
    probabilities: np.ndarray | None = None,
) -> Response | None:
    """The response when the client asked for one PNG or a binary body; None for JSON.
    Binary bodies name the model in X-Model and X-Model-Version, and the images' verdicts
    (`probabilities`) in X-Verdicts; JSON has them in the body."""
    answer = negotiate(request)
    if answer == "json":
        return None
    if probabilities is not None:
        headers = {**(headers or {}), **verdicts_header(probabilities)}
    if answer == "png":
        return await png_response(x, headers)
    named = {**(headers or {}), "X-Model": model.name, "X-Model-Version": model.version}
    return await binary_response(answer, x, named)


def _model_fields(model: ModelRuntime) -> dict[str, Any]:
    return {"model": model.name, "version": model.version}


def encoding(
    model: ModelRuntime, mu: np.ndarray, sigma: np.ndarray, probabilities: np.ndarray | None = None
) -> Response:
    body: dict[str, Any] = {
        **_model_fields(model),
        "latent_dim": model.latent_dim,
        "mu": mu,
        "sigma": sigma,
        "kl": kl_to_prior(mu, sigma),
    }
    if probabilities is not None:
        body["verdicts"] = verdicts(probabilities)
    return FastJSONResponse(body)


def verdicts(probabilities: np.ndarray) -> list[dict[str, float | int]]:
    """{"label", "confidence"} per image: the classifier's most likely class and its probability."""
    labels = probabilities.argmax(1).tolist()
    confidences = probabilities.max(1).tolist()
    return [{"label": label, "confidence": c} for label, c in zip(labels, confidences, strict=True)]


async def decoded(
    request: Request, model: ModelRuntime, x: np.ndarray, fmt: ImageFormat, encoded: object = None
) -> Response:
    if (other := await image_answer(request, model, x)) is not None:
        return other
    payload = await image_payload(x, fmt, encoded)
    return FastJSONResponse({**_model_fields(model), "format": fmt, "images": payload})


async def samples(
    request: Request, model: ModelRuntime, draw: Draw, drawn: Drawn, fmt: ImageFormat, return_latents: bool
) -> Response:
    # The seed and prior (and verdicts) travel in headers too, so that a PNG or binary sample can
    # be reproduced and judged as well.
    headers = sample_headers(draw, drawn)
    if (other := await image_answer(request, model, drawn.images, headers, drawn.probabilities)) is not None:
        return other
    body: dict[str, Any] = {
        **_model_fields(model),
        "format": fmt,
        "seed": draw.seed,
        "temperature": draw.temperature,
        "prior": draw.prior,
        "images": await image_payload(drawn.images, fmt, drawn.encoded),
    }
    if draw.label is not None:
        body["label"] = draw.label
    if drawn.probabilities is not None:
        body["verdicts"] = verdicts(drawn.probabilities)
    if draw.min_confidence is not None:
        body["redraws"] = drawn.redraws
    if return_latents:
        body["z"] = drawn.z
        # u ~ N(0, temperature^2 I), as /sample has always returned it (z itself under the
        # standard prior); the same float32 product the standard prior computes.
        body["u"] = drawn.u if draw.temperature == 1.0 else drawn.u * np.float32(draw.temperature)
    return FastJSONResponse(body, headers=headers)


def sample_headers(draw: Draw, drawn: Drawn) -> dict[str, str]:
    """What a sample answer says in headers, whatever its body: seed, prior, class, redraws."""
    headers = {"X-Seed": str(draw.seed), "X-Prior": draw.prior}
    if draw.label is not None:
        headers["X-Label"] = str(draw.label)
    if draw.min_confidence is not None:
        headers["X-Redraws"] = str(drawn.redraws)
    return headers


def verdicts_header(probabilities: np.ndarray) -> dict[str, str]:
    """X-Verdicts, `label:confidence` per image, for answers whose body holds images only (about
    9 bytes an image: 9 KB for 1,024 images, within common proxies' 16 KB header buffers)."""
    return {"X-Verdicts": ",".join(f"{v['label']}:{v['confidence']:.4f}" for v in verdicts(probabilities))}


async def reconstruction(
    request: Request,
    model: ModelRuntime,
    x: np.ndarray,
    mu: np.ndarray,
    sigma: np.ndarray,
    fmt: ImageFormat,
    encoded: object = None,
    probabilities: np.ndarray | None = None,
) -> Response:
    if (other := await image_answer(request, model, x, None, probabilities)) is not None:
        return other
    body: dict[str, Any] = {
        **_model_fields(model),
        "format": fmt,
        "images": await image_payload(x, fmt, encoded),
        "mu": mu,
        "sigma": sigma,
    }
    if probabilities is not None:
        body["verdicts"] = verdicts(probabilities)
    return FastJSONResponse(body)


def model_info(model: ModelRuntime, default: str) -> dict[str, Any]:
    manifest = model.manifest
    dataset = manifest.get("dataset")
    return {
        "name": model.name,
        "version": model.version,
        "latent_dim": model.latent_dim,
        "device": model.device,
        "runtime": getattr(model, "runtime", None),
        "precision": getattr(model, "precision", "fp32"),
        "precision_check": getattr(model, "precision_check", None) or None,
        "default": model.name == default,
        "likelihood": manifest.get("likelihood"),
        "dataset": dataset.get("name") if isinstance(dataset, dict) else dataset,
        "created_at": manifest.get("created_at"),
        "metrics": manifest.get("metrics") or {},
        "latent_map": latent_map.of(model) is not None,
        "priors": list(model.priors),
        "default_prior": model.default_prior,
        "prior_metrics": manifest.get("priors") or {},
        "classes": _classes(model),
        "conditional": model.conditional,
        "classifier": manifest.get("classifier") if model.has_classifier else None,
    }


def _classes(model: ModelRuntime) -> list[dict[str, Any]]:
    listed = {c.get("index"): c for c in model.manifest.get("classes") or [] if isinstance(c, dict)}
    return [
        {
            "index": i,
            "name": name,
            "train_share": listed.get(i, {}).get("train_share"),
            "mean_code": listed.get(i, {}).get("mean_code"),
        }
        for i, name in enumerate(model.classes)
    ]
