"""Model outputs -> HTTP responses: the "encode response" step after predicting.

JSON goes through orjson, which writes numpy float32 arrays directly (shortest float32
repr, no per-element Python work). Images come back as base64 PNGs, float arrays, or,
when the client prefers image/png, as one PNG file (a grid for several images).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import images
from service.latents import kl_to_prior
from service.runtime import ModelRuntime
from service.schemas import ImageFormat


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


def wants_png(request: Request) -> bool:
    """True when the client names image/png and prefers it to JSON. Wildcards (*/*, as
    curl and httpx send) keep JSON, so only an explicit `Accept: image/png` switches."""
    accept = request.headers.get("accept", "")
    png = _quality(accept, "image/png")
    return png > 0.0 and png >= _quality(accept, "application/json")


async def image_payload(x: np.ndarray, fmt: ImageFormat) -> list[str] | np.ndarray:
    if fmt == "array":
        return np.ascontiguousarray(x, dtype=np.float32)
    return await run_in_threadpool(images.png_base64, x)


async def png_response(x: np.ndarray, headers: dict[str, str] | None = None) -> Response:
    return Response(await run_in_threadpool(images.grid_png, x), media_type="image/png", headers=headers)


def _model_fields(model: ModelRuntime) -> dict[str, Any]:
    return {"model": model.name, "version": model.version}


def encoding(model: ModelRuntime, mu: np.ndarray, sigma: np.ndarray) -> Response:
    return FastJSONResponse(
        {
            **_model_fields(model),
            "latent_dim": model.latent_dim,
            "mu": mu,
            "sigma": sigma,
            "kl": kl_to_prior(mu, sigma),
        }
    )


async def decoded(request: Request, model: ModelRuntime, x: np.ndarray, fmt: ImageFormat) -> Response:
    if wants_png(request):
        return await png_response(x)
    return FastJSONResponse({**_model_fields(model), "format": fmt, "images": await image_payload(x, fmt)})


async def samples(
    request: Request,
    model: ModelRuntime,
    x: np.ndarray,
    z: np.ndarray,
    seed: int,
    temperature: float,
    fmt: ImageFormat,
    return_latents: bool,
) -> Response:
    # The seed travels in a header too, so a PNG sample can be reproduced as well.
    headers = {"X-Seed": str(seed)}
    if wants_png(request):
        return await png_response(x, headers)
    body: dict[str, Any] = {
        **_model_fields(model),
        "format": fmt,
        "seed": seed,
        "temperature": temperature,
        "images": await image_payload(x, fmt),
    }
    if return_latents:
        body["z"] = z
    return FastJSONResponse(body, headers=headers)


async def reconstruction(
    request: Request, model: ModelRuntime, x: np.ndarray, mu: np.ndarray, sigma: np.ndarray, fmt: ImageFormat
) -> Response:
    if wants_png(request):
        return await png_response(x)
    return FastJSONResponse(
        {
            **_model_fields(model),
            "format": fmt,
            "images": await image_payload(x, fmt),
            "mu": mu,
            "sigma": sigma,
        }
    )


def model_info(model: ModelRuntime, default: str) -> dict[str, Any]:
    manifest = model.manifest
    dataset = manifest.get("dataset")
    return {
        "name": model.name,
        "version": model.version,
        "latent_dim": model.latent_dim,
        "device": model.device,
        "default": model.name == default,
        "likelihood": manifest.get("likelihood"),
        "dataset": dataset.get("name") if isinstance(dataset, dict) else dataset,
        "created_at": manifest.get("created_at"),
        "metrics": manifest.get("metrics") or {},
    }
