"""The ceiling: the service's own app and server stack (settings, middlewares, uvicorn),
plus one route that answers a constant body as large as a W1 /sample answer. No model and
no encoding: what is left is what the stack alone costs per request, the most that any
model endpoint on it could reach.

    VAE_BENCH_BODY_BYTES=1234 uvicorn --factory bench.ceiling:create
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Request
from starlette.responses import Response

from service.app import create_app
from service.settings import Settings


def create() -> FastAPI:
    size = int(os.environ.get("VAE_BENCH_BODY_BYTES", "1000"))
    prefix, suffix = b'{"padding":"', b'"}'
    body = prefix + b"x" * max(0, size - len(prefix) - len(suffix)) + suffix
    app = create_app(Settings())

    # Like /sample: reads and parses the JSON body through FastAPI, then answers.
    @app.post("/constant")
    async def constant(request: Request) -> Response:
        await request.json()
        return Response(body, media_type="application/json")

    return app
