"""Teaching view: one output value of one layer, computed from tables step by step, next to the exact one.

The library (tabconv.teaching) computes every number and the glossary; this panel only words and draws them,
one subspace at a time so that a deep layer (D in the thousands) stays readable.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from explorer import charts, turns
from explorer.workbench import Workbench
from tabconv.structure import LayerInfo
from tabconv.teaching import GLOSSARY, column_labels, error_summary, explain, worst_subspace

LARGEST = "largest output"


@st.fragment
def panel(wb: Workbench) -> None:
    st.header("Teaching view: how one output is computed from tables")
    glossary()
    current = wb.metrics(st.session_state.current_id)
    names = wb.structure.names
    tabled = current.table_layers
    cols = st.columns(5)
    if st.session_state.get("teach_layer") not in names:  # first run, or another model: its first table layer
        st.session_state.teach_layer = tabled[0] if tabled else names[0]
    layer = cols[0].selectbox("Layer", names, key="teach_layer")
    info = wb.structure.layer(layer)
    image = cols[1].number_input(f"Test image (0–{len(wb.session.eval_set) - 1})", 0,
                                 len(wb.session.eval_set) - 1, 0, key="teach_image")
    position = _position(info, cols[2], cols[3])
    channel = cols[4].number_input(f"Output channel (0–{info.out_features - 1})", 0, info.out_features - 1, None,
                                   placeholder="largest value", key=f"teach_channel-{layer}",
                                   help="Empty: the channel whose exact value is largest in magnitude here.")
    setting = current.settings[layer] if layer in tabled else st.session_state.defaults
    if layer not in tabled:
        st.caption(f"{layer} is exact in configuration #{current.id}: shown as a table layer with the default "
                   f"C={setting.codebooks}, K={setting.centroids}.")
    try:
        with turns.turn(f"Explaining one output of {layer}"), wb.lock:
            result = explain(wb.session, layer, int(image), position, {**current.settings, layer: setting},
                             None if channel is None else int(channel))
    except Exception as exc:  # e.g. an encoder that cannot fit this layer: say so, keep the page
        st.error(f"Cannot explain {layer}: {exc}")
        return
    _show(wb, result, chosen_row=position is None, chosen_channel=channel is None)


def glossary() -> None:
    """The words of the method, explained once on the page."""
    with st.expander("Glossary: im2col, subspace, prototype, table, encoding, folded batch norm, FLOP conventions"):
        st.markdown("\n".join(f"- **{term}**: {text}" for term, text in GLOSSARY.items()))


def _position(info: LayerInfo, left: DeltaGenerator, right: DeltaGenerator) -> int | tuple[int, int] | None:
    """(h, w) of a conv output, a row of a linear layer's input when it has several; None: the largest output."""
    if info.kind == "conv":
        height, width = info.output_shape[1], info.output_shape[2]
        h = left.number_input(f"Output row h (0–{height - 1})", 0, height - 1, None, placeholder=LARGEST,
                              key=f"teach_h-{info.name}", help="Empty (with w): the position whose output is largest.")
        w = right.number_input(f"Output column w (0–{width - 1})", 0, width - 1, None, placeholder=LARGEST,
                               key=f"teach_w-{info.name}")
        return None if h is None or w is None else (int(h), int(w))
    if info.rows_per_image == 1:
        return None
    row = left.number_input(f"Row (0–{info.rows_per_image - 1})", 0, info.rows_per_image - 1, None,
                            placeholder=LARGEST, key=f"teach_row-{info.name}")
    return None if row is None else int(row)


def _row_text(r: dict, chosen: bool) -> str:
    """Step 1 in the words of the layer's kind: a conv's window unrolled by im2col, or a linear layer's input."""
    d, m = r["inner_dim"], len(r["exact"])
    folded = f" (with `{r['bn']}` folded in)" if r["bn"] else ""
    products = (f"The exact layer multiplies this row by each output channel's weights{folded}: {d} multiply-adds "
                f"per channel, {m} channels.")
    if r["kind"] != "conv":
        return (f"**1 · The row.** `{r['layer']}` is a linear layer: its row is this image's feature vector, the "
                f"D = {d} numbers the layers before it computed (no unrolling needed). " + products)
    c_in, kh, kw = r["kernel"]
    where = f"position (h={r['position']['h']}, w={r['position']['w']})"
    why = " — the position with the largest output for this image" if chosen else ""
    return (f"**1 · The patch.** At output {where}{why}, `{r['layer']}` looks at {c_in} input channels × {kh}×{kw} "
            f"kernel taps. im2col unrolls that window into one row of D = {d} numbers. " + products)


def _show(wb: Workbench, r: dict, chosen_row: bool, chosen_channel: bool) -> None:
    c, k, m = r["codebooks"], r["centroids"], r["channel"]
    picture, text = st.columns([1, 5])
    image = wb.session.eval_set.images[r["image_index"]].permute(1, 2, 0).squeeze(-1).numpy()
    picture.image(image, width=120, caption=f"test image #{r['image_index']}, label {r['label']}")
    text.markdown(_row_text(r, chosen_row))
    encoder = ("a hash tree picks each piece's prototype with "
               f"{k.bit_length() - 1} comparisons and no multiplications" if r["setting"]["encoder"] == "tree"
               else "each piece is replaced by the nearest of its K prototypes (smallest squared distance)")
    padding = f" (zero-padded to {r['padded_dim']})" if r["padded_dim"] > r["inner_dim"] else ""
    st.markdown(
        f"**2 · Split into C = {c} subspaces, then encode.** The row is cut into {c} consecutive pieces of "
        f"{r['subspace_width']} numbers{padding}. Prototypes were learned from calibration images, K = {k} per "
        f"piece; {encoder}. Only the prototype's index is kept. Look at one subspace at a time:")
    _subspace(r)
    st.markdown(
        f"**3 · Look up and add.** Offline, every prototype was multiplied by the weights and stored: T[c, k, m] "
        f"(the bias sits in subspace 0's table). For output channel {m} the layer now just adds the {c} entries "
        f"picked by the {c} indices — {c - 1} additions instead of {r['inner_dim']} multiply-adds. Grey bars: what "
        "each piece contributes exactly; red diamonds: the gap between the two.")
    st.plotly_chart(charts.sum_chart(r), key="teach_sum", config={"displaylogo": False})
    _result(r, chosen_channel)
    st.plotly_chart(charts.channels_chart(r), key="teach_channels", config={"displaylogo": False})


def _subspace(r: dict) -> None:
    """A selector over the subspaces (default: the one with the largest gap), its picture and the whole list."""
    items = r["subspaces"]
    gaps = {item["subspace"]: item["gap"] for item in r["contributions"]}
    position = f"{r['position']['row']}-{r['channel']}-{r['image_index']}"
    index = st.selectbox(
        "Subspace", range(len(items)), index=worst_subspace(r), key=f"teach_subspace-{r['layer']}-{len(items)}-"
                                                                    f"{position}",
        format_func=lambda i: f"{i}: columns {items[i]['columns'][0]}–{items[i]['columns'][1] - 1}, "
                              f"gap {gaps[i]:+.3f}", help="Starts on the subspace with the largest gap.")
    item = items[index]
    st.plotly_chart(charts.subspace_chart(r, index, column_labels(r, *item["columns"])),
                    key="teach_subspace_chart", config={"displaylogo": False})
    runner_up = ("" if item["runner_up_distance"] is None
                 else f"; the next best prototype is at {item['runner_up_distance']:.3f}")
    source = "the input channel and kernel tap it comes from" if r["kernel"] else "its feature index"
    st.caption(f"Subspace {index}: its {len(item['values'])} values (bars) are encoded as prototype k{item['code']} "
               f"(black line), squared distance {item['distance']:.3f}{runner_up}. Hover a bar for {source}.")
    st.dataframe(pd.DataFrame([{
        "subspace": s["index"], "columns": f"{s['columns'][0]}–{s['columns'][1] - 1}", "prototype": s["code"],
        "squared distance": s["distance"], "next best distance": s["runner_up_distance"],
        "table entry": gaps_row["table"], "exact part": gaps_row["exact"], "gap": gaps_row["gap"]}
        for s, gaps_row in zip(items, r["contributions"], strict=True)]),
        hide_index=True, width="stretch", height=min(38 + 35 * len(items), 320))


def _result(r: dict, chosen: bool) -> None:
    """The channel's sum against the exact value, and why they differ."""
    m = r["channel"]
    summary = error_summary(r)
    why = " (the exact value largest in magnitude at this position: pick another above)" if chosen else ""
    largest = ", ".join(f"subspace {item['subspace']} ({item['gap']:+.3f})" for item in summary["largest"])
    st.markdown(
        f"**4 · The result.** Channel {m}{why}: table sum **{r['table_value']:.3f}** vs exact dot product "
        f"**{r['exact_value']:.3f}**. The difference, **{summary['error']:+.3f}**, is the approximation error of "
        f"this row for this channel: every subspace whose values differ from their prototype adds a gap "
        f"(table entry − exact part), and the gaps add up to it. Largest: {largest}, together "
        f"{summary['largest_sum']:+.3f}.")
    st.caption(f"Over all {len(r['exact'])} channels of this row: relative error {r['relative_error']:.3f}, cosine "
               f"{r['cosine']:.4f} (one channel can be far off while the row as a whole is close). The exact value "
               "uses this layer's real input in the exact network.")
