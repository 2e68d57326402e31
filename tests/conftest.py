"""Shared fixtures. Tests never touch the network; real MNIST is used when ../shared has it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service import artifact
from trainer.export import to_torchscript
from trainer.model import VAE, VAEConfig

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
HAS_MNIST = (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file() or (
    MNIST_DIR / "t10k-images-idx3-ubyte"
).is_file()
SHIPPED_STORE = ROOT / "model_store"

needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason=f"real MNIST not found in {MNIST_DIR}")


def make_artifact(
    store: Path, name: str, latent_dim: int, seed: int = 0, version: str | None = None, **manifest_extra
) -> artifact.Artifact:
    """An untrained (randomly initialised) but fully valid artifact: fast, and enough to test
    everything that does not depend on what the model learned."""
    torch.manual_seed(seed)
    vae = VAE(VAEConfig(latent_dim=latent_dim, channels=8, hidden=32, blocks=0))
    manifest = {
        "created_at": "2026-01-01T00:00:00Z",
        "image_shape": [1, 28, 28],
        "latent_dim": latent_dim,
        "likelihood": "bernoulli",
        "dataset": {"name": "synthetic", "sha256": None},
        "metrics": {},
        **manifest_extra,
    }
    return artifact.write_artifact(store, name, to_torchscript(vae), manifest, version=version)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with two small random models: `tiny` (latent_dim 8) and `tiny-2d`."""
    store = tmp_path_factory.mktemp("store")
    make_artifact(store, "tiny", latent_dim=8)
    make_artifact(store, "tiny-2d", latent_dim=2, seed=1)
    return store
