"""Operator endpoints: `POST /admin/reload` serves the new model versions in the store.

It needs the API key. A server without one refuses it (403) unless
VAE_ALLOW_RELOAD_WITHOUT_KEY is set: an open endpoint that makes the server read the
disk and load models is not something to expose by accident. SIGHUP does the same
reload and needs only access to the process (service.model.reload).
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from service.api.dependencies import get_reloader, get_state
from service.api.schemas import Problem, ReloadReport
from service.edge.auth import KeyedRoute
from service.errors import Forbidden, NotReady, ReloadRefused, ReloadUnavailable
from service.model.reload import Reloader
from service.model.state import ServiceState

# Set by `vae-serve --workers N` for its worker processes (service.cli).
WORKER_PROCESSES_ENV = "VAE_WORKER_PROCESSES"


def require_admin_key(request: Request) -> None:
    settings = request.app.state.vae.settings
    if settings.api_key is None and not settings.allow_reload_without_key:
        raise Forbidden(
            "POST /admin/reload needs an API key and this server has none (VAE_API_KEY is unset). "
            "Set VAE_API_KEY and send it, or reload with SIGHUP to the server process "
            "(docker compose kill -s SIGHUP api), or set VAE_ALLOW_RELOAD_WITHOUT_KEY=true "
            "on a server that only its operators can reach"
        )


admin = APIRouter(
    tags=["operations"],
    route_class=KeyedRoute,
    dependencies=[Depends(require_admin_key)],
    responses={
        code: {"model": Problem, "description": text}
        for code, text in {
            401: "Missing or wrong API key.",
            403: "No API key is configured, so the endpoint is off (see VAE_ALLOW_RELOAD_WITHOUT_KEY).",
            409: "A new version was refused (its previous version keeps serving; the body lists "
            "`loaded`, `refused`, `serving` as in the 200 answer), or the server runs several "
            "worker processes (reload those with SIGHUP to the parent).",
            503: "The server is starting or stopping.",
        }.items()
    },
)


@admin.post(
    "/admin/reload",
    response_model=ReloadReport,
    summary="Serve the new model versions in the store",
    description="Scans the model store; every model whose latest (or pinned) version differs "
    "from the one served is loaded, verified and warmed up beside it, then swapped in atomically: "
    "no request fails or mixes versions. A broken version is refused and the old one keeps serving.",
)
async def reload_models(
    state: Annotated[ServiceState, Depends(get_state)],
    reloader: Annotated[Reloader | None, Depends(get_reloader)],
) -> Any:
    workers = int(os.environ.get(WORKER_PROCESSES_ENV, "1") or 1)
    if workers > 1:
        raise ReloadUnavailable(
            f"this server runs {workers} worker processes and this request reached only one of them; "
            "reloading it alone would serve two versions side by side. Send SIGHUP to the parent "
            "process instead: uvicorn then replaces the workers one at a time, and each new one loads "
            "the latest versions"
        )
    if not state.ready or reloader is None:
        raise NotReady("the server is starting or stopping; retry the reload once /readyz answers 200")
    outcome = await reloader.reload("api")
    report = outcome.as_dict()
    if outcome.refused:
        refusals = "; ".join(
            f"{r['model']} {r['version']}: {r['reason']}"
            + (f" (still serving {r['serving']})" if r["serving"] else "")
            for r in outcome.refused
        )
        raise ReloadRefused(f"refused {len(outcome.refused)} new version(s): {refusals}", **report)
    return report
