"""`python -m vae_client`: the vae-client command line."""

from vae_client.cli import app

app(prog_name="vae-client")
