"""Turns HTTP requests into model inputs: the "decode request" step before predicting.

/encode and /reconstruct take images three ways (JSON, multipart uploads, or one raw
PNG/JPEG body), so they read the body here rather than through a FastAPI body parameter.
JSON parsing, validation and image decoding of large bodies run on worker threads: a large
body must not stall the event loop for the other requests. A small one (a digit or two,
the common case) is handled on the event loop: the trip to a thread and back would cost
more than the work (docs/performance.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.api import images
from service.api.schemas import DecodeRequest, ImageFormat, ImageRequest, SampleRequest
from service.errors import ImageTooLarge, InvalidLatents, InvalidRequest, TooManyItems, UnsupportedMediaType
from service.model.latents import MAX_ABS_LATENT
from service.settings import Settings

IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg")
# Bodies up to this size whose images are all at most INLINE_PIXELS are read on the event
# loop (tens of µs); anything larger goes to a worker thread.
INLINE_BODY_BYTES = 16 * 1024
INLINE_PIXELS = 64 * 64
ACCEPTED_FOR_IMAGES = "application/json, multipart/form-data, image/png or image/jpeg"
T = TypeVar("T")


@dataclass(frozen=True)
class ImageInput:
    pixels: np.ndarray  # float32 [B, 28, 28] in [0, 1]
    model: str | None
    format: ImageFormat
    verdicts: bool = False  # return_verdicts: the shipped classifier's reading of each image


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(kind: str) -> bool:
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def require_json(request: Request) -> None:
    """For the JSON-only endpoints: anything but JSON is a 415, not a confusing 422."""
    kind = media_type(request)
    if not _is_json(kind):
        shown = f"Content-Type {kind!r}" if kind else "no Content-Type"
        raise UnsupportedMediaType(
            f"the request has {shown}; {request.url.path} takes a JSON body: "
            "send it with 'Content-Type: application/json'"
        )


class JsonBodyRoute(APIRoute):
    """The API's routes check two things in their handler, before FastAPI reads the body:
    a route whose body is a declared JSON model (/sample, /decode) takes only JSON (415 for
    anything else), and no query parameter may be given twice (FastAPI would silently keep
    the last; the document declares each one a single value). In the handler rather than
    in a dependency, which FastAPI would solve on every request (docs/performance.md).
    Routes that read their body themselves (/encode, /reconstruct) get the query check only."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        json_body = self.body_field is not None
        # The query parameters the route declares (its own and its dependencies'), plus the
        # model and format options that /decode and /sample read themselves (query_options).
        known = set(_query_names(self.dependant))
        if json_body:
            known |= {param["name"] for param in QUERY_OPTIONS_OPENAPI["parameters"]}
        allowed = frozenset(known)

        async def checked(request: Request) -> Response:
            if request.scope.get("query_string"):
                once_each(request, allowed)
            if json_body:
                require_json(request)
            return await handler(request)

        return checked


def _query_names(dependant: Dependant) -> list[str]:
    """The query parameters a route declares, its dependencies' included."""
    names = [param.alias for param in dependant.query_params]
    for sub in dependant.dependencies:
        names += _query_names(sub)
    return names


def once_each(request: Request, allowed: frozenset[str]) -> None:
    """Each query parameter given once, and only those the route takes: a misspelt one
    (`?lable=7`) is an error, as a misspelt JSON field is, not silently ignored."""
    keys = [key for key, _ in request.query_params.multi_items()]
    unknown = sorted(set(keys) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "none"
        raise InvalidRequest(
            f"unknown query parameter {unknown[0]!r}; {request.url.path} takes the query parameters {takes}"
        )
    if len(keys) != len(set(keys)):
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise InvalidRequest(
            f"the query parameter {repeated!r} is given {keys.count(repeated)} times; give it once"
        )


# The `model` and `format` query parameters of /decode and /sample, read by query_options
# rather than declared on the routes: FastAPI's per-request handling of declared parameters
# cost ~10 % of W1's requests per second (docs/performance.md). Documented here instead.
QUERY_OPTIONS_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "model",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "A loaded model's name; overridden by the body's `model`.",
        },
        {
            "name": "format",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": ["png", "array"]},
            "description": "png or array; overridden by the body's `format`.",
        },
    ]
}


def query_options(request: Request) -> tuple[str | None, ImageFormat | None]:
    """The `model` and `format` query parameters (None when absent); a bad format is the
    same 422 validation-error a declared parameter would give."""
    params = request.query_params
    fmt = params.get("format")
    if fmt is not None and fmt not in ("png", "array"):
        raise RequestValidationError(
            [{"type": "literal_error", "loc": ("query", "format"), "msg": "Input should be 'png' or 'array'"}]
        )
    return params.get("model") or None, fmt  # type: ignore[return-value]


def chosen_format(
    body: ImageRequest | DecodeRequest | SampleRequest, query_format: ImageFormat | None
) -> ImageFormat:
    """The body's `format` when it gives one, else the query's, else png."""
    return body.format if "format" in body.model_fields_set else (query_format or "png")


INVERT_WORDS: dict[str, bool | None] = {"auto": None, "true": True, "false": False}


def parse_invert(value: str | bool | None) -> bool | None:
    """'auto' -> None (decide per image); 'true'/'false' force it. Exactly these words, as the
    document's enum says: a query or form field that reads otherwise is refused."""
    if value is None or isinstance(value, bool):
        return value
    if value not in INVERT_WORDS:
        raise InvalidRequest(f"invert is {value!r}; expected auto, true or false")
    return INVERT_WORDS[value]


def _parse_json(body: bytes) -> Any:
    # Python's json, unlike orjson, reads NaN and Infinity tokens (as many clients write
    # them); they are then refused by the schemas with a message that says so.
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(
            f'the body is not valid JSON ({exc}); expected an object such as {{"images": ["<base64 PNG>"]}}'
        ) from exc
    except RecursionError as exc:  # "[[[[..." a few thousand deep: the parser gives up, not a 500
        raise InvalidRequest(
            "the body's JSON is nested too deeply to read; images are at most 3 levels deep "
            '([B][28][28] pixels), e.g. {"images": ["<base64 PNG>"]}'
        ) from exc


async def _small_inline(body: bytes, settings: Settings, read: Callable[[int], T]) -> T:
    """read(max_pixels) on the event loop when the body and its images are small, else on a
    worker thread. An image over INLINE_PIXELS stops the inline attempt at its header (before
    any pixel is decoded) and the whole body is read again on a thread, with the real limit."""
    limit = settings.max_image_pixels
    if len(body) <= INLINE_BODY_BYTES:
        try:
            return read(min(limit, INLINE_PIXELS))
        except ImageTooLarge:
            if limit <= INLINE_PIXELS:
                raise
    return await run_in_threadpool(read, limit)


def _validate_image_json(
    body: bytes, settings: Settings, query_invert: bool | None, max_pixels: int
) -> tuple[np.ndarray, ImageRequest]:
    data = _parse_json(body)
    if not isinstance(data, dict):
        raise InvalidRequest(
            f"the body is a JSON {type(data).__name__}; expected an object such as "
            '{"images": ["<base64 PNG>"]} or {"pixels": [[[...28 floats] x 28]]}'
        )
    for key in ("images", "pixels"):
        if isinstance(data.get(key), list):
            _check_count(len(data[key]), settings)  # before validating: a huge array is not even looked at
    try:
        request = ImageRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            _with_body_loc(exc.errors(include_url=False, include_input=False))
        ) from exc
    invert = parse_invert(request.invert) if "invert" in request.model_fields_set else query_invert
    if request.pixels is not None:
        return images.check_pixels(request.pixels, invert), request
    items = [
        (f"images[{i}]", images.decode_base64(text, f"images[{i}]"))
        for i, text in enumerate(request.images or [])
    ]
    return images.prepare_batch(items, invert, max_pixels, settings.max_request_pixels), request


def _with_body_loc(errors: list[Any]) -> list[Any]:
    return [{**err, "loc": ("body", *err.get("loc", ()))} for err in errors]


def _check_count(count: int, settings: Settings) -> None:
    if count > settings.max_images:
        raise TooManyItems(
            f"the request holds {count} images; at most {settings.max_images} are accepted per "
            "request (VAE_MAX_IMAGES). Split it into several requests"
        )


async def _from_multipart(
    request: Request, settings: Settings
) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    try:
        form = await request.form(max_files=settings.max_images, max_fields=64)
    except StarletteHTTPException as exc:  # Starlette's multipart parser reports its limits as 400s
        if "Too many files" in str(exc.detail):
            raise TooManyItems(
                f"the form holds more than {settings.max_images} files; at most "
                f"{settings.max_images} images are accepted per request (VAE_MAX_IMAGES)"
            ) from exc
        raise InvalidRequest(
            f"the multipart form could not be read ({exc.detail}); send images as file "
            "fields, e.g. curl -F images=@digit.png"
        ) from exc
    uploads: list[tuple[str, bytes]] = []
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            uploads.append((f"upload {len(uploads)} ({value.filename or key})", await value.read()))
        elif key == "images":
            uploads.append((f"upload {len(uploads)} (images)", _nameless_file(value)))
        else:
            fields[key] = value
    if not uploads:
        raise InvalidRequest(
            "the multipart form holds no files; attach images as file fields, e.g. curl -F images=@digit.png"
        )
    _check_count(len(uploads), settings)
    return uploads, fields


def _nameless_file(value: str) -> bytes:
    """The bytes of an `images` part sent without a filename (RFC 7578 makes it optional),
    which Starlette hands over as text: decoded as UTF-8 when the bytes are valid UTF-8, else
    as Latin-1. A PNG or JPEG never is valid UTF-8 (their first byte cannot start a character),
    so Latin-1 gives its bytes back exactly; text that is no image fails to decode as one."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


async def image_input(
    request: Request,
    model: Annotated[
        str | None, Query(description="A loaded model's name; the default when left out.")
    ] = None,
    invert: Annotated[
        Literal["auto", "true", "false"] | None, Query(description="See the `invert` field.")
    ] = None,
    format: Annotated[ImageFormat | None, Query(description="png or array; see the `format` field.")] = None,
    return_verdicts: Annotated[
        bool | None, Query(description="See the `return_verdicts` field; overridden by the body's.")
    ] = None,
) -> ImageInput:
    """The images of an /encode or /reconstruct request, fitted and stacked, float32 [B, 28, 28]."""
    settings: Settings = request.app.state.vae.settings
    query_invert = parse_invert(invert)
    kind = media_type(request)
    if _is_json(kind):
        body = await request.body()
        pixels, parsed = await _small_inline(
            body, settings, lambda limit: _validate_image_json(body, settings, query_invert, limit)
        )
        verdicts = parsed.return_verdicts if "return_verdicts" in parsed.model_fields_set else return_verdicts
        return ImageInput(pixels, parsed.model or model, chosen_format(parsed, format), bool(verdicts))
    if kind == "multipart/form-data":
        uploads, fields = await _from_multipart(request, settings)
        form_invert = parse_invert(fields["invert"]) if "invert" in fields else query_invert
        form_format = fields.get("format", format or "png")
        if form_format not in ("png", "array"):
            raise InvalidRequest(f"format is {form_format!r}; expected png or array")
        pixels = await run_in_threadpool(
            images.prepare_batch,
            uploads,
            form_invert,
            settings.max_image_pixels,
            settings.max_request_pixels,
        )
        verdicts = fields.get("return_verdicts", "true" if return_verdicts else "false")
        if verdicts not in ("true", "false"):
            raise InvalidRequest(f"return_verdicts is {verdicts!r}; expected true or false")
        return ImageInput(pixels, fields.get("model") or model, form_format, verdicts == "true")  # type: ignore[arg-type]
    if kind in IMAGE_MEDIA_TYPES:
        body = await request.body()
        pixels = await _small_inline(
            body, settings, lambda limit: images.prepare_batch([("the body", body)], query_invert, limit)
        )
        return ImageInput(pixels, model, format or "png", bool(return_verdicts))
    shown = f"Content-Type {kind!r}" if kind else "no Content-Type"
    raise UnsupportedMediaType(f"the request has {shown}; {request.url.path} takes {ACCEPTED_FOR_IMAGES}")


def latents(z: list[list[float]], latent_dim: int, model_name: str, settings: Settings) -> np.ndarray:
    """Validated z rows -> float32 [B, latent_dim], or an error naming the expected dimension."""
    if len(z) > settings.max_images:
        raise TooManyItems(
            f"z holds {len(z)} rows; at most {settings.max_images} are accepted per request "
            "(VAE_MAX_IMAGES). Split it into several requests"
        )
    widths = {len(row) for row in z}
    if widths != {latent_dim}:
        bad = next(i for i, row in enumerate(z) if len(row) != latent_dim)
        raise InvalidLatents(
            f"z[{bad}] has {len(z[bad])} numbers; model {model_name!r} expects latent_dim "
            f"{latent_dim}, so every row of z needs exactly {latent_dim} numbers"
        )
    with np.errstate(over="ignore"):  # overflow becomes inf, reported just below
        out = np.asarray(z, dtype=np.float32)
    if not np.isfinite(out).all():  # finite doubles can overflow float32
        where = "".join(f"[{i}]" for i in np.argwhere(~np.isfinite(out))[0])
        raise InvalidLatents(
            f"z{where} does not fit in a float32; latents must be finite numbers, "
            "typically within a few units of 0"
        )
    too_far = np.abs(out) > MAX_ABS_LATENT
    if too_far.any():
        row, col = (int(i) for i in np.argwhere(too_far)[0])
        raise InvalidLatents(
            f"z[{row}][{col}] is {float(out[row, col]):g}; latents must lie within ±{MAX_ABS_LATENT:g} "
            "(the prior is a standard normal: useful values are within a few units of 0)"
        )
    return out
