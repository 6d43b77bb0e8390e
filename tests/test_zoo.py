"""Default checkpoints: trained once when missing, never left half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tabconv import zoo
from tabconv.progress import ProgressEvent
from tabconv.train import load_checkpoint


def test_checkpoint_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TABCONV_CHECKPOINTS", str(tmp_path))
    assert zoo.checkpoint_path("resnet18", "digits") == tmp_path / "resnet18-digits.pt"
    monkeypatch.delenv("TABCONV_CHECKPOINTS")
    assert zoo.checkpoint_dir() == zoo.DEFAULT_ROOT


def test_missing_checkpoint_is_trained_once_then_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    path = zoo.ensure_checkpoint("tiny", "digits", root=tmp_path, epochs=1, progress=events.append)
    assert path == tmp_path / "tiny-digits.pt"
    assert events and events[-1].detail == "epoch 1/1" and events[-1].fraction == 1.0
    model, meta = load_checkpoint(path)
    assert (meta["model"], meta["dataset"]) == ("tiny", "digits")

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached checkpoint must not be retrained")

    monkeypatch.setattr(zoo, "train_and_save", no_training)
    assert zoo.ensure_checkpoint("tiny", "digits", root=tmp_path) == path


def test_interrupted_training_leaves_no_file(tmp_path: Path) -> None:
    def interrupt(event: ProgressEvent) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        zoo.ensure_checkpoint("tiny", "digits", root=tmp_path, epochs=1, progress=interrupt)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert zoo.ensure_checkpoint("tiny", "digits", root=tmp_path, epochs=1).is_file()


def test_an_upload_is_kept_once_by_content_under_its_own_name(tmp_path: Path) -> None:
    """Checkpoints and weights files uploaded in the explorer share one layout: uploads/<content hash>/<name>."""
    first = zoo.store_upload(b"weights", "my model (v2).pth", root=tmp_path)
    assert first.parent.parent == tmp_path / "uploads" and first.name == "my_model__v2_.pth"
    assert first.read_bytes() == b"weights"
    mtime = first.stat().st_mtime_ns
    assert zoo.store_upload(b"weights", "my model (v2).pth", root=tmp_path) == first
    assert first.stat().st_mtime_ns == mtime  # written once
    other = zoo.store_upload(b"other", "my model (v2).pth", root=tmp_path)
    assert other != first and other.name == first.name and other.read_bytes() == b"other"
