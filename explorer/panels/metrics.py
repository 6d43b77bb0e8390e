"""The numbers: what is loaded, the exact baseline, and the live metrics of the current configuration.

Every accuracy names its number of evaluation images and its 95% interval, every change of accuracy whether
it is significant (McNemar on the same images), and every FLOP count its convention (paper: encoding free,
as the paper counted; full: encoding counted).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from explorer.charts import change
from explorer.workbench import Workbench
from tabconv.config import Calibration
from tabconv.cost import CostReport
from tabconv.metrics import Metrics
from tabconv.modelinfo import ModelInfo
from tabconv.models import MODEL_NAMES
from tabconv.stats import accuracy_text, interval_text, verdict_word

MIB = 2**20
INTERVAL_HELP = ("95% Wilson interval: measured on this many images, the accuracy on further images like them "
                 "plausibly lies in this range.")
PAIRED_HELP = ("McNemar's exact test on the images exactly one of the two configurations gets right: "
               "'within noise' means a difference this size easily arises by chance on these images (p ≥ 0.05).")


def header(wb: Workbench) -> None:
    """Provenance of every number, what the user should know about how this model is evaluated, and the exact
    baseline's card."""
    session, info = wb.session, wb.session.info
    calibration, meta = session.calibration, info.details
    if "images" in meta:  # a user's own model on an image folder
        st.caption(_user_provenance(info, calibration, len(session.eval_set)))
    else:
        trained = (f", test accuracy {_recorded(meta['test_accuracy'], meta['test_images'])} on the whole test "
                   "split when trained" if "test_accuracy" in meta else "")
        st.caption(f"**{MODEL_NAMES.get(info.model, info.model)}** on **{info.dataset}** — checkpoint "
                   f"`{(info.sha256 or '')[:12]}`{trained}. Calibration: first {calibration.images} training "
                   f"images ({calibration.mode}, {_fitting(calibration)}, ≤ {calibration.max_rows} rows per layer). "
                   f"Evaluation: first {len(session.eval_set)} test images. FLOPs and storage are per image / per "
                   "model.")
    notes(wb)
    base = session.baseline
    with st.container(border=True):
        st.markdown("**Exact baseline**")
        cols = st.columns(4)
        cols[0].metric(accuracy_label(base), f"{base.accuracy:.2%}", interval_text(*base.accuracy_ci95),
                       delta_color="off", delta_arrow="off", help=f"On the first {base.eval_images} test images. "
                                                                  + INTERVAL_HELP)
        cols[1].metric("FLOPs per image", f"{base.flops_paper / 1e6:.2f} M",
                       help="Both conventions: the exact model has no encoding, so the paper and full counts agree.")
        cols[2].metric("Weight storage", f"{base.baseline.storage_bytes / MIB:.2f} MiB", help="float32 weights")
        cols[3].metric("Convertible layers", len(wb.structure.names),
                       help="Layers that can become tables (the others always stay exact)")


def accuracy_label(m: Metrics) -> str:
    """A card's short label that still names its image count: 'Accuracy (450 images)' (details in its help)."""
    return f"Accuracy ({m.eval_images} images)"


def _user_provenance(info: ModelInfo, calibration: Calibration, eval_images: int) -> str:
    """Where a user's model, weights and images come from, and how the images were prepared."""
    meta = info.details
    classes = meta.get("classes") or []
    shown = ", ".join(classes[:5]) + (f", … ({len(classes)} in all)" if len(classes) > 5 else "")
    weights = meta.get("weights", "")
    if meta.get("weights_kind") not in ("random", "torchvision weight enum"):
        weights = f"`{Path(str(weights)).name}` ({meta.get('weights_kind')})"
    size, resize = meta.get("image_size"), meta.get("resize")
    mean = ", ".join(f"{v:g}" for v in meta.get("mean", []))
    std = ", ".join(f"{v:g}" for v in meta.get("std", []))
    return (f"**{info.model}** on the image folder **{Path(str(meta['images'])).name}** ({info.dataset}; "
            f"classes {shown}; {meta.get('split')}) — weights {weights}, sha256 `{(info.sha256 or '')[:12]}`. "
            f"Images resized to {resize} ({meta.get('interpolation')}), centre-cropped to {size}×{size}, normalised "
            f"with mean ({mean}) and std ({std}). Calibration: first {calibration.images} images of the folder's "
            f"calibration part ({calibration.mode}, {_fitting(calibration)}, ≤ {calibration.max_rows} rows per "
            f"layer). Evaluation: first {eval_images} images of its evaluation part. FLOPs and storage are per image "
            "/ per model.")


def notes(wb: Workbench) -> None:
    """How this session evaluates (e.g. a network torch.fx cannot trace re-runs whole on every change) and the
    layers that stay exact because they cannot become tables, with the library's reasons."""
    for note in wb.session.notes:
        st.info(f"Note: {note.rstrip('.')}.", icon=":material/info:")
    exact_only = wb.structure.exact_only
    if exact_only:
        with st.expander(f"{len(exact_only)} layer(s) always kept exact: they cannot become tables"):
            st.markdown("\n".join(f"- `{name}`: {reason}" for name, reason in exact_only.items()))


def _recorded(accuracy: float, images: int) -> str:
    """A recorded accuracy with its interval ('97.56% (95% CI 95.6-98.7%, 450 images)')."""
    return accuracy_text(round(accuracy * images), images, 2)


def _fitting(calibration: Calibration) -> str:
    """How the tables are fitted, in a few words: 'kmeans', 'least-squares, ridge 1', '… + classifier refit'."""
    text = calibration.fit + (" + classifier refit to exact logits" if calibration.refit_classifier else "")
    if calibration.fit == "least-squares" or calibration.refit_classifier:
        text += f", ridge {calibration.ridge:g}"
    return text


def title(current: Metrics, previous: Metrics | None) -> None:
    st.markdown(f"**Current configuration #{current.id}** — {current.label} "
                f"({len(current.table_layers)}/{len(current.settings)} layers as tables)"
                + (f"; deltas against #{previous.id}" if previous else ""))


def live(current: Metrics, previous: Metrics | None) -> None:
    """The current configuration's metrics, with deltas against the one shown before it (accuracy: greyed and
    'within noise' unless McNemar's test finds the change significant)."""
    test = current.against(previous) if previous else None
    noise = "off" if test is None or not test.significant else "normal"
    cols = st.columns([1.25, 0.9, 0.95, 0.95, 1.2])  # short labels, details in help: nothing cut on a projector
    cols[0].metric(accuracy_label(current), f"{current.accuracy:.2%}",
                   _delta(current.accuracy, previous and previous.accuracy, 100, " pp"), delta_color=noise,
                   delta_description=verdict_word(test.p_value) if test else None,
                   help=f"{accuracy_text(current.correct, current.eval_images, 2)} on the first {current.eval_images} "
                        f"test images. {INTERVAL_HELP} The change: {PAIRED_HELP}")
    cols[1].metric("Retention", f"{current.retention:.1%}",
                   _delta(current.retention, previous and previous.retention, 100, " pp"), delta_color=noise,
                   help="Of the exact network's accuracy, on the same images.")
    cols[2].metric("FLOPs, paper", f"{current.flops_paper / 1e6:.3g} M",
                   _delta(current.flops_paper, previous and previous.flops_paper, 1e-6, " M", 3), delta_color="inverse",
                   help=f"{change(current.reduction_paper)} against the exact model. Paper convention: encoding free "
                        "(exact MACs + table lookups and additions).")
    cols[3].metric("FLOPs, full", f"{current.flops_full / 1e6:.3g} M",
                   _delta(current.flops_full, previous and previous.flops_full, 1e-6, " M", 3), delta_color="inverse",
                   help=f"{change(current.reduction_full)} against the exact model. Full convention: the encoding "
                        "(nearest-prototype search or tree comparisons) counted too.")
    cols[4].metric("Storage", f"{current.paper.storage_bytes / MIB:.2f} MiB",
                   _delta(current.paper.storage_bytes, previous and previous.paper.storage_bytes, 1 / MIB, " MiB"),
                   delta_color="inverse", help=f"×{current.storage_ratio:.2f} of the original. Weights of exact layers "
                                               "+ tables + prototypes.")
    measured(current)
    uncertainty(current, previous)


def measured(current: Metrics) -> None:
    """Measured time beside the counted work, and a warning when the tables make this machine slower."""
    latency = current.latency
    if latency is None:
        return
    slower = latency.slower_layers(current.table_layers)
    line = (f"Latency on this machine: **{latency.total_ms:.3g} ms** per batch of {latency.batch} against "
            f"{latency.baseline_ms:.3g} ms exact ({latency.versus_exact()}; table "
            f"layers on {latency.kernel}, {latency.threads} threads; per-layer medians summed).")
    if latency.speedup < 1:  # a caption too (a warning box is taller): the plots below stay where they are
        line += (" :orange[This configuration counts fewer operations but runs **slower than the exact network** "
                 "here]")
    st.caption(line + (f" Slower tabled than exact: {', '.join(slower)}." if slower else ""))


def uncertainty(current: Metrics, previous: Metrics | None) -> None:
    """The accuracy's interval, and whether the change from the previous configuration is real."""
    line = f"Accuracy {accuracy_text(current.correct, current.eval_images, 2)}."
    if previous is not None:
        test = current.against(previous)
        line += (f" Change from #{previous.id}: {previous.accuracy:.2%} → {current.accuracy:.2%}, {test.verdict()}: "
                 f"{test.counts_text(f'#{previous.id}', f'#{current.id}')}.")
    st.caption(line, help=f"{INTERVAL_HELP} {PAIRED_HELP}")


def _delta(now: float, before: float | None, scale: float, unit: str, digits: int = 2) -> str | None:
    """The change at a fixed number of decimals; None (no arrow) when it rounds to zero, so that a card
    never shows "↑ +0 M" or a meaningless "-2e-05 M"."""
    if before is None:
        return None
    text = f"{(now - before) * scale:+.{digits}f}"
    return None if float(text) == 0 else text + unit


def breakdown(current: Metrics) -> None:
    """Where the operations and bytes go, in both conventions."""
    st.dataframe(pd.DataFrame([_row(name, report, current) for name, report in
                               (("paper (encoding free)", current.paper), ("full (encoding counted)", current.full))]),
                 hide_index=True, width="stretch")


def _row(name: str, report: CostReport, current: Metrics) -> dict[str, object]:
    return {"convention": name, "FLOPs/image": f"{report.flops / 1e6:.3f} M",
            "vs exact": change(1 - report.flops / current.baseline.flops), "storage": f"×{current.storage_ratio:.2f}",
            "exact MACs & other ops": f"{report.exact_ops / 1e6:.3f} M",
            "encoding": f"{report.encoding_ops / 1e6:.3f} M",
            "lookups + adds": f"{report.lookup_ops / 1e6:.3f} M",
            "weights / tables / prototypes": f"{report.weight_bytes / MIB:.2f} / {report.table_bytes / MIB:.2f} / "
                                             f"{report.prototype_bytes / MIB:.2f} MiB"}


def last_change() -> None:
    """What this tab's last evaluation cost (measured in its turn, so another tab's work never counts): the
    evidence that only the affected part was recomputed, or that it was evaluated before."""
    info = st.session_state.last_apply
    if not info:
        return
    if info.get("loaded"):  # a click or a history load: one line too, so that nothing below moves
        st.caption(f"Loaded #{info['id']}, evaluated before: shown from memory.")
        return
    waited = f", after {info['waited']:.0f} s waiting for the server" if info["waited"] >= 0.5 else ""
    if info["memoised"]:
        where = "earlier on this server" if info["earlier"] == "this server" else "before in this tab"
        st.caption(f"Configuration #{info['id']} was evaluated {where}: shown from memory "
                   f"({info['seconds']:.2f} s{waited}).")
        return
    nodes = (f", re-ran {info['recomputed']} of {info['nodes']} graph nodes" if info["nodes"]
             else " (streaming evaluation)")
    st.caption(f"Last change: fitted {info['fitted']} layer table(s) (others from memory or the disk cache)"
               f"{nodes}, {info['seconds']:.2f} s{waited}.")
