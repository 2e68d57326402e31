"""Shared fixtures. Tests stay on loopback, except two that install packages as a user would
(tests/client: the client alone from PyPI, the TypeScript tools from npm; each skips, saying
so, where its registry is unreachable). Real MNIST is used when ../shared has it."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from service import artifact
from service.app import create_app
from tests.service_support import Direct, InProcess, make_settings
from trainer.export import classifier_to_torchscript, to_torchscript, with_prior
from trainer.model import VAE, VAEConfig
from trainer.prior import ClassMixtureMap, MixtureMap

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
HAS_MNIST = (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file() or (
    MNIST_DIR / "t10k-images-idx3-ubyte"
).is_file()
SHIPPED_STORE = ROOT / "model_store"

needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason=f"real MNIST not found in {MNIST_DIR}")


def random_mixture(latent_dim: int, seed: int) -> MixtureMap:
    """A random three-component mixture, well away from N(0, I): a learned prior for tests."""
    g = torch.Generator().manual_seed(seed)
    return MixtureMap(
        weights=torch.tensor([0.5, 0.3, 0.2]),
        means=2 * torch.randn(3, latent_dim, generator=g),
        covariances=0.04 * torch.eye(latent_dim).expand(3, latent_dim, latent_dim),
    ).eval()


def synthetic_manifest(latent_dim: int) -> dict[str, Any]:
    """The manifest fields of a test artifact that no test varies."""
    return {
        "created_at": "2026-01-01T00:00:00Z",
        "image_shape": [1, 28, 28],
        "latent_dim": latent_dim,
        "likelihood": "bernoulli",
        "dataset": {"name": "synthetic", "sha256": None},
        "metrics": {},
    }


def make_artifact(
    store: Path,
    name: str,
    latent_dim: int,
    seed: int = 0,
    version: str | None = None,
    report_files: dict[str, bytes] | None = None,
    learned_prior: bool = False,
    classes: int = 0,
    **manifest_extra,
) -> artifact.Artifact:
    """An untrained (randomly initialised) but fully valid artifact: fast, and enough to test
    everything that does not depend on what the model learned. With learned_prior, it also
    has a random three-component mixture as its learned (and default) prior: far from N(0, I).
    With classes, the learned prior is class-conditional instead (two random components per
    class, well apart), and a random linear classifier ships with it (format 3 in full)."""
    torch.manual_seed(seed)
    vae = VAE(VAEConfig(latent_dim=latent_dim, channels=8, hidden=32, blocks=0))
    model = to_torchscript(vae)
    classifier = None
    if classes:
        g = torch.Generator().manual_seed(seed)
        mixture = ClassMixtureMap(
            class_shares=torch.arange(1, classes + 1, dtype=torch.float64),
            weights=torch.full((classes, 2), 0.5),
            means=3 * torch.randn(classes, 2, latent_dim, generator=g),
            covariances=0.04 * torch.eye(latent_dim).expand(classes, 2, latent_dim, latent_dim),
        )
        model = with_prior(model, mixture, conditional=True)
        linear = nn.Linear(28 * 28, classes)
        with torch.no_grad():  # large weights on the centred image: verdicts that differ from image to image
            linear.weight.copy_(SPREAD * torch.randn(classes, 28 * 28, generator=g))
            linear.bias.zero_()
        classifier = classifier_to_torchscript(nn.Sequential(nn.Flatten(), _Centred(), linear))
        names = [f"c{i}" for i in range(classes)]
        manifest_extra = {
            "priors": {
                "standard": {"description": "N(0, I)"},
                "learned": {"description": "random, per class", "conditional": True},
            },
            "default_prior": "learned",
            "classes": [
                {"index": i, "name": name, "train_share": round((i + 1) / sum(range(1, classes + 1)), 4)}
                for i, name in enumerate(names)
            ],
            "classifier": {"file": artifact.CLASSIFIER_FILE, "description": "random", "test_accuracy": 0.1},
            **manifest_extra,
        }
    elif learned_prior:
        model = with_prior(model, random_mixture(latent_dim, seed))
        manifest_extra = {
            "priors": {"standard": {"description": "N(0, I)"}, "learned": {"description": "random"}},
            "default_prior": "learned",
            **manifest_extra,
        }
    manifest = {**synthetic_manifest(latent_dim), **manifest_extra}
    return artifact.write_artifact(
        store, name, model, manifest, report_files=report_files, version=version, classifier=classifier
    )


SPREAD = 6.0  # the random test classifier's weight scale


class _Centred(nn.Module):
    """Each image minus its mean: an untrained decoder's images differ from each other by little
    more than that, and the test classifier should tell them apart."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(1, keepdim=True)


class _Format2Model(nn.Module):
    """A model as format 2 shipped it: encode, decode and a one-argument prior(u) -> z, the
    noise already scaled by the temperature (the contract before format 3)."""

    def __init__(self, base: torch.jit.ScriptModule, mixture: MixtureMap) -> None:
        super().__init__()
        self.encoder, self.decoder, self.mixture = base.encoder, base.decoder, mixture
        self.latent_dim = int(base.latent_dim)

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))

    @torch.jit.export
    def prior(self, u: torch.Tensor) -> torch.Tensor:
        return self.mixture(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encoder(x)[0])


def make_format_2_artifact(store: Path, name: str, latent_dim: int, seed: int = 0) -> artifact.Artifact:
    """An artifact as format 2 wrote it: a random learned mixture prior behind prior(u), and a
    manifest with format_version 2 (not among the hashed files, so it can be rewritten)."""
    torch.manual_seed(seed)
    base = to_torchscript(VAE(VAEConfig(latent_dim=latent_dim, channels=8, hidden=32, blocks=0)))
    model = torch.jit.script(_Format2Model(base, random_mixture(latent_dim, seed)).eval())
    manifest = {
        **synthetic_manifest(latent_dim),
        "priors": {"standard": {"description": "N(0, I)"}, "learned": {"description": "random"}},
        "default_prior": "learned",
    }
    art = artifact.write_artifact(store, name, model, manifest)
    written = dict(art.manifest, format_version=2)
    (art.path / artifact.MANIFEST_FILE).write_text(json.dumps(written))
    return artifact.Artifact(art.path, written)


def synthetic_latent_map(latent_dim: int, points_per_class: int = 30, seed: int = 0) -> dict[str, bytes]:
    """report/latent_map.json as the trainer writes it, with made-up points: ten classes in
    clusters around a circle. For latent_dim > 2 the projection axes are the first two unit
    vectors (orthonormal, as the trainer's PCA axes are)."""
    rng = random.Random(seed)
    points = []
    for label in range(10):
        cx, cy = 1.6 * math.cos(label * math.pi / 5), 1.6 * math.sin(label * math.pi / 5)
        for _ in range(points_per_class):
            points.append([round(rng.gauss(cx, 0.35), 4), round(rng.gauss(cy, 0.35), 4), label])
    axes = [[1.0 if i == k else 0.0 for i in range(latent_dim)] for k in (0, 1)]
    data = {
        "description": "synthetic test clusters",
        "projection": None if latent_dim == 2 else {"axes": axes},
        "class_names": [str(k) for k in range(10)],
        "points": points,
    }
    return {"latent_map.json": json.dumps(data).encode()}


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with two small random models: `tiny` (latent_dim 8) and `tiny-2d`, which
    carries a synthetic latent map."""
    store = tmp_path_factory.mktemp("store")
    make_artifact(store, "tiny", latent_dim=8)
    make_artifact(store, "tiny-2d", latent_dim=2, seed=1, report_files=synthetic_latent_map(2))
    return store


@pytest.fixture(scope="session")
def classes_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with one format-3 model in full: `tiny-classes` (latent_dim 6, three classes
    c0, c1, c2, a class-conditional learned prior and a shipped classifier)."""
    store = tmp_path_factory.mktemp("classes-store")
    make_artifact(store, "tiny-classes", latent_dim=6, seed=3, classes=3)
    return store


# The default in-process app and direct model calls over `tiny_store`; a module that needs other
# settings defines its own `api` fixture, which takes precedence.
@pytest.fixture(scope="module")
def api(tiny_store: Path) -> Iterator[InProcess]:
    served = InProcess(create_app(make_settings(tiny_store)))
    yield served
    served.close()


@pytest.fixture(scope="module")
def tiny(tiny_store: Path) -> Direct:
    return Direct(tiny_store, "tiny")


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """The container tests go last: their images build in the background meanwhile."""
    containers = [item for item in items if item.get_closest_marker("containers")]
    items[:] = [item for item in items if not item.get_closest_marker("containers")] + containers


def pytest_collection_finish(session: pytest.Session) -> None:
    """Once -m and -k have deselected what they do: if container tests remain, their images
    start building now, in the background at idle priority, while the other tests run
    (tests/container_support.py)."""
    wanted = any(item.get_closest_marker("containers") for item in session.items)
    if session.config.option.collectonly or not wanted:
        return
    # The name the test modules import it by (tests/ is on sys.path): one module, one build.
    from container_support import start_prebuild

    start_prebuild()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests import reliability

    reliability.write_outputs()
