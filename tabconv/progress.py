"""Progress of long library work, as one typed event that every front end (the command line's bars, the
explorer's bar, the benchmarks) reads the same way, so a stage is named and worded in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Stage(StrEnum):
    """What the library is doing; the value is the short name a terminal bar shows, `title` the words."""

    TRAIN = "train"
    DECODE_CALIBRATION = "decode calibration images"
    DECODE_EVALUATION = "decode evaluation images"
    BASELINE = "baseline"
    TABLES = "tables"
    EVALUATE = "evaluate"
    PRIORITY = "priority"
    GREEDY = "greedy"
    BACK_OFF = "back-off"
    SENSITIVITY = "sensitivity"
    PROPAGATION = "propagation"
    FINETUNE = "finetune"
    LATENCY = "latency"

    @property
    def title(self) -> str:
        return _TITLES[self]

    @property
    def long(self) -> bool:
        """Whether the stage is a long run of steps (a sweep, a search, training): between two of its steps the
        work may give way to short requests of other users."""
        return self in _LONG


_TITLES = {
    Stage.TRAIN: "Training",
    Stage.DECODE_CALIBRATION: "Decoding the calibration images",
    Stage.DECODE_EVALUATION: "Decoding the evaluation images",
    Stage.BASELINE: "Evaluating the exact model",
    Stage.TABLES: "Building tables",
    Stage.EVALUATE: "Evaluating",
    Stage.PRIORITY: "Priority masking",
    Stage.GREEDY: "Budgeted search",
    Stage.BACK_OFF: "Confirming (backing off)",
    Stage.SENSITIVITY: "Sensitivity sweep",
    Stage.PROPAGATION: "Error propagation",
    Stage.FINETUNE: "Fine-tuning",
    Stage.LATENCY: "Timing",
}
_LONG = {Stage.PRIORITY, Stage.GREEDY, Stage.BACK_OFF, Stage.SENSITIVITY, Stage.PROPAGATION,
         Stage.FINETUNE, Stage.LATENCY}
_COUNTS_FROM_ONE = {Stage.TRAIN, Stage.FINETUNE, Stage.DECODE_CALIBRATION, Stage.DECODE_EVALUATION, Stage.BACK_OFF}


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a stage: `index` of `total` done (None: a stage without steps, e.g. an evaluation over
    `images` images), what the step is about (`detail`: a layer, an epoch), the training loss of a training step
    and, where known, the seconds left."""

    stage: Stage
    index: int = 0
    total: int | None = None
    detail: str = ""
    images: int | None = None
    seconds_left: float | None = None
    loss: float | None = None

    @property
    def fraction(self) -> float | None:
        """How much of the stage is done (None: unknown)."""
        return min(self.index / self.total, 1.0) if self.total else None

    def describe(self) -> str:
        """One line for a person: 'Building tables (3/21): layer1.0.conv1', 'Fine-tuning: step 8/300, loss
        0.0812, about 40 s left', 'Evaluating on 450 images'."""
        stage = self.stage.title
        if self.images is not None and not self.total:
            return f"{stage} on {self.images} images"
        if not self.total:
            return stage
        step = self.index if self.stage in _COUNTS_FROM_ONE else min(self.index + 1, self.total)
        left = f", about {self.seconds_left:.0f} s left" if self.seconds_left is not None else ""
        if self.stage in (Stage.FINETUNE, Stage.TRAIN):
            parts = [f"step {step}/{self.total}", self.detail, "" if self.loss is None else f"loss {self.loss:.4f}"]
            return f"{stage}: " + ", ".join(p for p in parts if p) + left
        return f"{stage} ({step}/{self.total})" + (f": {self.detail}" if self.detail else "") + left


Progress = Callable[[ProgressEvent], None]
