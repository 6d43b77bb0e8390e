"""A real browser on the real server: the first page renders every part of the core loop and reacts.

Starts `streamlit run explorer/app.py` on a free port, drives Debian's chromium through playwright,
changes a setting, waits for the metrics to change, and saves docs/screenshot.png for the README.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser_helpers import CHROMIUM, CHROMIUM_ARGS, ROOT, start_server, stop_server

if TYPE_CHECKING:
    from playwright.sync_api import Page

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
            budget = first.get_by_role("spinbutton", name="Evaluation budget")
            budget.fill("400")
            budget.press("Enter")
            _wait_idle(first, 60_000)
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
