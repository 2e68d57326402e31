"""What the routes ask FastAPI for: the app's state, the models being served, the reloader.

Dependencies are async on purpose: FastAPI runs a sync dependency on its thread pool, a
round trip that costs more than the lookup (three per request on the hot path otherwise)."""

from __future__ import annotations

from fastapi import Request

from service.errors import NotReady
from service.model.inference import Inference
from service.model.reload import Reloader
from service.model.runtime import ModelRegistry
from service.model.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.vae


async def get_reloader(request: Request) -> Reloader | None:
    """The app's reloader, None until the lifespan has loaded the models (service.app)."""
    return getattr(request.app.state, "reloader", None)


async def serving(request: Request) -> tuple[ModelRegistry, Inference]:
    """The loaded models and the pool, or 503 while the app is starting or stopping."""
    registry, inference, _ = serving_now(request)
    return registry, inference


def serving_now(request: Request) -> tuple[ModelRegistry, Inference, ServiceState]:
    """What `serving` checks, as a plain call, for the model endpoints: each FastAPI
    dependency costs a few percent of a small request's time (docs/performance.md)."""
    state: ServiceState = request.app.state.vae
    if not state.ready or state.registry is None or state.inference is None:
        raise NotReady("the models are not loaded (the server is starting or shutting down); retry shortly")
    return state.registry, state.inference, state
