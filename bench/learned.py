"""Learned tables against k-means tables, every layer tabled: docs/results-learned.json.

python bench/learned.py --checkpoint checkpoints/resnet18-mnist.pt --data-root DIR [--eval-skip 1000] [--steps N]

Per row: build the all-table configuration with its fitting method (timed, tables cache bypassed so the
build is really measured), optionally fine-tune it (timed, peak memory), and evaluate on the test images after
the first --eval-skip (default: the whole test split). With --eval-skip, fine-tuning checks itself on the skipped
test images, which the network never trained on, and keeps the tables that did best there; without it, on the last
fine-tuning images. Prints one JSON line per row as it goes.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabconv.atomic import atomic_write_text
from tabconv.config import Calibration
from tabconv.finetune import DEFAULT_LAYER_LOSS, DEFAULT_LR, finetune_session
from tabconv.session import Session
from tabconv.settings import LayerSetting

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    name: str
    setting: LayerSetting
    fit: str = "kmeans"
    mode: str = "independent"
    steps: int = 0  # fine-tuning steps (0: none)
    images: int = Calibration.images  # calibration images (the library's default unless a row says otherwise)
    max_rows: int = Calibration.max_rows  # calibration rows per layer


RIDGE = 0.01
ROWS = [
    Row("k-means, C=8 K=64", LayerSetting("table", 8, 64)),
    Row("least squares (independent), C=8 K=64", LayerSetting("table", 8, 64), "least-squares"),
    Row("least squares (sequential), C=8 K=64", LayerSetting("table", 8, 64), "least-squares", "sequential"),
    Row("least squares + fine-tuned, C=8 K=64", LayerSetting("table", 8, 64), "least-squares", steps=300),
    Row("least squares + fine-tuned, S=9 K=16", LayerSetting("table", 8, 16, subvector=9), "least-squares",
        steps=300),
    Row("least squares, tree, S=9 K=16", LayerSetting("table", 8, 16, "tree", subvector=9), "least-squares"),
    Row("least squares + fine-tuned, tree, S=9 K=16", LayerSetting("table", 8, 16, "tree", subvector=9),
        "least-squares", steps=300),
    Row("least squares + fine-tuned, tree, C=8 K=64", LayerSetting("table", 8, 64, "tree"), "least-squares",
        steps=300),
    # the paper convention leaves encoding free: K=1024 costs the same lookups as K=64, 16x the prototypes and
    # tables, and needs more calibration rows (8,192 least-squares unknowns per output channel)
    Row("least squares, C=8 K=1024, 4,000 calibration images", LayerSetting("table", 8, 1024), "least-squares",
        images=4000, max_rows=49152),
]


def measure(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    calibration = Calibration(images=row.images, fit=row.fit, mode=row.mode, ridge=RIDGE, max_rows=row.max_rows)
    session = Session.from_checkpoint(args.checkpoint, calibration=calibration, eval_images=args.eval_images,
                                      eval_skip=args.eval_skip, data_root=args.data_root, cache=None)
    start = time.perf_counter()
    quantizers = session.tables(session.uniform(row.setting))
    build_s = time.perf_counter() - start
    metrics = session.apply(session.uniform(row.setting), label=row.name).metrics
    info = session.info
    result = {"row": row.name, "model": info.model, "dataset": info.dataset, "checkpoint_sha256": info.sha256,
              "eval_first": session.eval_set.first, "fit": row.fit, "calibration": row.mode,
              "calibration_images": row.images, "max_rows": row.max_rows, "setting": row.setting.to_dict(),
              "layers_tabled": len(quantizers), "build_s": round(build_s, 1), **_numbers(metrics)}
    if row.steps:
        tuned = finetune_session(session, metrics, steps=args.steps or row.steps, images=args.finetune_images,
                                 lr=args.lr, layer_loss=args.layer_loss,
                                 held_out=session.left_out if args.eval_skip else None)
        report = tuned.report
        result["untuned"] = _numbers(metrics)
        result.update(_numbers(tuned.metrics))
        result["finetune"] = {"steps": report.steps, "images": report.images, "lr": report.lr,
                              "layer_loss": report.layer_loss, "seconds": round(report.seconds, 1),
                              "loss_before": report.loss_before, "loss_after": report.loss_after,
                              "held_out": report.held_out_from, "stopped": report.stopped,
                              "best_step": report.best_step}
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    return result


def _numbers(metrics) -> dict[str, Any]:
    return {"accuracy": metrics.accuracy, "baseline_accuracy": metrics.baseline_accuracy,
            "eval_images": metrics.eval_images, "retention": metrics.retention,
            "reduction_paper": metrics.reduction_paper, "reduction_full": metrics.reduction_full,
            "storage_bytes": metrics.paper.storage_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--eval-images", type=int, default=None)
    parser.add_argument("--eval-skip", type=int, default=0,
                        help="report on the test images after the first N; fine-tuning checks itself on those N")
    parser.add_argument("--finetune-images", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: each row's, 300)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="fine-tuning learning rate")
    parser.add_argument("--layer-loss", type=float, default=DEFAULT_LAYER_LOSS,
                        help="fine-tuning per-layer loss weight")
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (default: all)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results-learned"))
    args = parser.parse_args()
    rows = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    results = []
    for row in rows:
        results.append(measure(row, args))
        print(json.dumps(results[-1]), flush=True)
    atomic_write_text(Path(args.out + ".json"), json.dumps(results, indent=2))
    print(f"wrote {args.out}.json; now python -m bench.claims && python -m tabconv.registry render")


if __name__ == "__main__":
    main()
