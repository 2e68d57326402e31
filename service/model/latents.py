"""The prior N(0, I): drawing latents reproducibly, and each posterior's KL divergence from it."""

from __future__ import annotations

import hashlib
import random
import secrets

import numpy as np
import torch

# The largest integer every JSON client holds exactly (JavaScript's Number.MAX_SAFE_INTEGER):
# a seed the document allows is one any client can send and read back unchanged.
MAX_SEED = 2**53 - 1
# Latents beyond this are refused (422): nothing a decoder learned lives there, and near
# float32's limit (~3e38) the first layer overflows and the model returns NaN, which would
# otherwise be a 500 model-failed for what is really bad input (service.model.faults).
MAX_ABS_LATENT = 1e6
RANDOM_SEED_BITS = 31  # chosen seeds stay small enough for any JSON client to hold exactly


# Chosen seeds need to be unpredictable to nobody, only distinct: a process-local generator,
# seeded once from the OS, costs a fraction of a system call per request (secrets.randbits).
_seeds = random.Random(secrets.randbits(64))


def random_seed() -> int:
    return _seeds.getrandbits(RANDOM_SEED_BITS)


def draw_latents(n: int, latent_dim: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    """n latents from N(0, temperature^2 I), float32 [n, latent_dim].

    A private CPU generator, never the global RNG: the same seed gives the same latents
    whatever other requests are doing, on whichever device the model then runs."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(n, latent_dim, generator=generator, dtype=torch.float32).numpy()
    # Scaled in numpy (float32 x float32, the same product torch computes) and skipped at 1:
    # a torch op on a tiny tensor costs more in dispatch than the arithmetic.
    return z if temperature == 1.0 else z * np.float32(temperature)


def kl_to_prior(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """KL(N(mu, diag(sigma^2)) || N(0, I)) per row, in nats (closed form)."""
    mu64 = mu.astype(np.float64)
    sigma64 = sigma.astype(np.float64)
    return 0.5 * (mu64**2 + sigma64**2 - 1.0 - 2.0 * np.log(sigma64)).sum(axis=1)


def redraw_latents(n: int, latent_dim: int, seed: int, attempt: int) -> np.ndarray:
    """The noise of a request's `attempt`-th redraw (min_confidence): n rows from a generator
    seeded by a hash of (seed, attempt), of which the draws being replaced take their own row,
    so that draw i's noise depends on the seed, i and the attempt only, never on the others."""
    digest = hashlib.blake2b(f"{seed}:{attempt}".encode(), digest_size=8).digest()
    return draw_latents(n, latent_dim, int.from_bytes(digest, "big") >> 1)


def draw_rows(u: np.ndarray, temperature: float, label: int | None) -> np.ndarray:
    """A draw through the learned prior as the rows its pass takes, float32 [n, latent_dim + 2]:
    the noise u (at temperature 1), the temperature, the class index (-1: any class). One
    array, so that requests of different temperatures and classes merge into one pass."""
    rows = np.empty((len(u), u.shape[1] + 2), np.float32)
    rows[:, :-2] = u
    rows[:, -2] = temperature
    rows[:, -1] = -1 if label is None else label
    return rows
