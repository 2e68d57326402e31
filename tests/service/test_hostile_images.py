"""Hostile images (issue 7, item 2): every accepted format (PNG, JPEG) corrupt, truncated,
empty or header-only; decompression bombs of each kind; animated and multi-frame files;
every colour mode; EXIF orientation; and memory over a real server process.

Each case must give a 422 problem+json naming the image, or the correct 28x28 model input,
computed here independently of service/api/images.py. test_images.py and
test_service_errors.py hold the simpler cases (a half PNG, a GIF, a header-only bomb)."""

from __future__ import annotations

import contextlib
import functools
import io
import re
import resource
import struct
import threading
import time
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFile
from process_support import serve
from service_support import InProcess, b64, drawn_digit, encoded, png, png_header_only

from service.api import images
from service.api.images import _png_chunk
from service.errors import ImageTooLarge, InvalidImage, ProblemError
from tests.reliability import record

LIMIT = 4096 * 4096  # the default VAE_MAX_IMAGE_PIXELS, as the `api` fixture has it
SIGNATURE = b"\x89PNG\r\n\x1a\n"
ORIENTATION = 0x0112


def prepare(data: bytes) -> np.ndarray:
    return images.prepare(data, "images[0]", None, LIMIT)


def digit28() -> np.ndarray:
    """A 28x28 light-on-dark '7' with graded ink (uint8): asymmetric, so any rotation or
    flip shows, and graded, so any rounding of levels shows."""
    mask = np.asarray(drawn_digit((28, 28), ink=255, paper=0, width=3)) > 0
    levels = np.linspace(90, 255, 28)[None, :].repeat(28, axis=0)
    return np.where(mask, np.rint(levels), 0).astype(np.uint8)


DIGIT = digit28()
EXPECTED = DIGIT / 255.0  # what any faithful encoding of DIGIT must reach the model as
GOOD = png(DIGIT)


def raw_png(rows: np.ndarray, colour_type: int, bit_depth: int, chunks: tuple[bytes, ...] = ()) -> bytes:
    """A PNG written by hand from [H, W * channels] samples (uint8, or uint16 for 16-bit):
    for the modes Pillow cannot write (16-bit RGB and gray+alpha). `chunks` go before IDAT."""
    h, width_samples = rows.shape
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    samples = rows.astype(">u2" if bit_depth == 16 else np.uint8).tobytes()
    stride = len(samples) // h
    raw = b"".join(b"\x00" + samples[i * stride : (i + 1) * stride] for i in range(h))
    ihdr = struct.pack(">IIBBBBB", width_samples // channels, h, bit_depth, colour_type, 0, 0, 0)
    return (
        SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + b"".join(chunks)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def with_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    """A PNG with one more (correctly checksummed) chunk right after IHDR (which ends at byte 33)."""
    return data[:33] + _png_chunk(kind, payload) + data[33:]


def zero_png(width: int, height: int) -> bytes:
    """A real, complete 8-bit grayscale PNG of zeros, as an attacker would send: a
    20000x20000 one (400 MP) is about 400 kB. One deflated block of rows, ended by a full
    flush so that it stands alone, is repeated, so the pixels are never held here."""
    rows_per_block = max(1, (1 << 20) // (width + 1))
    full, rest = divmod(height, rows_per_block)
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    repeated = block.compress(bytes((width + 1) * rows_per_block)) + block.flush(zlib.Z_FULL_FLUSH)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = last.compress(bytes((width + 1) * rest)) + last.flush()
    total = (width + 1) * height  # adler32 of n zero bytes is (n mod 65521) << 16 | 1
    stream = b"\x78\xda" + repeated * full + tail + struct.pack(">I", (total % 65521) << 16 | 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", stream) + _png_chunk(b"IEND", b"")


def jpeg_sized(data: bytes, width: int, height: int) -> bytes:
    """A baseline JPEG whose SOF0 segment declares width x height; the scan is unchanged."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def gif_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width x height."""
    gif = encoded(Image.fromarray(DIGIT), "GIF")
    return gif[:6] + struct.pack("<HH", width, height) + gif[10:]


def assert_invalid(response: httpx.Response, slug: str, fmt: str | None = None) -> str:
    """A 422 problem+json of the given type that names images[1] (and the format, when given)."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == f"urn:vae:problem:{slug}", problem
    assert problem["detail"].startswith("images[1] "), problem["detail"]
    if fmt:
        assert fmt in problem["detail"], problem["detail"]
    return problem["detail"]


def post_pair(api: InProcess, data: bytes) -> httpx.Response:
    """A good image first and the hostile one second: the error must name images[1]."""
    return api.post("/encode", json={"images": [b64(GOOD), b64(data)]})


# ---------------------------------------------------------------------------- damaged files

SAMPLE = {
    "PNG": encoded(drawn_digit((60, 50), width=6)),
    "JPEG": encoded(drawn_digit((60, 50), width=6), "JPEG", quality=90),
}


def header_only(fmt: str, data: bytes) -> bytes:
    if fmt == "PNG":  # signature, IHDR, IEND: no image data at all
        return data[:33] + _png_chunk(b"IEND", b"")
    sos = data.index(b"\xff\xda")  # every segment up to and including the scan header, then EOI
    (length,) = struct.unpack(">H", data[sos + 2 : sos + 4])
    return data[: sos + 2 + length] + b"\xff\xd9"


def damaged(fmt: str) -> dict[str, bytes]:
    """Each way a PNG or JPEG arrives broken, by name."""
    data = SAMPLE[fmt]
    n = len(data)
    header = 33 if fmt == "PNG" else data.index(b"\xff\xda")  # where the image data begins
    garbage = np.random.default_rng(7).integers(0, 256, 600, dtype=np.uint8).tobytes()
    cases = {"empty": b"", "header only": header_only(fmt, data)}
    cases["header only, no end marker"] = cases["header only"][: -12 if fmt == "PNG" else -2]
    for cut in (2, 8, header, n // 4, n // 2, 3 * n // 4, n - 1):
        cases[f"cut at byte {cut} of {n}"] = data[:cut]
    cases["end marker missing"] = data[: -12 if fmt == "PNG" else -2]
    for at in (header, header + 40, n // 2):
        cases[f"garbage after byte {at}"] = data[:at] + garbage
    return cases


def flipped(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    for k in range(4):
        out[at + k] ^= 0xFF
    return bytes(out)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_damaged_files_of_every_accepted_format_get_a_422_naming_the_image(api: InProcess, fmt: str) -> None:
    cases = damaged(fmt)
    if fmt == "PNG":  # PNG checksums every chunk: any flipped bytes are caught
        cases.update({f"4 bytes flipped at {at}": flipped(SAMPLE[fmt], at) for at in (40, 90, 130)})
    for name, data in cases.items():
        detail = assert_invalid(post_pair(api, data), "invalid-image")
        expected = "empty" if not data else "not an image" if fmt == "PNG" and len(data) < 8 else fmt
        assert expected in detail, (name, detail)
        assert re.search(r"truncated|corrupt|cut short|damaged|empty|not an image", detail), (name, detail)
    if fmt == "JPEG":
        record(
            "hostile images",
            "damaged files of each accepted format: empty, header-only, cut at 8 points, "
            "garbage after the header, flipped bytes (PNG, JPEG)",
            len(damaged("PNG")) + 3 + len(cases),
            "all 422 invalid-image naming the image and the format",
            "test_hostile_images.py::test_damaged_files_of_every_accepted_format_get_a_422_naming_the_image",
        )


def test_every_single_byte_flip_is_refused_in_a_png_and_never_a_500_in_a_jpeg() -> None:
    """PNG's chunk CRCs catch every flipped byte (Pillow alone let a flip in IDAT through as
    different pixels). A JPEG has no checksum: damage inside its entropy-coded scan decodes
    as visible noise in every decoder, so the rule there is a 422 or a valid input, never
    a 500 and never NaN."""
    png_file = SAMPLE["PNG"]
    for at in range(len(SIGNATURE), len(png_file)):
        out = bytearray(png_file)
        out[at] ^= 0x55
        with pytest.raises(InvalidImage, match="PNG"):
            prepare(bytes(out))
    jpeg = SAMPLE["JPEG"]
    refused = 0
    for at in range(2, len(jpeg)):
        out = bytearray(jpeg)
        out[at] ^= 0x55
        try:
            x = prepare(bytes(out))
        except ProblemError:  # InvalidImage, BlankImage or ImageTooLarge (a flipped SOF size)
            refused += 1
            continue
        assert x.shape == (28, 28) and np.isfinite(x).all() and 0.0 <= x.min() <= x.max() <= 1.0
    record(
        "hostile images",
        "every single-byte flip of a PNG and of a JPEG",
        len(png_file) - len(SIGNATURE) + len(jpeg) - 2,
        f"PNG: all {len(png_file) - len(SIGNATURE)} refused (chunk CRCs); JPEG (no checksum): "
        f"{refused} refused, the rest decode to a valid input; no 500",
        "test_hostile_images.py::test_every_single_byte_flip_is_refused_in_a_png_and_never_a_500_in_a_jpeg",
    )


def test_truncated_images_stay_refused() -> None:
    """Pillow's LOAD_TRUNCATED_IMAGES would turn a cut file into a half-grey image: the
    service must never switch it on (importing the whole app here, as the server does)."""
    import service.app  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------------- decompression bombs


@functools.cache
def bombs() -> dict[str, tuple[bytes, str]]:
    """name -> (file, problem type). Every one is a few hundred kB at most."""
    jpeg = encoded(Image.fromarray(DIGIT), "JPEG")
    ztxt = b"Comment\x00\x00" + zlib.compress(bytes(64 << 20), 9)  # 64 MB of text in ~64 kB
    return {
        "PNG header, 100000x100000": (png_header_only(100_000, 100_000), "image-too-large"),
        "real PNG of zeros, 20000x20000": (zero_png(20_000, 20_000), "image-too-large"),
        "PNG header, 1x2147483647": (png_header_only(1, 2**31 - 1), "image-too-large"),
        "PNG header, 5000x5000 (under Pillow's limit)": (png_header_only(5000, 5000), "image-too-large"),
        "JPEG SOF, 65500x65500": (jpeg_sized(jpeg, 65500, 65500), "image-too-large"),
        "JPEG SOF, 5000x5000": (jpeg_sized(jpeg, 5000, 5000), "image-too-large"),
        "PNG zTXt chunk expanding to 64 MB": (with_chunk(GOOD, b"zTXt", ztxt), "invalid-image"),
        "GIF screen 65535x65535 (GIF not accepted)": (gif_screen(65535, 65535), "invalid-image"),
    }


def test_the_zero_png_builder_makes_a_real_png() -> None:
    """The bomb below is a real file, not only a header: a small one decodes to zeros."""
    image = Image.open(io.BytesIO(zero_png(300, 5000)))
    image.load()
    assert image.size == (300, 5000) and not np.asarray(image).any()


def test_decompression_bombs_are_refused_quickly_without_a_big_allocation(api: InProcess) -> None:
    cases = bombs()
    assert max(len(data) for data, _ in cases.values()) < 1 << 20
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    slowest = 0.0
    for name, (data, slug) in cases.items():
        start = time.perf_counter()
        response = api.post("/encode", content=data, headers={"Content-Type": "image/png"})
        slowest = max(slowest, time.perf_counter() - start)
        assert response.status_code == 422, (name, response.text)
        assert response.json()["type"] == f"urn:vae:problem:{slug}", (name, response.text)
        assert response.json()["detail"].startswith("the body "), (name, response.text)
        assert_invalid(post_pair(api, data), slug)  # the same through JSON
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    # Decoding even the smallest of these would take 25 MB (5000x5000 x 1 byte), the real
    # 20000x20000 PNG 400 MB, and float32 copies four times that.
    assert grown < 20, f"the peak RSS grew by {grown:.0f} MiB while refusing bombs"
    assert slowest < 1.0, f"the slowest refusal took {slowest:.2f} s"
    record(
        "hostile images",
        "decompression bombs: PNG (header-only and a real 400 MP file of 400 kB), "
        "1x2^31 PNG, JPEG SOF 65500^2 and 5000^2, zTXt text bomb, GIF screen 65535^2",
        len(cases),
        f"all 422 (image-too-large, or invalid-image), slowest {slowest * 1000:.0f} ms; "
        f"peak RSS +{max(grown, 0):.0f} MiB",
        "test_hostile_images.py::test_decompression_bombs_are_refused_quickly_without_a_big_allocation",
    )


def test_extreme_aspect_ratios_give_a_digit_or_a_blank_422() -> None:
    for shape in ((1, 100_000), (100_000, 1)):
        stroke = np.zeros(shape, np.uint8)
        stroke.flat[40_000:60_000] = 255
        x = prepare(png(stroke))
        # The stroke fills 20 px of the longer side and 1 px of the other, centred.
        assert x.shape == (28, 28) and np.count_nonzero(x) == 20 and x.max() == 1.0
        ink = np.argwhere(x > 0)
        assert abs(ink.mean(axis=0) - 13.5).max() <= 1.0, ink.mean(axis=0)
        with pytest.raises(ProblemError, match="blank"):
            prepare(png(np.zeros(shape, np.uint8)))
    with pytest.raises(ImageTooLarge):
        prepare(png_header_only(2**31 - 1, 1))


# ---------------------------------------------------------------------------- animation, frames


def test_an_animated_png_gives_its_static_image_and_other_multi_frame_formats_are_refused(
    api: InProcess,
) -> None:
    other = np.ascontiguousarray(DIGIT[::-1])  # a different picture for the later frames
    first, second = Image.fromarray(DIGIT), Image.fromarray(other)
    third = Image.fromarray(np.ascontiguousarray(DIGIT.T))
    apng = encoded(first, "PNG", save_all=True, append_images=[second, third], duration=100)
    assert Image.open(io.BytesIO(apng)).n_frames == 3
    np.testing.assert_allclose(prepare(apng), EXPECTED, atol=1e-6)
    swapped = encoded(second, "PNG", save_all=True, append_images=[first], duration=100)
    np.testing.assert_allclose(prepare(swapped), other / 255.0, atol=1e-6)
    # The default image shown by viewers without APNG support, when it is not a frame itself.
    hidden = encoded(first, "PNG", save_all=True, append_images=[second], default_image=True)
    np.testing.assert_allclose(prepare(hidden), EXPECTED, atol=1e-6)
    assert api.post("/encode", content=apng, headers={"Content-Type": "image/png"}).status_code == 200

    for fmt, name in (("GIF", "a GIF"), ("TIFF", "a TIFF"), ("WEBP", "a WebP image")):
        data = encoded(first, fmt, save_all=True, append_images=[second, first])
        assert_invalid(post_pair(api, data), "invalid-image", f"{name}; only PNG and JPEG")


# ---------------------------------------------------------------------------- colour modes


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma in [0, 1] of [..., 3] uint8 colours, computed here, not by Pillow."""
    return (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 255.0


@functools.cache
def mode_cases() -> dict[str, tuple[bytes, np.ndarray, float]]:
    """name -> (file, expected model input, tolerance) for DIGIT in every colour mode."""
    rng = np.random.default_rng(3)
    alpha = DIGIT  # the ink's coverage, 0 on the canvas
    noise = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)  # colours hidden under alpha 0
    cases: dict[str, tuple[bytes, np.ndarray, float]] = {"L": (GOOD, EXPECTED, 1e-6)}
    cases["L, dark on light"] = (png(255 - DIGIT), EXPECTED, 1e-6)
    grey = np.repeat(DIGIT[..., None], 3, axis=2)
    cases["RGB, grey"] = (png(grey), EXPECTED, 1e-6)
    colour = np.stack([DIGIT, DIGIT // 2, DIGIT // 4], axis=2)
    cases["RGB, coloured"] = (png(colour), luma(colour), 1 / 255 + 1e-6)
    # 16 significant bits: the low byte is noise on the ink, so dropping it would show.
    sixteen = DIGIT.astype(np.uint16) * 256 + rng.integers(0, 256, (28, 28), dtype=np.uint16) * (DIGIT > 0)
    cases["16-bit grey"] = (encoded(Image.fromarray(sixteen)), sixteen / 65535.0, 1e-6)
    cases["16-bit RGB"] = (
        raw_png(np.repeat(sixteen, 3, axis=1), colour_type=2, bit_depth=16),
        sixteen / 65535.0,
        1 / 255 + 1e-6,
    )
    white_la16 = np.stack([np.full((28, 28), 65535), sixteen], axis=2).reshape(28, 56)
    cases["16-bit grey + alpha, white ink on a transparent canvas"] = (
        raw_png(white_la16, colour_type=4, bit_depth=16),
        sixteen / 65535.0,
        1 / 255 + 1e-6,
    )
    palette = Image.fromarray(DIGIT).convert("P")  # a grey palette: the same levels
    cases["palette"] = (encoded(palette), EXPECTED, 1e-6)
    # Palette with tRNS: entry i is black ink with opacity i; entry 0 a red that is invisible.
    p = Image.frombytes("P", (28, 28), DIGIT.tobytes())  # index = opacity
    p.putpalette([200, 30, 30] + [0, 0, 0] * 255)
    cases["palette + transparency, black ink on a transparent canvas"] = (
        encoded(p, transparency=bytes(range(256))),
        EXPECTED,
        1e-6,
    )
    la = np.stack([np.zeros((28, 28), np.uint8), alpha], axis=2)  # black ink, transparent canvas
    cases["LA, black ink on a transparent canvas"] = (png(la), EXPECTED, 1e-6)
    for ink in ((255, 255, 255), (250, 220, 90), (20, 30, 120)):  # light and dark inks
        rgba = np.concatenate([noise, alpha[..., None]], axis=2)
        rgba[alpha > 0, :3] = ink
        # Composited over the contrasting background, then made light-on-dark: coverage
        # times the ink's contrast with that background.
        strength = luma(np.array(ink, np.uint8))
        contrast = strength if strength >= 0.5 else 1.0 - strength
        cases[f"RGBA, ink {ink} on a transparent canvas"] = (
            png(rgba),
            alpha / 255.0 * contrast,
            2 / 255 + 1e-6,  # the ink's luma rounded to a level, and again after compositing
        )
    cases["RGBA, opaque"] = (
        png(np.concatenate([grey, np.full((28, 28, 1), 255, np.uint8)], axis=2)),
        EXPECTED,
        1e-6,
    )
    binary = DIGIT > 0
    cases["1-bit"] = (encoded(Image.fromarray(binary)), binary.astype(np.float64), 1e-6)
    cases["JPEG, grey"] = (encoded(Image.fromarray(DIGIT), "JPEG", quality=100), EXPECTED, 0.02)
    cases["JPEG, RGB"] = (
        encoded(Image.fromarray(grey), "JPEG", quality=100, subsampling=0),
        EXPECTED,
        0.02,
    )
    cases["JPEG, CMYK (Adobe, inverted)"] = (
        encoded(Image.fromarray(grey).convert("CMYK"), "JPEG", quality=100, subsampling=0),
        EXPECTED,
        0.02,
    )
    return cases


def test_every_colour_mode_gives_the_expected_model_input(api: InProcess) -> None:
    cases = mode_cases()
    for name, (data, expected, tolerance) in cases.items():
        x = prepare(data)
        assert x.shape == (28, 28) and x.dtype == np.float32, name
        error = float(np.abs(x - expected).max())
        assert error <= tolerance, f"{name}: off by {error:.4f} (allowed {tolerance:.4f})"
    # Every tolerance is far below what a flipped or inverted digit would be off by.
    assert np.abs(EXPECTED - EXPECTED[::-1]).max() > 0.5 and np.abs(EXPECTED - (1 - EXPECTED)).max() > 0.5
    response = api.post("/encode", json={"images": [b64(data) for data, _, _ in cases.values()][:16]})
    assert response.status_code == 200, response.text
    record(
        "hostile images",
        "colour modes: L, RGB, 16-bit grey/RGB/grey+alpha, palette with and without tRNS, "
        "LA, RGBA with light and dark inks, 1-bit, JPEG grey/RGB/CMYK",
        len(cases),
        "each equals the expected 28x28 input (lossless: within 1-2 levels; JPEG q100: 0.02)",
        "test_hostile_images.py::test_every_colour_mode_gives_the_expected_model_input",
    )


# ---------------------------------------------------------------------------- EXIF orientation


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


# EXIF orientation -> how the upright picture was stored: 3 turned 180 degrees, 6 turned
# 90 degrees counter-clockwise (to be turned clockwise for display), 8 the other way.
STORED = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1)}


def test_exif_orientation_is_applied_before_fitting(api: InProcess) -> None:
    cases = 0
    for orientation, store in STORED.items():
        stored = Image.fromarray(np.ascontiguousarray(store(DIGIT)))
        as_png = encoded(stored, exif=exif_bytes(orientation))
        np.testing.assert_allclose(prepare(as_png), EXPECTED, atol=1e-6, err_msg=f"PNG eXIf {orientation}")
        as_jpeg = encoded(stored, "JPEG", quality=100, exif=exif_bytes(orientation))
        error = float(np.abs(prepare(as_jpeg) - EXPECTED).max())
        assert error < 0.02, f"JPEG orientation {orientation}: off by {error:.3f}"
        assert np.abs(np.asarray(stored) / 255.0 - EXPECTED).max() > 0.5, "the test needs a visible turn"
        response = api.post("/encode", content=as_jpeg, headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200, response.text
        cases += 2
    record(
        "hostile images",
        "EXIF orientation 3, 6, 8 in JPEG (APP1) and PNG (eXIf)",
        cases,
        "turned upright before fitting: equals the upright digit (PNG exactly, JPEG within 0.02)",
        "test_hostile_images.py::test_exif_orientation_is_applied_before_fitting",
    )


def corrupt_exif_blocks() -> dict[str, bytes]:
    good = exif_bytes(6).removeprefix(b"Exif\x00\x00")  # the TIFF structure itself
    tag = struct.pack(">HHIH", ORIENTATION, 3, 1, 6)  # SHORT, one value: 6
    assert tag in good
    return {
        "random bytes": np.random.default_rng(1).integers(0, 256, 64, dtype=np.uint8).tobytes(),
        "TIFF header only": b"MM\x00*",
        "IFD offset past the end": b"MM\x00*\xff\xff\xff\xf0",
        "65535 IFD entries claimed": b"MM\x00*\x00\x00\x00\x08\xff\xff",
        "cut in the middle": good[: len(good) // 2],
        "orientation 99": good.replace(tag, struct.pack(">HHIH", ORIENTATION, 3, 1, 99)),
        "orientation as a 4 GB array": good.replace(tag, struct.pack(">HHIH", ORIENTATION, 3, 2**31, 6)),
    }


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # Pillow's "Corrupt EXIF data"
def test_a_corrupt_exif_block_is_ignored_not_a_500(api: InProcess) -> None:
    upright = Image.fromarray(DIGIT)
    for name, block in corrupt_exif_blocks().items():
        as_png = encoded(upright, exif=block)
        np.testing.assert_allclose(prepare(as_png), EXPECTED, atol=1e-6, err_msg=name)
        app1 = b"\xff\xe1" + struct.pack(">H", len(block) + 8) + b"Exif\x00\x00" + block
        plain = encoded(upright, "JPEG", quality=100)
        as_jpeg = plain[:2] + app1 + plain[2:]
        for data, kind in ((as_png, "image/png"), (as_jpeg, "image/jpeg")):
            response = api.post("/encode", content=data, headers={"Content-Type": kind})
            assert response.status_code == 200, (name, kind, response.text)


# ---------------------------------------------------------------------------- memory, over a real server


def hostile_set() -> list[tuple[str, bytes]]:
    """(content type, body) for one of each kind above, small enough to send 200 of quickly."""
    jpeg = encoded(Image.fromarray(DIGIT), "JPEG")
    kinds: list[tuple[str, bytes]] = [("image/png", data) for data, _ in bombs().values()]
    for fmt, kind in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        cases = damaged(fmt)
        kinds += [(kind, cases[name]) for name in ("empty", "header only", "end marker missing")]
        kinds.append((kind, cases[f"cut at byte {len(SAMPLE[fmt]) // 2} of {len(SAMPLE[fmt])}"]))
    kinds.append(("image/png", flipped(SAMPLE["PNG"], 90)))
    kinds.append(("image/jpeg", flipped(jpeg, len(jpeg) // 2)))
    first, second = Image.fromarray(DIGIT), Image.fromarray(np.ascontiguousarray(DIGIT[::-1]))
    kinds.append(("image/png", encoded(first, "PNG", save_all=True, append_images=[second])))
    kinds.append(("image/png", encoded(first, "GIF", save_all=True, append_images=[second])))
    modes = mode_cases()
    kinds += [
        ("image/png", modes[name][0])
        for name in ("16-bit grey", "palette + transparency, black ink on a transparent canvas")
    ]
    kinds.append(("image/jpeg", modes["JPEG, CMYK (Adobe, inverted)"][0]))
    kinds.append(("image/jpeg", encoded(first, "JPEG", exif=exif_bytes(6))))
    stroke = np.zeros((1, 100_000), np.uint8)
    stroke[0, 40_000:60_000] = 255
    kinds.append(("image/png", png(stroke)))
    return kinds


def reset_peak(pid: int) -> None:
    """Sets a process's VmHWM back to its current RSS (Linux >= 4.0), so that the next
    reading is the peak of what came after, not of the server's startup."""
    # Where that is not allowed, VmHWM still bounds the peak from above, which is what is asserted.
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB: its resident memory now and at its peak."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@pytest.mark.slow
def test_memory_stays_bounded_over_a_real_server(tiny_store: Path, tmp_path: Path) -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc to read the server's memory")
    kinds = hostile_set()
    rounds = -(-200 // len(kinds))
    served = serve(tiny_store, tmp_path / "serve.log")
    try:
        pid = served.process.pid
        with httpx.Client(base_url=served.url, timeout=60) as client:

            def send(kind: str, body: bytes) -> int:
                status = client.post("/encode", content=body, headers={"Content-Type": kind}).status_code
                assert status in (200, 422), f"{status} for a {kind} of {len(body)} bytes:\n{served.log()}"
                return status

            for kind, body in kinds:  # once first: lazy imports and caches are not growth
                send(kind, body)
            reset_peak(pid)
            rss_before, peak_before = memory_kib(pid)
            start = time.perf_counter()
            statuses = [send(kind, body) for _ in range(rounds) for kind, body in kinds]
            seconds = time.perf_counter() - start
            rss_after, peak_after = memory_kib(pid)
            # The largest image the default limit lets through, as a 20 kB PNG: what one
            # decode may cost at most (docs/service.md).
            side = 4096
            largest = np.zeros((side, side), np.uint8)
            largest[1000:3000, 2000:2200] = 255
            body = png(largest)
            del largest
            reset_peak(pid)
            rss_largest, _ = memory_kib(pid)
            send("image/png", body)
            _, peak_largest = memory_kib(pid)
            assert (
                client.post("/encode", content=GOOD, headers={"Content-Type": "image/png"}).status_code == 200
            )
    finally:
        served.kill()
    growth, peak_growth = (rss_after - rss_before) / 1024, (peak_after - peak_before) / 1024
    largest_cost = (peak_largest - rss_largest) / 1024
    assert growth < 50, f"RSS grew by {growth:.1f} MiB over {len(statuses)} hostile requests"
    assert peak_growth < 50, f"peak RSS grew by {peak_growth:.1f} MiB over {len(statuses)} hostile requests"
    assert largest_cost < 40 * side * side / 2**20, f"a {side}x{side} image took {largest_cost:.0f} MiB"
    record(
        "hostile images",
        f"the hostile set ({len(kinds)} kinds: bombs, damaged, animated, modes, EXIF, 1x100000) "
        f"x {rounds} over a real server",
        len(statuses),
        f"{statuses.count(422)} x 422, {statuses.count(200)} x 200 in {seconds:.1f} s; "
        f"RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB (+{growth:.1f}), "
        f"peak +{peak_growth:.1f} MiB; "
        f"one {side}x{side} image (the limit): peak +{largest_cost:.0f} MiB; still serving",
        "test_hostile_images.py::test_memory_stays_bounded_over_a_real_server",
    )


def test_large_images_are_decoded_a_few_at_a_time() -> None:
    """Starlette decodes uploads on up to 40 threads at once; images above
    LARGE_IMAGE_PIXELS take turns through LARGE_DECODES, so 8 concurrent 2048x2048 uploads
    hold at most 2 decoded copies. Measured by tracemalloc (numpy's arrays are traced)."""
    canvas = np.zeros((2048, 2048), np.uint8)
    canvas[600:1400, 900:1100] = 255  # a '1'
    big = png(canvas)
    assert images.LARGE_IMAGE_PIXELS < 2048 * 2048

    inside, most = 0, 0
    lock = threading.Lock()
    real_slot = images.LARGE_DECODES

    class CountingSlot:
        def __enter__(self) -> None:
            nonlocal inside, most
            real_slot.acquire()
            with lock:
                inside += 1
                most = max(most, inside)

        def __exit__(self, *exc: object) -> None:
            nonlocal inside
            with lock:
                inside -= 1
            real_slot.release()

    def peak_for(workers: int) -> int:
        tracemalloc.start()
        try:
            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(prepare, [big] * workers))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert all(r.shape == (28, 28) and r.max() > 0.5 for r in results)

    one = peak_for(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, "LARGE_DECODES", CountingSlot())
        eight = peak_for(8)
    assert most == 2, f"{most} large decodes ran at once"
    mib = 2**20
    assert eight < 2.6 * one, f"8 concurrent decodes peaked at {eight / mib:.0f} MiB, one at {one / mib:.0f}"
    record(
        "hostile images",
        "8 concurrent 2048x2048 (4.2 MP) uploads decoded at once",
        8,
        f"at most 2 decoded together; traced peak {eight / mib:.0f} MiB vs {one / mib:.0f} MiB for one",
        "test_hostile_images.py::test_large_images_are_decoded_a_few_at_a_time",
    )


@pytest.mark.slow
def test_a_request_whose_images_add_up_to_too_many_pixels_stops_before_decoding_the_rest(
    api: InProcess,
) -> None:
    """256 images each just within VAE_MAX_IMAGE_PIXELS fit in an 8 MiB body (a 4096x4096
    PNG of a '1' is about 20 kB) and would take about a minute of CPU to decode; the
    request's pixel budget (VAE_MAX_REQUEST_PIXELS, 4 such images by default) refuses it
    from the fifth image's header, before its pixels are decoded."""
    canvas = np.zeros((4096, 4096), np.uint8)
    canvas[1000:3000, 1900:2200] = 255
    big = b64(png(canvas))
    decoded = 0
    real_load = images.load_pixels

    def counting_load(image: Image.Image, label: str) -> Image.Image:
        nonlocal decoded
        decoded += 1
        return real_load(image, label)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, "load_pixels", counting_load)
        four = api.post("/encode", json={"images": [big] * 4})
        decoded_for_four, decoded = decoded, 0
        started = time.perf_counter()
        flood = api.post("/encode", json={"images": [big] * 256})
        seconds = time.perf_counter() - started
    assert four.status_code == 200, four.text
    assert decoded_for_four == 4
    assert flood.status_code == 422, flood.text
    problem = flood.json()
    assert problem["type"].endswith("too-many-pixels")
    assert "images[4]" in problem["detail"] and "VAE_MAX_REQUEST_PIXELS" in problem["detail"]
    assert decoded == 4, f"{decoded} images were decoded before the refusal"
    record(
        "hostile images",
        f"one request of 256 4096x4096 PNGs ({len(big) * 256 / 2**20:.1f} MiB of JSON)",
        256,
        f"422 too-many-pixels at images[4] after decoding 4, in {seconds:.1f} s",
        "test_hostile_images.py::test_a_request_whose_images_add_up_to_too_many_pixels_stops_before_decoding_the_rest",
    )
