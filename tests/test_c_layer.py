"""The C99 program examples/c/tabconv_layer.c runs one exported table layer from tables.npz + manifest.json alone
(docs/export-format.md); here it is compiled once and compared with the PyTorch table layer on the layer's real
input, over both encoders, the three table dtypes, both int8 scale/offset shapes and conv geometries (stride,
padding, dilation, 1x1, non-square kernels, D padded to D_pad), and its refusals are checked to be one line."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tabconv
from tabconv.calibrate import TableBuilder
from tabconv.config import Calibration
from tabconv.export import TabledNetwork, export_files, write_export
from tabconv.lowering import im2col
from tabconv.modelinfo import ModelInfo
from tabconv.settings import LayerSetting
from tabconv.structure import ModelStructure
from tests.helpers import model, randomised_bn

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "examples" / "c" / "tabconv_layer.c"
CC = shutil.which("cc") or shutil.which("gcc")
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra"]
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc or gcc) on PATH")

RTOL = 1e-5  # and an absolute tolerance of RTOL * max|y|: the C program sums table rows in its own order
# The exhaustive encoder's scores ||p||^2 - 2<x, p> are rounded differently by PyTorch's kernels (BLAS, or the
# grouped conv when subspaces are whole channels) and by the C loop: where two prototypes are that close, the
# other one can be picked and that row's outputs differ by a table row. Such rows may be at most 1% (none at all
# when there are fewer than 100 rows); the tree encoder compares the same float32 values, so every row must match.
NEAR_TIE_SHARE = 0.01
IMAGES = 8

TINY_SHAPE = (1, 12, 12)
TINY_SETTINGS = {"conv1": LayerSetting("table", 3, 8, "tree", "float16"),  # D = 9: s = 3
                 "conv2": LayerSetting("table", 4, 16, lut_dtype="int8")}  # torch encodes by a grouped conv
ODD_SHAPE = (3, 11, 9)
ODD_SETTINGS = {  # conv1 D=27 -> 28, conv2 D=30 -> 32 (C=4) or 30 (C=3), conv3 D=7 -> 9 (C=3), fc D=6 -> 8 (C=4)
    "odd-a": {"conv1": LayerSetting("table", 4, 8), "conv2": LayerSetting("table", 4, 8, "tree", "int8"),
              "conv3": LayerSetting("table", 7, 4, lut_dtype="float16"), "fc": LayerSetting("table", 4, 4, "tree")},
    "odd-b": {"conv1": LayerSetting("table", 4, 16, "tree", "int8"), "conv2": LayerSetting("table", 3, 8,
                                                                                            lut_dtype="float16"),
              "conv3": LayerSetting("table", 3, 8, "tree"), "fc": LayerSetting("table", 2, 8, lut_dtype="int8")},
}
CASES = [("tiny", name) for name in TINY_SETTINGS] + [
    (variant, name) for variant, settings in ODD_SETTINGS.items() for name in settings]


def _odd_model() -> nn.Module:
    """Odd sizes everywhere: a strided padded conv, a dilated non-square conv with a bias and no batch norm,
    a 1x1 conv and a linear head (input 3x11x9)."""
    torch.manual_seed(3)
    return randomised_bn(nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 5, 3, stride=2, padding=1)), ("bn1", nn.BatchNorm2d(5)), ("relu1", nn.ReLU(True)),
        ("conv2", nn.Conv2d(5, 7, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1))), ("relu2", nn.ReLU(True)),
        ("conv3", nn.Conv2d(7, 6, 1)), ("bn3", nn.BatchNorm2d(6)), ("relu3", nn.ReLU(True)),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(6, 5))])), seed=3)


def _tabled(name: str, net: nn.Module, shape: tuple[int, int, int], settings: dict[str, LayerSetting]
            ) -> TabledNetwork:
    """`net` with tables fitted on random images, as tests/test_export.py builds them."""
    structure = ModelStructure(net, shape)
    images = torch.randn(48, *shape, generator=torch.Generator().manual_seed(1))
    builder = TableBuilder(net, structure, images, Calibration(images=48, max_rows=4096), {}, None)
    meta = {"model": name, "num_classes": 10, "input_shape": list(shape), "dataset": "random", "sha256": None}
    return TabledNetwork(net, ModelInfo.from_meta(meta), structure, builder.build_all(settings))


@dataclass
class Export:
    """An export folder and, per table layer, the input and output of the PyTorch table layer."""

    folder: Path
    manifest: dict
    network: nn.Module
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def _capture(network: nn.Module, names: list[str], images: torch.Tensor) -> tuple[dict, dict]:
    """Each named layer's real input and output in one forward pass (clones: in-place ReLUs follow)."""
    inputs, outputs = {}, {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[name] = np.ascontiguousarray(args[0].detach().numpy().copy())
            outputs[name] = output.detach().numpy().copy()
        return hook

    hooks = [network.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    # The library's reference (torch) path of every table layer: the format is defined by it, and the native
    # kernels (tabconv/native.py, where present) are held to it by tests/test_native.py.
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("TABCONV_KERNEL", "torch")
        network(images)
    for hook in hooks:
        hook.remove()
    return inputs, outputs


def _build_export(variant: str, folder: Path) -> Export:
    if variant == "tiny":  # through model.pt and tabconv.load_tabled, as a user of the export would
        tabled = _tabled("tiny", model("tiny"), TINY_SHAPE, TINY_SETTINGS)
        write_export(folder, export_files(tabled, ["torch", "npz"]))
        network, shape, names = tabconv.load_tabled(folder / "model.pt"), TINY_SHAPE, list(TINY_SETTINGS)
    else:
        tabled = _tabled("odd", _odd_model(), ODD_SHAPE, ODD_SETTINGS[variant])
        write_export(folder, export_files(tabled, ["npz"]))
        network, shape, names = tabled.network(), ODD_SHAPE, list(ODD_SETTINGS[variant])
    images = torch.randn(IMAGES, *shape, generator=torch.Generator().manual_seed(2))
    inputs, outputs = _capture(network, names, images)
    return Export(folder, json.loads((folder / "manifest.json").read_text()), network, inputs, outputs)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Export]:
    """variant -> its Export, built on first use."""
    built: dict[str, Export] = {}

    def get(variant: str) -> Export:
        if variant not in built:
            built[variant] = _build_export(variant, tmp_path_factory.mktemp(variant))
        return built[variant]
    return get


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(the program, the compiler's diagnostics), compiled once per session."""
    binary = tmp_path_factory.mktemp("c") / "tabconv_layer"
    result = subprocess.run([CC, *CFLAGS, "-o", str(binary), str(SOURCE), "-lm"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return binary, result.stderr


@pytest.fixture(scope="session")
def program(compiled: tuple[Path, str]) -> Path:
    return compiled[0]


def _run(program: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=60)


def _layer(export: Export, name: str) -> dict:
    return next(layer for layer in export.manifest["layers"] if layer["name"] == name)


def _as_rows(y: np.ndarray) -> np.ndarray:
    """(N, M, H, W) -> rows (N*H*W, M), one per output position; (N, M) stays."""
    return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1]) if y.ndim == 4 else y


def _assert_rows_agree(got: np.ndarray, expected: np.ndarray, near_ties: int) -> None:
    """Every output row within RTOL (atol RTOL * max|y|), but for at most `near_ties` rows."""
    got, expected = _as_rows(got), _as_rows(expected)
    atol = RTOL * np.abs(expected).max()
    off = ~(np.abs(got - expected) <= atol + RTOL * np.abs(expected)).all(1)
    assert off.sum() <= near_ties, f"{off.sum()} of {len(off)} rows differ"
    np.testing.assert_allclose(got[~off], expected[~off], rtol=RTOL, atol=atol)


def test_compiles_without_warnings(compiled: tuple[Path, str]):
    assert compiled[1] == ""


@pytest.mark.parametrize(("variant", "name"), CASES, ids=[f"{v}-{n}" for v, n in CASES])
def test_c_layer_matches_pytorch(program: Path, exports: Callable[[str], Export], variant: str, name: str,
                                 tmp_path: Path):
    export = exports(variant)
    layer = _layer(export, name)
    source, target = tmp_path / "input.npy", tmp_path / "output.npy"
    np.save(source, export.inputs[name])
    result = _run(program, export.folder, name, source, target)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    got, expected = np.load(target), export.outputs[name]
    assert got.dtype == np.float32 and got.shape == expected.shape == (IMAGES, *layer["output_shape"])
    assert np.abs(expected).max() > 0 and np.ptp(expected) > 0  # a real output, not a constant
    rows = len(_as_rows(expected))
    _assert_rows_agree(got, expected, int(NEAR_TIE_SHARE * rows) if layer["encoder"] == "exhaustive" else 0)


def test_the_cases_cover_the_format(exports: Callable[[str], Export]):
    """The comparison above is only as good as its cases: every encoder x table dtype, each conv geometry."""
    layers = [_layer(exports(variant), name) for variant, name in CASES]
    convs = [layer for layer in layers if layer["kind"] == "conv"]
    assert {(layer["encoder"], layer["lut_dtype"]) for layer in layers} == {
        (e, d) for e in ("exhaustive", "tree") for d in ("float32", "float16", "int8")}
    assert {layer["kind"] for layer in layers} == {"conv", "linear"}
    assert any(max(layer["stride"]) > 1 for layer in convs) and any(max(layer["padding"]) > 0 for layer in convs)
    assert any(max(layer["dilation"]) > 1 for layer in convs) and any(layer["kernel_size"] == [1, 1] for layer in convs)
    assert any(len(set(layer["kernel_size"])) == 2 for layer in convs)
    assert sum(layer["padded_dim"] > layer["inner_dim"] for layer in layers) >= 4


def _replace_arrays(export: Export, folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """A copy of the export in `folder` with some arrays of tables.npz replaced (and listed so in the manifest)."""
    shutil.copytree(export.folder, folder)
    with np.load(export.folder / "tables.npz") as npz:
        stored = {key: npz[key] for key in npz.files}
    stored.update(arrays)
    np.savez(folder / "tables.npz", **stored)
    manifest = json.loads((folder / "manifest.json").read_text())
    for layer in manifest["layers"]:
        for entry in layer.get("arrays", {}).values():
            if entry["key"] in arrays:
                entry.update(dtype=str(arrays[entry["key"]].dtype), shape=list(arrays[entry["key"]].shape))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _npz(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "tables.npz") as npz:
        return {key: npz[key] for key in npz.files}


def _looked_up(arrays: dict[str, np.ndarray], name: str, codes: np.ndarray) -> np.ndarray:
    """Rows (R, M) of docs/export-format.md's lookup for codes (R, C), in float64 (int8: both scale/offset shapes)."""
    tables = arrays[f"{name}/tables"]
    picked = tables[np.arange(tables.shape[0]), codes].astype(np.float64)  # (R, C, M)
    if tables.dtype != np.int8:
        return picked.sum(1)
    scale, offset = arrays[f"{name}/table_scale"].astype(np.float64), arrays[f"{name}/table_offset"]
    offset_sums = offset.astype(np.float64).sum(0)  # (M,) from (C, M), a scalar from (C,)
    return scale * (picked.sum(1) + 128 * tables.shape[0]) + offset_sums


def _run_rows(program: Path, folder: Path, name: str, x: np.ndarray, tmp_path: Path) -> np.ndarray:
    np.save(tmp_path / "input.npy", np.ascontiguousarray(x, dtype=np.float32))
    result = _run(program, folder, name, tmp_path / "input.npy", tmp_path / "output.npy")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return np.load(tmp_path / "output.npy")


@pytest.mark.parametrize("scheme", ["per-output", "per-layer"])
def test_int8_scale_and_offset_shapes(program: Path, exports: Callable[[str], Export], scheme: str, tmp_path: Path):
    """Both int8 layouts, whichever one the library writes: newer files hold a scale per output (M,) and an offset
    per codebook and output (C, M), older ones one scale () and one offset per codebook (C,). Random values of
    either shape replace the stored ones; the tree encoder's codes (from the library) are exact, so the C output
    must be scale_m * (sum_c q[c, code_c, m] + 128 C) + sum_c offset[c, m] to float32 rounding."""
    export, name = exports("odd-a"), "conv2"  # a tree-encoded int8 conv
    layer = _layer(export, name)
    c, m = layer["codebooks"], layer["output_shape"][0]
    rng = np.random.default_rng(7)
    if scheme == "per-output":
        scale, offset = rng.uniform(1e-3, 1e-2, m).astype(np.float32), rng.normal(size=(c, m)).astype(np.float32)
    else:
        scale, offset = np.float32(rng.uniform(1e-3, 1e-2)), rng.normal(size=c).astype(np.float32)
    replaced = {f"{name}/table_scale": scale, f"{name}/table_offset": offset}
    _replace_arrays(export, tmp_path / "export", replaced)
    x = export.inputs[name]
    module = export.network.get_submodule(name)
    codes = module.quantizer.encode(im2col(torch.from_numpy(x), module)).numpy()  # (rows, C)
    _, ho, wo = layer["output_shape"]
    expected_rows = _looked_up({**_npz(export.folder), **replaced}, name, codes)
    expected = expected_rows.reshape(len(x), ho, wo, m).transpose(0, 3, 1, 2)
    got = _run_rows(program, tmp_path / "export", name, x, tmp_path)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    assert not np.allclose(got, export.outputs[name], rtol=0.01)  # the replaced arrays were really read


def test_tree_ties_go_left(program: Path, exports: Callable[[str], Export], tmp_path: Path):
    """A value equal to its node's threshold goes left (right only when strictly greater)."""
    export, name = exports("odd-a"), "fc"  # a tree-encoded float32 linear layer
    layer, arrays = _layer(export, name), _npz(export.folder)
    width, split, thresholds = layer["subspace_width"], arrays[f"{name}/split_dims"], arrays[f"{name}/thresholds"]
    x = export.inputs[name].copy()
    roots = [c * width + split[c, 0] for c in range(layer["codebooks"]) if c * width + split[c, 0] < x.shape[1]]
    assert roots  # at least one root split on a real (not padded) column
    for column in roots:
        x[:, column] = thresholds[column // width, 0]
    expected = export.network.get_submodule(name).quantizer(torch.from_numpy(x)).numpy()
    got = _run_rows(program, export.folder, name, x, tmp_path)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_exhaustive_ties_take_the_smallest_k(program: Path, exports: Callable[[str], Export], tmp_path: Path):
    """With prototype K-1 a copy of prototype 0 (its table row different), a row equal to prototype 0 is coded 0."""
    export, name = exports("odd-b"), "fc"  # an exhaustive int8 linear layer, D = D_pad
    layer, arrays = _layer(export, name), _npz(export.folder)
    prototypes, tables = arrays[f"{name}/prototypes"].copy(), arrays[f"{name}/tables"].copy()
    assert layer["padded_dim"] == layer["inner_dim"]
    prototypes[:, -1], tables[:, -1] = prototypes[:, 0], tables[:, 1]
    replaced = {f"{name}/prototypes": prototypes, f"{name}/tables": tables}
    _replace_arrays(export, tmp_path / "export", replaced)
    x = np.stack([prototypes[:, 0].reshape(-1), prototypes[:, 2].reshape(-1)])  # a tie, and no tie
    codes = np.array([[0] * layer["codebooks"], [2] * layer["codebooks"]])
    expected = _looked_up({**arrays, **replaced}, name, codes)
    got = _run_rows(program, tmp_path / "export", name, x, tmp_path)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    last = np.full_like(codes[:1], layer["centroids"] - 1)
    assert not np.allclose(expected[0], _looked_up({**arrays, **replaced}, name, last)[0])  # the tie matters


# -- refusals: exit status 1, one line on stderr naming the file or value, no output file -------------------
def _edit_manifest(export: Export, folder: Path, name: str, **fields: object) -> Path:
    shutil.copytree(export.folder, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    next(layer for layer in manifest["layers"] if layer["name"] == name).update(fields)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _compressed(export: Export, folder: Path) -> Path:
    shutil.copytree(export.folder, folder)
    with np.load(export.folder / "tables.npz") as npz:
        np.savez_compressed(folder / "tables.npz", **{key: npz[key] for key in npz.files})
    return folder


def _truncated(export: Export, folder: Path) -> Path:
    shutil.copytree(export.folder, folder)
    data = (folder / "tables.npz").read_bytes()
    (folder / "tables.npz").write_bytes(data[: len(data) // 2])
    return folder


REFUSALS: dict[str, tuple[Callable[[Export, Path, np.ndarray], tuple], str]] = {
    # case: ((export, tmp folder, conv2's input) -> (export folder, layer, input array), what stderr must name)
    "unknown layer": (lambda e, t, x: (e.folder, "conv9", x), "no layer named 'conv9'"),
    "exact layer": (lambda e, t, x: (e.folder, "fc", x), "layer 'fc' is exact"),
    "float64 input": (lambda e, t, x: (e.folder, "conv2", x.astype(np.float64)), "input.npy: dtype '<f8'"),
    "fortran-order input": (lambda e, t, x: (e.folder, "conv2", np.asfortranarray(x)),
                            "input.npy: array is in Fortran order"),
    "wrong channels": (lambda e, t, x: (e.folder, "conv2", x[:, :3].copy()), "input.npy: shape must be (N, 8, H, W)"),
    "no export": (lambda e, t, x: (t / "absent", "conv2", x), "absent/manifest.json: cannot open"),
    "grouped conv": (lambda e, t, x: (_edit_manifest(e, t / "g", "conv2", groups=2), "conv2", x),
                     "grouped convolution (groups=2)"),
    "bad padded_dim": (lambda e, t, x: (_edit_manifest(e, t / "p", "conv2", padded_dim=99), "conv2", x),
                       "padded_dim 99"),
    "compressed npz": (lambda e, t, x: (_compressed(e, t / "z"), "conv2", x), "is compressed"),
    "truncated npz": (lambda e, t, x: (_truncated(e, t / "t"), "conv2", x), "tables.npz: "),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_one_line(program: Path, exports: Callable[[str], Export], case: str, tmp_path: Path):
    export = exports("tiny")
    setup, named = REFUSALS[case]
    folder, name, x = setup(export, tmp_path, export.inputs["conv2"])
    np.save(tmp_path / "input.npy", x)
    result = _run(program, folder, name, tmp_path / "input.npy", tmp_path / "output.npy")
    assert result.returncode == 1
    assert result.stderr.startswith("tabconv_layer: ") and result.stderr.count("\n") == 1, result.stderr
    assert named in result.stderr
    assert not (tmp_path / "output.npy").exists() and not (tmp_path / "output.npy.tmp").exists()


def test_usage_is_one_line(program: Path):
    result = _run(program, "only-one-argument")
    assert (result.returncode, result.stderr.count("\n")) == (1, 1) and "usage: tabconv_layer" in result.stderr
