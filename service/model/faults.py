"""What happens when a model fails on a request: it raised, or it returned NaN or infinity.

Only the requests whose rows were in the failing call get the error, as 500 `model-failed`
problem+json that says the model failed and leaks nothing of it (no exception text, no
trace): the operator gets one ERROR line naming the model, the operation and the cause, and
`vae_model_failures_total` counts it by reason. With batching, a merged pass that raises is
retried request by request (service.model.batching), and non-finite rows are looked for per
request after the merged output is split, so the other requests of the batch get their
answers. Without this check a NaN would leave as JSON `null` or as a PNG of noise.
"""

from __future__ import annotations

import logging

import numpy as np

from service.errors import ModelFailed, one_line
from service.metrics import Metrics
from service.model.runtime import ModelRuntime

log = logging.getLogger("service.model.faults")

Outputs = tuple[np.ndarray, ...]
_SERVER_FAULT = "this is a fault of the server's model, not of the request, and the error is in its log"


class NonFiniteOutput(Exception):
    """A model call returned NaN or infinity."""


def failed(model: ModelRuntime, op: str, rows: int, exc: BaseException, metrics: Metrics) -> ModelFailed:
    """The error for a request whose model call raised `exc`: logged and counted here."""
    metrics.model_failures.labels(model.name, op, "error").inc()
    log.error(
        "model %s %s failed on a request: %s of %d row(s) raised %s; answered 500 model-failed",
        model.name,
        model.version,
        op,
        rows,
        one_line(exc),
        # The Python traceback only when asked for (--log-level debug): the line says what
        # failed, and a model failing on every request must not flood the log.
        exc_info=exc if log.isEnabledFor(logging.DEBUG) else None,
    )
    return ModelFailed(
        f"model {model.name!r} ({model.version}) failed on this request's input while computing {op}; "
        + _SERVER_FAULT
    )


def non_finite(
    model: ModelRuntime, op: str, outputs: np.ndarray | Outputs, metrics: Metrics
) -> ModelFailed | None:
    """None when every number of one request's outputs is finite; otherwise its error,
    logged and counted. ~8 µs for 32 images: cheap next to the pass that made them."""
    arrays = (outputs,) if isinstance(outputs, np.ndarray) else outputs
    if all(np.isfinite(a).all() for a in arrays):
        return None
    rows = len(arrays[0])
    bad = int(
        np.count_nonzero(
            ~np.isfinite(np.concatenate([a.reshape(rows, -1) for a in arrays], axis=1)).any(axis=1)
        )
    )
    metrics.model_failures.labels(model.name, op, "non_finite").inc()
    log.error(
        "model %s %s returned NaN or infinity for a request: %s of %d row(s), %d of them not finite; "
        "answered 500 model-failed instead of a broken result",
        model.name,
        model.version,
        op,
        rows,
        bad,
    )
    return ModelFailed(
        f"model {model.name!r} ({model.version}) returned NaN or infinity for this request's input while "
        f"computing {op}, so no result is returned; " + _SERVER_FAULT
    )
