"""What a session's network is, typed: the fields every reader needs (architecture, dataset, classes, input shape,
weights hash) as attributes, and how it was trained or opened kept beside them as details."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CORE = ("model", "dataset", "num_classes", "input_shape", "sha256")


@dataclass(frozen=True)
class ModelInfo:
    """A network's description. `sha256` is its weights' hash (None: not known, e.g. random weights of a user
    model); `details` holds the rest of its record: a checkpoint's training (epochs, test accuracy, ...), a user
    model's weights, classes, mean and std."""

    model: str
    dataset: str | None  # None: not recorded (a checkpoint saved without it)
    num_classes: int
    input_shape: tuple[int, int, int]
    sha256: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ModelInfo:
        """From a checkpoint's or an opened user model's record (tabconv.train, tabconv.userload)."""
        missing = [key for key in ("model", "num_classes", "input_shape") if meta.get(key) is None]
        if missing:
            raise ValueError(f"a model description needs {', '.join(missing)}")
        shape = tuple(int(v) for v in meta["input_shape"])
        if len(shape) != 3:
            raise ValueError(f"input_shape must be [C, H, W], got {list(meta['input_shape'])}")
        return cls(str(meta["model"]), meta.get("dataset"), int(meta["num_classes"]), shape, meta.get("sha256"),
                   {k: v for k, v in meta.items() if k not in CORE})

    def to_meta(self) -> dict[str, Any]:
        """The plain record again (what a checkpoint stores)."""
        return {"model": self.model, "dataset": self.dataset, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "sha256": self.sha256, **self.details}
