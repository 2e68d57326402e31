"""The learned prior (trainer.prior, trainer.train_prior, trainer.learned_prior): the flow is
invertible with the right log-determinant, training is deterministic and resumes exactly,
and a stage trained on top of an artifact keeps its encoder and decoder bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from service import artifact
from tests.conftest import MNIST_DIR, SHIPPED_STORE, make_artifact, needs_mnist
from tests.datasets import write_dataset
from trainer import cli
from trainer import train_prior as train_prior_module
from trainer.export import SERVING_FORM_TOLERANCE, with_prior
from trainer.learned_prior import StageConfig, add_learned_prior
from trainer.prior import (
    ClassMixtureMap,
    Flow,
    FlowConfig,
    MixtureMap,
    NoiseToLatent,
    rational_quadratic_spline,
)
from trainer.train_prior import MixtureConfig, PriorTrainConfig, fit_mixture, train_prior

TINY_FLOW = FlowConfig(latent_dim=4, couplings=3, hidden=16, bins=5)


def codes(n: int, seed: int = 0) -> torch.Tensor:
    """Two well separated clusters in 4-D: the shape the flow must learn, in miniature."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0, 1.0, -1.0], [-2.0, 0.5, -1.0, 1.0]])
    return centres[torch.randint(0, 2, (n,), generator=g)] + 0.3 * torch.randn(n, 4, generator=g)


def tiny_cfg(epochs: int = 3, **kw) -> PriorTrainConfig:
    return PriorTrainConfig(flow=TINY_FLOW, epochs=epochs, batch_size=64, **kw)


def randomised_flow(cfg: FlowConfig, scale: float = 0.05, seed: int = 0) -> Flow:
    """A flow with small random (non-identity) couplings."""
    flow = Flow(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for coupling in flow.couplings:
            last = coupling.net[-1]
            last.weight.copy_(scale * torch.randn(last.weight.shape, generator=g))
            last.bias.copy_(scale * torch.randn(last.bias.shape, generator=g))
    return flow.eval()


@pytest.mark.parametrize("transform", ["spline", "affine"])
def test_the_flow_inverts_and_its_log_determinant_is_the_jacobians(transform: str) -> None:
    flow = randomised_flow(FlowConfig(latent_dim=6, couplings=4, hidden=16, transform=transform))
    with torch.no_grad():
        flow.shift.copy_(torch.linspace(-1, 1, 6))
        flow.scale.copy_(torch.linspace(0.5, 2, 6))
    z = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)) * 2
    u, log_det = flow.to_noise(z)
    with torch.no_grad():
        assert torch.allclose(NoiseToLatent(flow)(u), z, atol=1e-4)
    for row in (0, 5):
        jacobian = torch.autograd.functional.jacobian(lambda a: flow.to_noise(a)[0], z[row : row + 1])
        expected = torch.slogdet(jacobian.reshape(6, 6))[1]
        assert torch.allclose(log_det[row], expected, atol=1e-3)


def test_the_spline_is_monotone_and_the_identity_outside_its_bound() -> None:
    x = torch.linspace(-6, 6, 500).repeat(3, 1).T.contiguous()  # [500, 3]
    params = torch.randn(500, 3, 14, generator=torch.Generator().manual_seed(0))
    params = params[:1].expand(500, 3, 14)  # one spline per dimension, evaluated on a grid
    y, log_slope = rational_quadratic_spline(x, params, 4.0, inverse=False)
    assert (y[1:] > y[:-1]).all()
    outside = x.abs() >= 4.0
    assert torch.equal(y[outside], x[outside]) and (log_slope[outside] == 0).all()
    back, _ = rational_quadratic_spline(y, params, 4.0, inverse=True)
    assert torch.allclose(back, x, atol=1e-4)


def test_training_is_deterministic_and_learns_the_clusters(tmp_path: Path) -> None:
    train, test = codes(600), codes(200, seed=1)
    a, state = train_prior(tiny_cfg(epochs=4), train, test, tmp_path / "a", progress=False)
    b, _ = train_prior(tiny_cfg(epochs=4), train, test, tmp_path / "b", progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    history = state.history
    assert history[-1]["test_nll"] < history[0]["test_nll"]
    # The fitted density beats N(0, I) on held-out codes of the clusters by a wide margin.
    standard = 0.5 * (test.pow(2).sum(1) + 4 * np.log(2 * np.pi)).mean()
    assert history[-1]["test_nll"] < float(standard) - 1.0


def test_an_interrupted_training_resumes_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, test = codes(600), codes(200, seed=1)
    reference, _ = train_prior(tiny_cfg(epochs=3), train, test, tmp_path / "ref", progress=False)

    real = train_prior_module.mean_log_prob
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # at the end of the second epoch, before its checkpoint
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_prior_module, "mean_log_prob", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train_prior(tiny_cfg(epochs=3), train, test, tmp_path / "run", progress=False)
    monkeypatch.setattr(train_prior_module, "mean_log_prob", real)
    resumed, state = train_prior(tiny_cfg(epochs=3), train, test, tmp_path / "run", progress=False)
    assert state.epoch == 3
    for (name, pa), pb in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name

    with pytest.raises(SystemExit, match="different prior config"):
        train_prior(tiny_cfg(epochs=3, lr=5e-4), train, test, tmp_path / "run", progress=False)


def test_em_finds_the_clusters_deterministically(tmp_path: Path) -> None:
    z = codes(2000)
    cfg = MixtureConfig(components=2, iterations=15)
    mixture, state = fit_mixture(cfg, z, tmp_path / "a", progress=False)
    again, _ = fit_mixture(cfg, z, tmp_path / "b", progress=False)
    assert all(
        torch.equal(a, b)
        for a, b in zip(mixture.state_dict().values(), again.state_dict().values(), strict=True)
    )
    assert state.history[-1] > state.history[0] and len(state.history) == 15
    found = sorted(mixture.means.tolist())
    assert np.allclose(found, [[-2.0, 0.5, -1.0, 1.0], [2.0, 0.0, 1.0, -1.0]], atol=0.1)
    assert np.allclose(sorted(mixture.log_weights.exp().tolist()), [0.5, 0.5], atol=0.05)


def test_em_resumes_where_it_was_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    z = codes(600)
    cfg = MixtureConfig(components=3, iterations=6)
    reference, _ = fit_mixture(cfg, z, tmp_path / "ref", progress=False)
    real = train_prior_module.mixture_log_joint
    calls = {"n": 0}

    def interrupting(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_prior_module, "mixture_log_joint", interrupting)
    with pytest.raises(KeyboardInterrupt):
        fit_mixture(cfg, z, tmp_path / "run", progress=False)
    monkeypatch.setattr(train_prior_module, "mixture_log_joint", real)
    resumed, state = fit_mixture(cfg, z, tmp_path / "run", progress=False)
    assert state.iteration == 6
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(SystemExit, match="different mixture config"):
        fit_mixture(MixtureConfig(components=4, iterations=6), z, tmp_path / "run", progress=False)


def test_the_mixture_map_turns_noise_into_draws_of_the_mixture() -> None:
    weights = torch.tensor([0.6, 0.3, 0.1])
    means = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 4.0]])
    covariances = torch.stack([torch.diag(torch.tensor([0.5, 0.1])), torch.eye(2) * 0.2, torch.eye(2) * 0.05])
    mixture = MixtureMap(weights, means, covariances).eval()
    u = torch.randn(40_000, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = mixture(u)
        nearest = torch.cdist(z, means).argmin(1)
        shares = torch.bincount(nearest, minlength=3).float() / len(z)
        assert torch.allclose(shares, weights, atol=0.01)
        for k in range(3):
            picked = z[nearest == k]
            assert torch.allclose(picked.mean(0), means[k], atol=0.03)
            assert torch.allclose(torch.cov(picked.T), covariances[k], atol=0.03)
        # The exact density: the same as torch.distributions computes.
        dist = torch.distributions.MultivariateNormal(means, covariance_matrix=covariances)
        expected = torch.logsumexp(dist.log_prob(z[:100].unsqueeze(1)) + weights.log(), dim=1)
        assert torch.allclose(mixture.log_prob(z[:100]), expected, atol=1e-4)
        # Deterministic, and the same scripted; a low temperature favours the heaviest component.
        assert torch.equal(torch.jit.script(mixture)(u[:500]), mixture(u[:500]))
        cold = torch.cdist(mixture(0.3 * u), means).argmin(1)
        assert (cold == 0).float().mean() > 0.9
        # Far tails (temperature up to 100 reaches them) stay finite: the bins' ends are clamped.
        extreme = torch.tensor([[-1e3, 0.0], [1e3, 1e3], [0.0, -1e3], [40.0, -40.0]])
        assert torch.isfinite(mixture(extreme)).all()


def test_with_prior_keeps_encoder_and_decoder_and_adds_prior(tmp_path: Path) -> None:
    art = make_artifact(tmp_path, "base", latent_dim=4)
    base, _ = artifact.load(art.path)
    mixture = MixtureMap(torch.tensor([1.0]), torch.zeros(1, 4) + 2, torch.eye(4).unsqueeze(0)).eval()
    model = with_prior(base, mixture)
    x = torch.rand(5, 1, 28, 28)
    z = torch.randn(5, 4)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.encode(x), base.encode(x), strict=True))
        assert torch.equal(model.decode(z), base.decode(z))
        drawn = model.prior(z, torch.ones(5))
        assert torch.equal(drawn, mixture(z)) and drawn.shape == (5, 4)
        assert not hasattr(model, "prior_given")  # one mixture: no classes to draw from


def stage_args(data_dir: Path, store: Path, workdir: Path) -> list[str]:
    options = {
        "--name": "toy", "--data-dir": data_dir, "--out": store, "--workdir": workdir,
        "--prior-components": 2, "--prior-iterations": 3, "--prior-nll-images": 10,
    }  # fmt: skip
    return [*(str(part) for pair in options.items() for part in pair), "--no-progress"]


def test_a_stage_on_top_of_an_artifact_end_to_end(tmp_path: Path) -> None:
    """vae-train --from-artifact: seconds on a tiny model; the new version (format 3) serves the
    base's encoder and decoder bit for bit, adds the class-conditional prior_given(u, y, t) and
    prior(u, t), lists the dataset's classes and records both priors."""
    (tmp_path / "data").mkdir()
    data_dir = write_dataset(tmp_path / "data", n_train=200, n_test=60)
    store = tmp_path / "store"
    base_art = make_artifact(store, "toy", latent_dim=3, dataset={"name": "synthetic", "sha256": None})
    args = [*stage_args(data_dir, store, tmp_path / "work"), "--from-artifact", str(base_art.path)]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert artifact.list_versions(store, "toy") == ["v1", "v2"]
    base, _ = artifact.load(base_art.path)
    model, art = artifact.load(store / "toy" / "v2")
    m = art.manifest
    assert (
        m["format_version"] == 3 and art.priors == ("standard", "learned") and art.default_prior == "learned"
    )
    assert art.conditional and art.classes == tuple(str(k) for k in range(10))
    assert [c["index"] for c in m["classes"]] == list(range(10))
    assert abs(sum(c["train_share"] for c in m["classes"]) - 1) < 1e-3
    assert all(len(c["mean_code"]) == 3 for c in m["classes"] if c["mean_code"] is not None)
    assert not art.has_classifier  # the digit classifier judges MNIST only
    assert (
        m["base"]["version"] == "v1" and m["base"]["model_sha256"] == base_art.manifest["files"]["model.pt"]
    )
    learned = m["priors"]["learned"]
    assert learned["kind"] == "mixture" and learned["fit"]["iterations"] == 3 and learned["conditional"]
    assert learned["fit"]["classes"] == 10
    # The default, confident-draws, needs a classifier of the dataset: synthetic data fits every draw.
    assert learned["codes"] == "draws" and learned["draws_per_image"] == 4
    likelihood = m["metrics"]["prior_likelihood"]
    assert likelihood["images"] == 10 and {"standard_iwae_nll", "learned_iwae_nll"} <= set(likelihood)
    for name in ("prior_comparison.png", "prior_draws.png", "model_card.md"):
        assert (store / "toy" / "v2" / "report" / name).stat().st_size > 0
    assert "## Priors" in (store / "toy" / "v2" / "report" / "model_card.md").read_text()
    x, z = torch.rand(4, 1, 28, 28), torch.randn(4, 3)
    with torch.no_grad():  # the same weights; the decoder in the serving form (the same function)
        assert torch.equal(model.encode(x)[0], base.encode(x)[0])
        assert float((model.decode(z) - base.decode(z)).abs().max()) <= SERVING_FORM_TOLERANCE
        assert model.decoder.original_name == "FastDecoder"
        t = torch.ones(4)
        assert model.prior(z, t).shape == (4, 3) and torch.equal(model.prior(z, t), model.prior(z, t))
        y = torch.tensor([0, 3, 9, -1])
        given = model.prior_given(z, y, t)
        assert given.shape == (4, 3) and torch.equal(given[3], model.prior(z, t)[3])
        assert not torch.equal(given[:3], model.prior(z, t)[:3])
    json.dumps(m)  # the manifest stays plain JSON


def test_a_flow_stage_serves_the_flows_inverse(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    data_dir = write_dataset(tmp_path / "data", n_train=200, n_test=60)
    store = tmp_path / "store"
    base_art = make_artifact(store, "toy", latent_dim=4, dataset={"name": "synthetic", "sha256": None})
    flow_options = [
        "--prior-kind",
        "flow",
        "--prior-epochs",
        "2",
        "--prior-couplings",
        "2",
        "--prior-hidden",
        "8",
        "--prior-codes",
        "means",
    ]
    args = [
        *stage_args(data_dir, store, tmp_path / "work"),
        *flow_options,
        "--from-artifact",
        str(base_art.path),
    ]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    model, art = artifact.load(store / "toy" / "v2")
    learned = art.manifest["priors"]["learned"]
    assert learned["kind"] == "flow" and learned["fit"]["epochs"] == 2 and learned["codes"] == "means"
    assert model.prior(torch.randn(3, 4), torch.ones(3)).shape == (3, 4)
    assert not learned["conditional"]  # a flow has no per-class components
    refused = CliRunner().invoke(
        cli.app, [*args[:-2], "--prior-kind", "gmm", "--from-artifact", str(base_art.path)]
    )
    assert refused.exit_code == 2 and "--prior-kind must be one of mixture, flow" in refused.output
    codes = ["--prior-codes", "modes", "--from-artifact", str(base_art.path)]
    refused = CliRunner().invoke(cli.app, [*args[:-2], *codes])
    assert refused.exit_code == 2 and "--prior-codes must be one of draws, means" in refused.output


def test_a_stage_refuses_data_the_base_was_not_trained_on(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    data_dir = write_dataset(tmp_path / "data", n_train=200, n_test=60)
    store = tmp_path / "store"
    base_art = make_artifact(store, "toy", latent_dim=3, dataset={"name": "mnist", "sha256": "0" * 64})
    args = [*stage_args(data_dir, store, tmp_path / "work"), "--from-artifact", str(base_art.path)]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2
    assert "is not the data toy v1 was trained on" in result.output


def class_mixture(classes: int = 3, k: int = 4, d: int = 5) -> ClassMixtureMap:
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(classes, k, generator=g) + 0.1
    means = 4 * torch.randn(classes, k, d, generator=g)
    a = torch.randn(classes, k, d, d, generator=g) * 0.3
    covariances = a @ a.transpose(-1, -2) + 0.05 * torch.eye(d)
    shares = torch.tensor([1.0, 2.0, 3.0])[:classes]
    return ClassMixtureMap(shares, weights, means, covariances).eval()


def test_a_class_draw_uses_only_that_class_components_at_every_temperature() -> None:
    """The component is picked from u_1 alone: the temperature scales the draw around the
    component's mean (z_t - mean = t (z_1 - mean)) and never moves it to another component,
    and a class's draws use that class's components only, whatever u is (the tails included)."""
    mixture = class_mixture()
    u = torch.randn(4000, 5, generator=torch.Generator().manual_seed(1)) * 2
    u[:8, 0] = torch.tensor([-1e3, -40.0, -9.0, -6.0, 6.0, 9.0, 40.0, 1e3])  # Phi rounds to 0 or 1
    means = mixture.means
    with torch.no_grad():
        for y in (-1, 0, 1, 2):
            labels = torch.full((len(u),), y)
            one = mixture(u, labels, torch.ones(len(u)))
            for t in (0.1, 0.5, 2.0):
                tempered = mixture(u, labels, torch.full((len(u),), t))
                centre = (tempered - t * one) / (1 - t)
                nearest = torch.cdist(centre, means).argmin(1)
                assert torch.allclose(centre, means[nearest], atol=1e-3)
                if y >= 0:
                    assert ((nearest >= 4 * y) & (nearest < 4 * (y + 1))).all()
            assert torch.isfinite(one).all()


def test_the_unconditional_mix_follows_the_class_shares() -> None:
    """Phi(u_1) falls in class y's bins with probability share_y, at any temperature: the
    draws' classes come in the training shares (1 : 2 : 3 here)."""
    mixture = class_mixture()
    u = torch.randn(60000, 5, generator=torch.Generator().manual_seed(2))
    anyone = torch.full((len(u),), -1)
    t = 0.3
    with torch.no_grad():
        one = mixture(u, anyone, torch.ones(len(u)))
        tempered = mixture(u, anyone, torch.full((len(u),), t))
    component = torch.cdist((tempered - t * one) / (1 - t), mixture.means).argmin(1)
    share = torch.bincount(component // 4, minlength=3).double() / len(u)
    assert torch.allclose(share, torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64), atol=0.01)


def test_the_class_mixture_density_is_the_share_weighted_sum_of_the_classes() -> None:
    mixture = class_mixture()
    z = torch.randn(50, 5, generator=torch.Generator().manual_seed(3)) * 3
    with torch.no_grad():
        joint = torch.stack([mixture.log_prob_given(z, y) for y in range(3)], 1)
        shares = torch.tensor([1 / 6, 2 / 6, 3 / 6]).log()
        assert torch.allclose(mixture.log_prob(z), torch.logsumexp(joint + shares, 1), atol=1e-4)


@needs_mnist
def test_a_conditional_stage_on_real_digits_ships_the_classifier(tmp_path: Path) -> None:
    """The shipped recipe in miniature on real MNIST and the shipped v1 (seconds): several
    draws per image, only those the classifier reads as their own digit, one mixture per
    digit; the stage lists the classes with their shares and mean codes, measures every
    digit's draws, and ships the classifier (its test accuracy recorded)."""
    base, _ = artifact.load(artifact.resolve(SHIPPED_STORE, "mnist", "v1"))
    cfg = StageConfig(
        codes="confident-draws",
        codes_confidence=0.99,
        draws_per_image=2,
        mixture=MixtureConfig(components=2, iterations=2),
        nll_images=0,
        samples=200,
        class_samples=20,
    )
    stage = add_learned_prior(
        base, "mnist", MNIST_DIR, cfg, tmp_path, progress=False, limit_train=800, limit_test=300,
        class_names=[str(d) for d in range(10)],
    )  # fmt: skip
    learned = stage.priors["learned"]
    assert learned["conditional"] and learned["codes"] == "confident-draws"
    assert learned["draws_per_image"] == 2 and 800 < learned["codes_fitted"] < 1600
    assert [c["class"] for c in learned["class_quality"]] == list(range(10))
    assert stage.classes is not None and [c["name"] for c in stage.classes] == [str(d) for d in range(10)]
    assert abs(sum(c["train_share"] for c in stage.classes) - 1) < 1e-3
    assert all(len(c["mean_code"]) == 32 for c in stage.classes)
    assert stage.classifier is not None and stage.classifier_entry is not None
    assert stage.classifier_entry["test_accuracy"] > 0.95 and stage.classifier_entry["test_images"] == 300
    with torch.no_grad():
        x = torch.rand(3, 1, 28, 28)
        assert torch.allclose(stage.classifier(x).sum(1), torch.ones(3), atol=1e-5)
        u = torch.randn(4, 32)
        z = stage.model.prior_given(u, torch.tensor([0, 1, 2, -1]), torch.ones(4))
        assert torch.equal(z[3], stage.model.prior(u, torch.ones(4))[3])
