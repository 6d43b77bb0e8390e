"""What a model is made of: its lowerable layers in forward order, their shapes, BN partners and groups.

Every setting in this project is keyed by a layer's qualified module name; this is where names are
discovered and where groups (stem, residual blocks, stages, classifier) expand to names.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from tabconv.lowering import (
    ModuleCall,
    conv_bn_pairs,
    example_input,
    lowerable_layers,
    trace_modules,
    unlowerable_layers,
)


class UnknownLayerError(KeyError):
    """A layer or group name the model does not have; the message names it and suggests close ones."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class LayerInfo:
    """One lowerable layer: shapes are per image (no batch dimension)."""

    name: str
    kind: str  # "conv" | "linear"
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    bn: str | None  # the BatchNorm2d folded into this layer's tables when it is approximated
    rows_per_image: int
    inner_dim: int  # D: per group for a grouped conv (C_in / groups * kh * kw)
    out_features: int  # M: all groups together
    groups: int = 1  # a grouped conv is `groups` products of D inputs and M / groups outputs each

    @property
    def output_name(self) -> str:
        """The module whose output is this layer's result (after its BN, when it has one)."""
        return self.bn or self.name

    @property
    def macs_per_image(self) -> int:
        return self.rows_per_image * self.inner_dim * self.out_features


class ModelStructure:
    """Lowerable layers of a model at an input shape, in forward order, plus named groups."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        self.input_shape = tuple(input_shape)
        self.calls = trace_modules(model, example_input(model, self.input_shape))
        pairs = conv_bn_pairs(self.calls)
        by_name = {call.name: call for call in self.calls}
        self.layers = [_layer_info(by_name[name], pairs.get(name)) for name in lowerable_layers(self.calls)]
        self.exact_only = unlowerable_layers(self.calls)  # Conv2d/Linear layers kept exact: name -> why
        self._index = {layer.name: i for i, layer in enumerate(self.layers)}
        self.groups = _groups(model, self.names)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def layer(self, name: str) -> LayerInfo:
        return self.layers[self.index(name)]

    def index(self, name: str) -> int:
        if name not in self._index:
            raise UnknownLayerError(unknown_message("layer", name, self.names))
        return self._index[name]

    def targets(self) -> list[str]:
        """Every group and layer for a chooser, in forward order: 'all' first, then each layer right after the
        groups that start at it (largest first), so single layers sit among their groups instead of after them."""
        starting: dict[str, list[str]] = {}
        for group, members in self.groups.items():
            if group != "all" and members:
                starting.setdefault(members[0], []).append(group)
        order = ["all"] if "all" in self.groups else []
        for name in self.names:
            order += sorted(starting.get(name, []), key=lambda group: -len(self.groups[group]))
            order.append(name)
        return order

    def expand(self, group_or_layer: str) -> list[str]:
        """Layer names of a group (e.g. 'block:layer2.1', 'stage:layer3', 'all') or of one layer."""
        if group_or_layer in self.groups:
            return list(self.groups[group_or_layer])
        if group_or_layer in self._index:
            return [group_or_layer]
        raise UnknownLayerError(unknown_message("layer or group", group_or_layer, self.names + list(self.groups)))


def unknown_message(what: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known[:12])}" + (
        " ..." if len(known) > 12 else "")
    return f"unknown {what} {name!r}{hint}"


def _layer_info(call: ModuleCall, bn: str | None) -> LayerInfo:
    name, module, in_shape, out_shape = call.name, call.module, call.input_shape, call.output_shape
    if isinstance(module, nn.Conv2d):
        rows = out_shape[1] * out_shape[2]
        inner = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        return LayerInfo(name, "conv", in_shape, out_shape, bn, rows, inner, module.out_channels, module.groups)
    rows = 1
    for size in in_shape[:-1]:
        rows *= size
    return LayerInfo(name, "linear", in_shape, out_shape, None, rows, module.in_features, module.out_features)


def _groups(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """'all', 'stem' (first layer), 'classifier' (last layer), residual blocks and stages."""

    def members(prefix: str) -> list[str]:
        return [n for n in names if n.startswith(prefix + ".")]

    groups: dict[str, list[str]] = {"all": list(names)}
    if names:
        groups["stem"] = [names[0]]
        groups["classifier"] = [names[-1]]
    for name, module in model.named_modules():
        kind = type(module).__name__
        if name and (kind.endswith("Block") or kind == "Bottleneck") and members(name):
            groups[f"block:{name}"] = members(name)
    for name, _ in model.named_children():
        if len(members(name)) >= 2:
            groups[f"stage:{name}"] = members(name)
    return groups
