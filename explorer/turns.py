"""Fair sharing of the server's CPU among browser tabs: one line of turns per server process.

Every computation a tab starts (opening a model, an evaluation, a search, a sweep, fine-tuning, a timing) takes a
turn: turns run one at a time, and a tab holds at most one (a nested computation runs inside the turn its tab
already holds). Short requests (an evaluation that builds no tables: a toggle, a load) go ahead of waiting long
work (searches, sweeps, fine-tuning, timing, evaluations that fit tables), first come first served among
themselves; long work gives way between two of its steps to short requests that wait (`give_way`), after at least
MIN_SLICE_S of its own, so that a class's toggles are not stuck behind one student's search, and the search still
advances. While a tab waits, it shows its place in line and what runs ahead of it. A turn can be cancelled by its
tab: the flag is checked in the work's progress callback, which raises Cancelled.

Order of locks, everywhere: first the turn, then a workbench's lock; never a turn while holding a workbench's lock
(work that gives way releases its workbench's lock until its turn comes back).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx
from streamlit.runtime.scriptrunner_utils.script_requests import ScriptRequestType

POLL_S = 1.0  # how often a waiting tab updates its place in line, and a progress bar its timer
MIN_SLICE_S = 2.0  # long work runs at least this long before it gives way to short requests again
RESUME_POLL_S = 0.05  # how often work that gave way looks whether its turn has come back
RECENT_S = 600.0  # how long a tab's last request is remembered (for join_if_free's `quiet_s`)


class Cancelled(Exception):
    """The tab that started the work cancelled it; raised from the work's progress callback."""

    def __init__(self, turn: Turn) -> None:
        self.title = turn.title
        self.seconds = turn.running_for() if turn.started is not None else turn.age()
        super().__init__(f"{turn.title}: cancelled after {self.seconds:.0f} s")


_SERIALS = itertools.count(1)


@dataclass(eq=False)
class Turn:
    """One computation in line: whose (a browser session's id) and what, for the others' waiting message."""

    owner: str
    title: str
    short: bool = False  # a short request (goes ahead of waiting long work); long work gives way to them
    joined: float = field(default_factory=time.monotonic)
    started: float | None = None  # time.monotonic() when it began to run
    depth: int = 1  # nested computations of the same tab inside this turn
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    # unique for the process's life: the key of its waiting note's Cancel button (an id() is reused once the object
    # is freed, so two waits in one page run could get the same key; Streamlit refuses duplicate keys)
    serial: int = field(default_factory=lambda: next(_SERIALS))

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
        self._asked: dict[str, float] = {}  # owner -> when it last joined (the last RECENT_S seconds only)

    def join(self, owner: str, title: str, short: bool = False) -> Turn:
        """The owner's place in line, or the turn it already holds (entered once more). A new long turn goes to the
        end; a short one ahead of every waiting long turn, behind the short ones already waiting."""
        with self._changed:
            self._note(owner, time.monotonic())
            return self._enter(owner, title, short)

    def give_way(self, turn: Turn) -> bool:
        """Called by running long work between two of its steps: when short turns wait and it has run at least
        MIN_SLICE_S, it steps back behind them (ahead of other long work) and the first of them starts. Returns
        whether it did (it must then wait until it runs again)."""
        with self._changed:
            if turn.short or not self._turns or self._turns[0] is not turn or turn.running_for() < MIN_SLICE_S:
                return False
            if not any(other.short for other in self._turns[1:]):
                return False
            self._turns.remove(turn)
            self._turns.insert(self._after_short(), turn)
            turn.started = None
            self._start_first()
            self._changed.notify_all()
            return True

    def join_if_free(self, owner: str, title: str, quiet_s: float = 0.0) -> Turn | None:
        """A turn only if it runs at once (nobody else in line) and no other owner asked for one in the last
        `quiet_s` seconds, else None: for work worth doing only when idle, and only for a lone user when another
        user's next request would undo it. It does not count as asking."""
        with self._changed:
            since = time.monotonic() - quiet_s
            if any(turn.owner != owner for turn in self._turns) or any(
                    other != owner and when > since for other, when in self._asked.items()):
                return None
            return self._enter(owner, title, short=False)

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

    def _after_short(self) -> int:
        """The index behind the running turn and the short turns waiting after it."""
        index = 1
        while index < len(self._turns) and self._turns[index].short:
            index += 1
        return min(index, len(self._turns))

    def _enter(self, owner: str, title: str, short: bool) -> Turn:
        """The owner's turn, entered once more, or a new one in its place in line (with the lock held)."""
        held = self._of(owner)
        if held is not None:
            held.depth += 1
            return held
        turn = Turn(owner, title, short)
        if short:
            self._turns.insert(self._after_short(), turn)
        else:
            self._turns.append(turn)
        self._start_first()
        return turn

    def _note(self, owner: str, when: float) -> None:
        self._asked[owner] = when
        for old in [o for o, t in self._asked.items() if t < when - RECENT_S]:
            del self._asked[old]

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
def turn(title: str, line: Line = LINE, short: bool = False) -> Iterator[Turn]:
    """Hold this tab's turn for the block, first waiting for it with the place in line on the page (updated every
    second). Leaving the block in any way, a rerun of the page included, gives the turn back. `short`: a request
    that goes ahead of waiting long work (see the module's docstring)."""
    held = line.join(owner(), title, short)
    try:
        if not line.wait(held, 0):
            _wait(line, held)
        yield held
    finally:
        line.leave(held)


@contextmanager
def turn_if_free(title: str, line: Line = LINE, quiet_s: float = 0.0) -> Iterator[bool]:
    """Hold a turn for the block only when none waits (and no other tab asked for one in the last `quiet_s`
    seconds); yields whether the block may compute."""
    held = line.join_if_free(owner(), title, quiet_s)
    try:
        yield held is not None
    finally:
        if held is not None:
            line.leave(held)


def give_way(held: Turn, lock: threading.RLock | None = None, line: Line = LINE) -> None:
    """Between two steps of long work: let the short requests that wait run (see Line.give_way), with `lock` (the
    workbench's, held by this work) released meanwhile, and go on when this turn runs again. A Cancel click made
    meanwhile is honoured at once."""
    if not line.give_way(held):
        return
    pause = threading.Condition(lock) if lock is not None else None
    while not line.wait(held, 0 if pause is not None else RESUME_POLL_S):
        if pause is not None:
            with pause:  # waiting on it releases the lock, at every level this thread holds it
                pause.wait(RESUME_POLL_S)
        held.check()


_NOTICES = threading.local()  # per script thread: where this run shows a waiting notice (notices_here)


@contextmanager
def notices_here() -> Iterator[None]:
    """Waiting notices of the block appear here (a placeholder made now), not where the wait happens to be: the
    page calls it right below its title, and the workbench fragment at its own top (a fragment rerun cannot write
    above itself), so that a tab waiting in line says so where it is seen, on first load too."""
    before = getattr(_NOTICES, "slot", None)
    _NOTICES.slot = st.empty()
    try:
        yield
    finally:
        _NOTICES.slot = before


def _wait(line: Line, held: Turn) -> None:
    """Wait with the place in line on the page; the tab's Cancel click (see cancel_clicked) leaves the line.
    Outside a script run (a download built on click) there is no page to show it on: it just waits."""
    if get_script_run_ctx(suppress_warning=True) is None:
        line.wait(held, None)
        return
    note = getattr(_NOTICES, "slot", None) or st.empty()
    key = f"turn_leave_{held.serial}"
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
