"""A model's latent map: the posterior means of test digits, by class, that its trainer left
in the artifact's report (report/latent_map.json). The explorer page draws it live.

The file is read once, when the model loads, from the verified artifact (the bytes are
checked against the manifest's sha256 as they are read), validated, serialised once, and
then served as is by GET /models/{name}/latent-map. Clients name a model, never a path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson
from pydantic import BaseModel, Field, FiniteFloat, ValidationError

from service import artifact

log = logging.getLogger("service.model.latent_map")

DEFAULT_PATH = "report/latent_map.json"


class LatentMapProjection(BaseModel):
    axes: list[list[FiniteFloat]] = Field(
        min_length=2,
        max_length=2,
        description="Two orthonormal axes in latent space, latent_dim numbers each: the map's "
        "point (x, y) stands for z = x * axes[0] + y * axes[1].",
    )


class LatentMapData(BaseModel):
    """report/latent_map.json as the trainer writes it into the artifact."""

    description: str = ""
    projection: LatentMapProjection | None = Field(
        description="null when latent_dim is 2 (the coordinates are z itself), else the projection."
    )
    class_names: list[str] = Field(min_length=1)
    points: list[tuple[FiniteFloat, FiniteFloat, int]] = Field(
        description="[x, y, label] per test digit: its posterior mean, label an index into class_names."
    )


@dataclass(frozen=True)
class LatentMap:
    body: bytes  # the JSON answer (service.api.schemas.LatentMapResponse), serialised once at load
    points: int
    projected: bool


def read(art: artifact.Artifact) -> LatentMap | None:
    """The artifact's latent map, or None when it has none or an unusable one (logged: the
    map is for people, so a broken one must not stop the model from being served).
    Raises ArtifactError when the file changed since the artifact was verified."""
    report = art.manifest.get("report")
    rel = report.get("latent_map_data") if isinstance(report, dict) else None
    data = artifact.read_listed_file(art, rel if isinstance(rel, str) else DEFAULT_PATH)
    if data is None:
        return None
    try:
        parsed = LatentMapData.model_validate_json(data)
        _check(parsed, art.latent_dim)
    except (ValidationError, ValueError) as exc:
        log.warning(
            "model %s %s: not serving its latent map, which is malformed: %s", art.name, art.version, exc
        )
        return None
    body = orjson.dumps(
        {
            "model": art.name,
            "version": art.version,
            "latent_dim": art.latent_dim,
            **parsed.model_dump(),
        }
    )
    return LatentMap(body=body, points=len(parsed.points), projected=parsed.projection is not None)


def _check(parsed: LatentMapData, latent_dim: int) -> None:
    """What the schema alone cannot say: the coordinates must map back into this model's
    latent space, and every label must name a class."""
    if parsed.projection is None and latent_dim != 2:
        raise ValueError(f"no projection, but latent_dim is {latent_dim}: the points cannot be latents")
    if parsed.projection is not None and any(len(axis) != latent_dim for axis in parsed.projection.axes):
        raise ValueError(f"the projection axes must have latent_dim = {latent_dim} numbers each")
    classes = len(parsed.class_names)
    bad = next((p for p in parsed.points if not 0 <= p[2] < classes), None)
    if bad is not None:
        raise ValueError(f"point {list(bad)} has a label outside the {classes} class names")


def of(model: object) -> LatentMap | None:
    """The map a loaded model carries; test doubles and other runtimes may carry none."""
    found = getattr(model, "latent_map", None)
    return found if isinstance(found, LatentMap) else None
