"""Turns a trained VAE (and its learned prior) into the TorchScript model the artifact
contract specifies (docs/artifact.md)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.model import VAE


class ServableVAE(nn.Module):
    """The artifact's model: encode(x) -> (mu, sigma), decode(z) -> Bernoulli means,
    forward(x) = decode(mu). Inputs are float32, images [B, 1, 28, 28] in [0, 1]."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = latent_dim

    @torch.jit.export
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(x)

    @torch.jit.export
    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(z))

    def forward(self, x: Tensor) -> Tensor:
        mu, _ = self.encoder(x)
        return self.decode(mu)


class ServableVAEWithPrior(ServableVAE):
    """A servable VAE (the encoder and decoder of its TorchScript module, untouched) plus
    the learned prior's map from noise to latents: prior(u) -> z, [B, D] -> [B, D].
    Sampling is decode(prior(u))."""

    def __init__(self, base: torch.jit.ScriptModule, prior: nn.Module) -> None:
        super().__init__(base.encoder, base.decoder, int(base.latent_dim))
        self.noise_to_latent = prior

    @torch.jit.export
    def prior(self, u: Tensor) -> Tensor:
        return self.noise_to_latent(u)


def _check(scripted: torch.jit.ScriptModule, reference: nn.Module, latent_dim: int) -> None:
    """The scripted model must compute what the eager one does; checked before it ships."""
    with torch.no_grad():
        x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        mu, sigma = scripted.encode(x)
        ref_mu, ref_sigma = reference.encode(x)
        if not (torch.allclose(mu, ref_mu, atol=1e-5) and torch.allclose(sigma, ref_sigma, atol=1e-5)):
            raise RuntimeError("TorchScript export changed the encoder's output")
        if hasattr(reference, "prior"):
            u = torch.randn(5, latent_dim, generator=torch.Generator().manual_seed(0))
            if not torch.allclose(scripted.prior(u), reference.prior(u), atol=1e-4):
                raise RuntimeError("TorchScript export changed the prior's output")


def to_torchscript(vae: VAE) -> torch.jit.ScriptModule:
    servable = ServableVAE(vae.encoder, vae.decoder, vae.cfg.latent_dim).cpu().eval()
    scripted = torch.jit.script(servable)
    _check(scripted, servable, vae.cfg.latent_dim)
    return scripted


def with_prior(base: torch.jit.ScriptModule, prior: nn.Module) -> torch.jit.ScriptModule:
    """The base model's encoder and decoder (bit for bit) with prior(u) added."""
    servable = ServableVAEWithPrior(base, prior.cpu().eval()).eval()
    scripted = torch.jit.script(servable)
    _check(scripted, servable, servable.latent_dim)
    return scripted
