"""Stored results and bounded in-memory stores: what a long-running explorer server keeps, and how much."""

from __future__ import annotations

from pathlib import Path

import pytest

from tabconv.bounded import BoundedDict
from tabconv.resultstore import ResultStore


def test_a_bounded_dict_drops_the_least_recently_used_entry() -> None:
    recent = BoundedDict(2)
    recent["a"], recent["b"] = 1, 2
    assert recent["a"] == 1  # reading makes it the most recent
    recent["c"] = 3
    assert list(recent) == ["a", "c"] and recent.get("b") is None
    recent.setdefault("d", 4)
    assert list(recent) == ["c", "d"]
    with pytest.raises(ValueError, match="at least 1"):
        BoundedDict(0)


def test_results_survive_the_process_and_only_some_stay_in_memory(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, memory=4)
    for i in range(10):
        store.put({"kind": "test", "i": i}, {"rows": [i]})
    assert len(store) == 4
    later = ResultStore(tmp_path)  # another process: everything is on the disk
    assert [later.get({"kind": "test", "i": i}) for i in range(10)] == [{"rows": [i]} for i in range(10)]
    assert store.get({"kind": "test", "i": 0}) == {"rows": [0]} and len(store) == 4  # read back, still bounded
    assert store.get({"kind": "test", "i": 10}) is None
    assert store.get({"kind": "other", "i": 1}) is None  # the key is every part


def test_a_damaged_result_file_is_not_found_rather_than_trusted(tmp_path: Path) -> None:
    ResultStore(tmp_path).put({"kind": "test"}, [1, 2])
    (file,) = tmp_path.glob("*.json")
    file.write_text('{"parts": {"kind": "te')
    assert ResultStore(tmp_path).get({"kind": "test"}) is None
    file.write_text("[1, 2]")  # valid JSON, not a stored result
    assert ResultStore(tmp_path).get({"kind": "test"}) is None
