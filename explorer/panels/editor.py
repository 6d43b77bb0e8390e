"""The per-layer table/editor, in forward order, and the group toggles above it.

Edits only leave a request (see actions.py); the data editor gets a new key after each applied
edit, so what it shows is always the evaluated configuration, never a stale overlay of edits.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import pandas as pd
import streamlit as st

from explorer import editing, state
from explorer.editing import NOT_APPLICABLE
from explorer.workbench import Workbench
from tabconv.metrics import Metrics
from tabconv.settings import C_LIMITS, ENCODERS, EXACT, K_LIMITS, LUT_DTYPES, S_LIMITS, LayerSetting, SettingError

KIB = 1024
EDITABLE = ["table", "lock", "C", "S", "K", "encoder", "LUT"]


def group_controls(wb: Workbench, current: Metrics) -> None:
    """Set a group (block, stage, all) or one layer to tables with a C (or sub-vector length S) and K, or to
    exact, in one step."""
    structure, defaults = wb.structure, st.session_state.defaults
    cols = st.columns([3, 1.5, 1, 1, 1.4, 1.4], vertical_alignment="bottom")
    cols[0].selectbox("Group or layer", structure.targets(), key="group_target",
                      format_func=lambda t: f"{t} ({layers(len(structure.expand(t)))})" if t in structure.groups else t)
    c_from = cols[1].selectbox("Codebooks", editing.C_FROM, int(defaults.subvector is not None), key="group_c_from",
                               help=editing.C_FROM_HELP)
    if c_from == editing.C_FROM[1]:
        cols[2].number_input("S", *S_LIMITS, defaults.subvector or 9, key="group_s",
                             help="Sub-vector length: each layer gets C = ⌈D / S⌉ codebooks")
    else:
        cols[2].number_input("C", *C_LIMITS, defaults.codebooks, key="group_c")
    cols[3].number_input("K", *K_LIMITS, defaults.centroids, key="group_k")
    cols[4].selectbox("Encoder", ENCODERS, ENCODERS.index(defaults.encoder), key="group_encoder")
    cols[5].selectbox("Table dtype", LUT_DTYPES, LUT_DTYPES.index(defaults.lut_dtype), key="group_lut")
    cols = st.columns([1, 1, 1.4, 1.4, 2.2])  # the buttons on a row of their own: wide enough for their labels
    cols[0].button("→ tables", key="group_table", width="stretch", on_click=_tabulate_group, args=(wb, current),
                   help="Tabulate the group or layer with this C (or S), K, encoder and table dtype")
    cols[1].button("→ exact", key="group_exact", width="stretch", on_click=_exact_group, args=(wb, current),
                   help="Compute the group or layer exactly")
    cols[2].button("All tables (defaults)", key="all_tables", width="stretch", on_click=_request,
                   args=(current, structure.names, defaults, "all → tables (defaults)"))
    cols[3].button("None (all exact)", key="all_exact", width="stretch", on_click=_request,
                   args=(current, structure.names, EXACT, "none: all exact"))


def layers(count: int) -> str:
    """'1 layer', '4 layers'."""
    return f"{count} layer" + ("" if count == 1 else "s")


def _tabulate_group(wb: Workbench, current: Metrics) -> None:
    ss, defaults = st.session_state, st.session_state.defaults
    try:
        setting = editing.table_setting(ss.group_c_from, ss.get("group_c", defaults.codebooks),
                                        ss.get("group_s", defaults.subvector or 9), ss.group_k, ss.group_encoder,
                                        ss.group_lut)
    except SettingError as exc:
        state.notify("error", str(exc))
        return
    _request(current, wb.structure.expand(ss.group_target), setting, f"{ss.group_target} → {editing.describe(setting)}")


def _exact_group(wb: Workbench, current: Metrics) -> None:
    target = st.session_state.group_target
    _request(current, wb.structure.expand(target), EXACT, f"{target} → exact")


def _request(current: Metrics, names: list[str], setting: LayerSetting, what: str) -> None:
    settings, skipped = editing.set_layers(current.settings, names, setting, st.session_state.locks)
    if skipped:
        state.notify("info", f"Kept locked layer(s) exact: {', '.join(skipped)}")
    state.request(settings, f"edit: {what}")


def table(wb: Workbench, current: Metrics) -> None:
    """The per-layer editor: structure, cost and error of every layer, with its setting editable."""
    rows = current.layer_rows(wb.structure, wb.session.calibration.images)
    key = f"editor-{st.session_state.editor_version}"
    st.data_editor(
        frame(rows, st.session_state.locks, current.settings), key=key, hide_index=True, width="stretch",
        height=38 + 35 * len(rows),
        disabled=[c for c in COLUMNS if c not in EDITABLE], column_config=COLUMNS,
        on_change=partial(_edited, key, [r["name"] for r in rows], current),
    )
    if any(not s.is_table and current.errors[n].cosine < 1 - 1e-6 for n, s in current.settings.items()
           if n in current.errors):
        st.caption("Cosine and relative error compare each layer's output with the exact network's on the same "
                   "images. An exact layer below a cosine of 1 computes exactly; its input already carries the error "
                   "of the table layers before it.")


def frame(rows: list[dict], locks: frozenset[str], settings: Mapping[str, LayerSetting] | None = None
          ) -> pd.DataFrame:
    """One row per layer in forward order; C/S/K/encoder/LUT show "—" where they do not apply (exact layers,
    S without a sub-vector length), as text so that no cell reads "None". C is the layer's resolved number of
    codebooks (⌈D / S⌉ when it came from a sub-vector length S)."""
    records = []
    for r in rows:
        tabled = r["mode"] == "table"
        subvector = settings[r["name"]].subvector if settings and tabled else None
        records.append({
            "layer": r["name"], "table": tabled, "lock": r["name"] in locks,
            "C": _cell(r["codebooks"] if tabled else None), "S": _cell(subvector),
            "K": _cell(r["centroids"] if tabled else None),
            "encoder": _cell(r["encoder"] if tabled else None), "LUT": _cell(r["lut_dtype"] if tabled else None),
            "cosine": r["cosine"], "rel. error": r["relative_error"],
            "warning": _warning(r),
            "ms now": r["latency_ms"], "ms exact": r["exact_latency_ms"],
            "measured ×": r["latency_ms"] / r["exact_latency_ms"] if r["latency_ms"] is not None else None,
            "counted ×": r["flops_full"] / r["exact_flops"] if r["exact_flops"] else None,
            "type": r["kind"], "shape in → out": f"{_shape(r['input_shape'])} → {_shape(r['output_shape'])}",
            "D": r["inner_dim"], "C_out": r["out_features"], "rows/image": r["rows_per_image"],
            "MACs": r["macs"], "MAC share": r["mac_share"],
            "FLOPs paper": r["flops_paper"], "FLOPs full": r["flops_full"],
            "weights KiB": r["weight_bytes"] / KIB, "tables KiB": r["table_bytes"] / KIB,
            "prototypes KiB": r["prototype_bytes"] / KIB,
            "tables/weights": _cell(f"{(r['table_bytes'] + r['prototype_bytes']) / r['weight_bytes']:.2f}×"
                                    if tabled else None),
        })
    return pd.DataFrame.from_records(records)


def _warning(row: dict) -> str:
    """What the row's numbers hide: K above the calibration rows, or a table slower than the exact layer."""
    warnings = [f"K={row['centroids']} but only {row['calibration_rows']} calibration rows: k-means memorises "
                "them (the tables fit these images, not new ones); use more calibration images or a smaller K"
                ] if row["k_exceeds_rows"] else []
    if row["slower_than_exact"]:
        warnings.append("slower tabled than exact on this machine")
    return "; ".join(warnings)


def _cell(value: object) -> str:
    """A setting as the editor shows it: its text, or "—" where it does not apply."""
    return NOT_APPLICABLE if value is None else str(value)


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape))


def _edited(key: str, names: list[str], current: Metrics) -> None:
    """Data editor callback: turn its edits into a request and reset it."""
    edits = st.session_state[key].get("edited_rows", {})
    settings, locks, messages = editing.apply_row_edits(current.settings, names, edits, st.session_state.defaults,
                                                        st.session_state.locks)
    st.session_state.locks = locks
    st.session_state.editor_version += 1
    if messages:
        state.notify("warning", "; ".join(messages))
    changed = [n for n in names if settings[n] != current.settings[n]]
    if changed:
        state.request(settings, "edit: " + ", ".join(f"{n} → {editing.describe(settings[n])}" for n in changed[:3])
                      + (" …" if len(changed) > 3 else ""))


NUMBER = st.column_config.NumberColumn
WHOLE = r"^(\d+|—)$"  # a C, S or K cell: a whole number, or "—" where it does not apply
COLUMNS = {
    "layer": st.column_config.TextColumn("layer", pinned=True, help="Qualified module name"),
    "table": st.column_config.CheckboxColumn("table", help="Compute this layer by table lookups"),
    "lock": st.column_config.CheckboxColumn("lock", help="Keep exact through group toggles"),
    "C": st.column_config.TextColumn("C", validate=WHOLE,
                                     help="Codebooks (subspaces) of this layer, resolved (⌈D / S⌉ when it has an "
                                          f"S), {C_LIMITS[0]}–{C_LIMITS[1]}; typing one drops its S"),
    "S": st.column_config.TextColumn("S", validate=WHOLE,
                                     help="Sub-vector length, when C came from one: C = ⌈D / S⌉. Typing one sets C "
                                          "from it."),
    "K": st.column_config.TextColumn("K", validate=WHOLE, help="Prototypes per subspace"),
    "encoder": st.column_config.SelectboxColumn("encoder", options=[*ENCODERS, NOT_APPLICABLE]),
    "LUT": st.column_config.SelectboxColumn("LUT", options=[*LUT_DTYPES, NOT_APPLICABLE], help="Table dtype"),
    "cosine": NUMBER("cosine", format="%.4f", help="Cosine of this layer's output with the exact network's on the "
                     "same images, now (1: the same). An exact layer below 1 computes exactly, but its input already "
                     "carries the error of the table layers before it"),
    "rel. error": NUMBER("rel. error", format="%.3f", help="‖approx − exact‖ / ‖exact‖ of its output, now: for an "
                         "exact layer, the error arriving from the table layers before it"),
    "warning": st.column_config.TextColumn("warning", width="large",
                                           help="K at least the calibration rows (k-means memorises), or a table "
                                           "layer measured slower than its exact layer"),
    "ms now": NUMBER("ms now", format="%.3f", help="Measured on this machine: this layer as configured (median ms "
                     "per batch; a table layer includes its encoding)"),
    "ms exact": NUMBER("ms exact", format="%.3f", help="Measured on this machine: the exact layer and its batch norm"),
    "measured ×": NUMBER("measured ×", format="%.2f", help="Measured time now / exact: below 1 the layer is faster"),
    "counted ×": NUMBER("counted ×", format="%.2f",
                        help="Counted FLOPs now (full convention, encoding counted) / the exact layer's: where this "
                        "and the measured ratio disagree, the count misleads about speed"),
    "type": st.column_config.TextColumn("type"),
    "shape in → out": st.column_config.TextColumn("shape in → out"),
    "D": NUMBER("D", help="Inner dimension C_in·k·k"),
    "C_out": NUMBER("C_out"),
    "rows/image": NUMBER("rows/image", help="im2col rows per image (output positions)"),
    "MACs": NUMBER("MACs", format="compact", help="Exact multiply-accumulates per image"),
    "MAC share": st.column_config.ProgressColumn("MAC share", format="percent", min_value=0.0, max_value=1.0),
    "FLOPs paper": NUMBER("FLOPs paper", format="compact", help="Now, encoding free"),
    "FLOPs full": NUMBER("FLOPs full", format="compact", help="Now, encoding counted"),
    "weights KiB": NUMBER("weights KiB", format="%.1f"),
    "tables KiB": NUMBER("tables KiB", format="%.1f"),
    "prototypes KiB": NUMBER("prototypes KiB", format="%.1f"),
    "tables/weights": st.column_config.TextColumn("tables/weights", help="(tables + prototypes) / weights"),
}
