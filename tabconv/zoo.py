"""Default checkpoints: where they live and how a missing one gets trained.

The explorer opens on a model that may never have been trained on this machine, so a checkpoint is
named by (model, dataset) and trained on demand. Training writes the file atomically under a file
lock: an interrupted run leaves no half-written checkpoint, and two processes asking for the same
one train it once.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from filelock import FileLock

from tabconv.atomic import atomic_write_bytes
from tabconv.progress import Progress
from tabconv.train import DEFAULT_LR, train_and_save

DEFAULT_MODEL = "resnet18"
DEFAULT_DATASET = "digits"
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "checkpoints"



def checkpoint_dir() -> Path:
    """$TABCONV_CHECKPOINTS, else the repository's checkpoints/ (git-ignored)."""
    return Path(os.environ.get("TABCONV_CHECKPOINTS") or DEFAULT_ROOT).expanduser()


def store_upload(data: bytes, name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Where an uploaded checkpoint or weights file is kept: `<root>/uploads/<content hash>/<its own name>`
    (characters other than letters, digits, '.', '-' and '_' become '_'), written once and atomically."""
    safe = re.sub(r"[^\w.-]", "_", Path(name).name) or "upload.pt"
    path = Path(root or checkpoint_dir()) / "uploads" / hashlib.sha256(data).hexdigest()[:16] / safe
    if not path.is_file():
        atomic_write_bytes(path, data)
    return path


def checkpoint_path(model: str, dataset: str, root: str | os.PathLike[str] | None = None) -> Path:
    """`<root>/<model>-<dataset>.pt`: one default checkpoint per pair."""
    return Path(root or checkpoint_dir()) / f"{model}-{dataset}.pt"


def ensure_checkpoint(model: str, dataset: str, data_root: str | os.PathLike[str] | None = None,
                      progress: Progress | None = None, root: str | os.PathLike[str] | None = None,
                      epochs: int | None = None, train_images: int | None = None, lr: float = DEFAULT_LR,
                      augment: bool = False) -> Path:
    """The checkpoint of (model, dataset), trained first (per-dataset default epochs) when missing."""
    path = checkpoint_path(model, dataset, root)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():  # another process may have finished it while we waited
            train_and_save(model, dataset, path, epochs=epochs, data_root=data_root, progress=progress,
                           train_images=train_images, lr=lr, augment=augment)
    return path
