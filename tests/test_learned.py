"""Learned tables: least-squares refit, classifier refit, sub-vector length, fine-tuning, the tables file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tabconv import config as config_file
from tabconv import finetune as finetuning
from tabconv.calibrate import refit_linear
from tabconv.cli import main
from tabconv.config import Calibration, ConfigError
from tabconv.finetune import TrainableTables, finetune
from tabconv.lowering import bias_vector, im2col, patch_columns, weight_matrix
from tabconv.quantizer import DegenerateCodebookWarning, ProductQuantizer
from tabconv.session import GivenTables, Session
from tabconv.settings import LayerSetting
from tabconv.tablesfile import TablesFileError, load_tables, save_tables, tables_bytes, tables_sha256
from tabconv.train import train_and_save

ROOT = Path(__file__).resolve().parent.parent


def test_least_squares_tables_reproduce_any_target_when_k_covers_the_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 12, generator=g)  # 16 distinct rows, K = 16: every codebook can give each its own code
    w, b = torch.randn(12, 5, generator=g), torch.randn(5, generator=g)
    target = torch.randn(16, 5, generator=g)  # not even x @ w: least squares must still hit it
    with pytest.warns(DegenerateCodebookWarning):
        pq = ProductQuantizer(3, 16).fit(x).set_weight(w, b)
    assert (pq(x) - target).abs().max() > 0.5
    assert pq.refit_tables(x, target, ridge=1e-6) is pq
    torch.testing.assert_close(pq(x), target, atol=1e-3, rtol=1e-3)


def test_least_squares_corrects_the_error_an_approximated_upstream_brings():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 24, generator=g)
    w, b = torch.randn(24, 6, generator=g), torch.randn(6, generator=g)
    exact = x @ w + b
    received = 0.7 * x + 0.3  # what an approximated upstream delivers: a systematic error
    for dtype in ("float32", "int8"):
        pq = ProductQuantizer(4, 8, lut_dtype=dtype).fit(received).set_weight(w, b)
        before = (pq(received) - exact).square().mean()
        pq.refit_tables(received, exact, ridge=0.01)
        assert (pq(received) - exact).square().mean() < 0.9 * before  # 0.86 here: the rest is quantization
        assert pq.tables_.dtype == getattr(torch, dtype)
    unused = ProductQuantizer(1, 4).fit(x[:, :2]).set_weight(w[:2], b)
    prior = unused.table_values().clone()
    codes = unused.encode(x[:, :2])[:, 0]
    keep = codes != codes[0]  # rows that never use code codes[0]
    unused.refit_tables(x[keep, :2], exact[keep], ridge=0.01)
    torch.testing.assert_close(unused.table_values()[0, codes[0]], prior[0, codes[0]])  # no data: stays at prior


def test_refit_tables_refuses_wrong_targets_and_ridge():
    x = torch.randn(100, 8)
    pq = ProductQuantizer(2, 4).fit(x).set_weight(torch.randn(8, 3))
    with pytest.raises(ValueError, match="targets of shape"):
        pq.refit_tables(x, torch.randn(100, 4))
    with pytest.raises(ValueError, match="ridge"):
        pq.refit_tables(x, torch.randn(100, 3), ridge=0)


def test_classifier_refit_recovers_the_weights_that_map_features_to_the_targets():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(500, 10, generator=g)
    w_true, b_true = torch.randn(10, 4, generator=g), torch.randn(4, generator=g)
    target = features @ w_true + b_true
    w, b = refit_linear(features, target, torch.zeros(10, 4), torch.zeros(4), ridge=1e-8)
    torch.testing.assert_close(w, w_true, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, b_true, atol=1e-4, rtol=1e-4)


def test_calibration_validates_the_fit_method():
    with pytest.raises(ConfigError, match="calibration.fit"):
        Calibration(fit="magic")
    with pytest.raises(ConfigError, match="ridge"):
        Calibration(ridge=0)
    with pytest.raises(ConfigError, match="refit_classifier"):
        Calibration(refit_classifier="yes")


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory) -> Path:
    """The tiny CNN trained on the embedded digits (seconds)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-digits.pt"
    train_and_save("tiny", "digits", path, epochs=3)
    return path


def _session(checkpoint: Path, **calibration) -> Session:
    return Session.from_checkpoint(str(checkpoint), calibration=Calibration(images=256, max_rows=4096, **calibration))


def test_least_squares_tables_beat_kmeans_on_a_trained_model_and_key_the_cache_right(tiny_digits):
    setting = LayerSetting("table", 4, 8)
    results = {}
    for fit, mode in (("kmeans", "independent"), ("least-squares", "independent"), ("least-squares", "sequential")):
        session = _session(tiny_digits, fit=fit, mode=mode, ridge=0.01)
        metrics = session.apply(session.uniform(setting)).metrics
        assert session.unbuilt(session.uniform(setting)) == []  # built ones are known, upstream keys included
        changed = {**session.uniform(setting), session.structure.names[0]: setting.with_(centroids=4)}
        assert session.unbuilt(changed) == (session.structure.names if mode == "sequential" else
                                            session.structure.names[:1])
        last = session.structure.names[-1]
        results[fit, mode] = metrics.errors[last].relative_error
        first, later = session.structure.names[0], session.structure.names[1]
        upstream = {first: setting}
        assert ("upstream" in session.builder.key_parts(later, setting, upstream)) == (mode == "sequential")
    assert results["least-squares", "independent"] < results["kmeans", "independent"]
    assert results["least-squares", "sequential"] < results["kmeans", "independent"]


def test_classifier_refit_makes_the_classifier_depend_on_upstream_only(tiny_digits):
    session = _session(tiny_digits, refit_classifier=True)
    names, setting = session.structure.names, LayerSetting("table", 4, 8)
    assert "upstream" in session.builder.key_parts(names[-1], setting, {names[0]: setting})
    assert "upstream" not in session.builder.key_parts(names[1], setting, {names[0]: setting})
    refit = session.apply(session.uniform(setting)).metrics
    plain = _session(tiny_digits).apply(session.uniform(setting)).metrics
    assert refit.errors[names[-1]].relative_error < plain.errors[names[-1]].relative_error


def test_subvector_sets_each_layers_codebooks_and_its_cost(tiny_digits):
    session = _session(tiny_digits)
    settings = session.complete(session.uniform(LayerSetting("table", 8, 16, subvector=9)))
    for info in session.structure.layers:
        assert settings[info.name].codebooks == math.ceil(info.inner_dim / 9)
        assert settings[info.name].subvector == 9
    paper, _ = session.costs(settings)
    by_name = {layer.name: layer for layer in paper.layers}
    info = session.structure.layers[1]
    rows, c = info.rows_per_image, settings[info.name].codebooks
    assert by_name[info.name].lookup_adds == rows * info.out_features * (c - 1)  # R*M*(C-1) additions per image
    assert by_name[info.name].table_bytes == c * 16 * info.out_features * 4
    with pytest.raises(ValueError, match="subvector"):
        LayerSetting("table", subvector=0)


def test_finetuning_lowers_the_loss_and_raises_accuracy(tiny_digits):
    session = _session(tiny_digits)
    before = session.apply(session.uniform(LayerSetting("table", 4, 8))).metrics
    images = session.calibration_set.normalize(session.calibration_set.images)
    quantizers = session.quantizers(before)
    snapshot = {n: q.tables_.clone() for n, q in quantizers.items()}
    tuned, report = finetune(session.model, session.structure, quantizers, images, steps=120, lr=3e-3)
    assert report.loss_after < 0.8 * report.loss_before
    assert len(report.loss_curve) >= 10 and report.loss_curve[-1][0] == 120
    for name, quantizer in quantizers.items():  # the shared (cached) tables are never trained in place
        assert torch.equal(quantizer.tables_, snapshot[name])
        assert not torch.equal(tuned[name].tables_, snapshot[name])
    after = session.apply(before.settings, tables=GivenTables("tuned", tuned)).metrics
    assert after.accuracy > before.accuracy
    assert after.tables_sha256 == "tuned"


def test_the_straight_through_forward_is_the_inference_forward_and_trees_learn_thresholds():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(512, 16, generator=g), torch.randn(16, 4, generator=g)
    for encoder in ("exhaustive", "tree"):
        pq = ProductQuantizer(4, 8, encoder=encoder).fit(x).set_weight(w)
        trainable = TrainableTables(pq)
        out = trainable(x)
        torch.testing.assert_close(out, pq(x), atol=1e-5, rtol=1e-5)
        out.square().sum().backward()
        learned = trainable.thresholds if encoder == "tree" else trainable.prototypes
        assert learned.grad is not None and learned.grad.abs().sum() > 0
        assert trainable.tables.grad.abs().sum() > 0 and trainable.log_temperature.grad is not None


def _reference_soft(trainable: TrainableTables, pq: ProductQuantizer, xs: torch.Tensor) -> torch.Tensor:
    """The soft assignment (C', N, K) by its definition: softmax over distances (exhaustive), or the product of
    sigmoid decisions along each root-to-leaf path, read level by level from the subspace rows xs (tree)."""
    if not trainable.tree:
        return trainable._nearest_assign(xs)[0]
    temperature = trainable.log_temperature.exp() * trainable.scale
    codebooks, rows, _ = xs.shape
    prob = xs.new_ones(codebooks, rows, 1)
    for level in range(pq.split_dims_.shape[1]):
        nodes = slice(2**level - 1, 2 ** (level + 1) - 1)
        value = xs.gather(2, pq.split_dims_[:, level].view(-1, 1, 1).expand(codebooks, rows, 1))
        right = torch.sigmoid((value - trainable.thresholds[:, nodes].unsqueeze(1)) / temperature)
        right = right * trainable.finite[:, nodes].unsqueeze(1)
        prob = torch.stack([prob * (1 - right), prob * right], dim=-1).reshape(codebooks, rows, -1)
    return prob


@pytest.mark.parametrize(("encoder", "groups"), [("exhaustive", 1), ("exhaustive", 2), ("tree", 1)])
def test_the_lookup_and_soft_path_give_the_dense_straight_through_gradients(encoder, groups):
    """The fine-tuning forward (looked-up rows plus a soft path that only carries gradient) against the dense
    straight-through formula it replaces: (one-hot - soft.detach() + soft) times the tables, per group."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(300, 16, generator=g), torch.randn(16 // groups, 6, generator=g)
    pq = ProductQuantizer(4, 8, encoder=encoder, groups=groups).fit(x).set_weight(w)
    trainable = TrainableTables(pq)
    upstream = x.clone().requires_grad_(True)
    out = trainable(upstream)
    grad_out = torch.randn(out.shape, generator=g)
    params = [upstream, trainable.tables, trainable.log_temperature,
              trainable.thresholds if encoder == "tree" else trainable.prototypes]
    fast = torch.autograd.grad(out, params, grad_out)

    soft = _reference_soft(trainable, pq, pq.subspaces(upstream))
    assign = torch.nn.functional.one_hot(pq.encode(x).t(), 8).float() - soft.detach() + soft
    flat = assign.permute(1, 0, 2).reshape(len(x), groups, -1)
    dense = torch.einsum("ngk,gkm->ngm", flat, trainable.tables.reshape(groups, -1, 6 // groups)).reshape(len(x), -1)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, pq(x), atol=1e-5, rtol=1e-5)
    reference = torch.autograd.grad(dense, params, grad_out)
    for got, want in zip(fast, reference, strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 1, 1), (2, 3, 1), (1, 2, 2)])
def test_a_tree_conv_reads_its_split_columns_from_the_input_as_im2col_would(stride, padding, dilation):
    """Fine-tuning a tree conv gathers only the split columns from the padded input: values and every gradient
    (the input's included) must be those of the im2col rows; 3 channels of 3x3 in 4 codebooks pad D=27 to 28."""
    g = torch.Generator().manual_seed(7)
    conv = torch.nn.Conv2d(3, 5, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 3, 9, 8, generator=g)
    rows = im2col(x, conv)
    pq = ProductQuantizer(4, 8, encoder="tree").fit(rows).set_weight(weight_matrix(conv), bias_vector(conv))
    trainable = TrainableTables(pq)
    columns = torch.cat([trainable.columns, torch.tensor([27, 0])])  # 27: the padding column, which reads 0
    upstream = x.clone().requires_grad_(True)
    picked = patch_columns(upstream, conv, columns)
    reference_input = x.clone().requires_grad_(True)
    reference = pq.pad(im2col(reference_input, conv))[:, columns].t()
    torch.testing.assert_close(picked, reference, atol=0, rtol=0)
    weights = torch.randn(picked.shape, generator=g)
    (picked * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(upstream.grad, reference_input.grad)

    params = [trainable.tables, trainable.thresholds, trainable.log_temperature]
    out = trainable.forward_conv(upstream, conv)
    torch.testing.assert_close(out, pq(rows), atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(out.shape, generator=g)
    fast = torch.autograd.grad(out, [upstream, *params], grad_out)
    slow = torch.autograd.grad(trainable(im2col(reference_input, conv)), [reference_input, *params], grad_out)
    for got, want in zip(fast, slow, strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_tree_nodes_that_never_split_keep_every_gradient_finite():
    """A constant subspace leaves tree nodes with infinite thresholds; they must not turn the temperature's
    gradient into nan (it did: 0 * inf), which silently stopped every tree fine-tuning run."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(512, 16, generator=g), torch.randn(16, 4, generator=g)
    x[:, :4] = 1.0
    pq = ProductQuantizer(4, 8, encoder="tree").fit(x).set_weight(w)
    assert not torch.isfinite(pq.thresholds_).all()
    trainable = TrainableTables(pq)
    out = trainable(x)
    torch.testing.assert_close(out, pq(x), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    for name, param in trainable.named_parameters():
        assert torch.isfinite(param.grad).all(), name


def test_tree_finetuning_lowers_the_loss(tiny_digits):
    session = _session(tiny_digits)
    before = session.apply(session.uniform(LayerSetting("table", 4, 8, encoder="tree"))).metrics
    images = session.calibration_set.normalize(session.calibration_set.images)
    tuned, report = finetune(session.model, session.structure, session.quantizers(before), images, steps=60)
    assert report.best_step > 0 and report.loss_after < report.loss_before
    assert all(math.isfinite(loss) for _, loss in report.loss_curve)


def test_a_diverging_run_stops_with_a_clear_error(tiny_digits):
    session = _session(tiny_digits)
    before = session.apply(session.uniform(LayerSetting("table", 4, 8))).metrics
    images = session.calibration_set.normalize(session.calibration_set.images)
    with pytest.raises(FloatingPointError, match="diverged.*smaller learning rate"):
        finetune(session.model, session.structure, session.quantizers(before), images, steps=20, lr=1e6)


def test_tables_file_round_trip_and_refusals(tiny_digits, tmp_path):
    session = _session(tiny_digits)
    settings = session.complete(session.uniform(LayerSetting("table", 4, 8, lut_dtype="int8")))
    quantizers = session.tables(settings)
    path = tmp_path / "t.tables.pt"
    sha = save_tables(path, quantizers)
    # written streamed, hashed without the content, serialised in memory: the same bytes
    data, same = tables_bytes(quantizers)
    assert same == sha == tables_sha256(quantizers) and data == path.read_bytes()
    assert GivenTables(sha, quantizers).content() == data
    with pytest.raises(TablesFileError, match="not the recorded"):  # not written: the file there stays
        save_tables(path, quantizers, "0" * 64)
    with pytest.raises(TablesFileError, match="not the recorded"):
        GivenTables("0" * 64, quantizers).content()
    assert path.read_bytes() == data and list(tmp_path.iterdir()) == [path]
    loaded = load_tables(path, sha, session.structure, settings)
    for name, quantizer in quantizers.items():
        for key, value in quantizer.state_dict().items():
            assert torch.equal(loaded[name].state_dict()[key], value)
    with pytest.raises(TablesFileError, match="not found"):
        load_tables(tmp_path / "gone.tables.pt", sha, session.structure, settings)
    with pytest.raises(TablesFileError, match="sha256 does not match"):
        load_tables(path, "0" * 64, session.structure, settings)
    other = {**settings, session.structure.names[0]: LayerSetting("table", 2, 8, lut_dtype="int8")}
    with pytest.raises(TablesFileError, match="configuration asks for"):
        load_tables(path, sha, session.structure, other)
    fewer = {**settings, session.structure.names[0]: LayerSetting()}
    with pytest.raises(TablesFileError, match="extra"):
        load_tables(path, sha, session.structure, fewer)
    junk = tmp_path / "junk.tables.pt"
    junk.write_text("hello")
    with pytest.raises(TablesFileError, match="not a readable TabConv tables file"):
        load_tables(junk, None, session.structure, settings)


def test_cli_finetune_saves_a_configuration_that_reloads_exactly(tiny_digits, tmp_path, capsys):
    calib = ["--calibration-images", "256", "--max-rows", "4096", "--cache-dir", str(tmp_path / "cache")]
    start = tmp_path / "start.json"
    assert main(["evaluate", "--checkpoint", str(tiny_digits), "--all-table", "-C", "4", "-K", "8", "--fit",
                 "least-squares", *calib, "--save-config", str(start), "--json"]) == 0
    capsys.readouterr()
    saved = json.loads(start.read_text())
    assert saved["schema_version"] == 2 and saved["calibration"]["fit"] == "least-squares"
    tuned = tmp_path / "tuned.json"
    assert main(["finetune", "--checkpoint", str(tiny_digits), "--config", str(start), "--steps", "40",
                 "--images", "512", "--lr", "3e-3", *calib, "--out", str(tuned), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "eval_images", "flops_paper", "flops_full", "storage_bytes", "layers"):
        assert key in data
    report = data["finetune"]
    assert report["steps"] == 40 and report["loss_after"] < report["loss_before"] and report["loss_curve"]
    # the held-out checks took the first half of the 450 test images (never trained on); results are on the rest
    assert (data["eval_first"], data["eval_images"], report["held_out"]) == (225, 225, 225)
    assert report["held_out_from"] == "digits test images 0-224" and data["unseen"] is None
    written = json.loads(tuned.read_text())
    tables = tmp_path / "tuned.tables.pt"
    assert written["tables_file"] == "tuned.tables.pt" and tables.is_file()
    fresh = subprocess.run([sys.executable, "-m", "tabconv", "evaluate", "--checkpoint", str(tiny_digits), "--config",
                            str(tuned), *calib, "--eval-skip", "225", "--json"], capture_output=True, text=True,
                           cwd=ROOT)
    assert fresh.returncode == 0, fresh.stderr
    again = json.loads(fresh.stdout)
    assert again["accuracy"] == data["accuracy"]
    assert [r["relative_error"] for r in again["layers"]] == [r["relative_error"] for r in data["layers"]]
    # an edited tables file, then a missing one: one clear line each, exit status 2
    blob = bytearray(tables.read_bytes())
    blob[-20] ^= 0xFF
    tables.write_bytes(bytes(blob))
    assert main(["evaluate", "--checkpoint", str(tiny_digits), "--config", str(tuned), *calib]) == 2
    err = capsys.readouterr().err.strip()
    assert "tuned.tables.pt" in err and "sha256 does not match" in err and "\n" not in err
    tables.unlink()
    assert main(["evaluate", "--checkpoint", str(tiny_digits), "--config", str(tuned), *calib]) == 2
    assert "tables file not found" in capsys.readouterr().err


def test_version_1_configuration_files_still_load():
    old = Path(__file__).parent / "data" / "config-v1.json"  # a file written before version 2, kept as it was
    data = json.loads(old.read_text())
    assert data["schema_version"] == 1
    loaded = config_file.from_dict(data)
    assert loaded.calibration.fit == "kmeans" and loaded.tables_file is None
    data["tables_file"] = "../elsewhere.tables.pt"
    data["tables_sha256"] = "0" * 64
    with pytest.raises(ConfigError, match="bare file name"):
        config_file.from_dict(data)


def test_cache_keys_ignore_what_the_fitting_method_does_not_use(tiny_digits):
    kmeans = _session(tiny_digits)
    name, setting = kmeans.structure.names[1], LayerSetting("table", 4, 8)
    keys = kmeans.builder.key_parts(name, setting, {})
    assert set(keys["calibration"]) == {"images", "mode", "seed", "max_rows", "split"}  # as before least squares
    assert _session(tiny_digits, ridge=0.5).builder.key_parts(name, setting, {}) == keys
    assert _session(tiny_digits, fit="least-squares").builder.key_parts(name, setting, {}) != keys
    info = kmeans.structure.layer(name)
    by_subvector = LayerSetting("table", 1, 8, subvector=info.inner_dim // 4).for_inner_dim(info.inner_dim)
    assert by_subvector.codebooks == 4 and kmeans.builder.key_parts(name, by_subvector, {}) == keys


def test_primal_and_dual_least_squares_agree_with_a_dense_solve():
    from tabconv.lstsq import table_correction

    g = torch.Generator().manual_seed(4)
    codebooks, k = 5, 6
    size = codebooks * k
    for rows in (12, 200):  # fewer rows than codes (dual form), more (primal form)
        flat = torch.randint(k, (rows, codebooks), generator=g) + torch.arange(codebooks) * k
        residual = torch.randn(rows, 3, generator=g, dtype=torch.float64)
        onehot = torch.zeros(rows, size, dtype=torch.float64).scatter_(1, flat, 1.0)
        dense = torch.linalg.solve(onehot.t() @ onehot + 0.3 * torch.eye(size, dtype=torch.float64),
                                   onehot.t() @ residual)
        torch.testing.assert_close(table_correction(flat, residual, size, 0.3), dense)


def test_finetuning_keeps_the_starting_tables_when_training_only_hurts(tiny_digits):
    session = _session(tiny_digits, fit="least-squares")
    start = session.apply(session.uniform(LayerSetting("table", 4, 8))).metrics
    images = session.calibration_set.normalize(session.calibration_set.images)
    quantizers = session.quantizers(start)
    tuned, report = finetune(session.model, session.structure, quantizers, images, steps=20, lr=5.0)
    assert report.held_out == min(512, len(images) // 8) and len(report.held_out_curve) == 10
    assert report.loss_after <= report.loss_before + 1e-6
    if report.best_step == 0:  # lr 5 wrecks every step: the tables it started from come back
        for name, quantizer in quantizers.items():
            torch.testing.assert_close(tuned[name].tables_, quantizer.tables_)
    else:  # the kept tables are the best check's, and their inference loss is what that check measured
        assert dict(report.held_out_curve)[report.best_step] == min(loss for _, loss in report.held_out_curve)
        assert report.loss_after == pytest.approx(dict(report.held_out_curve)[report.best_step], rel=1e-4)


def test_finetuning_checks_itself_on_test_images_and_is_judged_on_the_others(tiny_digits):
    """The held-out checks use images the network never trained on (the first half of the evaluation images); the
    run is judged on the other half, and even a run that only hurts hands back tables no worse there."""
    session = _session(tiny_digits, fit="least-squares")
    start = session.apply(session.uniform(LayerSetting("table", 4, 8))).metrics
    half = finetuning.first_half(session)
    assert (half.split, half.first, len(half)) == ("test", 0, len(session.eval_set) // 2)
    run = finetuning.finetune_session(session, start, steps=20, images=256, lr=5.0, held_out=half)
    report = run.report
    assert report.held_out == len(half) and report.held_out_from == f"digits test images 0-{len(half) - 1}"
    assert report.loss_after <= report.loss_before + 1e-6  # lr 5 wrecks the tables; the check keeps the better
    assert run.unseen == slice(len(half), None)
    judged, parent = run.judged()
    assert judged.eval_images == parent.eval_images == len(session.eval_set) - len(half)
    assert judged.correct == int(run.metrics.correct_images[len(half):].sum())
    assert parent.correct == int(start.correct_images[len(half):].sum())
    untouched = finetuning.finetune_session(session, start, steps=2, images=256)  # the training split's last images
    assert untouched.unseen is None and untouched.judged() == (untouched.metrics, start)
    assert untouched.report.held_out_from == "digits train images 224-255 (the network may have trained on them)"
    with pytest.raises(ValueError, match="must be the first of the evaluation images"):
        finetuning.finetune_session(session, start, steps=2, images=256, held_out=session.eval_set.skip(10).head(5))


def test_a_time_budget_is_replanned_from_the_speed_measured_since(tiny_digits, monkeypatch):
    """Slow first steps (other work on the cores) plan too few steps; the checks re-plan from the speed measured
    since, so the run still fills its budget. A fake clock: its first ten readings are a second apart, the rest a
    millisecond."""
    session = _session(tiny_digits, fit="least-squares")
    start = session.apply(session.uniform(LayerSetting("table", 4, 8))).metrics
    images = session.calibration_set.normalize(session.calibration_set.images)
    readings, clock = [float(i) for i in range(10)], {"now": 0.0}

    def perf_counter() -> float:
        clock["now"] = readings.pop(0) if readings else clock["now"] + 1e-3
        return clock["now"]

    monkeypatch.setattr(finetuning, "time", SimpleNamespace(perf_counter=perf_counter))
    events = []
    _, report = finetune(session.model, session.structure, session.quantizers(start), images, steps=60, seconds=40,
                         progress=events.append)
    first_plan = events[finetuning.CALIBRATION_STEPS - 1].total
    assert first_plan < 60  # the first steps' speed alone would have stopped the run early
    assert (report.steps, report.stopped) == (60, finetuning.STOPPED_STEPS)
    assert len(report.held_out_curve) <= finetuning.CHECKS + 1


def test_finetuning_stops_on_its_own_and_says_why(tiny_digits):
    """A time budget fits the steps (and the schedule) into the time; patience stops a run whose held-out loss has
    not improved for that many checks; each run's report says which ended it."""
    session = _session(tiny_digits, fit="least-squares")
    start = session.apply(session.uniform(LayerSetting("table", 4, 8))).metrics
    images = session.calibration_set.normalize(session.calibration_set.images)
    quantizers = session.quantizers(start)
    events = []
    _, full = finetune(session.model, session.structure, quantizers, images, steps=12, progress=events.append)
    assert (full.steps, full.max_steps, full.stopped) == (12, 12, finetuning.STOPPED_STEPS)
    assert [e.index for e in events] == list(range(1, 13)) and events[-1].seconds_left == 0
    assert events[-1].describe().startswith("Fine-tuning: step 12/12, loss ")
    per_step = full.seconds / 12
    _, timed = finetune(session.model, session.structure, quantizers, images, steps=100_000,
                        seconds=max(1.0, 30 * per_step))
    assert timed.stopped == finetuning.STOPPED_TIME and 5 <= timed.steps < 100_000
    assert timed.seconds_budget == max(1.0, 30 * per_step) and len(timed.held_out_curve) <= finetuning.CHECKS + 1
    # lr 1e-30 leaves every float32 parameter as it was: no check can improve, so the second check stops the run
    _, still = finetune(session.model, session.structure, quantizers, images, steps=200, lr=1e-30, patience=2)
    assert (still.stopped, still.steps, len(still.held_out_curve), still.best_step) == (
        finetuning.STOPPED_PATIENCE, 40, 2, 0)
    with pytest.raises(ValueError, match="seconds > 0 and patience >= 1"):
        finetune(session.model, session.structure, quantizers, images, seconds=0)


def test_cache_keys_hold_every_quantizer_parameter(tiny_digits):
    """The cache key is built from all of the quantizer's parameters (read from its signature), so a new
    hyper-parameter can never serve tables fitted without it."""
    import inspect

    from tabconv.quantizer import ProductQuantizer

    session = _session(tiny_digits)
    name = session.structure.names[0]
    parts = session.builder.key_parts(name, LayerSetting("table", 4, 8), {})
    assert set(parts["quantizer"]) == set(inspect.signature(ProductQuantizer).parameters)
    assert parts["quantizer"]["random_state"] == session.calibration.seed
    assert parts["quantizer"]["groups"] == session.structure.layer(name).groups


def test_a_configuration_made_for_another_checkpoint_is_retargeted_on_request(tiny_digits, tmp_path, capsys):
    """A published configuration applies to a freshly trained checkpoint of the same architecture with --retarget:
    its tables are rebuilt from the new weights with its calibration settings (a fine-tuned tables file is not used),
    and the result says where it came from; without --retarget, and for another architecture, one-line errors."""
    calib = ["--calibration-images", "256", "--max-rows", "4096", "--cache-dir", str(tmp_path / "cache"), "--json"]
    table = ["--all-table", "-C", "4", "-K", "8", "--fit", "least-squares"]
    published, tuned = tmp_path / "published.json", tmp_path / "tuned.json"
    assert main(["evaluate", "--checkpoint", str(tiny_digits), *table, *calib, "--save-config", str(published)]) == 0
    assert main(["finetune", "--checkpoint", str(tiny_digits), "--config", str(published), "--steps", "2", *calib,
                 "--out", str(tuned)]) == 0
    capsys.readouterr()
    fresh = tmp_path / "fresh.pt"
    train_and_save("tiny", "digits", fresh, epochs=3, seed=1)
    mine = ["--checkpoint", str(fresh), *calib]

    assert main(["evaluate", *mine, "--config", str(published)]) == 2
    err = capsys.readouterr().err.strip()
    assert "published.json" in err and "made for another checkpoint" in err and "--retarget" in err
    assert "\n" not in err

    assert main(["evaluate", *mine, *table]) == 0
    direct = json.loads(capsys.readouterr().out)
    retargeted = tmp_path / "retargeted.json"
    assert main(["evaluate", *mine, "--config", str(published), "--retarget", "--save-config", str(retargeted)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["checkpoint"] == direct["checkpoint"] != json.loads(published.read_text())["checkpoint_sha256"]
    assert data["accuracy"] == direct["accuracy"] and data["storage_bytes"] == direct["storage_bytes"]
    written = json.loads(retargeted.read_text())
    source = json.loads(published.read_text())
    assert written["checkpoint_sha256"] == direct["checkpoint"] and written["layers"] == source["layers"]
    assert written["retargeted_from"]["file"] == str(published)
    assert written["retargeted_from"]["checkpoint_sha256"] == source["checkpoint_sha256"]

    assert main(["evaluate", *mine, "--config", str(tuned), "--retarget"]) == 0  # its tables file is not used
    assert json.loads(capsys.readouterr().out)["accuracy"] == direct["accuracy"]
    out = tmp_path / "retuned.json"
    assert main(["finetune", *mine, "--config", str(tuned), "--retarget", "--steps", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text())["retargeted_from"]["tables_sha256"] == json.loads(tuned.read_text())[
        "tables_sha256"]

    other = tmp_path / "other-architecture.json"
    other.write_text(json.dumps({**source, "model": "resnet18"}))
    assert main(["evaluate", *mine, "--config", str(other), "--retarget"]) == 2
    err = capsys.readouterr().err.strip()
    assert "made for resnet18 on digits, but tiny on digits is loaded" in err and "\n" not in err


def test_a_tuned_tree_shares_its_untrained_ridge_prototypes_and_owns_what_was_trained():
    """The tree's full-width ridge prototypes are not trained; copying them doubled fine-tuning's peak memory at S=3."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(256, 12, generator=g), torch.randn(12, 3, generator=g)
    pq = ProductQuantizer(4, 8, encoder="tree").fit(x).set_weight(w)
    trainable = TrainableTables(pq)
    with torch.no_grad():
        trainable.tables.add_(1.0)
        trainable.thresholds.add_(0.5)
    tuned = trainable.to_quantizer()
    assert tuned.prototypes_ is pq.prototypes_
    torch.testing.assert_close(tuned.tables_, pq.tables_ + 1.0)
    assert not torch.equal(tuned.thresholds_, pq.thresholds_)
    torch.testing.assert_close(pq(x), TrainableTables(pq)(x), atol=1e-5, rtol=1e-5)  # the base is untouched
