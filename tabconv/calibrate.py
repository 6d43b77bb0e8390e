"""Calibration: capture each layer's input rows and learn its tables, independently or sequentially.

`independent`: every layer learns from exact-network activations, so one set of tables serves any
mask. `sequential` (the paper's): each layer learns from activations coming out of the
already-approximated upstream layers, so its tables depend on every upstream setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tabconv.cache import TableCache, cache_key
from tabconv.config import Calibration
from tabconv.convert import convert
from tabconv.lowering import bias_vector, fold_batchnorm, im2col, weight_matrix
from tabconv.progress import Progress, ProgressEvent, Stage
from tabconv.quantizer import INT8_SCHEME, ProductQuantizer
from tabconv.settings import LayerSetting
from tabconv.structure import LayerInfo, ModelStructure

CAPTURE_BYTES = 256 << 20  # bounds one batch's im2col rows of a layer (224x224 inputs: ~12,500 rows per image)
# a grouped layer's rows are G groups wide (EfficientNet-B0's 5x5 depthwise convs: up to 28,800 columns), and its
# k-means keeps max(16 K, max_rows / G) of them (grouped_sample): capturing 16,384 made 15 GB of rows there
GROUPED_CAPTURE_ROWS = 4096
FITTED, LOADED, REUSED = "fitted", "loaded from the disk cache", "reused from memory"  # where tables came from


def folded_layer(model: nn.Module, info: LayerInfo) -> nn.Module:
    """The layer with its batch norm folded in: what the tables must reproduce."""
    layer = model.get_submodule(info.name)
    if info.bn:
        return fold_batchnorm(layer, model.get_submodule(info.bn))
    return layer


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A's rows for one layer input: im2col for a conv, flattened features for a linear layer."""
    if isinstance(module, nn.Conv2d):
        return im2col(x, module)
    return x.reshape(-1, x.shape[-1])


def row_sample(total: int, max_rows: int, seed: int) -> torch.Tensor | None:
    """Sorted indices of the calibration rows kept (None: keep them all)."""
    if total <= max_rows:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:max_rows].sort().values


@torch.no_grad()
def capture_rows(model: nn.Module, layers: list[LayerInfo], images: torch.Tensor, calibration: Calibration,
                 batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Input rows of each layer over the calibration images, each subsampled (seeded) to max_rows; batches are
    cut so that no layer's im2col rows of a batch exceed CAPTURE_BYTES."""
    widest = max((info.rows_per_image * info.inner_dim * info.groups * 4 for info in layers), default=1)
    batch_size = max(1, min(batch_size, CAPTURE_BYTES // widest))
    samples = {info.name: row_sample(info.rows_per_image * len(images), captured_rows(info, calibration),
                                     calibration.seed) for info in layers}
    parts: dict[str, list[torch.Tensor]] = {info.name: [] for info in layers}
    offset = {"rows": 0}
    handles = []
    for info in layers:
        module = model.get_submodule(info.name)

        def hook(mod, inputs, output, info=info):
            rows = layer_rows(mod, inputs[0])
            keep = samples[info.name]
            if keep is not None:
                start = offset["rows"] * info.rows_per_image
                local = keep[(keep >= start) & (keep < start + rows.shape[0])] - start
                rows = rows[local.to(rows.device)]
            parts[info.name].append(rows.cpu())

        handles.append(module.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        for start in range(0, len(images), batch_size):
            offset["rows"] = start
            model(images[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def captured_rows(info: LayerInfo, calibration: Calibration) -> int:
    """Rows of a layer kept from the calibration images: max_rows, or for a grouped layer (whose k-means uses
    max(16 K, max_rows / G)) max(max_rows / G, GROUPED_CAPTURE_ROWS)."""
    if info.groups == 1:
        return calibration.max_rows
    return min(calibration.max_rows, max(calibration.max_rows // info.groups, GROUPED_CAPTURE_ROWS))


def grouped_sample(total: int, groups: int, centroids: int, max_rows: int, seed: int) -> torch.Tensor | None:
    """Rows a grouped conv's k-means keeps: its G groups are G products, each fitted on the same rows, so the
    work is G times a dense layer's; max(16 K, max_rows / G) rows bound it (a depthwise layer of 576 channels at
    C=8 has 4,608 codebooks: 151 s of k-means on 16,384 rows here, about 10 s on 1,024)."""
    if groups == 1:
        return None
    return row_sample(total, max(16 * centroids, max_rows // groups), seed)


def layer_output(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The exact layer output for im2col rows (N, G * D): weight (D, M) holds every group's columns side by side."""
    if groups == 1:
        return rows @ weight + bias
    per_group = torch.einsum("ngd,dgm->ngm", rows.reshape(len(rows), groups, -1),
                             weight.reshape(weight.shape[0], groups, -1))
    return per_group.reshape(len(rows), -1) + bias


def fit_tables(weight: torch.Tensor, bias: torch.Tensor, setting: LayerSetting, rows: torch.Tensor,
               seed: int, groups: int = 1) -> ProductQuantizer:
    """k-means prototypes on the rows, tables for weight (D, M) and bias (M,) (grouped: D per group)."""
    quantizer = ProductQuantizer.from_setting(setting, random_state=seed, groups=groups).fit(rows.to(weight.device))
    return quantizer.set_weight(weight, bias)


def refit_linear(features: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's classifier refit, in closed form: weight (D, M) and bias minimising
    ||[X 1] [W; b] - Y||^2 + lam ||[W; b] - [W0; b0]||^2, lam = ridge * mean squared feature norm."""
    x = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    lam = ridge * float(x.square().sum(1).mean())
    prior = torch.cat([weight.double(), bias.double().unsqueeze(0)])
    gram = x.t() @ x
    gram.diagonal().add_(lam)
    solution = torch.linalg.solve(gram, x.t() @ target.double() + lam * prior)
    return solution[:-1].float(), solution[-1].float()


class TableBuilder:
    """Builds the tables a configuration needs, from the disk cache when they were built before."""

    def __init__(self, model: nn.Module, structure: ModelStructure, images: torch.Tensor,
                 calibration: Calibration, identity: Mapping[str, Any], cache: TableCache | None = None,
                 batch_size: int = 256) -> None:
        self.model = model.eval()
        self.structure = structure
        self.images = images
        self.calibration = calibration
        self.identity = dict(identity)  # e.g. checkpoint sha256 and dataset: part of every cache key
        self.cache = cache
        self.batch_size = batch_size
        self._exact_rows: dict[str, torch.Tensor] | None = None
        self._memo: dict[str, ProductQuantizer] = {}  # built this process, by cache key
        self.fits = 0  # layers actually fitted (not read from memory or disk) by this builder

    def key_parts(self, name: str, setting: LayerSetting, upstream: Mapping[str, LayerSetting]) -> dict[str, Any]:
        parts = {**self.identity, "layer": name, "setting": setting.with_(subvector=None).to_dict(),
                 "calibration": self.calibration.key_parts(),
                 # every parameter of the quantizer fit_tables makes: a new one can never serve stale tables
                 "quantizer": ProductQuantizer.from_setting(setting, random_state=self.calibration.seed,
                                                            groups=self.structure.layer(name).groups).get_params()}
        if setting.lut_dtype == "int8":
            parts["int8"] = INT8_SCHEME
        if self.depends_on_upstream(name):
            parts["upstream"] = {n: s.to_dict() for n, s in upstream.items() if s.is_table}
        return parts

    def depends_on_upstream(self, name: str) -> bool:
        """Whether the layer's tables are learned from the approximated upstream network (and so must be
        rebuilt when any upstream setting changes): sequential calibration, or the classifier refit."""
        return self.calibration.mode == "sequential" or self._refits_classifier(name)

    def _refits_classifier(self, name: str) -> bool:
        last = self.structure.layers[-1]
        return self.calibration.refit_classifier and name == last.name and last.kind == "linear"

    def exact_rows(self, name: str) -> torch.Tensor:
        """Rows from the exact network; captured for all layers in one pass, kept for rebuilds."""
        if self._exact_rows is None:
            self._exact_rows = capture_rows(self.model, self.structure.layers, self.images, self.calibration,
                                            self.batch_size)
        return self._exact_rows[name]

    def build(self, name: str, setting: LayerSetting,
              upstream: Mapping[str, ProductQuantizer] | None = None) -> ProductQuantizer:
        """Tables of one layer; in sequential mode `upstream` holds the built tables of earlier layers."""
        return self._build(name, setting, upstream)[0]

    def _build(self, name: str, setting: LayerSetting, upstream: Mapping[str, ProductQuantizer] | None
               ) -> tuple[ProductQuantizer, str]:
        """The layer's tables and where they came from: FITTED now, LOADED from the disk cache, or REUSED from
        this builder's memory."""
        info = self.structure.layer(name)
        upstream = dict(upstream or {})
        fitted = False

        def fit() -> ProductQuantizer:
            nonlocal fitted
            fitted = True
            self.fits += 1
            if self.depends_on_upstream(name) and upstream:
                partial = convert(self.model, self.structure, upstream)
                rows = capture_rows(partial, [info], self.images, self.calibration, self.batch_size)[name]
            else:
                rows = self.exact_rows(name)
            return self._fit(info, setting, rows)

        parts = self.key_parts(name, setting, {n: q.setting for n, q in upstream.items()})
        key = cache_key(parts)
        if key in self._memo:
            return self._memo[key], REUSED
        self._memo[key] = self.cache.get_or_build(parts, fit) if self.cache else fit()
        return self._memo[key], FITTED if fitted else LOADED

    def _fit(self, info: LayerInfo, setting: LayerSetting, rows: torch.Tensor) -> ProductQuantizer:
        """Tables of one layer from its input rows, by the calibration's fitting method."""
        layer = folded_layer(self.model, info)
        weight, bias = weight_matrix(layer), bias_vector(layer)
        rows = rows.to(weight.device)
        needs_target = self.calibration.fit == "least-squares" or self._refits_classifier(info.name)
        exact = self.exact_rows(info.name) if needs_target else None
        keep = grouped_sample(len(rows), info.groups, setting.centroids, self.calibration.max_rows,
                              self.calibration.seed)
        if keep is not None:
            rows = rows[keep.to(rows.device)]
            exact = exact[keep] if exact is not None else None
        target = layer_output(exact.to(weight.device), weight, bias, info.groups) if needs_target else None
        if self._refits_classifier(info.name):
            weight, bias = refit_linear(rows, target, weight, bias, self.calibration.ridge)
        quantizer = fit_tables(weight, bias, setting, rows, self.calibration.seed, info.groups)
        if self.calibration.fit == "least-squares":
            quantizer.refit_tables(rows, target, self.calibration.ridge)
        return quantizer

    def _table_names(self, settings: Mapping[str, LayerSetting]) -> list[str]:
        """The table layers of `settings`, in forward order."""
        return [n for n in self.structure.names if n in settings and settings[n].is_table]

    def missing(self, settings: Mapping[str, LayerSetting]) -> list[str]:
        """Table layers of `settings` whose tables are not in this builder's memory (building them fits them or
        reads them from the disk): cheap, so a view can tell a quick request from one that builds tables."""
        names = self._table_names(settings)
        upstream: dict[str, LayerSetting] = {}
        missing = []
        for name in names:
            if cache_key(self.key_parts(name, settings[name], upstream)) not in self._memo:
                missing.append(name)
            upstream[name] = settings[name]
        return missing

    def build_all(self, settings: Mapping[str, LayerSetting], progress: Progress | None = None,
                  sources: dict[str, str] | None = None) -> dict[str, ProductQuantizer]:
        """Tables for every table layer of `settings`, in forward order, reporting per-layer progress; `sources`
        (when given) receives where each layer's tables came from (FITTED, LOADED or REUSED)."""
        names = self._table_names(settings)
        built: dict[str, ProductQuantizer] = {}
        for i, name in enumerate(names):
            setting = settings[name]
            if progress:
                progress(ProgressEvent(Stage.TABLES, i, len(names), name))
            built[name], source = self._build(name, setting, built)
            if sources is not None:
                sources[name] = source
        if progress:
            progress(ProgressEvent(Stage.TABLES, len(names), len(names)))
        return built
