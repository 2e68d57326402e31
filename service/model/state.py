"""What one app instance holds while it runs: settings, models, the inference pool, metrics.

Plain data: the routes reach it through service.api.dependencies, and service.model.reload
swaps its `registry` when new model versions are served."""

from __future__ import annotations

from dataclasses import dataclass

from service.metrics import Metrics
from service.model.inference import Inference
from service.model.runtime import ModelRegistry
from service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry | None = None
    inference: Inference | None = None
    ready: bool = False
