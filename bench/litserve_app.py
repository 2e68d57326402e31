"""The peer: the same artifact served by LitServe, the serving framework a user would pick
instead of writing one, with its own dynamic batching.

One LitAPI per route (/sample, /encode, /reconstruct), each batching up to 32 requests with a
2 ms timeout (LitServe's batch_timeout), the artifact's TorchScript model on the CPU, and the
same PNG-in-JSON answers as the service and bench/plain_app.py (sampling through the model's
default prior, as the service does). Its batches are not padded to exact shapes: LitServe
has no such notion, and that costs it nothing here.

    VAE_BENCH_MODEL=model_store/mnist/v4 python -m bench.litserve_app --port 8000
"""

from __future__ import annotations

import argparse
import os
import secrets
import warnings
from typing import Any

import litserve as ls
import numpy as np
import torch

from bench.plain_app import from_png, to_png

MODEL_DIR = os.environ.get("VAE_BENCH_MODEL", "model_store/mnist/v1")
NAME = os.path.basename(os.path.dirname(MODEL_DIR.rstrip("/")))
VERSION = os.path.basename(MODEL_DIR.rstrip("/"))
MAX_BATCH = 32
BATCH_TIMEOUT_S = 0.002


def _load() -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(os.path.join(MODEL_DIR, "model.pt"), map_location="cpu").eval()


class SampleAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        torch.set_num_threads(1)
        self.model = _load()
        self.latent_dim = int(self.model.latent_dim)
        self.learned = hasattr(self.model, "prior")
        self.tempered = hasattr(self.model, "prior_given")  # format 3: prior(u, t)

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # LitServe reads the annotation
        seed = secrets.randbits(31) if request.get("seed") is None else int(request["seed"])
        return {"n": int(request["n"]), "seed": seed, "t": float(request.get("temperature", 1.0))}

    def predict(self, asks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # One pass for the whole batch: every request's noise, stacked
        u = torch.cat(
            [
                torch.randn(a["n"], self.latent_dim, generator=torch.Generator().manual_seed(a["seed"]))
                for a in asks
            ]
        )
        t = torch.cat([torch.full((a["n"],), a["t"]) for a in asks])
        with torch.inference_mode():
            if not self.learned:
                z = u * t[:, None]
            elif self.tempered:
                z = self.model.prior(u, t)
            else:
                z = self.model.prior(u * t[:, None])
            images = self.model.decode(z)[:, 0].numpy()
        out, start = [], 0
        for a in asks:
            out.append({**a, "images": images[start : start + a["n"]]})
            start += a["n"]
        return out

    def encode_response(self, result: dict[str, Any]):  # type: ignore[no-untyped-def]  # (the return's too)
        return {
            "model": NAME,
            "version": VERSION,
            "format": "png",
            "seed": result["seed"],
            "temperature": result["t"],
            "prior": "learned" if self.learned else "standard",
            "images": [to_png(image) for image in result["images"]],
        }


class EncodeAPI(ls.LitAPI):
    reconstruct = False

    def setup(self, device: str) -> None:
        torch.set_num_threads(1)
        self.model = _load()

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # LitServe reads the annotation
        return np.stack([from_png(text) for text in request["images"]])

    def predict(self, batch: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        x = torch.from_numpy(np.concatenate(batch))[:, None]
        with torch.inference_mode():
            mu, sigma = self.model.encode(x)
            images = self.model.decode(mu)[:, 0].numpy() if self.reconstruct else None
        mu, sigma = mu.numpy(), sigma.numpy()
        out, start = [], 0
        for part in batch:
            end = start + len(part)
            out.append(
                {
                    "mu": mu[start:end],
                    "sigma": sigma[start:end],
                    "images": None if images is None else images[start:end],
                }
            )
            start = end
        return out

    def encode_response(self, result: dict[str, Any]):  # type: ignore[no-untyped-def]  # (the return's too)
        mu, sigma = result["mu"], result["sigma"]
        if self.reconstruct:
            return {
                "model": NAME,
                "version": VERSION,
                "format": "png",
                "images": [to_png(image) for image in result["images"]],
                "mu": mu.tolist(),
                "sigma": sigma.tolist(),
            }
        kl = 0.5 * (mu**2 + sigma**2 - 1 - 2 * np.log(sigma)).sum(1)
        return {
            "model": NAME,
            "version": VERSION,
            "latent_dim": mu.shape[1],
            "mu": mu.tolist(),
            "sigma": sigma.tolist(),
            "kl": kl.tolist(),
        }


class ReconstructAPI(EncodeAPI):
    reconstruct = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    batching = {"max_batch_size": MAX_BATCH, "batch_timeout": BATCH_TIMEOUT_S}
    server = ls.LitServer(
        [
            SampleAPI(api_path="/sample", **batching),
            EncodeAPI(api_path="/encode", **batching),
            ReconstructAPI(api_path="/reconstruct", **batching),
        ],
        accelerator="cpu",
        devices=1,
        workers_per_device=1,
        healthcheck_path="/readyz",  # the benchmark's readiness probe
    )
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
