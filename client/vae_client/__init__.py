"""vae_client: talk to a running VAE model service (vae-serve) over HTTP.

A package of its own: it needs httpx, numpy and Pillow (and typer for the `vae-client`
command), never torch or the server."""

from vae_client.client import (
    DEFAULT_URL,
    AsyncVAEClient,
    Encoding,
    Reconstruction,
    Samples,
    VAEClient,
    VAEClientError,
    Verdict,
    grid_image,
    to_pil,
)

__all__ = [
    "DEFAULT_URL",
    "AsyncVAEClient",
    "Encoding",
    "Reconstruction",
    "Samples",
    "VAEClient",
    "VAEClientError",
    "Verdict",
    "grid_image",
    "to_pil",
]
__version__ = "0.1.0"
