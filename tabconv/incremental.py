"""Incremental re-evaluation: recompute only what a changed module can influence.

The exact model is traced once with torch.fx (its own modules stay the ones that run). Every node's
output on the evaluation images is kept; applying new module overrides recomputes just the nodes
that depend on an overridden-and-changed module, reusing every activation before them.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping

import torch
from torch import fx, nn
from torch.fx.node import map_arg


class IncrementalRunner:
    """Holds per-node activations for fixed input batches; `run(overrides)` returns logits per batch."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]) -> None:
        self.graph_module = fx.symbolic_trace(_out_of_place(model))
        self.modules = dict(self.graph_module.named_modules())
        self.nodes = list(self.graph_module.graph.nodes)
        self.batches = batches
        self.overrides: dict[str, nn.Module] = {}
        self.values: list[dict[str, torch.Tensor]] = [{} for _ in batches]
        self.exact_values: list[dict[str, torch.Tensor]] = []
        self.recomputed = 0  # nodes computed by the last run (for tests and progress)
        self._run_nodes(set(n.name for n in self.nodes))
        self.exact_values = [dict(v) for v in self.values]

    def node_for_module(self, name: str) -> str:
        """The graph node that calls the module with this qualified name."""
        for node in self.nodes:
            if node.op == "call_module" and node.target == name:
                return node.name
        raise KeyError(f"module {name!r} is not called in the traced graph")

    def dirty_nodes(self, overrides: Mapping[str, nn.Module]) -> set[str]:
        """Nodes whose value can differ from the cached one under the new overrides."""
        changed = {name for name in set(overrides) | set(self.overrides)
                   if overrides.get(name) is not self.overrides.get(name)}
        dirty: set[str] = set()
        for node in self.nodes:
            if (node.op == "call_module" and node.target in changed) or any(
                    arg.name in dirty for arg in node.all_input_nodes):
                dirty.add(node.name)
        return dirty

    @torch.no_grad()
    def run(self, overrides: Mapping[str, nn.Module]) -> set[str]:
        """Apply module overrides (qualified name -> module); returns the names of recomputed nodes."""
        dirty = self.dirty_nodes(overrides)
        self.overrides = dict(overrides)
        self._run_nodes(dirty)
        return dirty

    @torch.no_grad()
    def _run_nodes(self, dirty: set[str]) -> None:
        self.recomputed = len(dirty)
        for values, batch in zip(self.values, self.batches, strict=False):
            for node in self.nodes:
                if node.name in dirty:
                    values[node.name] = self._execute(node, values, batch)

    def _execute(self, node: fx.Node, values: dict[str, torch.Tensor], batch: torch.Tensor):
        args = map_arg(node.args, lambda n: values[n.name])
        kwargs = map_arg(node.kwargs, lambda n: values[n.name])
        if node.op == "placeholder":
            return batch
        if node.op == "get_attr":
            return self.graph_module.get_parameter(node.target) if "." in node.target else getattr(
                self.graph_module, node.target)
        if node.op == "call_module":
            module = self.overrides.get(node.target) or self.modules[node.target]
            return module(*args, **kwargs)
        if node.op == "call_function":
            return _OUT_OF_PLACE.get(node.target, node.target)(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        if node.op == "output":
            return args[0]
        raise RuntimeError(f"unsupported fx node op {node.op!r}")

    def output(self) -> list[torch.Tensor]:
        """Logits per batch under the current overrides."""
        out = next(n.name for n in self.nodes if n.op == "output")
        return [values[out] for values in self.values]

    def current(self, node: str) -> list[torch.Tensor]:
        return [values[node] for values in self.values]

    def exact(self, node: str) -> list[torch.Tensor]:
        return [values[node] for values in self.exact_values]


# Cached activations must never be modified: in-place operators run as their out-of-place twins.
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}


def _out_of_place(model: nn.Module) -> nn.Module:
    """A copy whose modules (e.g. ReLU(inplace=True)) no longer overwrite their inputs."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return model
