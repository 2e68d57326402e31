"""`vae-train`: train a VAE, evaluate it, and write a versioned artifact into a model store."""

from __future__ import annotations

import datetime as dt
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from service import artifact
from trainer import data
from trainer.classifier import WEIGHTS, load_classifier, weights_sha256
from trainer.evaluate import evaluate
from trainer.export import (
    MAX_EXPORT_BATCH,
    SERVING_FORM_TOLERANCE,
    ServingForms,
    serving_forms,
    to_torchscript,
)
from trainer.learned_prior import CODES, KINDS, STANDARD_DESCRIPTION, Stage, StageConfig, add_learned_prior
from trainer.model import VAEConfig
from trainer.prior import FlowConfig
from trainer.quality import sample_quality
from trainer.report import FIGURES, build_report, model_card
from trainer.train import TrainConfig, resolve_device, train
from trainer.train_prior import MixtureConfig, PriorTrainConfig

CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}
REPO_STORE = Path(__file__).resolve().parents[1] / "model_store"

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    name: Annotated[str, typer.Option(help="model name in the store, e.g. mnist")] = "mnist",
    dataset: Annotated[
        str, typer.Option(help="mnist, fashion-mnist, or a label for any IDX directory")
    ] = "mnist",
    data_dir: Annotated[
        Path, typer.Option(help="directory with the four IDX files", envvar="VAE_DATA_DIR")
    ] = Path("../shared/data/mnist"),
    download: Annotated[bool, typer.Option(help="download a known dataset into --data-dir first")] = False,
    epochs: int = 130,
    batch_size: int = 128,
    lr: Annotated[float, typer.Option(help="peak learning rate (cosine schedule)")] = 1e-3,
    latent_dim: int = 32,
    channels: Annotated[int, typer.Option(help="conv width; the second conv layer has twice as many")] = 32,
    hidden: Annotated[int, typer.Option(help="fully connected width either side of z")] = 512,
    blocks: Annotated[int, typer.Option(help="residual blocks per resolution")] = 0,
    kl_warmup_epochs: float = 10.0,
    free_bits: float = 0.0,
    seed: int = 0,
    device: Annotated[
        str, typer.Option(help="auto (cuda, else mps, else cpu), cpu, cuda, mps", envvar="VAE_TRAIN_DEVICE")
    ] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(help="torch CPU threads (default: torch's choice)", envvar="VAE_TRAIN_THREADS"),
    ] = None,
    # The same variable as the server's store: in a container both point at the shared volume.
    out: Annotated[
        Path, typer.Option(help="model store to write the artifact into", envvar="VAE_MODEL_STORE")
    ] = REPO_STORE,
    workdir: Annotated[Path | None, typer.Option(help="checkpoints (default runs/<name>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the workdir's checkpoint")] = True,
    iwae_k: Annotated[int, typer.Option(help="importance samples for the NLL estimate (0 = skip)")] = 1000,
    limit_train: Annotated[int | None, typer.Option(help="use only N training images (quick runs)")] = None,
    limit_test: Annotated[int | None, typer.Option(help="evaluate on only N test images")] = None,
    progress: bool = True,
    from_artifact: Annotated[
        Path | None,
        typer.Option(
            help="train only the learned prior, on top of this artifact's encoder and decoder (which "
            "are kept bit for bit); the VAE options are then ignored",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    prior: Annotated[bool, typer.Option(help="train the learned prior after the VAE")] = True,
    prior_kind: Annotated[
        str,
        typer.Option(help="mixture (a Gaussian mixture, by EM) or flow (a spline flow; smooth, costlier)"),
    ] = "mixture",
    prior_codes: Annotated[
        str,
        typer.Option(
            help="fit to draws (z ~ q(z|x) of each training image), means (mu(x)), or "
            "confident-draws (the draws the digit classifier reads as their own label; MNIST, "
            "elsewhere every draw)"
        ),
    ] = "confident-draws",
    prior_codes_confidence: Annotated[
        float, typer.Option(help="confident-draws: keep draws the classifier reads this surely (0-1)")
    ] = 0.99,
    prior_draws: Annotated[
        int, typer.Option(help="draws and confident-draws: posterior draws per training image", min=1)
    ] = 4,
    prior_conditional: Annotated[
        bool, typer.Option(help="mixture: one mixture per class, p(z | y) (labelled datasets)")
    ] = True,
    prior_components: Annotated[
        int, typer.Option(help="mixture: Gaussian components (per class when conditional)")
    ] = 20,
    prior_iterations: Annotated[int, typer.Option(help="mixture: EM iterations")] = 40,
    prior_epochs: Annotated[int, typer.Option(help="flow: epochs")] = 30,
    prior_couplings: Annotated[int, typer.Option(help="flow: coupling layers")] = 8,
    prior_hidden: Annotated[int, typer.Option(help="flow: width of each coupling's network")] = 256,
    prior_nll_images: Annotated[
        int, typer.Option(help="test images for the likelihood under each prior (0 = skip)")
    ] = 1000,
) -> None:
    """Train (or resume), evaluate on the test set, and write <out>/<name>/<version>/.

    With --from-artifact, the VAE is not trained: the learned prior is trained on top of the
    given artifact and written as the next version of --name."""
    if prior_kind not in KINDS:
        typer.echo(f"error: --prior-kind must be one of {', '.join(KINDS)}, not {prior_kind!r}", err=True)
        raise typer.Exit(2)
    if prior_codes not in CODES:
        typer.echo(f"error: --prior-codes must be one of {', '.join(CODES)}, not {prior_codes!r}", err=True)
        raise typer.Exit(2)
    if not 0 < prior_codes_confidence < 1:
        typer.echo(
            f"error: --prior-codes-confidence must lie in (0, 1), not {prior_codes_confidence}", err=True
        )
        raise typer.Exit(2)
    stage = StageConfig(
        kind=prior_kind,
        codes=prior_codes,
        codes_confidence=prior_codes_confidence,
        draws_per_image=prior_draws,
        conditional=prior_conditional,
        seed=seed,
        mixture=MixtureConfig(components=prior_components, iterations=prior_iterations, seed=seed),
        flow=PriorTrainConfig(
            flow=FlowConfig(couplings=prior_couplings, hidden=prior_hidden),
            epochs=prior_epochs,
            seed=seed,
            threads=threads,
        ),
        nll_images=prior_nll_images,
    )
    if download:
        data.download(dataset, data_dir)
    if from_artifact is not None:
        try:
            written = run_prior(
                from_artifact,
                name=name,
                store=out,
                data_dir=data_dir,
                stage=stage,
                workdir=workdir or Path("runs") / f"{name}-prior",
                resume=resume,
                progress=progress,
                threads=threads,
            )
        except (data.DatasetError, artifact.ArtifactError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        typer.echo(f"wrote {written.path}")
        return
    cfg = TrainConfig(
        dataset=dataset,
        data_dir=str(data_dir),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        kl_warmup_epochs=kl_warmup_epochs,
        free_bits=free_bits,
        model=VAEConfig(latent_dim=latent_dim, channels=channels, hidden=hidden, blocks=blocks),
        limit_train=limit_train,
        limit_test=limit_test,
        seed=seed,
        device=device,
        threads=threads,
    )
    try:
        written = run(
            cfg,
            name=name,
            store=out,
            workdir=workdir or Path("runs") / name,
            resume=resume,
            iwae_k=iwae_k,
            progress=progress,
            stage=stage if prior else None,
        )
    except data.DatasetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    typer.echo(f"wrote {written.path}")


def run(
    cfg: TrainConfig,
    name: str,
    store: Path,
    workdir: Path,
    resume: bool = True,
    iwae_k: int = 1000,
    progress: bool = True,
    stage: StageConfig | None = None,
) -> artifact.Artifact:
    known = cfg.dataset if cfg.dataset in data.KNOWN_MD5 else None
    fingerprint = data.dataset_fingerprint(cfg.data_dir)
    model, state = train(cfg, workdir, resume=resume, progress=progress)
    model = model.cpu().eval()

    test = data.load_split(cfg.data_dir, "test", known)
    test_u8 = torch.from_numpy(np.array(test.images[: cfg.limit_test]))
    labels = test.labels[: cfg.limit_test]
    log = typer.echo if progress else (lambda *_: None)
    log(f"evaluating on {len(test_u8)} test images (IWAE k={iwae_k}) ...")
    metrics = evaluate(model, test_u8, iwae_k=iwae_k or None)
    grey = test_u8.float().div(255).unsqueeze(1)
    quality = None
    if cfg.dataset == "mnist" and WEIGHTS.is_file():
        quality = sample_quality(model, load_classifier(), grey, labels)
        quality["classifier_sha256"] = weights_sha256()

    class_names = CLASS_NAMES.get(cfg.dataset, [str(k) for k in range(10)])
    figures, _ = build_report(model, state.history, grey, labels, class_names, seed=cfg.seed)
    train_count = len(data.load_split(cfg.data_dir, "train", known).images[: cfg.limit_train])
    manifest = {
        "created_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "description": "Convolutional VAE: Gaussian posterior, N(0, I) prior, Bernoulli pixels",
        "dataset": {
            "name": cfg.dataset,
            "sha256": fingerprint,
            "train_images": train_count,
            "test_images": len(test_u8),
            "class_names": class_names,
        },
        "image_shape": [1, 28, 28],
        "input_range": [0.0, 1.0],
        "latent_dim": cfg.model.latent_dim,
        "prior": "standard normal N(0, I)",
        "posterior": "diagonal Gaussian N(mu, diag(sigma^2)); encode() returns (mu, sigma)",
        "likelihood": "bernoulli",
        "metrics": {
            "test": metrics.as_dict(),
            "how": (
                "Test images binarised stochastically (pixel ~ Bernoulli(intensity/255)) with a fixed "
                "seed. neg_elbo = reconstruction + kl with one z sample per image. iwae_nll = "
                "-mean log (1/k) sum_i p(x, z_i)/q(z_i|x), z_i ~ q(z|x) (Burda et al. 2015), an upper "
                "bound on -log p(x). active_units: dims with Cov_x(E_q[z_u]) > 0.01."
            ),
            "sample_quality": quality,
            "sample_quality_how": (
                "A CNN trained on MNIST (trainer/classifier.py) classifies decode(z), z ~ N(0, I), and "
                "decode(mu(x)) for every grey test image x."
            )
            if quality
            else None,
        },
        "training": {
            "config": asdict(cfg),
            "epochs": state.epoch,
            "wall_time_s": round(state.wall_time_s, 1),
            "cpu_time_s": round(state.cpu_time_s, 1),
            "device": str(resolve_device(cfg.device)),
            "threads": torch.get_num_threads(),
            "history": [
                {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                for row in state.history
            ],
        },
        "libraries": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "platform": platform.platform(),
        },
        "report": {
            "model_card": "report/model_card.md",
            "figures": {f"report/{k}": v for k, v in FIGURES.items() if k in figures},
            "latent_map_data": "report/latent_map.json",
        },
    }
    scripted = to_torchscript(model)
    manifest["priors"] = {"standard": {"description": STANDARD_DESCRIPTION}}
    manifest["default_prior"] = "standard"
    if stage is None:
        return _write(store, name, scripted, manifest, figures, data_dir=cfg.data_dir)
    added = add_learned_prior(
        scripted,
        cfg.dataset,
        cfg.data_dir,
        stage,
        workdir,
        resume,
        progress,
        cfg.limit_train,
        cfg.limit_test,
        class_names=class_names,
    )
    figures.update(added.figures)
    manifest["metrics"].update(added.metrics)
    return _write(
        store,
        name,
        added.model,
        _with_stage(manifest, added),
        figures,
        added.classifier,
        cfg.data_dir,
        added.prior_map,
    )


def _with_stage(manifest: dict, added: Stage) -> dict:
    """The manifest with what the learned-prior stage adds: priors, classes, classifier."""
    manifest = {**manifest, "priors": added.priors, "default_prior": "learned"}
    if added.classes is not None:
        manifest["classes"] = added.classes
    if added.classifier_entry is not None:
        manifest["classifier"] = added.classifier_entry
    return manifest


def _write(
    store: Path,
    name: str,
    scripted: torch.jit.ScriptModule,
    manifest: dict,
    figures: dict[str, bytes],
    classifier: torch.jit.ScriptModule | None = None,
    data_dir: Path | None = None,
    prior_map: torch.nn.Module | None = None,
    classifier_file: bytes | None = None,
) -> artifact.Artifact:
    """The serving forms (checked against `scripted` on real test digits from data_dir), the
    model card, the report's index of figures, then the artifact itself. `classifier_file`:
    classifier.pt's bytes to write as they are (a re-export keeps its base's file)."""
    forms = serving_forms(scripted, classifier, test_digits(data_dir), prior_map=prior_map)
    manifest = {**manifest, **serving_entries(forms)}
    captions = {k: v for k, v in FIGURES.items() if k in figures}
    if "manifold.png" in figures:
        captions["manifold.png"] = "The decoder over a grid of the 2-D latent space"
    manifest["report"] = {
        **manifest.get("report", {}),
        "model_card": "report/model_card.md",
        "figures": {f"report/{k}": v for k, v in captions.items()},
    }
    version = artifact.next_version(store, name)
    card = model_card({**manifest, "name": name, "version": version}, captions)
    figures["model_card.md"] = card.encode()
    return artifact.write_artifact(
        store,
        name,
        forms.torchscript,
        manifest,
        report_files=figures,
        version=version,
        classifier=classifier_file if classifier_file is not None else classifier,
        programs=forms.programs,
        classifier_programs=forms.classifier_programs,
    )


def test_digits(data_dir: Path | None, count: int = 1000) -> torch.Tensor | None:
    """The first `count` test images in [0, 1], [N, 1, 28, 28], or None without the data."""
    if data_dir is None:
        return None
    try:
        test = data.load_split(data_dir, "test")
    except (data.DatasetError, OSError):
        return None
    return torch.from_numpy(np.asarray(test.images[:count], dtype=np.float32) / 255.0).unsqueeze(1)


def serving_entries(forms: ServingForms) -> dict:
    """The manifest's `serving_form` and `exported`: what model.pt computes in which form, what
    model.pt2 holds, and how far each differs from the training modules (measured here)."""
    checks = {k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in forms.checks.items()}
    return {
        "serving_form": {
            "decoder": "channels-last; a transposed convolution to few channels as one matrix product "
            "and four shifted adds, one to many channels as oneDNN's kernel on channels-last memory "
            "(trainer/fast_decoder.py): the training Decoder's function from its weights",
            "tolerance": SERVING_FORM_TOLERANCE,
            "largest_difference": checks,
            "checked_on": f"{checks.get('images')} "
            + ("real test digits" if forms.checked_on_real else "random images (no data at hand)"),
        },
        "exported": {
            "file": artifact.PROGRAMS_FILE,
            "methods": list(forms.methods),
            "classifier_file": artifact.CLASSIFIER_PROGRAMS_FILE if forms.classifier_programs else None,
            "batch": f"dynamic, 1 to {MAX_EXPORT_BATCH} rows",
            "torch": torch.__version__,
        },
    }


# Fields of the base's manifest that describe the base artifact itself, not the model.
_OWN_FIELDS = (
    "format_version",
    "name",
    "version",
    "files",
    "created_at",
    "priors",
    "default_prior",
    "base",
    "classes",
    "classifier",
)


def on_base(art: artifact.Artifact, drop: tuple[str, ...], note: str) -> tuple[dict, dict[str, bytes]]:
    """A new version's manifest and report files, taken from the base artifact it builds on:
    the base's manifest less the fields in `drop`, a new created_at, `base` naming the base (and
    `note`, what is the base's), and its report files but the model card (_write makes one)."""
    manifest = {k: v for k, v in art.manifest.items() if k not in drop}
    manifest["created_at"] = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    manifest["base"] = {
        "name": art.name,
        "version": art.version,
        "model_sha256": art.manifest["files"][artifact.MODEL_FILE],
        "note": note,
    }
    figures = {
        rel.removeprefix(f"{artifact.REPORT_DIR}/"): artifact.read_listed_file(art, rel) or b""
        for rel in art.manifest["files"]
        if rel.startswith(f"{artifact.REPORT_DIR}/") and rel != "report/model_card.md"
    }
    return manifest, figures


def run_prior(
    base_path: Path,
    name: str,
    store: Path,
    data_dir: Path,
    stage: StageConfig,
    workdir: Path,
    resume: bool = True,
    progress: bool = True,
    threads: int | None = None,
) -> artifact.Artifact:
    """A new version of `name`: the artifact at base_path (verified, its encoder and decoder
    kept bit for bit) plus a learned prior trained on the codes of its training set."""
    if threads:
        torch.set_num_threads(threads)
    base, art = artifact.load(base_path)
    dataset = art.manifest.get("dataset") or {}
    fingerprint = data.dataset_fingerprint(data_dir)
    if dataset.get("sha256") and fingerprint != dataset["sha256"]:
        raise data.DatasetError(
            f"{data_dir} is not the data {art.name} {art.version} was trained on (its sha256 "
            f"{fingerprint[:12]}…, the manifest's {dataset['sha256'][:12]}…); pass --data-dir of that dataset"
        )
    added = add_learned_prior(
        base,
        dataset.get("name", "mnist"),
        data_dir,
        stage,
        workdir,
        resume,
        progress,
        class_names=dataset.get("class_names"),
    )
    manifest, figures = on_base(
        art,
        _OWN_FIELDS,
        "encoder and decoder are the base's weights (the encoder bit for bit, the decoder in the "
        "serving form: serving_form says how close): metrics.test and training are the base's",
    )
    manifest["description"] = f"{manifest.get('description', 'VAE')}; plus a learned prior over z"
    manifest = _with_stage(manifest, added)
    manifest["metrics"] = {**manifest.get("metrics", {}), **added.metrics}
    figures.update(added.figures)
    return _write(store, name, added.model, manifest, figures, added.classifier, data_dir, added.prior_map)


if __name__ == "__main__":
    sys.exit(app())
