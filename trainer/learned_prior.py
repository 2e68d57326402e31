"""The second stage: a learned prior on top of a trained VAE, its evaluation and its report.

The VAE's TorchScript module is taken as it is (encoder and decoder bit for bit); what is
added is prior(u, t) -> z and, for a labelled dataset, prior_given(u, y, t) -> z. Steps: the
codes of the training set (one posterior draw per image, or the posterior means), a density
fitted to them (one Gaussian mixture per class, joined by the classes' training shares; a
single mixture without labels; or a flow: trainer.train_prior), its map from noise to
latents exported, then the digit classifier's verdict on draws through both priors from the
same noise and on each class's draws, and the likelihood of test digits under each prior.
The classifier itself ships in the artifact (classifier.pt), for the service's verdicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from trainer import data
from trainer.classifier import WEIGHTS, load_classifier, predict, weights_sha256
from trainer.evaluate import binarise, iwae_log_likelihood
from trainer.export import TemperedFlow, classifier_to_torchscript, with_prior
from trainer.model import log_normal
from trainer.prior import NoiseToLatent
from trainer.quality import class_quality, noise, prior_quality
from trainer.report import class_draws, latent_projection, prior_comparison, prior_draws_map
from trainer.train_prior import (
    MixtureConfig,
    PriorTrainConfig,
    fit_class_mixture,
    posterior_draws,
    posterior_means,
    train_prior,
)

STANDARD_DESCRIPTION = "z = temperature * u, u ~ N(0, I): the prior the VAE was trained against"
LEARNED_DESCRIPTIONS = {
    "mixture": (
        "z = prior(u, temperature), u ~ N(0, I): a Gaussian mixture fitted by EM to the codes of the "
        "training set (where the codes of real digits lie, the aggregate posterior; ex-post density "
        "estimation, Ghosh et al. 2020), sampled deterministically from u: Phi(u_1) picks the "
        "component, the rest of u is its Gaussian draw, scaled by the temperature (which never "
        "changes the component)."
    ),
    "class-mixture": (
        "z = prior_given(u, y, temperature), u ~ N(0, I): one Gaussian mixture per class y, fitted by "
        "EM to the codes of that class's training images (where the codes of real digits of the class "
        "lie); the unconditional prior is their mixture over the classes' training shares. Phi(u_1) "
        "picks the component (among the class's own, or all of them), the rest of u is its Gaussian "
        "draw, scaled by the temperature, which never changes the component: the mix of classes is "
        "the same at every temperature."
    ),
    "flow": (
        "z = prior(u, temperature) = f^-1(temperature * u), u ~ N(0, I): the inverse of a "
        "rational-quadratic spline flow (Durkan et al. 2019) fitted by maximum likelihood to the codes "
        "of the training set (where the codes of real digits lie, the aggregate posterior); smooth in u."
    ),
}
KINDS = ("mixture", "flow")
# What the density is fitted to, per training image: posterior draws z ~ q(z|x)
# (draws_per_image of them); the mean mu(x); or those draws, kept only where the classifier
# reads their decoding as the image's own label with confidence >= codes_confidence
# (labelled MNIST only): docs/training.md compares them.
CODES = ("draws", "means", "confident-draws")


@dataclass
class StageConfig:
    kind: str = "mixture"  # "mixture" or "flow"
    # What the density is fitted to: "draws", one z ~ q(z|x) per training image (the aggregate
    # posterior itself), or "means", mu(x) (sharper, but a worse likelihood: docs/training.md).
    codes: str = "confident-draws"
    codes_confidence: float = 0.99  # confident-draws: the classifier's least confidence kept
    draws_per_image: int = 4  # draws and confident-draws: posterior draws of each training image
    seed: int = 0  # for the draws
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    flow: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    nll_images: int = 1000  # test images for the likelihood under each prior (0: skip)
    nll_k: int = 500
    samples: int = 5000  # draws judged by the classifier, per prior
    # One mixture per class where the dataset has labels (mixtures only): p(z | y).
    conditional: bool = True
    class_samples: int = 500  # draws judged per class


@dataclass
class Stage:
    """What the stage adds to an artifact."""

    model: torch.jit.ScriptModule  # the base's encode/decode, plus prior(u, t) (and prior_given)
    priors: dict[str, Any]  # the manifest's `priors`
    metrics: dict[str, Any]  # added to the manifest's `metrics`
    figures: dict[str, bytes]  # report files
    classes: list[dict[str, Any]] | None = None  # the manifest's `classes`
    classifier: torch.jit.ScriptModule | None = None  # classifier.pt
    classifier_entry: dict[str, Any] | None = None  # the manifest's `classifier`
    prior_map: torch.nn.Module | None = None  # the eager map `model` scripted: (u, y, t) -> z


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
    class_names: list[str] | None = None,
) -> Stage:
    log = print if progress else (lambda *_: None)
    known = dataset if dataset in data.KNOWN_MD5 else None
    train = data.load_split(data_dir, "train", known)
    train_u8 = torch.from_numpy(np.array(train.images[:limit_train]))
    train_labels = torch.from_numpy(np.array(train.labels[:limit_train]).astype(np.int64))
    test = data.load_split(data_dir, "test", known)
    test_u8 = torch.from_numpy(np.array(test.images[:limit_test]))
    latent_dim = int(base.latent_dim)
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown learned prior kind {cfg.kind!r}; known: {', '.join(KINDS)}")
    if cfg.codes not in CODES:
        raise ValueError(f"unknown codes {cfg.codes!r}; known: {', '.join(CODES)}")
    judge = load_classifier() if dataset == "mnist" and WEIGHTS.is_file() else None
    if cfg.codes == "confident-draws" and judge is None:
        # The filter needs a classifier of this dataset's classes; without one, every draw counts.
        log(f"no classifier for dataset {dataset!r}: fitting every draw (codes 'draws')")
        cfg = replace(cfg, codes="draws")
    names = class_names or [str(k) for k in range(int(train_labels.max()) + 1)]
    conditional = cfg.conditional and cfg.kind == "mixture"

    log(f"posterior {cfg.codes} of {len(train_u8)} training and {len(test_u8)} test images ...")
    test_means = posterior_means(base.encode, test_u8)
    if cfg.codes == "means":
        train_codes, test_codes = posterior_means(base.encode, train_u8), test_means
        fitted_labels = train_labels
    else:
        # More than one draw per image: more codes for the same aggregate posterior, so that
        # each component's full covariance is estimated from more points than it has entries.
        train_codes = torch.cat(
            [posterior_draws(base.encode, train_u8, cfg.seed + 7919 * r) for r in range(cfg.draws_per_image)]
        )
        test_codes = posterior_draws(base.encode, test_u8, cfg.seed + 1)
        fitted_labels = train_labels.repeat(cfg.draws_per_image)
        if cfg.codes == "confident-draws":
            assert judge is not None
            keep = _read_as_own(base, judge, train_codes, fitted_labels, cfg.codes_confidence, progress)
            log(
                f"kept {int(keep.sum())} of {len(keep)} draws read as their own digit "
                f"(p >= {cfg.codes_confidence})"
            )
            train_codes, fitted_labels = train_codes[keep], fitted_labels[keep]
    # One folder per kind of fit, so that a checkpoint is never resumed as another kind's.
    codes_name = cfg.codes + (f"-{cfg.codes_confidence:g}" if cfg.codes == "confident-draws" else "")
    codes_name += f"-x{cfg.draws_per_image}" if cfg.draws_per_image > 1 and cfg.codes != "means" else ""
    stage_dir = workdir / f"prior-{'class-' if conditional else ''}{cfg.kind}-{codes_name}"
    labels = fitted_labels if conditional else torch.zeros_like(fitted_labels)
    classes_fitted = len(names) if conditional else 1
    # The classes' shares of the whole training set, whatever the codes kept: p(z) mixes the
    # classes as the data does.
    shares = torch.bincount(train_labels, minlength=classes_fitted).double() if conditional else None
    mapping, density, how = _fit(
        cfg, train_codes, test_codes, labels, classes_fitted, latent_dim, stage_dir, resume, progress, shares
    )
    scripted = with_prior(base, mapping, conditional)

    with torch.no_grad():
        standard_nll_z = -float(log_normal(test_codes, torch.zeros(()), torch.ones(())).mean())
        learned_nll_z = -float(
            torch.cat([density(test_codes[s : s + 2000]) for s in range(0, len(test_codes), 2000)]).mean()
        )

    quality: dict[str, Any] = {}
    per_class: list[dict[str, Any]] | None = None
    if judge is not None:
        log(f"judging {cfg.samples} draws through each prior ...")
        quality["standard"] = prior_quality(scripted.decode, judge, latent_dim, None, cfg.samples)
        quality["learned"] = prior_quality(scripted.decode, judge, latent_dim, scripted.prior, cfg.samples)
        quality["learned_t0.5"] = prior_quality(
            scripted.decode, judge, latent_dim, scripted.prior, cfg.samples, temperature=0.5
        )
        for q in quality.values():
            q["classifier_sha256"] = weights_sha256()
        if conditional:
            log(f"judging {cfg.class_samples} draws of each class ...")
            per_class = class_quality(
                scripted.decode, judge, latent_dim, scripted.prior_given, len(names), cfg.class_samples
            )

    nll: dict[str, Any] | None = None
    if cfg.nll_images:
        nll = _likelihoods(base, density, test_u8[: cfg.nll_images], cfg.nll_k, log)

    figures = _figures(scripted, test_means, test.labels[: len(test_means)], len(names) if conditional else 0)
    shares = torch.bincount(train_labels, minlength=len(names)).double() / len(train_labels)
    test_labels = torch.from_numpy(np.array(test.labels[: len(test_means)]).astype(np.int64))
    classes = [
        {
            "index": i,
            "name": name,
            "train_share": round(float(shares[i]), 4),
            # Where the class lies: the mean of its test images' posterior means (None: none in the test set).
            "mean_code": [round(float(v), 4) for v in test_means[test_labels == i].mean(0)]
            if bool((test_labels == i).any())
            else None,
        }
        for i, name in enumerate(names)
    ]
    learned: dict[str, Any] = {
        "description": LEARNED_DESCRIPTIONS["class-mixture" if conditional else cfg.kind],
        "kind": cfg.kind,
        "conditional": conditional,
        "test_codes_nll": round(learned_nll_z, 3),
        "codes": cfg.codes,
        **({"codes_confidence": cfg.codes_confidence} if cfg.codes == "confident-draws" else {}),
        "codes_fitted": len(train_codes),
        "draws_per_image": cfg.draws_per_image if cfg.codes != "means" else None,
        "sample_quality": quality.get("learned"),
        "sample_quality_t0.5": quality.get("learned_t0.5"),
        "fit": how,
    }
    if per_class is not None:
        learned["class_quality"] = per_class
        shares_read = [c["confident_share"] for c in per_class]
        learned["class_quality_summary"] = {
            "mean": round(float(np.mean(shares_read)), 4),
            "worst": round(min(shares_read), 4),
            "worst_class": names[int(np.argmin(shares_read))],
        }
    priors = {
        "standard": {
            "description": STANDARD_DESCRIPTION,
            "test_codes_nll": round(standard_nll_z, 3),
            "sample_quality": quality.get("standard"),
        },
        "learned": learned,
    }
    metrics = {
        "prior_likelihood": nll,
        "priors_how": (
            "sample_quality: the digit classifier (trainer/classifier.py) on decode(z) for `samples` "
            "draws of u at temperature 1 (sample_quality_t0.5: at 0.5), drawn as /sample draws them for "
            "the seed (torch.Generator().manual_seed(seed), randn(n, latent_dim)); the same u for both "
            "priors. class_quality: per class y, `samples` draws of prior_given(u, y, 1) from seed 0, "
            "the share the classifier reads as y with confidence >= 0.9. "
            "test_codes_nll: -log p(z) in nats under each prior, for the test set's codes of the kind "
            "the learned prior was fitted to (`codes`). "
            "prior_likelihood: IWAE bounds on -log p(x) of the same binarised test images with p(z) "
            "the standard normal or the learned density: the NLL of the whole model, u to z to x."
        ),
    }
    stage = Stage(scripted, priors, metrics, figures, classes=classes, prior_map=mapping)
    if judge is not None:
        grey = test_u8.float().div(255).unsqueeze(1)
        read, _ = predict(judge, grey)
        accuracy = float((read.numpy() == test.labels[: len(read)]).mean())
        stage.classifier = classifier_to_torchscript(judge)
        stage.classifier_entry = {
            "file": "classifier.pt",
            "description": (
                "The digit classifier that judged the draws (trainer/classifier.py), as TorchScript: "
                "images [B, 1, 28, 28] in [0, 1] -> class probabilities [B, classes]"
            ),
            "test_accuracy": round(accuracy, 4),
            "test_images": len(read),
            "weights_sha256": weights_sha256(),
        }
    return stage


@torch.no_grad()
def _read_as_own(
    base: torch.jit.ScriptModule,
    judge: torch.nn.Module,
    codes: Tensor,
    labels: Tensor,
    threshold: float,
    progress: bool,
    batch_size: int = 2000,
) -> Tensor:
    """Which codes decode to an image the classifier reads as its own label with confidence
    >= threshold: [N] bool. In batches, with a progress bar (a few minutes for 240,000)."""
    keep = torch.empty(len(codes), dtype=torch.bool)
    starts = range(0, len(codes), batch_size)
    for s in tqdm(starts, desc="judging the draws", disable=not progress, leave=False):
        read, confidence = predict(judge, base.decode(codes[s : s + batch_size]))
        keep[s : s + batch_size] = (read == labels[s : s + batch_size]) & (confidence >= threshold)
    return keep


def _fit(
    cfg: StageConfig,
    train_codes: Tensor,
    test_codes: Tensor,
    labels: Tensor,
    classes: int,
    latent_dim: int,
    workdir: Path,
    resume: bool,
    progress: bool,
    shares: Tensor | None = None,
) -> tuple[torch.nn.Module, Callable[[Tensor], Tensor], dict[str, Any]]:
    """(the map (u, y, t) -> z, the density log p(z), how it was fitted) for the configured
    kind. A mixture is fitted per class of `labels` (one class: a single mixture), joined by
    `shares`."""
    if cfg.kind == "mixture":
        mixture, states = fit_class_mixture(
            cfg.mixture, train_codes, labels, classes, workdir, resume, progress, shares
        )
        return (
            mixture,
            mixture.log_prob,
            {
                "config": asdict(cfg.mixture),
                "classes": classes,
                "codes_fitted": len(train_codes),
                "iterations": states[0].iteration,
                "wall_time_s": round(sum(s.wall_time_s for s in states), 1),
                "cpu_time_s": round(sum(s.cpu_time_s for s in states), 1),
                "train_codes_log_likelihood": [s.history[-1] if s.history else None for s in states],
            },
        )
    cfg.flow.flow.latent_dim = latent_dim
    flow, state = train_prior(cfg.flow, train_codes, test_codes, workdir, resume, progress)
    return (
        TemperedFlow(NoiseToLatent(flow)).eval(),
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
def _figures(
    scripted: torch.jit.ScriptModule, test_codes: Tensor, labels: np.ndarray, classes: int = 0
) -> dict[str, bytes]:
    latent_dim = test_codes.shape[1]
    u = noise(100, latent_dim, seed=0)
    files = {
        "prior_comparison.png": prior_comparison(
            scripted.decode(u), scripted.decode(scripted.prior(u, torch.ones(len(u))))
        ),
    }
    draws = noise(1000, latent_dim, seed=1)
    coords, axes, _ = latent_projection(test_codes.numpy())
    project = (lambda z: z) if axes is None else (lambda z: z @ axes.T)
    learned = scripted.prior(draws, torch.ones(len(draws)))
    files["prior_draws.png"] = prior_draws_map(
        coords, labels, project(draws.numpy()), project(learned.numpy()), axes is not None
    )
    if classes:
        per_class = 12
        u = noise(per_class, latent_dim, seed=0).repeat(classes, 1)
        y = torch.arange(classes).repeat_interleave(per_class)
        files["class_draws.png"] = class_draws(
            scripted.decode(scripted.prior_given(u, y, torch.ones(len(u)))), per_class
        )
    return files
