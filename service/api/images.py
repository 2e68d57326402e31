"""Images in and out: decoding uploads, fitting them into MNIST's 28x28 frame, PNGs and grids.

Pure functions on bytes and numpy arrays (Pillow + numpy, no torch, no HTTP), so the
client can import the PNG and grid helpers and tests can check each step alone.

The fitting follows LeCun et al.'s normalisation of MNIST, after making the image look
like MNIST (light ink on a black background); docs/service.md lists the steps:

    1. decode (PNG or JPEG only; width*height checked before any pixel is decoded; every
       PNG chunk's CRC checked; APNG: its static image), then turn upright by EXIF orientation
    2. composite transparency over a background that contrasts with the ink
    3. grayscale, in [0, 1]
    4. polarity: invert when the ink is darker than the background (or as the caller says)
    5. a 28x28 image is now used as it is; any other size is fitted:
       stretch the contrast so the background is 0 and the strongest ink 1, zero the
       faint noise below 0.1, crop to the ink's bounding box, scale the longer side to
       20 px (Lanczos, aspect kept), and paste into a black 28x28 canvas so that the
       centre of mass of the intensities lands on pixel (14, 14).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import struct
import threading
import warnings
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from vae_client.images import grid, to_uint8

from service.errors import BlankImage, ImageTooLarge, InvalidImage, InvalidPixels, TooManyPixels

SIDE = 28  # MNIST's frame
BOX = 20  # MNIST digits were scaled to fit a 20x20 box inside that frame
CENTRE = 14  # ... and shifted so that their centre of mass fell on pixel (14, 14)
NOISE_FLOOR = 0.1  # after contrast stretching, fainter pixels are paper texture or JPEG noise
MIN_CONTRAST = 0.1  # less than this between background and strongest ink: nothing is drawn
# A decoded image costs about 14 bytes per pixel on its way to 28x28 (Pillow's copy, float32
# grey, their temporaries): 230 MiB at the default 16.8 MP limit. Requests are decoded on
# Starlette's thread pool, up to 40 at once, so images above LARGE_IMAGE_PIXELS take turns
# through LARGE_DECODES slots: memory stays bounded whatever clients send at once, and small
# images (every real digit) never wait.
LARGE_IMAGE_PIXELS = 1024 * 1024
LARGE_DECODES = threading.BoundedSemaphore(2)
ACCEPTED_FORMATS = ("PNG", "JPEG")

# Pillow warns (rather than fails) for images between MAX_IMAGE_PIXELS and twice that;
# our own, lower limit is checked first, but a warning must never let a bomb through.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

_MAGIC_NAMES = (
    (b"GIF8", "a GIF"),
    (b"BM", "a BMP"),
    (b"II*\x00", "a TIFF"),
    (b"MM\x00*", "a TIFF"),
    (b"\x00\x00\x01\x00", "an ICO"),
    (b"%PDF", "a PDF"),
    (b"<svg", "an SVG"),
    (b"<?xml", "XML"),
)


# ---------------------------------------------------------------------------- decoding


def decode_base64(text: str, label: str) -> bytes:
    """Base64 (standard alphabet, line breaks allowed) or a data URL such as a canvas's toDataURL()."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidImage(
                f"{label} is a data URL without ';base64,'; expected "
                "data:image/png;base64,<data> or plain base64"
            )
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(
            f"{label} is not valid base64 ({exc}); expected a base64-encoded PNG or JPEG file"
        ) from exc


def _describe_format(data: bytes) -> str:
    if data[4:8] == b"ftyp":
        return "an HEIF/AVIF image"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WebP image"
    for magic, name in _MAGIC_NAMES:
        if data.startswith(magic):
            return name
    head = data[:8].hex(" ")
    return f"not an image file (it starts with bytes {head})" if data else "empty (0 bytes)"


def _unreadable(data: bytes, label: str, exc: Exception) -> InvalidImage:
    claimed = (
        "PNG" if data.startswith(b"\x89PNG\r\n\x1a\n") else "JPEG" if data.startswith(b"\xff\xd8") else None
    )
    if claimed:
        # Pillow's "cannot identify image file <_io.BytesIO ...>" would tell the reader nothing.
        reason = "" if isinstance(exc, UnidentifiedImageError) else f" ({exc})"
        return InvalidImage(
            f"{label} starts like a {claimed} but its header is corrupt or cut short{reason}; "
            "send the complete file"
        )
    return InvalidImage(f"{label} is {_describe_format(data)}; only PNG and JPEG images are accepted")


def _png_damage(data: bytes) -> str | None:
    """What is broken in a PNG's chunk stream, in words, or None when every chunk up to
    IEND is complete and matches its CRC.

    Pillow skips the CRC of the image data (IDAT) and stops reading once it has the rows it
    needs, so without this a flipped byte in IDAT can decode into different pixels, and a
    file cut after its last IDAT passes, instead of being refused."""
    view = memoryview(data)
    pos = 8  # after the signature
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        name = kind.decode("ascii", "backslashreplace")
        end = pos + 12 + length  # length, type, data, CRC
        if end > len(data):
            return f"its {name} chunk at byte {pos} is cut short"
        if zlib.crc32(view[pos + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            return f"its {name} chunk at byte {pos} fails its CRC check"
        if kind == b"IEND":
            return None  # anything after IEND is not part of the image
        pos = end
    return "it ends without an IEND chunk"


def _jpeg_damage(data: bytes) -> str | None:
    """What is missing from a JPEG: its image data, when the end marker follows the first
    scan's header at once; else None. libjpeg takes that as a premature end and paints a
    flat grey image rather than failing. (A JPEG has no checksum: other damage inside the
    scan cannot be told from image data.)"""
    pos = 2  # after SOI
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        if data[pos + 1] == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if data[pos + 1] == 0xDA:  # SOS: the entropy-coded data follows its header
            start = pos + 2 + length
            return "its scan holds no image data" if data[start : start + 2] == b"\xff\xd9" else None
        pos += 2 + length
    return None  # a broken marker structure is Pillow's to report


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (phone photos are stored sideways with
    orientation 6 or 8). A corrupt EXIF block is ignored: the pixels themselves are fine."""
    if "exif" not in image.info:  # no EXIF block (JPEG APP1, PNG eXIf): skip parsing, ~10 µs
        return image
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # Pillow's EXIF parser raises many kinds on a damaged block
        pass
    return image


def open_image(data: bytes, label: str, max_pixels: int) -> Image.Image:
    """Opens a PNG or JPEG and checks it, reading only its header and chunk structure: refuses
    anything larger than max_pixels, or damaged. Its pixels are decoded by load_pixels.

    Image.open only reads the header, so the size check runs before any pixel data is
    decompressed: a 100000x100000 PNG of zeros is a few kilobytes and would otherwise
    expand to 10 GB. An animated PNG gives its static image (IDAT, normally the first frame)."""
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(
            f"{label} declares more pixels than this server decodes "
            f"(the limit is {max_pixels} pixels, VAE_MAX_IMAGE_PIXELS)"
        ) from exc
    except Exception as exc:  # UnidentifiedImageError, or a header that fails in format-specific ways
        raise _unreadable(data, label, exc) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{label} is {width}x{height} pixels ({width * height / 1e6:.1f} MP); the limit is "
            f"{max_pixels} pixels ({max_pixels / 1e6:.1f} MP, VAE_MAX_IMAGE_PIXELS). "
            "Downscale it first: digits are fitted into 28x28 anyway"
        )
    damage = _png_damage(data) if image.format == "PNG" else _jpeg_damage(data)
    if damage:
        raise InvalidImage(
            f"{label} is a {image.format} whose data is damaged ({damage}); "
            "the file is probably truncated or corrupt"
        )
    return image


def load_pixels(image: Image.Image, label: str) -> Image.Image:
    """Decodes the pixels of an image open_image has checked, turned upright by its EXIF."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{label} expands to more pixels than allowed ({exc})") from exc
    except Exception as exc:  # truncated data: OSError; corrupt chunks: SyntaxError, ValueError, zlib.error
        raise InvalidImage(
            f"{label} is a {image.format} whose data could not be decoded ({exc}); "
            "the file is probably truncated or corrupt"
        ) from exc
    return _upright(image)


def to_grayscale(image: Image.Image) -> np.ndarray:
    """float32 [H, W] in [0, 1]. Transparent pixels take the background that contrasts
    with the visible ink, so black strokes on a transparent canvas stay visible, and so
    do white ones."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale PNG
        return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if image.mode == "L":
        return np.asarray(image, dtype=np.float32) / 255.0
    if not image.has_transparency_data:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    la = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32) / 255.0
    luma, alpha = la[..., 0], la[..., 1]
    opacity = float(alpha.sum())
    if opacity == 0.0:
        return np.zeros(luma.shape, np.float32)  # fully transparent: nothing drawn
    ink_luma = float((luma * alpha).sum()) / opacity
    background = 1.0 if ink_luma < 0.5 else 0.0
    return (alpha * luma + (1.0 - alpha) * background).astype(np.float32)


def border(gray: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels, about 1/28 of the shorter side wide."""
    k = max(1, min(gray.shape) // SIDE)
    return np.concatenate(
        [gray[:k].ravel(), gray[-k:].ravel(), gray[k:-k, :k].ravel(), gray[k:-k, -k:].ravel()]
    )


def is_dark_on_light(gray: np.ndarray) -> bool:
    """True when the ink is darker than the background, i.e. the image needs inverting.

    The background is the median pixel (ink covers well under half of any digit image);
    the ink is whichever extreme, darkest or brightest pixel, lies further from it.
    Comparing with the background rather than with 0.5 copes with grey paper, and the
    median rather than the border copes with vignetted photos and strokes that touch the
    edge. A uniform image falls back to: invert when brighter than mid-grey."""
    background = float(np.median(gray))
    darker = background - float(gray.min())
    lighter = float(gray.max()) - background
    if abs(darker - lighter) < 1e-6:
        return background > 0.5
    return darker > lighter


def fit_into_frame(gray: np.ndarray, label: str = "the image") -> np.ndarray:
    """MNIST's normalisation of a light-on-dark image of any size: float32 [28, 28]."""
    # The higher of two estimates: a vignetted photo's border is brighter (after inverting)
    # than its paper, and must not count as ink.
    background = max(float(np.median(border(gray))), float(np.median(gray)))
    peak = float(gray.max())
    if peak - background < MIN_CONTRAST:
        raise BlankImage(
            f"{label} is blank: no ink stands out from its background (contrast "
            f"{max(peak - background, 0.0):.3f}, at least {MIN_CONTRAST} expected); "
            "send an image with a digit drawn on it"
        )
    x = np.clip((gray - background) / (peak - background), 0.0, 1.0)
    x[x < NOISE_FLOOR] = 0.0
    rows = np.flatnonzero(x.any(axis=1))
    cols = np.flatnonzero(x.any(axis=0))
    x = x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = x.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    x = np.asarray(
        Image.fromarray(x.astype(np.float32)).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    )
    x = np.clip(x, 0.0, 1.0)  # Lanczos overshoots at sharp edges
    h, w = x.shape
    total = float(x.sum())
    if total <= 0.0:
        raise BlankImage(f"{label} has too little ink to be seen at 28x28; draw the digit larger or bolder")
    # MNIST put the intensity-weighted mean pixel index at (14, 14): over its test set every
    # digit's lies within half a pixel of it. Rounded shifts, as theirs, so pixels stay pixels.
    cy = float((x.sum(axis=1) * np.arange(h)).sum()) / total
    cx = float((x.sum(axis=0) * np.arange(w)).sum()) / total
    # Keep the whole digit inside the frame even when its mass sits far off its box centre.
    top = min(max(round(CENTRE - cy), 0), SIDE - h)
    left = min(max(round(CENTRE - cx), 0), SIDE - w)
    canvas = np.zeros((SIDE, SIDE), np.float32)
    canvas[top : top + h, left : left + w] = x
    return canvas


class PixelBudget:
    """The pixels one request's images may decode to in all (VAE_MAX_REQUEST_PIXELS): 256
    images each just under VAE_MAX_IMAGE_PIXELS fit in an 8 MiB body (a blank 4096x4096 PNG
    is 16 kB) and would cost about a minute of CPU to decode. Charged from each header,
    before its pixels are decoded."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def charge(self, pixels: int, label: str) -> None:
        self.used += pixels
        if self.used > self.limit:
            raise TooManyPixels(
                f"the images up to {label} add up to {self.used / 1e6:.1f} MP, over the "
                f"{self.limit / 1e6:.1f} MP one request may decode (VAE_MAX_REQUEST_PIXELS); "
                "send fewer or smaller images per request: digits are fitted into 28x28 anyway"
            )


def prepare(
    data: bytes, label: str, invert: bool | None, max_pixels: int, budget: PixelBudget | None = None
) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> the model's input for one image, float32 [28, 28] in [0, 1].

    invert: None decides from the image (is_dark_on_light), True/False force it."""
    image = open_image(data, label, max_pixels)
    width, height = image.size
    if budget is not None:
        budget.charge(width * height, label)
    slot = LARGE_DECODES if width * height > LARGE_IMAGE_PIXELS else contextlib.nullcontext()
    with slot:
        gray = to_grayscale(load_pixels(image, label))
        if invert is None:
            invert = is_dark_on_light(gray)
        if invert:
            gray = 1.0 - gray
        if gray.shape == (SIDE, SIDE):
            return gray.astype(np.float32, copy=False)  # already MNIST-sized: MNIST round-trips exactly
        return fit_into_frame(gray, label)


def prepare_batch(
    items: Sequence[tuple[str, bytes]],
    invert: bool | None,
    max_pixels: int,
    max_total_pixels: int | None = None,
) -> np.ndarray:
    """(label, bytes) pairs -> float32 [B, 28, 28]; max_total_pixels bounds their sum."""
    budget = PixelBudget(max_total_pixels) if max_total_pixels else None
    return np.stack([prepare(data, label, invert, max_pixels, budget) for label, data in items])


def check_pixels(pixels: object, invert: bool | None = None) -> np.ndarray:
    """A [B][28][28] pixel array from JSON -> float32 [B, 28, 28], or a clear error.

    Pixel arrays are taken as model input: no fitting, and inverted only when asked."""
    try:
        x = np.asarray(pixels, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise InvalidPixels(
            "pixels must be a [B][28][28] array of numbers in [0, 1]; "
            f"its rows have different lengths or hold non-numbers ({exc})"
        ) from exc
    if x.ndim != 3 or x.shape[1:] != (SIDE, SIDE) or x.shape[0] == 0:
        raise InvalidPixels(
            f"pixels has shape {list(x.shape)}; expected [B][28][28] with B >= 1 "
            "(one 28x28 grid of numbers in [0, 1] per image)"
        )
    bad = ~np.isfinite(x)
    if bad.any():
        where = "".join(f"[{i}]" for i in np.argwhere(bad)[0])
        raise InvalidPixels(f"pixels{where} is {x[bad][0]}; pixels must be finite numbers in [0, 1]")
    out_of_range = (x < 0.0) | (x > 1.0)
    if out_of_range.any():
        where = "".join(f"[{i}]" for i in np.argwhere(out_of_range)[0])
        raise InvalidPixels(
            f"pixels{where} is {x[out_of_range][0]:g}; pixels must lie in [0, 1] (divide 0-255 values by 255)"
        )
    return 1.0 - x if invert else x


# ---------------------------------------------------------------------------- encoding


# PNGs are written here rather than by Pillow: an 8-bit grayscale PNG is a fixed header, the
# rows (each prefixed by filter byte 0, "none") deflated, and an end marker. Building it
# from the whole uint8 batch at once costs ~20 µs per digit against ~49 µs for Pillow's
# save, on /sample's hot path (docs/performance.md). Any PNG decoder reads the result.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# zlib level 1: on a decoded 28x28 digit, 11 µs instead of 13 µs at Pillow's default 6 (a
# quarter of the whole PNG's cost), for files about 5 % larger (~300 bytes instead of ~290).
PNG_COMPRESS_LEVEL = 1


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


_PNG_END = _png_chunk(b"IEND", b"")


def png_files(images: np.ndarray) -> list[bytes]:
    """[B, H, W] floats in [0, 1] (or uint8) -> one 8-bit grayscale PNG file per image."""
    pixels = images if images.dtype == np.uint8 else to_uint8(images)
    b, h, w = pixels.shape
    rows = np.zeros((b, h, w + 1), np.uint8)  # column 0: each row's filter type, 0
    rows[:, :, 1:] = pixels
    header = PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    return [
        header + _png_chunk(b"IDAT", zlib.compress(image.tobytes(), PNG_COMPRESS_LEVEL)) + _PNG_END
        for image in rows
    ]


def png_bytes(x: np.ndarray) -> bytes:
    """A float [H, W] image in [0, 1] (or uint8) -> an 8-bit grayscale PNG file."""
    return png_files(x[None])[0]


def png_base64(images: np.ndarray) -> list[str]:
    """[B, H, W] floats -> one base64 PNG string per image."""
    return [base64.b64encode(data).decode("ascii") for data in png_files(images)]


def grid_png(images: np.ndarray) -> bytes:
    """One PNG: the image itself when there is one, else a grid."""
    return png_bytes(images[0] if len(images) == 1 else grid(images))
