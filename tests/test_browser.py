"""A real browser on the real server: the first page renders every part of the core loop and reacts.

Starts `streamlit run explorer/app.py` on a free port, drives Debian's chromium through playwright,
changes a setting, waits for the metrics to change, and saves docs/screenshot.png for the README.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser_helpers import CHROMIUM, CHROMIUM_ARGS, ROOT, start_server, stop_server

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

pytestmark = pytest.mark.browser

SCREENSHOT = ROOT / "docs" / "screenshot.png"
FIRST_LAUNCH_S = 600  # the page's first run may train nothing here, but builds every table and the heatmap


@pytest.fixture
def server(explorer_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """The app served headless on localhost; stopped (and only it) at the end."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent (Debian's chromium drives the real-browser test)")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    # the screenshot shows the user's data root, not the tests' empty one
    env = {**os.environ, **{k: v for k, v in explorer_env.items() if k != "TABCONV_DATA"},
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with (tmp_path / "streamlit.log").open("w") as log:
        process, url = start_server(env, log)
        try:
            yield url
        finally:
            stop_server(process)


def _metric(page: Page, prefix: str) -> str:
    card = page.locator('[data-testid="stMetric"]').filter(has_text=prefix).first
    return card.locator('[data-testid="stMetricValue"]').inner_text()


def _wait_idle(page: Page, timeout_ms: int) -> None:
    """Until the script has finished running: no 'running' indicator and no element left stale."""
    page.wait_for_timeout(500)  # the indicator appears shortly after a run starts
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"], [data-stale=\"true\"]')",
                           timeout=timeout_ms)


def test_first_page_renders_and_reacts(server: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 2000})
            started = time.monotonic()
            page.goto(server)
            page.get_by_text("Current configuration #").wait_for(timeout=FIRST_LAUNCH_S * 1000)
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 3",
                                   timeout=FIRST_LAUNCH_S * 1000)
            _wait_idle(page, FIRST_LAUNCH_S * 1000)
            first_screen_s = time.monotonic() - started
            for title in ("Accuracy vs FLOPs per image", "Accuracy vs Storage", "Error propagation: cosine similarity"):
                page.get_by_text(title).first.wait_for(timeout=60_000)  # plotly draws each chart when it is ready
            assert page.get_by_role("button", name="Export configuration").is_visible()
            before = _metric(page, "FLOPs, paper")

            page.locator('[data-testid="stSelectbox"]').filter(has_text="Group or layer").click()
            page.keyboard.type("stage:layer4")
            page.keyboard.press("Enter")
            page.get_by_role("button", name="→ exact").click()
            page.wait_for_function(
                "(before) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some(m => "
                "m.innerText.includes('FLOPs, paper') && !m.innerText.includes(before))", arg=before, timeout=120_000)
            _wait_idle(page, 120_000)
            title = page.locator('[data-testid="stMarkdownContainer"]').filter(has_text="Current configuration #")
            assert "stage:layer4 → exact" in title.first.inner_text()
            assert _metric(page, "FLOPs, paper") != before

            # for the README: the paper's priority masking with 3 layers exact, its sweep on the plots
            slider = page.locator('[data-testid="stSlider"]').filter(has_text="Layers kept exact")
            slider.get_by_role("slider").press("Home")
            _wait_idle(page, 60_000)
            for _ in range(3):
                slider.get_by_role("slider").press("ArrowRight")
                _wait_idle(page, 60_000)
            page.get_by_role("button", name="Apply priority masking").click()
            page.get_by_text("Ranking, worst first").wait_for(timeout=FIRST_LAUNCH_S * 1000)
            _wait_idle(page, 120_000)
            assert "priority: 3 worst exact" in title.first.inner_text()
            assert page.locator('[data-testid="stException"]').count() == 0
            page.mouse.move(0, 0)  # no tooltip in the picture
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()
    print(f"first screen ready in {first_screen_s:.0f} s")


def _history_label(page: Page) -> str:
    return page.locator('[data-testid="stExpander"] summary').filter(has_text="Run history").first.inner_text()


def test_two_tabs_keep_their_own_histories_and_take_turns(server: str) -> None:
    """Two browser sessions on one server: the second starts from the first's work (said so), waits in line
    behind the first's search with its place shown (a C/K change fits tables: long work, which waits its turn), and
    the first cancels its search; each keeps its history."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            first, second = (browser.new_context(viewport={"width": 1400, "height": 1800}).new_page()
                             for _ in range(2))
            for page in (first, second):
                page.goto(server)
                page.get_by_text("Current configuration #").wait_for(timeout=FIRST_LAUNCH_S * 1000)
                _wait_idle(page, FIRST_LAUNCH_S * 1000)
            second.get_by_text("was evaluated earlier on this server").wait_for(timeout=60_000)

            second.locator('[data-testid="stSelectbox"]').filter(has_text="Group or layer").click()
            second.keyboard.type("stage:layer4")
            second.keyboard.press("Enter")
            _wait_idle(second, 60_000)
            _set_number(first, "Evaluation budget", "400")
            target = first.locator('[data-testid="stSlider"]').filter(has_text="Target retention")
            target.get_by_role("slider").press("Home")  # 50%: many feasible moves, each with new tables: minutes
            _wait_idle(first, 60_000)
            first.get_by_role("button", name="Run budgeted search").click()
            first.locator('[data-testid="stProgress"]').filter(has_text="Budgeted search").wait_for(timeout=60_000)

            centroids = second.get_by_role("spinbutton", name="K", exact=True)  # new tables: long work, so it
            centroids.fill("8")  # waits behind the search (a quick toggle would go first)
            centroids.press("Enter")
            second.get_by_role("button", name="→ tables").click()
            notice = second.get_by_text(re.compile(r"Waiting for the server: 1st in line; running now: Budgeted "
                                                   r"search \(another tab, \d+ s\)"))
            notice.wait_for(timeout=60_000)
            below = second.get_by_role("heading", name="Automatic choices")  # the notice opens the core loop
            assert notice.bounding_box()["y"] < below.bounding_box()["y"]

            first.locator('[data-testid="stButton"] button').filter(has_text="Cancel").click()
            first.get_by_text(re.compile("Cancelled after \\d+ s: Budgeted search")).wait_for(timeout=120_000)
            history = second.locator('[data-testid="stExpander"] summary').filter(has_text="Run history")
            expect(history.first).to_contain_text("(3 configurations)", timeout=120_000)  # baseline, start, its toggle
            _wait_idle(first, 60_000)
            _wait_idle(second, 60_000)
            assert "(2 configurations)" in _history_label(first)  # the baseline and its start: the search was cancelled
            assert second.get_by_text(re.compile(r"evaluated earlier on this server|Last change: fitted")).count() == 1
            for page in (first, second):
                assert page.locator('[data-testid="stException"]').count() == 0
        finally:
            browser.close()


# labels, buttons, card values and captions whose text is cut off (wider than the box that shows it)
TRUNCATED = """() => [...document.querySelectorAll(
    '[data-testid="stMarkdownContainer"], [data-testid="stCaptionContainer"]')].filter(
    e => e.offsetParent && e.scrollWidth > e.clientWidth + 1).map(e => e.innerText.slice(0, 60))"""
LEGEND_GAP = """() => [...document.querySelectorAll('.js-plotly-plot')].slice(0, 2).map(plot =>
    plot.querySelector('.legend').getBoundingClientRect().top
    - plot.querySelector('.g-xtitle').getBoundingClientRect().bottom)"""
SHOWN = """(shown) => ![...document.querySelectorAll('[data-testid="stMarkdownContainer"]')]
    .some(m => m.innerText === shown)"""
# as a teacher scrolls to the plots: their top just under the window's (where the browser's scroll anchoring picks a
# node inside the plot, lost when the click redraws it, so that a change of height above moves the plot)
PLOT_AT_TOP = """plot => { plot.scrollIntoView({block: 'start'});
    document.querySelector('[data-testid="stMain"]').scrollTop += 40; }"""
CLICK_SHIFT_PX = 40
 # how far the clicked plot may move: a line of text above it, never the page


@contextmanager
def _timed(times: dict[str, float], action: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    times[action] = time.monotonic() - started
    print(f"{action}: {times[action]:.1f} s", flush=True)


def _set_number(page: Page, label: str, value: str) -> None:
    """Type a value into a number input, as a user does (Enter applies it), and wait for the page to settle."""
    field = page.get_by_role("spinbutton", name=label)
    field.fill(value)
    field.press("Enter")
    _wait_idle(page, 60_000)


def _choose(page: Page, label: str, option: str) -> None:
    """Type into a selectbox and take the first option that matches."""
    page.get_by_role("combobox", name=label, exact=True).click()
    page.keyboard.type(option)
    page.keyboard.press("Enter")
    _wait_idle(page, 120_000)


def _title_box(page: Page) -> Locator:
    return page.locator('[data-testid="stMarkdownContainer"]').filter(has_text="Current configuration #").first


def _title(page: Page) -> str:
    return _title_box(page).inner_text()


def _image_folder(root: Path) -> Path:
    """Three classes of ten random 40x40 images: a user's own data, made here."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("ant", "bee", "cat"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_a_lecture_walks_end_to_end(server: str, tmp_path: Path) -> None:
    """A lecture on the embedded default, at a projector's 1280 px with the sidebar open: the tour, the teaching
    view on three layers, toggles, masking, a search, a short fine-tuning while a second tab waits its turn, a click
    on the plot (which stays in view), a history load, a user's model and back; no exception, nothing cut off, and
    each action's time printed."""
    from playwright.sync_api import expect, sync_playwright

    times: dict[str, float] = {}
    folder = _image_folder(tmp_path / "photos")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            with _timed(times, "first screen"):
                page.goto(server)
                page.get_by_text("Current configuration #").wait_for(timeout=FIRST_LAUNCH_S * 1000)
                page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 3",
                                       timeout=FIRST_LAUNCH_S * 1000)
                _wait_idle(page, FIRST_LAUNCH_S * 1000)
            assert page.evaluate(TRUNCATED) == []
            assert min(page.evaluate(LEGEND_GAP)) > 0  # the legend clear of the axis title

            steps = ["the exact network", "one layer as tables", "every layer as tables", "priority masking",
                     "a budgeted search"]
            for index, step in enumerate(steps):
                with _timed(times, f"tour step {index + 1}: {step}"):
                    page.get_by_role("button", name="Start the guided tour" if index == 0 else "Next →").click()
                    page.get_by_text(f"step {index + 1} of {len(steps)}: {step}").wait_for(timeout=300_000)
                    _wait_idle(page, 300_000)
            for layer, words in (("conv1", "The patch."), ("layer3.1.conv1", "256 input channels"),
                                 ("fc", "is a linear layer")):
                with _timed(times, f"teaching view: {layer}"):
                    _choose(page, "Layer", layer)
                    page.get_by_text(words).first.wait_for(timeout=60_000)
            page.get_by_role("button", name="Leave the tour").click()
            _wait_idle(page, 60_000)

            _choose(page, "Group or layer", "layer4.1.conv2")
            for button in ("All tables (defaults)", "→ exact", "→ tables"):  # the last one: back to all tables
                with _timed(times, f"toggle layer4.1.conv2 {button}"):
                    shown = _title(page)
                    page.get_by_role("button", name=button).click()
                    page.wait_for_function(SHOWN, arg=shown, timeout=120_000)
                    _wait_idle(page, 120_000)

            slider = page.locator('[data-testid="stSlider"]').filter(has_text="Layers kept exact").get_by_role("slider")
            slider.press("Home")
            _wait_idle(page, 60_000)
            for _ in range(2):
                slider.press("ArrowRight")
                _wait_idle(page, 60_000)
            for press, said in (("masking", "Applied priority masking, 2 worst"), ("masking again", "already on")):
                with _timed(times, press):
                    page.get_by_role("button", name="Apply priority masking").click()
                    page.get_by_text(said).wait_for(timeout=300_000)
                    _wait_idle(page, 120_000)

            _set_number(page, "Evaluation budget", "3")
            with _timed(times, "budgeted search (budget 3)"):
                page.get_by_role("button", name="Run budgeted search").click()
                page.get_by_text("The search looked at").wait_for(timeout=300_000)
                _wait_idle(page, 120_000)

            second = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            with _timed(times, "second tab opens"):
                second.goto(server)
                second.get_by_text("Current configuration #").wait_for(timeout=300_000)
                _wait_idle(second, 300_000)
            _set_number(page, "Time budget (s)", "20")
            with _timed(times, "fine-tuning (20 s budget), a second tab waiting behind it"):
                page.get_by_role("button", name=re.compile(r"^Fine-tune #")).click()
                page.locator('[data-testid="stProgress"]').filter(has_text="Fine-tuning").wait_for(timeout=60_000)
                page.locator('[data-testid="stProgress"]').filter(  # its time-left estimate, while it runs
                    has_text=re.compile(r"Fine-tuning: step \d+/\d+.*about \d+ s left")).wait_for(timeout=60_000)
                _choose(second, "Group or layer", "layer2.1.conv2")
                centroids = second.get_by_role("spinbutton", name="K", exact=True)  # new tables: long work, waits
                centroids.fill("8")
                centroids.press("Enter")
                second.get_by_role("button", name="→ tables").click()
                second.get_by_text(re.compile(r"Waiting for the server: 1st in line; running now: Fine-tuning")
                                   ).wait_for(timeout=60_000)
                page.get_by_text(re.compile(r"Fine-tuned #\d+ from #\d+")).first.wait_for(timeout=300_000)
                expect(_title_box(second)).to_contain_text("K=8", timeout=300_000)
                _wait_idle(page, 120_000)
                _wait_idle(second, 120_000)

            plot = page.locator(".js-plotly-plot").first
            plot.evaluate(PLOT_AT_TOP)
            page.wait_for_timeout(1000)
            before, shown = plot.bounding_box()["y"], _title(page)
            star = plot.locator(".scatterlayer .trace").nth(-2).locator(".points path").first  # the baseline
            box = star.bounding_box()
            with _timed(times, "plot click"):
                page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
                page.wait_for_function(SHOWN, arg=shown, timeout=120_000)  # another configuration
                _wait_idle(page, 120_000)
            page.wait_for_timeout(1000)
            moved = plot.bounding_box()["y"] - before
            print(f"the clicked plot moved {moved:+.0f} px")
            assert abs(moved) <= CLICK_SHIFT_PX

            page.locator('[data-testid="stExpander"] summary').filter(has_text="Run history").click()
            table = page.locator('[data-testid="stExpander"]').filter(has_text="Run history").locator(
                '[data-testid="stDataFrame"]')
            table.scroll_into_view_if_needed()
            corner = table.bounding_box()
            with _timed(times, "history load"):
                page.mouse.click(corner["x"] + 15, corner["y"] + 38 + 35 * 1.5)  # row 2: the starting configuration
                load = page.get_by_role("button", name=re.compile(r"^Load #"))
                load.click()
                expect(_title_box(page)).to_contain_text("start: every layer tabled", timeout=60_000)
                _wait_idle(page, 60_000)

            with _timed(times, "a user's model (shufflenet_v2_x0_5, random weights, 32 px)"):
                page.get_by_role("tab", name="Your torchvision model").click()
                page.get_by_role("textbox", name="Architecture").fill("shufflenet_v2_x0_5")
                page.get_by_role("textbox", name="Image folder").fill(str(folder))
                page.get_by_role("spinbutton", name="Image size").fill("32")
                page.get_by_test_id("stBaseButton-primaryFormSubmit").click()  # the sidebar form's Open
                page.get_by_text("shufflenet_v2_x0_5").first.wait_for(timeout=300_000)
                _wait_idle(page, 300_000)
            with _timed(times, "back to the default model"):
                page.get_by_role("tab", name="Built-in model").click()
                page.get_by_test_id("stBaseButton-primaryFormSubmit").click()  # the sidebar form's Open
                page.get_by_text("ResNet-18").first.wait_for(timeout=300_000)
                _wait_idle(page, 300_000)
            for tab in (page, second):
                assert tab.locator('[data-testid="stException"]').count() == 0
        finally:
            browser.close()
    print("lecture walk:", ", ".join(f"{action} {seconds:.1f} s" for action, seconds in times.items()))
