"""The results registry: documents equal what it renders, prose re-types no measured number, claims match their
configuration files, bad claims are refused in one line, and `reproduce` re-measures a claim."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tabconv import cli, config, registry
from tabconv.registry import ClaimError

ROOT = registry.ROOT
CLAIMS = registry.load()

# Numbers in hand-written text that are not results of this project. Each entry: a pattern and why it may stay.
ALLOWED = (
    (r"test accuracy 67\.56% \(95% CI 63\.1-71\.7%, 450 images\)|97\.56% -> 67\.56%", "an example of the output"),
    (r"(?i)(?:>=|≥|<=|≤|at least|target(?:'s)?|goal)\s*\(?\s*\d+(?:\.\d+)?\s*(?:%|x\b)", "a target or goal"),
    (r"paper(?:'s)?[^|.;]{0,40}?\d+(?:\.\d+)?\s?(?:%|×|x\b)", "the paper's own published number"),
    (r"95% (?:interval|CI|confidence)|intervals \(95%\)", "the confidence level of an interval"),
    (r"\b\d+%\s*\(at least one image\)", "a setting: the image folder's evaluation split"),
)
MEASURED = re.compile(r"(?<![\w.])[-−+]?\d+(?:[.,]\d+)*\s?(?:%|x\b|×(?!\s?\d)|ms\b|µs\b)")


def _hand_written(path: Path) -> str:
    text = registry.strip_generated(path.read_text())
    for pattern, _ in ALLOWED:
        text = re.sub(pattern, "", text)
    return text


def measured_numbers(path: Path) -> list[str]:
    """Measured-looking numbers (percentages, ratios, milliseconds) in a document's hand-written text."""
    return [f"{path.name}:{text[:m.start()].count(chr(10)) + 1}: {m.group()}"
            for text in [_hand_written(path)] for m in MEASURED.finditer(text)]


CHANGELOG = ROOT / "docs" / "changelog.md"  # a dated journal of what was measured when: history, not claims


@pytest.mark.parametrize("path", [p for p in registry.documents() if p != CHANGELOG], ids=lambda p: p.name)
def test_documents_equal_what_the_registry_renders(path: Path) -> None:
    text = path.read_text()
    assert registry.render_text(text, CLAIMS, path.name) == text, \
        f"{path.name} is stale: run python -m tabconv.registry render"


@pytest.mark.parametrize("path", [p for p in registry.documents() if p != CHANGELOG], ids=lambda p: p.name)
def test_no_measured_number_outside_generated_parts(path: Path) -> None:
    assert measured_numbers(path) == [], "cite a claim or use an inline span <!--c:CLAIM.field-->…<!--/c-->"


def test_a_hand_edited_number_fails_both_checks(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    match = registry.SPAN.search(readme) or registry.BLOCK.search(readme)
    assert match, "the README has generated parts"
    edited = readme.replace(match.group(0), match.group(0).replace("%", "1%", 1), 1)
    assert registry.render_text(edited, CLAIMS) != edited
    typed = tmp_path / "README.md"
    typed.write_text(readme + "\nThe tabled network keeps 93.8% at a 4.6x speed-up in 12 ms.\n")
    assert len(measured_numbers(typed)) == 3


@pytest.mark.parametrize("claim", [c for c in CLAIMS.values() if c.config], ids=lambda c: c.id)
def test_a_claims_configuration_file_records_its_accuracy(claim: registry.Claim) -> None:
    metrics = config.load(ROOT / claim.config).metrics
    assert metrics is not None and metrics["accuracy"] == claim.accuracy
    assert metrics["eval_images"] == claim.images


def test_every_accuracy_says_its_images_and_whether_they_chose_it() -> None:
    for claim in CLAIMS.values():
        if claim.kind == "accuracy":
            assert claim.held_out is not None and claim.images_which.startswith("test "), claim.id
            low, high = claim.accuracy_ci95
            assert low <= claim.accuracy <= high, claim.id


def _one_claim(tmp_path: Path, **changes) -> Path:
    data = {**registry.claim_to_dict(CLAIMS["resnet18-mnist-greedy"]), **changes}
    path = tmp_path / "claims.json"
    path.write_text(json.dumps({"claims": [{k: v for k, v in data.items() if v is not None}]}))
    return path


@pytest.mark.parametrize("field", ["accuracy", "images_which", "held_out", "source", "note"])
def test_a_claim_missing_a_required_field_is_refused_in_one_line(tmp_path: Path, field: str) -> None:
    with pytest.raises(ClaimError) as err:
        registry.load(_one_claim(tmp_path, **{field: None}))
    message = str(err.value)
    assert "\n" not in message and f"missing the required field {field!r}" in message
    assert "resnet18-mnist-greedy" in message


def test_unknown_fields_and_wrong_image_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ClaimError, match="unknown field 'acuracy'"):
        registry.load(_one_claim(tmp_path, acuracy=0.9))
    with pytest.raises(ClaimError, match="is not 8999 images"):
        registry.load(_one_claim(tmp_path, images=8999))


def test_spans_render_values_in_their_units() -> None:
    claim = CLAIMS["resnet18-mnist-greedy"]
    text = "<!--c:resnet18-mnist-greedy.accuracy-->x<!--/c--> <!--c:resnet18-mnist-greedy.retention:2-->x<!--/c-->"
    assert registry.render_text(text, CLAIMS) == (
        f"<!--c:resnet18-mnist-greedy.accuracy-->{claim.accuracy:.2%}<!--/c--> "
        f"<!--c:resnet18-mnist-greedy.retention:2-->{claim.retention:.2%}<!--/c-->")
    with pytest.raises(ClaimError, match="no claim 'resnet18-mnist-gredy'.*resnet18-mnist-greedy"):
        registry.render_text("<!--c:resnet18-mnist-gredy.accuracy-->x<!--/c-->", CLAIMS)


# -- reproduce, on a tiny model and the embedded digits ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_claim(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A registry (under docs/) with one claim: a tiny model's configuration measured on test images 50-149."""
    from tabconv.config import Calibration
    from tabconv.session import Session
    from tabconv.settings import LayerSetting
    from tabconv.train import save_checkpoint, weights_sha256
    from tests.helpers import model

    root = tmp_path_factory.mktemp("project")
    net = model("tiny")
    checkpoint = root / "tiny-digits.pt"
    save_checkpoint(checkpoint, net, {"model": "tiny", "num_classes": 10, "input_shape": [1, 32, 32],
                                      "dataset": "digits"})
    session = Session.from_checkpoint(str(checkpoint), calibration=Calibration(images=64), eval_images=100,
                                      eval_skip=50)
    settings = session.uniform(LayerSetting("table", 2, 8))
    metrics = session.apply(settings).metrics
    (root / "docs").mkdir()
    session.configuration(metrics).save(root / "docs" / "tiny.json")
    claim = {"id": "tiny-digits", "title": "every layer C=2, K=8", "kind": "accuracy", "group": "test",
             "model": "tiny", "dataset": "digits", "source": "docs/tiny.json", "note": "", "config": "docs/tiny.json",
             "checkpoint_sha256": weights_sha256(net.state_dict()), "checkpoint_from": "tests/test_registry.py",
             "images": 100, "images_which": "test 50-149", "held_out": True, "accuracy": metrics.accuracy,
             "accuracy_ci95": list(metrics.accuracy_ci95), "baseline_accuracy": metrics.baseline_accuracy,
             "retention": metrics.retention}
    registry_path = root / "docs" / "claims.json"
    registry_path.write_text(json.dumps({"claims": [claim, {**claim, "id": "tiny-speed", "kind": "speed",
                                                            "config": None, "command": "python bench/latency.py"}]}))
    return registry_path, checkpoint


def test_reproduce_re_measures_a_claim(tiny_claim, capsys, tmp_path: Path) -> None:
    registry_path, checkpoint = tiny_claim
    argv = ["reproduce", "tiny-digits", "--registry", str(registry_path), "--checkpoint", str(checkpoint),
            "--cache-dir", str(tmp_path), "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["match"] and result["measured_images"] == 100 and result["difference"] == 0


def test_reproduce_reports_a_difference_and_fails(tiny_claim, capsys, tmp_path: Path) -> None:
    registry_path, checkpoint = tiny_claim
    data = json.loads(registry_path.read_text())
    data["claims"][0]["accuracy"] -= 0.01
    data["claims"][0]["accuracy_ci95"] = [0.0, 1.0]
    edited = registry_path.with_name("edited.json")
    edited.write_text(json.dumps(data))
    assert cli.main(["reproduce", "tiny-digits", "--registry", str(edited), "--checkpoint", str(checkpoint),
                     "--cache-dir", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert "DIFFERS" in out.out and "+1.0000 points" in out.out and "not reproduced" in out.err


def test_reproduce_refuses_another_checkpoint_in_one_line(tiny_claim, capsys, tmp_path: Path) -> None:
    from tabconv.train import save_checkpoint
    from tests.helpers import model

    registry_path, _ = tiny_claim
    other = tmp_path / "other.pt"
    save_checkpoint(other, model("tiny", seed=1), {"model": "tiny", "num_classes": 10, "input_shape": [1, 32, 32],
                                                   "dataset": "digits"})
    assert cli.main(["reproduce", "tiny-digits", "--registry", str(registry_path), "--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(other) in err and "comes from `tests/test_registry.py`" in err


def test_reproduce_says_when_a_claim_cannot_be_re_run(tiny_claim, capsys) -> None:
    registry_path, checkpoint = tiny_claim
    assert cli.main(["reproduce", "tiny-speed", "--registry", str(registry_path), "--checkpoint",
                     str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no configuration to re-run" in err and "python bench/latency.py" in err


def test_reproduce_retargets_a_claim_to_another_checkpoint(tiny_claim, capsys, tmp_path: Path) -> None:
    """A checkpoint trained anew cannot give the recorded number: --retarget rebuilds the configuration's tables from
    it and judges the recorded accuracy against the measured one's 95% interval (on the claim's own checkpoint the
    rebuilt tables are the same, so the number is too)."""
    from tabconv.train import save_checkpoint
    from tests.helpers import model

    registry_path, checkpoint = tiny_claim
    base = ["reproduce", "tiny-digits", "--registry", str(registry_path), "--cache-dir", str(tmp_path), "--retarget"]
    assert cli.main([*base, "--checkpoint", str(checkpoint), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["retargeted"] and same["match"] and same["difference"] == 0
    other = tmp_path / "other.pt"
    save_checkpoint(other, model("tiny", seed=1), {"model": "tiny", "num_classes": 10, "input_shape": [1, 32, 32],
                                                   "dataset": "digits"})
    code = cli.main([*base, "--checkpoint", str(other)])
    out = capsys.readouterr()
    session_accuracy = float(re.search(r"measured ([\d.]+)% on 100, 95% CI ([\d.]+)%-([\d.]+)%", out.out)[1]) / 100
    recorded = json.loads(registry_path.read_text())["claims"][0]["accuracy"]
    low, high = (float(v) / 100 for v in re.search(r"95% CI ([\d.]+)%-([\d.]+)%", out.out).groups())
    assert "(retargeted to another checkpoint)" in out.out and 0 <= session_accuracy <= 1
    assert code == (0 if low <= recorded <= high else 2)


def test_the_images_column_says_what_the_images_decided() -> None:
    base = {"id": "x", "title": "t", "kind": "accuracy", "group": "g", "model": "m", "dataset": "d", "source": "s",
            "note": "", "images": 9000, "images_which": "test 1000-9999", "accuracy": 0.9,
            "accuracy_ci95": [0.89, 0.91], "baseline_accuracy": 0.95, "retention": 0.95}
    text = {name: registry.images_text(registry.claim_from_dict({**base, **extra})) for name, extra in {
        "held out": {"held_out": True}, "chosen": {"held_out": False},
        "back-off": {"held_out": False, "values": {"backoffs": 1}}}.items()}
    assert text == {"held out": "9,000 (test 1000-9999), not chosen on",
                    "chosen": "9,000 (test 1000-9999), chosen on them",
                    "back-off": "9,000 (test 1000-9999), its back-off stopped on them"}
