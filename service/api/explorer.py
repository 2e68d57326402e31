"""The latent-space explorer: a static web page at / (service/static/), with strict headers.

The page is plain files (HTML, CSS, ES modules), no build step, nothing loaded from
elsewhere; it talks to this service's own API from the browser. It stays open when
VAE_API_KEY is set (it holds no data); the API calls it makes need the key, which the
user types into the page. docs/explorer.md describes what each panel shows.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from starlette.datastructures import MutableHeaders
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"  # service/static/
STATIC_PATH = "/static"

# Everything from this origin only. Images may also be data: URLs, because the API returns
# images as base64 PNGs and the page shows them as they come (data: images cannot run code).
# No 'unsafe-inline': all scripts and styles live in files, so injected markup cannot run.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    # Revalidate every time (StaticFiles answers 304 from its ETag): a new release of the
    # page is never mixed with cached modules of the old one.
    "Cache-Control": "no-cache",
}

# Every other answer (JSON, problem+json, PNG): the browser must take the declared type as
# it is and never guess one (a PNG or a JSON string sniffed as HTML could run script).
API_HEADERS = {"X-Content-Type-Options": "nosniff"}

page = APIRouter()


@page.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")


def is_page_path(path: str) -> bool:
    return path == "/" or path == STATIC_PATH or path.startswith(STATIC_PATH + "/")


class PageHeadersMiddleware:
    """Adds PAGE_HEADERS to every answer for the page and its static files (404s included),
    and API_HEADERS to every other answer. The CSP only on the page: /docs loads Swagger UI
    with inline scripts, and API answers are not pages. Installed by the app outside the
    body limit and the API key gate, so that their 413 and 401 answers carry the headers too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = PAGE_HEADERS if is_page_path(scope["path"]) else API_HEADERS

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in added.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: FastAPI) -> None:
    """Serves the page at / and its files under /static (the app adds PageHeadersMiddleware)."""
    app.include_router(page)
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="static")
