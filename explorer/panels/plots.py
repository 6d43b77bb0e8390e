"""Trade-off plots, error-propagation heatmap and sensitivity bars; a click on a point loads it."""

from __future__ import annotations

from functools import partial

import streamlit as st

from explorer import charts, editing, state, sweeps
from explorer.workbench import Workbench
from tabconv.metrics import Metrics
from tabconv.settings import LayerSetting


def _clicked(key: str) -> None:
    """Chart selection callback: load the clicked configuration, then clear the selection."""
    points = st.session_state[key]["selection"]["points"]
    ids = [p["customdata"][0] for p in points if p.get("customdata") and p["customdata"][0] >= 0]
    if ids:
        st.session_state.load_request = int(ids[0])
        st.session_state.chart_version += 1


def _chart(figure: object, name: str) -> None:
    key = f"{name}-{st.session_state.chart_version}"
    st.plotly_chart(figure, key=key, on_select=partial(_clicked, key), selection_mode="points",
                    config={"displaylogo": False})


def tradeoffs(wb: Workbench, current: Metrics) -> None:
    """Accuracy vs FLOPs and vs storage, with every configuration this tab evaluated or loaded."""
    history = state.own_history(wb)
    own = {m.id for m in history}
    runs = [given.run for given in wb.session.given_tables() if given.run is not None]
    links = [(run.parent, run.metrics) for run in runs if run.metrics.id in own]
    choices = ["paper", "full"] + (["latency"] if current.latency is not None else [])
    if st.session_state.get("plot_convention") not in (None, *choices):
        st.session_state.plot_convention = "paper"  # a model opened without measured latency has no such axis
    convention = st.segmented_control("Cost axis", choices, default="paper", key="plot_convention",
                                      help="paper: FLOPs, encoding free (the paper's count); full: FLOPs, encoding "
                                      "counted; latency: measured on this machine's CPU (per-layer medians, summed)")
    cost = "latency_ms" if convention == "latency" else f"flops_{convention or 'paper'}"
    # A click redraws both plots as new elements: a box of their height holds their place meanwhile, so that the
    # browser's scroll anchoring never jumps the page while a plot is away (the plot clicked stays in view).
    for column, axis, name in zip(st.columns(2), (cost, "storage_bytes"), ("plot-flops", "plot-storage"), strict=True):
        with column, st.container(height=charts.TRADEOFF_HEIGHT, border=False):
            _chart(charts.tradeoff(history, wb.session.baseline, current, axis, links), name)
    tuned = sum(charts.is_tuned(m) for m in history)
    st.caption(f"{len(history)} configurations in this tab's history, each on {current.eval_images} test images; "
               "vertical bars are 95% intervals (Wilson) of each accuracy. Hover for a summary; click a point to load "
               "it. The red step line is the Pareto front."
               + (f" Diamonds: {tuned} fine-tuned configuration(s), dotted from the one they were tuned from. "
                  "Fine-tuned tables belong to this exact configuration: a toggle from one evaluates an ordinary "
                  "(untuned) configuration." if tuned else ""))


def propagation(wb: Workbench, current: Metrics) -> None:
    """The heatmap (computed once per setting, with progress, then kept on disk) and the sensitivity bars."""
    setting = st.session_state.defaults
    metric = st.segmented_control("Heatmap colour", list(charts.HEAT_NAMES), default="cosine",
                                  format_func=charts.HEAT_NAMES.get, key="heat_metric") or "cosine"
    # The built-in models are small: their heatmap is drawn at once. A user's network can have a hundred layers at
    # 224x224, so there it waits for a click instead of holding up the rest of the page (as after a Cancel).
    automatic = wb.spec.user is None and "heatmap_cancelled" not in st.session_state
    matrix = sweeps.propagation(wb, setting, run=automatic,
                                on_cancel=lambda: st.session_state.update(heatmap_cancelled=True))
    if matrix is None:
        layers = len(wb.structure.names)
        st.info(f"Error propagation: each of the {layers} layers tabled alone, every layer's output compared with "
                f"the exact one ({layers} evaluations on {current.eval_images} images; kept on disk afterwards).")
        if st.button("Compute the error-propagation heatmap", key="run_propagation"):
            sweeps.propagation(wb, setting)
            state.refresh()
    else:
        current_row = [getattr(current.errors[name], metric) for name in matrix["layers"]]
        st.plotly_chart(charts.propagation_heatmap(matrix["layers"], matrix[metric], current_row,
                                                   f"current #{current.id}", metric), key="heatmap",
                        config={"displaylogo": False})
        st.caption(f"Rows: one layer tabled alone ({editing.describe(setting)}, {setting.encoder}), "
                   f"then the current configuration; columns: each layer's output on {current.eval_images} images.")
    _sensitivity(wb, setting)


def _sensitivity(wb: Workbench, setting: LayerSetting) -> None:
    result = sweeps.sensitivity(wb, setting)
    if result is None:
        layers = len(wb.structure.names)
        st.info(f"Sensitivity in both directions: per layer, tabling only it and keeping only it exact "
                f"({2 * layers} evaluations; the first direction reuses the heatmap's).")
        if st.button("Run the sensitivity sweep", key="run_sensitivity"):
            sweeps.sensitivity(wb, setting, run=True)
            state.refresh()
        return
    _chart(charts.sensitivity_bars(result["rows"], result["all_tables_retention"]), "sensitivity")
    st.caption(f"Retention on {result['rows'][0]['only_table']['eval_images']} test images; the dashed line is every "
               "layer tabled. Hover a bar for its accuracy's 95% interval and whether it differs from the exact "
               "network beyond noise. Click a bar to load its configuration (bars recalled from disk are not "
               "loadable).")
