"""Warm-up requests: a few requests sent through the whole app, in process, before it serves.

Loading runs each model (runtime.warm_up, then at the batch shape, batching.warm_up_rows),
but the first HTTP request still paid ~15 ms more than the next ones: first calls through
FastAPI's request handling, pydantic's validators, orjson and the PNG path, and one more
TorchScript run. So the lifespan sends /sample and /reconstruct to the app itself before
the server takes connections; a client's first request then costs what the others do.
They are counted in the request metrics like any other request.
"""

from __future__ import annotations

import base64
import logging
import time

import httpx
import numpy as np
from fastapi import FastAPI

from service.api.images import png_bytes
from service.model.batching import needs_warm_up
from service.settings import Settings

log = logging.getLogger("service.warmup")

BLANK_DIGIT = base64.b64encode(png_bytes(np.zeros((28, 28), np.uint8))).decode("ascii")


async def warm_up_requests(app: FastAPI, settings: Settings) -> None:
    """Sends the warm-up requests to the default model; a failure is logged, never fatal (the
    models already passed their own warm-up). Not for test doubles, which need none."""
    registry = app.state.vae.registry
    if registry is None or not needs_warm_up(registry.get()):
        return
    headers = {"X-API-Key": settings.api_key.get_secret_value()} if settings.api_key else {}
    started = time.perf_counter()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://warm-up", headers=headers) as client:
        for path, body in (
            ("/sample", {"n": 1, "seed": 0}),
            ("/reconstruct", {"images": [BLANK_DIGIT]}),
        ):
            try:
                response = await client.post(path, json=body)
            except Exception as exc:  # a warm-up must not stop a server that loaded its models
                log.warning("warm-up request %s failed: %s: %s", path, type(exc).__name__, exc)
                continue
            if response.status_code != 200:
                log.warning(
                    "warm-up request %s answered %d: %s", path, response.status_code, response.text[:300]
                )
    log.info("warm-up requests done in %.3f s", time.perf_counter() - started)
