"""tabconv/latency.py and bench/latency.py on a tiny random-init model: what is timed is checked against eager
PyTorch, ratios come from the run's own medians, every layer is reported (no time bounds: timings belong to a
quiet machine)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tabconv import latency, native
from tabconv.config import Calibration
from tabconv.cost import model_cost
from tabconv.export import TabledNetwork, onnx_bytes
from tabconv.progress import Stage
from tabconv.session import Session
from tabconv.settings import LayerSetting
from tabconv.train import save_checkpoint
from tests.helpers import model

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("latency", ROOT / "bench" / "latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_session(tmp_path: Path) -> Session:
    """The tiny CNN on the embedded digits, every layer tabled once (C=4, K=8)."""
    checkpoint = tmp_path / "tiny.pt"
    meta = {"model": "tiny", "dataset": "digits", "num_classes": 10, "input_shape": [1, 32, 32]}
    save_checkpoint(checkpoint, model("tiny"), meta)
    session = Session.from_checkpoint(str(checkpoint), calibration=Calibration(images=64), eval_images=5,
                                      device="cpu")
    session.apply(session.uniform(LayerSetting("table", 4, 8)), label="all tables")
    return session


def test_measure_times_both_networks_in_both_runtimes(tiny_session: Session):
    session = tiny_session
    specs = [TabledNetwork.from_session(session, tables) for tables in ({}, session.quantizers(session.current))]
    exact, tabled = (spec.network() for spec in specs)
    runtimes = {name: latency.ort_session(onnx_bytes(spec), 1)
                for name, spec in zip(("exact", "tabled"), specs, strict=True)}
    events = []
    timed = latency.measure(exact, tabled, latency.images(session, 3), repeats=3, warmup=1, runtimes=runtimes,
                            progress=events.append)
    assert (timed.batch, timed.repeats, timed.warmup, timed.threads) == (3, 3, 1, torch.get_num_threads())
    assert timed.runtimes == ("pytorch", "onnxruntime")
    assert [e.index for e in events] == [0, 1, 2, 3] and {e.total for e in events} == {4}
    assert {e.stage for e in events} == {Stage.LATENCY}
    for runtime in timed.runtimes:
        assert timed.exact_ms[runtime] > 0 and timed.tabled_ms[runtime] > 0
        assert timed.ratio(runtime) == timed.tabled_ms[runtime] / timed.exact_ms[runtime]
    assert list(timed.row()) == ["pytorch_exact_ms", "pytorch_tabled_ms", "onnxruntime_exact_ms",
                                 "onnxruntime_tabled_ms", "pytorch_ratio", "onnxruntime_ratio"]
    assert timed.row()["onnxruntime_ratio"] == timed.ratio("onnxruntime")
    with pytest.raises(ValueError, match="repeats >= 1"):
        latency.measure(exact, tabled, latency.images(session, 1), repeats=0)


def test_measure_configuration_times_its_tables_in_eager_and_leaves_the_session_alone(tiny_session: Session):
    session = tiny_session
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    x = latency.images(session, 7)  # more than the 5 evaluation images: repeated
    assert x.shape == (7, 1, 32, 32) and torch.equal(x[5], x[0])
    timed = latency.measure_configuration(session, session.current, batch=7, repeats=2, warmup=0)
    assert (timed.batch, timed.repeats, timed.runtimes) == (7, 2, ("pytorch",))
    assert timed.exact_ms["pytorch"] > 0 and timed.ratio() == timed.tabled_ms["pytorch"] / timed.exact_ms["pytorch"]
    assert all(torch.equal(before[k], v) for k, v in session.model.state_dict().items())


def test_setting_parser():
    latency = _bench()
    assert latency.parse_setting("C=8,K=16") == LayerSetting("table", 8, 16)
    assert latency.parse_setting("S=9 K=16 encoder=tree lut=int8") == LayerSetting("table", 8, 16, "tree", "int8", 9)
    with pytest.raises(argparse.ArgumentTypeError, match="'M=3'"):
        latency.parse_setting("C=8 M=3")


def test_latency_main_times_both_networks_in_both_runtimes(tmp_path: Path, capsys):
    checkpoint = tmp_path / "tiny.pt"
    meta = {"model": "tiny", "dataset": "digits", "num_classes": 10, "input_shape": [1, 32, 32]}
    save_checkpoint(checkpoint, model("tiny"), meta)
    out = tmp_path / "latency.json"
    results = _bench().main(["--checkpoint", str(checkpoint), "--setting", "C=4,K=8", "--calibration-images", "64",
                             "--batches", "1,3", "--repeats", "1", "--warmup", "0", "--no-cache", "--out", str(out),
                             "--kernel", "torch", "--no-int8"])  # torch: onnxruntime's graph computes its very codes
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["setup"]["table_layers"] == 3 and [r["batch"] for r in results["end_to_end"]] == [1, 3]
    for row in results["end_to_end"]:
        for runtime in ("pytorch", "onnxruntime"):
            assert row[f"{runtime}_ratio"] == row[f"{runtime}_tabled_ms"] / row[f"{runtime}_exact_ms"]
        if native.available():  # model-ops.onnx: the table layers on tabconv's onnxruntime operator
            assert row["onnxruntime_ops_ratio"] == row["onnxruntime_ops_tabled_ms"] / row["onnxruntime_exact_ms"]
    assert native.available() == any("tabconv operator" in name for name in results["checks"])
    for check in results["checks"].values():  # onnxruntime runs the same networks as eager PyTorch
        assert check["same_predictions"] == 1.0 and check["max_abs_diff_relative"] < 1e-4
    assert [r["layer"] for r in results["layers"]] == ["conv1", "conv2", "fc"]
    for row in results["layers"]:
        assert row["table"] and row["b3_exact_ms"] > 0 and row["b3_ratio"] == row["b3_tabled_ms"] / row["b3_exact_ms"]
    assert results["flops"]["exact"] == model_cost(model("tiny"), (1, 32, 32)).flops
    printed = capsys.readouterr().out
    assert "onnxruntime" in printed and "conv2" in printed


def test_the_bench_times_a_fine_tuned_configuration_with_its_own_tables(tiny_session: Session, tmp_path: Path):
    """A fine-tuned configuration file brings its tables file: those tables, not rebuilt ones, are what is timed."""
    from argparse import Namespace

    from tabconv.finetune import finetune_session

    session = tiny_session
    tuned = finetune_session(session, session.current, steps=2, images=32)
    out = tmp_path / "tuned.json"
    session.save_tuned(tuned.metrics, out)
    quantizers, settings = _bench().table_quantizers(session, Namespace(config=str(out)))
    assert set(quantizers) == set(tuned.quantizers) and dict(settings) == dict(session.current.settings)
    for name, q in quantizers.items():
        assert torch.equal(q.table_values(), tuned.quantizers[name].table_values())
