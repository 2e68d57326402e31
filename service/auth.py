"""The optional API key: `X-API-Key: <key>` or `Authorization: Bearer <key>`.

A dependency rather than a middleware, so /docs shows the scheme and its Authorize
button works; the open endpoints (/healthz, /readyz, /docs, /openapi.json, and the
explorer page's files at / and /static) simply do not depend on it."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.errors import Unauthorized

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The key set in VAE_API_KEY.")
bearer = HTTPBearer(auto_error=False, description="The key set in VAE_API_KEY, as a bearer token.")


def _matches(given: str | None, expected: str) -> bool:
    # compare_digest takes time independent of where the strings differ: no timing oracle.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


async def require_api_key(
    request: Request,
    key: Annotated[str | None, Security(api_key_header)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    expected = request.app.state.vae.settings.api_key
    if expected is None:
        return
    secret = expected.get_secret_value()
    if _matches(key, secret) or _matches(credentials.credentials if credentials else None, secret):
        return
    said = "a wrong key" if key or credentials else "no key"
    raise Unauthorized(
        f"this server needs an API key and the request carried {said}; send header "
        "'X-API-Key: <key>' or 'Authorization: Bearer <key>'",
        headers={"WWW-Authenticate": 'Bearer realm="vae"'},
    )
