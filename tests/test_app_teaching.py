"""The teaching view on conv and linear layers, the guided tour and the polish of issue 13, headless (AppTest)
on the embedded default (ResNet-18 on digits).

Like tests/test_app.py, every test shares the process's cached Session (its history only grows), so each
checks what its own action changed. The page's numbers are checked against the library's own computation.
"""

from __future__ import annotations

import json
import re

from streamlit.testing.v1 import AppTest

from explorer import charts, editing
from explorer.panels import editor, metrics
from explorer.panels.tour import MASKED, SEARCH_BUDGET, STEPS
from explorer.workbench import open_workbench
from tabconv.settings import EXACT, LayerSetting
from tabconv.teaching import GLOSSARY, error_summary, explain, worst_subspace
from tests.helpers import no_failure

SETTING_COLUMNS = ["C", "S", "K", "encoder", "LUT"]
TABLE = LayerSetting("table")


def _current_label(at: AppTest) -> str:
    return next(m.value for m in at.markdown if m.value.startswith("**Current configuration"))


def _steps(at: AppTest) -> list[str]:
    """The teaching view's numbered paragraphs."""
    return [m.value for m in at.markdown if re.match(r"\*\*\d · ", m.value)]


def _teach(at: AppTest, layer: str) -> dict:
    """Show `layer` in the teaching view; the library's explanation of what the page shows by default."""
    at.selectbox(key="teach_layer").set_value(layer).run()
    no_failure(at)
    wb = open_workbench(at.session_state["spec"])  # the page's cached workbench
    current = wb.metrics(at.session_state["current_id"])
    setting = current.settings[layer] if layer in current.table_layers else at.session_state["defaults"]
    return explain(wb.session, layer, 0, None, {**current.settings, layer: setting})


def _subspace_selector(at: AppTest, layer: str):
    return next(s for s in at.selectbox if s.key and s.key.startswith(f"teach_subspace-{layer}-"))


def test_a_deep_conv_layer_is_shown_one_subspace_at_a_time_with_its_error_explained(app: AppTest) -> None:
    result = _teach(app, "layer3.1.conv1")
    assert result["inner_dim"] == 256 * 9 >= 1152
    selector = _subspace_selector(app, "layer3.1.conv1")
    assert len(selector.options) == result["codebooks"] and selector.index == worst_subspace(result)
    first, second, third, fourth = _steps(app)
    assert "im2col unrolls" in first and "256 input channels × 3×3 kernel taps" in first
    assert "largest output for this image" in first and "`layer3.1.bn1` folded in" in first
    error = error_summary(result)
    assert (f"table sum **{result['table_value']:.3f}** vs exact dot product **{result['exact_value']:.3f}**"
            in fourth)
    assert f"The difference, **{error['error']:+.3f}**, is the approximation error of this row for this channel" \
        in fourth
    assert f"subspace {error['largest'][0]['subspace']} ({error['largest'][0]['gap']:+.3f})" in fourth
    chart = json.loads(app.get("plotly_chart")[-3].proto.spec)  # the chosen subspace's picture
    width = result["subspace_width"]
    assert len(chart["data"][0]["y"]) == width < result["inner_dim"]
    other = (selector.index + 1) % len(selector.options)
    selector.set_value(other).run()
    no_failure(app)
    chart = json.loads(app.get("plotly_chart")[-3].proto.spec)
    assert chart["data"][0]["x"][0] == other * width
    assert chart["data"][0]["y"] == result["subspaces"][other]["values"]
    assert chart["data"][0]["customdata"][0].startswith(f"{other * width}: input channel {other * width // 9}, ")


def test_a_linear_layer_is_worded_as_a_linear_layer(app: AppTest) -> None:
    result = _teach(app, "fc")
    assert result["kind"] == "linear" and len(_subspace_selector(app, "fc").options) == result["codebooks"]
    view = app.get("plotly_chart")[-3:]  # the teaching view's subspace, sum and channel charts
    steps = " ".join(_steps(app) + [c.value for c in app.caption if c.value.startswith("Subspace ")])
    assert "this image's feature vector" in steps and "D = 512" in steps and "its feature index" in steps
    for word in ("im2col", "batch norm", "folded", "kernel", "patch"):
        assert word not in steps, word
    assert not any(n.label.startswith("Row") for n in app.number_input)  # one row per image: nothing to pick
    for chart in view:
        spec = chart.proto.spec.lower()
        assert "patch" not in spec and "batch norm" not in spec and "bn-folded" not in spec
    assert f"table sum **{result['table_value']:.3f}**" in steps


def test_the_glossary_is_on_the_page(app: AppTest) -> None:
    glossary = next(e for e in app.expander if e.label.startswith("Glossary"))
    text = glossary.markdown[0].value
    for term, meaning in GLOSSARY.items():
        assert f"**{term}**: {meaning}" in text


def test_the_guided_tour_sets_the_page_for_each_step_and_can_be_left(app: AppTest) -> None:
    names = open_workbench(app.session_state["spec"]).structure.names
    slider = app.slider(key="mask_exact").value  # no step moves the masking control
    app.button(key="tour_start").click().run()
    no_failure(app)
    assert app.session_state["current_id"] == 0 and "baseline (exact)" in _current_label(app)
    assert any(m.value.startswith(f"**Guided tour · step 1 of {len(STEPS)}") for m in app.markdown)
    app.button(key="tour_next").click().run()
    no_failure(app)
    one = app.session_state["teach_layer"]  # the tour shows the tabled layer in the teaching view
    assert f"only {one} tabled (1/{len(names)} layers as tables)" in _current_label(app)
    assert app.data_editor[0].value.set_index("layer")["table"].sum() == 1
    app.button(key="tour_next").click().run()
    no_failure(app)
    assert f"({len(names)}/{len(names)} layers as tables)" in _current_label(app)
    app.button(key="tour_next").click().run()
    no_failure(app)
    assert f"priority: {MASKED} worst exact" in _current_label(app)
    assert app.slider(key="mask_exact").value == slider
    masking_id = app.session_state["current_id"]
    wb = open_workbench(app.session_state["spec"])
    sweep = wb.sweeps.masking(app.session_state["defaults"], "cumulative")
    every, masked = wb.metrics(sweep["ids"][0]), wb.metrics(masking_id)  # the sweep's first point, and this one
    sentence = next(m.value for m in app.markdown if m.value.startswith("**Guided tour · step 4"))
    assert every.table_layers == list(wb.session.structure.names) and sweep["ids"][MASKED] == masking_id
    assert (f"from {every.accuracy:.2%} (every layer tabled) to {masked.accuracy:.2%}: "
            f"{masked.against(every).verdict(name_test=False)}") in sentence  # its words are its numbers
    before = len(open_workbench(app.session_state["spec"]).session.history)
    app.button(key="tour_next").click().run()
    no_failure(app)
    assert app.number_input(key="search_budget").value == SEARCH_BUDGET
    after = len(open_workbench(app.session_state["spec"]).session.history)
    ran = app.session_state["tour_search"]
    assert ran["new"] == after - before  # the small budget, and the confirmation's back-offs: the sweep was recalled
    assert ran["new"] <= SEARCH_BUDGET + ran["backoffs"] * len(names)
    assert any(t.value.startswith(f"Search looked at {ran['points']} configurations ({ran['new']} newly") for t in
               app.toast)  # a toast: it moves nothing on the page
    sentence = next(m.value for m in app.markdown if m.value.startswith("**Guided tour · step 5"))
    assert f"It looked at {ran['points']} configurations: {ran['new']} newly evaluated" in sentence
    assert app.slider(key="mask_exact").value == slider
    app.button(key="tour_back").click().run()
    assert app.session_state["current_id"] == masking_id
    app.button(key="tour_leave").click().run()
    no_failure(app)
    assert not any(m.value.startswith("**Guided tour") for m in app.markdown)
    assert app.session_state["current_id"] == masking_id  # leaving keeps the page as it is
    app.button(key="all_tables").click().run()  # and the page still works
    no_failure(app)
    assert app.session_state["current_id"] != masking_id


def test_exact_layers_show_a_dash_and_unchanged_costs_show_no_delta(app: AppTest) -> None:
    app.selectbox(key="group_target").set_value("fc")
    app.button(key="group_exact").click().run()
    frame = app.data_editor[0].value.set_index("layer")
    assert (frame.loc["fc", SETTING_COLUMNS] == "—").all()
    assert not frame[SETTING_COLUMNS + ["tables/weights"]].isna().any().any()
    assert not frame[SETTING_COLUMNS].isin(["None", "nan", "<NA>"]).any().any()
    app.selectbox(key="group_target").set_value("fc")
    app.selectbox(key="group_lut").set_value("int8")
    app.button(key="group_table").click().run()
    app.selectbox(key="group_target").set_value("fc")
    app.selectbox(key="group_lut").set_value("float32")
    app.button(key="group_table").click().run()  # float32 vs int8 tables: same FLOPs, other storage
    no_failure(app)
    cards = {m.label.split(":")[0]: m.delta for m in app.metric}
    assert not cards["FLOPs, paper"] and not cards["FLOPs, full"]  # no "↑ +0 M"
    assert cards["Storage"].endswith(" MiB")
    assert metrics._delta(5e6, 5e6 + 20, 1e-6, " M", 3) is None
    assert metrics._delta(6e6, 5e6, 1e-6, " M", 3) == "+1.000 M"


def test_group_names_and_the_storage_axis_read_right(app: AppTest) -> None:
    options = app.selectbox(key="group_target").options
    assert "stem (1 layer)" in options and "classifier (1 layer)" in options and "all (21 layers)" in options
    names = open_workbench(app.session_state["spec"]).structure.names
    assert set(names) <= set(options)  # single layers too, each right after the groups that start at it:
    assert options[:6] == ["all (21 layers)", "stem (1 layer)", "conv1", "stage:layer1 (4 layers)",
                           "block:layer1.0 (2 layers)", "layer1.0.conv1"]  # seen without scrolling past every group
    storage = json.loads(app.get("plotly_chart")[1].proto.spec)
    assert "(MiB)" in storage["layout"]["xaxis"]["title"]["text"] and storage["layout"]["xaxis"]["tickformat"] == "~g"
    assert charts.log_ticks([0.5, 12.0]) == {"dtick": "D2"} and charts.log_ticks([15.0, 45.0]) == {}
    star = next(t for t in storage["data"] if t["name"] == "baseline (exact)")
    base = open_workbench(app.session_state["spec"]).session.baseline
    assert star["x"][0] == base.paper.storage_bytes / 2**20


def test_the_sidebar_says_how_many_evaluation_images_are_used(app: AppTest) -> None:
    app.number_input(key="choose_eval").set_value(1000)
    next(b for b in app.button if b.label == "Open").click().run()
    no_failure(app)
    used = len(open_workbench(app.session_state["spec"]).session.eval_set)
    assert used < 1000
    assert any(f"{used} evaluation images are used: the test split has {used} (asked for 1000)" in i.value
               for i in app.sidebar.info), [i.value for i in app.sidebar.info]


def test_editor_cells_arrive_as_text_and_a_dash_means_not_set() -> None:
    names = ["a", "b"]
    settings = {"a": EXACT, "b": TABLE}
    new, _, messages = editing.apply_row_edits(settings, names, {0: {"K": "16", "C": "—"}, 1: {"encoder": "—"}},
                                               TABLE, frozenset())
    assert new == {"a": TABLE.with_(centroids=16), "b": TABLE} and not messages
    unchanged, _, messages = editing.apply_row_edits(settings, names, {1: {"C": "four"}}, TABLE, frozenset())
    assert unchanged == settings and "whole number" in messages[0]
    cells = editor.frame([{"name": "a", "mode": "exact", "codebooks": None, "centroids": None, "encoder": None,
                           "lut_dtype": None, "cosine": 1.0, "relative_error": 0.0, "calibration_rows": 10,
                           "k_exceeds_rows": False, "kind": "conv", "input_shape": [1, 4, 4],
                           "output_shape": [2, 4, 4], "inner_dim": 9, "out_features": 2, "rows_per_image": 16,
                           "macs": 288, "mac_share": 1.0, "flops_paper": 288, "flops_full": 288, "weight_bytes": 72,
                           "table_bytes": 0, "prototype_bytes": 0, "exact_flops": 288, "latency_ms": None,
                           "exact_latency_ms": None, "slower_than_exact": False}], frozenset())
    assert list(cells.loc[0, SETTING_COLUMNS + ["tables/weights"]]) == ["—"] * 6
