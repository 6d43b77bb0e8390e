"""Every file tabconv writes goes through tabconv.atomic: a failed write keeps the old file and leaves no litter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tabconv.atomic import atomic_write, atomic_write_bytes, atomic_write_text


def test_a_write_replaces_the_file_and_creates_missing_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "x.json"
    assert atomic_write_text(path, "first") == path and path.read_text() == "first"
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    atomic_write(path, lambda handle: torch.save({"w": torch.arange(3)}, handle))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    atomic_write_bytes(path, b"old")

    def half_then_fail(handle) -> None:
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
