"""Helpers for the service tests: an in-process app with its lifespan running, direct
calls to the TorchScript models for reference, small image makers, and model stores
that tests add versions to."""

from __future__ import annotations

import base64
import io
import os
import shutil
import struct
import uuid
import zlib
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio.from_thread
import httpx
import numpy as np
import torch
from fastapi import FastAPI
from PIL import Image, ImageDraw

from service import artifact
from service.settings import Settings

T = TypeVar("T")


def make_settings(store: Path, **overrides: Any) -> Settings:
    """Settings for tests: everything that matters given explicitly, so that VAE_* variables
    in the developer's shell cannot change what a test sees."""
    values: dict[str, Any] = {
        "model_store": store,
        "models": [],
        "default_model": "mnist",
        "device": "cpu",
        "torch_threads": 0,
        "inference_threads": 2,
        "max_body_bytes": 8 * 1024 * 1024,
        "max_images": 256,
        "max_samples": 1024,
        "max_draw_attempts": 10,
        "max_image_pixels": 4096 * 4096,
        "max_request_pixels": 4 * 4096 * 4096,
        "cors_origins": [],
        "api_key": None,
        "warmup": True,
        "batching": True,
        "batch_max_size": 32,
        "batch_max_wait_ms": 0.0,
        "batch_exact": True,
        "queue_max": 2048,
        "request_timeout_s": 30.0,
        "max_concurrent_requests": 64,
    }
    values.update(overrides)
    return Settings(**values)


class InProcess:
    """An app served in this process: its lifespan runs on an event loop in a background
    thread (an anyio portal), and requests go through httpx's ASGI transport."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._stack = ExitStack()
        self.portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
        self._stack.enter_context(self.portal.wrap_async_context_manager(app.router.lifespan_context(app)))
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self.portal.call(fn, *args)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.portal.call(partial(self.client.request, method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        self.portal.call(self.client.aclose)
        self._stack.close()


class StandardPriorOnly:
    """For ModelRuntime test doubles: a model with the standard prior only, as every model
    before the learned prior (artifact format 1)."""

    priors: tuple[str, ...] = ("standard",)
    default_prior = "standard"
    classes: tuple[str, ...] = ()
    conditional = False
    has_classifier = False

    def prior(self, rows: np.ndarray) -> np.ndarray:
        raise AssertionError("this double has the standard prior only; prior() must not be called")

    def classify(self, x: np.ndarray) -> np.ndarray:
        raise AssertionError("this double has no classifier; classify() must not be called")


class Direct:
    """The TorchScript model called directly: the reference the service must match."""

    def __init__(self, store: Path, name: str) -> None:
        self.model, self.artifact = artifact.load(artifact.resolve(store, name), "cpu")

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            mu, sigma = self.model.encode(torch.from_numpy(np.asarray(x, np.float32)[:, None]))
        return mu.numpy(), sigma.numpy()

    def decode(self, z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model.decode(torch.from_numpy(np.asarray(z, np.float32)))[:, 0].numpy()


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    """uint8 or [0, 1] float array -> PNG bytes."""
    if array.dtype != np.uint8 and mode is None:
        array = np.rint(np.clip(array, 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def drawn_digit(
    size: tuple[int, int] = (200, 160), ink: int = 0, paper: int = 255, width: int = 14
) -> Image.Image:
    """A '7'-like stroke drawn with a pen on paper, as a phone photo or canvas would give."""
    w, h = size
    image = Image.new("L", size, paper)
    draw = ImageDraw.Draw(image)
    draw.line([(0.3 * w, 0.25 * h), (0.7 * w, 0.25 * h), (0.45 * w, 0.8 * h)], fill=ink, width=width)
    return image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries a few bytes of pixel data: the shape
    of a decompression bomb, without needing the memory to build a real one."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def store_with_v1(tiny_store: Path, root: Path) -> Path:
    """A fresh store holding the session's `tiny` v1 (a copy: tests add versions to it)."""
    store = root / f"store-{uuid.uuid4().hex[:6]}"
    shutil.copytree(tiny_store / "tiny", store / "tiny")
    return store


def publish(built: Path, store: Path) -> Path:
    """Moves an artifact built elsewhere into the store the way write_artifact does: copied
    beside its final place under a hidden name, then renamed, so a reader never sees a part."""
    target = store / built.parent.name / built.name
    staging = target.parent / f".staging-{built.name}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(built, staging)
    os.rename(staging, target)
    return target
