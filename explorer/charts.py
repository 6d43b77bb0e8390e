"""Plotly figures as pure functions of library results (no Streamlit), so they are easy to test and reuse.

Every clickable point carries its configuration id in `customdata[0]`; the page turns a click into
"load that configuration".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import plotly.graph_objects as go

from tabconv.metrics import Metrics, Origin
from tabconv.search import pareto_front
from tabconv.stats import accuracy_text, interval_text, verdict

FINE_TUNED = Origin.FINE_TUNED.value
COSTS: dict[str, tuple[str, Callable[[Metrics], float]]] = {
    "flops_paper": ("FLOPs per image — paper convention (encoding free)", lambda m: m.flops_paper),
    "flops_full": ("FLOPs per image — full convention (encoding counted)", lambda m: m.flops_full),
    "storage_bytes": ("Storage of weights + tables + prototypes (MiB)", lambda m: m.paper.storage_bytes / 2**20),
    "latency_ms": ("Latency measured on this CPU (ms per batch)", lambda m: m.latency_ms),
}
# FLOPs in SI units (M); storage in MiB like the cards, as plain short numbers
TICK_FORMATS = {"flops_paper": "~s", "flops_full": "~s", "storage_bytes": "~g", "latency_ms": "~g"}
ORIGIN_COLOURS = {Origin.EDIT: "#4C78A8", Origin.PRIORITY: "#F58518", Origin.GREEDY: "#54A24B",
                  Origin.SWEEP: "#B7B7B7", Origin.BASELINE: "#222222", Origin.IMPORTED: "#72B7B2",
                  FINE_TUNED: "#B279A2"}
ORIGIN_SYMBOLS = {FINE_TUNED: "diamond"}
TUNED_NOTE = ("fine-tuned tables belong to this exact configuration:<br>a toggle from it evaluates an ordinary "
              "(untuned) one")
TRADEOFF_HEIGHT = 420  # pixels of a trade-off plot (the page keeps its place while a click redraws it)
HEAT_LIMITS = {"cosine": (0.5, 1.0, "RdYlGn"), "relative_error": (0.0, 1.0, "RdYlGn_r")}
HEAT_NAMES = {"cosine": "cosine similarity", "relative_error": "relative error"}


def is_tuned(m: Metrics) -> bool:
    """Whether a configuration was evaluated with fine-tuned (given) tables rather than built ones."""
    return bool(m.tables_sha256)


def kind(m: Metrics) -> str:
    """The legend group of a configuration: 'fine-tuned' for fine-tuned tables (run here or imported), else
    the kind of request that produced it."""
    return FINE_TUNED if is_tuned(m) else m.origin.value


def change(reduction: float) -> str:
    """A FLOP reduction as a change against the exact model: '−98.9%', or '+0.1%' when the full count grows."""
    return "±0%" if abs(reduction) < 5e-4 else f"{-reduction:+.1%}".replace("-", "−")


def summary_lines(m: Metrics) -> list[str]:
    """A configuration in four lines: accuracy, FLOPs in both conventions, storage, tabled layers."""
    return [f"accuracy {accuracy_text(m.correct, m.eval_images, 2)}, retention {m.retention:.1%}",
            f"FLOPs paper {m.flops_paper / 1e6:.3g}M ({change(m.reduction_paper)}), "
            f"full {m.flops_full / 1e6:.3g}M ({change(m.reduction_full)})",
            f"storage {m.paper.storage_bytes / 2**20:.3g} MiB (×{m.storage_ratio:.2f} of the original)",
            *([latency_text(m)] if m.latency is not None else []),
            f"{len(m.table_layers)}/{len(m.settings)} layers as tables"]


def latency_text(m: Metrics) -> str:
    """'measured 5.2 ms per batch of 64 (3.90x faster than exact)', or '… (1.40x slower than exact)'."""
    latency = m.latency
    assert latency is not None
    return f"measured {latency.total_ms:.3g} ms per batch of {latency.batch} ({latency.versus_exact()})"


def hover(m: Metrics) -> str:
    """The configuration summary shown when hovering a point (fine-tuned ones say what a toggle does)."""
    return "<br>".join([f"<b>#{m.id} {m.label}</b>", *summary_lines(m)]
                       + ([f"<i>{TUNED_NOTE}</i>"] if is_tuned(m) else []))


def tradeoff(points: Sequence[Metrics], baseline: Metrics, current: Metrics, cost: str,
             links: Sequence[tuple[Metrics, Metrics]] = ()) -> go.Figure:
    """Accuracy against a cost: every configuration, the Pareto front as a step line, baseline and current.

    `links` are (parent, fine-tuned) pairs, drawn as dotted segments from a configuration to its tuned form."""
    title, value = COSTS[cost]
    points = [m for m in points if value(m) is not None]
    if cost == "latency_ms" and baseline.latency is not None:
        title = f"Latency measured on this CPU (ms per batch of {baseline.latency.batch}, {baseline.latency.kernel})"
    fig = go.Figure()
    groups: dict[str, list[Metrics]] = {}
    for m in points:
        groups.setdefault(kind(m), []).append(m)
    if links:
        xs: list[float | None] = []
        ys: list[float | None] = []
        for parent, tuned in links:
            xs += [value(parent), value(tuned), None]
            ys += [100 * parent.accuracy, 100 * tuned.accuracy, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="fine-tuning (parent → tuned)", hoverinfo="skip",
                                 line=dict(color=ORIGIN_COLOURS[FINE_TUNED], width=1.5, dash="dot")))
    for group, members in groups.items():
        if group != "baseline":
            size = 12 if group == FINE_TUNED else 8
            fig.add_trace(_points(members, value, group, dict(size=size, color=ORIGIN_COLOURS[group], opacity=0.75,
                                                              symbol=ORIGIN_SYMBOLS.get(group, "circle"))))
    front = pareto_front(points, cost)
    fig.add_trace(go.Scatter(x=[value(m) for m in front], y=[100 * m.accuracy for m in front], mode="lines",
                             line=dict(shape="hv", color="#E45756", width=2), name="Pareto front", hoverinfo="skip"))
    fig.add_trace(_points([baseline], value, "baseline (exact)",
                          dict(size=16, symbol="star", color=ORIGIN_COLOURS["baseline"])))
    fig.add_trace(_points([current], value, "current",
                          dict(size=20, symbol="circle-open", color="#E45756", line=dict(width=3))))
    fig.update_layout(
        height=TRADEOFF_HEIGHT, margin=dict(l=10, r=10, t=40, b=10),
        title=dict(text=f"Accuracy vs {title.split(' (')[0]}", font=dict(size=15)),
        xaxis=dict(title=title, type="log", tickformat=TICK_FORMATS[cost],
                   **log_ticks([value(m) for m in points] or [value(baseline)])),
        yaxis=dict(title=f"top-1 accuracy (%) on {baseline.eval_images} test images"),
        # the legend at the figure's foot (container coordinates), under the axis title, never over it
        legend=dict(orientation="h", yref="container", yanchor="bottom", y=0, x=0), clickmode="event+select",
        hovermode="closest",
        modebar=dict(orientation="v"),
    )
    return fig


def log_ticks(values: Sequence[float]) -> dict[str, Any]:
    """Over a decade or more, label only 1, 2 and 5 of each decade so that the labels never overlap; over
    less, plotly's own ticks (20, 30, 40 …) are the readable ones."""
    low, high = min(values), max(values)
    return {"dtick": "D2"} if low > 0 and high / low >= 10 else {}


def _points(members: Sequence[Metrics], value: Callable[[Metrics], float], name: str,
            marker: dict[str, Any]) -> go.Scatter:
    return go.Scatter(x=[value(m) for m in members], y=[100 * m.accuracy for m in members], mode="markers",
                      name=name, marker=marker, customdata=[[m.id] for m in members], error_y=error_bars(members),
                      text=[hover(m) for m in members], hovertemplate="%{text}<extra></extra>")


def error_bars(members: Sequence[Metrics]) -> dict[str, Any]:
    """Each accuracy's 95% (Wilson) interval as asymmetric error bars, in percentage points."""
    intervals = [m.accuracy_ci95 for m in members]
    return dict(type="data", symmetric=False, thickness=1, width=0,
                array=[100 * (high - m.accuracy) for m, (_, high) in zip(members, intervals, strict=True)],
                arrayminus=[100 * (m.accuracy - low) for m, (low, _) in zip(members, intervals, strict=True)])


def propagation_heatmap(layers: Sequence[str], rows: Sequence[Sequence[float]], current: Sequence[float],
                        current_label: str, metric: str) -> go.Figure:
    """Rows: each layer tabled alone, then the current configuration; columns: every layer's output."""
    zmin, zmax, scale = HEAT_LIMITS[metric]
    names = [f"only {name}" for name in layers] + [current_label]
    fig = go.Figure(go.Heatmap(
        z=[list(r) for r in rows] + [list(current)], x=list(layers), y=names, zmin=zmin, zmax=zmax,
        colorscale=scale, colorbar=dict(title=dict(text=HEAT_NAMES[metric], side="right"), thickness=12),
        hovertemplate="tabled: %{y}<br>output of %{x}<br>" + HEAT_NAMES[metric] + " %{z:.4f}<extra></extra>"))
    fig.add_hline(y=len(layers) - 0.5, line=dict(color="black", width=2))
    fig.update_layout(
        height=max(400, 20 * len(names) + 180), margin=dict(l=10, r=10, t=60, b=10),
        title=dict(text=f"Error propagation: {HEAT_NAMES[metric]} vs exact<br><sup>colour limits fixed at "
                        f"{zmin:g}–{zmax:g} for every configuration</sup>", font=dict(size=15)),
        xaxis=dict(title="output of layer (forward order)", tickangle=-45),
        yaxis=dict(title="layer(s) approximated", autorange="reversed"), modebar=dict(orientation="v"))
    return fig


def sensitivity_bars(rows: Sequence[dict[str, Any]], all_tables_retention: float) -> go.Figure:
    """Per layer, both directions: retention with only it tabled, and with only it kept exact."""
    layers = [r["layer"] for r in rows]
    fig = go.Figure()
    for key, name, colour in (("only_table", "only this layer tabled", "#4C78A8"),
                              ("only_exact", "all but this layer tabled", "#F58518")):
        fig.add_trace(go.Bar(
            x=layers, y=[100 * r[key]["retention"] for r in rows], name=name, marker_color=colour,
            customdata=[[r[key].get("config_id", -1)] for r in rows], textposition="none",
            text=[f"accuracy {100 * r[key]['accuracy']:.2f}% ({interval_text(*r[key]['accuracy_ci95'])}); vs exact: "
                  f"{verdict(r[key]['p_value_vs_exact'], r[key]['eval_images'])}<br>"
                  f"FLOPs saved/image: paper {r[key]['flops_saved_paper'] / 1e6:.3g}M, "
                  f"full {r[key]['flops_saved_full'] / 1e6:.3g}M" for r in rows],
            hovertemplate="%{x}<br>retention %{y:.1f}%<br>%{text}<extra>" + name + "</extra>"))
    fig.add_hline(y=100 * all_tables_retention, line=dict(dash="dash", color="#E45756"),
                  annotation_text="every layer tabled", annotation_position="bottom right")
    fig.update_layout(
        barmode="group", height=420, margin=dict(l=10, r=10, t=70, b=10),
        title=dict(text="Sensitivity in both directions: retention (% of exact accuracy)", font=dict(size=15)),
        xaxis=dict(tickangle=-45), yaxis=dict(title="retention (%)"),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0), modebar=dict(orientation="v"))
    return fig


def subspace_chart(result: dict[str, Any], index: int, labels: Sequence[str]) -> go.Figure:
    """One subspace of the patch: its values as bars, the chosen prototype over them (readable for any D)."""
    item = result["subspaces"][index]
    start, stop = item["columns"]
    xs = list(range(start, stop))
    what = "patch column" if result["kernel"] else "input feature"
    fig = go.Figure([
        go.Bar(x=xs, y=item["values"], marker_color="#4C78A8", opacity=0.6, name=f"{what} values",
               customdata=list(labels), hovertemplate="%{customdata}<br>value %{y:.3f}<extra></extra>"),
        go.Scatter(x=xs, y=item["prototype"], mode="lines+markers", line=dict(color="#222222", width=1.5),
                   marker=dict(size=4), name=f"chosen prototype k{item['code']}",
                   hovertemplate="prototype value %{y:.3f}<extra></extra>"),
    ])
    if stop > result["inner_dim"] > start:
        fig.add_vrect(x0=result["inner_dim"] - 0.5, x1=stop - 0.5, fillcolor="#DDDDDD", opacity=0.5, line_width=0,
                      annotation_text="zero padding")
    fig.update_layout(height=300, bargap=0.1, margin=dict(l=10, r=10, t=30, b=10),
                      xaxis=dict(title=f"{what} (subspace {index}: columns {start}–{stop - 1})"),
                      yaxis=dict(title="value"), legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    return fig


def sum_chart(result: dict[str, Any]) -> go.Figure:
    """Per subspace: the table entry that is summed, next to the exact partial dot product it stands for."""
    labels = [f"c{item['index']} → k{item['code']}" for item in result["subspaces"]]
    gaps = [item["gap"] for item in result["contributions"]]
    fig = go.Figure([
        go.Bar(x=labels, y=result["table_terms"], name="table entry T[c, k, m]", marker_color="#4C78A8"),
        go.Bar(x=labels, y=result["exact_terms"], name="exact partial dot product", marker_color="#BBBBBB"),
        go.Scatter(x=labels, y=gaps, mode="markers", name="gap (table − exact)",
                   marker=dict(symbol="diamond", size=8, color="#E45756")),
    ])
    fig.update_layout(barmode="group", height=300, margin=dict(l=10, r=10, t=30, b=10),
                      yaxis=dict(title=f"contribution to channel {result['channel']}"),
                      legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    return fig


def channels_chart(result: dict[str, Any]) -> go.Figure:
    """Every output channel at this position: table sum against the exact value (on the diagonal = exact)."""
    exact, approx = result["exact"], result["table_sum"]
    low, high = min(exact + approx), max(exact + approx)
    fig = go.Figure([
        go.Scatter(x=[low, high], y=[low, high], mode="lines", line=dict(dash="dot", color="#999999"),
                   hoverinfo="skip", showlegend=False),
        go.Scatter(x=exact, y=approx, mode="markers", marker=dict(size=6, color="#4C78A8"), showlegend=False,
                   customdata=list(range(len(exact))),
                   hovertemplate="channel %{customdata}<br>exact %{x:.4f}<br>tables %{y:.4f}<extra></extra>"),
    ])
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=10),
                      xaxis=dict(title="exact value" + (" (batch norm folded in)" if result["bn"] else "")),
                      yaxis=dict(title="table sum"))
    return fig
