"""Run history: the configurations this tab evaluated or loaded (and the baseline); load one, or compare two."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import streamlit as st

from explorer import charts, editing, state
from explorer.workbench import Workbench
from tabconv.metrics import Metrics, Origin
from tabconv.stats import range_text


def panel(wb: Workbench) -> None:
    history = state.own_history(wb)
    # keyed by the model too: a selection made on another model's (longer) history must not carry over
    key = f"history-{wb.spec.digest[:16]}-{st.session_state.chart_version}"
    rows = [_row(m, wb.session.baseline) for m in history]
    event = st.dataframe(pd.DataFrame(rows), key=key, hide_index=True, width="stretch",
                         height=min(400, 38 + 35 * len(history)), on_select="rerun", selection_mode="multi-row")
    skipped = gaps([m.id for m in history], wb.session.history)
    if skipped:
        st.caption(skipped)
    chosen = [history[i] for i in event.selection.rows if 0 <= i < len(history)][:2]
    if not chosen:
        st.caption("Select one row to load it, or two to compare them.")
        return
    st.button(f"Load #{chosen[-1].id}", key="history_load", on_click=_load, args=(chosen[-1].id,))
    if len(chosen) == 2:
        compare(*chosen)


# why a configuration evaluated on this server is not in this tab's history, by the kind of request that made it
NOT_LISTED = {Origin.SWEEP: "sweeps' single-layer evaluations (the heatmap, sensitivity)",
              Origin.GREEDY: "search trials not kept (back-offs) or other tabs' searches"}
OTHER_TABS = "other tabs' work"


def gaps(listed: Sequence[int], evaluated: Sequence[Metrics]) -> str:
    """Why numbers are missing from this tab's history: ids are the server's, given in the order configurations
    were first evaluated, by every tab and every sweep. Empty when none is missing."""
    shown = set(listed)
    missing: dict[str, list[int]] = {}
    for m in evaluated[:max(listed, default=-1) + 1]:
        if m.id not in shown:
            missing.setdefault(NOT_LISTED.get(m.origin, OTHER_TABS), []).append(m.id)
    if not missing:
        return ""
    return ("Numbers are this server's, in the order configurations were first evaluated (by every tab and sweep); "
            "not listed here: " + "; ".join(f"{_spans(ids)} {why}" for why, ids in missing.items()) + ".")


def _spans(ids: list[int]) -> str:
    """'#2–#22, #40' from sorted ids."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"#{a}" if a == b else f"#{a}–#{b}" for a, b in spans)


def _load(config_id: int) -> None:
    st.session_state.load_request = config_id
    st.session_state.chart_version += 1


def _row(m: Metrics, baseline: Metrics) -> dict[str, object]:
    return {"id": m.id, "label": m.label, "origin": charts.kind(m), "accuracy": f"{m.accuracy:.2%}",
            "95% CI": range_text(*m.accuracy_ci95), "vs exact (McNemar)": m.against(baseline).verdict(name_test=False),
            "images": m.eval_images, "retention": f"{m.retention:.1%}",
            "FLOPs paper": f"{m.flops_paper / 1e6:.3g} M ({charts.change(m.reduction_paper)})",
            "FLOPs full": f"{m.flops_full / 1e6:.3g} M ({charts.change(m.reduction_full)})",
            "storage": f"×{m.storage_ratio:.2f}", "tables": f"{len(m.table_layers)}/{len(m.settings)}"}


def compare(a: Metrics, b: Metrics) -> None:
    """Metrics side by side, whether their accuracies differ beyond noise, then the layers whose settings differ."""
    left, right = st.columns(2)
    for column, m in ((left, a), (right, b)):
        column.markdown(f"**#{m.id}** {m.label}")
        column.markdown("  \n".join(charts.summary_lines(m)))
    test = b.against(a)
    st.markdown(f"**#{a.id} → #{b.id}**: accuracy {a.accuracy:.2%} → {b.accuracy:.2%}, {test.verdict()}: "
                f"{test.counts_text(f'#{a.id}', f'#{b.id}')}.")
    differ = [{"layer": name, f"#{a.id}": _setting(a, name), f"#{b.id}": _setting(b, name),
               f"cosine #{a.id}": a.errors[name].cosine, f"cosine #{b.id}": b.errors[name].cosine}
              for name in a.settings if a.settings[name] != b.settings[name]]
    if differ:
        st.dataframe(pd.DataFrame(differ), hide_index=True, width="stretch")
    else:
        st.caption("Both use the same per-layer settings.")


def _setting(m: Metrics, name: str) -> str:
    s = m.settings[name]
    return f"table {editing.describe_resolved(s)}, {s.encoder} {s.lut_dtype}" if s.is_table else "exact"
