"""The shared engine behind the page: one library Session per (checkpoint, calibration, evaluation set).

The Session is a `st.cache_resource`: every rerun and every browser tab reuses it, so nothing it has
evaluated or built is computed twice. A lock serialises its use, because Streamlit runs each tab's
script in its own thread. Sweep results (propagation matrix, sensitivity) are also kept on disk, so
the next launch shows them without re-running their evaluations.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import streamlit as st

from tabconv.atomic import atomic_write_text
from tabconv.cache import TableCache, cache_key
from tabconv.config import Calibration
from tabconv.data import load_dataset
from tabconv.finetune import Tuned
from tabconv.metrics import Metrics
from tabconv.session import Session
from tabconv.settings import LayerSetting
from tabconv.structure import ModelStructure
from tabconv.train import load_checkpoint


@dataclass(frozen=True)
class Spec:
    """What a Session depends on; equal specs share one Session."""

    checkpoint: str
    digest: str  # sha256 of the checkpoint file: a replaced file gets a new Session
    calibration: Calibration
    eval_images: int
    data_root: str | None = None


class ResultStore:
    """JSON results on disk under the table cache, keyed by everything they depend on."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._memory: dict[str, Any] = {}

    def get(self, parts: dict[str, Any]) -> Any | None:
        key = cache_key(parts)
        if key not in self._memory:
            path = self.root / f"{key}.json"
            try:
                self._memory[key] = json.loads(path.read_text())["value"]
            except (OSError, ValueError, KeyError):
                return None
        return self._memory[key]

    def put(self, parts: dict[str, Any], value: Any) -> None:
        key = cache_key(parts)
        self._memory[key] = value
        atomic_write_text(self.root / f"{key}.json", json.dumps({"parts": parts, "value": value}, default=str))


@dataclass(frozen=True)
class ImportedTables:
    """Fine-tuned tables that came in as files (no Tuned run here): what re-exporting them needs."""

    tables: bytes  # the tables file's content
    finetune: dict[str, Any]  # the configuration's `finetune` record (how the tables were trained)


@dataclass
class Workbench:
    """A Session plus what the page derives from it (sweeps, fine-tuned tables), guarded by one lock."""

    session: Session
    spec: Spec
    store: ResultStore
    lock: threading.RLock = field(default_factory=threading.RLock)
    sweeps: dict[tuple, Any] = field(default_factory=dict)  # this process's sweep results, with config ids
    runner_at: int | None = None  # the configuration whose activations the incremental runner holds
    tuned: dict[str, Tuned] = field(default_factory=dict)  # fine-tuning runs of this page, by tables sha256
    imported: dict[str, ImportedTables] = field(default_factory=dict)  # imported tables files, by sha256

    def settle(self, current: Metrics) -> None:
        """Bring the runner to the configuration on screen (after a sweep or a load), so that the next
        edit re-runs only the layers it affects instead of the whole network."""
        with self.lock:
            if self.runner_at != current.id:
                self.session.activate(current)
                self.runner_at = current.id

    @property
    def structure(self) -> ModelStructure:
        return self.session.structure

    def metrics(self, config_id: int) -> Metrics:
        return self.session.history[config_id]

    @staticmethod
    def tables_sha256(metrics: Metrics) -> str | None:
        """The sha256 of a configuration's fine-tuned tables, None for built (ordinary) tables."""
        return metrics.extra.get("tables_sha256")

    def tuning(self, metrics: Metrics) -> Tuned | None:
        """The fine-tuning run (on this page) that produced a configuration's tables, if any."""
        sha = self.tables_sha256(metrics)
        return self.tuned.get(sha) if sha else None

    def identity(self, kind: str, setting: LayerSetting) -> dict[str, Any]:
        """Cache key parts of a sweep: the checkpoint, calibration, evaluation set and table setting."""
        return {"kind": kind, "checkpoint_sha256": self.session.meta.get("sha256"),
                "calibration": asdict(self.session.calibration), "eval_images": len(self.session.eval_set),
                "setting": setting.to_dict()}


def file_digest(path: str) -> str:
    """sha256 of a file, memoised per (path, size, mtime) so reruns do not re-read it."""
    stat = os.stat(path)
    return _digest(path, stat.st_size, stat.st_mtime_ns)


@st.cache_data(show_spinner=False, max_entries=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@st.cache_resource(show_spinner=False, max_entries=2)
def open_workbench(spec: Spec) -> Workbench:
    """Load the checkpoint (weights_only) and its data, and evaluate the exact baseline once.

    Image counts above a split's size are capped to it (the page shows the counts actually used).
    """
    model, meta = load_checkpoint(spec.checkpoint)
    calibration_set = load_dataset(meta["dataset"], spec.calibration.split, spec.data_root, download=False)
    eval_set = load_dataset(meta["dataset"], "test", spec.data_root, download=False)
    calibration = replace(spec.calibration, images=min(spec.calibration.images, len(calibration_set)))
    cache = TableCache()
    session = Session(model, meta, calibration_set, eval_set.head(min(spec.eval_images, len(eval_set))),
                      calibration, cache)
    return Workbench(session, spec, ResultStore(cache.root / "explorer"))
