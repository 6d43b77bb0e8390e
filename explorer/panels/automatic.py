"""Automatic choices: the paper's priority masking and the budgeted greedy search; results land on the plots."""

from __future__ import annotations

import streamlit as st

from explorer import editing, state, sweeps
from explorer.workbench import Workbench
from tabconv.metrics import Metrics
from tabconv.search import RANKINGS
from tabconv.settings import LayerSetting

MASKED_DEFAULT = 3  # layers kept exact until the slider is moved (the tour's masking step keeps 3 too)
SEARCH_DEFAULTS = {"search_target": 93, "search_convention": "paper", "search_cap": 0.0, "search_budget": 40,
                   "search_finetune": False, "search_untuned": 85, "search_tune_seconds": 20}
RANK_HELP = {"cumulative": "cosine of each layer's output with every layer tabled (the paper's reference code)",
             "isolated": "cosine at the network output with only that layer tabled (one extra evaluation per layer)"}


def panel(wb: Workbench) -> None:
    setting = st.session_state.defaults
    left, right = st.columns(2, border=True)
    with left:
        _masking(wb, setting)
    with right:
        _search(wb, setting)


def _masking(wb: Workbench, setting: LayerSetting) -> None:
    """One control: the slider chooses how many layers stay exact, and only the button applies it (nothing else
    moves the slider); every press says what it loaded and whether the sweep ran or was already there."""
    layers = len(wb.structure.names)
    st.markdown(f"**Priority masking** (the paper's): rank layers by cosine, keep the worst exact, table the rest "
                f"at {editing.describe(setting)}.")
    rank_by = st.radio("Rank layers by", RANKINGS, horizontal=True, key="mask_rank",
                       captions=[RANK_HELP[r] for r in RANKINGS])
    if st.session_state.get("mask_exact", 0) > layers:  # another model with fewer layers
        st.session_state.pop("mask_exact")
    exact = st.slider("Layers kept exact", 0, layers, min(MASKED_DEFAULT, layers), key="mask_exact",
                      help="How many of the worst-ranked layers stay exact when you press Apply: moving the slider "
                           "alone loads nothing.")
    if st.button("Apply priority masking", key="run_masking", type="primary"):
        swept = wb.sweeps.masking(setting, rank_by) is not None
        result = sweeps.masking(wb, setting, rank_by)
        point = wb.metrics(result["ids"][exact])
        st.session_state.mask_outcome = applied_text(point, exact, rank_by, swept, len(result["ids"]),
                                                     point.id == st.session_state.current_id)
        st.session_state.load_request = point.id
        state.refresh()
    if st.session_state.get("mask_outcome"):  # the last press's outcome, beside its button
        st.success(st.session_state.mask_outcome)
    result = wb.sweeps.masking(setting, rank_by)
    if result:
        st.caption(f"{len(result['ids'])} configurations on the plots. Ranking, worst first: "
                   + ", ".join(result["ranking"][:8]) + (" …" if layers > 8 else ""))


def applied_text(point: Metrics, exact: int, rank_by: str, swept: bool, points: int, shown: bool) -> str:
    """What one press of Apply did: the configuration it loaded, and where it came from."""
    source = ("from the sweep already computed on this server (no new evaluation)" if swept
              else f"the sweep ran now ({points} configurations, on the plots)")
    again = " It was already on screen." if shown else ""
    return (f"Applied priority masking, {exact} worst layer(s) exact ({rank_by} ranking): #{point.id}, accuracy "
            f"{point.accuracy:.2%}, {len(point.table_layers)} table layers; {source}.{again}")


def _search(wb: Workbench, setting: LayerSetting) -> None:
    base = wb.session.baseline
    st.markdown("**Budgeted search**: keep at least the target retention, maximise the FLOP reduction "
                "(greedy: table more layers, halve C or K), optionally under a storage cap.")
    for key, value in SEARCH_DEFAULTS.items():  # in Session State, not as widget defaults: the tour sets them too
        st.session_state.setdefault(key, value)
    left, right = st.columns(2)
    target = left.slider("Target retention (% of exact accuracy)", 50, 100, key="search_target")
    convention = right.radio("Minimise FLOPs counted", ["paper", "full"], horizontal=True, key="search_convention",
                             captions=["encoding free", "encoding counted"])
    left, right = st.columns(2)
    cap = left.number_input("Storage cap (× original, 0 = none)", 0.0, 1000.0, step=0.5, key="search_cap",
                            help=f"Original: {base.baseline.storage_bytes / 2**20:.2f} MiB")
    budget = right.number_input("Evaluation budget", 1, 400, key="search_budget",
                                help="At most this many greedy evaluations after the masking sweep.")
    tune = st.checkbox("Fine-tune what it confirms", key="search_finetune",
                       help="Fine-tuning lifts accuracy, so the search can ask less of untuned tables: its choice, "
                            "and each back-off, is fine-tuned (checked on the first half) before the target is "
                            "judged on the second half.")
    untuned, seconds = target, None
    if tune:
        left, right = st.columns(2)
        untuned = left.slider("Search asks of untuned tables (%)", 50, 100, key="search_untuned")
        seconds = float(right.number_input("Fine-tuning per run (s)", 5, 600, step=5, key="search_tune_seconds"))
    images = len(wb.session.eval_set)
    st.caption(f"It chooses on the first half of the {images} evaluation images and confirms on the second half: "
               "while the target fails there, the table layer whose return to exact gains most on the first half "
               "goes back to exact. The cards above count all the images, the half it chose on included.")
    if st.button("Run budgeted search", key="run_search", type="primary"):
        cap_bytes = int(cap * base.baseline.storage_bytes) if cap > 0 else None
        ran = sweeps.budgeted(wb, setting, target / 100, cap_bytes, convention, int(budget), seconds,
                              untuned / 100 if tune else None)
        st.session_state.search_outcome = outcome(ran, untuned, cap_bytes is not None, len(wb.structure.names))
        if ran.accepted is not None:
            st.session_state.load_request = ran.accepted
        state.refresh()
    if st.session_state.get("search_outcome"):  # the last search's outcome, beside its button
        kind, text = st.session_state.search_outcome
        getattr(st, kind)(text)


def outcome(ran: sweeps.Budgeted, target: int, capped: bool, layers: int) -> tuple[str, str]:
    """('success' | 'warning', what the search did, in its own numbers): how many configurations it looked at and
    why more than its budget, what its choice kept on each half of the images, and what backing off took."""
    points = len(ran.result.points)
    looked = (f"The search looked at {points} configurations: the {layers + 1} points of the masking sweep it starts "
              f"from, then {points - layers - 1} greedy moves within its budget")
    if ran.result.best is None:
        return "warning", (f"{looked}; none kept {target}% of the exact accuracy"
                           + (" under the storage cap" if capped else "") + ".")
    if ran.checked is None:
        return "success", f"{looked}. Too few images to confirm on: best, on all of them, {ran.result.best.summary()}."
    check = ran.checked
    first, second = ran.halves
    kept = (f"{check.chosen.retention:.1%} there" if check.chosen_tuned is None else
            f"{check.chosen.retention:.1%} there untuned, {check.chosen_tuned.retention:.1%} fine-tuned,")
    text = (f"{looked}. Chosen on images {first.start + 1}-{first.stop}: its choice kept {kept} "
            f"and {check.chosen_confirmed.retention:.1%} on images {second.start + 1}-{second.stop}")
    if check.backoffs:
        layers_back = ", ".join(b.layer for b in check.backoffs)
        text += (f"; {len(check.backoffs)} layer(s) went back to exact ({layers_back}) until the target held there "
                 f"({check.confirmed.retention:.1%})")
    return "success", text + f". Loaded #{check.confirmed.id} ({len(check.confirmed.table_layers)} table layers)."
