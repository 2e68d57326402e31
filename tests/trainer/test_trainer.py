"""The trainer end to end on a few hundred images: seconds, not minutes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from service import artifact
from tests.conftest import MNIST_DIR, needs_mnist
from tests.datasets import write_dataset
from trainer import cli
from trainer import train as train_module
from trainer.model import VAEConfig
from trainer.train import TrainConfig, train

TINY = VAEConfig(latent_dim=4, channels=8, hidden=32, blocks=0)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return write_dataset(d, n_train=200, n_test=60)


def tiny_config(data_dir: Path, epochs: int = 2, **kw) -> TrainConfig:
    return TrainConfig(
        dataset="synthetic",
        data_dir=str(data_dir),
        epochs=epochs,
        batch_size=50,
        kl_warmup_epochs=1,
        model=TINY,
        device="cpu",
        **kw,
    )


def toy_cli_args(data_dir: Path, store: Path, workdir: Path, iwae_k: int) -> list[str]:
    """vae-train's arguments for a two-epoch run of a tiny model on the synthetic data."""
    options = {
        "--name": "toy", "--dataset": "synthetic", "--data-dir": data_dir, "--epochs": 2,
        "--batch-size": 50, "--latent-dim": 3, "--channels": 8, "--hidden": 32, "--device": "cpu",
        "--out": store, "--workdir": workdir, "--iwae-k": iwae_k,
        # A learned prior too, at a size that trains in about a second.
        "--prior-components": 2, "--prior-iterations": 3, "--prior-nll-images": 10,
    }  # fmt: skip
    return [*(str(part) for pair in options.items() for part in pair), "--no-progress"]


def test_cli_trains_evaluates_and_writes_a_loadable_artifact(data_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = CliRunner().invoke(cli.app, toy_cli_args(data_dir, store, tmp_path / "work", iwae_k=20))
    assert result.exit_code == 0, result.output
    path = store / "toy" / "v1"
    model, art = artifact.load(path)
    m = art.manifest
    assert m["latent_dim"] == 3 and m["likelihood"] == "bernoulli"
    assert m["dataset"]["name"] == "synthetic" and len(m["dataset"]["sha256"]) == 64
    test = m["metrics"]["test"]
    assert test["iwae_k"] == 20 and test["images"] == 60
    assert test["iwae_nll"] <= test["neg_elbo"] + 1.0  # the IWAE bound is at least as tight
    assert abs(test["neg_elbo"] - test["reconstruction"] - test["kl"]) < 1e-3
    assert m["training"]["epochs"] == 2 and len(m["training"]["history"]) == 2
    assert {"torch", "numpy", "python"} <= set(m["libraries"])
    for name in (
        "loss_curves.png",
        "prior_samples.png",
        "reconstructions.png",
        "latent_map.png",
        "interpolation.png",
        "kl_per_dim.png",
        "model_card.md",
        "latent_map.json",
    ):
        assert f"report/{name}" in m["files"], name
        assert (path / "report" / name).stat().st_size > 0
    assert (path / "report" / "prior_samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (path / "report" / "model_card.md").read_text()
    assert "IWAE NLL" in card and "(latent_map.png)" in card
    points = json.loads((path / "report" / "latent_map.json").read_text())["points"]
    assert len(points) == 60 and len(points[0]) == 3
    mu, sigma = model.encode(torch.rand(5, 1, 28, 28))
    assert mu.shape == (5, 3) and (sigma > 0).all()

    # A second run of the same command resumes the finished checkpoint and writes v2.
    again = CliRunner().invoke(cli.app, toy_cli_args(data_dir, store, tmp_path / "work", iwae_k=0))
    assert again.exit_code == 0, again.output
    assert artifact.list_versions(store, "toy") == ["v1", "v2"]


def test_cli_reports_missing_data_clearly(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, ["--data-dir", str(tmp_path / "nowhere"), "--no-progress"])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_same_seed_same_weights(data_dir: Path, tmp_path: Path) -> None:
    a, _ = train(tiny_config(data_dir), tmp_path / "a", progress=False)
    b, _ = train(tiny_config(data_dir), tmp_path / "b", progress=False)
    c, _ = train(tiny_config(data_dir, seed=1), tmp_path / "c", progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.decoder.net[0].weight, c.decoder.net[0].weight)


def test_interrupt_leaves_a_checkpoint_and_resume_is_exact(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, ref_state = train(tiny_config(data_dir, epochs=3), tmp_path / "ref", progress=False)

    calls = {"n": 0}
    real_kl_weight = train_module.kl_weight

    def interrupting_kl_weight(*args):
        calls["n"] += 1
        if calls["n"] == 6:  # a Ctrl-C in the middle of the second epoch (4 steps per epoch)
            raise KeyboardInterrupt
        return real_kl_weight(*args)

    monkeypatch.setattr(train_module, "kl_weight", interrupting_kl_weight)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data_dir, epochs=3), tmp_path / "run", progress=False)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["state"]["epoch"] == 1  # the last completed epoch, intact

    monkeypatch.setattr(train_module, "kl_weight", real_kl_weight)
    resumed, state = train(tiny_config(data_dir, epochs=3), tmp_path / "run", progress=False)
    assert state.epoch == 3 and len(state.history) == 3
    for (name, pa), pb in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert [r["loss"] for r in state.history] == [r["loss"] for r in ref_state.history]


def test_resume_refuses_a_different_config(data_dir: Path, tmp_path: Path) -> None:
    train(tiny_config(data_dir, epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(SystemExit, match="different config"):
        train(tiny_config(data_dir, epochs=1, lr=5e-4), tmp_path / "run", progress=False)


@needs_mnist
def test_trains_on_real_mnist_digits(tmp_path: Path) -> None:
    cfg = TrainConfig(
        dataset="mnist",
        data_dir=str(MNIST_DIR),
        epochs=2,
        batch_size=100,
        model=TINY,
        limit_train=500,
        limit_test=200,
        kl_warmup_epochs=1,
        device="cpu",
    )
    _, state = train(cfg, tmp_path, progress=False)
    # Real digits are far from uniform noise: even a tiny model learns quickly.
    assert state.history[-1]["test_neg_elbo"] < state.history[0]["test_neg_elbo"] < 544.0
