"""Small IDX datasets the trainer's tests write: random digits in the MNIST file layout."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from trainer import data


def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_dataset(root: Path, n_train: int = 20, n_test: int = 10, compress: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for stem, array in zip(data.SPLIT_FILES[split], (images, labels), strict=True):
            payload = idx_bytes(array)
            if compress:
                (root / f"{stem}.gz").write_bytes(gzip.compress(payload))
            else:
                (root / stem).write_bytes(payload)
    return root
