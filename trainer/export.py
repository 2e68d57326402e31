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
    the learned prior's map from noise to latents (format 3): prior(u, temperature) -> z,
    u [B, D] and temperature [B] -> z [B, D]. Sampling is decode(prior(u, t)). `prior_map`
    is called as prior_map(u, y, t) with y = -1 (any class) for every row."""

    def __init__(self, base: torch.jit.ScriptModule, prior_map: nn.Module) -> None:
        super().__init__(base.encoder, base.decoder, int(base.latent_dim))
        self.noise_to_latent = prior_map

    @torch.jit.export
    def prior(self, u: Tensor, temperature: Tensor) -> Tensor:
        anyone = torch.full((u.shape[0],), -1, dtype=torch.long, device=u.device)
        return self.noise_to_latent(u, anyone, temperature)


class ServableVAEWithClassPrior(ServableVAEWithPrior):
    """... and the class-conditional map: prior_given(u, y, temperature) -> z, y [B] the class
    index of each row (int64; -1 draws from the mixture over every class, as prior does)."""

    @torch.jit.export
    def prior_given(self, u: Tensor, y: Tensor, temperature: Tensor) -> Tensor:
        return self.noise_to_latent(u, y, temperature)


class TemperedFlow(nn.Module):
    """A flow's noise-to-latent map called like the mixtures: (u, y, t) -> f^-1(t u); a flow
    has no components, so the temperature scales its input, and y is not used."""

    def __init__(self, noise_to_latent: nn.Module) -> None:
        super().__init__()
        self.inverse = noise_to_latent

    def forward(self, u: Tensor, y: Tensor, temperature: Tensor) -> Tensor:
        return self.inverse(u * temperature.unsqueeze(1))


class ClassProbabilities(nn.Module):
    """The artifact's classifier.pt: images [B, 1, 28, 28] in [0, 1] -> class probabilities
    [B, C], softmax of a classifier's logits."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.classifier(x), dim=1)


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
            t = torch.tensor([1.0, 0.5, 1.0, 2.0, 0.1])
            if not torch.allclose(scripted.prior(u, t), reference.prior(u, t), atol=1e-4):
                raise RuntimeError("TorchScript export changed the prior's output")
        if hasattr(reference, "prior_given"):
            y = torch.tensor([0, 1, -1, 0, 1])
            if not torch.allclose(scripted.prior_given(u, y, t), reference.prior_given(u, y, t), atol=1e-4):
                raise RuntimeError("TorchScript export changed the conditional prior's output")


def to_torchscript(vae: VAE) -> torch.jit.ScriptModule:
    servable = ServableVAE(vae.encoder, vae.decoder, vae.cfg.latent_dim).cpu().eval()
    scripted = torch.jit.script(servable)
    _check(scripted, servable, vae.cfg.latent_dim)
    return scripted


def with_prior(
    base: torch.jit.ScriptModule, prior_map: nn.Module, conditional: bool = False
) -> torch.jit.ScriptModule:
    """The base model's encoder and decoder (bit for bit) with prior(u, t) added, and
    prior_given(u, y, t) when the map is class-conditional. `prior_map(u, y, t) -> z`."""
    kind = ServableVAEWithClassPrior if conditional else ServableVAEWithPrior
    servable = kind(base, prior_map.cpu().eval()).eval()
    scripted = torch.jit.script(servable)
    _check(scripted, servable, servable.latent_dim)
    return scripted


def classifier_to_torchscript(classifier: nn.Module) -> torch.jit.ScriptModule:
    """The classifier as classifier.pt: probabilities, checked against the eager module."""
    module = ClassProbabilities(classifier.cpu().eval()).eval()
    scripted = torch.jit.script(module)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(scripted(x), module(x), atol=1e-6):
            raise RuntimeError("TorchScript export changed the classifier's output")
    return scripted
