"""A session's sweep results kept for reuse, with their keys in one place.

The propagation matrix and the sensitivity rows are plain data: they go to a ResultStore on disk, keyed by what
the session's results depend on (tabconv.session.Session.result_key), so a later process shows them without
evaluating anything. The configurations a sweep evaluated (their ids), and the priority-masking points, are only
valid in this process: they are kept in memory, the most recent `memory` of them, and the disk copy drops the ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tabconv.bounded import BoundedDict
from tabconv.metrics import Metrics
from tabconv.resultstore import ResultStore
from tabconv.search import SearchResult
from tabconv.session import Session
from tabconv.settings import LayerSetting

MEMORY_SWEEPS = 32  # sweep and search results kept in memory (rankings, rows and config ids: a few KiB each)
SENSITIVITY_VERSION = 2  # 2: rows with intervals and p-values
SIDES = ("only_table", "only_exact")  # the two directions of a sensitivity row
PROPAGATION_FIELDS = ("layers", "cosine", "relative_error")


class SweepStore:
    """Sweep results of one session: in memory with their configuration ids, on disk (where they are plain data)
    without them. Each getter computes with `run` only when nothing is stored (None: only look)."""

    def __init__(self, session: Session, store: ResultStore, memory: int = MEMORY_SWEEPS) -> None:
        self.session = session
        self.store = store
        self._memory = BoundedDict(memory)

    def propagation(self, setting: LayerSetting, run: Callable[[], dict[str, Any]] | None = None
                    ) -> dict[str, Any] | None:
        """{'layers', 'cosine', 'relative_error'}: rows 'only layer i tabled' x columns 'output of every layer'."""
        parts = self.session.result_key("propagation", setting=setting.to_dict())
        found = self.store.get(parts)
        if found is None and run is not None:
            result = run()
            found = {key: result[key] for key in PROPAGATION_FIELDS}
            self.store.put(parts, found)
        return found

    def sensitivity(self, setting: LayerSetting,
                    run: Callable[[], tuple[list[dict[str, Any]], Metrics]] | None = None) -> dict[str, Any] | None:
        """{'rows', 'all_tables_retention'}: both directions per layer. `run` gives the rows and the every-layer
        configuration they compare with; rows computed in this process keep their configuration ids."""
        key = ("sensitivity", setting)
        parts = {**self.session.result_key("sensitivity", setting=setting.to_dict()), "version": SENSITIVITY_VERSION}
        if key in self._memory:
            return self._memory[key]
        if run is None:
            return self.store.get(parts)
        rows, every = run()
        self._memory[key] = {"rows": rows, "all_tables_retention": every.retention}
        self.store.put(parts, {"rows": [_without_ids(row) for row in rows], "all_tables_retention": every.retention})
        return self._memory[key]

    def masking(self, setting: LayerSetting, rank_by: str, run: Callable[[], SearchResult] | None = None
                ) -> dict[str, Any] | None:
        """{'ranking', 'ids'}: priority masking's layer ranking and its points' configuration ids (point n keeps the
        n worst-ranked layers exact), from this process only."""
        key = ("priority", setting, rank_by)
        if key not in self._memory and run is not None:
            result = run()
            self._memory[key] = {"ranking": result.ranking, "ids": [m.id for m in result.points]}
        return self._memory.get(key)


def _without_ids(row: dict[str, Any]) -> dict[str, Any]:
    """A sensitivity row for the disk: configuration ids are only valid in the process that made them."""
    return {**row, **{side: {k: v for k, v in row[side].items() if k != "config_id"} for side in SIDES}}
