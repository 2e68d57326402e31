"""The reference: a plain FastAPI app, written the way most tutorials serve a model.

Sync endpoints (FastAPI runs them on its thread pool), the same TorchScript model called
once per request, Pillow PNGs, and the same JSON as the service's /sample, /encode and
/reconstruct. No batching, no fast paths. The benchmark measures the service against it.

    VAE_BENCH_MODEL=model_store/mnist/v1 uvicorn bench.plain_app:app
"""

from __future__ import annotations

import base64
import io
import os
import secrets

import numpy as np
import torch
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel

MODEL_DIR = os.environ.get("VAE_BENCH_MODEL", "model_store/mnist/v1")
model = torch.jit.load(os.path.join(MODEL_DIR, "model.pt"), map_location="cpu").eval()
LATENT_DIM = int(model.latent_dim)
NAME, VERSION = (
    os.path.basename(os.path.dirname(MODEL_DIR.rstrip("/"))),
    os.path.basename(MODEL_DIR.rstrip("/")),
)

app = FastAPI()


class SampleRequest(BaseModel):
    n: int
    seed: int | None = None
    temperature: float = 1.0


class ImagesRequest(BaseModel):
    images: list[str]


def to_png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def from_png(text: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(text))).convert("L")
    return np.asarray(image, dtype=np.float32) / 255.0


@app.post("/sample")
def sample(request: SampleRequest) -> dict:
    seed = secrets.randbits(31) if request.seed is None else request.seed
    z = (
        torch.randn(request.n, LATENT_DIM, generator=torch.Generator().manual_seed(seed))
        * request.temperature
    )
    with torch.no_grad():
        images = model.decode(z)[:, 0].numpy()
    return {
        "model": NAME,
        "version": VERSION,
        "format": "png",
        "seed": seed,
        "temperature": request.temperature,
        "images": [to_png(image) for image in images],
    }


@app.post("/encode")
def encode(request: ImagesRequest) -> dict:
    x = torch.from_numpy(np.stack([from_png(text) for text in request.images]))[:, None]
    with torch.no_grad():
        mu, sigma = model.encode(x)
    kl = 0.5 * (mu**2 + sigma**2 - 1 - 2 * torch.log(sigma)).sum(1)
    return {
        "model": NAME,
        "version": VERSION,
        "latent_dim": LATENT_DIM,
        "mu": mu.tolist(),
        "sigma": sigma.tolist(),
        "kl": kl.tolist(),
    }


@app.post("/reconstruct")
def reconstruct(request: ImagesRequest) -> dict:
    x = torch.from_numpy(np.stack([from_png(text) for text in request.images]))[:, None]
    with torch.no_grad():
        mu, sigma = model.encode(x)
        images = model.decode(mu)[:, 0].numpy()
    return {
        "model": NAME,
        "version": VERSION,
        "format": "png",
        "images": [to_png(image) for image in images],
        "mu": mu.tolist(),
        "sigma": sigma.tolist(),
    }


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ready"}
