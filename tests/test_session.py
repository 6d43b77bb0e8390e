"""The incremental session: only changed layers rebuilt, suffix-only re-evaluation exact."""

from __future__ import annotations

import pytest
import torch

from tabconv.cache import TableCache
from tabconv.calibrate import FITTED, LOADED, REUSED
from tabconv.config import Calibration, ConfigError
from tabconv.data import load_dataset
from tabconv.metrics import Origin
from tabconv.progress import Stage
from tabconv.session import GIVEN, GivenTables, Session
from tabconv.settings import EXACT, LayerSetting
from tabconv.stats import mcnemar_p, wilson
from tabconv.structure import UnknownLayerError
from tests.helpers import model

TABLE = LayerSetting("table", 4, 16)
META = {"model": "resnet18", "dataset": "digits", "num_classes": 10, "input_shape": [1, 32, 32], "sha256": "t"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train").head(64), load_dataset("digits", "test").head(60)


def new_session(digits, **kwargs) -> Session:
    train, test = digits
    return Session(model("resnet18"), META, train, test, Calibration(images=64, max_rows=2048), batch_size=25,
                   **kwargs)


def test_baseline_is_the_exact_network(digits):
    s = new_session(digits)
    net = s.model
    x = digits[1].normalize(digits[1].images)
    want = (net(x).argmax(1) == digits[1].labels).float().mean().item()
    assert s.baseline.accuracy == pytest.approx(want)
    assert s.baseline.eval_images == 60 and s.baseline.retention == 1
    assert s.baseline.flops_paper == s.baseline.flops_full == s.baseline_cost.flops


def test_only_the_changed_layer_is_rebuilt(digits):
    s = new_session(digits)
    settings = s.uniform(TABLE)
    first = s.apply(settings)
    assert s.builder.fits == len(s.structure.names)
    assert first.fitted == s.structure.names and set(first.tables.values()) == {FITTED}
    assert s.unbuilt(settings) == []
    settings["layer3.1.conv1"] = TABLE.with_(centroids=8)
    assert s.unbuilt(settings) == ["layer3.1.conv1"]
    changed = s.apply(settings)
    assert s.builder.fits == len(s.structure.names) + 1
    assert changed.fitted == ["layer3.1.conv1"]
    assert {n: src for n, src in changed.tables.items() if n != "layer3.1.conv1"} == dict.fromkeys(
        [n for n in s.structure.names if n != "layer3.1.conv1"], REUSED)
    settings["layer3.1.conv1"] = EXACT
    exact = s.apply(settings)
    assert s.builder.fits == len(s.structure.names) + 1 and exact.fitted == []
    assert "layer3.1.conv1" not in exact.tables


def test_apply_reports_its_own_work_and_the_origin_it_was_asked_for(digits, tmp_path):
    s = new_session(digits, cache=TableCache(tmp_path))
    settings = {**s.uniform(EXACT), "layer4.1.conv2": TABLE}
    done = s.apply(settings, label="one late layer", origin=Origin.GREEDY)
    assert not done.recalled and done.fitted == ["layer4.1.conv2"] and done.origin is Origin.GREEDY
    assert done.metrics.origin is Origin.GREEDY and done.metrics.label == "one late layer"
    assert 0 < done.recomputed <= 10 and done.nodes == len(s.runner.nodes) and done.seconds > 0
    again = s.apply(settings, label="asked again", origin=Origin.EDIT)
    assert again.recalled and again.metrics is done.metrics and again.tables == {} and again.recomputed == 0
    assert again.label == "asked again" and again.origin is Origin.EDIT  # as asked; the record keeps its first
    assert again.metrics.origin is Origin.GREEDY
    s.apply({})
    assert s.recall(settings) is done.metrics and s.current is s.baseline  # recalled without becoming current
    assert s.recall({**settings, "fc": TABLE}) is None
    other = new_session(digits, cache=TableCache(tmp_path))  # a fresh process: the tables come from the disk cache
    assert other.apply(settings).tables == {"layer4.1.conv2": LOADED}


def test_the_session_knows_which_configuration_its_runner_holds(digits):
    s = new_session(digits)
    late = s.apply({"layer4.1.conv2": TABLE}).metrics
    assert s.holds(late) and not s.holds(s.baseline)
    early = s.apply({"conv1": TABLE}).metrics
    assert s.holds(early) and not s.holds(late)
    s.apply({"layer4.1.conv2": TABLE})  # recalled: nothing re-ran, the runner still holds `early`
    assert s.current is late and s.holds(early) and not s.holds(late)
    s.activate(late)
    assert s.holds(late) and s.runner.recomputed > 0
    s.activate(late)  # already held: nothing re-runs
    assert s.runner.recomputed > 0 and s.holds(late)
    assert s.apply({"layer4.1.conv2": TABLE, "fc": TABLE}).recomputed <= 3  # from `late`'s kept activations


def test_released_activations_are_the_exact_networks_and_a_later_evaluation_matches_a_fresh_one(digits):
    s = new_session(digits)
    settings = {"layer2.0.conv1": TABLE, "layer4.1.conv2": TABLE}
    held = s.apply(settings).metrics
    owned = [name for name, value in s.runner.values[0].items() if value is not s.runner.exact_values[0][name]]
    assert owned and s.holds(held)
    s.release_activations()  # the current configuration's own activations go; the exact network's stay
    assert s.holds(s.baseline) and not s.holds(held) and s.runner.overrides == {}
    for values, exact in zip(s.runner.values, s.runner.exact_values, strict=True):
        assert values.keys() == exact.keys() and all(values[name] is exact[name] for name in values)
    s.activate(held)  # recomputed from the exact activations: the same result, the same work as the first time
    assert s.holds(held) and s.runner.recomputed > 0
    again = s.apply({**settings, "fc": TABLE}).metrics
    fresh = new_session(digits).apply({**settings, "fc": TABLE}).metrics
    assert again.hits == fresh.hits and again.errors == fresh.errors


def test_suffix_only_reevaluation_matches_a_full_evaluation_exactly(digits):
    s = new_session(digits)
    steps = [s.uniform(TABLE)]
    steps.append({**steps[-1], "layer4.0.conv2": EXACT})
    steps.append({**steps[-1], "layer2.1.conv1": TABLE.with_(codebooks=2)})
    steps.append({**steps[-1], "conv1": EXACT, "fc": EXACT})
    for settings in steps:
        incremental = s.apply(settings).metrics
        fresh = new_session(digits).apply(settings).metrics
        assert incremental.accuracy == fresh.accuracy
        assert incremental.flops_paper == fresh.flops_paper and incremental.flops_full == fresh.flops_full
        for name in s.structure.names:
            assert incremental.errors[name] == fresh.errors[name], name


def test_a_late_change_recomputes_only_the_suffix(digits):
    s = new_session(digits)
    settings = s.uniform(EXACT)
    assert s.apply({**settings, "layer4.1.conv2": TABLE}).recomputed <= 10  # conv2, bn, add, relu, pool, fc...
    assert s.apply({**settings, "conv1": TABLE}).recomputed > 50


def test_streaming_and_incremental_paths_agree(digits, monkeypatch):
    import tabconv.session as session_module

    settings = {"layer1.0.conv1": TABLE, "layer3.0.downsample.0": TABLE, "fc": TABLE}
    incremental = new_session(digits).apply(settings).metrics
    monkeypatch.setattr(session_module, "MAX_INCREMENTAL_IMAGES", 10)
    streamed_session = new_session(digits)
    assert not streamed_session.incremental
    streamed = streamed_session.apply(settings).metrics
    assert streamed.accuracy == incremental.accuracy and streamed.hits == incremental.hits
    for name in streamed_session.structure.names:
        assert streamed.errors[name].cosine == pytest.approx(incremental.errors[name].cosine, abs=1e-6)


def test_metrics_carry_per_image_correctness_for_paired_comparisons(digits):
    s = new_session(digits)
    x = digits[1].normalize(digits[1].images).contiguous(memory_format=torch.channels_last)
    want = (s.model(x).argmax(1) == digits[1].labels).numpy()
    assert (s.baseline.correct_images == want).all() and s.baseline.correct == int(want.sum())
    m = s.apply({name: TABLE for name in ("conv1", "layer1.0.conv1", "layer1.0.conv2", "fc")}).metrics
    test = m.against(s.baseline)
    assert test.images == 60 and test.only_second - test.only_first == m.correct - s.baseline.correct
    assert test.p_value == mcnemar_p(test.only_first, test.only_second)
    assert m.accuracy == m.correct / 60 and m.accuracy_ci95 == wilson(m.correct, 60)
    assert m.to_dict()["accuracy_ci95"] == list(wilson(m.correct, 60)) and len(m.hits) == 8  # 60 bits
    assert s.baseline.against(s.baseline).p_value == 1.0


def test_history_metrics_and_configuration(digits):
    s = new_session(digits)
    m = s.apply({"layer2.0.conv1": TABLE}, label="one layer").metrics
    assert [h.id for h in s.history] == [0, 1] and m.label == "one layer"
    assert s.apply({"layer2.0.conv1": TABLE}).metrics is m  # memoised: evaluated once
    assert m.flops_paper < s.baseline.flops_paper and m.flops_paper < m.flops_full
    cfg = s.configuration(m)
    assert cfg.layers["layer2.0.conv1"] == TABLE and cfg.layers["conv1"] == EXACT
    assert cfg.metrics["accuracy"] == m.accuracy and cfg.metrics["eval_images"] == 60
    assert s.apply(cfg).metrics is m
    rows = m.layer_rows(s.structure, 64)
    assert [r["name"] for r in rows] == s.structure.names
    assert rows[-1]["k_exceeds_rows"] is False and sum(r["mac_share"] for r in rows) == pytest.approx(1)


def test_bad_settings_are_refused(digits):
    s = new_session(digits)
    with pytest.raises(UnknownLayerError, match="layer9.conv1"):
        s.apply({"layer9.conv1": TABLE})
    cfg = s.configuration(s.baseline)
    cfg.checkpoint_sha256 = "another"
    with pytest.raises(ConfigError, match="another checkpoint"):
        s.apply(cfg)
    with pytest.raises(ConfigError, match="only 64 images"):
        Session(model("resnet18"), META, digits[0], digits[1], Calibration(images=65))


def test_progress_reports_every_table_layer(digits):
    s = new_session(digits)
    events = []
    s.apply({"conv1": TABLE, "fc": TABLE}, progress=events.append)
    layers = [e.detail for e in events if e.stage == Stage.TABLES and e.detail]
    assert layers == ["conv1", "fc"] and events[-1].stage == Stage.EVALUATE
    assert torch.is_tensor(s.tables({"conv1": TABLE})["conv1"].tables_)


def test_bounded_activation_memory_gives_the_same_metrics(digits, monkeypatch):
    """Keeping only the latest activations that fit (here a few hundred KiB) changes how much is recomputed,
    never the result: every step's accuracy, hits and per-layer errors equal a session that keeps everything."""
    import tabconv.session as session_module

    full = new_session(digits)
    monkeypatch.setattr(session_module, "ACTIVATION_MEMORY_BYTES", 300_000)
    bounded = new_session(digits)
    assert not bounded.runner.keeps_everything and "recompute from the input" in bounded.notes[0]
    steps = [full.uniform(TABLE)]
    steps.append({**steps[-1], "layer4.1.conv2": EXACT})
    steps.append({**steps[-1], "conv1": EXACT})
    for settings in steps:
        want, got = full.apply(settings).metrics, bounded.apply(settings).metrics
        assert got.hits == want.hits and got.accuracy == want.accuracy
        for name in full.structure.names:
            assert got.errors[name].cosine == pytest.approx(want.errors[name].cosine, abs=1e-6), name
            assert got.errors[name].relative_error == pytest.approx(want.errors[name].relative_error, abs=1e-6)
    bounded.apply({**steps[-1], "fc": EXACT})
    assert bounded.runner.recomputed <= 3  # a late change starts from kept activations


class _Branching(torch.nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.mean() > 0:
            x = x.relu()
        return self.fc(x.mean((2, 3)))


def test_an_untraceable_model_streams_and_says_so(digits):
    train, test = digits
    torch.manual_seed(0)
    network = _Branching().eval()
    s = Session(network, META, train, test, Calibration(images=64, max_rows=2048), batch_size=25)
    assert not s.incremental and "torch.fx cannot trace" in s.notes[0]
    x = test.normalize(test.images)
    with torch.no_grad():
        assert s.baseline.accuracy == pytest.approx((network(x).argmax(1) == test.labels).float().mean().item())
    tabled = s.apply(s.uniform(TABLE)).metrics
    assert tabled.eval_images == 60 and set(tabled.errors) == {"conv", "fc"}


def test_table_layers_run_in_inference_mode_with_the_direct_encoder(digits, monkeypatch):
    """A table layer takes the mode of the layer it replaces: in an evaluation on the torch path, codes come from
    the direct conv encoder in image chunks, never from the fine-tuning path's whole-batch im2col (on the native
    kernels, tests/test_native.py checks the codes)."""
    from tabconv.layers import TABLE_LAYERS, TableConv2d

    monkeypatch.setenv("TABCONV_KERNEL", "torch")
    encoded = []
    direct = TableConv2d.encode_by_conv
    monkeypatch.setattr(TableConv2d, "encode_by_conv", lambda self, x: encoded.append(self) or direct(self, x))
    s = new_session(digits)
    s.apply(s.uniform(TABLE))
    layers = [m for m in s.runner.overrides.values() if isinstance(m, TABLE_LAYERS)]
    assert layers and not any(m.training for m in layers)
    tables = [m for m in layers if isinstance(m, TableConv2d)]
    assert {id(m) for m in encoded} == {id(m) for m in tables if m.score_weight is not None} != set()


def test_only_the_latest_given_tables_are_kept_and_an_older_set_says_how_to_get_it_back(digits, monkeypatch):
    import tabconv.session as session_module

    monkeypatch.setattr(session_module, "MAX_GIVEN_TABLES", 2)
    s = new_session(digits)
    runs = []
    for i, layer in enumerate(("conv1", "layer1.0.conv1", "fc")):
        settings = {layer: TABLE}
        runs.append(s.apply(settings, tables=GivenTables(f"set{i}", s.tables(settings), b"file", {"steps": i}),
                            origin=Origin.FINE_TUNED))
    assert [run.tables for run in runs] == [{"conv1": GIVEN}, {"layer1.0.conv1": GIVEN}, {"fc": GIVEN}]
    oldest, newest = runs[0].metrics, runs[-1].metrics
    assert not s.has_tables(oldest) and s.has_tables(newest) and s.has_tables(s.baseline)
    with pytest.raises(ConfigError, match=r"#\d+'s fine-tuned tables are no longer in memory.*tables file"):
        s.quantizers(oldest)
    assert set(s.quantizers(newest)) == {"fc"}
    # the session owns the record: what re-exporting needs, and the configuration file naming its tables file
    assert s.given(oldest) is None and s.given(s.baseline) is None
    assert [g.sha256 for g in s.given_tables()] == ["set1", "set2"] and s.given(newest).data == b"file"
    config = s.tuned_configuration(newest, "mine.tables.pt")
    assert (config.tables_file, config.tables_sha256, config.finetune) == ("mine.tables.pt", "set2", {"steps": 2})
    with pytest.raises(ConfigError, match="no given tables"):
        s.tuned_configuration(s.baseline, "x.tables.pt")


def test_a_result_key_names_the_weights_the_data_and_the_calibration(digits):
    s = new_session(digits)
    key = s.result_key("sweep", setting=TABLE.to_dict())
    assert key["kind"] == "sweep" and key["setting"] == TABLE.to_dict() and key["checkpoint_sha256"] == "t"
    assert key["eval_images"] == 60 and key["calibration"]["images"] == 64
    train, test = digits
    other = Session(model("resnet18"), META, train, test.head(59), Calibration(images=64, max_rows=2048))
    assert other.result_key("sweep")["eval_sha256"] != s.result_key("sweep")["eval_sha256"]


def test_an_interactive_view_opens_a_checkpoint_with_counts_clamped_to_its_splits(resnet18_digits):
    with pytest.raises(ConfigError, match="has only"):
        Session.from_checkpoint(str(resnet18_digits), calibration=Calibration(images=5000), eval_images=100)
    s = Session.from_checkpoint(str(resnet18_digits), calibration=Calibration(images=5000), eval_images=5000,
                                download=False, clamp=True)
    assert s.calibration.images == len(s.calibration_set) < 5000 and len(s.eval_set) < 5000
    assert s.baseline.eval_images == len(load_dataset("digits", "test"))


def test_a_session_can_leave_out_the_test_images_a_search_chose_on(resnet18_digits):
    calibration = Calibration(images=512, max_rows=2048)
    s = Session.from_checkpoint(str(resnet18_digits), calibration=calibration, eval_images=200, eval_skip=150)
    test = load_dataset("digits", "test")
    assert s.eval_set.first == 150 and torch.equal(s.eval_set.images, test.images[150:350])
    with torch.no_grad():  # the session's accuracy is the model's on exactly those images
        hits = (s.model(test.normalize(test.images[150:350])).argmax(1) == test.labels[150:350]).sum()
    assert s.baseline.correct == int(hits) and s.baseline.eval_images == 200
    first = Session.from_checkpoint(str(resnet18_digits), calibration=calibration, eval_images=200)
    assert first.eval_sha256 != s.eval_sha256  # a different key for every stored result
    rest = Session.from_checkpoint(str(resnet18_digits), calibration=calibration, eval_skip=150)
    assert len(rest.eval_set) == len(test) - 150
    with pytest.raises(ConfigError, match="cannot leave out the first 450"):
        Session.from_checkpoint(str(resnet18_digits), calibration=calibration, eval_skip=450)


def test_an_exact_layer_is_one_setting_whatever_table_fields_it_carries(digits):
    """An exact layer given a C, K or S (a front end's leftover) is EXACT: the configuration has one key and is
    evaluated once."""
    s = Session(model("resnet18"), META, digits[0], digits[1], Calibration(images=64))
    tabled = s.apply({"fc": TABLE}).metrics
    leftover = LayerSetting("exact", 8, 64, subvector=9)
    assert s.complete({"fc": TABLE, "conv1": leftover})["conv1"] is EXACT
    again = s.apply({"fc": TABLE, "conv1": leftover})
    assert again.recalled and again.metrics.id == tabled.id
