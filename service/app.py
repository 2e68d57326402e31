"""The app factory: create_app(settings) -> a FastAPI app that loads its models at startup.

uvicorn --factory service.app:create_app      (settings from VAE_* variables)
vae-serve --port 8000                         (the same, with command-line options)
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from service import errors
from service.api import admin, explorer, openapi, routes
from service.edge.admission import AdmissionMiddleware
from service.edge.auth import ApiKeyGate
from service.edge.body_deadline import BodyDeadlineMiddleware
from service.edge.body_limit import BodyLimitMiddleware
from service.edge.request_metrics import RequestMetricsMiddleware
from service.metrics import Metrics
from service.model.inference import Inference
from service.model.reload import Reloader
from service.model.runtime import ModelRegistry, load_registry
from service.model.state import ServiceState
from service.settings import Settings
from service.warmup import warm_up_requests

log = logging.getLogger("service.app")

TITLE = "VAE model service"
VERSION = "0.1.0"
DESCRIPTION = """Encode 28x28 digits into a variational autoencoder's latent space, decode latents into
images, and draw new digits from the prior.

Images may be sent as base64 PNG/JPEG (`{"images": [...]}`), as pixel arrays
(`{"pixels": [B][28][28]}`), as multipart file uploads, or as one raw `image/png` /
`image/jpeg` body. Errors are `application/problem+json` (RFC 9457).
See docs/service.md for the preprocessing, limits and configuration."""


# FastAPI's own OpenTelemetry instrumentation, off: with no provider configured it records
# nothing, but asks OpenTelemetry on every request whether one has been since (~3 µs, a
# few environment lookups; docs/performance.md). /metrics is the service's own telemetry.
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def opentelemetry_configured() -> bool:
    """Whether FastAPI's OpenTelemetry instrumentation has somewhere to report: a provider set
    before the app is built (opentelemetry-instrument, an SDK set up in code, or named by
    OTEL_PYTHON_*_PROVIDER), or FastAPI asked to configure one (FASTAPI_OTEL_AUTO_CONFIGURE)."""
    if os.environ.get("FASTAPI_OTEL_AUTO_CONFIGURE", "").lower() == "true":
        return True
    from opentelemetry import _logs, metrics, trace

    deferred = ("ProxyTracerProvider", "_ProxyMeterProvider", "ProxyLoggerProvider")
    providers = (trace.get_tracer_provider(), metrics.get_meter_provider(), _logs.get_logger_provider())
    return any(type(provider).__name__ not in deferred for provider in providers)


def first_route(app: FastAPI, router: APIRouter) -> None:
    """Puts the routes of `router` first in the app's list: a request's route is found by
    trying each in turn (~2 µs each), and the model endpoints take nearly all requests."""
    entries = app.router.routes
    for index, entry in enumerate(entries):
        if getattr(entry, "original_router", None) is router:
            entries.insert(0, entries.pop(index))
            return


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """A new app. Models load when its lifespan starts, unless `registry` is given
    (vae-serve loads them first, so it can exit cleanly when none loads; tests pass doubles)."""
    settings = settings or Settings()
    state = ServiceState(settings=settings, metrics=Metrics(), registry=registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.registry is None:
            state.registry = await run_in_threadpool(load_registry, settings)
        for model in state.registry:
            state.metrics.model_info.labels(
                model.name, model.version, str(model.latent_dim), model.device
            ).set(1)
        del model  # this frame lives as long as the app: it must not keep a model a reload replaces
        state.inference = Inference.from_settings(state.metrics, settings)
        if settings.warmup:  # at the merged-batch shape too, so the first requests pay no JIT stall
            await state.inference.warm_up(list(state.registry))
        reloader = app.state.reloader = Reloader(state)
        sighup = reloader.install_sighup()  # POST /admin/reload works either way
        state.ready = True
        state.metrics.ready.set(1)
        if settings.warmup:  # the first client request must not pay for first calls (service.warmup)
            await warm_up_requests(app, settings)
        # What is loaded by now (torch, the models, the app) lives as long as the process: take
        # it out of the garbage collector's sight, or every full collection walks it all,
        # pausing every request for ~100 ms (docs/performance.md).
        gc.collect()
        gc.freeze()
        log.info(
            "ready: serving %s (default %s) with %d inference thread(s)%s",
            ", ".join(f"{m.name} {m.version}" for m in state.registry),
            state.registry.default,
            settings.inference_threads,
            "; SIGHUP reloads new model versions" if sighup else "",
        )
        try:
            yield
        finally:
            # Not ready first, so load balancers stop sending work; then let running calls finish.
            state.ready = False
            state.metrics.ready.set(0)
            reloader.remove_sighup()
            await state.inference.aclose()

    app = FastAPI(
        title=TITLE,
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=openapi.operation_id,
        telemetry=None if opentelemetry_configured() else NO_TELEMETRY,
    )
    app.state.vae = state
    errors.install(app)
    app.include_router(routes.api)
    app.include_router(routes.probes)
    app.include_router(admin.admin)
    explorer.install(app)  # the page at / and /static
    first_route(app, routes.api)
    # add_middleware wraps what is already there: the last added runs first. CORS outermost,
    # so that even a 413 carries the headers a browser needs to read it. The key is checked
    # before the body limit and before FastAPI reads any body (service.edge.auth); the security
    # headers go on every answer, the gate's 401 and the limit's 413 included.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyGate, secret=settings.api_key.get_secret_value(), routes=app.routes)
    if settings.max_concurrent_requests:  # before anything reads a body (service.edge.admission)
        app.add_middleware(
            AdmissionMiddleware,
            max_concurrent=settings.max_concurrent_requests,
            per_client=settings.per_client_limit(),
            metrics=state.metrics,
        )
    # Outside admission: a body that misses its deadline frees its slot before the 408 goes out,
    # and a refused request's body is still read (and dropped) under the deadline.
    app.add_middleware(
        BodyDeadlineMiddleware,
        metrics=state.metrics,
        timeout_s=settings.body_timeout_s,
        min_rate=settings.body_min_rate,
        max_s=settings.body_timeout_max_s,
    )
    app.add_middleware(explorer.PageHeadersMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Accept", "Authorization", "X-API-Key"],
            expose_headers=["X-Seed", "X-Prior", "Retry-After"],
        )
    if settings.forwarded_allow_ips:  # first of all: every layer, the logs too, sees the real client
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.forwarded_allow_ips)

    def openapi_document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi.document(
                app.routes, settings, title=TITLE, version=VERSION, description=DESCRIPTION
            )
        return app.openapi_schema

    app.openapi = openapi_document  # type: ignore[method-assign]
    return app
