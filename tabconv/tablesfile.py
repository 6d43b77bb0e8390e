"""The tables file of a fine-tuned configuration (`TUNED.tables.pt` beside `TUNED.json`).

Fine-tuned tables cannot be rebuilt from calibration data, so they travel as a file: every table
layer's quantizer parameters and learned tensors, loadable with `weights_only=True`. The
configuration records the file's name and sha256; loading refuses a missing, edited or mismatching
file with one line that names it and says what to do.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from tabconv.atomic import atomic_write
from tabconv.quantizer import ProductQuantizer
from tabconv.settings import LayerSetting
from tabconv.structure import ModelStructure

FORMAT = "tabconv-tuned-tables"
VERSION = 1
SUFFIX = ".tables.pt"
AGAIN = "fine-tune the configuration again to recreate it"


class TablesFileError(ValueError):
    """A tables file that cannot be used; the message names the file and the way forward."""


def tables_path_for(config_path: str | os.PathLike) -> Path:
    """`TUNED.json` -> `TUNED.tables.pt` in the same folder."""
    path = Path(config_path)
    return path.with_name(path.name.removesuffix(".json") + SUFFIX)


def tables_bytes(quantizers: Mapping[str, ProductQuantizer], sha256: str | None = None) -> tuple[bytes, str]:
    """The tables file's content and its sha256 (for a download); with `sha256`, TablesFileError unless they match."""
    buffer = io.BytesIO()
    sha = _save(quantizers, buffer, sha256, "these tables")
    return buffer.getvalue(), sha


def tables_sha256(quantizers: Mapping[str, ProductQuantizer]) -> str:
    """The tables file's sha256 without holding its content (every layer of ResNet-18/CIFAR-10 tabled at S=3 with
    the tree encoder: 2 GB, mostly its ridge prototypes)."""
    return _save(quantizers, None)


def save_tables(path: str | os.PathLike, quantizers: Mapping[str, ProductQuantizer],
                sha256: str | None = None) -> str:
    """Write the tables atomically, streamed; returns the file's sha256 (to record in the configuration). With
    `sha256`, a file whose content does not hash to it is not written (TablesFileError)."""
    written: list[str] = []
    atomic_write(Path(path), lambda handle: written.append(_save(quantizers, handle, sha256, str(path))))
    return written[0]


class _HashingWriter:
    """A write-only file object that hashes what passes through it, and copies it to `target` when given."""

    def __init__(self, target: BinaryIO | None) -> None:
        self.target, self.hash = target, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.target.write(data) if self.target is not None else len(data)

    def flush(self) -> None:
        if self.target is not None:
            self.target.flush()


def _save(quantizers: Mapping[str, ProductQuantizer], target: BinaryIO | None, expected: str | None = None,
          where: str = "") -> str:
    """torch.save the file's entry into `target` (None: nowhere) and return its sha256 (torch.save writes the same
    bytes for the same tensors); TablesFileError, naming `where`, when it is not `expected`."""
    entry = {"format": FORMAT, "version": VERSION,
             "layers": {name: {"params": q.get_params(),
                               "state": {k: v.detach().cpu() for k, v in q.state_dict().items()}}
                        for name, q in quantizers.items()}}
    writer = _HashingWriter(target)
    torch.save(entry, writer)
    sha = writer.hash.hexdigest()
    if expected is not None and sha != expected:
        raise TablesFileError(f"{where}: the tables serialise to sha256 {sha[:12]}…, not the recorded "
                              f"{expected[:12]}…; load them again from their tables file or {AGAIN}")
    return sha


def load_tables(path: str | os.PathLike, sha256: str | None, structure: ModelStructure,
                settings: Mapping[str, LayerSetting], device: torch.device | str = "cpu"
                ) -> dict[str, ProductQuantizer]:
    """The quantizers of a tables file, checked against its recorded sha256, the model and the settings."""
    path = Path(path)
    if not path.is_file():
        raise TablesFileError(f"{path}: tables file not found; keep it beside its configuration file or {AGAIN}")
    return read_tables(path.read_bytes(), str(path), sha256, structure, settings, device)


def read_tables(data: bytes, name: str, sha256: str | None, structure: ModelStructure,
                settings: Mapping[str, LayerSetting], device: torch.device | str = "cpu"
                ) -> dict[str, ProductQuantizer]:
    """Like `load_tables` for a file's content (e.g. an upload); `name` is what messages call it."""
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise TablesFileError(f"{name}: sha256 does not match the configuration's tables_sha256 (the file was "
                              f"edited, damaged or belongs to another run); {AGAIN}")
    try:
        entry = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
        if not isinstance(entry, dict) or entry.get("format") != FORMAT:
            raise ValueError("no tabconv-tuned-tables marker")
        if entry.get("version") != VERSION:
            raise TablesFileError(f"{name}: tables file version {entry.get('version')!r} is not supported "
                                  f"(expected {VERSION}); {AGAIN}")
        quantizers = {layer: _quantizer(item) for layer, item in entry["layers"].items()}
    except TablesFileError:
        raise
    except Exception as exc:
        raise TablesFileError(f"{name}: not a readable TabConv tables file ({type(exc).__name__}); {AGAIN}") from None
    wanted = sorted(n for n, s in settings.items() if s.is_table)
    if sorted(quantizers) != wanted:
        missing, extra = sorted(set(wanted) - set(quantizers)), sorted(set(quantizers) - set(wanted))
        raise TablesFileError(f"{name}: its layers do not match the configuration's table layers "
                              f"(missing {missing or 'none'}, extra {extra or 'none'}); {AGAIN}")
    for layer, quantizer in quantizers.items():
        _check_layer(name, layer, quantizer, settings[layer], structure)
    return quantizers


def _quantizer(item: dict) -> ProductQuantizer:
    """A quantizer from its parameters and `state_dict` (strict: every learned tensor must be there)."""
    quantizer = ProductQuantizer(**item["params"])
    quantizer.load_state_dict(item["state"])
    return quantizer


def _check_layer(path: str, name: str, quantizer: ProductQuantizer, setting: LayerSetting,
                 structure: ModelStructure) -> None:
    info = structure.layer(name)
    if quantizer.setting != setting.with_(subvector=None):
        raise TablesFileError(f"{path}: layer {name} holds tables for {quantizer.setting.to_dict()}, the "
                              f"configuration asks for {setting.to_dict()}")
    shape = (setting.codebooks, setting.centroids, info.out_features)
    if (quantizer.in_features_ != info.inner_dim or quantizer.tables_ is None
            or tuple(quantizer.tables_.shape) != shape):
        raise TablesFileError(f"{path}: layer {name} does not fit the model (expected D={info.inner_dim} and "
                              f"tables of shape {shape})")
