"""Teaching view: one output value of one layer, computed from tables step by step, next to the exact one."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from explorer import charts
from explorer.workbench import Workbench
from tabconv.structure import LayerInfo
from tabconv.teaching import explain


@st.fragment
def panel(wb: Workbench) -> None:
    st.header("Teaching view: how one output is computed from tables")
    current = wb.metrics(st.session_state.current_id)
    names = wb.structure.names
    tabled = current.table_layers
    cols = st.columns(5)
    layer = cols[0].selectbox("Layer", names, index=names.index(tabled[0]) if tabled else 0, key="teach_layer")
    info = wb.structure.layer(layer)
    image = cols[1].number_input(f"Test image (0–{len(wb.session.eval_set) - 1})", 0,
                                 len(wb.session.eval_set) - 1, 0, key="teach_image")
    position = _position(info, cols[2], cols[3])
    channel = cols[4].number_input(f"Output channel (−1: largest, 0–{info.out_features - 1})", -1,
                                   info.out_features - 1, -1, key=f"teach_channel-{layer}")
    setting = current.settings[layer] if layer in tabled else st.session_state.defaults
    if layer not in tabled:
        st.caption(f"{layer} is exact in configuration #{current.id}: shown as a table layer with the default "
                   f"C={setting.codebooks}, K={setting.centroids}.")
    try:
        with wb.lock:
            result = explain(wb.session, layer, int(image), position, {**current.settings, layer: setting},
                             None if channel < 0 else int(channel))
    except Exception as exc:  # e.g. an encoder that cannot fit this layer: say so, keep the page
        st.error(f"Cannot explain {layer}: {exc}")
        return
    _show(wb, result)


def _position(info: LayerInfo, left: DeltaGenerator, right: DeltaGenerator) -> int | tuple[int, int]:
    """(h, w) of a conv output, or the row of a linear layer's input."""
    if info.kind == "conv":
        height, width = info.output_shape[1], info.output_shape[2]
        h = left.number_input(f"Output row h (0–{height - 1})", 0, height - 1, height // 2, key=f"teach_h-{info.name}")
        w = right.number_input(f"Output column w (0–{width - 1})", 0, width - 1, width // 2, key=f"teach_w-{info.name}")
        return int(h), int(w)
    row = left.number_input(f"Row (0–{info.rows_per_image - 1})", 0, info.rows_per_image - 1, 0,
                            key=f"teach_row-{info.name}")
    return int(row)


def _show(wb: Workbench, r: dict) -> None:
    c, k, m = r["codebooks"], r["centroids"], r["channel"]
    where = f"position (h={r['position']['h']}, w={r['position']['w']})" if r["kind"] == "conv" else \
        f"row {r['position']['row']}"
    picture, text = st.columns([1, 5])
    image = wb.session.eval_set.images[r["image_index"]].permute(1, 2, 0).squeeze(-1).numpy()
    picture.image(image, width=120, caption=f"test image #{r['image_index']}, label {r['label']}")
    window = (f"{r['kernel'][0]} input channels × {r['kernel'][1]}×{r['kernel'][2]} taps" if r["kernel"]
              else f"the {r['inner_dim']} input features")
    text.markdown(
        f"**1 · The patch.** At {where}, `{r['layer']}` looks at {window}. im2col unrolls them into one row of "
        f"D = {r['inner_dim']} numbers (the bars below). The exact layer multiplies this row by each output "
        f"channel's weights: {r['inner_dim']} multiply-adds per channel, {len(r['exact'])} channels.")
    st.plotly_chart(charts.patch_chart(r), key="teach_patch", config={"displaylogo": False})
    encoder = ("a hash tree picks each piece's prototype with "
               f"{k.bit_length() - 1} comparisons and no multiplications" if r["setting"]["encoder"] == "tree"
               else "each piece is replaced by the nearest of its K prototypes (smallest squared distance)")
    st.markdown(
        f"**2 · Split into C = {c} subspaces, then encode.** The row is cut into {c} consecutive pieces of "
        f"{r['subspace_width']} numbers" + (f" (zero-padded to {r['padded_dim']})" if r["padded_dim"] > r["inner_dim"]
                                             else "") +
        f". Prototypes were learned from calibration images, K = {k} per piece; {encoder}. Only the prototype's "
        "index is kept. The black lines above are the chosen prototypes.")
    st.dataframe(pd.DataFrame([{"subspace": s["index"], "columns": f"{s['columns'][0]}–{s['columns'][1] - 1}",
                                "prototype index": s["code"], "squared distance": s["distance"],
                                "next best distance": s["runner_up_distance"]} for s in r["subspaces"]]),
                 hide_index=True, width="stretch")
    st.markdown(
        f"**3 · Look up and add.** Offline, every prototype was multiplied by the weights (batch norm folded in; "
        f"the bias sits in subspace 0's table) and stored: T[c, k, m]. For output channel {m} the layer now just "
        f"adds the {c} entries picked by the {c} indices — {c - 1} additions instead of {r['inner_dim']} "
        "multiply-adds. Grey bars: what each piece contributes exactly.")
    st.plotly_chart(charts.sum_chart(r), key="teach_sum", config={"displaylogo": False})
    error = r["table_value"] - r["exact_value"]
    st.markdown(f"**4 · The result.** Channel {m}: table sum **{r['table_value']:.4f}** vs exact dot product "
                f"**{r['exact_value']:.4f}** (error {error:+.4f}). Over all {len(r['exact'])} channels at this "
                f"position: relative error {r['relative_error']:.3f}, cosine {r['cosine']:.4f}. The exact value "
                "uses this layer's real input in the exact network.")
    st.plotly_chart(charts.channels_chart(r), key="teach_channels", config={"displaylogo": False})
