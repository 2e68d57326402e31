"""Model reload without downtime: new artifact versions in the store are served after a trigger.

Two triggers call the same `Reloader.reload()`: `POST /admin/reload` (service.api.admin; needs the
API key) and SIGHUP to the server process (installed by the app's lifespan). There is no
polling on purpose: a new version goes live when an operator says so, on the replicas they
choose (one as a canary, then the rest), and the endpoint answers with what changed or what
was refused, which a deploy script can check. See docs/deployment.md.

How a reload stays invisible to clients:

- Every new version is loaded, its sha256 verified against its manifest and its model run
  once (the same `runtime.load_configured` as at startup), on a worker thread, while the old
  version keeps serving on the event loop.
- The swap is one assignment, `state.registry = new_registry`, made on the event loop: a
  new immutable ModelRegistry replaces the old one. A request looks the registry up once,
  when it starts (service.api.dependencies.serving), and keeps the runtime it got for all its model
  calls, so `/reconstruct`'s mu and images always come from one version, and requests that
  were already running finish on the old version, which lives as long as they hold it.
- A version that fails any check is refused with one log line naming the file and the
  check, and the model's previous version keeps serving.

After a reload the server serves what a restart would (the latest version of each model,
or the pinned one), except for refused versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from starlette.concurrency import run_in_threadpool

from service import artifact
from service.errors import one_line
from service.model.runtime import (
    ModelRefused,
    ModelRegistry,
    ModelRuntime,
    load_configured,
    resolve_device,
    selected_models,
)
from service.model.state import ServiceState

log = logging.getLogger("service.model.reload")

Trigger = Literal["api", "sighup"]


@dataclass
class ReloadOutcome:
    trigger: Trigger
    loaded: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    serving: dict[str, str] = field(default_factory=dict)
    default: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger,
            "loaded": self.loaded,
            "refused": self.refused,
            "serving": self.serving,
            "default": self.default,
            "seconds": round(self.seconds, 3),
        }


class Reloader:
    """Reloads one app's models; reloads run one at a time (a second trigger waits, then
    finds nothing new)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._lock = asyncio.Lock()
        self._signal_tasks: set[asyncio.Task[None]] = set()
        self._sighup_installed = False

    async def reload(self, trigger: Trigger) -> ReloadOutcome:
        async with self._lock:
            started = time.perf_counter()
            registry = self.state.registry
            if registry is None:  # not started, or stopped: nothing to replace
                raise RuntimeError("reload before the models were loaded")
            self.state.metrics.reload_runs.labels(trigger).inc()
            outcome = ReloadOutcome(trigger)
            plan = await run_in_threadpool(self._plan, registry)
            new: dict[str, ModelRuntime] = {}
            for name, path in plan:
                old = registry.models.get(name)
                try:
                    runtime, seconds = await run_in_threadpool(self._load, path)
                    await self._warm_up_for_serving(runtime)
                except (artifact.ArtifactError, ModelRefused) as exc:
                    self.state.metrics.reloads.labels(name, "refused").inc()
                    outcome.refused.append(
                        {
                            "model": name,
                            "version": path.name,
                            "serving": old.version if old else None,
                            "reason": str(exc),
                        }
                    )
                    log.error(
                        "reload (%s): refusing model %s %s, %s: %s",
                        trigger,
                        name,
                        path.name,
                        f"still serving {old.version}" if old else "not serving it",
                        exc,
                    )
                    continue
                new[name] = runtime
                self.state.metrics.reloads.labels(name, "loaded").inc()
                outcome.loaded.append(
                    {"model": name, "previous": old.version if old else None, "version": runtime.version}
                )
                log.info(
                    "reload (%s): loaded model %s %s from %s (was %s): latent_dim %d on %s, warm-up %.2f s",
                    trigger,
                    name,
                    runtime.version,
                    path,
                    old.version if old else "not served",
                    runtime.latent_dim,
                    runtime.device,
                    seconds,
                )
            if new:
                self._swap(registry, new)
            current = self.state.registry
            assert current is not None
            outcome.serving = {m.name: m.version for m in current}
            outcome.default = current.default
            outcome.seconds = time.perf_counter() - started
            log.info(
                "reload (%s): %s; serving %s (default %s)",
                trigger,
                f"{len(new)} new version(s)" if new else "no new versions",
                ", ".join(f"{n} {v}" for n, v in outcome.serving.items()),
                current.default,
            )
            return outcome

    def _plan(self, registry: ModelRegistry) -> list[tuple[str, Path]]:
        """(name, artifact directory) for every model whose version in the store differs from
        the one served: the latest version, or the pinned one (VAE_MODELS=name:v3)."""
        settings = self.state.settings
        plan = []
        wanted = selected_models(settings)
        for name, pinned in wanted:
            try:
                path = artifact.resolve(settings.model_store, name, pinned)
            except artifact.ArtifactError as exc:
                if name in registry.models:
                    log.warning(
                        "reload: %s; still serving %s %s from memory",
                        exc,
                        name,
                        registry.models[name].version,
                    )
                continue
            served = registry.models.get(name)
            if served is None or served.version != path.name:
                plan.append((name, path))
        gone = sorted(set(registry.models) - {name for name, _ in wanted})
        for name in gone:
            log.warning(
                "reload: model %s is no longer in %s; still serving %s from memory until a restart",
                name,
                settings.model_store,
                registry.models[name].version,
            )
        return plan

    def _load(self, path: Path) -> tuple[ModelRuntime, float]:
        # Always warmed up, whatever VAE_WARMUP says: the warm-up run is the check that the new
        # model returns the shapes the contract promises, before it replaces a working one.
        settings = self.state.settings
        runtime, seconds = load_configured(path, settings, resolve_device(settings.device), warm_up=True)
        if runtime.version != path.name:
            raise artifact.ArtifactError(
                f"{path}: the manifest says version {runtime.version!r}, the directory is {path.name!r}"
            )
        return runtime, seconds

    async def _warm_up_for_serving(self, runtime: ModelRuntime) -> None:
        """What startup does after loading (app lifespan): run the model at the shape the
        inference layer will use (micro-batching's merged batch), so that no client request
        pays for the first run of that shape."""
        inference = self.state.inference
        if inference is None:
            return
        try:
            await inference.warm_up([runtime])
        except Exception as exc:
            raise ModelRefused(f"it failed its warm-up at the serving batch shape ({one_line(exc)})") from exc

    def _swap(self, registry: ModelRegistry, new: dict[str, ModelRuntime]) -> None:
        models = {**registry.models, **new}
        configured = self.state.settings.default_model
        default = (
            configured
            if configured in models
            else registry.default
            if registry.default in models
            else next(iter(models))
        )
        # The swap itself: one reference assignment on the event loop thread. Requests that
        # already hold the old registry (or a runtime from it) finish with it.
        self.state.registry = ModelRegistry(dict(sorted(models.items())), default)
        info = self.state.metrics.model_info
        for name, runtime in new.items():
            old = registry.models.get(name)
            if old is not None:
                with contextlib.suppress(KeyError):  # already gone: nothing to remove
                    info.remove(old.name, old.version, str(old.latent_dim), old.device)
            info.labels(runtime.name, runtime.version, str(runtime.latent_dim), runtime.device).set(1)

    # ------------------------------------------------------------------------- SIGHUP

    def install_sighup(self) -> bool:
        """Reload on SIGHUP, the Unix convention for 're-read your configuration'. Only in
        the main thread of a process that has SIGHUP (not on Windows, not in an app
        served from a test's background thread). Returns whether it was installed."""
        if not hasattr(signal, "SIGHUP"):
            return False
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (RuntimeError, ValueError):  # not the main thread, or a loop without signal support
            return False
        self._sighup_installed = True
        return True

    def remove_sighup(self) -> None:
        if self._sighup_installed:
            self._sighup_installed = False
            with contextlib.suppress(RuntimeError, ValueError):  # the loop is already closing
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            # Removing restores SIGHUP's default action, which ends the process: a late reload
            # request must not kill a server in the middle of its shutdown.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for task in self._signal_tasks:
            task.cancel()

    def _on_sighup(self) -> None:
        if not self.state.ready:
            log.warning("received SIGHUP while not serving (starting or stopping): no reload")
            return
        log.info("received SIGHUP: reloading models from %s", self.state.settings.model_store)
        task = asyncio.get_running_loop().create_task(self._reload_logged())
        # Held here until done: the event loop keeps only weak references to tasks.
        self._signal_tasks.add(task)
        task.add_done_callback(self._signal_tasks.discard)

    async def _reload_logged(self) -> None:
        try:
            await self.reload("sighup")
        except Exception:  # nobody awaits this task: the log is the only place an error can go
            log.exception("reload (sighup) failed; the models served before it keep serving")
