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
import sys
from typing import Any

import uvicorn
import uvicorn.config
from pydantic import ValidationError

from service.settings import Settings

log = logging.getLogger("service.cli")
EXIT_NO_MODELS = 1
EXIT_BAD_SETTINGS = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae-serve",
        description="Serve the VAE models of a model store over HTTP. Every option can also be set by the "
        "environment variable named after it (VAE_<OPTION>); the option wins.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to listen on (default 127.0.0.1; 0.0.0.0 for every interface).",
    )
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on (default 8000).")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Server processes, each with its own copy of "
        "the models (default 1). Give each about cores/workers torch threads.",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
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
    from service.runtime import NoModelsError, load_registry

    try:
        registry = load_registry(settings)
    except NoModelsError as exc:
        log.error("vae-serve cannot start: %s", exc)
        sys.exit(EXIT_NO_MODELS)
    app = create_app(settings, registry)
    uvicorn.run(app, host=args.host, port=args.port, log_config=log_config, timeout_graceful_shutdown=30)


def _serve_workers(args: argparse.Namespace, settings: Settings, log_config: dict[str, Any]) -> None:
    """Several processes: uvicorn imports the factory in each, so the settings travel as
    VAE_* variables. The artifacts are verified here first, so that a broken store fails
    once, clearly, rather than in every worker."""
    from service import artifact
    from service.runtime import selected_models

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
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=log_config,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
