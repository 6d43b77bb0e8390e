"""Per-browser-tab state, initialised in one place.

The Session (shared by every tab, cached) holds every configuration evaluated on this server; a tab remembers
which of them it evaluated or loaded (its own history, plots and counts), which one it is looking at, the one
before it (for deltas), its locks and the requests its widgets made. Streamlit drops all of it with the tab.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from tabconv.metrics import Metrics, Origin
from tabconv.settings import LayerSetting

if TYPE_CHECKING:
    from explorer.turns import Cancelled
    from explorer.workbench import Workbench

DEFAULTS: dict[str, Any] = {
    "spec": None,  # the Spec of the Session this tab shows
    "defaults": LayerSetting("table"),  # the default table setting (C, K, encoder, LUT dtype)
    # ids (Session history indices) of the configurations this tab evaluated or loaded, in order, each with the
    # (label, origin) it has in this tab from then on: the one this tab asked for it under, else the session's
    "seen": {},
    "current_id": None,  # id (history index) of the configuration shown
    "previous_id": None,  # the one shown before it, for deltas
    "locks": frozenset(),  # layers locked exact
    "pending": None,  # (settings, label, origin): a configuration a widget asked to evaluate
    "tables_request": None,  # (configuration JSON, its name, tables bytes, their name): a fine-tuned import
    "load_request": None,  # a history id a widget (chart click, history, test) asked to show
    "notice": None,  # (level, text) shown once at the top of the workbench
    "mask_outcome": None,  # what the last press of Apply priority masking loaded, shown beside the button
    "search_outcome": None,  # (level, text): what the last budgeted search did, beside its button
    "open_error": None,  # why the sidebar's last choice could not be opened: shown there until an action succeeds
    "open_failed": None,  # that choice (not tried again until Open is pressed)
    "last_apply": None,  # what the last evaluation rebuilt and re-ran, and how long it took
    "editor_version": 0,  # bumped to reset the data editor after its edits were applied
    "chart_version": 0,  # bumped to clear a chart's selection after a click was handled
    "tour_step": None,  # the guided tour's step on screen (None: no tour)
    "tour_request": None,  # a tour step whose configuration the workbench is to set
    "speed": {},  # configuration id -> its last timing on this machine (a tabconv.latency.Latency)
    "opened_source": None,  # the sidebar tab (built-in model or the user's own) last opened with Open
    "weights_uploads": {},  # an uploaded weights file's id -> where its copy is kept
}


STILL_SHOWING = ("Still showing the model opened before, as it was: change the choice in the sidebar and press Open "
                 "again.")


def init() -> None:
    """Give every key its default once per tab."""
    for key, value in DEFAULTS.items():
        if key not in st.session_state:
            st.session_state[key] = copy.copy(value)


def reset_view() -> None:
    """Forget what this tab showed (a different Session was opened)."""
    for key in ("seen", "current_id", "previous_id", "locks", "pending", "tables_request", "load_request", "notice",
                "last_apply", "tour_step", "tour_request", "speed", "mask_outcome", "search_outcome"):
        st.session_state[key] = copy.copy(DEFAULTS[key])


def notify(level: str, text: str) -> None:
    """Leave a message ('error', 'warning', 'info', 'success': a toast) for the next workbench run."""
    st.session_state.notice = (level, text)


def note_cancelled(exc: Cancelled) -> None:
    """After this tab cancelled its own work: say so on the next run; the page keeps what it showed before."""
    notify("warning", f"Cancelled after {exc.seconds:.0f} s: {exc.title}. The page keeps the configuration it "
                      "showed before.")


def cancelled(exc: Cancelled) -> NoReturn:
    """Say that this tab's work was cancelled, at once (a redraw)."""
    note_cancelled(exc)
    refresh()


def show_notice() -> None:
    """Show why the last Open failed (until another action succeeds), then the pending message once: both where
    the workbench's messages appear, so that a failed Open never stays pinned far from the later ones."""
    if st.session_state.open_error:
        st.error(st.session_state.open_error)
        st.info(STILL_SHOWING)
    if st.session_state.notice:
        level, text = st.session_state.notice
        if level == "success":  # a toast: the next click (on a plot, say) removes no box above what it clicked
            st.toast(text, icon=":material/check_circle:", duration="long")
        else:
            getattr(st, level)(text)
        st.session_state.notice = None


def show_to(metrics: Metrics, asked: tuple[str, Origin] | None = None) -> None:
    """Make a configuration the current one, remembering the previous one for deltas. The first time this tab sees
    it, it joins the tab's history under the label and origin this tab `asked` for it (else the session's), and
    keeps them: a later request that recalls it never relabels it."""
    if metrics.id not in st.session_state.seen:
        st.session_state.seen = {**st.session_state.seen, metrics.id: asked or (metrics.label, metrics.origin)}
    if metrics.id != st.session_state.current_id:
        st.session_state.previous_id = st.session_state.current_id
        st.session_state.current_id = metrics.id


def remember(evaluated: Iterable[Metrics]) -> None:
    """Add configurations (a sweep's or a search's) to this tab's history, once each, in the order they came, under
    the session's labels."""
    seen = st.session_state.seen
    st.session_state.seen = {**seen, **{m.id: (m.label, m.origin) for m in evaluated if m.id not in seen}}


def view(wb: Workbench, config_id: int) -> Metrics:
    """A configuration as this tab sees it: under the label and origin it asked for it (another tab may have
    evaluated it first, under its own)."""
    metrics = wb.metrics(config_id)
    asked = st.session_state.seen.get(config_id)
    if asked is None or asked == (metrics.label, metrics.origin):
        return metrics
    return replace(metrics, label=asked[0], origin=asked[1])


def own_history(wb: Workbench) -> list[Metrics]:
    """The exact baseline, then the configurations this tab evaluated or loaded."""
    base = wb.session.baseline
    return [base] + [view(wb, i) for i in st.session_state.seen if i != base.id]


def request(settings: dict[str, LayerSetting], label: str, origin: Origin = Origin.EDIT) -> None:
    """Ask the workbench to evaluate and show a configuration on its next run."""
    st.session_state.pending = (settings, label, origin)


def refresh() -> NoReturn:
    """Redraw after an action: just the fragment during a fragment run (a full run must rerun the app)."""
    ctx = get_script_run_ctx()
    st.rerun(scope="fragment" if ctx is not None and ctx.fragment_ids_this_run else "app")
