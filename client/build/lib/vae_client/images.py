"""Image arrays as the service makes them: floats in [0, 1] to 8-bit pixels, and batches laid
out as one grid. The server builds its PNGs and grids with these too (service.api.images), so
a grid drawn here from /sample's arrays is pixel for pixel the server's /sample.png."""

from __future__ import annotations

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8 0-255, rounded to nearest; NaN -> 0, out of range clipped.

    In float32 and in place: the same values as rint(clip(nan_to_num(x)) * 255), checked
    over every float32 in [0, 1], at a third of the cost (this runs for every PNG served)."""
    y = np.fmax(np.asarray(x, dtype=np.float32), np.float32(0.0))  # fmax drops NaN: NaN -> 0
    np.fmin(y, np.float32(1.0), out=y)
    y *= np.float32(255.0)
    np.rint(y, out=y)
    return y.astype(np.uint8)


def grid(images: np.ndarray, pad: int = 2, pad_value: float = 0.0) -> np.ndarray:
    """[B, H, W] -> one [rows*(H+pad)+pad, cols*(W+pad)+pad] image, ceil(sqrt(B)) columns,
    filled row by row; empty cells stay pad_value."""
    b, h, w = images.shape
    cols = max(1, int(np.ceil(np.sqrt(b))))
    rows = max(1, -(-b // cols))
    cells = np.full((rows * cols, h + pad, w + pad), pad_value, dtype=images.dtype)
    cells[:b, pad:, pad:] = images
    sheet = (
        cells.reshape(rows, cols, h + pad, w + pad)
        .transpose(0, 2, 1, 3)
        .reshape(rows * (h + pad), cols * (w + pad))
    )
    out = np.full((sheet.shape[0] + pad, sheet.shape[1] + pad), pad_value, dtype=images.dtype)
    out[: -pad or None, : -pad or None] = sheet
    return out
