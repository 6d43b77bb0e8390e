"""Evaluation: accuracy on a stated number of images, and per-layer error against the exact network.

A layer's error is measured at its output (after its batch norm, which table layers fold in), as
the paper does: one cosine similarity over the whole flattened activation tensor of the evaluated
images, plus the relative error ||approx - exact|| / ||exact||.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tabconv.structure import ModelStructure


@dataclass(frozen=True)
class LayerError:
    name: str
    cosine: float
    relative_error: float


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    correct: int
    images: int
    layers: dict[str, LayerError]
    hits: torch.Tensor  # per-image correctness (bool, CPU), in evaluation order: for paired comparisons

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "eval_images": self.images,
                "layers": [asdict(e) for e in self.layers.values()]}


class ErrorAccumulator:
    """Running sums that give cosine and relative error over all images, batch by batch."""

    def __init__(self) -> None:
        self.dot = self.exact_sq = self.approx_sq = self.diff_sq = 0.0

    def add(self, exact: torch.Tensor, approx: torch.Tensor) -> None:
        flat_exact, flat_approx = _flat_pair(exact, approx)
        exact_sq = _dot(flat_exact, flat_exact)
        self.exact_sq += exact_sq
        if approx is exact:  # an unchanged activation: nothing else to compute
            self.dot += exact_sq
            self.approx_sq += exact_sq
            return
        diff = flat_approx - flat_exact
        cross, diff_sq = _dot(flat_exact, diff), _dot(diff, diff)
        # <e, a> and |a|^2 from <e, e>, <e, d> and |d|^2 (a = e + d): three reductions instead of four
        self.dot += exact_sq + cross
        self.approx_sq += exact_sq + 2 * cross + diff_sq
        self.diff_sq += diff_sq

    def result(self, name: str) -> LayerError:
        norm = (self.exact_sq * self.approx_sq) ** 0.5
        cosine = self.dot / norm if norm > 0 else float(self.exact_sq == self.approx_sq)
        relative = (self.diff_sq / self.exact_sq) ** 0.5 if self.exact_sq > 0 else float(self.diff_sq > 0)
        return LayerError(name, cosine, relative)


def _flat_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as float32 vectors in one element order: no copy when they share the channels-last layout."""
    if x.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in (x, y)):
        x, y = x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1)
    return x.float().reshape(-1), y.float().reshape(-1)


_PIECE = 4096  # elements per float32 partial dot product


def _dot(x: torch.Tensor, y: torch.Tensor) -> float:
    """Sum of x * y over vectors: float32 dot products of 4,096-element pieces (one batched matmul), summed in
    float64. One float32 accumulation over a layer's millions of values drifts by ~1e-4; pieces keep ~1e-9."""
    whole = x.numel() - x.numel() % _PIECE
    rows = x[:whole].view(-1, 1, _PIECE)
    columns = y[:whole].view(-1, 1, _PIECE).transpose(1, 2)  # (m, L, 1) this way: BLAS's faster path, 2x
    pieces = torch.bmm(rows, columns).double().sum()
    return float(pieces + torch.dot(x[whole:], y[whole:]).double())


def _capture_outputs(model: nn.Module, names: dict[str, str], store: dict[str, torch.Tensor]) -> list:
    """Hooks that put the output of module `names[layer]` into store[layer]."""
    handles = []
    for layer, module_name in names.items():

        def hook(mod, inputs, output, layer=layer):
            store[layer] = output.clone()  # a later in-place op (ReLU, +=) must not alter it

        handles.append(model.get_submodule(module_name).register_forward_hook(hook))
    return handles


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             reference: nn.Module | None = None, structure: ModelStructure | None = None) -> Evaluation:
    """Accuracy of `model`; with an exact `reference` and its structure, per-layer errors too."""
    outputs = {layer.name: layer.output_name for layer in structure.layers} if structure and reference else {}
    got: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    handles = _capture_outputs(model, outputs, got) + (_capture_outputs(reference, outputs, want) if outputs else [])
    sums = {name: ErrorAccumulator() for name in outputs}
    hits: list[torch.Tensor] = []
    try:
        for x, y in batches:
            logits = model(x)
            if outputs:
                reference(x)
                for name, acc in sums.items():
                    acc.add(want[name], got[name])
            hits.append((logits.argmax(1) == y.to(logits.device)).cpu())
    finally:
        for handle in handles:
            handle.remove()
    hit = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
    correct, total = int(hit.sum()), len(hit)
    if total == 0:
        raise ValueError("no evaluation images")
    return Evaluation(correct / total, correct, total, {name: acc.result(name) for name, acc in sums.items()}, hit)
