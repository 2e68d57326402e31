"""`vae-export`: a shipped artifact written again as a new version, in the serving form and with
its torch.export programs, from the same weights (no retraining).

    vae-export model_store/mnist/v3              # writes model_store/mnist/v4

The encoder, decoder, prior and classifier keep their weights; the new version's model.pt
computes the same functions with the decoder in the serving form (trainer/fast_decoder.py),
checked against the base on real test digits (--data-dir) before anything is written, and
model.pt2 / classifier.pt2 carry the same methods as torch.export programs. The manifest is the
base's (figures, priors, classes, classifier), with `base` naming it and `serving_form` and
`exported` saying what is new. Artifacts are immutable, so the base stays as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from service import artifact
from trainer.cli import REPO_STORE, _write, on_base

app = typer.Typer(add_completion=False, help=__doc__)

# Fields of the base's manifest that describe that artifact itself, not the model.
_OWN_FIELDS = ("format_version", "name", "version", "files", "created_at", "base", "serving_form", "exported")


def reexport(path: Path, store: Path, data_dir: Path | None) -> artifact.Artifact:
    model, art = artifact.load(path)
    if art.format_version < 3:
        raise typer.BadParameter(
            f"{path} is format {art.format_version}; only format 3 artifacts are re-exported"
        )
    if getattr(model.decoder, "original_name", "") != "Decoder":
        raise typer.BadParameter(f"{path}: its decoder is already in the serving form")
    classifier = artifact.load_classifier(art)
    manifest, figures = on_base(
        art,
        _OWN_FIELDS,
        "re-exported from the base's weights (vae-export): the same encoder, prior and classifier, "
        "the decoder in the serving form; every figure is the base's",
    )
    kept = artifact.read_listed_file(art, artifact.CLASSIFIER_FILE) if classifier is not None else None
    return _write(store, art.name, model, manifest, figures, classifier, data_dir, classifier_file=kept)


@app.command()
def main(
    path: Annotated[Path, typer.Argument(help="the artifact to re-export, e.g. model_store/mnist/v3")],
    out: Annotated[
        Path, typer.Option(help="model store to write the new version into", envvar="VAE_MODEL_STORE")
    ] = REPO_STORE,
    data_dir: Annotated[
        Path, typer.Option(help="MNIST's IDX files: the check runs on its test digits", envvar="VAE_DATA_DIR")
    ] = Path("../shared/data/mnist"),
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
) -> None:
    if threads:
        torch.set_num_threads(threads)
    written = reexport(path, out, data_dir if data_dir.is_dir() else None)
    form = written.manifest["serving_form"]
    typer.echo(
        f"wrote {written.path}: largest difference from {path} "
        f"{max(v for k, v in form['largest_difference'].items() if k != 'images'):.3g} "
        f"on {form['checked_on']}"
    )


if __name__ == "__main__":
    app()
