"""Library progress callbacks shown as one Streamlit progress bar, so long work never freezes silently."""

from __future__ import annotations

import itertools
import threading
import time

import streamlit as st
from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

from explorer.turns import POLL_S, Turn, cancel_clicked, give_way
from tabconv.progress import ProgressEvent


class ProgressBar:
    """A callable for the library's `progress=` arguments that drives one st.progress bar.

    Its timer counts every second even through long steps that send no event (a thread with the script's context
    redraws the text). Given the turn its work runs in, it has a Cancel button: a click sets the turn's flag, and
    the next progress event raises turns.Cancelled out of the library. Given the workbench lock the work holds
    (`gives_way`), the work gives way to other tabs' short requests between two of its steps (turns.give_way).
    Use it as a context manager (or close it).
    """

    def __init__(self, title: str, cancellable: Turn | None = None, gives_way: threading.RLock | None = None) -> None:
        self.title = title
        self.started = time.perf_counter()
        self.done = 0.0
        self.text = ""
        self.turn = cancellable
        self.lock = gives_way
        self.key = f"turn_cancel_{next(_BARS)}"
        self.holder = st.empty()
        with self.holder.container():
            self.bar = st.progress(0.0, text=title)
            if cancellable is not None:
                st.button("Cancel", key=self.key, icon=":material/cancel:")
        self._drawing = threading.Lock()  # the script thread and the ticker draw the same bar
        self._closed = threading.Event()
        self._ticker = threading.Thread(target=self._tick, args=(get_script_run_ctx(suppress_warning=True),),
                                        daemon=True)
        add_script_run_ctx(self._ticker)
        self._ticker.start()

    def __call__(self, event: ProgressEvent) -> None:
        if self.turn is not None:
            self.turn.check()
            if self.lock is not None and event.stage.long:
                give_way(self.turn, self.lock)
        self.text = event.describe()
        if event.fraction is not None:
            self.done = event.fraction
        self._draw()

    def _draw(self) -> None:
        with self._drawing:
            if not self._closed.is_set():
                text = f" — {self.text}" if self.text else ""
                self.bar.progress(self.done, text=f"{self.title}{text} ({time.perf_counter() - self.started:.0f} s)")

    def _tick(self, ctx: object) -> None:
        """Every second until closed: the timer, and whether this tab clicked Cancel."""
        while not self._closed.wait(POLL_S):
            if self.turn is not None and cancel_clicked(self.key, ctx):
                self.turn.cancel()
            self._draw()

    def close(self) -> None:
        """Stop the ticker first (it draws no more), then clear the bar."""
        with self._drawing:
            self._closed.set()
        self._ticker.join()
        self.holder.empty()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_BARS = itertools.count()  # a Cancel button's key is unique in its script run
