"""How fast the explorer answers: toggle, per-layer rebuild, cold build, warm start, vs the exact floor.

python bench/interactive.py --checkpoint checkpoints/resnet18-mnist.pt --eval-images 1000 --json

Medians over repeated runs; run it alone (two torch processes on two cores slow each other 5-10x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from tabconv.cache import TableCache
from tabconv.config import Calibration
from tabconv.session import Session
from tabconv.settings import EXACT, LayerSetting


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def floor_s(session: Session, repeats: int) -> float:
    """One exact forward of the evaluation images, in the session's batches and memory layout."""
    batches = session.eval_batches()

    @torch.no_grad()
    def forward() -> None:
        for x in batches:
            session.model(x)

    return statistics.median(timed(forward) for _ in range(repeats))


def toggles(session: Session, table: LayerSetting) -> dict[str, float]:
    """Each layer switched once each way with its tables built: from all-table to exact, from all-exact to table.

    Before each timed switch the session is put back (untimed) in the starting configuration, so every
    switch is exactly one layer's change from the state the runner holds.
    """
    start = {"to_exact": session.apply(session.uniform(table)).metrics, "to_table": session.baseline}
    times: dict[str, list[float]] = {"to_exact": [], "to_table": []}
    for direction, metrics in start.items():
        for name in session.structure.names:
            session.activate(metrics)
            changed = {**metrics.settings, name: EXACT if direction == "to_exact" else table}
            times[direction].append(timed(lambda c=changed: session.apply(c).metrics))
    both = times["to_exact"] + times["to_table"]
    return {"toggle_s": statistics.median(both), "toggle_to_exact_s": statistics.median(times["to_exact"]),
            "toggle_to_table_s": statistics.median(times["to_table"]), "toggle_max_s": max(both)}


def rebuilds(session: Session, table: LayerSetting, layers: int) -> float:
    """One layer's K changed (a new table to fit), to new metrics; layers spread over the depth."""
    names = session.structure.names
    picks = [names[round(i * (len(names) - 1) / (layers - 1))] for i in range(layers)]
    all_table = session.uniform(table)
    session.apply(all_table)
    changed = table.with_(centroids=max(2, table.centroids // 2))
    return statistics.median(timed(lambda n=n: session.apply({**all_table, n: changed}).metrics) for n in picks)


def warm_start(args: argparse.Namespace, cache_dir: str, table: LayerSetting) -> float:
    """A new process: import, load checkpoint and data, all tables from the disk cache, first metrics."""
    code = ("from tabconv.session import Session; from tabconv.cache import TableCache\n"
            "from tabconv.config import Calibration; from tabconv.settings import LayerSetting\n"
            f"s = Session.from_checkpoint({args.checkpoint!r},"
            f" calibration=Calibration(images={args.calibration_images}), eval_images={args.eval_images},"
            f" data_root={args.data_root!r}, cache=TableCache({cache_dir!r}))\n"
            f"m = s.apply(s.uniform(LayerSetting('table', {table.codebooks}, {table.centroids}))).metrics\n"
            "assert s.builder.fits == 0, 'tables were rebuilt'\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--calibration-images", type=int, default=Calibration.images)
    parser.add_argument("--codebooks", type=int, default=8)
    parser.add_argument("--centroids", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rebuild-layers", type=int, default=5)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table = LayerSetting("table", args.codebooks, args.centroids)
    calibration = Calibration(images=args.calibration_images)
    with tempfile.TemporaryDirectory() as tmp:
        cold = []
        for repeat in range(args.repeats if args.repeats < 2 else 2):
            session = Session.from_checkpoint(args.checkpoint, calibration=calibration, eval_images=args.eval_images,
                                              data_root=args.data_root, cache=TableCache(f"{tmp}/cold{repeat}"))
            cold.append(timed(lambda s=session: s.apply(s.uniform(table)).metrics))
        result = {"checkpoint": args.checkpoint, "model": session.info.model, "dataset": session.info.dataset,
                  "eval_images": args.eval_images, "calibration_images": args.calibration_images,
                  "codebooks": args.codebooks, "centroids": args.centroids, "threads": torch.get_num_threads(),
                  "floor_s": floor_s(session, args.repeats * 3), "cold_build_s": statistics.median(cold)}
        result.update(toggles(session, table))
        result["layer_rebuild_s"] = rebuilds(session, table, args.rebuild_layers)
        result["warm_start_s"] = statistics.median(warm_start(args, f"{tmp}/cold0", table)
                                                   for _ in range(args.repeats))
        result["toggle_over_floor"] = result["toggle_s"] / result["floor_s"]
    print(json.dumps(result, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
