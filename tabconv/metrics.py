"""Metrics of one evaluated configuration: accuracy (with its image count, 95% interval and per-image
correctness for paired comparisons), cost in both conventions, storage, and per-layer errors — the
record every view (CLI, search, explorer) shows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

import numpy as np
import torch

from tabconv.cost import CostReport
from tabconv.evaluate import LayerError
from tabconv.latencytable import LatencyEstimate
from tabconv.settings import LayerSetting
from tabconv.stats import Paired, accuracy_text, paired, wilson
from tabconv.structure import ModelStructure


class Origin(StrEnum):
    """Which kind of request produced a configuration: set by whoever asks `Session.apply`, so that views group
    and colour configurations without reading their labels."""

    BASELINE = "baseline"
    EDIT = "edits"
    PRIORITY = "priority masking"
    GREEDY = "budgeted search"
    SWEEP = "sweeps"
    FINE_TUNED = "fine-tuned"
    IMPORTED = "imported"


@dataclass
class Metrics:
    settings: dict[str, LayerSetting]
    accuracy: float
    eval_images: int
    baseline_accuracy: float
    paper: CostReport
    full: CostReport
    baseline: CostReport
    errors: dict[str, LayerError]
    hits: bytes  # per-image correctness in evaluation order, packed 8 images a byte (see pack_hits)
    label: str = ""
    id: int = -1  # position in the session history
    origin: Origin = Origin.EDIT  # the kind of request that first evaluated it
    tables_sha256: str | None = None  # the given (fine-tuned or imported) tables it was evaluated with, if any
    latency: LatencyEstimate | None = None  # measured per-layer latencies (when the session keeps a latency table)

    @property
    def latency_ms(self) -> float | None:
        """Milliseconds per batch of `latency.batch` images on this machine, or None when not measured."""
        return None if self.latency is None else self.latency.total_ms

    @property
    def correct_images(self) -> np.ndarray:
        """Per evaluated image (in order): whether this configuration classified it correctly."""
        return np.unpackbits(np.frombuffer(self.hits, np.uint8), count=self.eval_images).astype(bool)

    @property
    def correct(self) -> int:
        return int(np.count_nonzero(self.correct_images))

    @property
    def accuracy_ci95(self) -> tuple[float, float]:
        """Wilson 95% interval of the accuracy on these images."""
        return wilson(self.correct, self.eval_images)

    def against(self, reference: Metrics) -> Paired:
        """McNemar's exact test of this configuration against `reference` (evaluated on the same images)."""
        return paired(reference.correct_images, self.correct_images)

    def on_images(self, images: slice, baseline: Metrics) -> Metrics:
        """This configuration judged on a slice of its evaluation images (from the per-image record, nothing is
        evaluated again): accuracy, retention against `baseline` on the same images, and the image count."""
        mine, theirs = self.correct_images[images], baseline.correct_images[images]
        if not len(mine):
            raise ValueError(f"no evaluation images in {images} of {self.eval_images}")
        return replace(self, accuracy=float(mine.mean()), eval_images=len(mine), baseline_accuracy=float(theirs.mean()),
                       hits=np.packbits(mine).tobytes())

    @property
    def retention(self) -> float:
        return self.accuracy / self.baseline_accuracy if self.baseline_accuracy else 0.0

    @property
    def flops_paper(self) -> int:
        return self.paper.flops

    @property
    def flops_full(self) -> int:
        return self.full.flops

    @property
    def reduction_paper(self) -> float:
        return 1 - self.paper.flops / self.baseline.flops

    @property
    def reduction_full(self) -> float:
        return 1 - self.full.flops / self.baseline.flops

    @property
    def storage_ratio(self) -> float:
        return self.paper.storage_bytes / self.baseline.storage_bytes

    @property
    def table_layers(self) -> list[str]:
        return [name for name, s in self.settings.items() if s.is_table]

    def summary(self) -> str:
        """One line for hovers and logs."""
        return (f"{len(self.table_layers)}/{len(self.settings)} layers tabled, "
                f"acc {accuracy_text(self.correct, self.eval_images, 2)}, FLOPs paper {-self.reduction_paper:+.1%}, "
                f"full {-self.reduction_full:+.1%}, "
                f"storage x{self.storage_ratio:.2f}")

    def layer_rows(self, structure: ModelStructure, calibration_images: int) -> list[dict[str, Any]]:
        """Per-layer table in forward order: shapes, D, rows, MACs and share, storage, error, K warning."""
        total_macs = sum(info.macs_per_image for info in structure.layers) or 1
        rows = []
        for info in structure.layers:
            setting = self.settings.get(info.name, LayerSetting())
            cost = self.paper.layer(info.name)
            error = self.errors.get(info.name)
            calib_rows = info.rows_per_image * calibration_images
            rows.append({
                "name": info.name, "kind": info.kind, "mode": setting.mode,
                "codebooks": setting.codebooks, "centroids": setting.centroids,
                "encoder": setting.encoder, "lut_dtype": setting.lut_dtype,
                "input_shape": list(info.input_shape), "output_shape": list(info.output_shape),
                "inner_dim": info.inner_dim, "out_features": info.out_features,
                "rows_per_image": info.rows_per_image, "calibration_rows": calib_rows,
                "macs": info.macs_per_image, "mac_share": info.macs_per_image / total_macs,
                "flops_paper": cost.flops("paper"), "flops_full": self.full.layer(info.name).flops("full"),
                "exact_flops": self.baseline.layer(info.name).flops("paper"),
                "weight_bytes": self.baseline.layer(info.name).weight_bytes
                + (self.baseline.layer(info.bn).weight_bytes if info.bn else 0),
                "table_bytes": cost.table_bytes, "prototype_bytes": cost.prototype_bytes,
                "cosine": error.cosine if error else None,
                "relative_error": error.relative_error if error else None,
                "k_exceeds_rows": setting.is_table and setting.centroids >= calib_rows,
                **self._layer_latency(info.name),
            })
        return rows

    def _layer_latency(self, name: str) -> dict[str, Any]:
        """Measured ms of the layer as configured and exact (None when not measured), and whether the table is the
        slower of the two."""
        if self.latency is None:
            return {"latency_ms": None, "exact_latency_ms": None, "slower_than_exact": False}
        now, exact = self.latency.layer_ms[name], self.latency.exact_ms[name]
        return {"latency_ms": now, "exact_latency_ms": exact,
                "slower_than_exact": self.settings[name].is_table and now > exact}

    def to_dict(self, structure: ModelStructure | None = None, calibration_images: int = 0) -> dict[str, Any]:
        """The JSON record of `evaluate` (and of every point of a search)."""
        data = {
            "id": self.id, "label": self.label, "origin": self.origin.value,
            "accuracy": self.accuracy, "accuracy_ci95": list(self.accuracy_ci95), "correct": self.correct,
            "eval_images": self.eval_images,
            "baseline_accuracy": self.baseline_accuracy, "retention": self.retention,
            "flops_paper": self.flops_paper, "flops_full": self.flops_full, "baseline_flops": self.baseline.flops,
            "flops_reduction_paper": self.reduction_paper, "flops_reduction_full": self.reduction_full,
            "flops_breakdown": {conv: {"exact": r.exact_ops, "encoding": r.encoding_ops, "lookup_adds": r.lookup_ops}
                                for conv, r in (("paper", self.paper), ("full", self.full))},
            "flops_convention_note": "paper: encoding free (the paper's count); full: encoding counted",
            "storage_bytes": self.paper.storage_bytes, "table_bytes": self.paper.table_bytes,
            "prototype_bytes": self.paper.prototype_bytes, "weight_bytes": self.paper.weight_bytes,
            "baseline_storage_bytes": self.baseline.storage_bytes, "storage_ratio": self.storage_ratio,
            **(self.latency.to_dict() if self.latency else {}),
            **({"tables_sha256": self.tables_sha256} if self.tables_sha256 else {}),
        }
        if structure is not None:
            data["layers"] = self.layer_rows(structure, calibration_images)
        else:
            data["layers"] = [{"name": n, **s.to_dict(), **({k: v for k, v in asdict(self.errors[n]).items()
                                                              if k != "name"} if n in self.errors else {})}
                              for n, s in self.settings.items()]
        return data


def pack_hits(hits: torch.Tensor) -> bytes:
    """Per-image correctness (a bool tensor) as the compact bytes a Metrics keeps (1 bit an image)."""
    return np.packbits(hits.cpu().numpy().astype(bool)).tobytes()
