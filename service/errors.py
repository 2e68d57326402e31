"""Errors as RFC 9457 problem details: {"type", "title", "status", "detail", "instance"}.

Every error the service answers with goes through here, so a client sees one format
whether the request failed validation, named an unknown model or sent a broken PNG.
`detail` always says what was wrong and what was expected instead.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("service.errors")

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:vae:problem:"


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception as `Type: message` on one line. TorchScript errors carry the script's
    traceback in their message: only its last line (the error itself) is kept."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith("Traceback of TorchScript") for line in lines):
        lines = lines[-1:]
    text = " ".join(lines) or "(no message)"
    if len(text) > limit:
        text = text[:limit] + "…"
    return f"{type(exc).__name__}: {text}"


class ProblemError(Exception):
    """An error with an HTTP status that the client caused or can act on."""

    status = 400
    slug = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


class InvalidImage(ProblemError):
    status, slug, title = 422, "invalid-image", "Invalid image"


class BlankImage(ProblemError):
    status, slug, title = 422, "blank-image", "Blank image"


class ImageTooLarge(ProblemError):
    status, slug, title = 422, "image-too-large", "Image dimensions too large"


class TooManyPixels(ProblemError):
    # Not an ImageTooLarge: each image is within its limit, the request as a whole is not.
    status, slug, title = 422, "too-many-pixels", "Request decodes to too many pixels"


class InvalidPixels(ProblemError):
    status, slug, title = 422, "invalid-pixels", "Invalid pixel array"


class InvalidLatents(ProblemError):
    status, slug, title = 422, "invalid-latents", "Invalid latent vectors"


class TooManyItems(ProblemError):
    status, slug, title = 422, "too-many-items", "Too many items in one request"


class InvalidRequest(ProblemError):
    status, slug, title = 422, "invalid-request", "Invalid request"


class UnknownPrior(ProblemError):
    status, slug, title = 422, "unknown-prior", "The model has no such prior"


class UnknownLabel(ProblemError):
    """A `label` the model has no class for, or a label for a model without classes."""

    status, slug, title = 422, "unknown-label", "The model has no such class"


class NoClassifier(ProblemError):
    """Verdicts or min_confidence asked of a model whose artifact ships no classifier."""

    status, slug, title = 422, "no-classifier", "The model has no classifier"


class ConfidenceNotReached(ProblemError):
    """min_confidence: some draws were still not accepted after VAE_MAX_DRAW_ATTEMPTS rounds."""

    status, slug, title = 422, "min-confidence-not-reached", "Too few draws reached min_confidence"


class BodyTooLarge(ProblemError):
    status, slug, title = 413, "body-too-large", "Request body too large"


class BodyTimedOut(ProblemError):
    """The body did not arrive within its deadline (service.edge.body_deadline)."""

    status, slug, title = 408, "body-timeout", "Request body too slow"


class TooManyFromClient(ProblemError):
    """One client address already holds its share of the server's slots (service.edge.admission)."""

    status, slug, title = 429, "too-many-from-client", "Too many requests from this client"


class UnsupportedMediaType(ProblemError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class UnknownModel(ProblemError):
    status, slug, title = 404, "unknown-model", "Unknown model"


class NoLatentMap(ProblemError):
    status, slug, title = 404, "no-latent-map", "No latent map"


class Unauthorized(ProblemError):
    status, slug, title = 401, "unauthorized", "Missing or wrong API key"


class NotReady(ProblemError):
    status, slug, title = 503, "not-ready", "Not ready"


class ModelFailed(ProblemError):
    """The model raised, or returned NaN or infinity, on this request's input (service.model.faults)."""

    status, slug, title = 500, "model-failed", "Model failed"


class RequestTimedOut(ProblemError):
    """VAE_REQUEST_TIMEOUT_S passed before the model answered. 503, not 504: no gateway is
    involved, and the cause is this server's capacity, which a retry (here or on another
    replica) can route around, as for `overloaded`."""

    status, slug, title = 503, "timeout", "Request timed out"


class Forbidden(ProblemError):
    status, slug, title = 403, "forbidden", "Forbidden"


class ReloadRefused(ProblemError):
    status, slug, title = 409, "reload-refused", "New model version refused"


class ReloadUnavailable(ProblemError):
    status, slug, title = 409, "reload-unavailable", "Reload not possible here"


def problem_body(
    status: int,
    title: str,
    detail: str,
    type_: str = "about:blank",
    instance: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update(extra)
    return body


def problem_response(
    status: int,
    title: str,
    detail: str,
    type_: str = "about:blank",
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    body = problem_body(status, title, detail, type_, instance, **extra)
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def response_for(exc: ProblemError, instance: str | None = None) -> Response:
    return problem_response(
        exc.status, exc.title, exc.detail, TYPE_PREFIX + exc.slug, instance, exc.headers, **exc.extra
    )


def location(loc: tuple[Any, ...] | list[Any]) -> str:
    """("body", "z", 0, 3) -> "z[0][3]": the way a client would write the path."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")] or list(loc[-1:])
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """A readable one-line detail plus the individual errors, without echoing huge inputs."""
    items = []
    for err in errors:
        where = location(err.get("loc", ()))
        message = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "")
            message = f"the body is not valid JSON ({reason})" if reason else "the body is not valid JSON"
            where = "body"
        elif err.get("type") == "missing" and where == "body":
            message = "the request has no JSON body; send a JSON object (see /docs for the fields)"
        elif err.get("type") == "finite_number":
            message = "must be a finite number (NaN and Infinity are not accepted)"
        items.append({"loc": where, "msg": message, "type": err.get("type", "value_error")})
    shown = "; ".join(f"{item['loc']}: {item['msg']}" for item in items[:5])
    if len(items) > 5:
        shown += f"; and {len(items) - 5} more"
    return shown, items


def install(app: FastAPI) -> None:
    """Registers handlers so that every error leaves as problem+json."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> Response:
        return response_for(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        detail, items = describe_validation_errors(list(exc.errors()))
        return problem_response(
            422, "Invalid request", detail, TYPE_PREFIX + "validation-error", request.url.path, errors=items
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        title = _HTTP_TITLES.get(exc.status_code, "HTTP error")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and detail == FASTAPI_BODY_PARSE_ERROR:
            # A JSON body FastAPI could not read other than as a syntax error (not UTF-8 text, or
            # nested too deeply): the same 422 as any other unreadable JSON body, saying why.
            return response_for(InvalidRequest(_unreadable_json(exc.__cause__)), request.url.path)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint at {request.method} {request.url.path}; see /docs for the endpoints"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs for the methods"
        return problem_response(
            exc.status_code, title, detail, instance=request.url.path, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # One line here; the ASGI server logs the traceback when the exception reaches it.
        log.error(
            "unexpected error serving %s %s: %s: %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            exc,
        )
        return problem_response(
            500,
            "Internal server error",
            "the server failed to handle this request; the error is in its log",
            instance=request.url.path,
        )


# What FastAPI answers (400) when reading a JSON body raises anything but a JSON syntax error.
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"


def _unreadable_json(cause: BaseException | None) -> str:
    if isinstance(cause, UnicodeDecodeError):
        why = f"it is not UTF-8 text ({cause})"
    elif isinstance(cause, RecursionError):
        why = "it is nested too deeply to read"
    else:
        why = f"{type(cause).__name__}: {cause}" if cause else "it could not be parsed"
    return f"the body is not valid JSON ({why}); send a UTF-8 JSON object (see /docs for the fields)"


_HTTP_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    408: "Request timeout",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    503: "Service unavailable",
}
