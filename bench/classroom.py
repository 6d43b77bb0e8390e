"""A class on one explorer server: N students, each a browser session, doing a scripted mix for a few minutes.

python -m bench.classroom --students 10 --minutes 3 [--json [FILE]] [--seed 0]   (from the repository root: it
                                                                                 reuses tests/browser_helpers.py)

One server (streamlit, headless, a free port) starts cold: temporary table cache, data and checkpoint folders (the
default checkpoint, ResNet-18 on digits, is copied from checkpoints/ when there, else trained first, unmeasured); the
explorer's own defaults (512 calibration images, 450 evaluation images). One chromium, one context per student.
Each student opens the page, then, after seeded think times, toggles single layers in the per-layer table (table <->
exact) or sets a group or layer to tables at another C/K with the group controls, and runs exactly one budgeted
search (even students) or priority masking (odd ones).

Per request: latency = from the click until the browser has received the end of the last script run the click
caused (Streamlit's `script_finished`, not "finished early for a rerun"; its running indicator is not drawn for
fragment runs, so the websocket says when a run ends); shown = until the page then had no stale element left (adds
the browser's rendering, on this machine's CPUs too); server = from the rerun request the browser sent (its
first `rerun_script` websocket frame after the click) until that `script_finished`: the server's share, without
the time a busy browser takes to turn a click into a request; queue wait = how long the server's note "Waiting for the
server: Nth in line" stood, from the websocket: its first frame until the delta that removes it, summed over the
request's waits (the page's own timers lag when other pages share the CPUs); errors = exception or st.error boxes
on the page after it, timeouts, and a page whose configuration is not the one asked for. The server's RSS (with
its children) is sampled every second. At the end every page's configuration is exported (its download button)
and evaluated afresh in this process: a new Session and a new, empty table cache, so the tables are rebuilt too;
its accuracy must equal the exported one and the one the page shows.

`--server-cpus 0` runs the server (and its torch threads) on CPU 0 only and the browsers on the others: in a class
the students' browsers run on their own machines, and on this 2-core machine 25 chromium pages rendering plotly
charts otherwise take CPU time from the server they measure. The server then has one core, half the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Page, async_playwright
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

from bench.streamlit_client import StreamlitClient
from tabconv import zoo
from tabconv.cache import TableCache
from tabconv.config import from_dict
from tabconv.session import Session
from tabconv.structure import ModelStructure
from tabconv.train import load_checkpoint
from tests.browser_helpers import CHROMIUM, CHROMIUM_ARGS, start_server, stop_server

KINDS = ("open", "toggle", "ck", "search", "masking")
ARRIVAL_S = (0.0, 5.0)  # a class does not open the page in the same second
THINK_S = (1.0, 4.0)  # the default pace: a stress test; a class that reads the page thinks longer (--think)
TOGGLE_SHARE = 0.6  # of the requests that are not the one search or masking; the rest are C/K changes
C_CHOICES = (4, 8, 16)
K_CHOICES = (16, 32, 64)
SEARCH_AT = (0.2, 0.6)  # when in a student's minutes the search or masking comes (a fraction, seeded)
WIDGET_TIMEOUT_S = 120  # a widget's own rerun (a selectbox, a number) does no computation
VIEWPORT = {"width": 1400, "height": 1800}  # the per-layer table (21 rows) fits without scrolling inside it
ROW_PX = 35  # the per-layer table's header and row height (Streamlit's data grid)
ACCURACY_CARD = re.compile(r"Accuracy \(\d+ images\)")  # the cards' label: the baseline's, then the current one's
TABLE_COLUMN_HALF_PX = 37  # half the width of its "table" checkbox column (header text + edit icon)
SMALL_FRAME = 256  # websocket frames of at most this size are parsed (script_finished is ~50 bytes)
# turns.waiting_text, e.g. "Waiting for the server: 2nd in line; running now: Budgeted search (another tab, 14 s)."
WAITING = re.compile(
    rb"Waiting for the server: (\d+)\w* in line(?:; running now: (.+?\((?:another|this) tab, \d+ s\)))?")
MIB = 2**20

# x of the per-layer table's "table" checkboxes: the layer column is as wide as its longest name in the grid's font
TABLE_X_JS = """(grid) => {
  const styled = grid.querySelector('[style*="--gdg-font-family"]'), css = getComputedStyle(styled);
  const pad = parseFloat(css.getPropertyValue('--gdg-cell-horizontal-padding'));
  const ctx = document.createElement('canvas').getContext('2d');
  ctx.font = css.getPropertyValue('--gdg-base-font-style') + ' ' + css.getPropertyValue('--gdg-font-family');
  const names = [...grid.querySelectorAll('td[aria-colindex="1"], th[aria-colindex="1"]')].map(c => c.textContent);
  return Math.ceil(Math.max(...names.map(n => ctx.measureText(n).width)) + 2 * pad);
}"""
PROBLEMS_JS = """() => [...document.querySelectorAll(
  '[data-testid="stException"], [data-testid="stAlertContentError"]')].map(e => e.innerText.trim().split('\\n')[0])"""
NOT_STALE_JS = "!document.querySelector('[data-stale=\"true\"]')"


@dataclass
class Request:
    """One student's click and what came of it."""

    student: int
    kind: str
    at_s: float  # when it was clicked, seconds after the benchmark started
    detail: str = ""  # what was asked: a layer, a group and C/K
    latency_s: float | None = None  # None: it did not finish
    server_s: float | None = None  # from the rerun request the browser sent until the end of its runs
    shown_s: float | None = None  # until the page had redrawn every element after that end (the browser's share)
    queue_s: float = 0.0
    place: int = 0  # the worst place in line the page showed (0: never waited)
    behind: str = ""  # what ran ahead of it when it began to wait, as the page said ("Tables (another tab, 3 s).")
    error: str = ""


@dataclass
class Final:
    """A student's last configuration, as exported by its page, and what the page showed of it."""

    student: int
    exported: dict[str, Any] | None = None
    page_accuracy: str = ""
    fresh_accuracy: float | None = None
    connections: int = 0  # websockets the page opened: more than one means it reconnected (a new server session)
    problem: str = ""  # why there is nothing to verify, or what did not match


@dataclass
class Waiting:
    """A page's time in the server's line during one request: from the first "Waiting for the server" note the
    server sends to the delta that removes it (turns.py empties the note when the turn comes), per wait."""

    seconds: float = 0.0
    place: int = 0  # the worst place in line it showed
    behind: str = ""  # what ran ahead when it first waited, as the page said
    since: float | None = None  # the wait going on: when its note came
    note: list[int] | None = None  # where the note is on the page (its delta path)

    def shown(self, now: float, found: re.Match[bytes], path: list[int]) -> None:
        if self.since is None:
            self.since, self.note = now, path[:-1]  # the text sits in the note's container
            self.behind = self.behind or (found[2] or b"").decode()
        self.place = max(self.place, int(found[1]))

    def close(self, now: float) -> None:
        if self.since is not None:
            self.seconds += now - self.since
            self.since = None


class Runs:
    """One page's websocket: when the last script run a click caused ended, and its waits in line."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.ended = asyncio.Event()
        self.ended_at = 0.0
        self.sent_at: float | None = None  # the first rerun request sent since `expect`
        self.connections = 0
        self.waiting = Waiting()

    def expect(self) -> None:
        """Forget earlier runs: the next click's runs are awaited."""
        self.started.clear()
        self.ended.clear()
        self.sent_at = None
        self.waiting = Waiting()

    async def finish(self, timeout: float) -> float:
        """When the runs caused since `expect` ended. A click that started no run within WIDGET_TIMEOUT_S missed
        (a run starts at once, whatever the line: only its computation waits for a turn)."""
        try:
            await asyncio.wait_for(self.started.wait(), WIDGET_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(f"the click started no script run within {WIDGET_TIMEOUT_S} s") from None
        try:
            await asyncio.wait_for(self.ended.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no answer within {timeout:.0f} s") from None
        return self.ended_at

    def watch(self, socket: Any) -> None:
        self.connections += 1
        socket.on("framereceived", self.feed)
        socket.on("framesent", self._sent)

    def _sent(self, payload: str | bytes) -> None:
        """The page's requests are few: each is parsed, and the first rerun request since `expect` is noted."""
        now = time.monotonic()
        if self.sent_at is None and isinstance(payload, bytes) and BackMsg.FromString(payload).WhichOneof(
                "type") == "rerun_script":
            self.sent_at = now

    def feed(self, payload: str | bytes) -> None:
        if not isinstance(payload, bytes):
            return
        now, found = time.monotonic(), WAITING.search(payload)
        if found:
            self.waiting.shown(now, found, list(ForwardMsg.FromString(payload).metadata.delta_path))
        elif len(payload) <= SMALL_FRAME:
            self._small(now, ForwardMsg.FromString(payload))

    def _small(self, now: float, message: ForwardMsg) -> None:
        kind = message.WhichOneof("type")
        if kind == "delta" and list(message.metadata.delta_path) == self.waiting.note:
            self.waiting.close(now)  # the note was replaced: the turn came
        elif kind == "session_status_changed" and message.session_status_changed.script_is_running:
            self.started.set()
            self.ended.clear()  # whatever ended before is not this run's end
        elif kind == "script_finished" and message.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN:
            self.waiting.close(now)
            self.ended_at = now
            self.ended.set()


class PeakRss(threading.Thread):
    """The server's resident memory, its child processes included, sampled every second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.peak = max(self.peak, tree_rss(self.pid))


def tree_rss(pid: int) -> int:
    """VmRSS of a process and all its descendants, in bytes (0 for one that has gone)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:  # it has gone
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        pending += children(current)
    return total


def children(pid: int) -> list[int]:
    """The child processes of every thread of a process (none when they, or the process, have gone)."""
    found = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in listing.read_text().split()]
        except OSError:
            continue
    return found


class Student:
    """One browser session driving the page like a student: open, think, click, wait for the answer."""

    def __init__(self, index: int, page: Page, url: str, structure: ModelStructure, args: argparse.Namespace,
                 started: float) -> None:
        self.index, self.page, self.url, self.structure, self.args = index, page, url, structure, args
        self.rng = random.Random(args.seed * 1000 + index)
        self.started = started
        self.runs = Runs()
        page.on("websocket", self.runs.watch)
        self.requests: list[Request] = []
        self.layers: dict[str, dict[str, Any]] = {}  # the configuration on screen, as the page's JSON gives it
        self.table_x = 0.0

    async def run(self) -> Final:
        try:
            final = await self.session()
        except Exception as exc:  # a failure of this script, not of the server: said, and the others go on
            final = Final(self.index, problem=f"the student's script failed: {type(exc).__name__}: {exc}")
        final.connections = self.runs.connections
        return final

    async def session(self) -> Final:
        """Open, the mix until the minutes are over (the one search or masking at a seeded moment), the export."""
        await asyncio.sleep(self.rng.uniform(*ARRIVAL_S))
        if not await self.request("open", "", self.open):
            return Final(self.index, problem="the page did not open")
        end = time.monotonic() + self.args.minutes * 60
        search_at = time.monotonic() + self.rng.uniform(*SEARCH_AT) * self.args.minutes * 60
        automatic = self.search if self.index % 2 == 0 else self.masking
        while time.monotonic() < end or automatic is not None:
            await asyncio.sleep(self.rng.uniform(*self.args.think))
            if automatic is not None and (time.monotonic() >= search_at or time.monotonic() >= end):
                finished, automatic = await automatic(), None
            elif self.rng.random() < TOGGLE_SHARE:
                finished = await self.toggle()
            else:
                finished = await self.change_ck()
            if not finished:
                return Final(self.index, problem="a request did not finish")
        return await self.final()

    # -- one request ---------------------------------------------------------------------------------
    async def request(self, kind: str, detail: str, act: Callable[[], Awaitable[None]],
                      check: Callable[[], str] | None = None) -> bool:
        """Do `act` (the click), wait for the runs it causes to end, and record it; whether it finished."""
        record = Request(self.index, kind, time.monotonic() - self.started, detail)
        self.requests.append(record)
        try:
            self.runs.expect()
            clicked = time.monotonic()
            await act()
            ended = await self.runs.finish(self.args.timeout)
            record.latency_s = ended - clicked
            record.server_s = None if self.runs.sent_at is None else ended - self.runs.sent_at
            await self.page.wait_for_function(NOT_STALE_JS, timeout=WIDGET_TIMEOUT_S * 1000)
            record.shown_s = time.monotonic() - clicked
            waiting = self.runs.waiting
            record.queue_s, record.place, record.behind = waiting.seconds, waiting.place, waiting.behind
            problems = await self.page.evaluate(PROBLEMS_JS)
            await self.read_configuration()
            record.error = "; ".join(problems) or (check() if check else "")
        except TimeoutError as exc:
            record.error = str(exc)
        except Exception as exc:  # the page or the browser failed: the student cannot go on
            record.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return record.latency_s is not None

    async def set_up(self, kind: str, detail: str, steps: Callable[[], Awaitable[None]]) -> bool:
        """Widget changes before a request's click (not timed); a failure is the request's error."""
        try:
            await steps()
        except Exception as exc:
            self.requests.append(Request(self.index, kind, time.monotonic() - self.started, detail,
                                         error=f"setting the widgets: {type(exc).__name__}: {exc}"))
            return False
        return True

    async def settled(self, act: Callable[[], Awaitable[None]]) -> None:
        """A widget change (no request of its own): do it and wait for its rerun to end."""
        self.runs.expect()
        await act()
        await self.runs.finish(WIDGET_TIMEOUT_S)

    async def read_configuration(self) -> None:
        """The configuration on screen, from the page's "current configuration as JSON"."""
        code = self.page.locator('[data-testid="stExpander"]').filter(
            has_text="The current configuration as JSON").locator("code")
        self.layers = json.loads(await code.text_content())["layers"]

    # -- what a student does ---------------------------------------------------------------------------
    async def open(self) -> None:
        await self.page.goto(self.url, timeout=self.args.timeout * 1000)
        await self.page.get_by_text("Current configuration #").wait_for(timeout=self.args.timeout * 1000)

    async def toggle(self) -> bool:
        """Click one layer's "table" checkbox in the per-layer table."""
        name, row, wanted = self.draw_toggle()

        async def click() -> None:
            grid = self.editor()
            shown = await grid.get_by_test_id(f"glide-cell-0-{row}").text_content()
            if shown != name:
                raise RuntimeError(f"row {row} of the per-layer table is {shown!r}, not {name!r}")
            await grid.scroll_into_view_if_needed()
            if not self.table_x:
                self.table_x = await grid.evaluate(TABLE_X_JS) + TABLE_COLUMN_HALF_PX
            box = await grid.locator("canvas").first.bounding_box()
            await self.page.mouse.click(box["x"] + self.table_x, box["y"] + ROW_PX * (row + 1.5))

        return await self.request("toggle", f"{name} -> {wanted}", click, self.is_mode(name, wanted))

    async def change_ck(self) -> bool:
        """Set a layer, a block or a stage to tables at a C and K it does not have yet (the group controls)."""
        target, names, c, k = self.draw_ck()
        detail = f"{target} -> C={c} K={k}"

        async def steps() -> None:
            await self.choose_target(target)
            await self.set_number("C", c)
            await self.set_number("K", k)

        return await self.set_up("ck", detail, steps) and await self.request(
            "ck", detail, self.page.get_by_role("button", name="→ tables").click, self.has_all(target, c, k))

    async def search(self) -> bool:
        """A budgeted search with the page's defaults (93% retention) and a small evaluation budget."""
        budget = self.args.search_budget
        ready = await self.set_up("search", f"budget {budget}", lambda: self.set_number("Evaluation budget", budget))
        run = self.page.get_by_role("button", name="Run budgeted search")
        return ready and await self.request("search", f"budget {budget}", run.click)

    async def masking(self) -> bool:
        """The paper's priority masking, with as many layers exact as its slider says."""
        return await self.request("masking", "", self.page.get_by_role("button", name="Apply priority masking").click)

    async def final(self) -> Final:
        """The configuration the page exports, and the accuracy its card shows."""
        final = Final(self.index)
        try:
            async with self.page.expect_download() as download:
                await self.page.get_by_role("button", name="Export configuration").click()
            final.exported = json.loads(Path(await (await download.value).path()).read_text())
            # the first accuracy card is the exact baseline's, the second the current configuration's
            cards = self.page.locator('[data-testid="stMetric"]').filter(has_text=ACCURACY_CARD)
            final.page_accuracy = await cards.nth(1).locator('[data-testid="stMetricValue"]').inner_text()
        except Exception as exc:
            final.problem = f"no export: {type(exc).__name__}: {exc}"
        return final

    # -- helpers -----------------------------------------------------------------------------------------
    def editor(self) -> Any:
        return self.page.locator('[data-testid="stDataFrame"]').filter(
            has=self.page.locator("th", has_text=re.compile("^lock$")))

    def has_tables(self, name: str, c: int, k: int) -> bool:
        layer = self.layers[name]
        return layer["mode"] == "table" and (layer["codebooks"], layer["centroids"]) == (c, k)

    def draw_toggle(self) -> tuple[str, int, str]:
        """A layer, its row in the per-layer table, and the mode it is switched to."""
        name = self.rng.choice(self.structure.names)
        return name, self.structure.names.index(name), "exact" if self.layers[name]["mode"] == "table" else "table"

    def draw_ck(self) -> tuple[str, list[str], int, int]:
        """A layer, block or stage, its layers, and a C and K that not all of them have yet."""
        target = self.rng.choice([*self.structure.names, *(g for g in self.structure.groups if ":" in g)])
        names = self.structure.expand(target)
        choices = [(c, k) for c in C_CHOICES for k in K_CHOICES
                   if not all(self.has_tables(n, c, k) for n in names)]
        return (target, names, *self.rng.choice(choices))

    def target_label(self, target: str) -> str:
        """How the group selectbox shows a target: a layer by name, a group with its layer count."""
        return target if target in self.structure.names else f"{target} ({len(self.structure.expand(target))} layers)"

    def is_mode(self, name: str, wanted: str) -> Callable[[], str]:
        """A request's check: "" when the page shows `name` in mode `wanted`, else what is wrong."""
        return lambda: "" if self.layers[name]["mode"] == wanted else f"{name} is not {wanted}"

    def has_all(self, target: str, c: int, k: int) -> Callable[[], str]:
        names = self.structure.expand(target)
        return lambda: "" if all(self.has_tables(n, c, k) for n in names) else f"{target} is not at C={c} K={k}"

    async def choose_target(self, target: str) -> None:
        box = self.page.get_by_role("combobox", name="Group or layer")
        label = self.target_label(target)
        if await box.input_value() == label:
            return

        async def choose() -> None:
            await box.click()
            await self.page.keyboard.type(target)
            await self.page.keyboard.press("Enter")

        await self.settled(choose)
        shown = await box.input_value()
        if shown != label:
            raise RuntimeError(f"typed {target!r}, the selectbox shows {shown!r}")

    async def set_number(self, name: str, value: int) -> None:
        spin = self.page.get_by_role("spinbutton", name=name, exact=True)
        if await spin.input_value() != str(value):
            await self.settled(lambda: self.fill(spin, value))

    @staticmethod
    async def fill(spin: Any, value: int) -> None:
        await spin.fill(str(value))
        await spin.press("Enter")


class WsStudent(Student):
    """The same student and mix without a browser (`--clients websocket`): Streamlit's own websocket protocol
    (bench/streamlit_client.py), so no CPU goes to rendering. A toggle is the per-layer table's edit, a C/K change
    the group controls, as the page sends them; latency and the server's share are then the same thing."""

    def __init__(self, index: int, url: str, structure: ModelStructure, args: argparse.Namespace,
                 started: float) -> None:
        self.index, self.url, self.structure, self.args = index, url, structure, args
        self.rng = random.Random(args.seed * 1000 + index)
        self.started = started
        self.runs = Runs()  # fed every frame: the waits in line
        self.client = StreamlitClient(url, lambda frame, _: self.runs.feed(frame))
        self.requests: list[Request] = []
        self.layers: dict[str, dict[str, Any]] = {}

    async def run(self) -> Final:
        try:
            final = await super().run()
        finally:
            await self.client.close()
        final.connections = self.client.connections
        return final

    async def request(self, kind: str, detail: str, act: Callable[[], Awaitable[float]],
                      check: Callable[[], str] | None = None) -> bool:
        """Send the interaction (`act` returns when), wait for its runs to end, and record it."""
        record = Request(self.index, kind, time.monotonic() - self.started, detail)
        self.requests.append(record)
        try:
            self.runs.waiting = Waiting()
            sent = await act()
            ended = await self.client.finished(self.args.timeout)
            record.latency_s = record.server_s = ended - sent
            waiting = self.runs.waiting
            record.queue_s, record.place, record.behind = waiting.seconds, waiting.place, waiting.behind
            self.read_configuration()
            record.error = "; ".join(self.client.exceptions()) or (check() if check else "")
        except Exception as exc:  # a refused connection, a timeout, a page without the widget asked for
            record.error = f"{type(exc).__name__}: {exc}"
        return record.latency_s is not None

    async def widget(self, state: Any, key: str) -> None:
        """A widget change before a request (not timed): sent, and its run awaited."""
        await self.client.act(state, key, WIDGET_TIMEOUT_S)

    def read_configuration(self) -> None:
        self.layers = self.configuration()["layers"]

    def configuration(self) -> dict[str, Any]:
        """The page's "current configuration as JSON" (the export's content)."""
        found = [json.loads(text) for text in self.client.texts("code") if text.startswith("{")]
        return next(config for config in found if "layers" in config and "metrics" in config)

    async def open(self) -> float:
        await self.client.connect()
        return await self.client.rerun()

    async def toggle(self) -> bool:
        """The per-layer table's "table" cell of one layer, flipped."""
        name, row, wanted = self.draw_toggle()

        async def edit() -> float:
            key, state = self.client.edit_rows("editor-", {row: {"table": wanted == "table"}})
            return await self.client.rerun(state, fragment_id=self.client.fragment_of(key))

        return await self.request("toggle", f"{name} -> {wanted}", edit, self.is_mode(name, wanted))

    async def change_ck(self) -> bool:
        target, _, c, k = self.draw_ck()
        detail = f"{target} -> C={c} K={k}"

        async def steps() -> None:
            await self.widget(self.client.choice("group_target", self.target_label(target)), "group_target")
            await self.widget(self.client.number("group_c", c), "group_c")
            await self.widget(self.client.number("group_k", k), "group_k")

        return await self.set_up("ck", detail, steps) and await self.request(
            "ck", detail, lambda: self.client.press("group_table"), self.has_all(target, c, k))

    async def search(self) -> bool:
        budget = self.args.search_budget
        ready = await self.set_up("search", f"budget {budget}", lambda: self.widget(
            self.client.number("search_budget", budget), "search_budget"))
        return ready and await self.request("search", f"budget {budget}", lambda: self.client.press("run_search"))

    async def masking(self) -> bool:
        return await self.request("masking", "", lambda: self.client.press("run_masking"))

    async def final(self) -> Final:
        final = Final(self.index)
        try:
            final.exported = self.configuration()
            cards = [text for text in self.client.texts("metric") if ACCURACY_CARD.fullmatch(text.split("\n")[0])]
            final.page_accuracy = cards[1].split("\n")[1]
        except Exception as exc:
            final.problem = f"no configuration on the page: {type(exc).__name__}: {exc}"
        return final


# -- the class -----------------------------------------------------------------------------------------------
async def classroom(url: str, structure: ModelStructure, args: argparse.Namespace, started: float
                    ) -> tuple[list[Request], list[Final]]:
    """Every student in its own browser context of one chromium, all at once (or its own websocket client)."""
    if args.clients == "websocket":
        students = [WsStudent(i, url, structure, args, started) for i in range(args.students)]
        if args.warm:
            args.warm_s = await warm_up_client(url, args.timeout)
        finals = await asyncio.gather(*(s.run() for s in students))
        return [r for s in students for r in s.requests], list(finals)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            if args.warm:
                args.warm_s = await warm_up(browser, url, args.timeout)
            students = [await student(browser, i, url, structure, args, started) for i in range(args.students)]
            finals = await asyncio.gather(*(s.run() for s in students))
        finally:
            await browser.close()
    return [r for s in students for r in s.requests], list(finals)


async def warm_up(browser: Browser, url: str, timeout: float) -> float:
    """The teacher opens the page once before the class (not measured): the model opens, the starting
    configuration's tables are built and the heatmap's sweep is run, as the README advises. Returns how long that
    took."""
    begun = time.monotonic()
    context = await browser.new_context(viewport=VIEWPORT)
    page = await context.new_page()
    await page.goto(url, timeout=timeout * 1000)
    await page.get_by_text("Current configuration #").wait_for(timeout=timeout * 1000)
    await page.get_by_text("Rows: one layer tabled alone").wait_for(timeout=timeout * 1000)  # the heatmap's sweep
    await context.close()
    return time.monotonic() - begun


async def warm_up_client(url: str, timeout: float) -> float:
    """`warm_up` without a browser: the page's first run, in full (its heatmap sweep included)."""
    begun = time.monotonic()
    client = StreamlitClient(url)
    await client.connect()
    await client.rerun()
    await client.finished(timeout)
    await client.close()
    return time.monotonic() - begun


async def student(browser: Browser, index: int, url: str, structure: ModelStructure, args: argparse.Namespace,
                  started: float) -> Student:
    context = await browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    context.set_default_timeout(WIDGET_TIMEOUT_S * 1000)  # a page rendering beside 24 others can be slow
    return Student(index, await context.new_page(), url, structure, args, started)


# -- the fresh evaluation ------------------------------------------------------------------------------------
def verify(finals: list[Final], checkpoint: Path, data_root: Path, cache_root: Path) -> None:
    """Evaluate every exported configuration in a new Session with a new table cache; note what differs."""
    cache = TableCache(cache_root)
    for final in finals:
        if final.exported is None:
            final.problem = final.problem or "nothing exported"
            continue
        config = from_dict(final.exported)
        recorded = final.exported["metrics"]
        fresh = Session.from_checkpoint(str(checkpoint), calibration=config.calibration,
                                        eval_images=recorded["eval_images"], data_root=str(data_root),
                                        cache=cache).apply(config.layers).metrics
        final.fresh_accuracy = fresh.accuracy
        differences = [f"{what} {shown} vs fresh {value}" for what, shown, value in (
            ("exported correct", recorded["correct"], fresh.correct),
            ("exported accuracy", recorded["accuracy"], fresh.accuracy),
            ("page accuracy", final.page_accuracy, f"{fresh.accuracy:.2%}")) if shown != value]
        final.problem = "; ".join(differences)


# -- the numbers ---------------------------------------------------------------------------------------------
def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def by_kind(requests: list[Request]) -> dict[str, dict[str, Any]]:
    rows = {}
    for kind in (*KINDS, "all"):
        chosen = [r for r in requests if kind in ("all", r.kind)]
        done = [r.latency_s for r in chosen if r.latency_s is not None]
        served = [r.server_s for r in chosen if r.server_s is not None]
        shown = [r.shown_s for r in chosen if r.shown_s is not None]
        queued = [r.queue_s for r in chosen if r.latency_s is not None]
        rows[kind] = {"requests": len(chosen), "errors": sum(bool(r.error) for r in chosen),
                      "p50_s": percentile(done, 0.5), "p95_s": percentile(done, 0.95), "max_s": max(done, default=None),
                      "server_p50_s": percentile(served, 0.5), "server_p95_s": percentile(served, 0.95),
                      "shown_p50_s": percentile(shown, 0.5), "shown_p95_s": percentile(shown, 0.95),
                      "queue_p50_s": percentile(queued, 0.5), "queue_p95_s": percentile(queued, 0.95),
                      "queue_max_s": max(queued, default=None), "waited": sum(r.place > 0 for r in chosen),
                      "worst_place": max((r.place for r in chosen), default=0)}
    return rows


def summary(args: argparse.Namespace, requests: list[Request], finals: list[Final], peak_rss: int, wall_s: float,
            checkpoint_note: str) -> dict[str, Any]:
    return {"students": args.students, "minutes": args.minutes, "seed": args.seed, "search_budget": args.search_budget,
            "think_s": list(args.think), "clients": args.clients, "warm_s": args.warm_s,
            "server_cpus": args.server_cpus and sorted(args.server_cpus),
            "wall_s": wall_s, "checkpoint": checkpoint_note, "kinds": by_kind(requests),
            "errors": [asdict(r) for r in requests if r.error],
            "sessions": {"verified": sum(f.exported is not None for f in finals),
                         "mismatched": sum(f.exported is not None and bool(f.problem) for f in finals),
                         "unverified": sum(f.exported is None for f in finals),
                         "reconnected": sum(f.connections > 1 for f in finals),
                         "finals": [{"student": f.student, "problem": f.problem, "connections": f.connections,
                                     "exported_accuracy": f.exported and f.exported["metrics"]["accuracy"],
                                     "page_accuracy": f.page_accuracy, "fresh_accuracy": f.fresh_accuracy}
                                    for f in finals]},
            "server_peak_rss_bytes": peak_rss, "requests": [asdict(r) for r in requests]}


def table(result: dict[str, Any]) -> str:
    def sec(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [f"classroom: {result['students']} students, {result['minutes']:g} min each, seed {result['seed']}, "
             f"search budget {result['search_budget']}, think {result['think_s'][0]:g}-{result['think_s'][1]:g} s; "
             f"server up {result['wall_s']:.0f} s; {result['checkpoint']}",
             f"clients: {result['clients']}; server on CPUs {result['server_cpus'] or 'all'}; "
             + ("cold: the class opened it" if result["warm_s"] is None else
                f"warm: the teacher's page opened it first ({result['warm_s']:.0f} s, not measured)"),
             f"{'kind':<8} {'requests':>8} {'errors':>6} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'shown p95':>9} "
             f"{'server p50':>10} {'server p95':>10} {'queue p50':>9} {'queue p95':>9} {'waited':>6} {'place':>5}"]
    for kind, row in result["kinds"].items():
        lines.append(f"{kind:<8} {row['requests']:>8} {row['errors']:>6} {sec(row['p50_s']):>7} {sec(row['p95_s']):>7} "
                     f"{sec(row['max_s']):>7} {sec(row['shown_p95_s']):>9} {sec(row.get('server_p50_s')):>10} "
                     f"{sec(row.get('server_p95_s')):>10} {sec(row['queue_p50_s']):>9} "
                     f"{sec(row['queue_p95_s']):>9} {row['waited']:>6} {row['worst_place']:>5}")
    sessions = result["sessions"]
    lines.append(f"sessions: {sessions['verified']} verified against a fresh evaluation, {sessions['mismatched']} "
                 f"mismatched, {sessions['unverified']} unverified, {sessions['reconnected']} reconnected")
    lines += [f"  student {f['student']}: {f['problem']}" for f in sessions["finals"] if f["problem"]]
    lines += [f"  error: student {e['student']} {e['kind']} {e['detail']}: {e['error']}" for e in result["errors"][:20]]
    lines.append(f"server peak RSS: {result['server_peak_rss_bytes'] / MIB:.0f} MiB (with child processes, "
                 "sampled every second)")
    if "server_log_tail" in result:
        lines += ["server log, last lines:", *(f"  {line}" for line in result["server_log_tail"])]
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------------------------
def prepare(folder: Path) -> tuple[dict[str, str], Path, str]:
    """The server's own empty folders, and the default checkpoint: copied from this checkout, else trained here
    first (not measured: a class meets a server whose model is ready)."""
    checkpoints = folder / "checkpoints"
    checkpoints.mkdir()
    source = zoo.checkpoint_path(zoo.DEFAULT_MODEL, zoo.DEFAULT_DATASET)
    checkpoint = zoo.checkpoint_path(zoo.DEFAULT_MODEL, zoo.DEFAULT_DATASET, root=checkpoints)
    if source.is_file():
        shutil.copyfile(source, checkpoint)
        note = f"checkpoint copied from {source}"
    else:
        zoo.ensure_checkpoint(zoo.DEFAULT_MODEL, zoo.DEFAULT_DATASET, root=checkpoints)
        note = "checkpoint trained before the server started"
    note += "; table cache empty (cold start)"
    env = {"TABCONV_CHECKPOINTS": str(checkpoints), "TABCONV_CACHE": str(folder / "tables"),
           "TABCONV_DATA": str(folder / "data")}
    return env, checkpoint, note


def structure_of(checkpoint: Path) -> ModelStructure:
    model, meta = load_checkpoint(str(checkpoint))
    return ModelStructure(model, tuple(meta["input_shape"]))


def measure(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    env, checkpoint, note = prepare(folder)
    structure = structure_of(checkpoint)
    started = time.monotonic()
    with (folder / "streamlit.log").open("w") as log:
        with pinned(args.server_cpus) as server_env:
            server, url = start_server({**os.environ, **env, **server_env}, log)
        sampler = PeakRss(server.pid)
        sampler.start()
        try:
            requests, finals = asyncio.run(classroom(url, structure, args, started))
        finally:
            sampler.done.set()
            stop_server(server)
    wall_s = time.monotonic() - started
    verify(finals, checkpoint, Path(env["TABCONV_DATA"]), folder / "verify-tables")
    result = summary(args, requests, finals, sampler.peak, wall_s, note)
    if result["errors"] or result["sessions"]["unverified"]:  # the server's side of it, before its folder goes
        result["server_log_tail"] = (folder / "streamlit.log").read_text(errors="replace").splitlines()[-30:]
    return result


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[dict[str, str]]:
    """While the server starts, this process (and so the server it spawns) runs on `cpus` with as many torch
    threads; afterwards, for good, on the other CPUs, which the browsers launched later inherit. None: no pinning."""
    if not cpus:
        yield {}
        return
    everything = os.sched_getaffinity(0)
    if not cpus < everything:
        raise SystemExit(f"error: --server-cpus {sorted(cpus)} must leave some of CPUs {sorted(everything)} "
                         "to the browsers")
    os.sched_setaffinity(0, cpus)
    try:
        yield {"OMP_NUM_THREADS": str(len(cpus))}
    finally:
        os.sched_setaffinity(0, everything - cpus)


def _cpus(text: str) -> set[int]:
    try:
        return {int(part) for part in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--server-cpus takes CPU numbers, e.g. 0 or 0,1, got {text!r}") from None


def _think(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--think takes two seconds, LO,HI (e.g. 10,30), got {text!r}") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"--think needs 0 <= LO <= HI, got {text!r}")
    return low, high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=10)
    parser.add_argument("--minutes", type=float, default=3.0, help="each student's scripted mix after its page opened")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--think", type=_think, default=THINK_S, metavar="LO,HI",
                        help="seconds a student thinks before each click, drawn uniformly (default %(default)s)")
    parser.add_argument("--clients", choices=("browser", "websocket"), default="browser",
                        help="students as chromium pages, or as websocket clients speaking Streamlit's protocol (no "
                        "rendering: on a small machine the browsers would take the server's CPUs)")
    parser.add_argument("--warm", action="store_true",
                        help="the teacher opens the page once before the class arrives (not measured); default: the "
                        "whole class opens a cold server")
    parser.add_argument("--server-cpus", type=_cpus, default=None, metavar="LIST",
                        help="run the server on these CPUs only and the browsers on the others (default: all share)")
    parser.add_argument("--search-budget", type=int, default=5, help="evaluations of each budgeted search")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take before it counts "
                        "as an error (and its student stops)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="write the numbers as JSON to FILE (no FILE: to stdout, the table then to stderr)")
    args = parser.parse_args()
    args.warm_s = None
    if args.clients == "browser" and not CHROMIUM.is_file():
        parser.exit(2, f"error: {CHROMIUM} is absent (Debian's chromium; ./run.sh test installs it)\n")
    with tempfile.TemporaryDirectory(prefix="tabconv-classroom-") as folder:
        result = measure(args, Path(folder))
    print(table(result), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
