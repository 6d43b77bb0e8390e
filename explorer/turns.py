"""Fair sharing of the server's CPU among browser tabs: one line of turns per server process.

Every computation a tab starts (opening a model, an evaluation, a search, a sweep, fine-tuning, a timing) takes a
turn: turns run one at a time, first come first served, and a tab holds at most one (a nested computation runs
inside the turn its tab already holds). While a tab waits, it shows its place in line and what runs ahead of it.
A turn can be cancelled by its tab: the flag is checked in the work's progress callback, which raises Cancelled.

Order of locks, everywhere: first the turn, then a workbench's lock; never a turn while holding a workbench's lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx
from streamlit.runtime.scriptrunner_utils.script_requests import ScriptRequestType

POLL_S = 1.0  # how often a waiting tab updates its place in line, and a progress bar its timer


class Cancelled(Exception):
    """The tab that started the work cancelled it; raised from the work's progress callback."""

    def __init__(self, turn: Turn) -> None:
        self.title = turn.title
        self.seconds = turn.running_for() if turn.started is not None else turn.age()
        super().__init__(f"{turn.title}: cancelled after {self.seconds:.0f} s")


@dataclass(eq=False)
class Turn:
    """One computation in line: whose (a browser session's id) and what, for the others' waiting message."""

    owner: str
    title: str
    joined: float = field(default_factory=time.monotonic)
    started: float | None = None  # time.monotonic() when it began to run
    depth: int = 1  # nested computations of the same tab inside this turn
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancel_requested.set()

    def check(self) -> None:
        """Raise Cancelled when the tab asked to cancel (called from progress callbacks)."""
        if self.cancel_requested.is_set():
            raise Cancelled(self)

    def running_for(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def age(self) -> float:
        """Seconds since the tab asked for it (waiting included)."""
        return time.monotonic() - self.joined


class Line:
    """The server's first-come-first-served line of turns; the first one runs. Thread-safe, Streamlit-free."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._turns: list[Turn] = []

    def join(self, owner: str, title: str) -> Turn:
        """The owner's place in line: a new turn at the end, or the turn it already holds (entered once more)."""
        with self._changed:
            held = self._of(owner)
            if held is not None:
                held.depth += 1
                return held
            turn = Turn(owner, title)
            self._turns.append(turn)
            self._start_first()
            return turn

    def join_if_free(self, owner: str, title: str) -> Turn | None:
        """A turn only if it runs at once (nobody else in line), else None: for work worth doing only when idle."""
        with self._changed:
            if any(turn.owner != owner for turn in self._turns):
                return None
        return self.join(owner, title)

    def wait(self, turn: Turn, timeout: float) -> bool:
        """Whether `turn` runs, waiting up to `timeout` seconds for it to come."""
        with self._changed:
            return self._changed.wait_for(lambda: self._turns[0] is turn, timeout)

    def leave(self, turn: Turn) -> None:
        """Give a turn back (or leave the line), once per join; the next one in line starts."""
        with self._changed:
            turn.depth -= 1
            if turn.depth == 0 and turn in self._turns:
                self._turns.remove(turn)
                self._start_first()
                self._changed.notify_all()

    def position(self, turn: Turn) -> int:
        """0: running; n: n-th in line behind the running one."""
        with self._changed:
            return self._turns.index(turn)

    def running(self) -> Turn | None:
        with self._changed:
            return self._turns[0] if self._turns else None

    def _of(self, owner: str) -> Turn | None:
        return next((turn for turn in self._turns if turn.owner == owner), None)

    def _start_first(self) -> None:
        if self._turns and self._turns[0].started is None:
            self._turns[0].started = time.monotonic()


LINE = Line()  # one per server process: every tab of every model shares the one CPU


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def waiting_text(line: Line, turn: Turn) -> str:
    """'Waiting for the server: 2nd in line; running now: Budgeted search (another tab, 14 s)'."""
    text = f"Waiting for the server: {ordinal(line.position(turn))} in line"
    running = line.running()
    if running is not None and running is not turn:
        whose = "this tab" if running.owner == turn.owner else "another tab"
        text += f"; running now: {running.title} ({whose}, {running.running_for():.0f} s)"
    return text + "."


def owner() -> str:
    """This browser session's id (a thread's own id outside a script run, e.g. in a test)."""
    ctx = get_script_run_ctx(suppress_warning=True)
    return ctx.session_id if ctx is not None else f"thread-{threading.get_ident()}"


@contextmanager
def turn(title: str, line: Line = LINE) -> Iterator[Turn]:
    """Hold this tab's turn for the block, first waiting for it with the place in line on the page (updated every
    second). Leaving the block in any way, a rerun of the page included, gives the turn back."""
    held = line.join(owner(), title)
    try:
        if not line.wait(held, 0):
            _wait(line, held)
        yield held
    finally:
        line.leave(held)


@contextmanager
def turn_if_free(title: str, line: Line = LINE) -> Iterator[bool]:
    """Hold a turn for the block only when none waits; yields whether the block may compute."""
    held = line.join_if_free(owner(), title)
    try:
        yield held is not None
    finally:
        if held is not None:
            line.leave(held)


def _wait(line: Line, held: Turn) -> None:
    """Wait with the place in line on the page; the tab's Cancel click (see cancel_clicked) leaves the line.
    Outside a script run (a download built on click) there is no page to show it on: it just waits."""
    if get_script_run_ctx(suppress_warning=True) is None:
        line.wait(held, None)
        return
    note = st.empty()
    key = f"turn_leave_{id(held)}"
    with note.container():
        text = st.empty()
        text.info(waiting_text(line, held), icon=":material/hourglass_top:")
        st.button("Cancel", key=key)
    try:
        while not line.wait(held, POLL_S):
            if cancel_clicked(key):
                held.cancel()
            held.check()
            text.info(waiting_text(line, held), icon=":material/hourglass_top:")
    finally:
        note.empty()


def cancel_clicked(key: str, ctx: object | None = None) -> bool:
    """Whether the browser has asked for a rerun in which the button `key` was clicked.

    A click on a widget inside a fragment does not interrupt the running script: Streamlit queues its rerun until
    the run ends. A Cancel button must act while its work runs, so its click is read from the queued request
    (private to Streamlit 1.67, pinned in requirements.txt; tests/test_turns.py checks that it still works).
    """
    ctx = ctx if ctx is not None else get_script_run_ctx(suppress_warning=True)
    requests = getattr(ctx, "script_requests", None)
    if requests is None or getattr(requests, "_state", None) != ScriptRequestType.RERUN:
        return False
    states = getattr(getattr(requests, "_rerun_data", None), "widget_states", None)
    return states is not None and any(state.id.endswith(f"-{key}") and state.trigger_value
                                      for state in states.widgets)
