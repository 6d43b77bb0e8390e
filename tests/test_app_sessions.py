"""Many tabs on one server, headless: each tab its own history over the one shared Session, and work a tab
cancels gives the server back and leaves its page as it was.

AppTest runs the page in this process, so every AppTest here shares the cached Session, as browser tabs of one
server do.
"""

from __future__ import annotations

import re

import pytest
from streamlit.testing.v1 import AppTest

from explorer import turns
from explorer.panels.tour import busiest_layer
from explorer.workbench import open_workbench
from tabconv import search
from tabconv.metrics import Origin
from tabconv.progress import ProgressEvent, Stage
from tabconv.session import Session
from tests.conftest import APP
from tests.helpers import no_failure


def _history_size(at: AppTest) -> int:
    label = next(e.label for e in at.expander if e.label.startswith("Run history"))
    return int(re.search(r"\((\d+) configurations", label).group(1))


def _history_ids(at: AppTest) -> list[int]:
    table = next(d.value for d in at.dataframe if "origin" in d.value.columns)
    return [int(i) for i in table["id"]]


def _make_exact(at: AppTest, layer: str) -> int:
    at.selectbox(key="group_target").set_value(layer)
    at.button(key="group_exact").click().run()
    no_failure(at)
    return at.session_state["current_id"]


def test_two_tabs_have_their_own_histories_over_one_shared_session(app: AppTest) -> None:
    start = app.session_state["current_id"]
    first = _make_exact(app, "layer4.1.conv1")
    second = _make_exact(app, "layer4.0.conv1")
    assert {first, second} <= set(_history_ids(app))

    other = AppTest.from_file(str(APP), default_timeout=900)  # a second tab on the same server
    other.run()
    no_failure(other)
    assert other.session_state["current_id"] == start  # the starting configuration the first tab evaluated
    assert other.session_state["last_apply"]["earlier"] == "this server"
    assert any(c.value.startswith(f"Configuration #{start} was evaluated earlier on this server")
               for c in other.caption)

    assert _make_exact(other, "layer4.1.conv1") == first  # what the first tab evaluated: not evaluated again
    done = other.session_state["last_apply"]
    assert done["memoised"] and done["earlier"] == "this server" and done["fitted"] == 0
    assert any(c.value.startswith(f"Configuration #{first} was evaluated earlier on this server")
               for c in other.caption)
    ids = _history_ids(other)
    assert first in ids and second not in ids  # the first tab's other configuration is not in this tab's history
    assert _history_size(other) == 3  # the baseline, the start, the one it asked for
    assert second in _history_ids(app)  # and the first tab keeps its own


def _history(at: AppTest):
    return next(d.value for d in at.dataframe if "origin" in d.value.columns).set_index("id")


def test_a_configuration_another_tab_evaluated_first_keeps_this_tabs_own_label(app: AppTest) -> None:
    """The tour's 'one layer tabled' step in a new tab recalls the configuration the first tab made by hand: each
    tab lists it under the label of its own request."""
    layer = busiest_layer(open_workbench(app.session_state["spec"]))
    app.button(key="all_exact").click().run()
    app.selectbox(key="group_target").set_value(layer)
    app.button(key="group_table").click().run()
    no_failure(app)
    made = app.session_state["current_id"]
    mine = _history(app).loc[made, "label"]
    assert mine.startswith("edit:")

    other = AppTest.from_file(str(APP), default_timeout=900)
    other.run()
    other.button(key="tour_start").click().run()
    other.button(key="tour_next").click().run()  # step 2: only the busiest layer tabled
    no_failure(other)
    assert other.session_state["current_id"] == made and other.session_state["last_apply"]["memoised"]
    theirs = _history(other).loc[made]
    assert theirs["label"] == f"tour: only {layer} tabled" and theirs["origin"] == Origin.EDIT.value
    assert any(m.value.startswith(f"**Current configuration #{made}** — tour: only") for m in other.markdown)
    app.run()
    assert _history(app).loc[made, "label"] == mine  # the first tab's own label is untouched


def test_a_cancelled_search_gives_the_server_back_and_keeps_the_page(app: AppTest,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The search is cancelled as a Cancel click does it: the turn's flag is set while the search runs, and the
    search stops at its next progress event."""
    real = search.greedy_search

    def cancelled_midway(session: object, *args: object, progress: turns.Turn, **kwargs: object) -> object:
        def relay(event: ProgressEvent) -> None:
            if event.stage == Stage.GREEDY:  # past the masking sweep it starts from
                turns.LINE.running().cancel()
            progress(event)

        return real(session, *args, progress=relay, **kwargs)

    before, seen = app.session_state["current_id"], list(app.session_state["seen"])
    with monkeypatch.context() as patch:  # the app fixture's own patches (its environment) stay
        patch.setattr(search, "greedy_search", cancelled_midway)
        app.number_input(key="search_budget").set_value(3)
        app.slider(key="search_target").set_value(50)
        app.button(key="run_search").click().run()
    no_failure(app)
    assert any(w.value.startswith("Cancelled after") and "Budgeted search" in w.value for w in app.warning)
    assert app.session_state["current_id"] == before
    assert list(app.session_state["seen"]) == seen  # nothing of the cancelled search joined this tab's history
    assert turns.LINE.running() is None  # the server is free again

    app.button(key="run_search").click().run()  # and the same search runs to its end afterwards
    no_failure(app)
    assert any(s.value.startswith("The search looked at") for s in app.success)


def test_an_evaluation_can_be_cancelled_while_it_runs(app: AppTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled as a click on its progress bar's Cancel does it, at the event that starts the evaluation pass:
    nothing joins the history, the page keeps its configuration and the server is free."""
    real = Session._evaluate

    def cancelled_at_start(self: Session, *args: object, **kwargs: object) -> object:
        turns.LINE.running().cancel()
        return real(self, *args, **kwargs)

    wb = open_workbench(app.session_state["spec"])
    before, evaluated = app.session_state["current_id"], len(wb.session.history)
    with monkeypatch.context() as patch:  # the app fixture's own patches (its environment) stay
        patch.setattr(Session, "_evaluate", cancelled_at_start)
        app.selectbox(key="group_target").set_value("layer2.1.conv2")
        app.number_input(key="group_k").set_value(8)  # new tables too: a long request
        app.button(key="group_table").click().run()
    no_failure(app)
    assert any(w.value.startswith("Cancelled after") for w in app.warning)
    assert app.session_state["current_id"] == before and len(wb.session.history) == evaluated
    assert turns.LINE.running() is None
    app.selectbox(key="group_target").set_value("layer2.1.conv2")
    app.number_input(key="group_k").set_value(8)
    app.button(key="group_table").click().run()  # asked again, it is evaluated
    no_failure(app)
    assert app.session_state["current_id"] == evaluated


def test_a_configuration_keeps_the_label_this_tab_first_saw_it_under(app: AppTest) -> None:
    """A masking point reached again by an edit is still listed, titled and plotted under its masking label."""
    wb = open_workbench(app.session_state["spec"])
    app.slider(key="mask_exact").set_value(1)
    app.button(key="run_masking").click().run()
    no_failure(app)
    masked = app.session_state["current_id"]
    first = _history(app).loc[masked, "label"]
    worst = wb.sweeps.masking(app.session_state["defaults"], app.session_state["mask_rank"])["ranking"][0]
    app.button(key="all_tables").click().run()
    _make_exact(app, worst)  # the same settings, asked for as an edit
    assert app.session_state["current_id"] == masked
    assert _history(app).loc[masked, "label"] == first
    assert any(m.value.startswith(f"**Current configuration #{masked}** — {first} (") for m in app.markdown)


def test_numbers_missing_from_a_tabs_history_are_explained(app: AppTest) -> None:
    """Ids are the server's: a configuration another tab evaluated in between is a gap, and the history says why."""
    mine = _new_configuration(app, "layer1.1.conv1", 2, 4)
    other = AppTest.from_file(str(APP), default_timeout=900)
    other.run()
    theirs = _new_configuration(other, "layer1.1.conv1", 2, 8)
    assert _new_configuration(app, "layer1.1.conv1", 4, 4) > theirs > mine
    ids = _history_ids(app)
    assert theirs not in ids
    said = next(c.value for c in app.caption if c.value.startswith("Numbers are this server's"))
    spans = [(int(a), int(b or a)) for a, b in re.findall(r"#(\d+)(?:–#(\d+))?", said)]
    assert any(a <= theirs <= b for a, b in spans) and "other tabs' work" in said, said
    assert not any(a <= i <= b for i in ids for a, b in spans), said


def _new_configuration(at: AppTest, layer: str, codebooks: int, centroids: int) -> int:
    """Give one layer tables of an unusual C and K (a configuration no other test asks for): its id."""
    at.selectbox(key="group_target").set_value(layer)
    at.number_input(key="group_c").set_value(codebooks)
    at.number_input(key="group_k").set_value(centroids)
    at.button(key="group_table").click().run()
    no_failure(at)
    assert not at.session_state["last_apply"]["memoised"]
    return at.session_state["current_id"]
