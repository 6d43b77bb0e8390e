"""Operation and byte counts per image: the only place where FLOPs and storage are computed.

Exact layers follow the paper's convention (re-derived to reproduce its baselines to the unit):
conv = multiply-accumulates (+1 per output element for a bias), BatchNorm = 2 per element, a ReLU
module = 1 per element counted once even if called twice, pooling = 1 per input element,
Linear = in*out, and everything else (dropout, flatten, residual adds, functional ops) = 0.

Table layers are costed analytically from their setting, so no fitted tables are needed. A model
that has already been converted is costed by passing the original model and the same settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from torch import nn

from tabconv.lowering import ModuleCall, check_lowerable, conv_bn_pairs, example_input, trace_modules
from tabconv.settings import LUT_BYTES, LayerSetting

CONVENTIONS = ("paper", "full")

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_FREE = (nn.Dropout, nn.Flatten, nn.Identity)
_SCALE_BYTES = 4  # int8 tables: one float32 scale per layer and one float32 offset per codebook


@dataclass
class LayerCost:
    """Counts for one leaf module, per image (R, D, M stay 0 unless it is a Conv2d or Linear)."""

    name: str
    kind: str
    mode: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    rows: int = 0
    inner_dim: int = 0
    out_features: int = 0
    exact_macs: int = 0
    other_ops: int = 0
    lookup_adds: int = 0
    lookups: int = 0
    encoding_macs: int = 0
    encoding_comparisons: int = 0
    weight_bytes: int = 0
    table_bytes: int = 0
    prototype_bytes: int = 0

    def flops(self, convention: str) -> int:
        """Arithmetic operations; 'paper' leaves encoding out, 'full' counts it."""
        _check_convention(convention)
        paper = self.exact_macs + self.other_ops + self.lookup_adds
        if convention == "paper":
            return paper
        return paper + self.encoding_macs + self.encoding_comparisons

    @property
    def storage_bytes(self) -> int:
        return self.weight_bytes + self.table_bytes + self.prototype_bytes


@dataclass
class CostReport:
    """Per-layer costs and totals under one convention; exact + encoding + lookup ops sum to flops."""

    convention: str
    layers: list[LayerCost]
    flops: int
    exact_ops: int
    encoding_ops: int
    lookup_ops: int
    storage_bytes: int
    weight_bytes: int
    table_bytes: int
    prototype_bytes: int

    def layer(self, name: str) -> LayerCost:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in this report")

    def to_dict(self) -> dict:
        """JSON-ready: shapes become lists, each layer carries its flops under this convention."""
        totals = {key: value for key, value in asdict(self).items() if key != "layers"}
        layers = []
        for layer in self.layers:
            row = asdict(layer)
            row["input_shape"] = list(layer.input_shape)
            row["output_shape"] = list(layer.output_shape)
            row["flops"] = layer.flops(self.convention)
            layers.append(row)
        return {**totals, "layers": layers}


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def table_layer_counts(
    rows: int, inner_dim: int, out_features: int, setting: LayerSetting
) -> dict[str, int]:
    """Ops and bytes of one table layer from R, D, M and its setting (pure arithmetic, no tensors)."""
    c, k, m = setting.codebooks, setting.centroids, out_features
    d_pad = c * math.ceil(inner_dim / c)
    adds = rows * m * (c - 1)
    table_bytes = c * k * m * LUT_BYTES[setting.lut_dtype]
    if setting.lut_dtype == "int8":
        adds += 2 * rows * m  # dequantize each output: one multiply, one add
        table_bytes += _SCALE_BYTES + _SCALE_BYTES * c
    if setting.encoder == "exhaustive":
        encoding_macs = rows * k * d_pad
        comparisons = rows * c * (k - 1)
        prototype_bytes = k * d_pad * 4
    else:
        depth = setting.tree_depth
        encoding_macs = 0
        comparisons = rows * c * depth
        prototype_bytes = c * (k - 1) * 4 + c * depth * 4  # split thresholds + split dimensions
    return {
        "lookup_adds": adds,
        "lookups": rows * c * m,
        "encoding_macs": encoding_macs,
        "encoding_comparisons": comparisons,
        "table_bytes": table_bytes,
        "prototype_bytes": prototype_bytes,
    }


def _geometry(
    module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]
) -> tuple[int, int, int]:
    """R (rows per image), D (inner dimension) and M (outputs per row) of a Conv2d or Linear."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        rows = math.prod(output_shape[1:])
        return rows, module.in_channels // module.groups * kh * kw, module.out_channels
    return math.prod(input_shape[:-1]), module.in_features, module.out_features


def _weight_bytes(module: nn.Module) -> int:
    """Parameters plus BatchNorm running statistics, in bytes."""
    tensors = list(module.parameters(recurse=False))
    if isinstance(module, _BATCHNORM) and module.track_running_stats:
        tensors += [module.running_mean, module.running_var]
    return sum(t.numel() * t.element_size() for t in tensors)


def _other_ops(
    module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]
) -> int:
    """Non-MAC operations of an exact module under the paper convention."""
    if isinstance(module, nn.Conv2d):
        return math.prod(output_shape) if module.bias is not None else 0
    if isinstance(module, _BATCHNORM):
        return 2 * math.prod(output_shape)
    if isinstance(module, _ELEMENTWISE):
        return math.prod(output_shape)
    if isinstance(module, _POOLS):
        return math.prod(input_shape)
    if isinstance(module, (nn.Linear, *_FREE)):
        return 0
    raise ValueError(
        f"no cost rule for {type(module).__name__} modules; "
        "cost a converted model by passing the original model and its settings"
    )


def _layer_cost(
    name: str,
    module: nn.Module,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    setting: LayerSetting | None,
    folded: bool,
) -> LayerCost:
    """One leaf module's counts: exact, as a table layer, or folded into a table layer (free)."""
    input_shape, output_shape = shapes
    cost = LayerCost(name, type(module).__name__, "-", input_shape, output_shape)
    if folded:
        cost.mode = "folded"
        return cost
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        cost.rows, cost.inner_dim, cost.out_features = _geometry(module, input_shape, output_shape)
        if setting is not None and setting.is_table:
            cost.mode = "table"
            counts = table_layer_counts(cost.rows, cost.inner_dim, cost.out_features, setting)
            for key, value in counts.items():
                setattr(cost, key, value)
            return cost
        cost.exact_macs = cost.rows * cost.inner_dim * cost.out_features
    cost.other_ops = _other_ops(module, input_shape, output_shape)
    cost.weight_bytes = _weight_bytes(module)
    if cost.weight_bytes:
        cost.mode = "exact"
    return cost


def _validate_settings(calls: list[ModuleCall], settings: Mapping[str, LayerSetting]) -> None:
    """Every key must name a Conv2d/Linear leaf that runs; table keys must be lowerable."""
    layers = {c.name: c.module for c in calls if isinstance(c.module, (nn.Conv2d, nn.Linear))}
    for name, setting in settings.items():
        if name not in layers:
            raise ValueError(f"setting for {name!r}: not a Conv2d/Linear layer of this model")
        if setting.is_table:
            check_lowerable(name, layers[name])


class CostModel:
    """A model traced once at an input shape; `report(settings, convention)` is then pure arithmetic."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int],
                 calls: list[ModuleCall] | None = None) -> None:
        """`calls`: a trace of this model at this shape already made (ModelStructure.calls), reused."""
        self.calls = calls if calls is not None else trace_modules(model, example_input(model, input_shape))
        self.pairs = conv_bn_pairs(self.calls)

    def report(self, settings: Mapping[str, LayerSetting] | None = None, convention: str = "paper") -> CostReport:
        """Per-image cost with the named layers as table layers (layers not named stay exact)."""
        _check_convention(convention)
        settings = dict(settings or {})
        _validate_settings(self.calls, settings)
        table_convs = {name for name, s in settings.items() if s.is_table}
        folded = {bn for conv, bn in self.pairs.items() if conv in table_convs}
        layers = [
            _layer_cost(c.name, c.module, (c.input_shape, c.output_shape), settings.get(c.name), c.name in folded)
            for c in self.calls
        ]
        return _report(convention, layers)


def model_cost(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    settings: Mapping[str, LayerSetting] | None = None,
    convention: str = "paper",
) -> CostReport:
    """Per-image cost of ``model`` at ``input_shape`` (C, H, W) with some layers as table layers.

    ``settings`` maps qualified layer names to settings; layers not named stay exact. Pass the
    original (unconverted) model: table layers are costed from their settings alone.
    """
    return CostModel(model, input_shape).report(settings, convention)


def _report(convention: str, layers: list[LayerCost]) -> CostReport:
    """Totals over layers; encoding counts only under the 'full' convention."""
    exact = sum(layer.exact_macs + layer.other_ops for layer in layers)
    lookup = sum(layer.lookup_adds for layer in layers)
    encoding = 0
    if convention == "full":
        encoding = sum(layer.encoding_macs + layer.encoding_comparisons for layer in layers)
    weight = sum(layer.weight_bytes for layer in layers)
    table = sum(layer.table_bytes for layer in layers)
    prototype = sum(layer.prototype_bytes for layer in layers)
    return CostReport(
        convention=convention,
        layers=layers,
        flops=exact + encoding + lookup,
        exact_ops=exact,
        encoding_ops=encoding,
        lookup_ops=lookup,
        storage_bytes=weight + table + prototype,
        weight_bytes=weight,
        table_bytes=table,
        prototype_bytes=prototype,
    )
