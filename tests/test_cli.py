"""The command line end to end: cost baselines, evaluate, search, sensitivity, finetune, cache, bad input;
every accuracy with its Wilson 95% interval and every comparison with McNemar's exact p-value."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tabconv.cli import main
from tabconv.stats import mcnemar_p, wilson

CALIB = ["--calibration-images", "512", "--max-rows", "8192"]


def run(capsys, *args: str) -> tuple[int, dict | str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except json.JSONDecodeError:
        return code, out, err


@pytest.mark.parametrize("model,classes,flops", [
    ("resnet18", 1000, 37_673_472), ("resnet34", 1000, 75_486_208), ("nin", 10, 223_897_472)])
def test_cost_reproduces_the_paper_baselines(capsys, model, classes, flops):
    code, data, _ = run(capsys, "cost", "--model", model, "--num-classes", str(classes), "--input-shape", "3,32,32",
                        "--convention", "paper", "--json")
    assert code == 0 and data["flops"] == flops and data["convention"] == "paper"
    assert sum(layer["flops"] for layer in data["layers"]) == flops


@pytest.fixture(scope="module")
def evaluated(resnet18_digits, tmp_path_factory):
    """All layers tabled at C=8, K=64 on the trained ResNet-18 (tables cached for later commands)."""
    tmp = tmp_path_factory.mktemp("cli")
    cache = str(tmp / "cache")
    config = tmp / "all-table.json"
    code = main(["evaluate", "--checkpoint", str(resnet18_digits), "--all-table", "--codebooks", "8",
                 "--centroids", "64", *CALIB, "--cache-dir", cache, "--save-config", str(config), "--json"])
    assert code == 0
    return tmp, cache, config


def test_evaluate_all_table_reports_both_conventions(evaluated, resnet18_digits, capsys):
    tmp, cache, config = evaluated
    code, data, _ = run(capsys, "evaluate", "--checkpoint", str(resnet18_digits), "--config", str(config), *CALIB,
                        "--cache-dir", cache, "--json")
    assert code == 0
    assert data["baseline_accuracy"] >= 0.90 and data["eval_images"] == 450
    assert data["flops_paper"] < data["baseline_flops"] and data["flops_full"] > data["flops_paper"]
    assert data["storage_bytes"] == data["weight_bytes"] + data["table_bytes"] + data["prototype_bytes"]
    assert data["table_bytes"] > 0 and data["baseline_storage_bytes"] > 0
    names = [layer["name"] for layer in data["layers"]]
    assert names[0] == "conv1" and "layer3.1.conv2" in names and names[-1] == "fc"
    assert all(layer["mode"] == "table" and layer["cosine"] is not None for layer in data["layers"])
    saved = json.loads(config.read_text())
    assert set(saved["layers"]) == set(names) and saved["metrics"]["eval_images"] == 450
    assert data["correct"] == round(data["accuracy"] * 450) and data["accuracy_ci95"] == list(wilson(data["correct"],
                                                                                                     450))
    versus = data["vs_exact"]
    assert data["p_value_vs_exact"] == versus["p_value"] == mcnemar_p(versus["only_exact_correct"],
                                                                      versus["only_this_correct"])
    baseline_correct = round(data["baseline_accuracy"] * 450)
    assert versus["only_this_correct"] - versus["only_exact_correct"] == data["correct"] - baseline_correct
    assert versus["images"] == 450 and versus["significant"] == (versus["p_value"] < 0.05)


def test_evaluate_prints_the_interval_and_whether_the_change_is_noise(evaluated, resnet18_digits, capsys):
    tmp, cache, config = evaluated
    code, out, _ = run(capsys, "evaluate", "--checkpoint", str(resnet18_digits), "--config", str(config), *CALIB,
                       "--cache-dir", cache)
    assert code == 0
    accuracy = re.search(r"test accuracy (\d+\.\d\d)% \(95% CI (\d+\.\d)-(\d+\.\d)%, 450 images\)", out)
    assert accuracy and float(accuracy[2]) <= float(accuracy[1]) <= float(accuracy[3]), out
    assert re.search(r"vs the exact network: \d+\.\d\d% -> \d+\.\d\d%, (within noise|significant) "
                     r"\(p[=<][\d.]+, McNemar on 450 images\): \d+ images right only with the exact network, "
                     r"\d+ only with this one", out), out


def test_a_configuration_naming_a_missing_layer_is_refused(evaluated, resnet18_digits, capsys):
    tmp, cache, config = evaluated
    data = json.loads(config.read_text())
    data["layers"]["layer3.5.conv2"] = {"mode": "table"}
    bad = tmp / "bad.json"
    bad.write_text(json.dumps(data))
    code, out, err = run(capsys, "evaluate", "--checkpoint", str(resnet18_digits), "--config", str(bad), *CALIB,
                         "--cache-dir", cache)
    assert code == 2 and "layer3.5.conv2" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_priority_and_greedy_keep_93_percent(evaluated, resnet18_digits, capsys):
    tmp, cache, _ = evaluated
    results = {}
    for strategy in ("priority", "greedy"):
        out = tmp / f"{strategy}.json"
        code, data, err = run(capsys, "search", "--checkpoint", str(resnet18_digits), "--strategy", strategy,
                              "--min-retention", "0.93", "--codebooks", "8", "--centroids", "64", *CALIB,
                              "--cache-dir", cache, "--out", str(out), "--max-evaluations", "150", "--json",
                              "--no-confirm")
        assert code == 0, err
        assert data["retention"] >= 0.93 and data["flops_paper"] < data["baseline_flops"]
        low, high = data["accuracy_ci95"]
        assert low <= data["accuracy"] <= high and 0 <= data["p_value_vs_exact"] <= 1
        assert json.loads(out.read_text())["metrics"]["retention"] == data["retention"]
        results[strategy] = data
    assert results["greedy"]["flops_reduction_paper"] >= results["priority"]["flops_reduction_paper"]


def test_evaluate_reports_measured_latency_and_search_minimises_it(evaluated, resnet18_digits, capsys):
    """Measured time beside the counted FLOPs: per layer and end to end, and a greedy search by latency."""
    tmp, cache, config = evaluated
    code, out, _ = run(capsys, "evaluate", "--checkpoint", str(resnet18_digits), "--config", str(config), *CALIB,
                       "--cache-dir", cache, "--latency-batch", "8")
    assert code == 0 and "latency measured on this machine (batch 8" in out
    code, data, _ = run(capsys, "evaluate", "--checkpoint", str(resnet18_digits), "--config", str(config), *CALIB,
                        "--cache-dir", cache, "--latency-batch", "8", "--json")
    assert code == 0 and data["latency_batch"] == 8 and data["latency_ms"] > 0
    assert data["latency_speedup"] == pytest.approx(data["baseline_latency_ms"] / data["latency_ms"])
    assert {row["name"] for row in data["layers"]} == set(data["latency_layers_ms"])
    assert all(row["latency_ms"] > 0 and row["exact_latency_ms"] > 0 for row in data["layers"])
    code, data, _ = run(capsys, "evaluate", "--checkpoint", str(resnet18_digits), "--config", str(config), *CALIB,
                        "--cache-dir", cache, "--no-latency", "--json")
    assert code == 0 and "latency_ms" not in data
    out_file = tmp / "latency-search.json"
    code, data, err = run(capsys, "search", "--checkpoint", str(resnet18_digits), "--strategy", "greedy",
                          "--convention", "latency", "--min-retention", "0.9", "--codebooks", "8", "--centroids", "16",
                          "--encoder", "tree", "--lut-dtype", "int8", *CALIB, "--cache-dir", cache,
                          "--latency-batch", "8", "--max-evaluations", "20", "--eval-images", "200",
                          "--out", str(out_file), "--json")
    assert code == 0, err
    assert data["retention"] >= 0.9 and data["latency_ms"] <= data["baseline_latency_ms"]
    code, _, err = run(capsys, "search", "--checkpoint", str(resnet18_digits), "--strategy", "greedy",
                       "--convention", "latency", "--no-latency", "--min-retention", "0.9", "--out", str(out_file))
    assert code == 2 and "drop --no-latency" in err


def test_sensitivity_and_cache_commands(evaluated, resnet18_digits, capsys):
    tmp, cache, _ = evaluated
    code, data, _ = run(capsys, "sensitivity", "--checkpoint", str(resnet18_digits), *CALIB, "--cache-dir", cache,
                        "--eval-images", "100", "--json")
    assert code == 0 and len(data["layers"]) == 21 and data["eval_images"] == 100
    assert data["baseline_accuracy_ci95"] == list(wilson(round(data["baseline_accuracy"] * 100), 100))
    for row in data["layers"]:
        for side in ("only_table", "only_exact"):
            cell = row[side]
            assert cell["accuracy_ci95"] == list(wilson(round(cell["accuracy"] * 100), 100))
            assert 0 <= cell["p_value_vs_exact"] <= 1 and cell["significant_vs_exact"] == (cell["p_value_vs_exact"]
                                                                                           < 0.05)
    code, data, _ = run(capsys, "cache", "ls", "--cache-dir", cache, "--json")
    assert code == 0 and data["entries"] >= 21 and data["bytes"] > 0
    code, data, _ = run(capsys, "cache", "clear", "--cache-dir", cache, "--json")
    assert code == 0 and data["removed"] >= 21


def test_train_and_finetune_report_intervals_and_the_test_against_the_parent(tmp_path, capsys):
    checkpoint = tmp_path / "tiny-digits.pt"
    code, trained, _ = run(capsys, "train", "--model", "tiny", "--dataset", "digits", "--epochs", "3", "--out",
                           str(checkpoint), "--json")
    assert code == 0
    test_images = trained["test_images"]
    assert trained["test_accuracy_ci95"] == list(wilson(round(trained["test_accuracy"] * test_images), test_images))
    calib = ["--calibration-images", "256", "--max-rows", "4096", "--cache-dir", str(tmp_path / "cache")]
    start = tmp_path / "start.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--all-table", "-C", "4", "-K", "8", *calib,
                 "--save-config", str(start), "--eval-skip", str(test_images // 2), "--json"]) == 0
    parent = json.loads(capsys.readouterr().out)  # on the images fine-tuning reports on: after its held-out ones
    code, data, err = run(capsys, "finetune", "--checkpoint", str(checkpoint), "--config", str(start), "--steps",
                          "10", "--images", "256", *calib, "--out", str(tmp_path / "tuned.json"), "--json")
    assert code == 0, err
    assert data["parent_accuracy_ci95"] == parent["accuracy_ci95"]
    versus = data["vs_parent"]
    assert data["p_value_vs_parent"] == mcnemar_p(versus["only_parent_correct"], versus["only_this_correct"])
    assert versus["only_this_correct"] - versus["only_parent_correct"] == data["correct"] - parent["correct"]
    assert data["accuracy_ci95"] == list(wilson(data["correct"], data["eval_images"]))


def test_a_search_says_its_number_is_optimistic_and_how_to_measure_it_on_unseen_images(evaluated, resnet18_digits,
                                                                                       capsys):
    tmp, cache, _ = evaluated
    out = tmp / "searched.json"
    code, text, err = run(capsys, "search", "--checkpoint", str(resnet18_digits), "--strategy", "priority",
                          "--min-retention", "0.93", "--codebooks", "8", "--centroids", "64", *CALIB,
                          "--cache-dir", cache, "--eval-images", "300", "--out", str(out), "--no-confirm")
    assert code == 0, err
    assert "not confirmed (--no-confirm): chosen on these test images, so this accuracy is optimistic" in text
    assert f"evaluate --config {out} --eval-skip 300` measures it on test images the search never saw" in text
    code, chosen, _ = run(capsys, "evaluate", "--checkpoint", str(resnet18_digits), "--config", str(out),
                          "--cache-dir", cache, "--eval-images", "300", "--json")
    code, unseen, _ = run(capsys, "evaluate", "--checkpoint", str(resnet18_digits), "--config", str(out),
                          "--cache-dir", cache, "--eval-skip", "300", "--json")
    assert code == 0 and unseen["eval_first"] == 300 and unseen["eval_images"] == 150 and chosen["eval_first"] == 0
    assert unseen["flops_paper"] == chosen["flops_paper"]  # the same configuration, measured on other images
    code, text, _ = run(capsys, "evaluate", "--checkpoint", str(resnet18_digits), "--config", str(out),
                        "--cache-dir", cache, "--eval-skip", "300")
    assert "(test images 300-449)" in text
    code, _, err = run(capsys, "evaluate", "--checkpoint", str(resnet18_digits), "--all-exact", "--eval-skip", "450")
    assert code == 2 and "cannot leave out the first 450" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["evaluate", "--checkpoint", "/nonexistent.pt", "--all-exact"], "no such checkpoint"),
    (["evaluate", "--checkpoint", __file__, "--all-exact"], "not a PyTorch checkpoint"),
    (["cost", "--model", "resnet18", "--num-classes", "10", "--input-shape", "3,32,32", "--config", "/none.json"],
     "no such configuration file"),
])
def test_bad_input_exits_2_with_one_line(capsys, args, message):
    code, _, err = run(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_module_entry_point_and_argument_errors():
    ok = subprocess.run([sys.executable, "-m", "tabconv", "cost", "--model", "tiny", "--num-classes", "3",
                         "--input-shape", "1,8,8"], capture_output=True, text=True)
    assert ok.returncode == 0 and "FLOPs (paper convention)" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "tabconv", "evaluate", "--checkpoint", "x.pt", "--all-table",
                          "--codebooks", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "positive integer" in bad.stderr


def test_a_search_can_fine_tune_what_it_confirms(evaluated, resnet18_digits, capsys):
    """With --finetune the search asks its own (lower) retention of untuned tables, then fine-tunes the choice,
    checking on the search's images, and judges the target on the confirmation images; the file written holds the
    fine-tuned tables that were confirmed, so evaluating it on those images gives the same accuracy."""
    tmp, cache, _ = evaluated
    out = tmp / "tuned-search.json"
    code, data, err = run(capsys, "search", "--checkpoint", str(resnet18_digits), "--strategy", "priority",
                          "--min-retention", "0.95", "--search-retention", "0.85", "--finetune", "--steps", "10",
                          "--finetune-images", "256", "--codebooks", "8", "--centroids", "64", *CALIB,
                          "--cache-dir", cache, "--out", str(out), "--json")
    assert code == 0, err
    check = data["confirmation"]
    assert check["finetuned"] and check["chosen"]["retention_searched"] >= 0.85
    assert check["chosen_finetuned_searched"]["accuracy"] > 0
    assert data["retention"] >= 0.95 or not check["accepted"]["table_layers"]
    saved = json.loads(out.read_text())
    assert saved["tables_file"] == out.name.removesuffix(".json") + ".tables.pt" and saved["tables_sha256"]
    assert saved["finetune"]["held_out_from"] == "digits test images 0-224"
    code, again, err = run(capsys, "evaluate", "--checkpoint", str(resnet18_digits), "--config", str(out),
                           "--eval-skip", "225", "--cache-dir", cache, "--no-latency", "--json")
    assert code == 0, err
    assert (again["eval_first"], again["eval_images"], again["accuracy"]) == (225, 225, data["accuracy"])
    code, _, err = run(capsys, "search", "--checkpoint", str(resnet18_digits), "--strategy", "priority",
                       "--min-retention", "0.95", "--search-retention", "0.85", *CALIB, "--out", str(out))
    assert code == 2 and "add --finetune" in err


def test_a_search_confirms_its_choice_on_test_images_it_did_not_choose_on(evaluated, resnet18_digits, capsys):
    """By default a search chooses on the first half of the test images (at most 1,000) and confirms on the rest:
    the configuration written, and the numbers printed, are the confirmed ones."""
    tmp, cache, _ = evaluated
    out = tmp / "confirmed.json"
    code, data, err = run(capsys, "search", "--checkpoint", str(resnet18_digits), "--strategy", "priority",
                          "--min-retention", "0.97", "--codebooks", "8", "--centroids", "64", *CALIB,
                          "--cache-dir", cache, "--out", str(out), "--json")
    assert code == 0, err
    check = data["confirmation"]
    assert check["search_images"] == [0, 225] and check["confirmation_images"] == [225, 225]
    assert (data["eval_first"], data["eval_images"]) == (225, 225)
    assert data["retention"] >= 0.97 and check["accepted"]["retention_confirmed"] == data["retention"]
    assert check["chosen"]["retention_searched"] >= 0.97
    assert all(step["retention_confirmed"] < 0.97 for step in check["backoffs"][:-1])
    assert len(check["accepted"]["table_layers"]) == len(check["chosen"]["table_layers"]) - len(check["backoffs"])
    saved = json.loads(out.read_text())["metrics"]
    assert (saved["eval_images"], saved["retention"]) == (225, data["retention"])
    code, text, _ = run(capsys, "search", "--checkpoint", str(resnet18_digits), "--strategy", "priority",
                        "--min-retention", "0.97", "--codebooks", "8", "--centroids", "64", *CALIB,
                        "--cache-dir", cache, "--out", str(out), "--eval-images", "300", "--confirm-images", "100")
    assert code == 0 and "chosen on test images 0-299, confirmed on 300-399" in text
    code, _, err = run(capsys, "search", "--checkpoint", str(resnet18_digits), "--strategy", "priority",
                       "--min-retention", "0.97", *CALIB, "--cache-dir", cache, "--out", str(out),
                       "--eval-images", "450")
    assert code == 2 and "no test images left to confirm on" in err and "--no-confirm" in err
