"""Measured latency as a cost axis: the per-layer table (measured once, kept on disk), the estimates a session
attaches to every configuration, and the search that minimises it."""

from __future__ import annotations

import json

import pytest

from tabconv.config import Calibration
from tabconv.data import load_dataset
from tabconv.latencytable import LatencyTable
from tabconv.metrics import Metrics
from tabconv.search import flops, greedy_search, pareto_front
from tabconv.session import Session
from tabconv.settings import EXACT, LayerSetting
from tests.helpers import model

TABLE = LayerSetting("table", 2, 8)
META = {"model": "tiny", "dataset": "digits", "num_classes": 10, "input_shape": [1, 32, 32], "sha256": "s"}


@pytest.fixture(scope="module")
def session():
    train = load_dataset("digits", "train")
    return Session(model("tiny"), META, train.head(128), load_dataset("digits", "test").head(100),
                   Calibration(images=128, max_rows=4096))


class Counting(LatencyTable):
    """A latency table that counts its timings (each is a real measurement)."""

    timed = 0

    def _median(self, run) -> float:
        Counting.timed += 1
        return super()._median(run)


def test_each_layer_and_setting_is_measured_once_and_kept_on_disk(session, tmp_path):
    Counting.timed = 0
    table = Counting(tmp_path, batch=4, repeats=2, warmup=1)
    settings = session.uniform(TABLE)
    first = table.estimate(session.model, session.structure, settings)
    measured = Counting.timed
    layers = len(session.structure.layers)
    assert measured == 2 * layers + 1  # every layer exact and tabled, and the rest of the network once
    assert all(ms > 0 for ms in [*first.exact_ms.values(), *first.layer_ms.values()]) and first.other_ms >= 0
    again = Counting(tmp_path, batch=4, repeats=2, warmup=1).estimate(session.model, session.structure, settings)
    assert Counting.timed == measured and again == first  # a fresh table reads latency.json instead of timing
    stored = json.loads((tmp_path / "latency.json").read_text())
    assert len(stored["entries"]) == measured
    Counting(tmp_path, batch=8, repeats=2, warmup=1).exact_ms(session.model, session.structure.layers[0])
    assert Counting.timed == measured + 1  # another batch size is another entry


def test_a_configuration_is_the_sum_of_its_layers_and_the_rest(session, tmp_path):
    table = LatencyTable(tmp_path, batch=4, repeats=2, warmup=1)
    names = session.structure.names
    estimate = table.estimate(session.model, session.structure, {names[0]: TABLE})
    assert estimate.layer_ms[names[0]] == table.table_ms(session.model, session.structure.layer(names[0]), TABLE)
    assert all(estimate.layer_ms[n] == estimate.exact_ms[n] for n in names[1:])
    assert estimate.total_ms == pytest.approx(estimate.other_ms + sum(estimate.layer_ms.values()))
    assert estimate.speedup == pytest.approx(estimate.baseline_ms / estimate.total_ms)
    row = estimate.to_dict()
    assert row["latency_ms"] == estimate.total_ms and set(row["latency_layers_ms"]) == set(names)


class Scripted(LatencyTable):
    """Fixed per-layer times, so that a search's choice can be checked: exact layers 2 ms, tables 1 ms, except
    the first layer, whose table is slower (3 ms) than its exact layer."""

    def exact_ms(self, model, info) -> float:
        return 2.0

    def table_ms(self, model, info, setting) -> float:
        return 3.0 if info.name == self.slow else 1.0

    def other_ms(self, model, structure) -> float:
        return 0.5


def test_the_session_times_every_configuration_and_each_row_says_which_layers_are_slower(session):
    table = Scripted()
    table.slow = session.structure.names[0]
    session.enable_latency(table)
    assert session.baseline.latency is not None  # configurations evaluated before are timed too
    metrics = session.apply(session.uniform(TABLE), label="all tables").metrics
    n = len(session.structure.names)
    assert metrics.latency_ms == pytest.approx(0.5 + 3.0 + (n - 1) * 1.0)
    assert metrics.latency.slower_layers(metrics.table_layers) == [table.slow]
    rows = {r["name"]: r for r in metrics.layer_rows(session.structure, 128)}
    assert rows[table.slow]["slower_than_exact"] and rows[table.slow]["latency_ms"] == 3.0
    assert not any(rows[name]["slower_than_exact"] for name in session.structure.names[1:])
    assert metrics.to_dict()["latency_ms"] == metrics.latency_ms


def test_the_latency_search_takes_a_slower_table_layer_back_to_exact(session):
    table = Scripted()
    table.slow = session.structure.names[0]
    session.enable_latency(table)
    result = greedy_search(session, TABLE, min_retention=0.0, convention="latency", max_evaluations=40)
    best = result.best
    assert best is not None and not best.settings[table.slow].is_table
    assert best.latency_ms == min(m.latency_ms for m in result.points)
    assert all(best.settings[n].is_table for n in session.structure.names[1:])
    assert pareto_front(result.points, "latency_ms")[0].latency_ms == best.latency_ms


def test_the_latency_convention_refuses_metrics_that_were_not_timed(session):
    untimed = Metrics({}, 1.0, 1, 1.0, session.baseline.paper, session.baseline.full, session.baseline.baseline,
                      {}, b"\x80")
    with pytest.raises(ValueError, match="enable_latency"):
        flops(untimed, "latency")
    assert flops(untimed, "paper") == session.baseline.flops_paper


def test_exact_settings_time_the_exact_layer(session, tmp_path):
    table = LatencyTable(tmp_path, batch=2, repeats=1, warmup=0)
    info = session.structure.layers[1]
    assert table.layer_ms(session.model, info, EXACT) == table.exact_ms(session.model, info)
