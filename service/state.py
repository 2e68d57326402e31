"""What one app instance holds while it runs: settings, models, the inference pool, metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from service.errors import NotReady
from service.inference import Inference
from service.metrics import Metrics
from service.runtime import ModelRegistry
from service.settings import Settings

if TYPE_CHECKING:
    from service.reload import Reloader


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry | None = None
    inference: Inference | None = None
    ready: bool = False
    # Replaces `registry` with a new one when new model versions are served (service.reload).
    reloader: Reloader | None = None


# Dependencies are async on purpose: FastAPI runs a sync dependency on its thread pool, a
# round trip that costs more than the lookup (three per request on the hot path otherwise).
async def get_state(request: Request) -> ServiceState:
    return request.app.state.vae


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
