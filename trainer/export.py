"""Turns a trained VAE into the TorchScript model the artifact contract specifies."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.model import VAE


class ServableVAE(nn.Module):
    """The artifact's model: encode(x) -> (mu, sigma), decode(z) -> Bernoulli means,
    forward(x) = decode(mu). Inputs are float32, images [B, 1, 28, 28] in [0, 1]."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.decoder = vae.decoder
        self.latent_dim = vae.cfg.latent_dim

    @torch.jit.export
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(x)

    @torch.jit.export
    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(z))

    def forward(self, x: Tensor) -> Tensor:
        mu, _ = self.encoder(x)
        return self.decode(mu)


def to_torchscript(vae: VAE) -> torch.jit.ScriptModule:
    servable = ServableVAE(vae).cpu().eval()
    scripted = torch.jit.script(servable)
    # The scripted model must compute what the eager one does; check before it ships.
    with torch.no_grad():
        x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        mu, sigma = scripted.encode(x)
        ref_mu, ref_sigma = servable.encode(x)
        if not (torch.allclose(mu, ref_mu, atol=1e-5) and torch.allclose(sigma, ref_sigma, atol=1e-5)):
            raise RuntimeError("TorchScript export changed the encoder's output")
    return scripted
