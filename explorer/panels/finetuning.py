"""Fine-tuning: train the current configuration's tables end to end (the library's finetune_session), with
progress. The tuned configuration becomes current and lands in the history and on the plots as its own
kind of point; a compare line says what fine-tuning changed. Toggles never re-run it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import streamlit as st

from explorer import charts, state, sweeps
from explorer.workbench import Workbench
from tabconv import finetune as finetuning
from tabconv.finetune import Tuned
from tabconv.metrics import Metrics
from tabconv.stats import accuracy_text, interval_text

TIME_BUDGET_S = 60  # a class waits about a minute for a fine-tuning run (measured on the embedded default: below)
MAX_STEPS = 100_000  # the time budget decides
PATIENCE = 3  # held-out checks in a row without improvement before a run stops early
BELONGS = ("Fine-tuned tables belong to this exact configuration: toggles never re-run fine-tuning, and a toggle "
           "from a fine-tuned configuration evaluates an ordinary (untuned) one.")


def panel(wb: Workbench, current: Metrics) -> None:
    run = wb.tuning(current)
    if run is not None:
        _result(run)
    elif charts.is_tuned(current):
        _imported(wb, current)
    tabled = current.table_layers
    if not tabled:
        st.info("Fine-tuning trains table layers, and this configuration has none: tabulate some layers first.")
        return
    available = len(wb.session.calibration_set)
    if st.session_state.get("tune_images", 0) > available:  # a session with a smaller calibration split (or folder):
        st.session_state.pop("tune_images")  # the widget starts again from its default, which fits
    cols = st.columns([1, 1, 1, 1, 1, 1.3], vertical_alignment="bottom")
    seconds = cols[0].number_input("Time budget (s)", 5, 3600, TIME_BUDGET_S, step=15, key="tune_seconds",
                                   help="The run fits its steps (and its learning-rate schedule) into this time, "
                                        "judging by its first steps")
    steps = cols[1].number_input("At most (steps)", 1, 100_000, MAX_STEPS, key="tune_steps",
                                 help="Adam steps, each on a batch of 64 images, at most")
    images = cols[2].number_input("Images", 1, available, min(finetuning.DEFAULT_IMAGES, available), key="tune_images",
                                  help=f"The first N images of the calibration ({wb.session.calibration.split}) split, "
                                       f"which has {available}; the exact network's logits are the targets")
    lr = cols[3].number_input("Learning rate", 1e-6, 1.0, finetuning.DEFAULT_LR, format="%g", step=1e-4, key="tune_lr")
    layer_loss = cols[4].number_input("Layer loss", 0.0, 100.0, finetuning.DEFAULT_LAYER_LOSS, format="%g", step=0.5,
                                      key="tune_layer_loss",
                                      help="Weight of each table layer's output error against the exact layer's, "
                                           "beside the logits' distillation loss (0: logits only)")
    start = cols[5].button(f"Fine-tune #{current.id}", key="run_finetune", type="primary", width="stretch",
                           icon=":material/model_training:")
    st.caption(f"Trains the tables, prototypes (or tree thresholds) and temperature of the {len(tabled)} table "
               "layer(s) to match the exact network's logits (distillation, straight-through codes); exact layers "
               f"stay frozen. The first half of the evaluation images (never trained on) checks it "
               f"{finetuning.CHECKS} times: the best check's tables are kept (the starting ones when none is "
               f"better), and the result is judged on the other half. The run stops early after {PATIENCE} "
               f"checks in a row without improvement. {BELONGS}")
    if start:
        try:
            run = sweeps.finetune(wb, current, int(steps), int(images), float(lr), float(layer_loss),
                                  seconds=float(seconds), patience=PATIENCE)
        except Exception as exc:  # the page survives any failure of the library
            state.notify("error", f"Fine-tuning failed: {exc}")
        else:
            st.session_state.load_request = run.metrics.id
            state.notify("success", compare_line(run))
        state.refresh()


def compare_line(run: Tuned) -> str:
    """Parent → tuned accuracy on the images the held-out checks did not use (with its interval and whether the
    change is real), on all of them, loss before → after, time and why the run stopped."""
    parent, tuned, report = run.parent, run.metrics, run.report
    judged, judged_parent = run.judged()
    where = (f"on the {judged.eval_images} test images the held-out checks did not use"
             if run.unseen is not None else f"on {judged.eval_images} test images")
    everywhere = (f" (on all {tuned.eval_images}: {parent.accuracy:.2%} → {tuned.accuracy:.2%})"
                  if run.unseen is not None else "")
    return (f"Fine-tuned #{tuned.id} from #{parent.id}: accuracy {judged_parent.accuracy:.2%} → {judged.accuracy:.2%} "
            f"{where} ({interval_text(*judged.accuracy_ci95)}), {judged.against(judged_parent).verdict()}"
            f"{everywhere}; held-out distillation loss {report.loss_before:.4f} → {report.loss_after:.4f} "
            f"({report.held_out_from}); {report.steps} steps on {report.images} calibration images "
            f"(lr {report.lr:g}) in {report.seconds:.1f} s, stopped because it {report.stopped}.")


def _result(run: Tuned) -> None:
    with st.container(border=True):
        st.markdown(f"**{compare_line(run)}**")
        if len(run.report.loss_curve) > 1:
            curve = pd.DataFrame(run.report.loss_curve, columns=["step", "training loss"]).set_index("step")
            st.line_chart(curve, height=160, x_label="step", y_label="distillation loss")


def _imported(wb: Workbench, current: Metrics) -> None:
    given = wb.session.given(current)
    record: Mapping[str, Any] = given.finetune if given is not None else {}
    line = f"Imported fine-tuned tables: accuracy {accuracy_text(current.correct, current.eval_images, 2)} here"
    if record:
        line += (f"; when tuned: from accuracy {record.get('parent_accuracy', float('nan')):.2%}, distillation "
                 f"loss {record.get('loss_before', float('nan')):.4f} → {record.get('loss_after', float('nan')):.4f}, "
                 f"{record.get('steps')} steps on {record.get('images')} images")
    st.markdown(f"**{line}.**")
