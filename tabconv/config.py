"""The configuration file: which layers are tables, with which C/K, calibrated how, for which model.

A versioned JSON schema. Loading validates everything and raises ConfigError with a message that
names the offending item; it never lets a traceback reach the user.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tabconv import __version__
from tabconv.atomic import atomic_write_text
from tabconv.settings import EXACT, LayerSetting, SettingError
from tabconv.structure import ModelStructure, unknown_message

SCHEMA = "tabconv-config"
SCHEMA_VERSION = 2  # 2: calibration.fit / ridge / refit_classifier, tables_file, finetune
READABLE_VERSIONS = (1, 2)
CALIBRATION_MODES = ("independent", "sequential")
FIT_METHODS = ("kmeans", "least-squares")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the item at fault, and `field` the configuration
    field it concerns (e.g. "checkpoint_sha256"), so that each front end can say what to do in its own words."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Calibration:
    """Where prototypes are learned from: the first `images` training images of `dataset`."""

    images: int = 1000
    mode: str = "independent"
    seed: int = 0
    max_rows: int = 16384  # rows per layer sampled (seeded) for k-means; the rest cost time, not quality
    split: str = "train"
    fit: str = "kmeans"  # kmeans: prototypes x weights; least-squares: tables refit against the exact output
    ridge: float = 0.01  # least-squares pull toward the k-means tables, in units of the mean bucket size
    refit_classifier: bool = False  # the reference's step: classifier weights refit to the exact logits first

    def key_parts(self) -> dict[str, Any]:
        """What tables depend on: the fields, less those the fitting method ignores (so k-means tables keep
        the cache keys they had before least squares existed, and a ridge change refits only what uses it)."""
        parts = asdict(self)
        if not self.refit_classifier:
            del parts["refit_classifier"]
            if self.fit == "kmeans":
                del parts["ridge"]
        if self.fit == "kmeans":
            del parts["fit"]
        return parts

    def __post_init__(self) -> None:
        if self.mode not in CALIBRATION_MODES:
            raise ConfigError(f"calibration.mode must be one of {CALIBRATION_MODES}, got {self.mode!r}")
        if self.fit not in FIT_METHODS:
            raise ConfigError(f"calibration.fit must be one of {FIT_METHODS}, got {self.fit!r}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, int | float) or not self.ridge > 0:
            raise ConfigError(f"calibration.ridge must be a positive number, got {self.ridge!r}")
        if not isinstance(self.refit_classifier, bool):
            raise ConfigError(f"calibration.refit_classifier must be true or false, got {self.refit_classifier!r}")
        for key in ("images", "max_rows"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"calibration.{key} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"calibration.seed must be an integer, got {self.seed!r}")
        if self.split not in ("train", "test"):
            raise ConfigError(f"calibration.split must be 'train' or 'test', got {self.split!r}")


@dataclass
class Configuration:
    """A whole TabConv configuration; `layers` holds every lowerable layer by qualified name."""

    model: str
    dataset: str
    num_classes: int
    input_shape: tuple[int, int, int]
    layers: dict[str, LayerSetting]
    calibration: Calibration = field(default_factory=Calibration)
    checkpoint_sha256: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    tables_file: str | None = None  # fine-tuned tables, a file beside this one (name relative to it)
    tables_sha256: str | None = None
    finetune: dict[str, Any] = field(default_factory=dict)  # how the tables file was trained
    folder: Path | None = field(default=None, compare=False)  # where it was loaded from (tables_file is beside it)
    retargeted_from: dict[str, Any] | None = None  # the configuration it was made from for another checkpoint

    def retargeted(self, checkpoint_sha256: str | None, source: str) -> Configuration:
        """This configuration for another checkpoint of the same architecture: the same layer settings and
        calibration, tables to be rebuilt from that checkpoint (a tables file belongs to the weights it was
        trained on, so it is dropped, as are the metrics measured with them); `source` names where it came from."""
        origin = {"file": source, "checkpoint_sha256": self.checkpoint_sha256, "tables_sha256": self.tables_sha256,
                  "accuracy": self.metrics.get("accuracy")}
        return replace(self, checkpoint_sha256=checkpoint_sha256, metrics={}, tables_file=None, tables_sha256=None,
                       finetune={}, layers=dict(self.layers), retargeted_from=origin)

    def tables_path(self) -> Path | None:
        """The fine-tuned tables file this configuration needs, or None when its tables are rebuilt."""
        if not self.tables_file:
            return None
        return (self.folder or Path.cwd()) / self.tables_file

    def table_layers(self) -> list[str]:
        return [name for name, s in self.layers.items() if s.is_table]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "dataset": self.dataset,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "checkpoint_sha256": self.checkpoint_sha256,
            "calibration": asdict(self.calibration),
            "layers": {name: s.to_dict() for name, s in self.layers.items()},
            "metrics": self.metrics,
            "tables_file": self.tables_file,
            "tables_sha256": self.tables_sha256,
            "finetune": self.finetune,
            "retargeted_from": self.retargeted_from,
            "software": software_versions(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(Path(path), self.to_json())

    def validate_against(self, structure: ModelStructure, checkpoint_sha256: str | None = None, *,
                         model: str | None = None, dataset: str | None = None) -> Configuration:
        """Refuse a configuration made for another model, dataset or checkpoint, and layer names the model lacks:
        the one place every reader (command line, session, explorer, benchmarks) checks the fit."""
        if (model is not None and self.model != model) or (dataset is not None and self.dataset != dataset):
            loaded = " on ".join(part for part in (model or self.model, dataset or self.dataset) if part)
            raise ConfigError(f"made for {self.model} on {self.dataset}, but {loaded} is loaded")
        for name in self.layers:
            if name not in structure.names:
                raise ConfigError(f"layers: {unknown_message('layer', name, structure.names)} (model {self.model})")
        if tuple(self.input_shape) != tuple(structure.input_shape):
            raise ConfigError(f"input_shape {list(self.input_shape)} does not match the model's "
                              f"{list(structure.input_shape)}")
        if checkpoint_sha256 and self.checkpoint_sha256 and checkpoint_sha256 != self.checkpoint_sha256:
            raise ConfigError(
                f"checkpoint_sha256 {self.checkpoint_sha256[:12]}... was made for another checkpoint "
                f"(this one is {checkpoint_sha256[:12]}...)", field="checkpoint_sha256")
        for name in structure.names:
            self.layers.setdefault(name, EXACT)
        self.layers = {info.name: self.layers[info.name].for_inner_dim(info.inner_dim) for info in structure.layers}
        return self


def uniform(model: str, dataset: str, num_classes: int, structure: ModelStructure, setting: LayerSetting,
            calibration: Calibration | None = None, checkpoint_sha256: str | None = None) -> Configuration:
    """Every layer with the same setting (e.g. all exact, or all tables at one C and K)."""
    return Configuration(model, dataset, num_classes, structure.input_shape,
                         {name: setting for name in structure.names}, calibration or Calibration(),
                         checkpoint_sha256)


def software_versions() -> dict[str, str]:
    """Versions recorded in a configuration file (package metadata: no slow torchvision import)."""
    from importlib.metadata import version

    import numpy
    import torch

    return {"tabconv": __version__, "torch": torch.__version__, "torchvision": version("torchvision"),
            "numpy": numpy.__version__, "python": platform.python_version()}


# -- parsing ---------------------------------------------------------------------------------------
def load(path: str | os.PathLike) -> Configuration:
    """Read and validate a configuration file (structure-independent checks)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    try:
        loaded = from_json(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    loaded.folder = path.resolve().parent
    return loaded


def load_for(path: str | os.PathLike, structure: ModelStructure, checkpoint_sha256: str | None = None, *,
             model: str | None = None, dataset: str | None = None, retarget: bool = False) -> Configuration:
    """`load`, then `validate_against` what is loaded; every misfit names the file. `retarget`: a configuration
    made for another checkpoint of this architecture is accepted for this one (`Configuration.retargeted`); the
    model, dataset, layers and input shape must still fit."""
    loaded = load(path)
    if retarget:
        loaded = loaded.retargeted(checkpoint_sha256, str(path))
    try:
        return loaded.validate_against(structure, checkpoint_sha256, model=model, dataset=dataset)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}", field=exc.field) from exc


def from_json(text: str) -> Configuration:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    return from_dict(data)


def from_dict(data: Any) -> Configuration:
    if not isinstance(data, dict):
        raise ConfigError("a configuration must be a JSON object")
    if data.get("schema") != SCHEMA:
        raise ConfigError(f"'schema' must be {SCHEMA!r}: this is not a TabConv configuration file")
    if data.get("schema_version") not in READABLE_VERSIONS:
        raise ConfigError(f"schema_version {data.get('schema_version')!r} is not supported (expected one of "
                          f"{READABLE_VERSIONS})")
    for key, kind in (("model", str), ("dataset", str), ("num_classes", int), ("input_shape", list), ("layers", dict)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise ConfigError(f"'{key}' is missing or not a {kind.__name__}")
    shape = data["input_shape"]
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise ConfigError(f"'input_shape' must be three positive integers [C, H, W], got {shape!r}")
    sha = data.get("checkpoint_sha256")
    if sha is not None and not isinstance(sha, str):
        raise ConfigError("'checkpoint_sha256' must be a string or null")
    metrics = data.get("metrics", {})
    metrics = {} if metrics is None else metrics
    if not isinstance(metrics, dict):
        raise ConfigError("'metrics' must be an object")
    tables_file, tables_sha = data.get("tables_file"), data.get("tables_sha256")
    for key, value in (("tables_file", tables_file), ("tables_sha256", tables_sha)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"'{key}' must be a non-empty string or null")
    if tables_file and (Path(tables_file).name != tables_file or not tables_sha):
        raise ConfigError("'tables_file' must be a bare file name beside the configuration, with its tables_sha256")
    finetune = data.get("finetune") or {}
    if not isinstance(finetune, dict):
        raise ConfigError("'finetune' must be an object")
    retargeted_from = data.get("retargeted_from")
    if retargeted_from is not None and not isinstance(retargeted_from, dict):
        raise ConfigError("'retargeted_from' must be an object or null")
    return Configuration(data["model"], data["dataset"], data["num_classes"], tuple(shape),
                         _parse_layers(data["layers"]), _parse_calibration(data.get("calibration", {})), sha, metrics,
                         tables_file, tables_sha, finetune, retargeted_from=retargeted_from)


def _parse_calibration(raw: Any) -> Calibration:
    if not isinstance(raw, dict):
        raise ConfigError("'calibration' must be an object")
    known = set(Calibration.__dataclass_fields__)
    extra = set(raw) - known
    if extra:
        raise ConfigError(f"calibration: unknown key(s) {sorted(extra)}; known: {sorted(known)}")
    return Calibration(**raw)


def _parse_layers(raw: dict) -> dict[str, LayerSetting]:
    layers = {}
    known = set(LayerSetting.__dataclass_fields__)
    for name, item in raw.items():
        if not isinstance(item, dict):
            raise ConfigError(f"layers.{name}: must be an object like {{'mode': 'table', 'codebooks': 8, ...}}")
        extra = set(item) - known
        if extra:
            raise ConfigError(f"layers.{name}: unknown key(s) {sorted(extra)}; known: {sorted(known)}")
        try:
            layers[name] = LayerSetting(**item)
        except SettingError as exc:
            raise ConfigError(f"layers.{name}: {exc}") from None
    return layers
