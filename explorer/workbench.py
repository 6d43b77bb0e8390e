"""The shared engine behind the page: one library Session per (checkpoint, calibration, evaluation set), or per
(architecture, weights, image folder, preprocessing, calibration, evaluation set) for a user's own model.

The Session is kept in a `st.cache_resource` slot: every rerun and every browser tab reuses it, so nothing it
has evaluated or built is computed twice on this server (a tab shows only its own history, kept in its session
state). Work on it runs in its tab's turn (explorer.turns: one computation at a time on the server) and under a
lock, taken after the turn, because Streamlit runs each tab's script in its own thread. Sweep results
(propagation matrix, sensitivity) are also kept on disk, so the next launch shows them without re-running their
evaluations.

Memory: at most two Sessions are kept (`_slot`'s max_entries); a Session's history grows by one small record
(settings, costs, per-layer errors, one bit per evaluation image) per distinct configuration evaluated on the
server, and goes with its Session; the result store keeps at most MEMORY_RESULTS results in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import streamlit as st

from explorer import turns
from tabconv.atomic import atomic_write_text
from tabconv.cache import TableCache, cache_key
from tabconv.config import Calibration
from tabconv.data import load_dataset
from tabconv.finetune import Tuned
from tabconv.imagefolder import scan_image_folder
from tabconv.metrics import Metrics
from tabconv.session import Session
from tabconv.settings import LayerSetting
from tabconv.structure import ModelStructure
from tabconv.train import load_checkpoint

Progress = Callable[[dict[str, Any]], None]
MEMORY_RESULTS = 32  # sweep results kept in memory per store (a propagation matrix of a deep network is ~100 KiB)


@dataclass(frozen=True)
class UserSource:
    """A user's own model, as tabconv.userload.open_user_model reads it (the Spec's digest is its weights')."""

    arch: str
    weights: str | None  # a weights file, a torchvision weight name, or None: seeded random weights
    images: str  # the image folder
    folder_stamp: str  # changes when images are added, removed or renamed: a changed folder gets a new Session
    num_classes: int | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Spec:
    """What a Session depends on; equal specs share one Session."""

    checkpoint: str  # "" for a user's model (its weights are in `user`)
    digest: str  # sha256 of the checkpoint or weights file (a replaced file gets a new Session), or a weight name
    calibration: Calibration
    eval_images: int
    data_root: str | None = None
    user: UserSource | None = None  # a torchvision architecture + weights + image folder instead of a checkpoint


class ResultStore:
    """JSON results on disk under the table cache, keyed by everything they depend on; the most recently used
    MEMORY_RESULTS of them also in memory (the disk keeps them all)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._memory: OrderedDict[str, Any] = OrderedDict()

    def get(self, parts: dict[str, Any]) -> Any | None:
        key = cache_key(parts)
        if key not in self._memory:
            path = self.root / f"{key}.json"
            try:
                self._keep(key, json.loads(path.read_text())["value"])
            except (OSError, ValueError, KeyError):
                return None
        self._memory.move_to_end(key)
        return self._memory[key]

    def put(self, parts: dict[str, Any], value: Any) -> None:
        key = cache_key(parts)
        self._keep(key, value)
        atomic_write_text(self.root / f"{key}.json", json.dumps({"parts": parts, "value": value}, default=str))

    def _keep(self, key: str, value: Any) -> None:
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > MEMORY_RESULTS:
            self._memory.popitem(last=False)


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
    eval_sha256: str | None = None  # a user's model: what its evaluation images are (the folder can change)

    def settle(self, current: Metrics) -> None:
        """Bring the runner to the configuration on screen (after a sweep or a load), so that the next
        edit re-runs only the layers it affects instead of the whole network. Only when no tab waits for the
        server: it saves time, it is never needed (the runner recomputes whatever differs)."""
        if self.runner_at == current.id:
            return
        with turns.turn_if_free("Preparing the next edit") as free:
            if free:
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
        parts = {"kind": kind, "checkpoint_sha256": self.session.meta.get("sha256"),
                 "calibration": asdict(self.session.calibration), "eval_images": len(self.session.eval_set),
                 "setting": setting.to_dict()}
        if self.eval_sha256 is not None:  # a checkpoint implies its dataset; the same weights can see any folder
            parts.update(dataset=self.session.meta.get("dataset"), eval_sha256=self.eval_sha256)
        return parts


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


def folder_stamp(path: str) -> str:
    """A cheap fingerprint of an image folder, taken on every rerun: the modification times of it and of its
    subfolders two levels down (DIR/<class>, DIR/train/<class>), which change when an image is added, removed or
    renamed. Only folders are stat'ed (scandir knows the files' kind without), so a large folder stays cheap."""
    root = Path(path).expanduser()
    stamps = []
    level = [root]
    for depth in range(3):
        below = []
        for folder in level:
            try:
                stamps.append(f"{folder.relative_to(root)}:{folder.stat().st_mtime_ns}")
                if depth < 2:
                    with os.scandir(folder) as entries:
                        below += [Path(entry.path) for entry in entries if entry.is_dir()]
            except OSError:  # missing, vanished or unreadable: the library says so when it opens the folder
                continue
        level = below
    return hashlib.sha256("\n".join(sorted(stamps)).encode()).hexdigest()[:16]


@dataclass
class _Slot:
    """Where one spec's workbench is kept once opened."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    workbench: Workbench | None = None


@st.cache_resource(show_spinner=False, max_entries=2)
def _slot(spec: Spec) -> _Slot:
    """The cached slot of a spec. Opening happens outside the cached function so that it can drive a progress bar
    on the page: Streamlit replays what a cached function drew, and refuses elements created outside it."""
    return _Slot()


def is_open(spec: Spec) -> bool:
    """Whether the spec's workbench is ready (opening it costs nothing)."""
    return _slot(spec).workbench is not None


def open_workbench(spec: Spec, progress: Progress | None = None) -> Workbench:
    """The spec's workbench, opened once, in this tab's turn (concurrent tabs wait for the first); a failure
    leaves nothing behind, so the next try opens it again."""
    slot = _slot(spec)
    if slot.workbench is not None:
        return slot.workbench
    with turns.turn("Opening a model"), slot.lock:
        if slot.workbench is None:
            try:
                slot.workbench = _open_user(spec, progress) if spec.user is not None else _open_checkpoint(spec)
            except BaseException:
                _slot.clear(spec)  # an empty slot must not push an opened workbench out of the cache
                raise
        return slot.workbench


def _open_checkpoint(spec: Spec) -> Workbench:
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


def _open_user(spec: Spec, progress: Progress | None) -> Workbench:
    """A user's architecture, weights and image folder, through the library (which checks every part and says
    what does not fit). As with a checkpoint, image counts above the folder's parts are capped to them."""
    user = spec.user
    assert user is not None
    available = len(scan_image_folder(user.images).evaluation)
    cache = TableCache()
    session = Session.from_user_model(user.arch, user.weights, images=user.images, num_classes=user.num_classes,
                                      image_size=user.image_size, mean=user.mean, std=user.std,
                                      calibration=spec.calibration, eval_images=min(spec.eval_images, available),
                                      cache=cache, progress=progress)
    labels = session.eval_set.labels.numpy().tobytes()
    eval_sha256 = hashlib.sha256(session.eval_set.images.numpy().tobytes() + labels).hexdigest()
    return Workbench(session, spec, ResultStore(cache.root / "explorer"), eval_sha256=eval_sha256)
