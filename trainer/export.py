"""Turns a trained VAE (and its learned prior) into the models the artifact contract
specifies (docs/artifact.md): TorchScript (model.pt, classifier.pt), and since issue 26 the
same functions as torch.export programs (model.pt2, classifier.pt2).

What ships is the serving form (`serving_forms`): the decoder rewritten channels-last, a
transposed convolution to few channels as a matrix product (trainer.fast_decoder), checked
against the training module's function before it is written. The trainer first builds the plain
TorchScript model (`to_torchscript`, `with_prior`); serving_forms rebuilds eager modules from
its weights, so a shipped artifact can be re-exported the same way (trainer.reexport).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trainer.classifier import DigitClassifier
from trainer.fast_decoder import FastDecoder
from trainer.model import VAE, Decoder, Encoder, VAEConfig
from trainer.prior import ClassMixtureMap, MixtureMap

# The largest per-pixel difference the serving form may have from the training module's
# decode, on real digits (issue 26): rounding only, never another function.
SERVING_FORM_TOLERANCE = 1e-5
# torch.export's batch dimension: any count from 1 to this (the service's passes are far smaller).
MAX_EXPORT_BATCH = 1 << 16


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

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int, prior_map: nn.Module) -> None:
        super().__init__(encoder, decoder, latent_dim)
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
    servable = kind(base.encoder, base.decoder, int(base.latent_dim), prior_map.cpu().eval()).eval()
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


# ---------------------------------------------------------------------------- serving forms


@dataclass
class ServingForms:
    """What an artifact ships: model.pt in the serving form, and the torch.export programs."""

    torchscript: torch.jit.ScriptModule
    programs: bytes  # model.pt2: one program per method, batch dimension dynamic
    methods: tuple[str, ...]
    classifier_programs: bytes | None = None  # classifier.pt2
    # What was checked: the largest difference from the training module per method and form
    checks: dict[str, Any] = field(default_factory=dict)
    checked_on_real: bool = False  # on real test digits (else random images)


def infer_config(decoder_state: dict[str, Tensor], encoder_state: dict[str, Tensor]) -> VAEConfig:
    """The VAEConfig of trainer.model's Encoder/Decoder from their weights' names and shapes."""
    first = decoder_state["net.0.weight"]  # Linear(latent_dim, hidden)
    blocks = sum(1 for k in encoder_state if k.endswith("conv1.weight")) // 2
    return VAEConfig(
        latent_dim=int(first.shape[1]),
        hidden=int(first.shape[0]),
        channels=int(encoder_state["net.0.weight"].shape[0]),
        blocks=blocks,
    )


# Buffers that shipped maps carry and nothing reads: v3's ClassMixtureMap kept the class shares
# that its log_weights already hold. Left out when a map is rebuilt.
_UNREAD_BUFFERS = ("class_shares",)


def _buffers_only(kind: type[nn.Module], scripted: torch.jit.ScriptModule, **attributes: Any) -> nn.Module:
    """A prior map (MixtureMap, ClassMixtureMap: buffers and ints, no parameters) rebuilt from
    its TorchScript module's buffers, without refitting anything."""
    module = kind.__new__(kind)
    nn.Module.__init__(module)
    for name, tensor in scripted.state_dict().items():
        if name not in _UNREAD_BUFFERS:
            module.register_buffer(name, tensor.detach().clone())
    for name, value in attributes.items():
        setattr(module, name, value)
    return module.eval()


def _prior_map(scripted: torch.jit.ScriptModule) -> nn.Module:
    kind = getattr(scripted, "original_name", type(scripted).__name__)
    if kind == "ClassMixtureMap":
        return _buffers_only(
            ClassMixtureMap, scripted, classes=int(scripted.classes), latent_dim=int(scripted.latent_dim)
        )
    if kind == "MixtureMap":
        return _buffers_only(MixtureMap, scripted, latent_dim=int(scripted.latent_dim))
    raise ValueError(
        f"the serving form rebuilds mixture priors only, not a {kind}: export this model with to_torchscript"
    )


def eager_servable(scripted: torch.jit.ScriptModule, prior_map: nn.Module | None = None) -> nn.Module:
    """The artifact's model as eager modules in the serving form: trainer.model's Encoder as
    trained, the FastDecoder of its Decoder, and the prior map: `prior_map` (the eager module
    the trainer scripted) or, for a mixture, rebuilt from the TorchScript module's buffers."""
    encoder_state, decoder_state = scripted.encoder.state_dict(), scripted.decoder.state_dict()
    cfg = infer_config(decoder_state, encoder_state)
    encoder, decoder = Encoder(cfg), Decoder(cfg)
    encoder.load_state_dict(encoder_state)
    decoder.load_state_dict(decoder_state)
    fast = FastDecoder(decoder.eval())
    if not hasattr(scripted, "prior"):
        return ServableVAE(encoder.eval(), fast.eval(), cfg.latent_dim).eval()
    kind = ServableVAEWithClassPrior if hasattr(scripted, "prior_given") else ServableVAEWithPrior
    prior_map = prior_map if prior_map is not None else _prior_map(scripted.noise_to_latent)
    return kind(encoder.eval(), fast.eval(), cfg.latent_dim, prior_map.eval()).eval()


class _Method(nn.Module):
    """One method of a servable as a module's forward: torch.export exports forward only."""

    def __init__(self, servable: nn.Module, method: str) -> None:
        super().__init__()
        self.servable = servable
        self.method = method

    def forward(self, *args: Tensor) -> Any:
        return getattr(self.servable, self.method)(*args)


def _examples(method: str, latent_dim: int) -> tuple[Tensor, ...]:
    """Inputs to trace each method with: distinct rows, every class and 'any' for y."""
    g = torch.Generator().manual_seed(0)
    if method in ("encode", "forward", "classify"):
        return (torch.rand(5, 1, 28, 28, generator=g),)
    u = torch.randn(5, latent_dim, generator=g)
    t = torch.tensor([1.0, 0.5, 1.0, 2.0, 0.1])
    if method == "decode":
        return (u,)
    if method == "prior":
        return (u, t)
    return (u, torch.tensor([0, 1, -1, 0, 1]), t)  # prior_given


def export_programs(servables: dict[str, tuple[nn.Module, str]], latent_dim: int) -> bytes:
    """One .pt2 archive holding a torch.export program per method ({name: (module, method)}),
    every input's first dimension dynamic (1 to MAX_EXPORT_BATCH rows)."""
    from torch.export.pt2_archive._package import package_pt2  # the multi-program .pt2 writer

    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    programs = {}
    for name, (module, method) in servables.items():
        args = _examples(method, latent_dim)
        dynamic = (tuple({0: batch} for _ in args),)  # forward(*args): one entry, the tuple
        with torch.no_grad():
            programs[name] = torch.export.export(_Method(module, method).eval(), args, dynamic_shapes=dynamic)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # "No complete tensor found in the group": weights that share a storage, all on the CPU here
        warnings.filterwarnings("ignore", "No complete tensor found", UserWarning)
        package_pt2(buffer, exported_programs=programs)
    return buffer.getvalue()


def _method_modules(servable: nn.Module, methods: list[str]) -> dict[str, tuple[nn.Module, str]]:
    """Each method on a module that holds only the weights it uses: a program stores every
    weight of the module it was exported from, used or not (model.pt2 was 57 MB, not 14)."""
    none, d = nn.Identity(), int(servable.latent_dim)
    modules: dict[str, tuple[nn.Module, str]] = {
        "encode": (ServableVAE(servable.encoder, none, d), "encode"),
        "decode": (ServableVAE(none, servable.decoder, d), "decode"),
    }
    if "prior" in methods:
        modules["prior"] = (ServableVAEWithPrior(none, none, d, servable.noise_to_latent), "prior")
    if "prior_given" in methods:
        modules["prior_given"] = (
            ServableVAEWithClassPrior(none, none, d, servable.noise_to_latent),
            "prior_given",
        )
    return {m: modules[m] for m in methods}


def _largest_difference(a: Tensor | tuple[Tensor, ...], b: Tensor | tuple[Tensor, ...]) -> float:
    pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
    return max(float((x - y).abs().max()) for x, y in pairs)  # type: ignore[misc]


def serving_forms(
    scripted: torch.jit.ScriptModule,
    classifier: torch.jit.ScriptModule | None = None,
    images: Tensor | None = None,
    classifier_module: nn.Module | None = None,
    prior_map: nn.Module | None = None,
) -> ServingForms:
    """The artifact's model.pt in the serving form, model.pt2 and classifier.pt2, each checked
    against `scripted` (the training modules' function) on `images` ([N, 1, 28, 28] in [0, 1];
    real test digits where the caller has them, else random ones): decode of their posterior
    means at most SERVING_FORM_TOLERANCE per pixel, every other method within 1e-5. The
    classifier's program is exported from `classifier_module` (the eager network inside
    classifier.pt), rebuilt from classifier.pt's weights when it is the trainer's DigitClassifier."""
    servable = eager_servable(scripted, prior_map)
    fast = torch.jit.script(servable)
    methods = ["encode", "decode"] + [m for m in ("prior", "prior_given") if hasattr(scripted, m)]
    latent_dim = int(scripted.latent_dim)
    programs = export_programs(_method_modules(servable, methods), latent_dim)
    exported = load_programs(programs)
    real = images is not None
    if images is None:
        images = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    checks: dict[str, Any] = {"images": len(images)}
    with torch.no_grad():
        mu, _ = scripted.encode(images)
        inputs = {"encode": (images,), "decode": (mu,)}
        for method in methods[2:]:
            inputs[method] = _examples(method, latent_dim)
        for method in methods:
            reference = getattr(scripted, method)(*inputs[method])
            for form, run in (("torchscript", getattr(fast, method)), ("export", exported[method])):
                difference = _largest_difference(run(*inputs[method]), reference)
                checks[f"{method}_{form}"] = difference
                if not difference <= SERVING_FORM_TOLERANCE:
                    raise RuntimeError(
                        f"the serving form's {method} ({form}) differs from the training module's by "
                        f"{difference:.3g}, more than {SERVING_FORM_TOLERANCE:g}: it is not the same function"
                    )
    forms = ServingForms(fast, programs, tuple(methods), checks=checks, checked_on_real=real)
    if classifier is not None:
        if classifier_module is None:
            classifier_module = DigitClassifier()
            classifier_module.load_state_dict(classifier.classifier.state_dict())
        probabilities = ClassProbabilities(classifier_module.eval()).eval()
        forms.classifier_programs = export_programs({"classify": (probabilities, "forward")}, latent_dim)
        run = load_programs(forms.classifier_programs)["classify"]
        with torch.no_grad():
            difference = _largest_difference(run(images), classifier(images))
        checks["classify_export"] = difference
        if not difference <= 1e-5:
            raise RuntimeError(f"the exported classifier differs from classifier.pt by {difference:.3g}")
    return forms


def load_programs(data: bytes) -> dict[str, Any]:
    """The callables of a .pt2 archive's programs, by name (as the service loads them)."""
    from torch.export.pt2_archive._package import load_pt2

    with warnings.catch_warnings():
        # torch 2.13's reader: "No complete tensor found in the group" for weights that are on the CPU
        warnings.filterwarnings("ignore", "No complete tensor found", UserWarning)
        contents = load_pt2(io.BytesIO(data))
    return {name: program.module() for name, program in contents.exported_programs.items()}
