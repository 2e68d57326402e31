"""The ceiling: the service's own app and server stack (settings, middlewares, uvicorn),
plus routes that answer constant bodies as large as our answers to each workload. No model
and no encoding: what is left is what the stack alone costs per request, the most that any
model endpoint on it could reach.

    VAE_BENCH_BODY_BYTES='{"W1": 1234, "W3": 900}' uvicorn --factory bench.ceiling:create

answers POST /constant/W1 with 1234 bytes and /constant/W3 with 900 (a plain number gives
/constant/W1 alone, as before).
"""

from __future__ import annotations

import json
import os

from fastapi import FastAPI, HTTPException, Request
from starlette.responses import Response

from service.app import create_app
from service.settings import Settings


def constant_body(size: int) -> bytes:
    prefix, suffix = b'{"padding":"', b'"}'
    return prefix + b"x" * max(0, size - len(prefix) - len(suffix)) + suffix


def create() -> FastAPI:
    sizes = json.loads(os.environ.get("VAE_BENCH_BODY_BYTES", "1000"))
    if isinstance(sizes, int):
        sizes = {"W1": sizes}
    bodies = {key: constant_body(int(size)) for key, size in sizes.items()}
    app = create_app(Settings())

    # Like the model routes: reads and parses the JSON body through FastAPI, then answers.
    @app.post("/constant/{key}")
    async def constant(key: str, request: Request) -> Response:
        await request.json()
        body = bodies.get(key)
        if body is None:
            raise HTTPException(404, f"no constant body for {key!r}; have {sorted(bodies)}")
        return Response(body, media_type="application/json")

    # First in the route list, where the model routes are (service.app.first_route): the
    # ceiling must not pay for trying every other route first.
    app.router.routes.insert(0, app.router.routes.pop())
    return app
