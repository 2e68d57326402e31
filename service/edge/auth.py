"""The optional API key: `X-API-Key: <key>` or `Authorization: Bearer <key>`.

Checked once, by ApiKeyGate, a middleware in front of the app: before FastAPI reads and
parses a body (a keyless client must not make the server parse 8 MiB of JSON on /decode and
get a 422 that shows it did). The routes that need the key are the KeyedRoute ones (the
`api` and `admin` routers' route class), which also puts the requirement in the OpenAPI
document when a key is set (service.api.openapi), so /docs shows the schemes and its
Authorize button works. The open endpoints (/healthz, /readyz, /docs, /redoc,
/openapi.json, and the explorer page's files at / and /static) are plain routes. The gate
reads the app's own routes, so the two cannot disagree: a route is open exactly when it is
not a KeyedRoute, and any other path (an unknown one included) is closed.

Why not a `Security` dependency on every guarded route, FastAPI's usual way: FastAPI solves
dependencies on every request, and the key's three (the check and its two schemes) were
most of the ~55 µs of event-loop time per /sample (13 %) that the route classes saved, for
a check the gate had already made (docs/performance.md, item 10)."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import Unauthorized, response_for

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "APIKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The key set in VAE_API_KEY.",
    },
    "HTTPBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "The key set in VAE_API_KEY, as a bearer token.",
    },
}
# Either scheme will do: a list of alternatives, each a requirement of one scheme. (Whatever
# credentials a request does carry must all be the key: ApiKeyGate._all_right.)
SECURITY_REQUIREMENT = [{name: []} for name in SECURITY_SCHEMES]


class KeyedRoute(APIRoute):
    """A route that needs the API key when VAE_API_KEY is set (ApiKeyGate checks it)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        extra = dict(kwargs.pop("openapi_extra", None) or {})
        extra.setdefault("security", SECURITY_REQUIREMENT)
        super().__init__(path, endpoint, openapi_extra=extra, **kwargs)


def _matches(given: str | None, expected: str) -> bool:
    # compare_digest takes time independent of where the strings differ: no timing oracle.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def unauthorized(carried_a_key: bool) -> Unauthorized:
    said = "a wrong key" if carried_a_key else "no key"
    return Unauthorized(
        f"this server needs an API key and the request carried {said}; send header "
        "'X-API-Key: <key>' or 'Authorization: Bearer <key>'",
        headers={"WWW-Authenticate": 'Bearer realm="vae"'},
    )


def open_paths(routes: Iterable[BaseRoute]) -> tuple[frozenset[str], tuple[str, ...]]:
    """(paths, prefixes) that need no key: routes that are not KeyedRoutes (FastAPI's own
    /docs and /openapi.json routes included) and mounted static files.
    An open route with a path parameter would be closed here: the gate fails closed."""
    paths: set[str] = set()
    prefixes: list[str] = []
    for route in served_routes(routes):
        if isinstance(route, APIRoute):
            if not isinstance(route, KeyedRoute) and "{" not in route.path:
                paths.add(route.path)
        elif isinstance(route, Route) and "{" not in route.path:
            paths.add(route.path)
        elif isinstance(route, Mount):
            paths.add(route.path)
            prefixes.append(route.path + "/")
    return frozenset(paths), tuple(prefixes)


def served_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes as served. Newer FastAPI keeps each included router as one route object
    (its routes, with the include's prefix and dependencies applied, come from
    effective_route_contexts()); without this the gate saw no /healthz or /readyz and
    closed them. Older FastAPI lists the routes themselves."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is None:
            yield route
            continue
        for context in contexts():
            yield context.starlette_route or context.original_route


class ApiKeyGate:
    """401 for a request to a guarded path without the key, before anything reads its body.
    Installed only when VAE_API_KEY is set. Paths are compared as the server received them:
    `/static/../metrics` is under /static (open), and StaticFiles answers it 404, never
    /metrics (the router matches the same unnormalised path)."""

    def __init__(self, app: ASGIApp, secret: str, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self._secret = secret
        self._routes = routes  # the app's route list, complete by the first request
        self._open: tuple[frozenset[str], tuple[str, ...]] | None = None

    def _is_open(self, path: str) -> bool:
        if self._open is None:
            self._open = open_paths(self._routes)
        paths, prefixes = self._open
        return path in paths or path.startswith(prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        key, authorization = _credentials_in(scope)
        if self._all_right(key, authorization):
            await self.app(scope, receive, send)
            return
        response = response_for(unauthorized(key is not None or authorization is not None), scope["path"])
        await response(scope, receive, send)

    def _all_right(self, key: str | None, authorization: str | None) -> bool:
        """Every credential the request carries must be the key, and it must carry one: a
        wrong X-API-Key beside a right bearer token (or a `Basic ...` header beside a right
        X-API-Key) is refused, not read as whichever of the two happens to be right."""
        if key is None and authorization is None:
            return False
        if key is not None and not _matches(key, self._secret):
            return False
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            return scheme.lower() == "bearer" and _matches(token, self._secret)
        return True


def _credentials_in(scope: Scope) -> tuple[str | None, str | None]:
    """The X-API-Key and Authorization headers as sent (None when absent)."""
    key = authorization = None
    for name, value in scope.get("headers", ()):
        if name == b"x-api-key":
            key = value.decode("latin-1")
        elif name == b"authorization":
            authorization = value.decode("latin-1")
    return key, authorization
