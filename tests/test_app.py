"""The explorer's flows, headless (streamlit.testing AppTest), on the embedded default: ResNet-18 on digits.

AppTest runs the page in this process, so the cached Session is shared by every test here (its history
only grows); each test therefore checks what its own action changed. Chart clicks are simulated through
session state, as AppTest cannot click a plotly point.
"""

from __future__ import annotations

import json
import re

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from explorer import charts, editing
from explorer.panels import speed, transfer
from explorer.workbench import open_workbench
from tabconv.settings import EXACT, LayerSetting
from tabconv.stats import mcnemar_p, p_text
from tests.conftest import APP
from tests.helpers import no_failure

TABLE = LayerSetting("table")


def _metric(at: AppTest, prefix: str) -> str:
    return next(m.value for m in at.metric if m.label.startswith(prefix))


def _history_size(at: AppTest) -> int:
    label = next(e.label for e in at.expander if e.label.startswith("Run history"))
    return int(re.search(r"\((\d+) configurations", label).group(1))


def _current_label(at: AppTest) -> str:
    return next(m.value for m in at.markdown if m.value.startswith("**Current configuration"))


def test_first_load_shows_the_default_with_every_part_of_the_core_loop(app: AppTest) -> None:
    assert any("ResNet-18" in c.value and "digits" in c.value for c in app.caption)
    assert _metric(app, "Accuracy (200 images)")  # the baseline and the live metric name their image count
    assert "start: every layer tabled" in _current_label(app)
    for prefix in ("Retention", "FLOPs, paper", "FLOPs, full", "Storage"):
        assert _metric(app, prefix)
    assert len(app.get("plotly_chart")) >= 4  # two trade-off plots, the heatmap, the teaching view's charts
    assert [b.label for b in app.download_button] == ["Export configuration", "Export model (zip)"]
    editor = app.data_editor[0].value
    assert list(editor["layer"][:2]) == ["conv1", "layer1.0.conv1"] and editor["table"].all()
    assert any(m.value.startswith("**4 · The result.**") for m in app.markdown)  # the teaching view


def test_a_relaunch_reuses_tables_and_the_heatmap_from_disk(app: AppTest) -> None:
    st.cache_resource.clear()  # as in a new server process: no Session in memory, only the disk caches
    again = AppTest.from_file(str(APP), default_timeout=900)
    again.run()
    no_failure(again)
    assert again.session_state["last_apply"]["fitted"] == 0
    assert _history_size(again) == 2  # baseline and the starting configuration: no sweep evaluations
    assert any(c.value.startswith("Rows: one layer tabled alone") for c in again.caption)


def test_the_sensitivity_sweep_draws_both_directions(app: AppTest) -> None:
    if any(b.key == "run_sensitivity" for b in app.button):  # not yet on disk in this test session
        app.button(key="run_sensitivity").click().run()
    no_failure(app)
    assert any(c.value.startswith("Retention on 200 test images") for c in app.caption)


def test_toggling_a_layer_changes_the_metrics_and_reuses_everything_before_it(app: AppTest) -> None:
    app.selectbox(key="group_target").set_value("fc")  # first fc, so that the pair below is a new configuration
    app.button(key="group_exact").click().run()
    before = (_metric(app, "FLOPs, paper"), _metric(app, "Storage"))
    app.selectbox(key="group_target").set_value("layer4.1.conv2")
    app.button(key="group_exact").click().run()
    no_failure(app)
    assert "layer4.1.conv2 → exact" in _current_label(app)
    assert (_metric(app, "FLOPs, paper"), _metric(app, "Storage")) != before
    done = app.session_state["last_apply"]
    assert done["fitted"] == 0 and 0 < done["recomputed"] < done["nodes"] / 4  # only the network's tail re-ran
    row = app.data_editor[0].value.set_index("layer").loc["layer4.1.conv2"]
    assert not row["table"]


def test_changing_c_and_k_of_one_layer_rebuilds_only_that_layer(app: AppTest) -> None:
    app.selectbox(key="group_target").set_value("layer3.1.conv2")
    app.number_input(key="group_c").set_value(4)
    app.number_input(key="group_k").set_value(32)
    app.button(key="group_table").click().run()
    no_failure(app)
    assert app.session_state["last_apply"]["fitted"] == 1
    row = app.data_editor[0].value.set_index("layer").loc["layer3.1.conv2"]
    assert (row["C"], row["K"]) == ("4", "32")
    assert any("fitted 1 layer table" in c.value for c in app.caption)


def test_priority_masking_and_search_add_configurations(app: AppTest) -> None:
    """Checked on what these two actions produce, not on the history's growth: the process's Session may have
    run the same sweep before (another test file's tour), and then recalls its points instead of adding them."""
    wb = open_workbench(app.session_state["spec"])
    names = wb.structure.names
    app.slider(key="mask_exact").set_value(3)
    app.button(key="run_masking").click().run()
    no_failure(app)
    assert "priority: 3 worst exact" in _current_label(app)
    sweep = wb.sweeps.masking(app.session_state["defaults"], app.session_state["mask_rank"])
    assert len(sweep["ids"]) == len(names) + 1 and app.session_state["current_id"] == sweep["ids"][3]
    masked = wb.metrics(sweep["ids"][3])
    assert {n for n, s in masked.settings.items() if not s.is_table} == set(sweep["ranking"][:3])  # 3 worst exact
    assert set(sweep["ids"]) <= {0, *app.session_state["seen"]}  # every point is in this tab's history and plots
    assert any(c.value.startswith(f"{len(names) + 1} configurations on the plots") for c in app.caption)
    app.number_input(key="search_budget").set_value(3)
    app.slider(key="search_target").set_value(50)
    app.button(key="run_search").click().run()
    no_failure(app)
    found = next(s.value for s in app.success if s.value.startswith("The search looked at"))
    evaluated = int(re.match(r"The search looked at (\d+) configurations", found).group(1))
    assert len(names) + 1 <= evaluated <= len(names) + 1 + 3  # the masking points it starts from + its budget
    greedy = evaluated - len(names) - 1
    assert f"the {len(names) + 1} points of the masking sweep it starts from, then {greedy} greedy moves" in found
    shown = wb.metrics(app.session_state["current_id"])  # the confirmed choice is shown
    half = len(wb.session.eval_set) // 2
    on_second = shown.on_images(slice(half, None), wb.session.baseline)
    assert on_second.retention >= 0.5
    assert found.endswith(f"Loaded #{shown.id} ({len(shown.table_layers)} table layers).")
    assert f"Chosen on images 1-{half}" in found and f"on images {half + 1}-{len(wb.session.eval_set)}" in found
    assert any(c.value.startswith("It chooses on the first half of the") for c in app.caption)


def test_a_search_can_fine_tune_what_it_confirms(app: AppTest) -> None:
    """With "Fine-tune what it confirms" the search asks its own retention of untuned tables, and what it loads is
    the fine-tuned choice, judged on the second half of the images; the outcome says both."""
    wb = open_workbench(app.session_state["spec"])
    app.checkbox(key="search_finetune").check().run()
    app.slider(key="search_untuned").set_value(50)
    app.slider(key="search_target").set_value(50)
    app.number_input(key="search_tune_seconds").set_value(5)
    app.number_input(key="search_budget").set_value(2)
    app.button(key="run_search").click().run()
    no_failure(app)
    found = next(s.value for s in app.success if s.value.startswith("The search looked at"))
    shown = wb.metrics(app.session_state["current_id"])
    assert shown.tables_sha256 and shown.label.startswith("fine-tuned")  # the fine-tuned tables are what loaded
    half = len(wb.session.eval_set) // 2
    on_second = shown.on_images(slice(half, None), wb.session.baseline)
    assert f"fine-tuned, and {on_second.retention:.1%} on images {half + 1}-" in found, found
    assert wb.session.given(shown).finetune["held_out_from"].endswith(f"test images 0-{half - 1}")
    app.checkbox(key="search_finetune").uncheck().run()


def test_the_masking_slider_moves_only_by_hand_and_apply_always_says_what_it_did(app: AppTest) -> None:
    """One control: a search, a plot click or a history load leaves the slider where the user put it, moving it
    loads nothing, and every press of Apply says what it loaded, also when the sweep was already computed."""
    layers = len(open_workbench(app.session_state["spec"]).structure.names)
    app.slider(key="mask_exact").set_value(layers - 1)
    app.number_input(key="search_budget").set_value(2)
    app.slider(key="search_target").set_value(50)
    app.button(key="run_search").click().run()
    no_failure(app)
    assert app.slider(key="mask_exact").value == layers - 1  # the search loaded another configuration
    app.session_state["load_request"] = 0  # a plot click or a history load
    app.run()
    assert app.slider(key="mask_exact").value == layers - 1
    app.slider(key="mask_exact").set_value(2).run()
    no_failure(app)
    assert app.session_state["current_id"] == 0  # moving the slider alone loads nothing
    app.button(key="run_masking").click().run()
    no_failure(app)
    assert "priority: 2 worst exact" in _current_label(app)
    app.button(key="run_masking").click().run()  # pressed again: the sweep is there, the point on screen
    no_failure(app)
    said = [s.value for s in app.success if s.value.startswith("Applied priority masking")]
    assert len(said) == 1 and "2 worst layer(s) exact" in said[0], said
    assert "from the sweep already computed on this server (no new evaluation)" in said[0]
    assert said[0].endswith("It was already on screen.")


def test_measuring_speed_shows_its_own_box_apart_from_the_counted_cards(app: AppTest) -> None:
    app.radio(key="speed_batch").set_value(1)
    app.button(key="run_speed").click().run()
    no_failure(app)
    current = app.session_state["current_id"]
    timed = app.session_state["speed"][current]
    box = next(m.value for m in app.markdown if m.value.startswith("**Measured on this machine"))
    assert box == (f"**Measured on this machine (median of {speed.REPEATS} runs, batch 1):** exact "
                   f"{timed.exact_ms['pytorch']:.2f} ms, tabled {timed.tabled_ms['pytorch']:.2f} ms, "
                   f"{timed.tabled_ms['pytorch'] / timed.exact_ms['pytorch']:.2f}× — timings vary with load")
    assert timed.batch == 1 and timed.exact_ms["pytorch"] > 0 and timed.tabled_ms["pytorch"] > 0
    assert not any("easured" in m.label for m in app.metric)  # the counted cards stay counts
    app.session_state["load_request"] = 0  # another configuration: its speed is not measured yet
    app.run()
    no_failure(app)
    assert not any(m.value.startswith("**Measured on this machine") for m in app.markdown)


def test_every_configuration_shows_its_measured_latency_beside_the_counts(app: AppTest) -> None:
    """Measured time is an axis of its own: the current configuration says it (and warns when it is slower than
    exact), the per-layer table compares measured with counted, and the plot can use it."""
    latency = open_workbench(app.session_state["spec"]).metrics(app.session_state["current_id"]).latency
    assert latency is not None and latency.batch == 64
    said = [e.value for e in app.caption if "Latency on this machine" in e.value]  # a caption: no box moves the plots
    assert len(said) == 1 and f"{latency.total_ms:.3g} ms" in said[0]
    assert (latency.speedup < 1) == ("runs **slower than the exact network**" in said[0])
    editor = app.data_editor[0].value
    assert (editor["ms now"] > 0).all() and (editor["ms exact"] > 0).all()
    assert list(editor["measured ×"]) == pytest.approx(list(editor["ms now"] / editor["ms exact"]))
    slower = set(latency.slower_layers(list(editor["layer"])))
    assert {r["layer"] for _, r in editor.iterrows() if "slower tabled than exact" in r["warning"]} == slower
    app.segmented_control(key="plot_convention").set_value("latency").run()
    no_failure(app)
    titles = [json.loads(c.proto.spec)["layout"]["xaxis"]["title"]["text"] for c in app.get("plotly_chart")[:1]]
    assert titles[0].startswith("Latency measured on this CPU (ms per batch of 64")


def test_clicking_a_point_loads_that_configuration(app: AppTest) -> None:
    app.session_state["load_request"] = 0  # what a click on the baseline's star leaves behind
    app.run()
    no_failure(app)
    assert app.session_state["current_id"] == 0
    assert "baseline (exact)" in _current_label(app)


def test_export_then_import_round_trips(app: AppTest) -> None:
    app.selectbox(key="group_target").set_value("stage:layer2")
    app.button(key="group_exact").click().run()
    exported_id = app.session_state["current_id"]
    exported = next(c.value for c in app.code if '"schema": "tabconv-config"' in c.value)
    app.button(key="all_tables").click().run()
    assert app.session_state["current_id"] != exported_id
    app.file_uploader(key="import_file").set_value(("mine.json", exported.encode(), "application/json")).run()
    no_failure(app)
    assert any("mine.json** is valid" in s.value for s in app.success)
    recorded = r"Recorded in the file: accuracy \d+\.\d\d% \(95% CI [\d.]+-[\d.]+%, 200 images\)\."
    assert any(re.fullmatch(recorded, c.value) for c in app.caption), [c.value for c in app.caption]
    app.button(key="import_load").click().run()
    no_failure(app)
    assert app.session_state["current_id"] == exported_id
    assert json.loads(exported)["layers"]["layer2.0.conv1"]["mode"] == "exact"


def test_a_configuration_made_for_another_checkpoint_can_be_retargeted(app: AppTest) -> None:
    """Refused as it stands (its checkpoint differs), it is offered with tables rebuilt from the checkpoint open
    here; the same layer settings then evaluate to the configuration this session would give them."""
    app.selectbox(key="group_target").set_value("stage:layer3")
    app.button(key="group_exact").click().run()
    here = app.session_state["current_id"]
    config = json.loads(next(c.value for c in app.code if '"schema": "tabconv-config"' in c.value))
    config["checkpoint_sha256"] = "0" * 64
    app.button(key="all_tables").click().run()
    app.file_uploader(key="import_file").set_value(("theirs.json", json.dumps(config).encode(), "application/json"))
    app.run()
    no_failure(app)
    warned = [w.value for w in app.warning if "theirs.json** was made for another checkpoint" in w.value]
    assert len(warned) == 1 and "000000000000" in warned[0] and "rebuilt from the checkpoint open here" in warned[0]
    assert not any("theirs.json" in e.value for e in app.error)
    app.button(key="import_retarget").click().run()
    no_failure(app)
    assert app.session_state["current_id"] == here  # the same settings: the configuration evaluated before


@pytest.mark.parametrize(("content", "message"), [
    (b"{not json", "not valid JSON"),
    (b'{"schema": "something-else"}', "not a TabConv configuration file"),
    (b"\xff\xfe\x00", "not a UTF-8 text file"),
])
def test_a_bad_upload_shows_a_specific_error(app: AppTest, content: bytes, message: str) -> None:
    app.file_uploader(key="import_file").set_value(("bad.json", content, "application/json")).run()
    assert not app.exception
    said = [e.value for e in app.error if message in e.value]
    assert len(said) == 1 and said[0].endswith(transfer.IMPORT_WAY_FORWARD) and "\n" not in said[0], said


def test_a_configuration_with_an_unknown_layer_is_refused_by_name(app: AppTest) -> None:
    config = json.loads(next(c.value for c in app.code if '"schema": "tabconv-config"' in c.value))
    config["layers"]["layer9.conv1"] = {"mode": "table"}
    app.file_uploader(key="import_file").set_value(("x.json", json.dumps(config).encode(), "application/json")).run()
    assert any("layer9.conv1" in e.value for e in app.error)


def test_a_bad_checkpoint_upload_is_refused_with_its_reason(app: AppTest) -> None:
    current = app.session_state["current_id"]
    app.file_uploader(key="choose_upload").set_value(("mine.pt", b"not a checkpoint", "application/octet-stream"))
    next(b for b in app.button if b.label == "Open").click().run()
    assert not app.exception
    errors = [e.value for e in app.error]
    assert any("mine.pt: not a PyTorch checkpoint" in e and "python -m tabconv train" in e for e in errors), errors
    assert not any("uploads" in e for e in errors), errors  # the user's file name, not where the upload is kept
    # the workbench opened before stays on screen, as it was
    assert any("Still showing the model opened before" in i.value for i in app.info)
    assert "Per-layer configuration (forward order)" in [h.value for h in app.subheader]
    assert app.session_state["current_id"] == current


def test_an_unavailable_dataset_explains_how_to_get_it(app: AppTest) -> None:
    app.selectbox(key="choose_dataset").set_value("cifar100")
    next(b for b in app.button if b.label == "Open").click().run()
    assert not app.exception
    message = next(e.value for e in app.error if "How to get them" in e.value)
    assert "Data root" in message and "--data-root" not in message and "download=False" not in message


def test_a_missing_checkpoint_is_trained_from_the_page(app: AppTest) -> None:
    app.selectbox(key="choose_model").set_value("tiny")
    next(b for b in app.button if b.label == "Open").click().run()
    assert any("No checkpoint for tiny CNN" in i.value for i in app.info)
    app.button(key="train").click().run()
    no_failure(app)
    assert any("tiny CNN" in c.value for c in app.caption)
    assert "start: every layer tabled" in _current_label(app)


def test_edits_keep_exact_layers_canonical_and_respect_locks() -> None:
    names = ["a", "b", "c"]
    settings = {"a": TABLE, "b": EXACT, "c": TABLE}
    new, locks, messages = editing.apply_row_edits(settings, names, {1: {"C": 4.0}, 2: {"lock": True}}, TABLE,
                                                   frozenset())
    assert new == {"a": TABLE, "b": TABLE.with_(codebooks=4), "c": EXACT} and locks == {"c"} and not messages
    new, _, messages = editing.apply_row_edits(new, names, {2: {"table": True}}, TABLE, locks)
    assert new["c"] == EXACT and "locked" in messages[0]
    grouped, skipped = editing.set_layers(new, names, TABLE, locks)
    assert skipped == ["c"] and grouped["b"] == TABLE
    unchanged, _, messages = editing.apply_row_edits(settings, names, {0: {"K": 2.5}, 1: {"K": 6, "encoder": "tree"}},
                                                     TABLE, frozenset())
    assert unchanged == settings and "whole number" in messages[0] and "power of two" in messages[1]


def test_charts_carry_config_ids_and_fixed_colour_limits() -> None:
    heat = charts.propagation_heatmap(["a", "b"], [[1.0, 0.9], [1.0, 0.8]], [0.95, 0.7], "current #3", "cosine")
    assert (heat.data[0].zmin, heat.data[0].zmax) == (0.5, 1.0)


def test_every_accuracy_shows_its_interval_and_a_change_says_whether_it_is_real(app: AppTest) -> None:
    baseline_card = next(m for m in app.metric if m.label == "Accuracy (200 images)")
    assert re.fullmatch(r"95% CI \d+\.\d-\d+\.\d%", baseline_card.delta), baseline_card.delta
    app.button(key="all_tables").click().run()
    app.selectbox(key="group_target").set_value("layer3.0.conv1")  # the example: is its change real?
    app.button(key="group_exact").click().run()
    no_failure(app)
    previous, current = app.session_state["previous_id"], app.session_state["current_id"]
    line = next(c.value for c in app.caption if c.value.startswith("Accuracy "))
    change = re.fullmatch(
        rf"Accuracy (\d+\.\d\d)% \(95% CI (\d+\.\d)-(\d+\.\d)%, 200 images\)\. Change from #{previous}: "
        rf"\d+\.\d\d% → \d+\.\d\d%, (within noise|significant) \((p[=<][\d.]+), McNemar on 200 images\): "
        rf"(\d+) images right only with #{previous}, (\d+) only with #{current}\.", line)
    assert change, line
    accuracy, low, high, word, p, only_before, only_now = change.groups()
    assert float(low) <= float(accuracy) <= float(high)
    assert p == p_text(mcnemar_p(int(only_before), int(only_now)))
    live = [m for m in app.metric if m.label == "Accuracy (200 images)"][-1]
    assert live.proto.delta_description == word  # its p-value in the caption: the card has no room for it
    app.session_state["load_request"] = 0  # back to the exact network: far beyond noise
    app.run()
    no_failure(app)
    line = next(c.value for c in app.caption if c.value.startswith("Accuracy "))
    assert f"Change from #{current}" in line and "significant (p<0.001, McNemar on 200 images)" in line
    flops_plot = json.loads(app.get("plotly_chart")[0].proto.spec)
    bars = [trace["error_y"] for trace in flops_plot["data"] if "error_y" in trace]
    assert bars and all(min(b["array"] + b["arrayminus"]) >= 0 for b in bars)
    history = next(d.value for d in app.dataframe if "95% CI" in d.value.columns)
    assert history.set_index("id").loc[0, "vs exact (McNemar)"] == "within noise (p=1)"


def test_a_history_selection_never_outlives_the_rows_it_picked(app: AppTest) -> None:
    """Rows selected in the run history index that history: a selection beyond it (left by another model's longer
    history, as after a model switch) is dropped instead of failing, and every panel below still draws."""
    key = next(k for k in app.session_state if str(k).startswith("history-"))
    app.session_state[key] = {"selection": {"rows": [0, 57, 99], "columns": [], "cells": []}}
    app.run()
    no_failure(app)
    assert any(b.label.startswith("Load #") for b in app.button)  # row 0, the baseline, is still chosen
    assert any(m.value.startswith("**4 · The result.**") for m in app.markdown)  # the teaching view below draws


def test_exact_layers_after_table_layers_say_where_their_error_comes_from(app: AppTest) -> None:
    app.selectbox(key="group_target").set_value("stage:layer2")
    app.button(key="group_exact").click().run()
    no_failure(app)
    editor = app.data_editor[0].value.set_index("layer")
    assert not editor.loc["layer2.0.conv1", "table"] and editor.loc["layer2.0.conv1", "cosine"] < 1
    assert any(c.value.startswith("Cosine and relative error compare each layer's output") for c in app.caption)


def test_a_layer_with_too_few_calibration_rows_says_what_it_means_and_what_to_do() -> None:
    from explorer.panels import editor

    said = editor._warning({"k_exceeds_rows": True, "centroids": 64, "calibration_rows": 30,
                            "slower_than_exact": False})
    assert said == ("K=64 but only 30 calibration rows: k-means memorises them (the tables fit these images, not new "
                    "ones); use more calibration images or a smaller K")
    assert editor._warning({"k_exceeds_rows": False, "slower_than_exact": False}) == ""


def test_a_failed_open_is_said_beside_later_messages_and_goes_once_an_action_succeeds(app: AppTest) -> None:
    app.selectbox(key="choose_dataset").set_value("cifar100")
    next(b for b in app.button if b.label == "Open").click().run()
    assert not app.exception
    assert any("How to get them" in e.value for e in app.error)
    assert any("Press Open to try it again" in c.value for c in app.sidebar.caption)
    app.selectbox(key="group_target").set_value("layer4.0.conv2")
    app.button(key="group_exact").click().run()
    no_failure(app)  # the error of the failed Open is gone, and it was not tried again
    assert "layer4.0.conv2 → exact" in _current_label(app)
    assert not any("Still showing the model opened before" in i.value for i in app.info)
    next(b for b in app.button if b.label == "Open").click().run()  # pressed again: tried again, said again
    assert any("How to get them" in e.value for e in app.error)


def test_card_and_sidebar_labels_are_short_enough_to_show_whole(app: AppTest) -> None:
    """Details go to each widget's help: a label cut off on a projector ('Accuracy (450 test ima…') says nothing
    (tests/test_browser.py measures that nothing is cut)."""
    assert all(len(m.label) <= 21 for m in app.metric), [m.label for m in app.metric]
    assert all(len(c.label) <= 21 for c in app.sidebar.checkbox), [c.label for c in app.sidebar.checkbox]
