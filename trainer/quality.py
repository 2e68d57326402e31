"""Sample quality as judged by the digit classifier (trainer.classifier).

The figures: the share of images the classifier recognises with confidence >= 0.9, how
evenly the confident ones spread over the ten digits, and the digit inception score
exp(E_x KL(p(y|x) || p(y))): 10 for confident draws spread evenly over ten digits, 1 for
draws that are all alike or all ambiguous (real test digits: about 9.5)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.classifier import DigitClassifier, predict
from trainer.model import VAE

Decode = Callable[[Tensor], Tensor]  # z [B, D] -> Bernoulli means [B, 1, 28, 28]


@torch.no_grad()
def judge_images(judge: DigitClassifier, images: Tensor, confidence_threshold: float = 0.9) -> dict:
    """The classifier's verdict on float images [N, 1, 28, 28] in [0, 1]."""
    judge.eval()
    probs = torch.cat([F.softmax(judge(images[s : s + 1000]), dim=1) for s in range(0, len(images), 1000)])
    confidence, labels = probs.max(dim=1)
    confident = confidence >= confidence_threshold
    counts = np.bincount(labels[confident].numpy(), minlength=10)
    marginal = probs.mean(0)
    kl = (probs * (probs.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1)
    return {
        "samples": len(images),
        "confidence_threshold": confidence_threshold,
        "confident_share": round(float(confident.float().mean()), 4),
        "class_shares": (counts / max(1, counts.sum())).round(4).tolist(),
        "min_class_share": round(float(counts.min() / max(1, counts.sum())), 4),
        "inception_score": round(math.exp(float(kl.mean())), 3),
    }


def noise(samples: int, latent_dim: int, seed: int) -> Tensor:
    """u ~ N(0, I), drawn exactly as the service's /sample draws it for this seed."""
    return torch.randn(samples, latent_dim, generator=torch.Generator(device="cpu").manual_seed(seed))


@torch.no_grad()
def decode_all(decode: Decode, z: Tensor, batch_size: int = 1000) -> Tensor:
    return torch.cat([decode(z[s : s + batch_size]) for s in range(0, len(z), batch_size)])


Prior = Callable[[Tensor, Tensor], Tensor]  # (u [B, D], temperature [B]) -> z, the artifact's prior
ClassPrior = Callable[[Tensor, Tensor, Tensor], Tensor]  # (u, y [B], temperature [B]) -> z


@torch.no_grad()
def prior_quality(
    decode: Decode,
    judge: DigitClassifier,
    latent_dim: int,
    prior: Prior | None = None,
    samples: int = 5000,
    temperature: float = 1.0,
    seed: int = 0,
    confidence_threshold: float = 0.9,
) -> dict:
    """decode(z) for `samples` draws through a prior, judged. z = temperature * u for the
    standard prior (prior None), z = prior(u, temperature) for a learned one."""
    u = noise(samples, latent_dim, seed)
    if prior is None:
        z = u * temperature
    else:
        t = torch.full((samples,), float(temperature))
        z = torch.cat([prior(u[s : s + 1000], t[s : s + 1000]) for s in range(0, samples, 1000)])
    judged = judge_images(judge, decode_all(decode, z), confidence_threshold)
    return {**judged, "temperature": temperature, "seed": seed}


@torch.no_grad()
def class_quality(
    decode: Decode,
    judge: DigitClassifier,
    latent_dim: int,
    prior_given: ClassPrior,
    classes: int,
    samples: int = 500,
    temperature: float = 1.0,
    seed: int = 0,
    confidence_threshold: float = 0.9,
) -> list[dict]:
    """Per class y: `samples` draws of decode(prior_given(u, y, t)), u from `seed` as /sample
    draws it, and the share the judge reads as y with confidence >= the threshold."""
    u = noise(samples, latent_dim, seed)
    t = torch.full((samples,), float(temperature))
    out = []
    for y in range(classes):
        z = prior_given(u, torch.full((samples,), y, dtype=torch.long), t)
        read, confidence = predict(judge, decode_all(decode, z))
        out.append(
            {
                "class": y,
                "samples": samples,
                "confident_share": round(
                    float(((read == y) & (confidence >= confidence_threshold)).float().mean()), 4
                ),
                "read_as_class": round(float((read == y).float().mean()), 4),
                "temperature": temperature,
                "seed": seed,
            }
        )
    return out


@torch.no_grad()
def sample_quality(
    model: VAE,
    judge: DigitClassifier,
    test_images: torch.Tensor,
    test_labels: np.ndarray,
    samples: int = 5000,
    confidence_threshold: float = 0.9,
    seed: int = 0,
) -> dict:
    """Prior samples at temperature 1 and reconstructions of the test set, classified.

    test_images are float [N, 1, 28, 28] in [0, 1]: the grey digits a client would send,
    reconstructed as decode(mu), the model's forward()."""
    model.eval()

    def decode(z: Tensor) -> Tensor:
        return torch.sigmoid(model.decoder(z))

    drawn = prior_quality(
        decode,
        judge,
        model.cfg.latent_dim,
        samples=samples,
        seed=seed,
        confidence_threshold=confidence_threshold,
    )
    recon = []
    for s in range(0, len(test_images), 1000):
        mu, _ = model.encoder(test_images[s : s + 1000])
        recon.append(decode(mu))
    recon_labels, _ = predict(judge, torch.cat(recon))
    real_labels, _ = predict(judge, test_images)
    return {
        **drawn,
        "reconstruction_accuracy": float((recon_labels.numpy() == test_labels).mean()),
        "classifier_accuracy": float((real_labels.numpy() == test_labels).mean()),
        "real_digits_inception_score": judge_images(judge, test_images)["inception_score"],
        "test_images": len(test_images),
    }
