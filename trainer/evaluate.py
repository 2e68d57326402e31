"""Held-out evaluation: the negative ELBO and its terms, the importance-weighted NLL
bound (Burda et al. 2015) and the number of active latent units."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from trainer.model import VAE, kl_to_standard_normal, log_normal, reconstruction_nll


@dataclass
class Metrics:
    neg_elbo: float  # nats per image, = reconstruction + kl
    reconstruction: float  # E_q[-log p(x|z)], one sample of z per image
    kl: float  # KL(q(z|x) || N(0, I)), closed form
    iwae_nll: float | None  # -log p(x) estimated with k importance samples (an upper bound)
    iwae_k: int | None
    active_units: int  # dims whose posterior mean varies across the data: Cov_x(mu_u) > 0.01
    images: int
    binarisation_seed: int

    def as_dict(self) -> dict:
        return asdict(self)


def binarise(images_u8: Tensor, generator: torch.Generator) -> Tensor:
    """Stochastic binarisation: each pixel is 1 with probability intensity/255."""
    probs = images_u8.float().div_(255.0).unsqueeze(1)
    return torch.bernoulli(probs, generator=generator)


@torch.no_grad()
def iwae_log_likelihood(
    model: VAE, x: Tensor, k: int, chunk: int = 500, log_prior: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """log p(x) >= log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x); tight as k grows.
    Returns one estimate per image. Samples are drawn in chunks to bound memory.
    `log_prior` is log p(z) per row (a learned prior's density); N(0, I) when None.
    `model` needs only .encoder and .decoder (the VAE, or its TorchScript module)."""
    mu, sigma = model.encoder(x)
    log_weights = []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        z = mu.unsqueeze(0) + sigma.unsqueeze(0) * torch.randn(n, *mu.shape, device=x.device)
        logits = model.decoder(z.flatten(0, 1)).view(n, x.shape[0], *x.shape[1:])
        log_px_z = -reconstruction_nll(logits.flatten(0, 1), x.repeat(n, 1, 1, 1)).view(n, -1)
        if log_prior is None:
            log_pz = log_normal(z, torch.zeros_like(z), torch.ones_like(z))
        else:
            log_pz = log_prior(z.flatten(0, 1)).view(n, -1)
        log_qz_x = log_normal(z, mu.unsqueeze(0), sigma.unsqueeze(0))
        log_weights.append(log_px_z + log_pz - log_qz_x)
    return torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(k)


@torch.no_grad()
def evaluate(
    model: VAE,
    images_u8: Tensor,
    iwae_k: int | None = 1000,
    seed: int = 1234,
    batch_size: int = 500,
) -> Metrics:
    """Evaluates on stochastically binarised images; the binarisation and all sampling use
    `seed`, so the same model always gets the same figures on the same device."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    rec_sum = kl_sum = nll_sum = 0.0
    mus = []
    for start in range(0, len(images_u8), batch_size):
        x = binarise(images_u8[start : start + batch_size].cpu(), generator).to(device)
        logits, mu, sigma = model(x)
        rec_sum += reconstruction_nll(logits, x).sum().item()
        kl_sum += kl_to_standard_normal(mu, sigma).sum().item()
        mus.append(mu.cpu())
        if iwae_k:
            iwae_batch = max(1, 20_000 // iwae_k) if device.type == "cpu" else batch_size
            for s in range(0, len(x), iwae_batch):
                nll_sum -= iwae_log_likelihood(model, x[s : s + iwae_batch], iwae_k).sum().item()
    n = len(images_u8)
    active = int((torch.cat(mus).var(dim=0) > 0.01).sum())
    return Metrics(
        neg_elbo=(rec_sum + kl_sum) / n,
        reconstruction=rec_sum / n,
        kl=kl_sum / n,
        iwae_nll=nll_sum / n if iwae_k else None,
        iwae_k=iwae_k,
        active_units=active,
        images=n,
        binarisation_seed=seed,
    )
