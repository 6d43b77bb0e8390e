"""Incremental re-evaluation: recompute only what a changed module can influence.

The exact model is traced once with torch.fx (its own modules stay the ones that run). Every node's
output on the evaluation images is kept when they fit in the memory given (else the latest nodes'
that fit); applying new module overrides recomputes just the nodes that depend on an
overridden-and-changed module, reusing the kept activations before them.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_arg


class IncrementalRunner:
    """Holds node activations for fixed input batches; `run(overrides)` re-evaluates what a change influences.

    With `memory_bytes`, only the activations of the graph's last nodes that fit in it are kept (the exact
    and the current ones each get that much): a late change still starts from kept inputs, while an early
    one recomputes the nodes before it, freeing every temporary at its last use.
    """

    def __init__(self, model: nn.Module, batches: list[torch.Tensor], memory_bytes: int | None = None) -> None:
        self.graph_module = fx.symbolic_trace(_out_of_place(model))
        self.modules = dict(self.graph_module.named_modules())
        self.nodes = list(self.graph_module.graph.nodes)
        self.batches = batches
        self.overrides: dict[str, nn.Module] = {}
        images = sum(len(batch) for batch in batches)
        self.kept = self._choose_kept(self._bytes_per_image(batches[0][:1]) if batches else {}, images,
                                      memory_bytes)
        self.values: list[dict[str, Any]] = [{} for _ in batches]  # kept nodes' current values
        self.exact_values: list[dict[str, Any]] = [{} for _ in batches]
        self.recomputed = 0  # nodes computed by the last run (for tests and progress)
        self._run({node.name for node in self.nodes}, ())
        self.exact_values = [dict(values) for values in self.values]

    def forget(self) -> None:
        """Drop the current overrides' activations and keep the exact network's: frees up to `memory_bytes` before
        memory-hungry work (fine-tuning); the next run recomputes what its overrides change from the exact values."""
        self.values = [dict(values) for values in self.exact_values]
        self.overrides = {}

    @property
    def keeps_everything(self) -> bool:
        return len(self.kept) == len(self.nodes)

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
    def run(self, overrides: Mapping[str, nn.Module], observe: Collection[str] = (),
            on_pair: Callable[[str, Any, Any], None] | None = None) -> set[str]:
        """Apply module overrides (qualified name -> module); returns the names of recomputed nodes.

        For every observed node that changed, `on_pair(node, exact, current)` is called once per batch (the
        exact value recomputed alongside when it is not kept)."""
        dirty = self.dirty_nodes(overrides)
        self.overrides = dict(overrides)
        self._run(dirty, [name for name in observe if name in dirty], on_pair)
        return dirty

    @torch.no_grad()
    def _run(self, dirty: set[str], observe: Collection[str],
             on_pair: Callable[[str, Any, Any], None] | None = None) -> None:
        current_plan = self._plan(dirty)
        exact_plan = self._plan({name for name in observe if name not in self.kept})
        self.recomputed = len(current_plan)
        watched = set(observe)
        for index, batch in enumerate(self.batches):
            current = _Pass(self, current_plan, self.values[index], self.overrides, batch)
            exact = _Pass(self, exact_plan, self.exact_values[index] if self.exact_values[index] else
                          self.values[index], {}, batch)
            for node in self.nodes:
                exact.step(node)
                current.step(node)
                if node.name in watched and on_pair is not None:
                    on_pair(node.name, exact.value(node.name), current.value(node.name))
                exact.release(node)
                current.release(node)

    def _plan(self, targets: set[str]) -> set[str]:
        """The targets plus every input they need that is not kept (recomputed, recursively)."""
        needed = set(targets)
        for node in reversed(self.nodes):
            if node.name in needed:
                needed.update(arg.name for arg in node.all_input_nodes if arg.name not in self.kept)
        return needed

    @torch.no_grad()
    def _bytes_per_image(self, example: torch.Tensor) -> dict[str, int]:
        """Each node's activation size for one image (a one-image pass through the graph)."""
        values: dict[str, Any] = {}
        for node in self.nodes:
            values[node.name] = self._execute(node, values, example, {})
        return {name: value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
                for name, value in values.items()}

    def _choose_kept(self, sizes: Mapping[str, int], images: int, budget: int | None) -> set[str]:
        """Every node when they fit in the budget, else the inputs, the output and the latest nodes that fit."""
        names = [node.name for node in self.nodes]
        if budget is None or sum(sizes.values()) * images <= budget:
            return set(names)
        kept = {node.name for node in self.nodes if node.op in ("placeholder", "output", "get_attr")}
        used = 0
        for name in reversed(names):
            used += sizes.get(name, 0) * images
            if used > budget:
                break
            kept.add(name)
        return kept

    def _execute(self, node: fx.Node, values: Mapping[str, Any] | _Pass, batch: torch.Tensor,
                 overrides: Mapping[str, nn.Module]):
        args = map_arg(node.args, lambda n: values[n.name])
        kwargs = map_arg(node.kwargs, lambda n: values[n.name])
        if node.op == "placeholder":
            return batch
        if node.op == "get_attr":
            return self.graph_module.get_parameter(node.target) if "." in node.target else getattr(
                self.graph_module, node.target)
        if node.op == "call_module":
            module = overrides.get(node.target) or self.modules[node.target]
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


class _Pass:
    """One batch's walk through the planned nodes: kept values are written to `store`, the others live in a
    scratch dict until their last use."""

    def __init__(self, runner: IncrementalRunner, plan: set[str], store: dict[str, Any],
                 overrides: Mapping[str, nn.Module], batch: torch.Tensor) -> None:
        self.runner, self.plan, self.store, self.overrides, self.batch = runner, plan, store, overrides, batch
        self.scratch: dict[str, Any] = {}
        self.pending = {name: sum(user.name in plan for user in node.users)
                        for node in runner.nodes if (name := node.name) in plan and name not in runner.kept}

    def value(self, name: str) -> Any:
        return self.scratch[name] if name in self.scratch else self.store[name]

    __getitem__ = value  # what _execute reads a node's inputs through

    def step(self, node: fx.Node) -> None:
        if node.name not in self.plan:
            return
        value = self.runner._execute(node, self, self.batch, self.overrides)
        if node.name in self.runner.kept:
            self.store[node.name] = value
        else:
            self.scratch[node.name] = value
        for arg in node.all_input_nodes:
            if arg.name in self.pending:
                self.pending[arg.name] -= 1

    def release(self, node: fx.Node) -> None:
        """Drop the scratch values that no planned node will read any more (after the node was observed)."""
        for name in [node.name, *(arg.name for arg in node.all_input_nodes)]:
            if self.pending.get(name) == 0:
                self.scratch.pop(name, None)


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
