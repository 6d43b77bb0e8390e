"""Sweep results kept for reuse: computed once, on disk as plain data (ids dropped), in memory with their ids."""

from __future__ import annotations

import pytest

from tabconv import search
from tabconv.config import Calibration
from tabconv.data import load_dataset
from tabconv.resultstore import ResultStore
from tabconv.session import Session
from tabconv.settings import LayerSetting
from tabconv.sweepstore import SweepStore
from tests.helpers import model

META = {"model": "tiny", "dataset": "digits", "num_classes": 10, "input_shape": [1, 32, 32], "sha256": "t"}
TABLE = LayerSetting("table", 4, 8)


@pytest.fixture(scope="module")
def session() -> Session:
    train, test = load_dataset("digits", "train").head(64), load_dataset("digits", "test").head(40)
    return Session(model("tiny"), META, train, test, Calibration(images=64, max_rows=2048))


def test_each_sweep_is_computed_once_and_a_new_store_finds_the_plain_data(session: Session, tmp_path) -> None:
    sweeps = SweepStore(session, ResultStore(tmp_path))
    calls = []

    def sensitivity():
        calls.append("sensitivity")
        rows = search.sensitivity(session, TABLE)
        return rows, session.apply(session.uniform(TABLE)).metrics

    assert sweeps.sensitivity(TABLE) is None  # only looks
    first = sweeps.sensitivity(TABLE, sensitivity)
    assert sweeps.sensitivity(TABLE, sensitivity) is first and calls == ["sensitivity"]
    assert all("config_id" in row["only_table"] for row in first["rows"])
    later = SweepStore(session, ResultStore(tmp_path))  # another process: the disk copy, without the ids
    stored = later.sensitivity(TABLE)
    assert stored["all_tables_retention"] == first["all_tables_retention"]
    assert [row["layer"] for row in stored["rows"]] == [row["layer"] for row in first["rows"]]
    assert not any("config_id" in row[side] for row in stored["rows"] for side in ("only_table", "only_exact"))

    matrix = sweeps.propagation(TABLE, lambda: search.propagation_matrix(session, TABLE))
    assert set(matrix) == {"layers", "cosine", "relative_error"} and later.propagation(TABLE) == matrix

    assert sweeps.masking(TABLE, "cumulative") is None
    masked = sweeps.masking(TABLE, "cumulative", lambda: search.priority_masking(session, TABLE))
    assert masked["ids"][0] == session.apply(session.uniform(TABLE)).metrics.id
    assert sweeps.masking(TABLE, "cumulative") == masked and later.masking(TABLE, "cumulative") is None
