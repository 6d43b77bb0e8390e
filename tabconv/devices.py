"""Device selection: the CPU here, a CUDA device where one is present."""

from __future__ import annotations

import torch


def resolve_device(name: str | None = None) -> torch.device:
    """'auto' (or None) picks CUDA when available; an unavailable device is a clear error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device
