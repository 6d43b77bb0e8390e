"""The README.md an export carries: what each file is, how to load it, and what an image goes through first.

An engineer handed the zip should need nothing else to run it: the preprocessing (pixel scale, mean, std, input
size, class names) is in manifest.json too, and docs/export-format.md is the full contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tabconv.export import TabledNetwork

HOW = {
    "model.pt": ("the tabled network for PyTorch (weights-only file). It also carries the exact network's weights "
                 "(every layer, the tabled layers' original ones too), so that it rebuilds the whole network: it is "
                 "larger than the tables alone",
                 '`net = tabconv.load_tabled("model.pt")`: eval mode, CPU, table layers on the native kernels when '
                 "they are built (`pip install` this project, or its `./run.sh`)"),
    "model.onnx": ("the tabled network as standard ONNX operators: any ONNX runtime runs it (slowly: its table "
                   "lookups are Gathers)",
                   '`onnxruntime.InferenceSession("model.onnx").run(None, {"input": x})[0]`'),
    "model-ops.onnx": ("the same network with each table layer one TableLayer node (domain tabconv): fast, but only "
                       "onnxruntime with tabconv's operator library runs it",
                       '`tabconv.ortops.inference_session(open("model-ops.onnx", "rb").read(), threads=2)`, then '
                       '`.run(None, {"input": x})[0]`; `python -m tabconv.native` builds the library'),
    "tables.npz": ("every table layer's encoder and tables as plain arrays, for an implementation in C/C++ or on an "
                   "FPGA (examples/c/tabconv_layer.c runs one layer from it)",
                   '`numpy.load("tables.npz")`, keys `<layer>/<array>`, described per layer in manifest.json'),
    "manifest.json": ("the network, every layer's geometry and setting, the preprocessing, each array, and each "
                      "file's sha256", '`tabconv.export.check_export(".")` checks every file against it'),
}


def export_readme(tabled: TabledNetwork, files: Mapping[str, bytes]) -> str:
    """README.md for an export holding `files` (manifest.json is always added after it)."""
    info = tabled.info
    layers = len(tabled.structure.layers)
    lines = [f"# {info.model} on {info.dataset or 'its data'}: a tabled network exported by tabconv", "",
             f"{len(tabled.quantizers)} of its {layers} layers compute by table lookups ({_settings(tabled)}); the "
             "others are its exact layers. The tables alone take "
             f"{_table_bytes(tabled) / 2**20:.2f} MiB.", "",
             "| file | size | what it is | how to load it |", "|---|---|---|---|"]
    for name in (*files, "manifest.json"):
        what, how = HOW[name]
        size = f"{len(files[name]) / 2**20:.2f} MiB" if name in files else "small"
        lines.append(f"| `{name}` | {size} | {what} | {how} |")
    lines += ["", "## What goes in", "", *_input_lines(tabled.preprocessing), "",
              "The output is one logit per class; docs/export-format.md of the tabconv project is the full "
              "format."]
    return "\n".join(lines) + "\n"


def _settings(tabled: TabledNetwork) -> str:
    kinds = sorted({f"C={q.setting.codebooks}, K={q.setting.centroids}, {q.setting.encoder}, {q.setting.lut_dtype}"
                    for q in tabled.quantizers.values()})
    return "; ".join(kinds) or "none"


def _table_bytes(tabled: TabledNetwork) -> int:
    return sum(t.numel() * t.element_size() for q in tabled.quantizers.values() for t in q.state_dict().values()
               if t.dim() > 0)


def _input_lines(prep: Mapping[str, Any] | None) -> list[str]:
    if not prep:
        return ["The preprocessing of the images this network was evaluated on is not known: use the one it was "
                "trained with."]
    channels, height, width = prep["input_shape"]
    names = prep.get("class_names")
    return [f"A float32 tensor `input` of shape [batch, {channels}, {height}, {width}]: each image resized to "
            f"{height}x{width} with {channels} channel(s), its pixels (0-255) times {prep['pixel_scale']:.6g}, "
            f"then per channel `(x - mean) / std` with mean = {prep['mean']} and std = {prep['std']} (as for "
            f"{prep['dataset']}).",
            "", f"Class k of the output is {', '.join(f'{k}: {n}' for k, n in enumerate(names))}." if names
            else "Class k of the output is the k-th class the network was trained on (names not recorded)."]
