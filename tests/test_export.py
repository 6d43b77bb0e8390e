"""Export: model.pt through load_tabled, model.onnx through onnxruntime, tables.npz rebuilt with numpy only,
refusals of damaged files and bad arguments, and the CLI end to end (a fine-tuned configuration included)."""

from __future__ import annotations

import copy
import ctypes
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import tabconv
from tabconv import config as config_file
from tabconv import native, ortops
from tabconv.calibrate import TableBuilder
from tabconv.cli import main
from tabconv.config import Calibration
from tabconv.export import (
    ExportError,
    TabledNetwork,
    check_export,
    configuration_zip,
    export_files,
    export_zip,
    kernel_check,
    load_npz,
    parse_formats,
    prepare_folder,
    write_export,
)
from tabconv.modelinfo import ModelInfo
from tabconv.settings import LayerSetting
from tabconv.structure import ModelStructure
from tabconv.tablesfile import save_tables, tables_path_for
from tabconv.train import train_and_save
from tests.helpers import model

ROOT = Path(__file__).resolve().parent.parent
# onnxruntime computes distances and sums with other kernels than PyTorch: logits agree to float32 rounding
# (measured <= 2e-7 of the largest logit), except on an image where an exhaustive encoder's near-tie between
# two prototypes resolves the other way (measured: 1 of 192 random images, random-init ResNet-18, C=8 K=16).
ONNX_RTOL = 1e-5
NEAR_TIE_SHARE = 0.05  # images allowed outside ONNX_RTOL; predictions must still agree

TINY_SETTINGS = {  # every route of the graph form: direct-conv and im2col exhaustive, tree, three table dtypes
    "exhaustive": {"conv1": LayerSetting("table", 1, 8), "conv2": LayerSetting("table", 8, 16, "tree", "int8"),
                   "fc": LayerSetting("table", 4, 8, lut_dtype="float16")},
    "mixed": {"conv1": LayerSetting("table", 3, 8, "tree", "float16"),
              "conv2": LayerSetting("table", 4, 16, lut_dtype="int8"), "fc": LayerSetting("table", 4, 8, "tree")},
}


def _tabled(name: str, shape: tuple[int, int, int], settings: dict[str, LayerSetting]) -> TabledNetwork:
    """A random-init network (non-trivial batch norms) with tables fitted on random images."""
    net = model(name)
    structure = ModelStructure(net, shape)
    images = torch.randn(48, *shape, generator=torch.Generator().manual_seed(1))
    builder = TableBuilder(net, structure, images, Calibration(images=48, max_rows=4096), {}, None)
    meta = {"model": name, "num_classes": 10, "input_shape": list(shape), "dataset": "random", "sha256": None}
    return TabledNetwork(net, ModelInfo.from_meta(meta), structure, builder.build_all(settings))


def _images(count: int, shape: tuple[int, ...], seed: int = 2) -> torch.Tensor:
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny() -> TabledNetwork:
    return _tabled("tiny", (1, 12, 12), TINY_SETTINGS["exhaustive"])


@pytest.fixture(scope="module")
def tiny_export(tiny: TabledNetwork, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    write_export(folder, export_files(tiny))
    return folder


def test_load_tabled_rebuilds_the_network_bit_exactly(tiny: TabledNetwork, tiny_export: Path):
    payload = torch.load(tiny_export / "model.pt", weights_only=True)  # plain data only
    assert set(payload["layers"]) == {"conv1", "conv2", "fc"} and payload["model"] == "tiny"
    loaded = tabconv.load_tabled(tiny_export / "model.pt")
    assert not loaded.training
    x = _images(9, (1, 12, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny.network()(x))
    tables = {k: v for k, v in loaded.state_dict().items() if ".quantizer." in k}
    assert len(tables) == 3 * 5 + 2 + 2  # every learned tensor and scalar; tree and int8 extras on conv2
    assert torch.equal(loaded.conv2.quantizer.thresholds_, tiny.quantizers["conv2"].thresholds_)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_load_tabled_runs_the_export_on_the_native_kernels(tiny_export: Path):
    """The exported file carries all the native path needs: on it, the network computes what the torch path does."""
    x = _images(64, (1, 12, 12))
    check = kernel_check(tiny_export / "model.pt", x, "native")
    assert check["runs_on"] == "native" and check["same_predictions"] == 1.0
    assert check["max_abs_diff_relative"] < 1e-4
    loaded = tabconv.load_tabled(tiny_export / "model.pt", kernel="native")
    assert all(native.runs_natively(loaded.get_submodule(n), x.new_zeros(1)) for n in ("conv1", "conv2", "fc"))
    with pytest.raises(ValueError, match="auto, native, torch"):
        tabconv.load_tabled(tiny_export / "model.pt", kernel="fastest")


def _onnx_outputs(data: bytes, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _assert_onnx_agrees(tabled: TabledNetwork, data: bytes, shape: tuple[int, ...]) -> None:
    graph = onnx.load_from_string(data)
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert {node.domain for node in graph.graph.node} <= {""}  # standard operators only
    assert {"Gather", "ReduceSum"} <= ops
    network = tabled.network()
    for batch in (1, 64):  # the batch dimension is dynamic
        x = _images(batch, shape)
        with torch.no_grad():
            expected = network(x).numpy()
        got = _onnx_outputs(data, x)
        assert got.shape == expected.shape
        off = np.abs(got - expected).max(1) > ONNX_RTOL * np.abs(expected).max()
        assert off.sum() <= NEAR_TIE_SHARE * batch
        assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("variant", sorted(TINY_SETTINGS))
def test_onnx_agrees_with_the_tabled_network(variant: str):
    tabled = _tabled("tiny", (1, 12, 12), TINY_SETTINGS[variant])
    data = export_files(tabled, ["onnx"])["model.onnx"]
    _assert_onnx_agrees(tabled, data, (1, 12, 12))
    ops = {node.op_type for node in onnx.load_from_string(data).graph.node}
    assert {"ArgMin", "Greater"} <= ops  # exhaustive and tree layers in each variant


def test_onnx_agrees_on_resnet18():
    structure = ModelStructure(model("resnet18"), (1, 32, 32))
    settings = {name: LayerSetting("table", 8, 16) for name in structure.names}
    settings["layer1.0.conv1"] = LayerSetting("table", 8, 16, "tree", "int8")
    settings["layer3.0.downsample.0"] = LayerSetting("table", 4, 16, lut_dtype="float16")
    tabled = _tabled("resnet18", (1, 32, 32), settings)
    _assert_onnx_agrees(tabled, export_files(tabled, ["onnx"])["model.onnx"], (1, 32, 32))


def _ops_library() -> Path:
    try:
        return ortops.library()
    except native.NativeUnavailable as exc:
        pytest.skip(f"the onnxruntime operator library cannot be built: {exc}")


def _assert_ops_agree(tabled: TabledNetwork, data: bytes, shape: tuple[int, ...]) -> None:
    """model-ops.onnx: one TableLayer node per table layer, no Gather left, and onnxruntime with the operator
    library computing what the tabled network computes in PyTorch (torch path), at batch 1 and 64."""
    graph = onnx.load_from_string(data)
    nodes = [node for node in graph.graph.node if node.domain == ortops.DOMAIN]
    assert sorted(node.name for node in nodes) == sorted(f"{name}.table_layer" for name in tabled.quantizers)
    assert {node.op_type for node in nodes} == {ortops.OP_TYPE}
    assert "Gather" not in {node.op_type for node in graph.graph.node}
    library = _ops_library()
    session = ortops.inference_session(data, 2, library)
    network = native.set_kernel(tabled.network(), "torch")
    loaded = ctypes.CDLL(str(library))  # the very library onnxruntime loaded: its ISA can be lowered from here
    best = native.ISAS.index(native.isa())
    try:
        for isa in range(best + 1):  # every instruction set this CPU runs: portable, AVX2, AVX-512
            loaded.tc_force_isa(isa)
            for batch in (1, 64):
                x = _images(batch, shape)
                with torch.no_grad():
                    expected = network(x).numpy()
                got = session.run(None, {"input": x.numpy()})[0]
                assert got.shape == expected.shape
                off = np.abs(got - expected).max(1) > ONNX_RTOL * np.abs(expected).max()
                assert off.sum() <= NEAR_TIE_SHARE * batch
                assert (got.argmax(1) == expected.argmax(1)).all()
    finally:
        loaded.tc_force_isa(-1)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("variant", sorted(TINY_SETTINGS))
def test_the_operator_form_agrees_with_the_tabled_network(variant: str):
    tabled = _tabled("tiny", (1, 12, 12), TINY_SETTINGS[variant])
    _assert_ops_agree(tabled, export_files(tabled, ["onnx-ops"])["model-ops.onnx"], (1, 12, 12))


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_the_operator_form_agrees_on_resnet18():
    """Every layer of a ResNet-18 tabled (tree int8 K=16, exhaustive float32 and float16), some exact: strided,
    1x1 and 7x7 convs and the linear layer through the operator, the rest standard ONNX."""
    structure = ModelStructure(model("resnet18"), (1, 32, 32))
    settings = {name: LayerSetting("table", 8, 16, "tree", "int8", 9) for name in structure.names}
    settings["layer1.0.conv1"] = LayerSetting("table", 8, 16)
    settings["layer3.0.downsample.0"] = LayerSetting("table", 4, 16, lut_dtype="float16")
    settings["fc"] = LayerSetting("table", 8, 16, "tree", "int8")
    del settings["layer2.0.conv2"], settings["layer4.1.conv1"]
    tabled = _tabled("resnet18", (1, 32, 32), settings)
    _assert_ops_agree(tabled, export_files(tabled, ["onnx-ops"])["model-ops.onnx"], (1, 32, 32))


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_the_operator_refuses_inputs_it_cannot_run(tiny: TabledNetwork):
    """A TableLayer whose tables are not constant, or of the wrong type, fails with the operator's own message."""
    library = _ops_library()
    graph = onnx.load_from_string(export_files(tiny, ["onnx-ops"])["model-ops.onnx"])
    tables = next(t for t in graph.graph.initializer if t.name == "conv2.table_layer.tables")
    tables.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tables).astype(np.float32), tables.name))
    with pytest.raises(Exception, match="wrong element type"):
        ortops.inference_session(graph.SerializeToString(), 1, library)
    graph = onnx.load_from_string(export_files(tiny, ["onnx-ops"])["model-ops.onnx"])
    scale = next(t for t in graph.graph.initializer if t.name == "conv2.table_layer.scale")
    graph.graph.initializer.remove(scale)
    graph.graph.input.append(onnx.helper.make_tensor_value_info(scale.name, onnx.TensorProto.FLOAT, [16]))
    with pytest.raises(Exception, match="constant initializer"):
        ortops.inference_session(graph.SerializeToString(), 1, library)


def _im2col(x: np.ndarray, layer: dict) -> np.ndarray:
    """Rows (N*Ho*Wo, C_in*kh*kw), columns ordered (c_in, ky, kx): docs/export-format.md, numpy only."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (layer[k] for k in ("kernel_size", "stride", "padding", "dilation"))
    n, c, _, _ = x.shape
    _, ho, wo = layer["output_shape"]
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    taps = [padded[:, :, ky * dh: ky * dh + sh * (ho - 1) + 1: sh, kx * dw: kx * dw + sw * (wo - 1) + 1: sw]
            for ky in range(kh) for kx in range(kw)]  # each (N, C, Ho, Wo)
    cols = np.stack(taps, axis=2).reshape(n, c * kh * kw, ho, wo)
    return cols.transpose(0, 2, 3, 1).reshape(n * ho * wo, -1)


def _numpy_layer(rows: np.ndarray, layer: dict, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """One table layer's output rows from the manifest and the npz arrays, as a C implementation would."""
    get = {name: arrays[a["key"]] for name, a in layer["arrays"].items()}
    c, width = layer["codebooks"], layer["subspace_width"]
    x = np.pad(rows, ((0, 0), (0, layer["padded_dim"] - layer["inner_dim"]))).reshape(len(rows), c, width)
    if layer["encoder"] == "exhaustive":
        p = get["prototypes"]
        distances = (p * p).sum(-1)[None] - 2 * np.einsum("ncs,cks->nck", x, p)  # as the library: ||p||^2 - 2x.p
        codes = distances.argmin(-1)
    else:
        node = np.zeros((len(rows), c), dtype=np.int64)
        for level in range(layer["tree_depth"]):
            value = x[:, np.arange(c), get["split_dims"][:, level]]
            threshold = get["thresholds"][np.arange(c), 2**level - 1 + node]
            node = 2 * node + (value > threshold)
        codes = node
    picked = get["tables"][np.arange(c), codes].astype(np.float32)  # (N, C, M)
    summed = picked.sum(1)
    if layer["lut_dtype"] == "int8":
        return get["table_scale"] * (summed + 128.0 * c) + get["table_offset"].sum(0)  # offsets: (C, M)
    return summed


def test_npz_rebuilds_each_table_layer_with_numpy_only(tiny: TabledNetwork, tiny_export: Path):
    manifest, arrays = load_npz(tiny_export)
    layers = {layer["name"]: layer for layer in manifest["layers"] if layer["mode"] == "table"}
    assert all(layer["bias_folded"] for layer in layers.values())
    inputs, outputs = {}, {}
    network = tiny.network()

    def keep(name: str):
        def hook(module, args, output) -> None:  # clones: the in-place ReLU after a folded BN would change them
            inputs[name], outputs[name] = args[0].clone(), output.clone()
        return hook

    hooks = [network.get_submodule(name).register_forward_hook(keep(name)) for name in layers]
    with torch.no_grad():
        network(_images(4, (1, 12, 12)))
    for hook in hooks:
        hook.remove()
    for name, layer in layers.items():
        x = inputs[name].numpy()
        rows = _im2col(x, layer) if layer["kind"] == "conv" else x
        got = _numpy_layer(rows, layer, arrays)
        expected = outputs[name].numpy()
        if layer["kind"] == "conv":
            expected = expected.transpose(0, 2, 3, 1).reshape(len(rows), -1)  # rows (n, h, w) -> NCHW
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_manifest_describes_the_export(tiny_export: Path):
    manifest = check_export(tiny_export)
    assert set(manifest["files"]) == {"model.pt", "model.onnx", "model-ops.onnx", "tables.npz", "README.md"}
    conv2 = next(layer for layer in manifest["layers"] if layer["name"] == "conv2")
    expected = {"kind": "conv", "in_channels": 8, "out_channels": 16, "kernel_size": [3, 3], "stride": [2, 2],
                "padding": [1, 1], "dilation": [1, 1], "groups": 1, "batchnorm_folded": "bn2", "mode": "table",
                "codebooks": 8, "centroids": 16, "encoder": "tree", "lut_dtype": "int8", "inner_dim": 72,
                "padded_dim": 72, "subspace_width": 9, "tree_depth": 4}
    assert {key: conv2[key] for key in expected} == expected
    assert sorted(conv2["arrays"]) == ["split_dims", "table_offset", "table_scale", "tables", "thresholds"]
    fc = next(layer for layer in manifest["layers"] if layer["name"] == "fc")
    assert (fc["kind"], fc["arrays"]["tables"]["dtype"], fc["arrays"]["prototypes"]["shape"]) == (
        "linear", "float16", [4, 8, 4])


def test_zip_holds_the_files(tiny: TabledNetwork):
    files = export_files(tiny, "torch,npz")
    with zipfile.ZipFile(io.BytesIO(export_zip(files))) as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == files
    assert set(files) == {"model.pt", "tables.npz", "README.md", "manifest.json"}


def test_damaged_or_edited_files_are_refused(tiny_export: Path, tmp_path: Path):
    edited = tmp_path / "model.pt"
    payload = torch.load(tiny_export / "model.pt", weights_only=True)
    payload["layers"]["fc"]["state"]["tables_"][0, 0, 0] += 1
    torch.save(payload, edited)
    with pytest.raises(ExportError, match="does not match its recorded sha256"):
        tabconv.load_tabled(edited)
    edited.write_bytes((tiny_export / "model.pt").read_bytes()[:1000])
    with pytest.raises(ExportError, match="not a readable torch file"):
        tabconv.load_tabled(edited)
    with pytest.raises(ExportError, match="no such exported model file"):
        tabconv.load_tabled(tmp_path / "absent.pt")
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in tiny_export.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    data = bytearray((folder / "tables.npz").read_bytes())
    data[-200] ^= 1
    (folder / "tables.npz").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"tables.npz: sha256 does not match the manifest"):
        check_export(folder)
    (folder / "tables.npz").write_bytes((tiny_export / "tables.npz").read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["layers"][0]["arrays"]["tables"]["shape"] = [1, 1, 1]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="arrays do not match the manifest"):
        check_export(folder)


def test_bad_formats_and_folders_are_refused(tmp_path: Path):
    assert parse_formats("npz, torch") == ("torch", "npz")
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        parse_formats("torch,tflite")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="cannot create the folder"):
        prepare_folder(blocker / "out")


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CNN trained on the embedded digits (seconds)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-digits.pt"
    train_and_save("tiny", "digits", path, epochs=3)
    return path


def _cli(*args: str) -> int:
    return main(["export", *args, "--calibration-images", "128", "--eval-images", "64", "--no-cache"])


def test_cli_exports_a_configuration_loadable_in_a_fresh_process(tiny_digits: Path, tmp_path: Path, capsys):
    from tabconv.session import Session

    session = Session.from_checkpoint(str(tiny_digits), calibration=Calibration(images=128), eval_images=64)
    metrics = session.apply(session.uniform(LayerSetting("table", 4, 8, lut_dtype="int8"))).metrics
    config_path = tmp_path / "c.json"
    session.configuration(metrics).save(config_path)
    out = tmp_path / "export"
    assert _cli("--checkpoint", str(tiny_digits), "--config", str(config_path), "--out", str(out)) == 0
    assert "exported tiny with 3 table layers (built tables)" in capsys.readouterr().out
    check_export(out)
    images = session.eval_set.normalize(session.eval_set.images[:64])
    torch.save(images, tmp_path / "images.pt")
    script = ("import sys, torch, tabconv; net = tabconv.load_tabled(sys.argv[1]); "
              "x = torch.load(sys.argv[2], weights_only=True); print(net(x).argmax(1).tolist())")
    fresh = subprocess.run([sys.executable, "-c", script, str(out / "model.pt"), str(tmp_path / "images.pt")],
                           capture_output=True, text=True, cwd=ROOT, check=True)
    tabled = TabledNetwork.from_session(session, session.quantizers(metrics)).network()
    with torch.no_grad():
        assert json.loads(fresh.stdout) == tabled(images).argmax(1).tolist()
        onnx_predictions = _onnx_outputs((out / "model.onnx").read_bytes(), images).argmax(1)
    assert onnx_predictions.tolist() == tabled(images).argmax(1).tolist()
    with zipfile.ZipFile(io.BytesIO(configuration_zip(session, metrics))) as archive:  # the explorer's download
        assert sorted(archive.namelist()) == ["README.md", "manifest.json", "model-ops.onnx", "model.onnx",
                                              "model.pt", "tables.npz"]
        manifest = json.loads(archive.read("manifest.json"))
        readme = archive.read("README.md").decode()
    assert len(manifest["files"]) == 5
    # what an engineer needs beyond the files: the preprocessing the session used, and how to load each file
    prep = manifest["preprocessing"]
    assert prep == {"input_shape": [1, 32, 32], "pixel_scale": 1 / 255, "mean": [0.3052], "std": [0.3236],
                    "class_names": list("0123456789"), "dataset": "digits"}
    raw = session.eval_set.images[:8]
    by_manifest = (raw.float() * prep["pixel_scale"] - torch.tensor(prep["mean"]).view(-1, 1, 1)) / torch.tensor(
        prep["std"]).view(-1, 1, 1)
    torch.testing.assert_close(by_manifest, session.eval_set.normalize(raw))
    for name in ("model.pt", "model.onnx", "model-ops.onnx", "tables.npz", "manifest.json"):
        assert f"| `{name}` |" in readme
    assert "exact network's weights" in readme and "mean = [0.3052]" in readme and "9: 9" in readme


def test_cli_exports_the_tables_of_a_fine_tuned_configuration(tiny_digits: Path, tmp_path: Path):
    from tabconv.session import Session

    session = Session.from_checkpoint(str(tiny_digits), calibration=Calibration(images=128), eval_images=64)
    settings = session.complete(session.uniform(LayerSetting("table", 4, 8)))
    tuned = {name: copy.deepcopy(q) for name, q in session.tables(settings).items()}
    for quantizer in tuned.values():  # stand-in for fine-tuning: tables that cannot be rebuilt
        quantizer.tables_ = quantizer.tables_ * 0.5
    config_path = tmp_path / "tuned.json"
    config = session.configuration(session.apply(settings).metrics)
    config.tables_file = tables_path_for(config_path).name
    config.tables_sha256 = save_tables(tables_path_for(config_path), tuned)
    config.save(config_path)
    out = tmp_path / "export"
    assert _cli("--checkpoint", str(tiny_digits), "--config", str(config_path), "--out", str(out),
                "--format", "torch") == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "manifest.json", "model.pt"]
    loaded = tabconv.load_tabled(out / "model.pt")
    for name, quantizer in tuned.items():
        assert torch.equal(loaded.get_submodule(name).quantizer.tables_, quantizer.tables_)


def test_cli_refuses_bad_inputs_in_one_line(tiny_digits: Path, tmp_path: Path, capsys):
    assert _cli("--checkpoint", str(tiny_digits), "--config", str(tmp_path / "none.json"), "--out",
                str(tmp_path / "o")) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.json'}: no such configuration file"
    config_path = tmp_path / "c.json"
    config_file.uniform("tiny", "digits", 10, ModelStructure(model("tiny"), (1, 32, 32)), LayerSetting()).save(
        config_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _cli("--checkpoint", str(tiny_digits), "--config", str(config_path), "--out", str(blocker / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out '{blocker / 'o'}': cannot create the folder") and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:
        _cli("--checkpoint", str(tiny_digits), "--config", str(config_path), "--out", str(tmp_path), "--format",
             "torch,tflite")
    assert exit_info.value.code == 2
    assert "unknown export format 'tflite'" in capsys.readouterr().err
