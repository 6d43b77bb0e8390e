"""Export a tabled network so that it runs outside this project (docs/export-format.md).

model.pt       weights-only torch file: the architecture, the exact network's weights and every table
               layer's quantizer state; `load_tabled` rebuilds the ready network without dataset or cache.
model.onnx     the tabled network as a standard ONNX graph (tabconv/graphform.py), batch dimension dynamic.
model-ops.onnx the same network with each table layer one TableLayer node (domain tabconv): run by onnxruntime
               with the operator library of tabconv/ortops.py, on the native kernels (many times faster).
tables.npz     per table layer its encoder (prototypes, or tree split dimensions and thresholds) and tables,
               for a C/C++/FPGA implementation of the lookup.
manifest.json  always written: the network, every layer's geometry and setting, the arrays of tables.npz
               and the sha256 of every file, so an edited or damaged file is refused (`check_export`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tabconv import native
from tabconv.atomic import atomic_write_bytes
from tabconv.convert import convert, swap_in
from tabconv.data import DatasetInfo
from tabconv.exportreadme import export_readme
from tabconv.graphform import graph_form
from tabconv.modelinfo import ModelInfo
from tabconv.models import build_model
from tabconv.quantizer import ProductQuantizer
from tabconv.structure import LayerInfo, ModelStructure
from tabconv.train import weights_sha256

if TYPE_CHECKING:
    import onnx

    from tabconv.metrics import Metrics
    from tabconv.session import Session

FORMATS = ("torch", "onnx", "onnx-ops", "npz")
MODEL_FILE, ONNX_FILE, NPZ_FILE, MANIFEST_FILE = "model.pt", "model.onnx", "tables.npz", "manifest.json"
OPS_FILE, README_FILE = "model-ops.onnx", "README.md"
MODEL_FORMAT, MANIFEST_FORMAT, VERSION = "tabconv-tabled-model", "tabconv-export", 1
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"
ONNX_EXAMPLE_BATCH = 2  # torch.export specialises a dimension traced at size 1, so trace at 2


class ExportError(ValueError):
    """An export that cannot be written or read; the message names the file or value at fault."""


def parse_formats(text: str | Iterable[str]) -> tuple[str, ...]:
    """'torch,onnx' -> ('torch', 'onnx'), in FORMATS order; an unknown name is refused by name."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ExportError(f"unknown export format {', '.join(map(repr, unknown)) or repr(text)}; "
                          f"choose from {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in names)


@dataclass(frozen=True)
class TabledNetwork:
    """What an export holds: the exact network, what it is, and the tables of its table layers."""

    model: nn.Module  # the exact network
    info: ModelInfo
    structure: ModelStructure
    quantizers: Mapping[str, ProductQuantizer]
    preprocessing: Mapping[str, Any] | None = None  # what an image goes through before the network (see below)

    @classmethod
    def from_session(cls, session: Session, quantizers: Mapping[str, ProductQuantizer]) -> TabledNetwork:
        return cls(session.model, session.info, session.structure, quantizers, preprocessing(session.eval_set.info))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.info.input_shape

    def exact_cpu(self) -> nn.Module:
        """A copy of the exact network on the CPU in the default memory layout (the session runs channels-last)."""
        return copy.deepcopy(self.model).cpu().to(memory_format=torch.contiguous_format).eval()

    def network(self) -> nn.Module:
        """The tabled network on the CPU, in eval mode; the given quantizers are copied, never moved."""
        network = self.exact_cpu()
        for name, quantizer in self.quantizers.items():
            swap_in(network, self.structure.layer(name), copy.deepcopy(quantizer).cpu())
        return network.eval()


def preprocessing(info: DatasetInfo) -> dict[str, Any]:
    """How an image becomes the network's input, as the session fed it: pixels (0-255, C x H x W, resized to the
    input size) times pixel_scale, then per channel (x - mean) / std; class k of the output is class_names[k]."""
    return {"input_shape": [info.channels, info.height, info.width], "pixel_scale": 1 / 255,
            "mean": list(info.mean), "std": list(info.std), "class_names": list(info.class_names) or None,
            "dataset": info.name}


# -- writing -----------------------------------------------------------------------------------------
def export_files(tabled: TabledNetwork, formats: Iterable[str] = FORMATS) -> dict[str, bytes]:
    """File name -> content of an export: the chosen formats' files plus manifest.json."""
    formats = parse_formats(formats)
    grouped = [name for name, q in tabled.quantizers.items() if q.groups > 1]
    if grouped and {"onnx", "onnx-ops", "npz"} & set(formats):
        raise ExportError(f"table layer {grouped[0]} is a grouped convolution ({len(grouped)} in all): the onnx, "
                          "onnx-ops and npz formats hold ungrouped tables only; export with --format torch, or keep "
                          "those layers exact")
    files: dict[str, bytes] = {}
    arrays: dict[str, np.ndarray] = {}
    if "torch" in formats:
        files[MODEL_FILE] = model_bytes(tabled)
    if "onnx" in formats:
        files[ONNX_FILE] = onnx_bytes(tabled)
    if "onnx-ops" in formats:
        files[OPS_FILE] = ops_onnx_bytes(tabled)
    if "npz" in formats:
        arrays = npz_arrays(tabled)
        files[NPZ_FILE] = npz_bytes(arrays)
    files[README_FILE] = export_readme(tabled, files).encode()
    files[MANIFEST_FILE] = json.dumps(manifest(tabled, files, arrays), indent=2).encode()
    return files


def prepare_folder(folder: str | os.PathLike) -> Path:
    """The output folder, created if needed; refused in one line when it cannot be written."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--out {str(path)!r}: cannot create the folder ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ExportError(f"--out {str(path)!r}: the folder is not writable")
    return path


def write_export(folder: str | os.PathLike, files: Mapping[str, bytes]) -> list[Path]:
    """Write every file atomically into `folder` (a reader never sees half a file)."""
    path = prepare_folder(folder)
    try:
        return [atomic_write_bytes(path / name, data) for name, data in files.items()]
    except OSError as exc:
        raise ExportError(f"--out {str(path)!r}: cannot write the export ({exc.strerror})") from None


def export_zip(files: Mapping[str, bytes]) -> bytes:
    """The export's files as one zip (stored, not deflated: ONNX and npz hardly compress)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def configuration_zip(session: Session, metrics: Metrics, formats: Iterable[str] = FORMATS) -> bytes:
    """The export of an evaluated configuration of a session (built or fine-tuned tables) as one zip."""
    return export_zip(export_files(TabledNetwork.from_session(session, session.quantizers(metrics)), formats))


def model_bytes(tabled: TabledNetwork) -> bytes:
    """model.pt: plain dicts, tensors, strings and ints only (loadable with weights_only=True)."""
    payload = {"format": MODEL_FORMAT, "version": VERSION, **_identity(tabled),
               "weights": {k: v.detach().cpu().contiguous() for k, v in tabled.model.state_dict().items()},
               "layers": {name: {"params": q.get_params(),
                                 "state": {k: v.detach().cpu().contiguous() for k, v in q.state_dict().items()}}
                          for name, q in tabled.quantizers.items()}}
    payload["sha256"] = _payload_sha256(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _identity(tabled: TabledNetwork) -> dict[str, Any]:
    info = tabled.info
    return {"model": info.model, "num_classes": info.num_classes, "input_shape": list(tabled.input_shape),
            "dataset": info.dataset, "checkpoint_sha256": info.sha256}


def _payload_sha256(payload: Mapping[str, Any]) -> str:
    """One hash over every tensor (names, dtypes, shapes, bytes) and every other value of model.pt."""
    tensors = {f"weights.{k}": v for k, v in payload["weights"].items()}
    tensors.update({f"layers.{name}.{k}": v for name, item in payload["layers"].items()
                    for k, v in item["state"].items()})
    rest = {k: v for k, v in payload.items() if k not in ("weights", "layers", "sha256")}
    rest["params"] = {name: item["params"] for name, item in payload["layers"].items()}
    return hashlib.sha256((weights_sha256(tensors) + json.dumps(rest, sort_keys=True)).encode()).hexdigest()


def onnx_bytes(tabled: TabledNetwork) -> bytes:
    """model.onnx: the graph form of the tabled network, traced by torch.export, batch dimension dynamic."""
    return _with_identity(_onnx_export(graph_form(tabled.network()), tabled), tabled).SerializeToString()


def ops_onnx_bytes(tabled: TabledNetwork) -> bytes:
    """model-ops.onnx: the tabled network with its table layers as TableLayer nodes (tabconv/ortops.py)."""
    from tabconv import ortops

    exported = _onnx_export(ortops.placeholder_network(tabled), tabled)
    return _with_identity(ortops.ops_model(tabled, exported), tabled).SerializeToString()


def _onnx_export(module: nn.Module, tabled: TabledNetwork) -> onnx.ModelProto:
    """`module` traced by torch.export into ONNX, batch dimension dynamic."""
    example = torch.zeros(ONNX_EXAMPLE_BATCH, *tabled.input_shape)
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress lines and deprecation notes are not the user's
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[ONNX_INPUT],
                                    output_names=[ONNX_OUTPUT], dynamic_shapes=({0: batch},), verbose=False)
    return program.model_proto


def _with_identity(proto: onnx.ModelProto, tabled: TabledNetwork) -> onnx.ModelProto:
    for key, value in {**_identity(tabled), "format": MANIFEST_FORMAT, "version": VERSION}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"tabconv.{key}", json.dumps(value)
    return proto


def npz_arrays(tabled: TabledNetwork) -> dict[str, np.ndarray]:
    """'<layer>/<array>' -> array for every table layer (see docs/export-format.md)."""
    arrays: dict[str, np.ndarray] = {}
    for name, q in tabled.quantizers.items():
        learned = {"tables": q.tables_}
        if q.encoder == "tree":
            learned.update(split_dims=q.split_dims_, thresholds=q.thresholds_)
        else:
            learned["prototypes"] = q.prototypes_
        if q.lut_dtype == "int8":
            learned.update(table_scale=q.table_scale_, table_offset=q.table_offset_)
        arrays.update({f"{name}/{key}": value.detach().cpu().contiguous().numpy() for key, value in learned.items()})
    return arrays


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def manifest(tabled: TabledNetwork, files: Mapping[str, bytes], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """manifest.json: the network, each layer in forward order, each array and each file's sha256."""
    layers = []
    for info in tabled.structure.layers:
        entry = {"name": info.name, **_geometry(tabled.model.get_submodule(info.name), info)}
        quantizer = tabled.quantizers.get(info.name)
        entry.update(_table_entry(info.name, quantizer, arrays) if quantizer else {"mode": "exact"})
        layers.append(entry)
    return {"format": MANIFEST_FORMAT, "version": VERSION, **_identity(tabled),
            "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                      for name, data in files.items()},
            "onnx": {"input": ONNX_INPUT, "output": ONNX_OUTPUT, "input_shape": ["batch", *tabled.input_shape]}
            if ONNX_FILE in files or OPS_FILE in files else None,
            "preprocessing": dict(tabled.preprocessing) if tabled.preprocessing else None,
            "layers": layers}


def _geometry(module: nn.Module, info: LayerInfo) -> dict[str, Any]:
    """Kind and shape of a layer as PyTorch defines it (per image: no batch dimension)."""
    common = {"kind": info.kind, "input_shape": list(info.input_shape), "output_shape": list(info.output_shape),
              "batchnorm_folded": info.bn}
    if info.kind == "conv":
        return {**common, "in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": list(module.padding), "dilation": list(module.dilation), "groups": module.groups}
    return {**common, "in_features": module.in_features, "out_features": module.out_features}


def _table_entry(name: str, quantizer: ProductQuantizer, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    padded = quantizer.padded_dim(quantizer.in_features_)
    setting = quantizer.setting
    entry = {"mode": "table", "codebooks": setting.codebooks, "centroids": setting.centroids,
             "encoder": setting.encoder, "lut_dtype": setting.lut_dtype, "inner_dim": quantizer.in_features_,
             "padded_dim": padded, "subspace_width": padded // quantizer.n_codebooks, "bias_folded": True}
    if quantizer.encoder == "tree":
        entry["tree_depth"] = quantizer.split_dims_.shape[1]
    prefix = f"{name}/"
    entry["arrays"] = {key[len(prefix):]: {"key": key, "dtype": str(value.dtype), "shape": list(value.shape)}
                       for key, value in arrays.items() if key.startswith(prefix)}
    return entry


# -- reading -------------------------------------------------------------------------------------------
def load_tabled(path: str | os.PathLike, kernel: str | None = None) -> nn.Module:
    """The tabled network of a model.pt, ready in eval mode on the CPU (no dataset, no table cache).

    Its table layers run on the native kernels when they are available (`kernel` None or "auto"), or on the one
    named ("native" fails when the kernels cannot be built; "torch" keeps PyTorch's path). The file is checked
    first: a damaged, edited or foreign file is refused with one line naming it.
    """
    path = Path(path)
    payload = _read_model_file(path)
    try:
        model = build_model(payload["model"], payload["num_classes"], payload["input_shape"][0])
        model.load_state_dict(payload["weights"])
        structure = ModelStructure(model.eval(), tuple(payload["input_shape"]))
        quantizers = {name: _quantizer(structure, name, item) for name, item in payload["layers"].items()}
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise ExportError(f"{path}: does not rebuild a tabled network ({_first_line(exc)})") from None
    tabled = convert(model, structure, quantizers)
    return native.set_kernel(tabled, kernel) if kernel is not None else tabled


@torch.no_grad()
def kernel_check(path: str | os.PathLike, images: torch.Tensor, kernel: str) -> dict[str, Any]:
    """The exported model.pt on `kernel` against the same file on the torch path, on `images`: that what was
    written runs on the kernel a deployment will use, and computes what the library computes."""
    runs, reference = load_tabled(path, kernel), load_tabled(path, "torch")
    got, want = runs(images), reference(images)
    scale = float(want.abs().max()) or 1.0
    return {"kernel": kernel, "runs_on": native.runs_on(kernel),
            "images": len(images), "same_predictions": float((got.argmax(1) == want.argmax(1)).float().mean()),
            "max_abs_diff_relative": float((got - want).abs().max()) / scale}


def _read_model_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path}: no such exported model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a torch archive
        raise ExportError(f"{path}: not a readable torch file ({_first_line(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ExportError(f"{path}: not an exported tabled model (no {MODEL_FORMAT!r} marker)")
    if payload.get("version") != VERSION:
        raise ExportError(f"{path}: exported model version {payload.get('version')!r} is not supported "
                          f"(this tabconv reads version {VERSION})")
    try:
        intact = _payload_sha256(payload) == payload.get("sha256")
    except (KeyError, TypeError, AttributeError):
        intact = False
    if not intact:
        raise ExportError(f"{path}: content does not match its recorded sha256 (file edited or damaged); export again")
    return payload


def _quantizer(structure: ModelStructure, name: str, item: Mapping[str, Any]) -> ProductQuantizer:
    """A table layer's quantizer from its parameters and state, checked against the layer it replaces."""
    info = structure.layer(name)
    quantizer = ProductQuantizer(**item["params"])
    quantizer.load_state_dict(item["state"])
    if quantizer.in_features_ != info.inner_dim or quantizer.out_features_ != info.out_features:
        raise ValueError(f"layer {name} holds tables for D={quantizer.in_features_}, M={quantizer.out_features_}, "
                         f"the model's layer has D={info.inner_dim}, M={info.out_features}")
    return quantizer


def check_export(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export folder, after checking every file it lists against its sha256 and every
    array of tables.npz against the manifest's dtype and shape."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    try:
        data = json.loads(manifest_path.read_text())
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{manifest_path}: not a readable export manifest ({_first_line(exc)})") from None
    if data.get("format") != MANIFEST_FORMAT or data.get("version") != VERSION:
        raise ExportError(f"{manifest_path}: not a version {VERSION} {MANIFEST_FORMAT!r} manifest")
    for name, entry in files.items():
        if name == MANIFEST_FILE:
            continue
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{path}: listed in the manifest but missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("sha256"):
            raise ExportError(f"{path}: sha256 does not match the manifest (file edited or damaged); export again")
    if NPZ_FILE in files:
        _check_arrays(folder / NPZ_FILE, data["layers"])
    return data


def load_npz(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(manifest, arrays) of an export folder, both checked (see `check_export`)."""
    folder = Path(folder)
    data = check_export(folder)
    if NPZ_FILE not in data["files"]:
        raise ExportError(f"{folder}: the export has no {NPZ_FILE} (export with --format npz)")
    with np.load(folder / NPZ_FILE, allow_pickle=False) as npz:
        return data, {key: npz[key] for key in npz.files}


def _check_arrays(path: Path, layers: list[dict[str, Any]]) -> None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = {key: (str(npz[key].dtype), list(npz[key].shape)) for key in npz.files}
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable npz file ({_first_line(exc)})") from None
    listed = {a["key"]: (a["dtype"], a["shape"]) for layer in layers for a in layer.get("arrays", {}).values()}
    if found != listed:
        wrong = sorted(k for k in set(found) | set(listed) if found.get(k) != listed.get(k))
        raise ExportError(f"{path}: arrays do not match the manifest ({', '.join(wrong[:5])})")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
