"""TabConv Explorer — `streamlit run explorer/app.py`. Layout and wiring only: panels draw, the library computes."""

from __future__ import annotations

import streamlit as st

from explorer import actions, state, turns
from explorer.panels import (
    automatic,
    chooser,
    editor,
    finetuning,
    history,
    loading,
    metrics,
    plots,
    speed,
    teaching,
    tour,
    transfer,
)
from explorer.workbench import Workbench

# A click on a plot redraws it as a new element. The browser keeps the page still by anchoring the scroll on a node
# in view; one inside a plot is lost with it, and the plot then jumped by any change of height above it (a notice
# gone, a shorter row of buttons). Never anchoring inside a plot keeps the clicked plot where it was.
STYLE = '<style>[data-testid="stPlotlyChart"] { overflow-anchor: none; }</style>'


@st.fragment
def workbench(wb: Workbench) -> None:
    """The core loop; a toggle, a click or a search reruns only this part of the page."""
    with turns.notices_here():
        _core_loop(wb)


def _core_loop(wb: Workbench) -> None:
    if actions.handle_requests(wb):
        st.session_state.open_error = None  # another action succeeded: a failed Open is past
    state.show_notice()
    current = state.view(wb, st.session_state.current_id)
    previous = None if st.session_state.previous_id is None else state.view(wb, st.session_state.previous_id)
    with st.container(border=True):  # as high for every configuration: a click on a plot below moves nothing
        metrics.title(current, previous)
        transfer.export_button(wb, current)
        metrics.live(current, previous)
        metrics.breakdown(current)
        metrics.last_change()
    plots.tradeoffs(wb, current)
    speed.panel(wb, current)  # below the plots: its result shows for the configuration it timed only
    st.subheader("Automatic choices")
    automatic.panel(wb)
    st.subheader("Fine-tuning")
    finetuning.panel(wb, current)
    st.subheader("Per-layer configuration (forward order)")
    editor.group_controls(wb, current)
    editor.table(wb, current)
    st.subheader("Error propagation and sensitivity")
    plots.propagation(wb, current)
    st.subheader("Import")
    transfer.import_panel(wb, current)
    with st.expander(f"Run history ({len(state.own_history(wb))} configurations) and comparison"):
        history.panel(wb)
    wb.settle(current)  # last, once everything is on screen


def main() -> None:
    st.set_page_config(page_title="TabConv Explorer", page_icon=":material/table_chart:", layout="wide")
    state.init()
    st.html(STYLE)  # style only: it takes no space on the page
    st.title("TabConv Explorer")
    with turns.notices_here():
        choice = chooser.sidebar()
        wb = loading.open_choice(choice)
        chooser.used_counts(wb.spec, wb.session.calibration.images, len(wb.session.eval_set))
        metrics.header(wb)
        loading.start(wb, choice)
        tour.apply(wb)  # before its box: a step's words are drawn from the results the step asked for
        tour.panel(wb)
        workbench(wb)
        teaching.panel(wb)


main()
