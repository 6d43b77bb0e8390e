"""bench/latency.py on a tiny random-init model: what it times is checked against eager PyTorch, ratios come from
its own medians, every layer is reported (no time bounds: timings belong to a quiet machine)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from tabconv.cost import model_cost
from tabconv.settings import LayerSetting
from tabconv.train import save_checkpoint
from tests.helpers import model

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("latency", ROOT / "bench" / "latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
                             "--batches", "1,3", "--repeats", "1", "--warmup", "0", "--no-cache", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["setup"]["table_layers"] == 3 and [r["batch"] for r in results["end_to_end"]] == [1, 3]
    for row in results["end_to_end"]:
        for runtime in ("pytorch", "onnxruntime"):
            assert row[f"{runtime}_ratio"] == row[f"{runtime}_tabled_ms"] / row[f"{runtime}_exact_ms"]
    for check in results["checks"].values():  # onnxruntime runs the same networks as eager PyTorch
        assert check["same_predictions"] == 1.0 and check["max_abs_diff_relative"] < 1e-4
    assert [r["layer"] for r in results["layers"]] == ["conv1", "conv2", "fc"]
    for row in results["layers"]:
        assert row["table"] and row["b3_exact_ms"] > 0 and row["b3_ratio"] == row["b3_tabled_ms"] / row["b3_exact_ms"]
    assert results["flops"]["exact"] == model_cost(model("tiny"), (1, 32, 32)).flops
    printed = capsys.readouterr().out
    assert "onnxruntime" in printed and "conv2" in printed
