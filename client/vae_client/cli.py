"""vae-client: the command line on vae_client.

vae-client sample -n 16 --seed 1 [--prior standard] [--label 7 --verdicts --min-confidence 0.9] -o grid.png
vae-client encode digit.png [--json]
vae-client decode '[[0.5, -1.0]]' --model mnist-2d -o out.png
vae-client reconstruct in.png -o out.png
vae-client models
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer

from vae_client.client import DEFAULT_URL, VAEClient, VAEClientError, grid_image

T = TypeVar("T")

app = typer.Typer(help="Talk to a running vae-serve.", no_args_is_help=True, add_completion=False)

Url = Annotated[str, typer.Option("--url", envvar="VAE_URL", help="The service's base URL.")]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="VAE_API_KEY", help="API key, if the server needs one.", show_default=False
    ),
]
Model = Annotated[
    str | None, typer.Option("--model", "-m", help="Model name; the server's default if left out.")
]
Output = Annotated[
    Path, typer.Option("--output", "-o", help="PNG file to write (a grid for several images).")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
InvertOpt = Annotated[str, typer.Option("--invert", help="auto, true or false: invert dark-on-light images.")]


def _client(url: str, api_key: str | None) -> VAEClient:
    return VAEClient(url, api_key=api_key)


def _call(url: str, api_key: str | None, request: Callable[[VAEClient], T]) -> T:
    """One request through a fresh client; a refusal or an unreachable server is one line on
    stderr and exit status 1."""
    try:
        with _client(url, api_key) as client:
            return request(client)
    except VAEClientError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _invert(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("auto", "true", "false"):
        return lowered if lowered == "auto" else lowered == "true"
    raise typer.BadParameter(f"{value!r}: expected auto, true or false", param_hint="--invert")


def _save(images: np.ndarray, output: Path) -> None:
    grid_image(images).save(output, format="PNG")
    typer.echo(f"wrote {len(images)} image(s) to {output}", err=True)


@app.command()
def sample(
    n: Annotated[int, typer.Option("-n", "--n", help="How many images.")] = 16,
    seed: Annotated[int | None, typer.Option(help="Seed; the same one gives the same images.")] = None,
    temperature: Annotated[float, typer.Option(help="Scales the noise's standard deviation.")] = 1.0,
    prior: Annotated[
        str | None,
        typer.Option(help="learned or standard (z = noise); default: the model's own default."),
    ] = None,
    label: Annotated[
        str | None, typer.Option(help="Draw only this class: its index (0-9 for digits) or its name.")
    ] = None,
    verdicts: Annotated[
        bool, typer.Option("--verdicts", help="Print the classifier's verdict on each image.")
    ] = False,
    min_confidence: Annotated[
        float | None,
        typer.Option(help="Keep only draws the classifier reads (as --label) at least this surely."),
    ] = None,
    output: Output = Path("samples.png"),
    model: Model = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Draw n images through a prior and save them as one PNG grid."""
    wanted: int | str | None = int(label) if label is not None and label.isdigit() else label
    result = _call(
        url,
        api_key,
        lambda client: client.sample(
            n,
            seed=seed,
            temperature=temperature,
            model=model,
            prior=prior,
            label=wanted,
            return_verdicts=verdicts,
            min_confidence=min_confidence,
        ),
    )
    _save(result.images, output)
    drawn = "" if result.label is None else f", class {result.label}"
    redrawn = "" if result.redraws is None else f", {result.redraws} redrawn"
    typer.echo(
        f"seed {result.seed}, {result.prior} prior{drawn}{redrawn} (model {result.model} {result.version})",
        err=True,
    )
    if result.verdicts is not None:
        for i, verdict in enumerate(result.verdicts):
            typer.echo(f"{i}\t{verdict.label}\t{verdict.confidence:.4f}")


@app.command()
def encode(
    images: Annotated[list[Path], typer.Argument(help="PNG or JPEG files.", exists=True, dir_okay=False)],
    as_json: AsJson = False,
    invert: InvertOpt = "auto",
    model: Model = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Encode images: the posterior mean and standard deviation, and the KL from the prior."""
    result = _call(
        url,
        api_key,
        lambda client: client.encode([str(p) for p in images], model=model, invert=_invert(invert)),
    )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": result.model,
                    "version": result.version,
                    "files": [str(p) for p in images],
                    "mu": result.mu.tolist(),
                    "sigma": result.sigma.tolist(),
                    "kl": result.kl.tolist(),
                }
            )
        )
        return
    for path, mu, sigma, kl in zip(images, result.mu, result.sigma, result.kl, strict=True):
        typer.echo(f"{path}  (model {result.model} {result.version}, KL {kl:.2f} nats)")
        typer.echo(f"  mu    {' '.join(f'{v:+.4f}' for v in mu)}")
        typer.echo(f"  sigma {' '.join(f'{v:.4f}' for v in sigma)}")


@app.command()
def decode(
    z: Annotated[str, typer.Argument(help="Latents as JSON, [[...], ...] or one [...]; '-' reads stdin.")],
    output: Output = Path("decoded.png"),
    model: Model = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Decode latent vectors into images, saved as one PNG grid."""
    text = sys.stdin.read() if z == "-" else z
    try:
        latents = np.asarray(json.loads(text), dtype=np.float64)
    except (json.JSONDecodeError, ValueError, TypeError) as exc:
        raise typer.BadParameter(f"not a JSON list of numbers ({exc})", param_hint="Z") from exc
    images = _call(url, api_key, lambda client: client.decode(latents, model=model))
    _save(images, output)


@app.command()
def reconstruct(
    images: Annotated[list[Path], typer.Argument(help="PNG or JPEG files.", exists=True, dir_okay=False)],
    output: Output = Path("reconstructed.png"),
    invert: InvertOpt = "auto",
    model: Model = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Encode and decode images (decode(mu)); the reconstructions are saved as one PNG grid."""
    result = _call(
        url,
        api_key,
        lambda client: client.reconstruct([str(p) for p in images], model=model, invert=_invert(invert)),
    )
    _save(result.images, output)


@app.command()
def models(as_json: AsJson = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List the models the server has loaded."""
    listed = _call(url, api_key, lambda client: client.models())
    if as_json:
        typer.echo(json.dumps(listed, indent=2))
        return
    for info in listed:
        mark = "*" if info.get("default") else " "
        # runtime and precision: servers before issue 26 do not say (TorchScript, fp32)
        runs = f"{info.get('runtime') or 'torchscript'} {info.get('precision') or 'fp32'}"
        typer.echo(
            f"{mark} {info['name']:<16} {info['version']:<6} latent_dim {info['latent_dim']:<4} "
            f"{info['device']:<6} {runs:<16} dataset {info.get('dataset') or '?'}"
        )
