"""The server's line of turns (explorer.turns): first come first served, one at a time, places reported, a turn
cancelled through its progress callback; and the bounded result store."""

from __future__ import annotations

import itertools
import threading

import pytest
from streamlit.proto.WidgetStates_pb2 import WidgetStates
from streamlit.runtime.scriptrunner import RerunData
from streamlit.runtime.scriptrunner_utils.script_requests import ScriptRequests

from explorer import progress, turns
from explorer.turns import Cancelled, Line, waiting_text
from tabconv.progress import ProgressEvent, Stage

WAIT_S = 60  # generous: a bound on a hang, never on speed


def test_turns_run_one_at_a_time_in_the_order_they_were_asked_for() -> None:
    line = Line()
    first = line.join("tab-0", "first")
    order: list[str] = []
    running = []
    overlap = threading.Lock()

    def work(owner: str) -> None:
        held = line.join(owner, f"work of {owner}")
        joined[owner].set()
        assert line.wait(held, WAIT_S)
        with overlap:
            running.append(owner)
            assert len(running) == 1, running  # nobody else runs meanwhile
        order.append(owner)
        with overlap:
            running.remove(owner)
        line.leave(held)

    owners = [f"tab-{i}" for i in range(1, 5)]
    joined = {owner: threading.Event() for owner in owners}
    threads = []
    for owner in owners:  # each joins before the next starts: the order they asked in is known
        threads.append(threading.Thread(target=work, args=(owner,)))
        threads[-1].start()
        assert joined[owner].wait(WAIT_S)
    assert order == []  # all wait behind the first
    line.leave(first)
    for thread in threads:
        thread.join(WAIT_S)
    assert order == owners
    assert line.running() is None


def test_a_waiting_tab_knows_its_place_and_what_runs_ahead() -> None:
    line = Line()
    search = line.join("a", "Budgeted search")
    toggle = line.join("b", "Evaluating")
    other = line.join("c", "Evaluating")
    assert [line.position(t) for t in (search, toggle, other)] == [0, 1, 2]
    assert waiting_text(line, other).startswith("Waiting for the server: 2nd in line; running now: Budgeted search "
                                                "(another tab, ")
    line.leave(search)
    assert line.running() is toggle and line.position(other) == 1
    assert waiting_text(line, other).startswith("Waiting for the server: 1st in line; running now: Evaluating")
    assert [turns.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd"]


def test_a_tab_holds_one_turn_and_nested_work_runs_inside_it() -> None:
    line = Line()
    outer = line.join("a", "Sensitivity")
    other = line.join("b", "Evaluating")
    assert line.join("a", "Evaluating inside it") is outer  # not a second place in line
    assert line.join_if_free("b", "Preparing the next edit") is None  # "a" runs: no idle-time work for "b"
    line.leave(outer)
    assert line.running() is outer  # still inside the outer block
    line.leave(outer)
    assert line.running() is other


def test_idle_time_work_waits_for_the_other_tabs_to_be_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(turns.time, "monotonic", lambda: clock[0])
    line = Line()
    line.leave(line.join("a", "Evaluating"))
    alone = line.join_if_free("a", "Preparing the next edit", quiet_s=60)
    assert alone is not None  # only this tab asked: a lone user's idle-time work runs
    line.leave(alone)
    line.leave(line.join("b", "Evaluating"))  # another student asks (and is done)
    clock[0] += 30
    assert line.join_if_free("a", "Preparing the next edit", quiet_s=60) is None  # b would undo it
    assert line.join_if_free("a", "Preparing the next edit") is not None  # no quiet asked for: as before
    line.leave(line.running())
    clock[0] += 31
    later = line.join_if_free("a", "Preparing the next edit", quiet_s=60)
    assert later is not None and line.running() is later  # b has been quiet for 61 s
    line.leave(later)
    clock[0] += turns.RECENT_S + 1
    line.leave(line.join("c", "Evaluating"))
    assert set(line._asked) == {"c"}  # old tabs are forgotten: memory stays bounded with many sessions


def test_a_cancelled_turn_stops_its_work_at_the_next_progress_event() -> None:
    line = Line()
    held = line.join("a", "Budgeted search")
    bar = progress.ProgressBar("Budgeted search", cancellable=held)
    try:
        bar(ProgressEvent(Stage.GREEDY, 0, 10))  # runs on
        held.cancel()
        with pytest.raises(Cancelled) as raised:
            bar(ProgressEvent(Stage.GREEDY, 1, 10))
    finally:
        bar.close()
        line.leave(held)
    assert raised.value.title == "Budgeted search"
    assert line.running() is None


def _pending_click(widget_id: str) -> object:
    """A script context whose browser asked for a rerun with the button `widget_id` clicked (as Streamlit keeps it
    while the script runs)."""
    states = WidgetStates()
    state = states.widgets.add()
    state.id, state.trigger_value = widget_id, True
    requests = ScriptRequests()
    requests.request_rerun(RerunData(widget_states=states, fragment_id="workbench-fragment"))
    return type("Context", (), {"script_requests": requests})()


def test_a_cancel_click_queued_behind_the_running_script_reaches_the_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """A click inside a fragment does not interrupt the running script; the progress bar's ticker reads it from
    the queued request and cancels the turn, so the next progress event stops the work."""
    line = Line()
    held = line.join("a", "Fine-tuning")
    monkeypatch.setattr(progress, "_BARS", itertools.count(7))
    monkeypatch.setattr(progress, "get_script_run_ctx", lambda **_: _pending_click("$$ID-0123abcd-turn_cancel_7"))
    bar = progress.ProgressBar("Fine-tuning", cancellable=held)
    try:
        assert bar.key == "turn_cancel_7"
        assert held.cancel_requested.wait(WAIT_S)  # the ticker saw the click
        with pytest.raises(Cancelled):
            bar(ProgressEvent(Stage.FINETUNE, 3, 300, loss=0.1))
    finally:
        bar.close()
        line.leave(held)
    assert not bar._ticker.is_alive()


def test_only_this_buttons_click_cancels() -> None:
    assert turns.cancel_clicked("turn_cancel_7", _pending_click("$$ID-0123abcd-turn_cancel_7"))
    assert not turns.cancel_clicked("turn_cancel_7", _pending_click("$$ID-0123abcd-turn_cancel_17"))
    assert not turns.cancel_clicked("turn_cancel_7", _pending_click("$$ID-0123abcd-run_search"))
    assert not turns.cancel_clicked("turn_cancel_7", None)  # outside a script run


def test_short_requests_go_ahead_of_waiting_long_work_in_the_order_they_came() -> None:
    line = Line()
    running = line.join("a", "Budgeted search")
    search = line.join("b", "Sensitivity sweep")
    toggles = [line.join(f"t{i}", "Evaluating", short=True) for i in range(2)]
    later_search = line.join("c", "Fine-tuning")
    late_toggle = line.join("t2", "Evaluating", short=True)
    assert [line.position(t) for t in (running, *toggles, late_toggle, search, later_search)] == [0, 1, 2, 3, 4, 5]


def test_long_work_gives_way_to_waiting_short_requests_between_its_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    line = Line()
    search = line.join("a", "Budgeted search")
    assert not line.give_way(search)  # nobody waits: it keeps running
    other_search = line.join("b", "Sensitivity sweep")
    assert not line.give_way(search)  # long work never gives way to long work
    toggle = line.join("c", "Evaluating", short=True)
    assert not line.give_way(search)  # it has not run for MIN_SLICE_S yet
    monkeypatch.setattr(turns, "MIN_SLICE_S", 0.0)
    assert line.give_way(search)
    assert [line.position(t) for t in (toggle, search, other_search)] == [0, 1, 2]  # it stays ahead of long work
    assert not line.give_way(toggle)  # short requests never give way
    line.leave(toggle)
    assert line.running() is search and search.started is not None


def test_work_that_gives_way_releases_its_workbench_lock_until_its_turn_returns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "MIN_SLICE_S", 0.0)
    line, lock = Line(), threading.RLock()
    search = line.join("a", "Budgeted search")
    joined, toggled = threading.Event(), threading.Event()

    def toggle() -> None:
        held = line.join("b", "Evaluating", short=True)
        joined.set()
        assert line.wait(held, WAIT_S)
        with lock:  # the search holds it twice; giving way released both levels
            toggled.set()
        line.leave(held)

    with lock, lock:
        thread = threading.Thread(target=toggle)
        thread.start()
        assert joined.wait(WAIT_S)
        turns.give_way(search, lock, line)  # returns once the toggle ran
        assert toggled.is_set() and line.running() is search
        tried: list[bool] = []
        probe = threading.Thread(target=lambda: tried.append(lock.acquire(timeout=0.2)))
        probe.start()
        probe.join(WAIT_S)
        assert tried == [False]  # held again by the search
    thread.join(WAIT_S)


def test_a_cancel_while_giving_way_is_honoured_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "MIN_SLICE_S", 0.0)
    line = Line()
    search = line.join("a", "Budgeted search")
    line.join("b", "Evaluating", short=True)  # runs, and never leaves
    search.cancel()
    with pytest.raises(Cancelled):
        turns.give_way(search, threading.RLock(), line)


def _two_waits_in_one_run() -> None:
    import threading

    import streamlit as st

    from explorer import turns

    line = turns.Line()
    first_blocker = line.join("another tab", "Opening a model")
    threading.Timer(0.3, line.leave, args=(first_blocker,)).start()
    with turns.turn("first", line=line):
        st.write("first ran")
        second_blocker = line.join("another tab", "Opening a model")  # in line behind this tab's turn
        release = threading.Timer(0.3, line.leave, args=(second_blocker,))
    release.start()
    with turns.turn("second", line=line):  # the first turn is freed: its memory (and id) can be the new one's
        st.write("second ran")


def test_two_waits_in_one_page_run_get_their_own_cancel_buttons(monkeypatch: pytest.MonkeyPatch) -> None:
    # each wait shows a Cancel button. Keys made from id(turn) repeated once a freed turn's memory held the next
    # one, and Streamlit refused the page run (StreamlitDuplicateElementKey, seen with 25 students opening at
    # once); every id() here is the same, as when memory is reused
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(turns, "id", lambda obj: 7, raising=False)
    app = AppTest.from_function(_two_waits_in_one_run, default_timeout=30).run()
    assert not app.exception
    assert [m.value for m in app.markdown] == ["first ran", "second ran"]
