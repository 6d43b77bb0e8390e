"""Conversion: a trained model + built tables -> a new model with table layers swapped in.

Like torch.ao's convert step: the original model is never mutated, torchvision's own forward runs
unchanged, and only the approximated modules (and the batch norms folded into them) are replaced.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import nn

from tabconv.layers import TableConv2d, TableLinear
from tabconv.quantizer import ProductQuantizer
from tabconv.structure import LayerInfo, ModelStructure


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at a qualified name."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def table_module(model: nn.Module, info: LayerInfo, quantizer: ProductQuantizer) -> nn.Module:
    """The table layer that replaces `info.name` of `model` (geometry taken from the original layer)."""
    original = model.get_submodule(info.name)
    cls = TableConv2d if info.kind == "conv" else TableLinear
    return cls(original, quantizer, quantizer.setting)


def swaps(info: LayerInfo, table: nn.Module, identity: nn.Module | None = None) -> dict[str, nn.Module]:
    """The one swap rule, by qualified name: the layer becomes its table version, and its batch norm (folded
    into the tables) an Identity (`identity`, when the caller keeps stable modules, else a new one)."""
    if not info.bn:
        return {info.name: table}
    return {info.name: table, info.bn: identity if identity is not None else nn.Identity()}


def swap_in(model: nn.Module, info: LayerInfo, quantizer: ProductQuantizer) -> None:
    """In place: `swaps` applied to `model`."""
    for name, module in swaps(info, table_module(model, info, quantizer)).items():
        set_module(model, name, module)


def convert(model: nn.Module, structure: ModelStructure, quantizers: Mapping[str, ProductQuantizer]) -> nn.Module:
    """A copy of `model` where every layer named in `quantizers` computes by table lookups."""
    converted = copy.deepcopy(model).eval()
    for name, quantizer in quantizers.items():
        swap_in(converted, structure.layer(name), quantizer)
    return converted
