"""The incremental session: only changed layers rebuilt, suffix-only re-evaluation exact."""

from __future__ import annotations

import pytest
import torch

from tabconv.config import Calibration, ConfigError
from tabconv.data import load_dataset
from tabconv.session import Session
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
    s.apply(settings)
    assert s.builder.fits == len(s.structure.names)
    settings["layer3.1.conv1"] = TABLE.with_(centroids=8)
    s.apply(settings)
    assert s.builder.fits == len(s.structure.names) + 1
    settings["layer3.1.conv1"] = EXACT
    s.apply(settings)
    assert s.builder.fits == len(s.structure.names) + 1


def test_suffix_only_reevaluation_matches_a_full_evaluation_exactly(digits):
    s = new_session(digits)
    steps = [s.uniform(TABLE)]
    steps.append({**steps[-1], "layer4.0.conv2": EXACT})
    steps.append({**steps[-1], "layer2.1.conv1": TABLE.with_(codebooks=2)})
    steps.append({**steps[-1], "conv1": EXACT, "fc": EXACT})
    for settings in steps:
        incremental = s.apply(settings)
        fresh = new_session(digits).apply(settings)
        assert incremental.accuracy == fresh.accuracy
        assert incremental.flops_paper == fresh.flops_paper and incremental.flops_full == fresh.flops_full
        for name in s.structure.names:
            assert incremental.errors[name] == fresh.errors[name], name


def test_a_late_change_recomputes_only_the_suffix(digits):
    s = new_session(digits)
    settings = s.uniform(EXACT)
    s.apply({**settings, "layer4.1.conv2": TABLE})
    assert s.runner.recomputed <= 10  # conv2, its bn, the add, relu, pool, flatten, fc, output
    s.apply({**settings, "conv1": TABLE})
    assert s.runner.recomputed > 50


def test_streaming_and_incremental_paths_agree(digits, monkeypatch):
    import tabconv.session as session_module

    settings = {"layer1.0.conv1": TABLE, "layer3.0.downsample.0": TABLE, "fc": TABLE}
    incremental = new_session(digits).apply(settings)
    monkeypatch.setattr(session_module, "MAX_INCREMENTAL_IMAGES", 10)
    streamed_session = new_session(digits)
    assert not streamed_session.incremental
    streamed = streamed_session.apply(settings)
    assert streamed.accuracy == incremental.accuracy and streamed.hits == incremental.hits
    for name in streamed_session.structure.names:
        assert streamed.errors[name].cosine == pytest.approx(incremental.errors[name].cosine, abs=1e-6)


def test_metrics_carry_per_image_correctness_for_paired_comparisons(digits):
    s = new_session(digits)
    x = digits[1].normalize(digits[1].images).contiguous(memory_format=torch.channels_last)
    want = (s.model(x).argmax(1) == digits[1].labels).numpy()
    assert (s.baseline.correct_images == want).all() and s.baseline.correct == int(want.sum())
    m = s.apply({name: TABLE for name in ("conv1", "layer1.0.conv1", "layer1.0.conv2", "fc")})
    test = m.against(s.baseline)
    assert test.images == 60 and test.only_second - test.only_first == m.correct - s.baseline.correct
    assert test.p_value == mcnemar_p(test.only_first, test.only_second)
    assert m.accuracy == m.correct / 60 and m.accuracy_ci95 == wilson(m.correct, 60)
    assert m.to_dict()["accuracy_ci95"] == list(wilson(m.correct, 60)) and len(m.hits) == 8  # 60 bits
    assert s.baseline.against(s.baseline).p_value == 1.0


def test_history_metrics_and_configuration(digits):
    s = new_session(digits)
    m = s.apply({"layer2.0.conv1": TABLE}, label="one layer")
    assert [h.id for h in s.history] == [0, 1] and m.label == "one layer"
    assert s.apply({"layer2.0.conv1": TABLE}) is m  # memoised: evaluated once
    assert m.flops_paper < s.baseline.flops_paper and m.flops_paper < m.flops_full
    cfg = s.configuration(m)
    assert cfg.layers["layer2.0.conv1"] == TABLE and cfg.layers["conv1"] == EXACT
    assert cfg.metrics["accuracy"] == m.accuracy and cfg.metrics["eval_images"] == 60
    assert s.apply(cfg) is m
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
    layers = [e["layer"] for e in events if e["stage"] == "tables" and e["layer"]]
    assert layers == ["conv1", "fc"] and events[-1]["stage"] == "evaluate"
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
        want, got = full.apply(settings), bounded.apply(settings)
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
    tabled = s.apply(s.uniform(TABLE))
    assert tabled.eval_images == 60 and set(tabled.errors) == {"conv", "fc"}


def test_table_layers_run_in_inference_mode_with_the_direct_encoder(digits, monkeypatch):
    """A table layer takes the mode of the layer it replaces: in an evaluation, codes come from the direct
    conv encoder in image chunks, never from the fine-tuning path's whole-batch im2col."""
    from tabconv.layers import TABLE_LAYERS, TableConv2d

    encoded = []
    direct = TableConv2d.encode_by_conv
    monkeypatch.setattr(TableConv2d, "encode_by_conv", lambda self, x: encoded.append(self) or direct(self, x))
    s = new_session(digits)
    s.apply(s.uniform(TABLE))
    layers = [m for m in s.runner.overrides.values() if isinstance(m, TABLE_LAYERS)]
    assert layers and not any(m.training for m in layers)
    tables = [m for m in layers if isinstance(m, TableConv2d)]
    assert {id(m) for m in encoded} == {id(m) for m in tables if m.score_weight is not None} != set()
