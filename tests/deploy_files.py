"""Reads the deployment files the way Docker and Compose do, as far as the tests need: the
Dockerfile's stages and instructions, and the compose files with their ${VAR:-default}s."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
COMPOSE_SCALE = ROOT / "docker-compose.scale.yml"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    text: str  # the rest of the line, continuations joined


@dataclass
class Stage:
    name: str
    base: str  # the image or the stage it starts FROM
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def instructions(text: str) -> list[Instruction]:
    """Joins `\\` continuations and drops comments and blank lines."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append(Instruction(keyword.upper(), rest.strip()))
    return out


def stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """Every stage by name, in order (the last is what `docker build` gives without --target)."""
    result: dict[str, Stage] = {}
    current: Stage | None = None
    for ins in instructions(path.read_text()):
        if ins.keyword == "FROM":
            words = ins.text.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage{len(result)}"
            current = Stage(name, words[0])
            result[name] = current
        elif current is not None:
            current.instructions.append(ins)
    return result


def exec_form(text: str) -> list[str]:
    """CMD/ENTRYPOINT/HEALTHCHECK CMD in JSON (exec) form; the shell form is refused on purpose:
    it runs under /bin/sh, which does not pass SIGTERM on to the server."""
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def env_pairs(text: str) -> dict[str, str]:
    """`ENV A=1 B="two words"` -> {"A": "1", "B": "two words"}."""
    pairs = {}
    for word in shlex.split(text):
        key, sep, value = word.partition("=")
        assert sep, f"ENV {text!r}: use the KEY=value form"
        pairs[key] = value
    return pairs


def stage_env(all_stages: dict[str, Stage], name: str) -> dict[str, str]:
    """ENV as the stage sees it: its parents' first, then its own (values may use $VAR)."""
    stage = all_stages[name]
    env = stage_env(all_stages, stage.base) if stage.base in all_stages else {}
    for ins in stage.all("ENV"):
        for key, value in env_pairs(ins.text).items():
            env[key] = value
    return env


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """(options, command) of the stage's HEALTHCHECK."""
    ins = stage.last("HEALTHCHECK")
    assert ins is not None, f"stage {stage.name} has no HEALTHCHECK"
    options_text, _, command = ins.text.partition("CMD ")
    options = dict(opt.lstrip("-").split("=", 1) for opt in options_text.split())
    return options, exec_form(command)


def without_init(entrypoint: list[str]) -> list[str]:
    """ENTRYPOINT ["tini", ..., "--", program...] -> [program...]: what tini runs."""
    assert entrypoint[0] == "tini" and "--" in entrypoint, entrypoint
    return entrypoint[entrypoint.index("--") + 1 :]


# ---------------------------------------------------------------------------- compose

VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$\$")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and $$, applied to
    every string in the file, as `docker compose config` would with this environment."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg") or ""
        current = env.get(name)
        if op in (":-", "-"):
            unset = current is None or (op == ":-" and current == "")
            return arg if unset else current  # type: ignore[return-value]
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise ValueError(f"compose needs {name}: {arg}")
            return current
        if op in (":+", "+"):
            return arg if current else ""
        return current or ""

    return VARIABLE.sub(one, value)


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: `!reset` (drop what the base file set) and `!override`
    (replace it instead of merging). Either way the value is read as written."""


def _as_written(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _as_written)


def compose(
    path: Path = COMPOSE, env: dict[str, str] | None = None, keep_variables: bool = False
) -> dict[str, Any]:
    """The compose file as Compose reads it with `env` (default: no variables set), or as
    written, its ${VAR}s kept."""
    written = yaml.load(path.read_text(), Loader=ComposeLoader)
    return written if keep_variables else interpolate(written, env or {})


def service_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def duration_seconds(text: str) -> float:
    """Compose durations: 1m30s, 40s, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---------------------------------------------------------------------------- the programs


def served_variables() -> set[str]:
    """Every VAE_* variable vae-serve reads (its options name their env variable)."""
    from service.cli import build_parser

    names: set[str] = set()
    for action in build_parser()._actions:
        names.update(re.findall(r"env (VAE_[A-Z_]+)", action.help or ""))
    return names


def _train_parameters() -> list[Any]:
    import typer

    from trainer.cli import app as train_app

    return typer.main.get_command(train_app).params


def trained_variables() -> set[str]:
    """Every VAE_* variable vae-train reads."""
    return {p.envvar for p in _train_parameters() if isinstance(p.envvar, str)}


def trainer_options() -> set[str]:
    """Every --option of vae-train."""
    return {o for p in _train_parameters() for o in [*p.opts, *p.secondary_opts]}


def image_uid() -> int:
    """The UID the Dockerfile's runtime stage creates and runs as."""
    found = re.findall(r"useradd [^\n]*--uid (\d+)", DOCKERFILE.read_text())
    assert len(found) == 1, found
    return int(found[0])


# ---------------------------------------------------------------------------- kubernetes


def render(overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/kubernetes/overlays/<overlay>`: its documents, in order. Skips
    where kubectl (which carries kustomize) is not installed."""
    import pytest

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it carries kustomize): the manifests cannot be rendered")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one document of that kind (and name)."""
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]
