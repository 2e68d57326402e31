"""The service's layers, as its folders show them, and that no module reaches above its own.

    service/settings, errors, metrics, artifact   foundations: used by every layer
    service/model/   the model runtime: loading, batching, inference, reload, the app's state
    service/edge/    the HTTP edge: middlewares for admission, the API key, body size, metrics
    service/api/     the API: routes, schemas, request inputs, responses, the explorer page
    service/app, warmup, cli                      the app wired together, and its command

Every import counts, also those made inside functions or only for type checking: an import
cycle hidden behind TYPE_CHECKING is still two modules that cannot be understood apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {
    "service.settings": 0,
    "service.errors": 0,
    "service.metrics": 0,
    "service.artifact": 0,
    "service.healthcheck": 0,
    "service.model": 1,
    "service.edge": 2,
    "service.api": 3,
    "service.app": 4,
    "service.warmup": 4,
    "service.cli": 5,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, prefixes: tuple[str, ...]) -> set[str]:
    """The modules under `prefixes` that a file imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from service.model import faults` imports service.model.faults
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.startswith(prefixes) and is_module(name)}
    return found


def is_module(name: str) -> bool:
    """False for `service.errors.one_line` (a name in a module); third-party names pass."""
    if name.split(".")[0] not in ("service", "trainer"):
        return True
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def graph(package: str, prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    return {
        module_name(path): imports(path, prefixes) - {module_name(path)}
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def layer(module: str) -> int:
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


SERVICE = graph("service", ("service.",))


def cycle_through(start: str, edges: dict[str, set[str]]) -> list[str] | None:
    """A path start -> ... -> start, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in edges.get(node, ()):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_every_service_module_has_a_layer_and_packages_are_folders() -> None:
    assert {m.split(".")[1] for m in SERVICE if m.count(".") >= 1} >= {"model", "edge", "api"}
    for module in SERVICE:
        if module != "service":
            layer(module)


@pytest.mark.parametrize("module", sorted(m for m in SERVICE if m != "service"))
def test_a_module_uses_only_its_own_layer_and_those_below(module: str) -> None:
    above = {
        imported: layer(imported)
        for imported in SERVICE[module]
        if imported not in ("service",) and layer(imported) > layer(module)
    }
    assert not above, f"{module} (layer {layer(module)}) imports modules of higher layers: {above}"


def test_no_import_cycles_in_the_service() -> None:
    cycles = [c for m in SERVICE if (c := cycle_through(m, SERVICE))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_service_never_imports_the_trainer_and_the_client_neither() -> None:
    service_to_trainer = {m: i for m, i in graph("service", ("trainer",)).items() if i}
    assert not service_to_trainer, f"the artifact is the contract, not trainer code: {service_to_trainer}"
    client = graph("client/vae_client", ("service", "trainer", "torch", "fastapi", "uvicorn", "starlette"))
    leaks = {m: i for m, i in client.items() if i}
    assert not leaks, f"the client must stand alone: {leaks}"


def test_the_trainer_uses_only_the_artifact_module_of_the_service() -> None:
    used = set().union(*graph("trainer", ("service",)).values())
    assert used <= {"service", "service.artifact"}, used
