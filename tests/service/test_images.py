"""service.api.images: decoding, MNIST-style fitting, pixel checks, PNGs and grids."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from conftest import MNIST_DIR, needs_mnist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from service_support import decode_png, drawn_digit, encoded, png, png_header_only

from service.api import images
from service.errors import BlankImage, ImageTooLarge, InvalidImage, InvalidPixels

LIMIT = 4096 * 4096


def prepare(data: bytes, invert: bool | None = None, max_pixels: int = LIMIT) -> np.ndarray:
    return images.prepare(data, "images[0]", invert, max_pixels)


def centre_of_mass(x: np.ndarray) -> tuple[float, float]:
    """The intensity-weighted mean pixel index, as MNIST centred it."""
    total = x.sum()
    rows, cols = np.indices(x.shape)
    return float((rows * x).sum() / total), float((cols * x).sum() / total)


def ink_box(x: np.ndarray, threshold: float = 0.0) -> tuple[int, int]:
    rows = np.flatnonzero((x > threshold).any(axis=1))
    cols = np.flatnonzero((x > threshold).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


# ---------------------------------------------------------------------------- 28x28 inputs


def test_a_28x28_light_on_dark_png_is_used_exactly() -> None:
    rng = np.random.default_rng(0)
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 8:20] = rng.integers(0, 256, (20, 12), dtype=np.uint8)
    out = prepare(png(digit))
    assert out.dtype == np.float32 and out.shape == (28, 28)
    np.testing.assert_array_equal(out, digit.astype(np.float32) / 255.0)


def test_a_28x28_dark_on_light_png_is_inverted_exactly() -> None:
    digit = np.full((28, 28), 255, np.uint8)
    digit[6:22, 12:16] = 10
    out = prepare(png(digit))
    np.testing.assert_allclose(out, 1.0 - digit / 255.0, atol=1e-6)


def test_invert_can_be_forced_either_way() -> None:
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 200
    np.testing.assert_allclose(prepare(png(digit), invert=True), 1.0 - digit / 255.0, atol=1e-6)
    light = 255 - digit
    np.testing.assert_allclose(prepare(png(light), invert=False), light / 255.0, atol=1e-6)


def test_rgb_and_16_bit_28x28_images_match_their_grayscale() -> None:
    digit = np.zeros((28, 28), np.uint8)
    digit[5:23, 10:18] = 180
    expected = digit / 255.0
    np.testing.assert_allclose(prepare(png(digit, "RGB")), expected, atol=1e-6)
    sixteen = digit.astype(np.uint16) * 257
    np.testing.assert_allclose(prepare(encoded(Image.fromarray(sixteen))), expected, atol=1e-6)


# ---------------------------------------------------------------------------- fitting other sizes


@pytest.mark.parametrize("size", [(200, 160), (90, 300), (31, 29), (12, 10)])
def test_a_drawn_digit_is_fitted_like_mnist(size: tuple[int, int]) -> None:
    out = prepare(encoded(drawn_digit(size, width=max(2, min(size) // 10))))
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.max() > 0.9, "the strongest ink is stretched to (nearly) 1"
    h, w = ink_box(out)
    assert max(h, w) in (20, 21, 22), "the longer side is scaled to 20 px (Lanczos may spread it a pixel)"
    cy, cx = centre_of_mass(out)
    # Centred on (14, 14), unless that would push ink out of the frame: then it is kept at the edge.
    assert abs(cy - 14) <= 0.5 or out[0].any() or out[-1].any(), cy
    assert abs(cx - 14) <= 0.5 or out[:, 0].any() or out[:, -1].any(), cx
    assert abs(cy - 14) <= 0.5 or abs(cx - 14) <= 0.5


def test_a_digit_whose_mass_sits_high_is_kept_whole_inside_the_frame() -> None:
    top_heavy = np.zeros((100, 100), np.uint8)
    top_heavy[0:30, 0:100] = 255  # a heavy bar on top
    top_heavy[30:100, 48:52] = 255  # a thin stem below
    out = prepare(png(top_heavy))
    assert out[-1].any(), "shifted down as far as it goes"
    assert ink_box(out) == (20, 20), "and nothing cut off"


def test_polarity_is_detected_on_grey_paper_and_with_dark_borders() -> None:
    light_ink = drawn_digit(ink=230, paper=70)  # light ink on dark grey: keep
    dark_ink = drawn_digit(ink=20, paper=140)  # dark ink on mid grey (< 0.5): invert
    assert not images.is_dark_on_light(np.asarray(light_ink, np.float32) / 255)
    assert images.is_dark_on_light(np.asarray(dark_ink, np.float32) / 255)
    # A vignetted photo: the border is darker than the paper, the ink darker still.
    vignetted = np.asarray(drawn_digit(ink=25, paper=220), np.float32) / 255
    vignetted[:8], vignetted[-8:], vignetted[:, :8], vignetted[:, -8:] = 0.45, 0.45, 0.45, 0.45
    assert images.is_dark_on_light(vignetted)


def test_the_two_polarities_of_one_digit_give_the_same_input() -> None:
    dark_on_light = prepare(encoded(drawn_digit(ink=0, paper=255)))
    light_on_dark = prepare(encoded(drawn_digit(ink=255, paper=0)))
    np.testing.assert_allclose(dark_on_light, light_on_dark, atol=1e-5)


def test_strokes_on_a_transparent_canvas_stay_visible_whatever_their_colour() -> None:
    reference = prepare(encoded(drawn_digit(ink=255, paper=0)))
    mask = np.asarray(drawn_digit(ink=255, paper=0))
    for colour in ((0, 0, 0), (255, 255, 255), (200, 30, 30)):
        rgba = np.zeros((*mask.shape, 4), np.uint8)
        rgba[..., :3] = colour
        rgba[..., 3] = mask  # ink opaque, the rest fully transparent
        out = prepare(encoded(Image.fromarray(rgba)))
        assert np.corrcoef(out.ravel(), reference.ravel())[0, 1] > 0.99, colour


def test_jpeg_and_palette_images_are_accepted() -> None:
    reference = prepare(encoded(drawn_digit()))
    rgb = drawn_digit().convert("RGB")
    for data in (encoded(rgb, "JPEG", quality=85), encoded(rgb.convert("P"), "PNG")):
        out = prepare(data)
        assert np.corrcoef(out.ravel(), reference.ravel())[0, 1] > 0.97


def test_a_blank_image_is_refused_clearly() -> None:
    with pytest.raises(BlankImage, match="blank"):
        prepare(encoded(Image.new("L", (100, 100), 255)))
    with pytest.raises(BlankImage):
        prepare(encoded(Image.new("RGBA", (50, 50), (0, 0, 0, 0))))


@needs_mnist
def test_real_mnist_digits_survive_being_scanned() -> None:
    """An MNIST digit, printed dark on light, enlarged 6x and off-centre, is fitted back to
    (nearly) itself: the fitting is MNIST's own normalisation."""
    from trainer.data import load_split

    digits = load_split(MNIST_DIR, "test").images[:20]
    for digit in digits:
        scan = np.full((28 * 6 + 40, 28 * 6 + 90), 240, np.uint8)
        scan[10 : 10 + 28 * 6, 70 : 70 + 28 * 6] = 240 - np.kron(digit, np.ones((6, 6), np.uint8)) * (
            220 / 255
        )
        out = prepare(png(scan))
        assert np.corrcoef(out.ravel(), digit.ravel() / 255.0)[0, 1] > 0.9


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 80),
    height=st.integers(1, 80),
    mode=st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I;16"]),
    seed=st.integers(0, 2**16),
)
def test_any_image_gives_a_valid_input_or_a_blank_error(
    width: int, height: int, mode: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    image = base.convert("I;16") if mode == "I;16" else base.convert(mode)
    try:
        out = prepare(encoded(image))
    except BlankImage:
        return
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


# ---------------------------------------------------------------------------- refusing bad files


def test_non_image_bytes_are_refused_naming_what_they_are() -> None:
    with pytest.raises(InvalidImage, match=r"not an image file .* only PNG and JPEG"):
        prepare(b"hello, world")
    with pytest.raises(InvalidImage, match="empty"):
        prepare(b"")
    with pytest.raises(InvalidImage, match="a GIF; only PNG and JPEG"):
        prepare(encoded(drawn_digit(), "GIF"))


def test_a_truncated_png_is_refused() -> None:
    data = encoded(drawn_digit())
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        prepare(data[: len(data) // 2])
    with pytest.raises(InvalidImage, match="starts like a PNG but its header is corrupt or cut short"):
        prepare(data[:20])
    jpeg = encoded(drawn_digit(), "JPEG")
    with pytest.raises(InvalidImage, match="starts like a JPEG"):
        prepare(jpeg[:4])
    with pytest.raises(InvalidImage, match="JPEG whose data could not be decoded"):
        prepare(jpeg[: len(jpeg) // 2])


def test_decompression_bombs_are_refused_before_decoding() -> None:
    with pytest.raises(ImageTooLarge, match="5000x5000 pixels"):
        prepare(png_header_only(5000, 5000))  # over our limit, under Pillow's
    with pytest.raises(ImageTooLarge):
        prepare(png_header_only(100_000, 100_000))  # over Pillow's own bomb limit too
    with pytest.raises(ImageTooLarge, match="the limit is 1000 pixels"):
        prepare(encoded(drawn_digit((40, 30))), max_pixels=1000)


def test_base64_and_data_urls() -> None:
    data = encoded(drawn_digit())
    text = base64.b64encode(data).decode()
    assert images.decode_base64(text, "x") == data
    assert images.decode_base64(f"data:image/png;base64,{text}", "x") == data
    assert images.decode_base64(text[:40] + "\n" + text[40:], "x") == data
    with pytest.raises(InvalidImage, match="not valid base64"):
        images.decode_base64("not base64!", "images[3]")
    with pytest.raises(InvalidImage, match=";base64"):
        images.decode_base64("data:image/png,abc", "images[0]")


# ---------------------------------------------------------------------------- pixel arrays


def test_pixels_are_checked_for_shape_range_and_finiteness() -> None:
    ok = np.zeros((2, 28, 28)).tolist()
    assert images.check_pixels(ok).shape == (2, 28, 28)
    with pytest.raises(InvalidPixels, match=r"shape \[28, 28\]; expected \[B\]\[28\]\[28\]"):
        images.check_pixels(np.zeros((28, 28)).tolist())
    with pytest.raises(InvalidPixels, match="different lengths"):
        images.check_pixels([[[0.0] * 28] * 27 + [[0.0] * 3]])
    bad = np.zeros((1, 28, 28))
    bad[0, 3, 4] = 1.5
    with pytest.raises(InvalidPixels, match=r"pixels\[0\]\[3\]\[4\] is 1.5; pixels must lie in \[0, 1\]"):
        images.check_pixels(bad.tolist())
    bad[0, 3, 4] = float("nan")
    with pytest.raises(InvalidPixels, match="finite"):
        images.check_pixels(bad.tolist())


# ---------------------------------------------------------------------------- output


def test_png_round_trip_rounds_to_the_nearest_level() -> None:
    x = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(28, 28)
    np.testing.assert_array_equal(decode_png(images.png_bytes(x)), np.rint(x * 255).astype(np.uint8))


@pytest.mark.parametrize("b", [1, 2, 3, 4, 5, 10, 16, 17])
def test_grid_layout(b: int) -> None:
    batch = np.stack([np.full((28, 28), (i + 1) / 20, np.float32) for i in range(b)])
    sheet = images.grid(batch, pad=2)
    cols = int(np.ceil(np.sqrt(b)))
    rows = -(-b // cols)
    assert sheet.shape == (rows * 30 + 2, cols * 30 + 2)
    for i in range(b):
        r, c = divmod(i, cols)
        np.testing.assert_array_equal(sheet[2 + 30 * r : 30 * (r + 1), 2 + 30 * c : 30 * (c + 1)], batch[i])
    assert decode_png(images.grid_png(batch)).shape == (sheet.shape if b > 1 else (28, 28))
