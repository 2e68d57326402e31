"""The OpenAPI document, as exact as the schema language allows about what this server does.

FastAPI derives it from the routes and schemas; this module adds what only the running
configuration knows, so that a request the document admits is one the server can accept
(and schemathesis' checks, tests/service/test_openapi.py, find no difference):
- the API-key schemes, on the keyed operations, only when a key is configured;
- the operator's limits (VAE_MAX_IMAGES, VAE_MAX_SAMPLES) as maxItems and maximum;
- every error response as application/problem+json.
Operation ids are the route functions' names in camelCase (`encode`, `samplePng`), so that
generated clients get stable, readable calls."""

from __future__ import annotations

from typing import Any

from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from service.edge.auth import SECURITY_SCHEMES
from service.settings import Settings


def operation_id(route: APIRoute) -> str:
    """`sample_png` -> `samplePng`: the route function's name, the id generated clients use."""
    head, *rest = route.name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def document(
    routes: list[BaseRoute], settings: Settings, *, title: str, version: str, description: str
) -> dict[str, Any]:
    schema = get_openapi(title=title, version=version, description=description, routes=routes)
    _problem_json_errors(schema)
    _limits(schema, settings)
    _security(schema, keyed=settings.api_key is not None)
    return schema


def _operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [op for path_item in schema.get("paths", {}).values() for op in path_item.values()]


def _problem_json_errors(schema: dict[str, Any]) -> None:
    """Documents every error response as what it is: application/problem+json, one schema."""
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for operation in _operations(schema):
        for code, response in operation.get("responses", {}).items():
            if str(code).isdigit() and int(code) >= 400:
                response["content"] = problem
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's default 422 shape, which we replace
        components.pop(unused, None)


def _limits(schema: dict[str, Any], settings: Settings) -> None:
    """The configured request limits, where the schemas can only say "at least one". The
    image body is inlined in its operations (service.api.routes), so every schema counts."""
    most = {"images": settings.max_images, "pixels": settings.max_images, "z": settings.max_images}
    for node in _schemas(schema):
        title = node.get("title")
        if title in ("ImageRequest", "ImageUpload", "DecodeRequest"):
            for field, props in node["properties"].items():
                if field in most:
                    props["maxItems"] = most[field]
        elif title == "SampleRequest":
            node["properties"]["n"]["maximum"] = settings.max_samples
    for operation in _operations(schema):
        for parameter in operation.get("parameters", []):
            if parameter["name"] == "n" and parameter["in"] == "query":
                parameter["schema"]["maximum"] = settings.max_samples


def _schemas(node: Any) -> list[dict[str, Any]]:
    """Every object schema in the document: each dict with `properties`."""
    found: list[dict[str, Any]] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("properties"), dict):
                found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _security(schema: dict[str, Any], *, keyed: bool) -> None:
    """The keyed operations' requirement and its schemes when a key is set; without one, no
    operation needs a key, and a document that said otherwise would be wrong."""
    if keyed:
        schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        return
    for operation in _operations(schema):
        operation.pop("security", None)
        operation.get("responses", {}).pop("401", None)
