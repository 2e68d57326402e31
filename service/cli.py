"""vae-serve: loads the models, then serves them with uvicorn.

Every setting is an option (--max-images 64) and an environment variable
(VAE_MAX_IMAGES=64); options win. The models are loaded before the server starts
listening, so a store with nothing servable ends the process at once, with exit status 1
and one log line that says why, instead of a server that answers every request with 503.
"""

from __future__ import annotations

import argparse
import copy
import logging
import logging.config
import os
import signal
import sys
from typing import Any

import uvicorn
import uvicorn.config
from pydantic import ValidationError

from service.settings import Settings

log = logging.getLogger("service.cli")
EXIT_NO_MODELS = 1
EXIT_BAD_SETTINGS = 2
LOG_LEVELS = ["debug", "info", "warning", "error"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae-serve",
        description="Serve the VAE models of a model store over HTTP. Every option can also be set by the "
        "environment variable named after it (VAE_<OPTION>); the option wins.",
    )
    # The server's own options read VAE_HOST, VAE_PORT, ... too, so that a container image
    # configures everything through its environment (Dockerfile ENV, compose `environment`).
    parser.add_argument(
        "--host",
        default=os.environ.get("VAE_HOST") or "127.0.0.1",
        help="Address to listen on (env VAE_HOST; default 127.0.0.1; 0.0.0.0 for every interface).",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=_env_int("VAE_PORT", 8000),
        help="Port to listen on (env VAE_PORT; default 8000).",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=_env_int("VAE_WORKERS", 1),
        help="Server processes, each with its own copy of the models (env VAE_WORKERS; default 1). "
        "Give each about cores/workers torch threads.",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=int,
        default=_env_int("VAE_GRACEFUL_TIMEOUT", 30),
        metavar="SECONDS",
        help="On SIGTERM, stop accepting connections and give the requests in flight this long to "
        "finish before they are cancelled (env VAE_GRACEFUL_TIMEOUT; default 30). Keep the "
        "orchestrator's grace period (compose stop_grace_period) longer.",
    )
    parser.add_argument(
        "--log-level",
        default=_env_choice("VAE_LOG_LEVEL", LOG_LEVELS, "info"),
        choices=LOG_LEVELS,
        help="env VAE_LOG_LEVEL; default info",
    )
    settings = parser.add_argument_group("settings (each also read from VAE_<NAME>)")
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = (
            "unset" if default is None else ",".join(default) if isinstance(default, list) else str(default)
        )
        settings.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            metavar="VALUE",
            help=f"{field.description} (env VAE_{name.upper()}; default {shown or 'empty'})",
        )
    return parser


def _env_choice(name: str, choices: list[str], default: str) -> str:
    # argparse checks `choices` only for values given on the command line, not for defaults.
    value = (os.environ.get(name) or default).strip().lower()
    if value not in choices:
        log.error(
            "vae-serve cannot start: invalid settings: %s=%r is not one of %s",
            name,
            value,
            ", ".join(choices),
        )
        sys.exit(EXIT_BAD_SETTINGS)
    return value


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        log.error("vae-serve cannot start: invalid settings: %s=%r is not a whole number", name, value)
        sys.exit(EXIT_BAD_SETTINGS)


def logging_config(level: str) -> dict[str, Any]:
    """uvicorn's logging plus ours. Handed to uvicorn, which applies it again in every
    worker process, so `service.*` lines appear whatever the number of workers."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["service"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["handlers"]["service"] = {
        "class": "logging.StreamHandler",
        "formatter": "service",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["service"] = {"handlers": ["service"], "level": level.upper(), "propagate": False}
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        config["loggers"][name]["level"] = level.upper()
    return config


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in Settings.model_fields if getattr(args, name) is not None
    }
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _ignore_sighup_while_loading()
    log_config = logging_config(args.log_level)
    logging.config.dictConfig(log_config)
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        log.error("vae-serve cannot start: invalid settings: %s", problems)
        sys.exit(EXIT_BAD_SETTINGS)

    if args.workers > 1:
        _serve_workers(args, settings, log_config)
        return

    from service.app import create_app
    from service.model.inference import tune_process
    from service.model.runtime import NoModelsError, load_registry

    settings = tune_process(settings)
    try:
        registry = load_registry(settings)
    except NoModelsError as exc:
        log.error("vae-serve cannot start: %s", exc)
        sys.exit(EXIT_NO_MODELS)
    app = create_app(settings, registry)
    uvicorn.run(app, **server_options(args, settings, log_config))


def server_options(
    args: argparse.Namespace, settings: Settings, log_config: dict[str, Any]
) -> dict[str, Any]:
    """uvicorn's options, the same with one process or several."""
    return {
        "host": args.host,
        "port": args.port,
        "log_config": log_config,
        "timeout_graceful_shutdown": args.graceful_timeout,
        "access_log": settings.access_log,
        # The app reads X-Forwarded-For itself, from VAE_FORWARDED_ALLOW_IPS only (service.app):
        # uvicorn's own default would trust any request from 127.0.0.1 to name its client.
        "proxy_headers": False,
    }


def _ignore_sighup_while_loading() -> None:
    """SIGHUP's default action ends the process. Until the server installs its own handler
    (service.model.reload once the models are loaded; uvicorn's, with --workers), a SIGHUP is
    logged and ignored instead of killing a server that is about to serve."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(
            signal.SIGHUP,
            lambda signum, frame: log.warning(
                "received SIGHUP while loading the models: ignored; a reload can start once the server "
                "is ready (send SIGHUP again then if a new version appeared meanwhile)"
            ),
        )


def _serve_workers(args: argparse.Namespace, settings: Settings, log_config: dict[str, Any]) -> None:
    """Several processes: uvicorn imports the factory in each, so the settings travel as
    VAE_* variables. The artifacts are verified here first, so that a broken store fails
    once, clearly, rather than in every worker."""
    from service import artifact
    from service.model.runtime import selected_models

    usable = []
    for name, version in selected_models(settings):
        try:
            artifact.verify(artifact.resolve(settings.model_store, name, version))
            usable.append(name)
        except artifact.ArtifactError as exc:
            log.error("refusing model %s: %s", name, exc)
    if not usable:
        log.error(
            "vae-serve cannot start: no model in %s passed verification; nothing to serve",
            settings.model_store,
        )
        sys.exit(EXIT_NO_MODELS)
    for name in Settings.model_fields:
        value = getattr(args, name)
        if value is not None:
            os.environ[f"VAE_{name.upper()}"] = value
    # POST /admin/reload reaches one worker only; it reads this to refuse and point to SIGHUP.
    os.environ["VAE_WORKER_PROCESSES"] = str(args.workers)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        workers=args.workers,
        **server_options(args, settings, log_config),
    )


if __name__ == "__main__":
    main()
