"""Priority masking, sensitivity, error propagation, greedy search and Pareto fronts on a real session."""

from __future__ import annotations

import copy

import pytest

from tabconv.config import Calibration
from tabconv.confirm import confirm
from tabconv.data import load_dataset
from tabconv.finetune import tuner
from tabconv.search import greedy_search, pareto_front, priority_masking, propagation_matrix, sensitivity
from tabconv.session import Session
from tabconv.settings import EXACT, LayerSetting
from tabconv.stats import mcnemar_p, wilson
from tests.helpers import model

TABLE = LayerSetting("table", 2, 8)
META = {"model": "tiny", "dataset": "digits", "num_classes": 10, "input_shape": [1, 32, 32], "sha256": "s"}


@pytest.fixture(scope="module")
def trained():
    from tabconv.train import train_model

    return train_model(model("tiny"), load_dataset("digits", "train"), epochs=5, batch_size=32, lr=0.2)


def _session(net, first: int, count: int | None) -> Session:
    """A session of `net` (a copy: sessions swap modules in) on test images first .. first + count - 1."""
    test = load_dataset("digits", "test")
    return Session(copy.deepcopy(net), META, load_dataset("digits", "train").head(128), test.skip(first).head(count),
                   Calibration(images=128, max_rows=4096))


@pytest.fixture(scope="module")
def session(trained):
    return _session(trained, 0, 150)


def test_priority_masking_sweeps_every_count_of_exact_layers(session):
    result = priority_masking(session, TABLE, min_retention=0.5)
    names = session.structure.names
    assert len(result.points) == len(names) + 1 and sorted(result.ranking) == sorted(names)
    for count, point in enumerate(result.points):
        exact = {n for n, s in point.settings.items() if not s.is_table}
        assert exact == set(result.ranking[:count])
    all_table = result.points[0]
    cosines = [all_table.errors[n].cosine for n in result.ranking]
    assert cosines == sorted(cosines)  # worst layer first
    assert result.points[-1].accuracy == session.baseline.accuracy
    feasible = [p for p in result.points if p.retention >= 0.5]
    assert result.best is min(feasible, key=lambda p: (p.flops_paper, -p.accuracy))


def test_isolated_ranking_uses_each_layer_alone(session):
    result = priority_masking(session, TABLE, rank_by="isolated")
    alone = {n: session.apply({n: TABLE}).metrics.errors[session.structure.names[-1]].cosine for n in result.ranking}
    assert [alone[n] for n in result.ranking] == sorted(alone.values())


def test_sensitivity_in_both_directions(session):
    rows = sensitivity(session, TABLE)
    assert [r["layer"] for r in rows] == session.structure.names
    for row in rows:
        only = session.history[row["only_table"]["config_id"]]
        assert only.table_layers == [row["layer"]]
        rest = session.history[row["only_exact"]["config_id"]]
        assert row["layer"] not in rest.table_layers and len(rest.table_layers) == len(rows) - 1
        assert row["only_table"]["flops_saved_paper"] > 0 and row["only_table"]["eval_images"] == 150
        test = rest.against(session.baseline)
        assert row["only_exact"]["p_value_vs_exact"] == test.p_value == mcnemar_p(test.only_first, test.only_second)
        assert row["only_exact"]["significant_vs_exact"] == test.significant
        assert row["only_exact"]["accuracy_ci95"] == list(wilson(rest.correct, 150))


def test_propagation_matrix_is_exact_before_the_approximated_layer(session):
    matrix = propagation_matrix(session, TABLE)
    names = matrix["layers"]
    assert len(matrix["cosine"]) == len(names) and all(len(r) == len(names) for r in matrix["cosine"])
    for i, row in enumerate(matrix["relative_error"]):
        assert all(v == 0 for v in row[:i]) and row[i] > 0
    assert len(matrix["current"]["cosine"]) == len(names)


def test_greedy_is_never_worse_than_priority(session):
    priority = priority_masking(session, TABLE, min_retention=0.8)
    greedy = greedy_search(session, TABLE, min_retention=0.8, max_evaluations=60)
    assert greedy.best is not None and greedy.best.retention >= 0.8
    assert greedy.best.flops_paper <= priority.best.flops_paper
    capped = greedy_search(session, TABLE, min_retention=0.8, max_storage_bytes=priority.best.paper.storage_bytes,
                           max_evaluations=30)
    assert capped.best.paper.storage_bytes <= priority.best.paper.storage_bytes


def test_pareto_front_is_non_dominated_and_sorted(session):
    points = session.history
    for cost in ("flops_paper", "flops_full", "storage_bytes"):
        front = pareto_front(points, cost)
        value = {"flops_paper": lambda m: m.flops_paper, "flops_full": lambda m: m.flops_full,
                 "storage_bytes": lambda m: m.paper.storage_bytes}[cost]
        assert [value(m) for m in front] == sorted(value(m) for m in front)
        assert all(a.accuracy < b.accuracy for a, b in zip(front, front[1:], strict=False))
        for m in points:  # nothing outside the front beats a front point on both axes
            assert not any(value(m) < value(f) and m.accuracy > f.accuracy for f in front)


def test_confirmation_backs_off_until_the_target_holds_on_other_images(trained):
    """A choice that misses its target on the confirmation images loses table layers, the one whose return to exact
    gains most on the search images first, until the target holds there; a choice that holds is kept."""
    search, other = _session(trained, 0, 150), _session(trained, 150, None)
    chosen = search.apply(search.uniform(TABLE), label="every layer").metrics
    first = other.apply(dict(chosen.settings)).metrics
    assert first.retention < 0.99, "the test needs a choice that loses accuracy"
    target = (first.retention + 1) / 2
    checked = confirm(search, other, chosen, target)
    assert checked.chosen is chosen and checked.chosen_confirmed.accuracy == first.accuracy
    assert checked.backoffs and checked.confirmed.retention >= target
    assert all(b.confirmed.retention < target for b in checked.backoffs[:-1])
    before = chosen
    for b in checked.backoffs:
        assert b.layer in before.table_layers and set(b.searched.table_layers) == set(before.table_layers) - {b.layer}
        gains = {layer: search.apply({**before.settings, layer: EXACT}).metrics.accuracy
                 for layer in before.table_layers}
        assert gains[b.layer] == max(gains.values())
        assert b.confirmed.settings == b.searched.settings and b.confirmed.eval_images == len(other.eval_set)
        before = b.searched
    assert checked.searched is checked.backoffs[-1].searched
    kept = confirm(search, other, chosen, first.retention)
    assert not kept.backoffs and kept.confirmed.accuracy == first.accuracy and kept.searched is chosen


def test_one_session_can_search_on_half_its_images_and_confirm_on_the_other(session):
    """The explorer's way: a search judged on the first half of a session's images, confirmed on the second half,
    both read from the same evaluations' per-image record."""
    first, second = slice(0, 75), slice(75, 150)
    result = greedy_search(session, TABLE, 0.7, max_evaluations=10, images=first)
    every = [session.apply(dict(m.settings)).metrics for m in result.points]  # recalled, not evaluated again
    assert all(a is b for a, b in zip(every, result.points, strict=True))
    half = result.best.on_images(first, session.baseline)
    correct, base = result.best.correct_images[:75], session.baseline.correct_images[:75]
    assert (half.eval_images, half.accuracy, half.baseline_accuracy) == (75, correct.mean(), base.mean())
    assert half.retention >= 0.7 and half.id == result.best.id
    feasible_on_half = [m for m in result.points if m.on_images(first, session.baseline).retention >= 0.7]
    assert result.best in feasible_on_half and min(m.flops_paper for m in feasible_on_half) == result.best.flops_paper
    checked = confirm(session, session, result.best, 0.95, search_images=first, confirmation_images=second)
    assert checked.chosen.eval_images == checked.chosen_confirmed.eval_images == 75
    assert checked.chosen_confirmed.accuracy == result.best.correct_images[75:].mean()
    assert checked.confirmed.retention >= 0.95
    for b in checked.backoffs:
        assert b.searched.eval_images == b.confirmed.eval_images == 75 and b.searched.id == b.confirmed.id


def test_a_confirmation_that_fine_tunes_judges_and_backs_off_on_fine_tuned_tables(trained):
    """With `tune`, the choice and every back-off are fine-tuned (checks on the search images) before the target is
    judged on the confirmation images; the exact network, which has nothing to tune, ends any back-off."""
    search, other = _session(trained, 0, 150), _session(trained, 150, None)
    chosen = search.apply(search.uniform(TABLE), label="every layer").metrics
    tune = tuner(search, other, steps=3, images=64)
    checked = confirm(search, other, chosen, 1.0, tune=tune)  # only the exact network surely holds 100%
    assert checked.chosen is not checked.chosen_tuned and checked.chosen_tuned.tables_sha256
    assert checked.chosen_confirmed.tables_sha256 == checked.chosen_tuned.tables_sha256
    assert other.given(checked.chosen_confirmed).finetune["held_out_from"] == "digits test images 0-149"
    assert checked.confirmed.retention >= 1.0
    for b in checked.backoffs:
        assert b.confirmed.settings == b.searched.settings and b.confirmed.eval_images == len(other.eval_set)
        assert bool(b.confirmed.tables_sha256) == bool(b.confirmed.table_layers)  # tuned unless exact
        assert b.confirmed.tables_sha256 == b.searched.tables_sha256
