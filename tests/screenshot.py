"""The README's picture of the explorer page (docs/explorer.png): the shipped models served
by a real vae-serve, driven in headless Chromium the way a visitor would use the page.

    python tests/screenshot.py docs/explorer.png                   # or: make screenshot
    python tests/screenshot.py out.png --store /some/other/store   # any store with models
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

from browser_support import SEVEN, ZERO, launch, served, stroke
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 300_000  # the README's picture stays small


def take(store: Path, out: Path) -> int:
    with (
        tempfile.TemporaryDirectory() as tmp,
        served(store, Path(tmp) / "vae-serve.log") as (_, url),
        sync_playwright() as playwright,
    ):
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        use_every_panel(page)
        png = page.screenshot(full_page=True)
        browser.close()
    if errors:
        print("the page logged errors:\n" + "\n".join(errors), file=sys.stderr)
        return 1
    # A 256-colour palette keeps the README's picture small; the page has few colours anyway.
    # Octree keeps the few small saturated areas (the classes' colours) that median cut merges.
    rgb = Image.open(io.BytesIO(png)).convert("RGB")
    image = rgb.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    size = out.stat().st_size
    print(f"wrote {out}: {image.width}x{image.height}, {size / 1000:.0f} kB")
    return 0 if size <= MAX_BYTES else 1


def use_every_panel(page: Page) -> None:
    """Draw a 7, sample a seeded grid, point at the 2-D map, interpolate from a 0 to a 7."""
    expect(page.locator("#model option").first).to_be_attached()
    stroke(page, "#draw", SEVEN, steps=8)
    page.check("#sort-kl")
    expect(page.locator("#posterior-chart g.dim").first).to_be_attached()

    page.fill("#sample-n", "30")
    page.fill("#sample-seed", "7")
    page.click("#sample-form button[type=submit]")
    expect(page.locator("#sample-seed-used")).to_contain_text("Seed 7")
    expect(page.locator("#sample-grid-learned img")).to_have_count(30)

    # The learned prior's draws over mnist-2d's map: where the codes of real digits are.
    page.check("#map-draws-learned")
    expect(page.locator("#map-draws-explain")).to_contain_text("learned prior")
    map_canvas = page.locator("#map")
    map_canvas.scroll_into_view_if_needed()
    box = map_canvas.bounding_box()
    assert box is not None
    before = page.locator("#map-decoded").get_attribute("src") or ""
    page.mouse.move(box["x"] + 0.62 * box["width"], box["y"] + 0.36 * box["height"])
    expect(page.locator("#map-decoded")).not_to_have_attribute("src", before)

    stroke(page, "#interp-a", ZERO, steps=8)
    page.select_option("#interp-b-example", "7")
    page.click("#interp-form button[type=submit]")
    expect(page.locator("#interp-strip img")).to_have_count(10)
    page.evaluate("window.scrollTo(0, 0)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, nargs="?", default=ROOT / "docs" / "explorer.png")
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    args = parser.parse_args()
    sys.exit(take(args.store, args.out))


if __name__ == "__main__":
    main()
