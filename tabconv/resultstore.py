"""Results that are plain data (a propagation matrix, sensitivity rows), kept on disk as JSON keyed by everything
they depend on, so that a later process shows them without evaluating anything again.

Beside the table cache (`TableCache.root / "explorer"` in the explorer); the most recently used results are also
kept in memory, a bounded number of them, so a server with many sweeps stays small.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabconv.atomic import atomic_write_text
from tabconv.bounded import BoundedDict
from tabconv.cache import cache_key

MEMORY_RESULTS = 32  # results kept in memory per store (a propagation matrix of a deep network is ~100 KiB)


class ResultStore:
    """JSON results on disk, keyed by their parts (hashed like table-cache keys); the `memory` most recently used
    ones also in memory (the disk keeps them all). A missing or damaged file is simply not found."""

    def __init__(self, root: str | Path, memory: int = MEMORY_RESULTS) -> None:
        self.root = Path(root)
        self._memory = BoundedDict(memory)

    def get(self, parts: dict[str, Any]) -> Any | None:
        """The stored value for these parts, or None."""
        key = cache_key(parts)
        if key not in self._memory:
            try:
                self._memory[key] = json.loads(self._path(key).read_text())["value"]
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return self._memory[key]

    def put(self, parts: dict[str, Any], value: Any) -> None:
        """Store a JSON-able value (written atomically, with its parts beside it for whoever reads the file)."""
        key = cache_key(parts)
        self._memory[key] = value
        atomic_write_text(self._path(key), json.dumps({"parts": parts, "value": value}, default=str))

    def __len__(self) -> int:
        """Results held in memory."""
        return len(self._memory)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"
