"""Freed memory kept for reuse while fine-tuning: applied on glibc, a no-op elsewhere."""

from __future__ import annotations

import platform

import torch

from tabconv import allocator
from tabconv.allocator import reused_memory


def test_glibc_keeps_freed_memory_inside_the_block_and_work_is_unchanged():
    x = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0))
    outside = (x * 2).sum()
    with reused_memory() as applied:
        inside = [(x * 2).sum() for _ in range(3)]  # 16 MB blocks freed and allocated again
    assert applied == (platform.libc_ver()[0] == "glibc")
    assert all(torch.equal(value, outside) for value in inside)


def test_without_glibc_the_block_runs_unchanged(monkeypatch):
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    with reused_memory() as applied:
        value = torch.ones(3).sum()
    assert applied is False and float(value) == 3.0
