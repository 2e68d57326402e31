"""The models the service runs: a small interface, its TorchScript implementation, and the
registry of what was loaded at startup.

Routes never touch torch; they hand numpy arrays to a ModelRuntime (through
service.model.inference, which moves the call off the event loop). Anything with the same
methods can stand in: a test double, or a micro-batching layer that merges concurrent
requests before calling the real model.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from service import artifact
from service.errors import UnknownModel, one_line
from service.model import latent_map
from service.model import precision as precision_choice
from service.settings import Settings

log = logging.getLogger("service.model.runtime")


@runtime_checkable
class ModelRuntime(Protocol):
    """One loaded model. encode/decode take and return numpy float32 arrays and are called
    from worker threads, possibly several at once."""

    name: str
    version: str
    latent_dim: int
    device: str
    manifest: dict[str, Any]
    priors: tuple[str, ...]  # "standard" first; "learned" when the model has prior()
    default_prior: str
    classes: tuple[str, ...]  # class names by index; empty for a model without classes
    conditional: bool  # whether its learned prior draws a given class
    has_classifier: bool  # whether classify() gives verdicts

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x [B, 28, 28] in [0, 1] -> (mu, sigma), each [B, latent_dim]."""
        ...

    def decode(self, z: np.ndarray) -> np.ndarray:
        """z [B, latent_dim] -> Bernoulli means [B, 28, 28] in [0, 1]."""
        ...

    def prior(self, rows: np.ndarray) -> np.ndarray:
        """The learned prior's map: rows [B, latent_dim + 2] (service.model.latents.draw_rows:
        noise u, temperature, class index or -1) -> latents z [B, latent_dim]. Only called
        when "learned" is among `priors`; a class index only when `conditional`."""
        ...

    def classify(self, x: np.ndarray) -> np.ndarray:
        """Images [B, 28, 28] in [0, 1] -> class probabilities [B, len(classes)]. Only called
        when `has_classifier`."""
        ...


LOW_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Methods:
    """The artifact's functions on torch tensors, however they are run."""

    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    decode: Callable[[torch.Tensor], torch.Tensor]
    prior: Callable[..., torch.Tensor] | None = None  # (u, t) -> z; format 2: (u) -> z
    prior_given: Callable[..., torch.Tensor] | None = None  # (u, y, t) -> z
    classify: Callable[[torch.Tensor], torch.Tensor] | None = None


class TorchRuntime:
    """An artifact's functions on one device, behind the ModelRuntime interface: numpy in,
    numpy out. The subclasses say which files run (TorchScript, or torch.export programs)."""

    runtime = "torchscript"

    def __init__(
        self,
        methods: Methods,
        art: artifact.Artifact,
        device: torch.device,
        low_decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        low_precision: str | None = None,
    ) -> None:
        self.methods = methods
        self.artifact = art
        self.name = art.name
        self.version = art.version
        self.latent_dim = art.latent_dim
        self.device = str(device)
        self.manifest = art.manifest
        self.priors = art.priors
        self.default_prior = art.default_prior
        self.classes = art.classes
        self.conditional = art.conditional
        self.has_classifier = methods.classify is not None
        # Format 3 takes the temperature as an argument (it scales the spread within a
        # component); formats 1 and 2 take the scaled noise, exactly as before.
        self._tempered = art.format_version >= 3
        # The report's latent map (for the explorer page): read and checked once, here at load.
        self.latent_map = latent_map.read(art)
        self._device = device
        # The decoder in a lower precision (VAE_PRECISION), when one was loaded: use_precision
        # switches decode to it once service.model.precision has measured it.
        self._low_decode = low_decode
        self._low_precision = low_precision
        self._low_dtype = LOW_PRECISIONS.get(low_precision or "")
        self.precision = "fp32"
        self.precision_check: dict[str, Any] = {}

    @property
    def low_precision(self) -> str | None:
        """The lower precision this runtime can decode in (None: fp32 only)."""
        return self._low_precision

    def use_precision(self, precision: str, check: dict[str, Any]) -> None:
        """Decode in `precision` (fp32 or the loaded lower one) from now on; before warm-up,
        so that calibration and every pass use it. `check` is what chose it (/models shows it)."""
        if precision != "fp32" and precision != self._low_precision:
            raise ValueError(
                f"model {self.name}: {precision} was not loaded (only fp32 and {self._low_precision})"
            )
        self.precision = precision
        self.precision_check = check

    # As few torch calls as possible around the model, shapes changed in numpy: every torch
    # call from Python lets go of the GIL and must take it back, and on a busy server each
    # take-back can wait a whole GIL switch interval (docs/performance.md).
    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            mu, sigma = self.methods.encode(self._input(x[:, None]))
            # mu and sigma are usually views into one tensor: copy them out contiguous for orjson
            return _to_numpy(mu), _to_numpy(sigma)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self.decode_in(self.precision, z)

    def decode_in(self, precision: str, z: np.ndarray) -> np.ndarray:
        """decode in the given precision (fp32, or the lower one loaded): the measurement of
        service.model.precision compares both on the same rows."""
        with torch.inference_mode():
            if precision == "fp32":
                return _to_numpy(self.methods.decode(self._input(z)))[:, 0]
            assert self._low_decode is not None and self._low_dtype is not None
            return _to_numpy(self._low_decode(self._input(z).to(self._low_dtype)))[:, 0]

    def prior(self, rows: np.ndarray) -> np.ndarray:
        d = self.latent_dim
        u, temperature = rows[:, :d], rows[:, d]
        with torch.inference_mode():
            assert self.methods.prior is not None
            if not self._tempered:
                # u * t in float32, the very product /sample computed before format 3
                return _to_numpy(self.methods.prior(self._input(u * temperature[:, None])))
            t = self._input(temperature)
            if self.conditional:
                assert self.methods.prior_given is not None
                y = torch.from_numpy(rows[:, d + 1].astype(np.int64))
                y = y if self._device.type == "cpu" else y.to(self._device)
                return _to_numpy(self.methods.prior_given(self._input(u), y, t))
            return _to_numpy(self.methods.prior(self._input(u), t))

    def classify(self, x: np.ndarray) -> np.ndarray:
        assert self.methods.classify is not None
        with torch.inference_mode():
            return _to_numpy(self.methods.classify(self._input(x[:, None])))

    def _input(self, array: np.ndarray) -> torch.Tensor:
        """A request's array as the model's float32 input, on its device (no copy on the CPU
        when it already is contiguous float32)."""
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return tensor if self._device.type == "cpu" else tensor.to(self._device)

    def warm_up(self) -> float:
        """Runs both methods once (the first call compiles and allocates) and checks the
        shapes the contract promises. Returns the seconds it took."""
        start = time.perf_counter()
        mu, sigma = self.encode(np.zeros((2, 28, 28), np.float32))
        images = self.decode(mu)
        if mu.shape != (2, self.latent_dim) or sigma.shape != mu.shape or images.shape != (2, 28, 28):
            raise artifact.ArtifactError(
                f"{self.artifact.path}: the model returned mu {list(mu.shape)}, sigma {list(sigma.shape)}, "
                f"images {list(images.shape)}; expected [2, {self.latent_dim}] twice and [2, 28, 28]"
            )
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all() and np.isfinite(images).all()):
            raise artifact.ArtifactError(
                f"{self.artifact.path}: the model returns NaN or infinity on a blank image"
            )
        if artifact.LEARNED_PRIOR in self.priors:
            rows = np.zeros((2, self.latent_dim + 2), np.float32)
            rows[:, -2] = 1.0
            rows[:, -1] = [-1, 0 if self.conditional else -1]
            z = self.prior(rows)
            if z.shape != (2, self.latent_dim) or not np.isfinite(z).all():
                raise artifact.ArtifactError(
                    f"{self.artifact.path}: prior(u) returned {list(z.shape)} "
                    f"{'values' if np.isfinite(z).all() else 'with NaN or infinity'} for u = 0; "
                    f"expected finite [2, {self.latent_dim}]"
                )
        if self.has_classifier:
            probabilities = self.classify(images)
            if probabilities.shape != (2, len(self.classes)) or not np.isfinite(probabilities).all():
                raise artifact.ArtifactError(
                    f"{self.artifact.path}: the classifier returned {list(probabilities.shape)} for two "
                    f"images; expected finite [2, {len(self.classes)}] (one probability per class)"
                )
        return time.perf_counter() - start


class TorchScriptRuntime(TorchRuntime):
    """A TorchScript artifact (model.pt, classifier.pt) on one device."""

    runtime = "torchscript"

    def __init__(
        self,
        model: torch.jit.ScriptModule,
        art: artifact.Artifact,
        device: torch.device,
        classifier: torch.jit.ScriptModule | None = None,
        low_model: torch.jit.ScriptModule | None = None,
        low_precision: str | None = None,
    ) -> None:
        self.model = model
        self.classifier = classifier
        methods = Methods(
            encode=model.encode,
            decode=model.decode,
            prior=getattr(model, "prior", None) if artifact.LEARNED_PRIOR in art.priors else None,
            prior_given=getattr(model, "prior_given", None) if art.conditional else None,
            classify=classifier,
        )
        super().__init__(methods, art, device, low_model.decode if low_model else None, low_precision)

    @classmethod
    def load(cls, path: Path, device: torch.device, low_precision: str | None = None) -> TorchScriptRuntime:
        model, art = artifact.load(path, device)
        scripted_dim = getattr(model, "latent_dim", art.latent_dim)
        if int(scripted_dim) != art.latent_dim:
            raise artifact.ArtifactError(
                f"{path}: manifest says latent_dim {art.latent_dim}, "
                f"the TorchScript model says {scripted_dim}"
            )
        # A second copy whose weights are converted once (not autocast on every pass)
        low = (
            artifact.load_model_file(art, device).to(LOW_PRECISIONS[low_precision]) if low_precision else None
        )
        return cls(model, art, device, artifact.load_classifier(art, device), low, low_precision)


class ExportRuntime(TorchRuntime):
    """An artifact's torch.export programs (model.pt2, classifier.pt2) on one device: the same
    functions as its TorchScript model, without TorchScript (VAE_RUNTIME=export)."""

    runtime = "export"

    @classmethod
    def load(cls, path: Path, device: torch.device, low_precision: str | None = None) -> ExportRuntime:
        art = artifact.Artifact(path, artifact.verify(path))
        programs = artifact.load_programs(art, device)
        methods = Methods(
            encode=programs["encode"],
            decode=programs["decode"],
            prior=programs.get("prior") if artifact.LEARNED_PRIOR in art.priors else None,
            prior_given=programs.get("prior_given") if art.conditional else None,
            classify=programs.get("classify") if art.has_classifier else None,
        )
        needed = ["prior"] if artifact.LEARNED_PRIOR in art.priors else []
        needed += ["prior_given"] if art.conditional else []
        missing = [m for m in needed if getattr(methods, m) is None]
        if missing:
            raise artifact.ArtifactError(f"{path}: model.pt2 has no program for {', '.join(missing)}")
        low = copy.deepcopy(programs["decode"]).to(LOW_PRECISIONS[low_precision]) if low_precision else None
        return cls(methods, art, device, low, low_precision)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad:
        return np.ascontiguousarray(t.numpy())  # no torch call: see TorchScriptRuntime.encode
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


@dataclass(frozen=True)
class ModelRegistry:
    """The loaded models by name, and the one used when a request names none."""

    models: dict[str, ModelRuntime]
    default: str

    def __post_init__(self) -> None:
        if self.default not in self.models:
            raise ValueError(f"default model {self.default!r} is not among {sorted(self.models)}")

    def get(self, name: str | None = None) -> ModelRuntime:
        if name is None or name == "":
            return self.models[self.default]
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(
                f"no model named {name!r} is loaded; loaded models: "
                f"{', '.join(sorted(self.models))} (GET /models lists them)"
            ) from None

    def __iter__(self) -> Iterator[ModelRuntime]:
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)


class NoModelsError(RuntimeError):
    """Nothing could be loaded, so there is nothing to serve."""


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must be usable here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NoModelsError(
            f"device {name!r} was asked for, but this torch build sees no CUDA GPU "
            f"(torch {torch.__version__}); use --device cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise NoModelsError(
            f"device {name!r} was asked for, but only {torch.cuda.device_count()} GPU(s) exist"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise NoModelsError(f"device {name!r} was asked for, but MPS is not available here; use cpu or auto")
    return device


def selected_models(settings: Settings) -> list[tuple[str, str | None]]:
    """(name, pinned version or None) for every model to load."""
    return settings.model_specs() or [(name, None) for name in artifact.list_models(settings.model_store)]


class ModelRefused(RuntimeError):
    """An artifact that verified but cannot be served: its model crashed or misbehaved on its
    warm-up run. The message says how, in one line."""


def load_model(
    path: Path,
    device: torch.device,
    warm_up: bool = True,
    runtime: str = "torchscript",
    precision: str = "fp32",
    check_draws: int = precision_choice.CHECK_DRAWS,
) -> tuple[ModelRuntime, float]:
    """Loads, verifies and (optionally) warms up one artifact, with `runtime`'s files
    (VAE_RUNTIME) and decoding in the precision VAE_PRECISION chooses (service.model.precision,
    measured here, before any pass size is calibrated); returns it and the warm-up's seconds.
    The one place a runtime is built, at startup (load_registry) and on reload
    (service.model.reload), so anything that wraps runtimes belongs here to apply to both.
    Raises ArtifactError (missing, tampered, wrong shapes) or ModelRefused (crashed)."""
    kind = ExportRuntime if runtime == "export" else TorchScriptRuntime
    low = precision_choice.lower_precision_to_load(precision, device, measured=warm_up)
    try:
        model = kind.load(path, device, low)
    except artifact.ArtifactError:
        raise
    except Exception as exc:  # one unloadable model must not take the others (or the server) down
        raise ModelRefused(f"{path}: it could not be loaded ({one_line(exc)})") from exc
    if not warm_up:
        precision_choice.choose(model, precision, measure=False)
        return model, 0.0
    try:
        seconds = model.warm_up()
        started = time.perf_counter()
        precision_choice.choose(model, precision, check_draws)
        return model, seconds + time.perf_counter() - started
    except artifact.ArtifactError:
        raise
    except Exception as exc:  # a model that crashes on warm-up must not take the others down
        # The path and one line, as for the artifact checks: the operator reads which
        # artifact failed and how, not the interpreter's traceback.
        raise ModelRefused(f"{path}: it failed its warm-up run ({one_line(exc)})") from exc


def load_configured(
    path: Path, settings: Settings, device: torch.device, warm_up: bool
) -> tuple[ModelRuntime, float]:
    """load_model with the settings' runtime and precision: at startup and on reload alike."""
    return load_model(
        path, device, warm_up, settings.runtime, settings.precision, settings.precision_check_draws
    )


def load_registry(settings: Settings) -> ModelRegistry:
    """Loads, verifies and warms every selected model. A model that fails is logged in one
    line and skipped; NoModelsError when none is left."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    store = settings.model_store
    specs = selected_models(settings)
    if not specs:
        reason = (
            "the directory does not exist"
            if not store.is_dir()
            else "it holds no <name>/<version>/ artifacts"
        )
        raise NoModelsError(
            f"no models to serve in {store}: {reason}; train one (make model) "
            "or point VAE_MODEL_STORE / --model-store at a store"
        )
    models: dict[str, ModelRuntime] = {}
    for name, version in specs:
        try:
            path = artifact.resolve(store, name, version)
            runtime, seconds = load_configured(path, settings, device, settings.warmup)
        except (artifact.ArtifactError, ModelRefused) as exc:
            log.error("refusing model %s%s: %s", name, f" {version}" if version else "", exc)
            continue
        models[name] = runtime
        log.info(
            "loaded model %s %s from %s: latent_dim %d on %s, warm-up %.2f s (runtime %s, precision %s)",
            name,
            runtime.version,
            path,
            runtime.latent_dim,
            runtime.device,
            seconds,
            getattr(runtime, "runtime", "?"),
            getattr(runtime, "precision", "fp32"),
        )
    if not models:
        raise NoModelsError(
            f"none of the {len(specs)} model(s) in {store} could be loaded "
            "(each refusal is logged above); nothing to serve"
        )
    default = settings.default_model
    if default not in models:
        fallback = next(iter(models))
        # Asked for explicitly (or in the store but refused): worth a warning. The built-in
        # default simply absent from the store: the first model serving is expected.
        level = (
            logging.WARNING
            if "default_model" in settings.model_fields_set or default in dict(specs)
            else logging.INFO
        )
        log.log(
            level, "default model %r is not loaded; requests that name no model go to %r", default, fallback
        )
        default = fallback
    return ModelRegistry(models, default)
