"""Measured latency as a cost axis: a per-layer latency look-up table, measured on this machine and cached.

Counted FLOPs say what a configuration should save; on a CPU an exact conv runs on tuned BLAS / oneDNN kernels and
a table layer on lookups, so only a timing says which is faster. As hardware-aware architecture searches do, each
(layer geometry, setting, kernel, batch, threads) is timed once on this machine and kept; the latency of a
configuration is then the sum of its layers' entries plus the rest of the network (pooling, activations, residual
additions: the exact network's end-to-end time minus its layers'), with no timing at evaluation time.

A table layer's time depends on its geometry and setting, not on its table values (the tree does the same
comparisons and the exhaustive encoder the same distances whatever they hold), so the entry is measured on tables
fitted to random rows. Every entry is a median over `repeats` runs after `warmup` runs, one layer at a time.
Timings on a busy machine are inflated: a table measured beside other work should be cleared and remeasured.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn

from tabconv import native
from tabconv.atomic import atomic_write_text
from tabconv.latency import median_ms
from tabconv.layers import TableConv2d, TableLinear
from tabconv.lowering import im2col
from tabconv.quantizer import ProductQuantizer
from tabconv.settings import LayerSetting
from tabconv.structure import LayerInfo, ModelStructure

FILE_NAME = "latency.json"
FORMAT = "tabconv-latency-table"
VERSION = 1
DEFAULT_BATCH = 64


@dataclass(frozen=True)
class LatencyEstimate:
    """One configuration's latency from the table: per layer (exact and as configured) and the rest."""

    batch: int
    threads: int
    kernel: str  # what table layers ran on: "native (<isa>)" or "torch"
    exact_ms: Mapping[str, float]  # every lowerable layer, exact (conv + its batch norm)
    layer_ms: Mapping[str, float]  # every lowerable layer as configured
    other_ms: float  # the rest of the network (same for every configuration)

    @property
    def total_ms(self) -> float:
        return self.other_ms + sum(self.layer_ms.values())

    @property
    def baseline_ms(self) -> float:
        return self.other_ms + sum(self.exact_ms.values())

    @property
    def speedup(self) -> float:
        """Exact / this configuration: above 1 it is faster than the exact network."""
        return self.baseline_ms / self.total_ms

    def versus_exact(self) -> str:
        """'3.90x faster than exact' or '1.40x slower than exact'."""
        if self.speedup >= 1:
            return f"{self.speedup:.2f}x faster than exact"
        return f"{1 / self.speedup:.2f}x slower than exact"

    def slower_layers(self, tabled: list[str]) -> list[str]:
        """Table layers that take longer than their exact layer."""
        return [name for name in tabled if self.layer_ms[name] > self.exact_ms[name]]

    def to_dict(self) -> dict[str, Any]:
        return {"latency_ms": self.total_ms, "baseline_latency_ms": self.baseline_ms, "latency_speedup": self.speedup,
                "latency_batch": self.batch, "latency_threads": self.threads, "latency_kernel": self.kernel,
                "latency_note": "per-layer medians measured on this machine and summed (bench/latency.py times "
                                "whole networks)",
                "latency_layers_ms": {name: {"exact": self.exact_ms[name], "configured": ms}
                                      for name, ms in self.layer_ms.items()}}


@dataclass
class LatencyTable:
    """Per-layer median milliseconds on this machine, measured on demand and kept in `root`/latency.json."""

    root: Path | None = None  # None: kept in memory only
    batch: int = DEFAULT_BATCH
    threads: int | None = None  # None: PyTorch's current intra-op threads
    repeats: int = 7
    warmup: int = 2
    _entries: dict[str, float] = field(default_factory=dict)
    _loaded: bool = False

    # -- the table ---------------------------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        return None if self.root is None else Path(self.root) / FILE_NAME

    def _threads(self) -> int:
        return self.threads or torch.get_num_threads()

    def _machine(self) -> dict[str, Any]:
        kernel = native.isa() if native.available() else "none"
        return {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "native": kernel,
                "batch": self.batch, "threads": self._threads()}

    def _load(self) -> None:
        if self._loaded or self.path is None:
            self._loaded = True
            return
        self._loaded = True
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # no table yet, or a damaged one: it is remeasured
        if isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == VERSION:
            self._entries.update({k: float(v) for k, v in data.get("entries", {}).items()})

    def _store(self, key: str, ms: float) -> None:
        self._entries[key] = ms
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            try:
                data = json.loads(self.path.read_text())
                entries = data.get("entries", {}) if data.get("format") == FORMAT else {}
            except (OSError, ValueError, AttributeError):
                entries = {}
            entries.update(self._entries)
            atomic_write_text(self.path, json.dumps({"format": FORMAT, "version": VERSION, "entries": entries},
                                                    sort_keys=True))

    def _lookup(self, parts: dict[str, Any], measure: Callable[[], float]) -> float:
        self._load()
        key = json.dumps({**parts, **self._machine()}, sort_keys=True)
        if key not in self._entries:
            self._store(key, measure())
        return self._entries[key]

    def clear(self) -> None:
        """Forget every entry (in memory and on disk): the next lookups remeasure."""
        self._entries.clear()
        if self.path is not None and self.path.exists():
            self.path.unlink()

    # -- per layer ---------------------------------------------------------------------------------------
    def exact_ms(self, model: nn.Module, info: LayerInfo) -> float:
        """The exact layer and its batch norm, on a random input of the layer's shape."""
        layer = model.get_submodule(info.name)
        parts = {"what": "exact", **_geometry(layer, info)}
        bn = model.get_submodule(info.bn) if info.bn else nn.Identity()
        return self._lookup(parts, lambda: self._time(nn.Sequential(layer, bn).eval(), info, channels_last=True))

    def table_ms(self, model: nn.Module, info: LayerInfo, setting: LayerSetting) -> float:
        """The table layer of `setting` (tables fitted to random rows), on the kernel table layers run on now."""
        layer = model.get_submodule(info.name)
        resolved = setting.for_inner_dim(info.inner_dim).with_(subvector=None)
        parts = {"what": "table", **_geometry(layer, info), "setting": resolved.to_dict(), "kernel": native.runs_on()}
        return self._lookup(parts, lambda: self._time(random_table_layer(layer, info, setting), info))

    def layer_ms(self, model: nn.Module, info: LayerInfo, setting: LayerSetting) -> float:
        return self.table_ms(model, info, setting) if setting.is_table else self.exact_ms(model, info)

    def other_ms(self, model: nn.Module, structure: ModelStructure) -> float:
        """The exact network end to end minus its lowerable layers: pooling, activations, additions."""
        parts = {"what": "rest", "model": type(model).__name__, "input_shape": list(structure.input_shape),
                 "layers": [list(info.input_shape) + list(info.output_shape) for info in structure.layers]}

        def measure() -> float:
            x = torch.randn(self.batch, *structure.input_shape).contiguous(memory_format=torch.channels_last)
            whole = self._median(lambda: model(x))
            return max(0.0, whole - sum(self.exact_ms(model, info) for info in structure.layers))

        return self._lookup(parts, measure)

    def estimate(self, model: nn.Module, structure: ModelStructure, settings: Mapping[str, LayerSetting]
                 ) -> LatencyEstimate:
        """The latency of a configuration (`settings` by layer; missing layers exact)."""
        exact = {info.name: self.exact_ms(model, info) for info in structure.layers}
        configured = {info.name: self.layer_ms(model, info, settings.get(info.name, LayerSetting()))
                      for info in structure.layers}
        runs_on = f"native ({native.isa()})" if native.runs_on() == "native" else "torch"
        return LatencyEstimate(self.batch, self._threads(), runs_on, exact, configured, self.other_ms(model, structure))

    # -- timing --------------------------------------------------------------------------------------------
    def _time(self, module: nn.Module, info: LayerInfo, channels_last: bool = False) -> float:
        x = torch.randn(self.batch, *info.input_shape)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._median(lambda: module(x))

    @torch.inference_mode()
    def _median(self, run: Callable[[], object]) -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(self._threads())
        try:
            return median_ms(run, self.repeats, self.warmup)
        finally:
            torch.set_num_threads(threads)


def _geometry(layer: nn.Module, info: LayerInfo) -> dict[str, Any]:
    common = {"kind": info.kind, "input_shape": list(info.input_shape), "output_shape": list(info.output_shape)}
    if isinstance(layer, nn.Conv2d):
        return {**common, "kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
                "padding": list(layer.padding), "dilation": list(layer.dilation), "groups": layer.groups}
    return common


def random_table_layer(layer: nn.Module, info: LayerInfo, setting: LayerSetting) -> nn.Module:
    """A table layer of this geometry and setting whose tables were fitted to random rows."""
    setting = setting.for_inner_dim(info.inner_dim).with_(subvector=None)
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *info.input_shape, generator=generator)
    rows = im2col(x, layer) if isinstance(layer, nn.Conv2d) else x
    rows = rows[torch.randint(len(rows), (max(4 * setting.centroids, 256),), generator=generator)]
    rows = rows + 0.01 * torch.randn(rows.shape, generator=generator)  # distinct rows for k-means
    quantizer = ProductQuantizer.from_setting(setting, groups=groups)
    quantizer.kmeans_iter = 3  # the times do not depend on how good the prototypes are
    quantizer.fit(rows)
    with torch.no_grad():
        made = (TableConv2d.from_conv(layer, quantizer, setting) if isinstance(layer, nn.Conv2d)
                else TableLinear.from_linear(layer, quantizer, setting))
    return made.eval()


@functools.cache
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
