"""The models shipped in model_store/: intact, loadable, and as good as their manifests say.

The manifest's figures were measured by `vae-train` on the full test set; here a part of
that measurement is repeated (on real MNIST when ../shared has it), so a manifest can't
claim what the model does not do."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from service import artifact
from tests.conftest import MNIST_DIR, SHIPPED_STORE, needs_mnist
from trainer.classifier import load_classifier, predict
from trainer.data import load_split
from trainer.export import SERVING_FORM_TOLERANCE
from trainer.quality import judge_images

SHIPPED = {"mnist": 32, "mnist-2d": 2}


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request: pytest.FixtureRequest) -> tuple[torch.jit.ScriptModule, artifact.Artifact]:
    return artifact.load(artifact.resolve(SHIPPED_STORE, request.param))


def test_shipped_models_verify_and_honour_the_contract(shipped) -> None:
    model, art = shipped
    assert art.latent_dim == SHIPPED[art.name]
    assert art.manifest["dataset"]["name"] == "mnist"
    assert art.manifest["dataset"]["train_images"] == 60000
    with torch.no_grad():
        mu, sigma = model.encode(torch.rand(3, 1, 28, 28))
        x = model.decode(torch.randn(5, art.latent_dim))
    assert mu.shape == (3, art.latent_dim) and (sigma > 0).all()
    assert x.shape == (5, 1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert art.manifest["metrics"]["test"]["iwae_k"] >= 500
    for rel in art.manifest["report"]["figures"]:
        assert rel in art.manifest["files"]
    assert art.priors == ("standard", "learned") and art.default_prior == "learned"
    assert art.format_version == 3 and art.conditional and art.has_classifier
    assert art.classes == tuple(str(d) for d in range(10))
    u, t = torch.randn(7, art.latent_dim), torch.ones(7)
    with torch.no_grad():
        z = model.prior(u, t)
        given = model.prior_given(u, torch.arange(7), t)
    assert z.shape == (7, art.latent_dim) and torch.isfinite(z).all() and torch.isfinite(given).all()
    # v4 is v3 re-exported in the serving form (test_serving_form.py checks it on real digits),
    # and v3 is v1 with the class-conditional prior: the encoder and decoder are v1's weights
    base = art.manifest["base"]
    assert base["version"] == {"v4": "v3", "v3": "v1"}[art.version]
    base_art = artifact.Artifact(
        artifact.resolve(SHIPPED_STORE, art.name, base["version"]),
        artifact.verify(artifact.resolve(SHIPPED_STORE, art.name, base["version"])),
    )
    assert base_art.manifest["files"]["model.pt"] == base["model_sha256"]
    v1, _ = artifact.load(artifact.resolve(SHIPPED_STORE, art.name, "v1"))
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    tolerance = 0.0 if model.decoder.original_name == "Decoder" else SERVING_FORM_TOLERANCE
    with torch.no_grad():  # the encoder is v1's bit for bit, the decoder v1's function
        assert torch.equal(model.encode(x)[0], v1.encode(x)[0])
        assert float((model.decode(z) - v1.decode(z)).abs().max()) <= tolerance
        v3, _ = artifact.load(artifact.resolve(SHIPPED_STORE, art.name, "v3"))
        assert torch.equal(v3.decode(z), v1.decode(z))  # v3's decoder is v1's, bit for bit
    classifier = artifact.load_classifier(art)
    assert classifier is not None and art.manifest["classifier"]["test_accuracy"] >= 0.99


def test_a_shipped_format_2_artifact_still_serves_its_one_argument_prior() -> None:
    """v2 of each shipped model (format 2: the learned prior before classes) stays in the store,
    for the clients and deployments that pin it: prior(u) of the scaled noise, no classes."""
    for name in SHIPPED:
        model, art = artifact.load(artifact.resolve(SHIPPED_STORE, name, "v2"))
        assert art.format_version == 2 and art.priors == ("standard", "learned")
        assert art.classes == () and not art.conditional and not art.has_classifier
        with torch.no_grad():
            assert model.prior(torch.randn(3, art.latent_dim)).shape == (3, art.latent_dim)


def test_a_shipped_format_1_artifact_still_serves_the_standard_prior() -> None:
    """v1 of each shipped model was written before priors (format 1) and stays in the store."""
    for name in SHIPPED:
        model, art = artifact.load(artifact.resolve(SHIPPED_STORE, name, "v1"))
        assert art.manifest["format_version"] == 1
        assert art.priors == ("standard",) and art.default_prior == "standard"
        assert not hasattr(model, "prior")


def test_default_model_meets_the_likelihood_and_budget_targets() -> None:
    manifest = artifact.verify(artifact.resolve(SHIPPED_STORE, "mnist"))
    test = manifest["metrics"]["test"]
    assert test["images"] == 10000 and test["iwae_k"] >= 500
    assert test["iwae_nll"] <= 85.0
    assert manifest["training"]["wall_time_s"] <= 3600
    assert manifest["training"]["device"] == "cpu"


def test_default_model_meets_the_sample_quality_targets() -> None:
    """The default /sample (the learned prior) on 5,000 draws at temperature 1, as vae-train
    measured it: the targets, with the standard prior's figures recorded beside them."""
    manifest = artifact.verify(artifact.resolve(SHIPPED_STORE, "mnist"))
    assert manifest["default_prior"] == "learned"
    learned = manifest["priors"]["learned"]["sample_quality"]
    standard = manifest["priors"]["standard"]["sample_quality"]
    for quality in (learned, standard):
        assert quality["samples"] == 5000 and quality["temperature"] == 1.0
        assert quality["confidence_threshold"] == 0.9
    assert learned["confident_share"] >= 0.90
    assert learned["min_class_share"] >= 0.07
    assert learned["inception_score"] >= 9.0
    assert standard["confident_share"] < learned["confident_share"]


def test_the_class_conditional_prior_meets_its_targets() -> None:
    """mnist v3 against issue 24's targets, from what vae-train measured: per class, 500 draws
    of that class read as it with confidence >= 0.9 (mean >= 0.96, worst >= 0.92); the
    unconditional default no worse than v2's; at temperature 0.5 every digit at least 7 % of
    the draws (the temperature keeps the mix); the whole model's NLL no worse than v2's."""
    manifest = artifact.verify(artifact.resolve(SHIPPED_STORE, "mnist"))
    v2 = artifact.verify(artifact.resolve(SHIPPED_STORE, "mnist", "v2"))
    learned = manifest["priors"]["learned"]
    per_class = learned["class_quality"]
    assert [c["class"] for c in per_class] == list(range(10))
    assert all(c["samples"] == 500 and c["temperature"] == 1.0 for c in per_class)
    shares = [c["confident_share"] for c in per_class]
    assert np.mean(shares) >= 0.96 and min(shares) >= 0.92, shares
    now, before = learned["sample_quality"], v2["priors"]["learned"]["sample_quality"]
    assert now["confident_share"] >= before["confident_share"]
    assert now["min_class_share"] >= before["min_class_share"]
    assert now["inception_score"] >= before["inception_score"]
    cold = learned["sample_quality_t0.5"]
    assert cold["temperature"] == 0.5 and cold["min_class_share"] >= 0.07
    nll, nll_v2 = manifest["metrics"]["prior_likelihood"], v2["metrics"]["prior_likelihood"]
    assert nll["images"] == nll_v2["images"] and nll["iwae_k"] == nll_v2["iwae_k"]
    assert nll["learned_iwae_nll"] <= nll_v2["learned_iwae_nll"]


def test_the_service_draws_what_the_manifest_records(tmp_path) -> None:
    """The same 5,000 draws (the manifest's seed) through the real service's default /sample,
    in its 32-row passes, judged again: the manifest's figures within a few draws."""
    from service.app import create_app
    from tests.service_support import InProcess, make_settings

    manifest = artifact.verify(artifact.resolve(SHIPPED_STORE, "mnist"))
    recorded = manifest["priors"]["learned"]["sample_quality"]
    served = InProcess(create_app(make_settings(SHIPPED_STORE, max_samples=5000, models=["mnist"])))
    try:
        answer = served.post(
            "/sample",
            json={"n": 5000, "seed": recorded["seed"]},
            headers={"Accept": "application/x-npy"},
        )
    finally:
        served.close()
    assert answer.status_code == 200 and answer.headers["X-Prior"] == "learned"
    images = torch.from_numpy(np.load(io.BytesIO(answer.content))).unsqueeze(1)
    judged = judge_images(load_classifier(), images)
    assert abs(judged["confident_share"] - recorded["confident_share"]) <= 0.002
    assert abs(judged["inception_score"] - recorded["inception_score"]) <= 0.02


def test_the_service_draws_each_class_as_the_manifest_records() -> None:
    """Each class's 500 draws (seed 0, temperature 1) through the real service's /sample with
    `label`, judged by the verdicts it returns (the shipped classifier.pt): the manifest's
    per-class share within two draws."""
    from service.app import create_app
    from tests.service_support import InProcess, make_settings

    manifest = artifact.verify(artifact.resolve(SHIPPED_STORE, "mnist"))
    served = InProcess(create_app(make_settings(SHIPPED_STORE, models=["mnist"])))
    try:
        for recorded in manifest["priors"]["learned"]["class_quality"]:
            body = {
                "n": 500,
                "seed": 0,
                "label": recorded["class"],
                "return_verdicts": True,
                "format": "array",
            }
            answer = served.post("/sample", json=body).json()
            share = np.mean(
                [v["label"] == recorded["class"] and v["confidence"] >= 0.9 for v in answer["verdicts"]]
            )
            assert abs(share - recorded["confident_share"]) <= 0.004, recorded
    finally:
        served.close()


def test_prior_sample_quality_matches_the_manifest(shipped) -> None:
    """A fresh draw (not the manifest's seed), judged by the same classifier, agrees with
    what the manifest records: its figures are measurements, not claims."""
    model, art = shipped
    if art.name != "mnist":
        pytest.skip("sample quality is recorded for the default model")
    recorded = art.manifest["metrics"]["sample_quality"]
    z = torch.randn(2000, art.latent_dim, generator=torch.Generator().manual_seed(12345))
    with torch.no_grad():
        labels, confidence = predict(load_classifier(), model.decode(z))
    confident = confidence >= recorded["confidence_threshold"]
    assert abs(float(confident.float().mean()) - recorded["confident_share"]) < 0.04
    shares = np.bincount(labels[confident].numpy(), minlength=10) / int(confident.sum())
    assert shares.min() >= 0.04  # every digit appears: no class is missing from the prior


@needs_mnist
def test_manifest_metrics_are_reproduced_on_real_digits(shipped) -> None:
    model, art = shipped
    test = load_split(MNIST_DIR, "test", "mnist")
    x = torch.from_numpy(np.array(test.images[:2000])).float().div(255).unsqueeze(1)
    with torch.no_grad():
        mu, sigma = model.encode(torch.bernoulli(x, generator=torch.Generator().manual_seed(0)))
        logits_free = model.decode(mu + sigma * torch.randn_like(sigma)).clamp(1e-6, 1 - 1e-6)
    xb = torch.bernoulli(x, generator=torch.Generator().manual_seed(0))
    rec = -(xb * logits_free.log() + (1 - xb) * (1 - logits_free).log()).flatten(1).sum(1).mean()
    kl = (0.5 * (mu**2 + sigma**2 - 1) - sigma.log()).sum(1).mean()
    recorded = art.manifest["metrics"]["test"]
    # 2,000 of the 10,000 images, another binarisation: agreement within a couple of nats.
    assert abs(float(rec + kl) - recorded["neg_elbo"]) < 3.0
    assert abs(float(kl) - recorded["kl"]) < 1.5
    if art.name == "mnist":
        with torch.no_grad():
            labels, _ = predict(load_classifier(), model(x))
        accuracy = (labels.numpy() == test.labels[:2000]).mean()
        assert abs(accuracy - art.manifest["metrics"]["sample_quality"]["reconstruction_accuracy"]) < 0.01
