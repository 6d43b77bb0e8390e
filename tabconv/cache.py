"""Content-addressed, atomic, locked store of built tables under cached_tables/.

An entry's key is the sha256 of everything its tables depend on (checkpoint weights, layer, C, K,
encoder, table dtype, calibration data and mode, seed and, in sequential mode, every upstream
layer's setting). A truncated or corrupt entry is detected, discarded and rebuilt; a file lock
makes two processes building the same entry produce one good file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from tabconv.atomic import atomic_write
from tabconv.quantizer import ProductQuantizer

ENTRY_FORMAT = "tabconv-tables"
ENTRY_VERSION = 1
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "cached_tables"


def default_root() -> Path:
    """$TABCONV_CACHE, else the repository's cached_tables/."""
    return Path(os.environ.get("TABCONV_CACHE") or DEFAULT_ROOT)


def cache_key(parts: dict[str, Any]) -> str:
    """Stable hash of a JSON-able description of what the tables depend on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    size_bytes: int
    layer: str
    description: dict[str, Any]


class TableCache:
    """get_or_build(key parts, build) -> a fitted ProductQuantizer, built at most once per key."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.hits = 0
        self.builds = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def get_or_build(self, parts: dict[str, Any], build: Callable[[], ProductQuantizer]) -> ProductQuantizer:
        key = cache_key(parts)
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            quantizer = self._read(path, key)
            if quantizer is not None:
                self.hits += 1
                return quantizer
            quantizer = build()
            self._write(path, key, parts, quantizer)
            self.builds += 1
            return quantizer

    def _read(self, path: Path, key: str) -> ProductQuantizer | None:
        """The entry's quantizer, or None when absent or damaged (a damaged file is removed)."""
        if not path.exists():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry.get("format") != ENTRY_FORMAT or entry.get("version") != ENTRY_VERSION or entry.get("key") != key:
                raise ValueError("not a table entry for this key")
            quantizer = ProductQuantizer(**entry["params"])
            quantizer.load_state_dict(entry["state"])
            return quantizer
        except Exception:  # any unreadable entry is rebuilt rather than trusted
            path.unlink(missing_ok=True)
            return None

    def _write(self, path: Path, key: str, parts: dict[str, Any], quantizer: ProductQuantizer) -> None:
        entry = {"format": ENTRY_FORMAT, "version": ENTRY_VERSION, "key": key,
                 "description": json.dumps(parts, sort_keys=True, default=str),
                 "params": quantizer.get_params(),
                 "state": {k: v.detach().cpu() for k, v in quantizer.state_dict().items()}}
        atomic_write(path, lambda handle: torch.save(entry, handle))

    def entries(self) -> list[CacheEntry]:
        """Every entry on disk with its size and what it was built for (damaged ones are listed as such)."""
        found = []
        for path in sorted(self.root.glob("*/*.pt")):
            try:
                entry = torch.load(path, map_location="cpu", weights_only=True)
                description = json.loads(entry["description"])
            except Exception:
                description = {"damaged": True}
            found.append(CacheEntry(path.stem, path, path.stat().st_size, str(description.get("layer", "?")),
                                    description))
        return found

    def clear(self) -> int:
        """Remove every entry (and stale lock/temp files); returns the number of entries removed."""
        removed = 0
        for path in list(self.root.glob("*/*")):
            if path.suffix == ".pt":
                removed += 1
            if path.is_file():
                path.unlink(missing_ok=True)
        for folder in self.root.glob("*"):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return removed
