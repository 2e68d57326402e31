"""Helpers for driving the explorer page in a real browser: Debian's Chromium, headless,
through Playwright (its pip wheel brings the driver; no `playwright install`), against a
real `vae-serve` process. Used by test_explorer_browser.py and by screenshot.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Page, Playwright
from process_support import serve

# Debian's package (apt-get install chromium): .ci/run installs it where it is missing.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAS_CHROMIUM = Path(CHROMIUM).is_file()
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
OUTPUT = Path(__file__).resolve().parent / "output"  # git-ignored: screenshots of each run


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


@contextmanager
def served(store: Path, log: Path, *options: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A `vae-serve` process on a free port, ready; stopped (if still running) on exit."""
    server = serve(store, log, *options)
    try:
        yield server.process, server.url
    finally:
        stop(server.process)


def stop(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM, as an orchestrator sends; SIGKILL to its session when that is not enough."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def stroke(page: Page, selector: str, points: Sequence[tuple[float, float]], steps: int = 4) -> None:
    """Draws one stroke with mouse events through `points`, given as fractions (0..1) of the
    element's width and height."""
    element = page.locator(selector)
    element.scroll_into_view_if_needed()  # mouse coordinates are the viewport's
    box = element.bounding_box()
    assert box is not None, f"{selector} is not visible"
    at = [(box["x"] + u * box["width"], box["y"] + v * box["height"]) for u, v in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=steps)
    page.mouse.up()


SEVEN = [(0.28, 0.22), (0.72, 0.22), (0.45, 0.85)]
ONE = [(0.52, 0.15), (0.52, 0.85)]
ZERO = [(0.5, 0.15), (0.7, 0.3), (0.7, 0.7), (0.5, 0.85), (0.3, 0.7), (0.3, 0.3), (0.5, 0.15)]
