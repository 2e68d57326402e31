"""Sample quality as judged by the digit classifier (trainer.classifier)."""

from __future__ import annotations

import numpy as np
import torch

from trainer.classifier import DigitClassifier, predict
from trainer.model import VAE


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
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, model.cfg.latent_dim, generator=generator)
    decoded = torch.cat([torch.sigmoid(model.decoder(z[s : s + 1000])) for s in range(0, samples, 1000)])
    labels, confidence = predict(judge, decoded)
    confident = confidence >= confidence_threshold
    counts = np.bincount(labels[confident].numpy(), minlength=10)

    recon = []
    for s in range(0, len(test_images), 1000):
        mu, _ = model.encoder(test_images[s : s + 1000])
        recon.append(torch.sigmoid(model.decoder(mu)))
    recon_labels, _ = predict(judge, torch.cat(recon))
    real_labels, _ = predict(judge, test_images)
    return {
        "samples": samples,
        "temperature": 1.0,
        "seed": seed,
        "confidence_threshold": confidence_threshold,
        "confident_share": float(confident.float().mean()),
        "class_shares": (counts / max(1, counts.sum())).round(4).tolist(),
        "min_class_share": float(counts.min() / max(1, counts.sum())),
        "reconstruction_accuracy": float((recon_labels.numpy() == test_labels).mean()),
        "classifier_accuracy": float((real_labels.numpy() == test_labels).mean()),
        "test_images": len(test_images),
    }
