"""Library progress callbacks shown as one Streamlit progress bar, so long work never freezes silently."""

from __future__ import annotations

import time
from typing import Any

import streamlit as st

STAGES = {
    "tables": "Building tables",
    "evaluate": "Evaluating",
    "baseline": "Evaluating the exact model",
    "priority": "Priority masking",
    "greedy": "Budgeted search",
    "sensitivity": "Sensitivity sweep",
    "propagation": "Error propagation",
    "finetune": "Fine-tuning",
    "latency": "Timing",
    "decode calibration images": "Decoding the calibration images",
    "decode evaluation images": "Decoding the evaluation images",
}


def describe(event: dict[str, Any]) -> tuple[float | None, str]:
    """(fraction done or None, one line of text) for any progress event of the library."""
    if "epoch" in event:
        done = ((event["epoch"] - 1) * event["steps"] + event["step"]) / (event["epochs"] * event["steps"])
        return done, f"epoch {event['epoch']}/{event['epochs']}, loss {event['loss']:.3f}"
    stage = STAGES.get(event.get("stage", ""), str(event.get("stage", "Working")))
    if "images" in event:
        return None, f"{stage} on {event['images']} images"
    total, index = event.get("total"), event.get("index", 0)
    if not total:
        return None, stage
    if event.get("stage") == "finetune":  # steps count from 1; the detail is the step's loss
        return min(index / total, 1.0), f"{stage}: step {index}/{total}, {event.get('layer') or ''}".rstrip(", ")
    detail = f": {event['layer']}" if event.get("layer") else ""
    return min(index / total, 1.0), f"{stage} ({min(index + 1, total)}/{total}){detail}"


class ProgressBar:
    """A callable for the library's `progress=` arguments that drives one st.progress bar."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.started = time.perf_counter()
        self.done = 0.0
        self.bar = st.progress(0.0, text=title)

    def __call__(self, event: dict[str, Any]) -> None:
        fraction, text = describe(event)
        if fraction is not None:
            self.done = fraction
        elapsed = time.perf_counter() - self.started
        self.bar.progress(self.done, text=f"{self.title} — {text} ({elapsed:.0f} s)")

    def close(self) -> None:
        self.bar.empty()
