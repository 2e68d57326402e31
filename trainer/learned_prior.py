"""The second stage: a learned prior on top of a trained VAE, its evaluation and its report.

The VAE's TorchScript module is taken as it is (encoder and decoder bit for bit); what is
added is prior(u) -> z. Steps: the codes of the training set (one posterior draw per
image, or the posterior means), a density fitted to them (a Gaussian mixture, or a flow:
trainer.train_prior), its map from noise to latents exported as prior(u), then the digit
classifier's verdict on draws through both priors from the same noise, and the likelihood
of test digits under each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainer import data
from trainer.classifier import WEIGHTS, load_classifier, weights_sha256
from trainer.evaluate import binarise, iwae_log_likelihood
from trainer.export import with_prior
from trainer.model import log_normal
from trainer.prior import NoiseToLatent
from trainer.quality import noise, prior_quality
from trainer.report import latent_projection, prior_comparison, prior_draws_map
from trainer.train_prior import (
    MixtureConfig,
    PriorTrainConfig,
    fit_mixture,
    posterior_draws,
    posterior_means,
    train_prior,
)

STANDARD_DESCRIPTION = "z = temperature * u, u ~ N(0, I): the prior the VAE was trained against"
LEARNED_DESCRIPTIONS = {
    "mixture": (
        "z = prior(temperature * u), u ~ N(0, I): a Gaussian mixture fitted by EM to the codes of the "
        "training set (where the codes of real digits lie, the aggregate posterior; ex-post density "
        "estimation, Ghosh et al. 2020), sampled deterministically from u: Phi(u_1) picks the "
        "component, the rest of u is its Gaussian draw."
    ),
    "flow": (
        "z = prior(temperature * u), u ~ N(0, I): the inverse of a rational-quadratic spline flow "
        "(Durkan et al. 2019) fitted by maximum likelihood to the codes of the training set "
        "(where the codes of real digits lie, the aggregate posterior); smooth in u."
    ),
}
KINDS = tuple(LEARNED_DESCRIPTIONS)
CODES = ("draws", "means")


@dataclass
class StageConfig:
    kind: str = "mixture"  # "mixture" or "flow"
    # What the density is fitted to: "draws", one z ~ q(z|x) per training image (the aggregate
    # posterior itself), or "means", mu(x) (sharper, but a worse likelihood: docs/training.md).
    codes: str = "draws"
    seed: int = 0  # for the draws
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    flow: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    nll_images: int = 1000  # test images for the likelihood under each prior (0: skip)
    nll_k: int = 500
    samples: int = 5000  # draws judged by the classifier, per prior


@dataclass
class Stage:
    """What the stage adds to an artifact."""

    model: torch.jit.ScriptModule  # the base's encode/decode, plus prior(u)
    priors: dict[str, Any]  # the manifest's `priors`
    metrics: dict[str, Any]  # added to the manifest's `metrics`
    figures: dict[str, bytes]  # report files


def add_learned_prior(
    base: torch.jit.ScriptModule,
    dataset: str,
    data_dir: Path | str,
    cfg: StageConfig,
    workdir: Path,
    resume: bool = True,
    progress: bool = True,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Stage:
    log = print if progress else (lambda *_: None)
    known = dataset if dataset in data.KNOWN_MD5 else None
    train_u8 = torch.from_numpy(np.array(data.load_split(data_dir, "train", known).images[:limit_train]))
    test = data.load_split(data_dir, "test", known)
    test_u8 = torch.from_numpy(np.array(test.images[:limit_test]))
    latent_dim = int(base.latent_dim)
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown learned prior kind {cfg.kind!r}; known: {', '.join(KINDS)}")

    if cfg.codes not in CODES:
        raise ValueError(f"unknown codes {cfg.codes!r}; known: {', '.join(CODES)}")
    log(f"posterior {cfg.codes} of {len(train_u8)} training and {len(test_u8)} test images ...")
    test_means = posterior_means(base.encode, test_u8)
    if cfg.codes == "draws":
        train_codes = posterior_draws(base.encode, train_u8, cfg.seed)
        test_codes = posterior_draws(base.encode, test_u8, cfg.seed + 1)
    else:
        train_codes, test_codes = posterior_means(base.encode, train_u8), test_means
    # One folder per kind of fit, so that a checkpoint is never resumed as another kind's.
    stage_dir = workdir / f"prior-{cfg.kind}-{cfg.codes}"
    mapping, density, how = _fit(cfg, train_codes, test_codes, latent_dim, stage_dir, resume, progress)
    scripted = with_prior(base, mapping)

    with torch.no_grad():
        standard_nll_z = -float(log_normal(test_codes, torch.zeros(()), torch.ones(())).mean())
        learned_nll_z = -float(
            torch.cat([density(test_codes[s : s + 2000]) for s in range(0, len(test_codes), 2000)]).mean()
        )

    quality: dict[str, Any] = {}
    if dataset == "mnist" and WEIGHTS.is_file():
        log(f"judging {cfg.samples} draws through each prior ...")
        judge = load_classifier()
        quality["standard"] = prior_quality(scripted.decode, judge, latent_dim, None, cfg.samples)
        quality["learned"] = prior_quality(scripted.decode, judge, latent_dim, scripted.prior, cfg.samples)
        for q in quality.values():
            q["classifier_sha256"] = weights_sha256()

    nll: dict[str, Any] | None = None
    if cfg.nll_images:
        nll = _likelihoods(base, density, test_u8[: cfg.nll_images], cfg.nll_k, log)

    figures = _figures(scripted, test_means, test.labels[: len(test_means)])
    priors = {
        "standard": {
            "description": STANDARD_DESCRIPTION,
            "test_codes_nll": round(standard_nll_z, 3),
            "sample_quality": quality.get("standard"),
        },
        "learned": {
            "description": LEARNED_DESCRIPTIONS[cfg.kind],
            "kind": cfg.kind,
            "test_codes_nll": round(learned_nll_z, 3),
            "codes": cfg.codes,
            "sample_quality": quality.get("learned"),
            "fit": how,
        },
    }
    metrics = {
        "prior_likelihood": nll,
        "priors_how": (
            "sample_quality: the digit classifier (trainer/classifier.py) on decode(z) for `samples` "
            "draws of u at temperature 1, drawn as /sample draws them for the seed "
            "(torch.Generator().manual_seed(seed), randn(n, latent_dim)); the same u for both priors. "
            "test_codes_nll: -log p(z) in nats under each prior, for the test set's codes of the kind "
            "the learned prior was fitted to (`codes`: one posterior draw per image, or the means). "
            "prior_likelihood: IWAE bounds on -log p(x) of the same binarised test images with p(z) "
            "the standard normal or the learned density: the NLL of the whole model, u to z to x."
        ),
    }
    return Stage(scripted, priors, metrics, figures)


def _fit(
    cfg: StageConfig,
    train_codes: Tensor,
    test_codes: Tensor,
    latent_dim: int,
    workdir: Path,
    resume: bool,
    progress: bool,
) -> tuple[torch.nn.Module, Callable[[Tensor], Tensor], dict[str, Any]]:
    """(the map u -> z, the density log p(z), how it was fitted) for the configured kind."""
    if cfg.kind == "mixture":
        mixture, state = fit_mixture(cfg.mixture, train_codes, workdir, resume, progress)
        return (
            mixture,
            mixture.log_prob,
            {
                "config": asdict(cfg.mixture),
                "iterations": state.iteration,
                "wall_time_s": round(state.wall_time_s, 1),
                "cpu_time_s": round(state.cpu_time_s, 1),
                "train_codes_log_likelihood": state.history,
            },
        )
    cfg.flow.flow.latent_dim = latent_dim
    flow, state = train_prior(cfg.flow, train_codes, test_codes, workdir, resume, progress)
    return (
        NoiseToLatent(flow).eval(),
        flow.log_prob,
        {
            "config": asdict(cfg.flow),
            "epochs": state.epoch,
            "wall_time_s": round(state.wall_time_s, 1),
            "cpu_time_s": round(state.cpu_time_s, 1),
            "history": [
                {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in state.history
            ],
        },
    )


@torch.no_grad()
def _likelihoods(
    base: torch.jit.ScriptModule, density: Callable[[Tensor], Tensor], images_u8: Tensor, k: int, log
) -> dict[str, Any]:
    """IWAE NLL of binarised test images under both priors, same images and samples."""
    log(f"IWAE NLL of {len(images_u8)} test images under each prior (k={k}) ...")
    x = binarise(images_u8, torch.Generator().manual_seed(1234))
    out: dict[str, Any] = {"images": len(images_u8), "iwae_k": k, "binarisation_seed": 1234}
    per_batch = max(1, 20_000 // k)
    for name, log_prior in (("standard", None), ("learned", density)):
        torch.manual_seed(1234)
        total = 0.0
        for s in range(0, len(x), per_batch):
            total -= float(iwae_log_likelihood(base, x[s : s + per_batch], k, log_prior=log_prior).sum())
        out[f"{name}_iwae_nll"] = round(total / len(x), 3)
    return out


@torch.no_grad()
def _figures(scripted: torch.jit.ScriptModule, test_codes: Tensor, labels: np.ndarray) -> dict[str, bytes]:
    latent_dim = test_codes.shape[1]
    u = noise(100, latent_dim, seed=0)
    files = {
        "prior_comparison.png": prior_comparison(scripted.decode(u), scripted.decode(scripted.prior(u))),
    }
    draws = noise(1000, latent_dim, seed=1)
    coords, axes, _ = latent_projection(test_codes.numpy())
    project = (lambda z: z) if axes is None else (lambda z: z @ axes.T)
    files["prior_draws.png"] = prior_draws_map(
        coords, labels, project(draws.numpy()), project(scripted.prior(draws).numpy()), axes is not None
    )
    return files
