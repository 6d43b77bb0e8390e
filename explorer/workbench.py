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
server, and goes with its Session. Everything larger is bounded: the result store's memory, the sweep results,
and the session's given tables (the latest session.MAX_GIVEN_TABLES sets; an older one is loaded again from its
file).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from explorer import turns
from tabconv.cache import TableCache
from tabconv.config import Calibration
from tabconv.finetune import Tuned
from tabconv.latencytable import LatencyTable
from tabconv.metrics import Metrics
from tabconv.resultstore import ResultStore
from tabconv.session import Session
from tabconv.structure import ModelStructure
from tabconv.sweepstore import SweepStore

LATENCY_BATCH = 64  # the batch of the latency the page shows (1 is interactive use; 64 batched inference)

Progress = Callable[[dict[str, Any]], None]
SETTLE_QUIET_S = 60.0  # settle only when no other tab asked for work this long (a lone user: always)


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


@dataclass
class Workbench:
    """A Session plus what the page derives from it (sweeps, fine-tuned tables), guarded by one lock."""

    session: Session
    spec: Spec
    sweeps: SweepStore
    lock: threading.RLock = field(default_factory=threading.RLock)

    def settle(self, current: Metrics) -> None:
        """Bring the runner to the configuration on screen (after a sweep or a load), so that the next
        edit re-runs only the layers it affects instead of the whole network. Only when no tab waits for the
        server and no other tab asked for work in the last SETTLE_QUIET_S: it saves time, it is never needed
        (the runner recomputes whatever differs), and with a class on the server another student's request
        would move the runner again before this tab's next edit (measured: with 2 students, a quarter of the
        server's CPU time went to settling)."""
        current = self.metrics(current.id)  # the session's own record, not a tab's view of it
        if self.session.holds(current) or not self.session.has_tables(current):
            return
        with turns.turn_if_free("Preparing the next edit", quiet_s=SETTLE_QUIET_S) as free:
            if free:
                with self.lock:
                    self.session.activate(current)

    @property
    def structure(self) -> ModelStructure:
        return self.session.structure

    def metrics(self, config_id: int) -> Metrics:
        return self.session.history[config_id]

    def tuning(self, metrics: Metrics) -> Tuned | None:
        """The fine-tuning run (in this process) that produced a configuration's tables, while the session keeps
        them."""
        given = self.session.given(metrics)
        return given.run if given else None


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
    """Load the checkpoint (weights_only) and its data (never downloaded here: the sidebar says how to get it),
    and evaluate the exact baseline once. Image counts above a split's size use the whole split (the page shows
    the counts actually used)."""
    cache = TableCache()
    session = Session.from_checkpoint(spec.checkpoint, calibration=spec.calibration, eval_images=spec.eval_images,
                                      data_root=spec.data_root, cache=cache, download=False, clamp=True)
    _measure_latency(session, cache)
    return Workbench(session, spec, SweepStore(session, ResultStore(cache.root / "explorer")))


def _measure_latency(session: Session, cache: TableCache) -> None:
    """Every configuration gets its measured latency (per-layer timings kept beside the table cache, so each layer
    and setting is timed once per machine); TABCONV_EXPLORER_LATENCY=0 turns it off."""
    if os.environ.get("TABCONV_EXPLORER_LATENCY", "1") != "0":
        session.enable_latency(LatencyTable(cache.root, batch=LATENCY_BATCH))


def _open_user(spec: Spec, progress: Progress | None) -> Workbench:
    """A user's architecture, weights and image folder, through the library (which checks every part and says
    what does not fit). As with a checkpoint, image counts above the folder's parts use the whole part."""
    user = spec.user
    assert user is not None
    cache = TableCache()
    session = Session.from_user_model(user.arch, user.weights, images=user.images, num_classes=user.num_classes,
                                      image_size=user.image_size, mean=user.mean, std=user.std,
                                      calibration=spec.calibration, eval_images=spec.eval_images, cache=cache,
                                      progress=progress, clamp=True)
    _measure_latency(session, cache)
    return Workbench(session, spec, SweepStore(session, ResultStore(cache.root / "explorer")))
