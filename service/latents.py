"""The prior N(0, I): drawing latents reproducibly, and each posterior's KL divergence from it."""

from __future__ import annotations

import secrets

import numpy as np
import torch

MAX_SEED = 2**63 - 1
RANDOM_SEED_BITS = 31  # chosen seeds stay small enough for any JSON client to hold exactly


def random_seed() -> int:
    return secrets.randbits(RANDOM_SEED_BITS)


def draw_latents(n: int, latent_dim: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    """n latents from N(0, temperature^2 I), float32 [n, latent_dim].

    A private CPU generator, never the global RNG: the same seed gives the same latents
    whatever other requests are doing, on whichever device the model then runs."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(n, latent_dim, generator=generator, dtype=torch.float32)
    return (z * temperature).numpy()


def kl_to_prior(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """KL(N(mu, diag(sigma^2)) || N(0, I)) per row, in nats (closed form)."""
    mu64 = mu.astype(np.float64)
    sigma64 = sigma.astype(np.float64)
    return 0.5 * (mu64**2 + sigma64**2 - 1.0 - 2.0 * np.log(sigma64)).sum(axis=1)
