"""The explorer page in a real browser: headless Chromium driven by Playwright, against a
real `vae-serve` process (with an API key, as a hardened deployment runs) serving a 2-D
model and an 8-D one, each with a latent map. Every test fails on a console error or an
uncaught exception in the page; screenshots land in tests/output/."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_support import HAS_CHROMIUM, ONE, OUTPUT, SEVEN, ZERO, launch, served, stop, stroke
from conftest import make_artifact, synthetic_latent_map
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

pytestmark = pytest.mark.skipif(
    not HAS_CHROMIUM,
    reason="no Chromium at /usr/bin/chromium: install Debian's package (apt-get install chromium) "
    "to run the browser tests; .ci/run does",
)

KEY = "explorer-test-key"
KEY_STORAGE = "vae-explorer-api-key"  # as in service/static/js/api.js
# Generous: on an idle machine every wait below ends in well under a second, but a CI runner
# busy with other jobs can starve the browser for many seconds.
TIMEOUT_MS = 30_000
expect.set_options(timeout=TIMEOUT_MS)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str


@dataclass
class Console:
    """What the page reported: console errors and uncaught exceptions."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def unexpected(self, allowed: str | None = None) -> list[str]:
        """Errors other than those matching `allowed`: Chromium logs every failed request
        ("Failed to load resource: ... 401") as a console error, even one the page handles."""
        return [e for e in self.errors if not (allowed and re.search(allowed, e))]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("explorer-store")
    make_artifact(store, "tiny", latent_dim=8, report_files=synthetic_latent_map(8))
    make_artifact(
        store, "tiny-2d", latent_dim=2, seed=1, report_files=synthetic_latent_map(2), learned_prior=True
    )
    # Three classes, a class-conditional prior and a classifier (format 3 in full).
    make_artifact(store, "tiny-classes", latent_dim=6, seed=3, classes=3)
    return store


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("explorer-serve") / "vae-serve.log"
    with served(store, log, "--api-key", KEY, "--max-samples", "100") as (process, url):
        yield Server(process, url)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="module", autouse=True)
def output_dir() -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT


def open_page(
    browser: Browser, server: Server, console: Console, *, key: str | None = KEY, **context_options: Any
) -> Page:
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 1000}, **context_options})
    context.set_default_timeout(TIMEOUT_MS)
    if key:
        # As if the user had typed the key earlier in this tab.
        context.add_init_script(f"sessionStorage.setItem({KEY_STORAGE!r}, {key!r})")
    page = context.new_page()
    console.watch(page)
    page.goto(server.url + "/")
    return page


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def page(browser: Browser, server: Server, console: Console) -> Iterator[Page]:
    page = open_page(browser, server, console)
    expect(page.locator("#model option")).to_have_count(3)
    yield page
    page.context.close()
    assert console.unexpected() == [], "the page logged errors"


def image_src(page: Page, selector: str) -> str:
    return page.locator(selector).get_attribute("src") or ""


# ---------------------------------------------------------------------------- tests


def test_model_selector_lists_the_loaded_models(page: Page) -> None:
    options = page.locator("#model option")
    assert options.evaluate_all("os => os.map(o => o.value)") == ["tiny", "tiny-2d", "tiny-classes"]
    expect(page.locator("#model")).to_have_value("tiny")  # the default (no mnist in this store)
    expect(page.locator("#model option").first).to_contain_text("latent_dim 8, default")
    # The map prefers the 2-D model: there the map is the whole latent space.
    expect(page.locator("#map-model")).to_have_value("tiny-2d")


def test_drawing_a_stroke_shows_mu_sigma_and_kl(page: Page, output_dir: Path) -> None:
    stroke(page, "#draw", SEVEN)
    rows = page.locator("#posterior-chart g.dim")
    expect(rows).to_have_count(8)
    expect(page.locator("#kl-total")).to_contain_text(re.compile(r"= \d+\.\d\d nats over 8 dimensions"))
    expect(page.locator("#reconstruction")).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    values = rows.evaluate_all("gs => gs.map(g => [+g.dataset.mu, +g.dataset.sigma, +g.dataset.kl])")
    assert all(abs(mu) < 1e3 and sigma > 0 and kl >= -1e-6 for mu, sigma, kl in values), values
    # The total is the sum of the per-dimension KLs shown in the rows.
    total = float(re.search(r"= ([\d.]+) nats", page.locator("#kl-total").inner_text()).group(1))
    assert total == pytest.approx(sum(kl for *_, kl in values), abs=0.01)
    # Each row's tooltip gives its numbers.
    expect(rows.first.locator("title")).to_contain_text(re.compile(r"z0: mu -?\d.*sigma .* nats"))

    # Another model: the same drawing, its own latent space.
    page.select_option("#model", "tiny-2d")
    expect(rows).to_have_count(2)
    expect(page.locator("#kl-total")).to_contain_text("over 2 dimensions (tiny-2d v1)")
    page.screenshot(path=output_dir / "explorer-encode.png", full_page=True)


def test_sampling_shows_a_grid_and_its_seed(page: Page) -> None:
    grid = page.locator("#sample-grid img")
    expect(grid).to_have_count(16)  # drawn once as the page opens, with a random seed
    page.fill("#sample-n", "9")
    page.fill("#sample-seed", "42")
    page.fill("#sample-temperature", "0.8")
    page.click("#sample-form button[type=submit]")
    expect(grid).to_have_count(9)
    expect(page.locator("#sample-seed-used")).to_contain_text("Seed 42, temperature 0.8")
    first = grid.evaluate_all("imgs => imgs.map(i => i.src)")
    page.fill("#sample-seed", "43")
    page.press("#sample-seed", "Enter")  # the form works from the keyboard too
    expect(page.locator("#sample-seed-used")).to_contain_text("Seed 43")
    page.fill("#sample-seed", "42")
    page.press("#sample-seed", "Enter")
    expect(page.locator("#sample-seed-used")).to_contain_text("Seed 42")
    assert grid.evaluate_all("imgs => imgs.map(i => i.src)") == first, "the same seed draws the same digits"


def test_both_priors_are_drawn_from_the_same_seed_side_by_side(page: Page, output_dir: Path) -> None:
    expect(page.locator("#sample-grid-standard img")).to_have_count(16)
    expect(page.locator("#sample-learned")).to_be_hidden()  # tiny has the standard prior only
    expect(page.locator("#sample-why")).to_contain_text("has the standard prior only")
    page.select_option("#model", "tiny-2d")  # its learned prior is a random three-part mixture
    page.fill("#sample-n", "9")
    page.fill("#sample-seed", "5")
    page.click("#sample-form button[type=submit]")
    expect(page.locator("#sample-grid-learned img")).to_have_count(9)
    expect(page.locator("#sample-grid-standard img")).to_have_count(9)
    expect(page.locator("#sample-learned")).to_be_visible()
    expect(page.locator("#sample-why")).to_contain_text("the same noise u in both grids")
    expect(page.locator("#sample-seed-used")).to_contain_text("Seed 5")
    standard = page.locator("#sample-grid-standard img").evaluate_all("imgs => imgs.map(i => i.src)")
    learned = page.locator("#sample-grid-learned img").evaluate_all("imgs => imgs.map(i => i.src)")
    assert standard != learned, "the learned prior maps the noise elsewhere"
    page.locator("#sample-panel").screenshot(path=output_dir / "explorer-priors.png")


def test_the_prior_panel_asks_for_a_digit_and_shows_each_draws_verdict(
    page: Page, server: Server, output_dir: Path
) -> None:
    """A model with classes: the digit selector lists them, a chosen one is what the learned
    grid draws, and every draw of both grids carries the classifier's verdict, the doubtful
    ones (< 90 %) marked: the same verdicts the API gives for that seed."""
    label = page.locator("#sample-label")
    expect(label).to_be_disabled()  # tiny: no classes
    page.select_option("#model", "tiny-classes")
    expect(label).to_be_enabled()
    assert label.locator("option").evaluate_all("os => os.map(o => [o.value, o.text])") == [
        ["", "any"],
        ["0", "c0"],
        ["1", "c1"],
        ["2", "c2"],
    ]
    page.fill("#sample-n", "12")
    page.fill("#sample-seed", "21")
    label.select_option("1")  # draws at once
    learned = page.locator("#sample-grid-learned figure.draw")
    standard = page.locator("#sample-grid-standard figure.draw")
    expect(learned).to_have_count(12)
    expect(standard).to_have_count(12)
    expect(page.locator("#sample-why")).to_contain_text("into the region of the c1s")
    expect(page.locator("#sample-verdicts")).to_contain_text("learned-prior draws (asked for c1)")
    body = {"n": 12, "seed": 21, "label": 1, "return_verdicts": True, "model": "tiny-classes"}
    answer = httpx.post(f"{server.url}/sample", json=body, headers={"X-API-Key": KEY}).json()
    shown = learned.evaluate_all("fs => fs.map(f => [Number(f.dataset.label), Number(f.dataset.confidence)])")
    assert [label for label, _ in shown] == [v["label"] for v in answer["verdicts"]]
    assert [round(c, 5) for _, c in shown] == [round(v["confidence"], 5) for v in answer["verdicts"]]
    for grid in (learned, standard):
        marked = grid.evaluate_all(
            "fs => fs.map(f => [f.classList.contains('doubtful'), Number(f.dataset.confidence)])"
        )
        assert all(doubtful == (confidence < 0.9) for doubtful, confidence in marked)
        captions = grid.locator("figcaption").all_inner_texts()
        assert all(re.fullmatch(r"c[0-2] \d{1,3}%", text) for text in captions), captions
    page.locator("#sample-panel").screenshot(path=output_dir / "explorer-verdicts.png")
    label.select_option("")  # any digit again
    expect(page.locator("#sample-why")).not_to_contain_text("region of the")


def test_draws_of_both_priors_are_plotted_over_the_map(page: Page, output_dir: Path) -> None:
    expect(page.locator("#map-explain")).to_contain_text("whole latent space")  # tiny-2d's map
    canvas = page.locator("#map")
    canvas.scroll_into_view_if_needed()
    empty = canvas.screenshot()
    page.check("#map-draws-standard")
    expect(page.locator("#map-draws-explain")).to_contain_text(
        "100 draws of u ~ N(0, I) (seed 1) through the standard"
    )
    with_standard = canvas.screenshot()
    page.check("#map-draws-learned")
    expect(page.locator("#map-draws-explain")).to_contain_text("standard and the learned prior")
    with_both = canvas.screenshot()
    assert len({empty, with_standard, with_both}) == 3, "each kind of draw changes the map"
    page.locator("#map-panel").screenshot(path=output_dir / "explorer-map-draws.png")
    page.select_option("#map-model", "tiny")  # no learned prior: its box is disabled
    expect(page.locator("#map-draws-learned")).to_be_disabled()


def test_out_of_range_sample_count_is_refused_by_the_form(page: Page) -> None:
    page.fill("#sample-n", "500")
    page.click("#sample-form button[type=submit]")
    assert page.locator("#sample-n").evaluate("i => !i.validity.valid && i.validationMessage !== ''")
    expect(page.locator("#sample-grid img")).to_have_count(16)  # nothing was sent


def test_the_map_decodes_the_point_under_the_pointer(page: Page, output_dir: Path) -> None:
    canvas = page.locator("#map")
    decoded = page.locator("#map-decoded")
    expect(decoded).to_have_attribute("src", re.compile(r"^data:image/png"))  # the origin, at load
    expect(page.locator("#map-legend li")).to_have_count(10)
    expect(page.locator("#map-explain")).to_contain_text("whole latent space")
    canvas.scroll_into_view_if_needed()  # mouse coordinates are the viewport's
    box = canvas.bounding_box()
    assert box is not None
    before = image_src(page, "#map-decoded")

    page.mouse.move(box["x"] + 0.15 * box["width"], box["y"] + 0.2 * box["height"])
    expect(page.locator("#map-z")).to_contain_text(re.compile(r"^\(-\d.*, \d.*\); nearest test digit: \d"))
    expect(decoded).not_to_have_attribute("src", before)
    top_left = image_src(page, "#map-decoded")

    page.mouse.click(box["x"] + 0.85 * box["width"], box["y"] + 0.8 * box["height"])
    expect(page.locator("#map-z")).to_contain_text(re.compile(r"^\(\d.*, -\d.*\)"))
    expect(decoded).not_to_have_attribute("src", top_left)

    # Keyboard: the map takes focus and the arrow keys move the cursor.
    canvas.focus()
    page.keyboard.press("Home")
    expect(page.locator("#map-z")).to_contain_text("(0.00, 0.00)")
    page.keyboard.press("Shift+ArrowRight")
    page.keyboard.press("ArrowUp")
    expect(page.locator("#map-z")).to_contain_text("(0.50, 0.10)")
    page.screenshot(path=output_dir / "explorer-map.png", full_page=True)

    # A higher-dimensional model's map is a plane through its latent space.
    page.select_option("#map-model", "tiny")
    expect(page.locator("#map-explain")).to_contain_text("two main (PCA) axes")
    page.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + 0.3 * box["height"])
    expect(page.locator("#map-z")).to_contain_text(re.compile(r"^\(-\d.*, \d.*\)"))


def test_interpolation_between_two_drawn_digits(page: Page, output_dir: Path) -> None:
    page.click("#interp-form button[type=submit]")
    expect(page.locator("#interp-status")).to_contain_text("both A and B")
    stroke(page, "#interp-a", ONE)
    stroke(page, "#interp-b", ZERO)
    page.fill("#interp-steps", "7")
    page.click("#interp-form button[type=submit]")
    strip = page.locator("#interp-strip img")
    expect(strip).to_have_count(7)
    expect(page.locator("#interp-status")).to_contain_text("7 points on the straight line")
    sources = strip.evaluate_all("imgs => imgs.map(i => i.src)")
    assert sources[0] != sources[-1], "the two ends decode two different digits"
    # An example digit, chosen from the keyboard, refills B.
    page.select_option("#interp-b-example", "8")
    page.click("#interp-form button[type=submit]")
    expect(strip.last).not_to_have_attribute("src", sources[-1])
    page.screenshot(path=output_dir / "explorer-interpolation.png", full_page=True)


def test_readable_at_phone_width(
    browser: Browser, server: Server, console: Console, output_dir: Path
) -> None:
    page = open_page(browser, server, console, viewport={"width": 390, "height": 844}, has_touch=True)
    expect(page.locator("#sample-grid img")).to_have_count(16)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a phone screen"
    stroke(page, "#draw", SEVEN)
    expect(page.locator("#posterior-chart g.dim")).to_have_count(8)
    page.screenshot(path=output_dir / "explorer-phone.png", full_page=True)
    page.context.close()
    assert console.unexpected() == []


def test_a_missing_key_asks_for_it_and_a_wrong_one_says_so(
    browser: Browser, server: Server, console: Console
) -> None:
    page = open_page(browser, server, console, key=None)
    status = page.locator("#global-status")
    expect(status).to_contain_text("needs an API key (401)")
    expect(status).to_have_class(re.compile(r"\berror\b"))
    expect(page.locator("#key-panel")).to_have_attribute("open", "")
    expect(page.locator("#api-key")).to_be_focused()
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Enter")
    expect(status).to_contain_text("needs an API key (401)")
    page.fill("#api-key", KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#model option")).to_have_count(3)
    expect(status).to_be_hidden()
    expect(page.locator("#sample-grid img")).to_have_count(16)
    assert page.evaluate(f"sessionStorage.getItem({KEY_STORAGE!r})") == KEY
    page.context.close()
    assert console.unexpected(allowed=r"Failed to load resource: .*401") == []


def test_an_unreachable_server_is_reported_clearly(page: Page, server: Server, console: Console) -> None:
    # Last in this module: it stops the server.
    expect(page.locator("#sample-grid img")).to_have_count(16)
    stop(server.process)
    page.click("#sample-form button[type=submit]")
    status = page.locator("#sample-status")
    expect(status).to_contain_text("The service is unreachable")
    expect(status).to_have_class(re.compile(r"\berror\b"))
    stroke(page, "#draw", SEVEN)
    expect(page.locator("#encode-status")).to_contain_text("unreachable")
    # Chromium logs the refused connections; the page itself must log nothing else.
    console.errors[:] = console.unexpected(allowed=r"Failed to load resource: net::ERR_CONNECTION_REFUSED")
