"""A convolutional variational autoencoder for 28x28 grayscale images.

The encoder maps an image x to the parameters of a diagonal Gaussian posterior
q(z|x) = N(mu, diag(sigma^2)); the decoder maps a latent z to the logits of
independent Bernoulli distributions over the 784 pixels, p(x|z). The prior is
p(z) = N(0, I). Training maximises the evidence lower bound (ELBO):

    log p(x) >= E_q[log p(x|z)] - KL(q(z|x) || p(z))

whose two terms are the (negative) reconstruction loss and the KL divergence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class VAEConfig:
    latent_dim: int = 32
    channels: int = 64  # width of the first conv layer; the second has twice as many
    hidden: int = 512  # width of the fully connected layer either side of z
    blocks: int = 1  # residual blocks at each resolution (0 gives a plain strided conv net)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection: depth without vanishing gradients."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 4, stride=2, padding=1),  # 28 -> 14
            *[ResBlock(c) for _ in range(cfg.blocks)],
            nn.SiLU(),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1),  # 14 -> 7
            *[ResBlock(2 * c) for _ in range(cfg.blocks)],
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * c * 7 * 7, cfg.hidden),
            nn.SiLU(),
            nn.Linear(cfg.hidden, 2 * cfg.latent_dim),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, pre_sigma = self.net(x).chunk(2, dim=1)
        # softplus keeps sigma > 0 without the overflow risk of exp(log_sigma)
        sigma = F.softplus(pre_sigma) + 1e-4
        return mu, sigma


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.net = nn.Sequential(
            nn.Linear(cfg.latent_dim, cfg.hidden),
            nn.SiLU(),
            nn.Linear(cfg.hidden, 2 * c * 7 * 7),
            nn.Unflatten(1, (2 * c, 7, 7)),
            *[ResBlock(2 * c) for _ in range(cfg.blocks)],
            nn.SiLU(),
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1),  # 7 -> 14
            *[ResBlock(c) for _ in range(cfg.blocks)],
            nn.SiLU(),
            nn.ConvTranspose2d(c, 1, 4, stride=2, padding=1),  # 14 -> 28
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)  # Bernoulli logits, [B, 1, 28, 28]


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (logits of p(x|z), mu, sigma) for one reparameterised sample z."""
        mu, sigma = self.encoder(x)
        z = mu + sigma * torch.randn_like(sigma)  # reparameterisation: gradients flow to mu, sigma
        return self.decoder(z), mu, sigma


def kl_to_standard_normal(mu: Tensor, sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per latent dimension, in nats (closed form)."""
    return 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0) - torch.log(sigma)


def reconstruction_nll(logits: Tensor, x: Tensor) -> Tensor:
    """-log p(x|z) under independent Bernoullis, summed over pixels: one value per image."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def log_normal(z: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """log N(z; mu, diag(sigma^2)) summed over the last dimension."""
    return (-0.5 * ((z - mu) / sigma).pow(2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)
