"""Operation and byte counts per image: the only place where FLOPs and storage are computed.

Exact layers follow the paper's convention (re-derived to reproduce its baselines to the unit):
conv = multiply-accumulates (+1 per output element for a bias), BatchNorm = 2 per element, a ReLU
module = 1 per element counted once even if called twice, pooling = 1 per input element,
Linear = in*out, and everything else (dropout, flatten, residual adds, functional ops) = 0.
The same rules extend to the modules of torchvision's other classifiers: every activation module
(ReLU6, Hardswish, SiLU, Sigmoid, GELU, ...) = 1 per element, LayerNorm / GroupNorm = 4 per element
(statistics and normalisation; BatchNorm's statistics are constants in eval mode), stochastic depth
and permutes = 0 (identity / data movement in eval mode), and the elementwise multiply inside a
squeeze-and-excitation block or a ConvNeXt layer scale = 1 per element. Concatenation and channel
shuffles move data and count 0. A module type with no rule counts 0 and is listed in the report's
`uncounted`, never silently.

A grouped convolution is G products of D = C_in / G * kh * kw inputs and M / G outputs: its exact
MACs are R * D * M; as a table layer each group has its own C codebooks, so encoding and prototypes
count G times while lookups and tables cover the M outputs once.

Table layers are costed analytically from their setting, so no fitted tables are needed. A model
that has already been converted is costed by passing the original model and the same settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from tabconv.lowering import ModuleCall, check_lowerable, conv_bn_pairs, example_input, trace_modules
from tabconv.settings import LUT_BYTES, LayerSetting

CONVENTIONS = ("paper", "full")

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh,
                nn.GELU, nn.ELU, nn.Mish, nn.PReLU, nn.Hardtanh)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_NORMS = (nn.LayerNorm, nn.GroupNorm)  # torchvision's LayerNorm2d is a LayerNorm
_NORM_OPS = 4
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d)
_FREE = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Flatten, nn.Unflatten, nn.Identity)
# torchvision.ops modules, matched by class name so that costing never has to import torchvision
_FREE_NAMES = ("StochasticDepth", "Permute")
# blocks whose own forward multiplies elementwise (SE: scale * input; ConvNeXt: layer_scale * x): 1 per element
_MULTIPLYING_BLOCKS = ("SqueezeExcitation", "CNBlock")
_SCALE_BYTES = 4  # int8 tables: per output, one float32 scale and one float32 bias (the codebooks' offsets summed)


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
    uncounted: list[str] = field(default_factory=list)  # module types with no cost rule (counted 0)

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
    rows: int, inner_dim: int, out_features: int, setting: LayerSetting, groups: int = 1
) -> dict[str, int]:
    """Ops and bytes of one table layer from R, D (per group), M and its setting (pure arithmetic, no tensors)."""
    c, k, m = setting.codebooks, setting.centroids, out_features
    d_pad = c * math.ceil(inner_dim / c)
    adds = rows * m * (c - 1)
    table_bytes = c * k * m * LUT_BYTES[setting.lut_dtype]  # each group's C tables cover its M / G outputs
    if setting.lut_dtype == "int8":
        adds += 2 * rows * m  # dequantize each output: one multiply, one add
        table_bytes += 2 * _SCALE_BYTES * m
    if setting.encoder == "exhaustive":
        encoding_macs = rows * k * d_pad * groups
        comparisons = rows * c * (k - 1) * groups
        prototype_bytes = k * d_pad * 4 * groups
    else:
        depth = setting.tree_depth
        encoding_macs = 0
        comparisons = rows * c * depth * groups
        prototype_bytes = (c * (k - 1) * 4 + c * depth * 4) * groups  # split thresholds + split dimensions
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
    """Non-MAC operations of an exact module under the paper convention (None: no rule for its type)."""
    if isinstance(module, nn.Conv2d):
        return math.prod(output_shape) if module.bias is not None else 0
    if isinstance(module, _BATCHNORM):
        return 2 * math.prod(output_shape)
    if isinstance(module, _NORMS):
        return _NORM_OPS * math.prod(output_shape)
    if isinstance(module, _ELEMENTWISE):
        return math.prod(output_shape)
    if isinstance(module, _POOLS):
        return math.prod(input_shape)
    if isinstance(module, (nn.Linear, *_FREE)) or type(module).__name__ in _FREE_NAMES:
        return 0
    return None


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
            counts = table_layer_counts(cost.rows, cost.inner_dim, cost.out_features, setting,
                                        getattr(module, "groups", 1))
            for key, value in counts.items():
                setattr(cost, key, value)
            return cost
        cost.exact_macs = cost.rows * cost.inner_dim * cost.out_features
    other = _other_ops(module, input_shape, output_shape)
    if other is None:
        cost.mode = "uncounted"
    cost.other_ops = other or 0
    cost.weight_bytes = _weight_bytes(module)
    if cost.weight_bytes and cost.mode == "-":
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
        self.block_multiplies = _block_multiplies(model, input_shape)

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
        return _report(convention, _with_blocks(layers, self.block_multiplies))


@torch.no_grad()
def _block_multiplies(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerCost]:
    """The elementwise multiply of each squeeze-and-excitation / layer-scale block (a forward only when the
    model has such blocks): not a module of its own, so the leaf trace cannot see it."""
    blocks = [(name, m) for name, m in model.named_modules() if type(m).__name__ in _MULTIPLYING_BLOCKS]
    if not blocks:
        return []
    found: dict[str, LayerCost] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            shape = tuple(output.shape[1:])
            found.setdefault(name, LayerCost(name, f"{type(module).__name__} multiply", "-",
                                             tuple(inputs[0].shape[1:]), shape, other_ops=math.prod(shape)))
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in blocks]
    was_training = model.training
    try:
        model.eval()
        model(example_input(model, input_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [found[name] for name, _ in blocks if name in found]


def _with_blocks(layers: list[LayerCost], blocks: list[LayerCost]) -> list[LayerCost]:
    """Each block's multiply placed after the last leaf inside the block."""
    if not blocks:
        return layers
    out = list(layers)
    for block in blocks:
        inside = [i for i, layer in enumerate(out) if layer.name.startswith(block.name + ".")]
        out.insert(inside[-1] + 1 if inside else len(out), block)
    return out


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
    uncounted = sorted({layer.kind for layer in layers if layer.mode == "uncounted"})
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
        uncounted=uncounted,
    )
