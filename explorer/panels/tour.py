"""Guided tour for a class: five steps from the exact network to one tabled layer, every layer tabled,
priority masking and a small budgeted search, each with one sentence and the page set for it.

A step only leaves requests, through the same calls the page's own controls use (load a configuration,
evaluate settings, the masking sweep, the budgeted search); the workbench carries them out at the top of
its run. A sentence that describes a result is made from that result (masking's accuracies and whether they
differ beyond noise, how many configurations the search looked at). The search step runs with a budget of a
few evaluations, so no step is a long wait; leaving the tour keeps the configuration on screen.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from explorer import editing, state, sweeps
from explorer.workbench import Workbench
from tabconv.settings import EXACT

MASKED = 3  # layers kept exact in the masking step
SEARCH_BUDGET = 3  # greedy evaluations in the search step, after the masking sweep it starts from
SEARCH_TARGET = 90  # % of the exact accuracy the search must keep
STEPS = ("exact", "one layer", "every layer", "priority masking", "budgeted search")


@dataclass(frozen=True)
class Step:
    title: str
    sentence: str


def busiest_layer(wb: Workbench) -> str:
    """The layer with the most multiply-adds (the first of equals): tabling it alone saves the most."""
    return max(wb.structure.layers, key=lambda info: info.macs_per_image).name


def steps(wb: Workbench) -> list[Step]:
    """The tour's steps, worded for the model on screen and the default table setting."""
    setting = editing.describe(st.session_state.defaults)
    layer = busiest_layer(wb)
    return [
        Step("the exact network", "Every layer multiplies its inputs by its weights: the cards show the accuracy, "
                                  "FLOPs and storage every later step is measured against."),
        Step("one layer as tables", f"Only `{layer}`, the layer with the most multiply-adds, now uses table lookups "
                                    f"({setting}): its multiply-adds become additions; the teaching view below "
                                    "takes it apart, and the accuracy line says whether the change is beyond noise."),
        Step("every layer as tables", "Every layer uses tables: the FLOPs drop the most, but the errors of all "
                                      "layers add up through the network (see the heatmap's last row)."),
        Step("priority masking", f"The paper's method: rank layers by how far their output drifts (cosine, every "
                                 f"layer tabled) and keep the {MASKED} worst exact; under Automatic choices, choose "
                                 "another number and press Apply to move along this sweep." + _masking_outcome(wb)),
        Step("a budgeted search", f"From masking's best point, a greedy search tables more layers or halves C or K "
                                  f"while keeping {SEARCH_TARGET}% of the exact accuracy on half the images, then "
                                  "confirms on the other half — here with a budget of "
                                  f"{SEARCH_BUDGET} greedy evaluations (raise it for a real search)."
                                  + _search_outcome()),
    ]


def _masking_outcome(wb: Workbench) -> str:
    """What masking did here, in the words of its own numbers (empty before the sweep ran)."""
    sweep = wb.sweeps.masking(st.session_state.defaults, "cumulative")
    if not sweep:
        return ""
    every, masked = wb.metrics(sweep["ids"][0]), wb.metrics(sweep["ids"][min(MASKED, len(sweep["ids"]) - 1)])
    return (f" Here it moved the accuracy from {every.accuracy:.2%} (every layer tabled) to {masked.accuracy:.2%}: "
            f"{masked.against(every).verdict(name_test=False)}.")


def _search_outcome() -> str:
    """How many configurations the tour's search looked at, and how many of them were new (after it ran)."""
    ran = st.session_state.get("tour_search")
    if not ran:
        return ""
    text = (f" It looked at {ran['points']} configurations: {ran['new']} newly evaluated, the rest recalled from "
            "the masking sweep")
    if ran["backoffs"]:
        text += (f"; confirming its choice on the other half of the images took {ran['backoffs']} layer(s) back to "
                 "exact (each back-off evaluates every table layer's return to exact)")
    return text + "."


def panel(wb: Workbench) -> None:
    """The tour's box: a start button, or the step's sentence with Back, Next and Leave."""
    step = st.session_state.tour_step
    with st.container(border=True):
        if step is None:
            left, right = st.columns([1, 4], vertical_alignment="center")
            left.button("Start the guided tour", key="tour_start", on_click=go, args=(wb, 0))
            right.caption(f"{len(STEPS)} steps for a class: the exact network, one tabled layer, every layer tabled, "
                          "priority masking and a small search, each setting the page for it.")
            return
        current = steps(wb)[step]
        st.markdown(f"**Guided tour · step {step + 1} of {len(STEPS)}: {current.title}.** {current.sentence}")
        cols = st.columns([1, 1, 1.4, 5])
        cols[0].button("← Back", key="tour_back", disabled=step == 0, on_click=go, args=(wb, step - 1), width="stretch")
        cols[1].button("Next →", key="tour_next", disabled=step == len(STEPS) - 1, on_click=go, args=(wb, step + 1),
                       width="stretch")
        cols[2].button("Leave the tour", key="tour_leave", on_click=leave, width="stretch")


def go(wb: Workbench, step: int) -> None:
    """Button callback: show a step's sentence, set the widgets it speaks of, and ask for its configuration."""
    ss = st.session_state
    if ss.tour_step is None and ss.locks:
        state.notify("info", f"The tour unlocked {', '.join(sorted(ss.locks))}: its steps set every layer.")
        ss.locks = frozenset()
    ss.tour_step, ss.tour_request = step, step
    if STEPS[step] == "one layer":
        ss.teach_layer = busiest_layer(wb)
    if STEPS[step] == "budgeted search":
        ss.search_target, ss.search_budget, ss.search_convention, ss.search_cap = (SEARCH_TARGET, SEARCH_BUDGET,
                                                                                   "paper", 0.0)


def leave() -> None:
    """Button callback: end the tour; the page keeps the configuration it shows."""
    st.session_state.tour_step = None


def apply(wb: Workbench) -> None:
    """Turn the requested step into the page's own requests (run before the tour's box and the workbench, which
    carries the requests out)."""
    step, st.session_state.tour_request = st.session_state.tour_request, None
    if step is None:
        return
    setting, session = st.session_state.defaults, wb.session
    name = STEPS[step]
    if name == "exact":
        st.session_state.load_request = session.baseline.id
    elif name == "one layer":
        layer = busiest_layer(wb)
        state.request({**{n: EXACT for n in wb.structure.names}, layer: setting}, f"tour: only {layer} tabled")
    elif name == "every layer":
        state.request(session.uniform(setting), "tour: every layer tabled")
    elif name == "priority masking":
        ids = sweeps.masking(wb, setting, "cumulative")["ids"]
        st.session_state.load_request = ids[min(MASKED, len(ids) - 1)]  # a model with fewer layers: all exact
    else:
        before = len(session.history)
        searched = sweeps.budgeted(wb, setting, SEARCH_TARGET / 100, None, "paper", SEARCH_BUDGET)
        ran = st.session_state.tour_search = {
            "points": len(searched.result.points), "new": len(session.history) - before,
            "backoffs": len(searched.checked.backoffs) if searched.checked else 0}
        best = wb.metrics(searched.accepted if searched.accepted is not None else session.baseline.id)
        st.session_state.load_request = best.id
        state.notify("success", f"Search looked at {ran['points']} configurations ({ran['new']} newly evaluated, "
                                f"the rest recalled from the masking sweep); kept, after confirming on the other "
                                f"half of the images: {best.summary()}")
