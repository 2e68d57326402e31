"""The Dockerfile and the compose files, checked without a Docker engine: hadolint, the Compose
specification's JSON schema, what the images contain, that the files agree with each other
and with the programs, and a real server started with exactly the image's command and
environment."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from deploy_files import (
    COMPOSE,
    COMPOSE_GPU,
    COMPOSE_SCALE,
    DOCKERFILE,
    DOCKERIGNORE,
    HAPROXY_CFG,
    ROOT,
    compose,
    duration_seconds,
    exec_form,
    healthcheck,
    served_variables,
    service_env,
    stage_env,
    stages,
    trained_variables,
    without_init,
)
from process_support import BIN, clean_env, clean_exit, free_port, start, wait_ready
from service_support import InProcess, make_settings

UID = "10001"
STORE = "/app/model_store"
VENV = "/opt/venv"


def tool(name: str) -> str:
    """A dev tool from this environment's bin (or PATH); skipped only when it is not installed."""
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return str(path)


# ---------------------------------------------------------------------------- linters


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU, COMPOSE_SCALE], ids=lambda p: p.name)
def test_compose_files_match_the_compose_specification(path: Path, tmp_path: Path) -> None:
    """As written, and with every ${VAR:-default} filled in as `docker compose up` would with
    no variables set (so a default of the wrong type is caught too). Read by our loader, which
    knows Compose's `!reset` tag (check-jsonschema's YAML parser does not)."""
    written = tmp_path / f"{path.stem}.json"
    written.write_text(json.dumps(compose(path, keep_variables=True)))
    filled = tmp_path / f"{path.stem}.interpolated.json"
    filled.write_text(json.dumps(compose(path)))
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(written), str(filled)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------- the images


def test_the_serving_image() -> None:
    all_stages = stages()
    names = list(all_stages)
    assert names[-1] == "api", "the last stage is what `docker build .` gives: it must be the API"
    api = all_stages["api"]
    assert api.base == "runtime" and all_stages["runtime"].base.startswith("${PYTHON_IMAGE}")
    assert re.search(r"-slim", _arg_default("PYTHON_IMAGE")), "a slim Python base image"
    # Non-root, by a fixed numeric UID (Kubernetes' runAsNonRoot can only check a number).
    user = api.last("USER")
    assert user is not None and user.text == f"{UID}:{UID}"
    # The environment comes from the builder, whose installs name no extra: no matplotlib,
    # tqdm, pytest, ruff in the serving image.
    [venv] = [c.text for c in api.all("COPY") if VENV in c.text]
    assert venv == f"--from=builder {VENV} {VENV}"
    builder_runs = " ".join(i.text for i in all_stages["builder"].all("RUN"))
    assert "[train]" not in builder_runs and "[dev]" not in builder_runs
    assert "optional-dependencies" not in builder_runs and "--no-deps ." in builder_runs
    # No compilers or build tools anywhere in what the final images are built from.
    for stage in ("runtime", "api", "trainer"):
        runs = " ".join(i.text for i in all_stages[stage].all("RUN"))
        assert not re.search(r"\b(gcc|g\+\+|build-essential|make|clang)\b", runs), stage
    # The shipped models baked in as the default store, owned by the server's user.
    assert f"--chown={UID}:{UID} model_store/ {STORE}/" in [c.text for c in api.all("COPY")]
    env = stage_env(all_stages, "api")
    assert env["VAE_MODEL_STORE"] == STORE and env["PATH"].startswith(f"{VENV}/bin:")
    # tini as PID 1, the server its child, both in exec form (no /bin/sh in between to eat signals).
    entrypoint = exec_form(api.last("ENTRYPOINT").text)
    assert entrypoint[0] == "tini" and without_init(entrypoint) == []
    assert exec_form(api.last("CMD").text) == ["vae-serve"]
    options, command = healthcheck(api)
    assert command == ["python", "-m", "service.healthcheck"]
    assert duration_seconds(options["timeout"]) < duration_seconds(options["interval"])
    assert env["VAE_PORT"] in [e.text for e in api.all("EXPOSE")]


def test_the_trainer_image() -> None:
    all_stages = stages()
    trainer = all_stages["trainer"]
    assert trainer.base == "runtime" and trainer.last("USER").text == f"{UID}:{UID}"
    [venv] = [c.text for c in trainer.all("COPY") if VENV in c.text]
    assert venv == f"--from=trainer-builder {VENV} {VENV}"
    assert all_stages["trainer-builder"].base == "builder"
    assert without_init(exec_form(trainer.last("ENTRYPOINT").text)) == ["vae-train"]
    env = stage_env(all_stages, "trainer")
    assert env["VAE_MODEL_STORE"] == STORE
    # vae-train and vae-serve are the project's console scripts.
    scripts = _pyproject()["project"]["scripts"]
    assert {"vae-train", "vae-serve"} <= set(scripts)


def test_the_builder_installs_exactly_the_pyproject_dependencies(tmp_path: Path) -> None:
    """Runs the Dockerfile's own `python -c` lines that turn pyproject.toml into requirement
    files, and compares what they print with the project's runtime dependencies and extra."""
    runs = [i.text for name in ("builder", "trainer-builder") for i in stages()[name].all("RUN")]
    snippets = [m.group(1) for r in runs for m in [re.search(r'python -c "([^"]+)"', r)] if m]
    assert len(snippets) == 2, runs
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    printed = [
        subprocess.run(
            [sys.executable, "-c", s], cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout.split("\n")[:-1]
        for s in snippets
    ]
    project = _pyproject()["project"]
    assert printed == [project["dependencies"], project["optional-dependencies"]["train"]]
    assert not any(re.match(r"(matplotlib|tqdm|pytest|ruff|hypothesis)\b", d) for d in printed[0])
    assert "torch==" in " ".join(printed[0])  # satisfied by the torch installed from PyTorch's index


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore starts by excluding everything (.venv holds GBs)"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = set()
    for stage in stages().values():
        for copy in stage.all("COPY"):
            words = [w for w in copy.text.split() if not w.startswith("--")]
            if not copy.text.startswith("--from"):
                sources.update(w.rstrip("/") for w in words[:-1])
    assert sources == allowed, f"COPY sources {sorted(sources)} vs allowed {sorted(allowed)}"
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"


# ---------------------------------------------------------------------------- compose


def test_compose_and_the_dockerfile_agree() -> None:
    all_stages = stages()
    image_env = stage_env(all_stages, "api")
    services = compose()["services"]
    api, trainer = services["api"], services["trainer"]
    env = service_env(api)
    # The port the server listens on is the one published, exposed and health-checked.
    assert env.get("VAE_PORT", image_env["VAE_PORT"]) == image_env["VAE_PORT"] == "8000"
    [port] = api["ports"]
    assert str(port["target"]) == image_env["VAE_PORT"] and port["host_ip"] == "127.0.0.1"
    # The same health check, on the liveness endpoint.
    _, command = healthcheck(all_stages["api"])
    assert api["healthcheck"]["test"] == ["CMD", *command]
    from service.healthcheck import url

    assert url().endswith(":8000/healthz")
    # One store path; the API mounts it read-only, the trainer read-write, the same volume.
    assert env["VAE_MODEL_STORE"] == image_env["VAE_MODEL_STORE"] == service_env(trainer)["VAE_MODEL_STORE"]
    [api_store] = [v for v in api["volumes"] if v["target"] == STORE]
    [trainer_store] = [v for v in trainer["volumes"] if v["target"] == STORE]
    assert api_store["read_only"] is True and not trainer_store.get("read_only", False)
    assert api_store["type"] == trainer_store["type"] == "volume"
    assert api_store["source"] == trainer_store["source"] in compose()["volumes"]
    # The build targets exist.
    assert api["build"]["target"] == "api" and trainer["build"]["target"] == "trainer"
    assert {api["build"]["target"], trainer["build"]["target"]} <= set(all_stages)
    # docker stop waits longer than the server drains, so draining is never cut short.
    graceful = float(env.get("VAE_GRACEFUL_TIMEOUT", image_env["VAE_GRACEFUL_TIMEOUT"]))
    assert duration_seconds(api["stop_grace_period"]) > graceful + 5
    assert api.get("stop_signal", "SIGTERM") == "SIGTERM"
    # Production basics.
    assert api["restart"] in ("unless-stopped", "always", "on-failure")
    limits = api["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0 and limits["memory"]
    # torch threads follow the CPU limit (torch counts the host's cores, not the limit's).
    assert env["VAE_TORCH_THREADS"] == str(limits["cpus"])
    assert api.get("read_only") is True and "ALL" in api["cap_drop"]
    # The trainer is a one-shot job, only run when asked for.
    assert trainer["profiles"] == ["train"] and trainer["restart"] == "no"
    assert "command" not in api and "entrypoint" not in api, "the image's own CMD runs"


def test_the_gpu_override_reserves_one_gpu_for_both() -> None:
    gpu = compose(COMPOSE_GPU)["services"]
    assert set(gpu) == {"api", "trainer"}
    for name, service in gpu.items():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
        assert re.fullmatch(r"cu\d+", service["build"]["args"]["TORCH_VARIANT"]), name
        assert service["image"].endswith("-cuda"), f"{name}: a CUDA build must not overwrite the CPU tag"
    assert service_env(gpu["api"])["VAE_DEVICE"] == "cuda"
    assert service_env(gpu["trainer"])["VAE_TRAIN_DEVICE"] == "cuda"
    assert "TORCH_VARIANT" in [a.text.split("=")[0] for a in stages()["builder"].all("ARG")]


def test_the_scale_override_and_its_balancer_agree_with_the_app(api: InProcess) -> None:
    """docker-compose.scale.yml and deploy/haproxy/haproxy.cfg: the balancer reaches the
    replicas on the image's port, checks a real readiness route, publishes what it binds,
    and the replicas publish nothing of their own."""
    scale = compose(COMPOSE_SCALE)["services"]
    base = compose(COMPOSE)["services"]
    cfg = HAPROXY_CFG.read_text()
    assert scale["api"]["ports"] == [] and "replicas" in scale["api"]["deploy"]
    [template] = re.findall(r"^\s*server-template \S+ (\d+) (\S+):(\d+)\s*$", cfg, re.M)
    assert template[1] == "api" and template[2] == stage_env(stages(), "api")["VAE_PORT"]
    [check] = re.findall(r"^\s*option httpchk GET (\S+)\s*$", cfg, re.M)
    assert check == "/readyz" and api.get(check).status_code == 200
    [bind] = re.findall(r"^\s*bind :(\d+)\s*$", cfg, re.M)
    [published] = scale["lb"]["ports"]
    assert str(published["target"]) == bind
    assert published["published"] == base["api"]["ports"][0]["published"]
    assert published["host_ip"] == base["api"]["ports"][0]["host_ip"] == "127.0.0.1"
    [mount] = scale["lb"]["volumes"]
    assert (ROOT / mount["source"]).resolve() == HAPROXY_CFG and mount["read_only"]
    # The balancer must wait longer for an answer than the service lets a request run.
    settings = make_settings(ROOT / "model_store")
    server_timeout = duration_seconds(re.search(r"^\s*timeout server (\S+)", cfg, re.M).group(1))
    assert server_timeout > settings.request_timeout_s


def test_the_balancer_stops_slow_clients_and_names_the_others_to_the_replicas() -> None:
    """Slow clients (issue 25): HAProxy gives a request (headers, and the body up to a buffer)
    no longer than a replica gives a body, answers that 408 in the service's problem format,
    replaces any X-Forwarded-For a client sent with the peer's address, and the replicas
    believe that header, so that their per-client share counts clients, not the balancer."""
    cfg = HAPROXY_CFG.read_text()
    settings = make_settings(ROOT / "model_store")
    request_timeout = duration_seconds(re.search(r"^\s*timeout http-request (\S+)", cfg, re.M).group(1))
    client_timeout = duration_seconds(re.search(r"^\s*timeout client (\S+)", cfg, re.M).group(1))
    assert request_timeout <= settings.body_timeout_s and client_timeout <= settings.body_timeout_s
    assert re.search(r"^\s*option http-buffer-request\s*$", cfg, re.M)
    [error] = re.findall(
        r"^\s*http-error status 408 content-type (\S+) string '([^']+)' hdr Connection close$", cfg, re.M
    )
    assert error[0] == "application/problem+json"
    problem = json.loads(error[1])
    assert problem["status"] == 408 and problem["type"] == "urn:vae:problem:body-timeout"
    lines = [line.strip() for line in cfg.splitlines()]
    assert lines.index("http-request del-header X-Forwarded-For") > lines.index("frontend api")
    assert "option forwardfor" in lines
    scale = compose(COMPOSE_SCALE)["services"]
    assert service_env(scale["api"])["VAE_FORWARDED_ALLOW_IPS"] and not scale["api"]["ports"]


def test_every_variable_set_is_one_the_programs_read() -> None:
    """A misspelt VAE_ variable would be ignored silently: every one the Dockerfile or compose
    sets must be read by vae-serve (its options' env names) or by vae-train."""
    served, trained = served_variables(), trained_variables()
    all_stages = stages()
    services = {**compose()["services"]}
    gpu = compose(COMPOSE_GPU)["services"]
    scale = compose(COMPOSE_SCALE)["services"]
    for name, known in (("api", served), ("trainer", trained)):
        names = (
            set(stage_env(all_stages, name)) | set(service_env(services[name])) | set(service_env(gpu[name]))
        )
        names |= set(service_env(scale.get(name, {})))
        unknown = {n for n in names if n.startswith("VAE_")} - known
        assert not unknown, f"{name} sets {sorted(unknown)}, which {name} does not read"


# ---------------------------------------------------------------------------- the real thing


def image_command_and_environment(store: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """The API container's command and environment (Dockerfile ENV, then compose environment
    with its defaults), with the image's paths mapped to this checkout: /opt/venv to this
    virtual environment, /app/model_store to a test store, and VAE_PORT to a free port."""
    all_stages = stages()
    api_service = compose()["services"]["api"]
    image_env = stage_env(all_stages, "api")
    env = clean_env()
    for key, value in {**image_env, **service_env(api_service)}.items():
        value = value.replace("$PATH", env.get("PATH", ""))  # Docker expands $VAR in ENV
        env[key] = value.replace(VENV, sys.prefix)
    assert env["VAE_MODEL_STORE"] == STORE
    env["VAE_MODEL_STORE"] = str(store)
    env["VAE_PORT"] = str(port)
    entrypoint = without_init(exec_form(all_stages["api"].last("ENTRYPOINT").text))
    command = api_service.get("command") or exec_form(all_stages["api"].last("CMD").text)
    argv = [*entrypoint, *command]
    program = shutil.which(argv[0], path=env["PATH"])
    assert program and program.startswith(sys.prefix), f"{argv[0]} not found in this environment"
    return [program, *argv[1:]], env


@pytest.mark.slow
def test_the_server_runs_with_exactly_the_image_command_and_environment(
    tiny_store: Path, tmp_path: Path
) -> None:
    port = free_port()
    argv, env = image_command_and_environment(tiny_store, port)
    workdir = tmp_path / "app"  # WORKDIR /app: nothing of the repository is there
    workdir.mkdir()
    served = start(argv, env, tmp_path / "serve.log", port, cwd=workdir)
    try:
        _, check = healthcheck(stages()["api"])
        check = [shutil.which(check[0], path=env["PATH"]) or check[0], *check[1:]]
        deadline = time.monotonic() + 180
        while True:  # what Docker does: run the HEALTHCHECK command until it succeeds
            result = subprocess.run(check, env=env, cwd=workdir, capture_output=True, text=True, timeout=30)
            if result.returncode == 0:
                break
            assert served.process.poll() is None, served.log()
            assert time.monotonic() < deadline, served.log() + result.stderr
            time.sleep(0.2)
        assert f"healthy: GET http://127.0.0.1:{port}/healthz answered 200" in result.stdout
        wait_ready(served)
        ready = subprocess.run(
            [*check, "--ready"], env=env, cwd=workdir, capture_output=True, text=True, timeout=30
        )
        assert f"healthy: GET http://127.0.0.1:{port}/readyz answered 200" in ready.stdout, ready.stderr
        with httpx.Client(base_url=served.url, timeout=30) as http:
            assert http.get("/readyz").json()["models"] == ["tiny", "tiny-2d"]
            sampled = http.post("/sample", json={"n": 2, "seed": 1})
            assert sampled.status_code == 200 and sampled.json()["version"] == "v1"
            # Compose sets no API key: the reload endpoint is off, SIGHUP is the trigger.
            assert http.post("/admin/reload").status_code == 403
        log = served.log()
        assert f"Uvicorn running on http://0.0.0.0:{port}" in log  # VAE_HOST and VAE_PORT
        assert "SIGHUP reloads new model versions" in log
        assert clean_exit(served.stop()), served.log()
        assert "Application shutdown complete" in served.log()
        for probe in (check, [*check, "--ready"]):
            down = subprocess.run(probe, env=env, cwd=workdir, capture_output=True, text=True, timeout=30)
            assert down.returncode == 1 and "unhealthy: GET" in down.stderr
    finally:
        served.kill()


# ---------------------------------------------------------------------------- helpers


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _arg_default(name: str) -> str:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith(f"ARG {name}="):
            return line.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}= in the Dockerfile")
