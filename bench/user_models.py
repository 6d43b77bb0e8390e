"""Your own model at full size: torchvision classifiers at 224x224 opened from an image folder.

python bench/user_models.py --arch resnet50 mobilenet_v2 efficientnet_b0 --json

Per architecture (random weights: the timing does not depend on them; each in its own process so that peak
memory is its own): trace time, image decoding, the exact baseline of the evaluation images, the table build of
every layer at C=8/K=64 from the calibration images, the all-table evaluation, a late layer's toggle (median of
repeats), peak memory, and FLOPs in the paper convention beside FlopCounterMode's MACs. The explorer opens on the
all-table configuration, so "first metrics" = open + build + all-table evaluation. Run it alone: two torch
processes on two cores slow each other 5-10x.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_folder(root: Path, per_split: int, classes: int = 10, size: int = 256) -> Path:
    """train/ and val/ class folders of smooth random JPEGs (decoding cost like real photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index in range(per_split):
            folder = root / split / f"class{index % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{index:05d}.jpg", quality=90)
    return root


def measure(arch: str, folder: str, images: int, toggles: int) -> dict:
    """One architecture, in this process."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tabconv.cache import TableCache
    from tabconv.config import Calibration
    from tabconv.session import Session
    from tabconv.settings import EXACT, LayerSetting
    from tabconv.structure import ModelStructure

    result: dict = {"arch": arch, "eval_images": images, "calibration_images": images}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache_dir:
        session = Session.from_user_model(arch, None, images=folder, calibration=Calibration(images=images),
                                          eval_images=images, cache=TableCache(cache_dir))
        result["open_s"] = time.perf_counter() - start  # decode + trace + exact baseline
        model = session.model
        trace_start = time.perf_counter()
        ModelStructure(model, session.input_shape)
        result["trace_s"] = time.perf_counter() - trace_start
        result["notes"] = session.notes
        result["batch_size"] = session.batch_size
        exact_start = time.perf_counter()
        with torch.no_grad():
            for batch in session.eval_batches():
                model(batch)
        result["exact_eval_s"] = time.perf_counter() - exact_start
        setting = LayerSetting("table", 8, 64)
        build_start = time.perf_counter()
        session.tables(session.uniform(setting))
        result["build_s"] = time.perf_counter() - build_start
        eval_start = time.perf_counter()
        tabled = session.apply(session.uniform(setting)).metrics
        result["all_table_eval_s"] = time.perf_counter() - eval_start
        # what the explorer waits for; the re-trace and exact-eval timings above are separate measurements
        result["first_metrics_s"] = result["open_s"] + result["build_s"] + result["all_table_eval_s"]
        durations, recomputed = [], []
        for i in range(toggles):  # a late layer made exact (each a new configuration: nothing memoised)
            late = session.structure.names[-2 - i]
            toggle_start = time.perf_counter()
            recomputed.append(session.apply({**tabled.settings, late: EXACT}, label=f"{late} exact").recomputed)
            durations.append(time.perf_counter() - toggle_start)
        result["toggle_layers"] = session.structure.names[-1 - toggles:-1]
        result["toggle_s"] = statistics.median(durations)
        result["toggle_recomputed_nodes"] = recomputed[-1] if session.runner else None
        result["all_table_accuracy"] = tabled.accuracy
        result["layers"] = len(session.structure.names)
        result["grouped_layers"] = sum(info.groups > 1 for info in session.structure.layers)
        result["paper_flops_exact"] = session.baseline.flops_paper
        result["paper_flops_all_table"] = tabled.flops_paper
        result["full_flops_all_table"] = tabled.flops_full
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, *session.input_shape))
        result["flop_counter_macs"] = counter.get_total_flops() // 2
        result["exact_macs"] = sum(layer.exact_macs for layer in session.baseline_cost.layers)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["resnet50", "mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--images", type=int, default=256, help="calibration and evaluation images each")
    parser.add_argument("--toggles", type=int, default=3)
    parser.add_argument("--folder", default=None, help="an image folder (default: generated, 10 classes)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process: one arch
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.arch[0], args.folder, args.images, args.toggles)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or str(make_folder(Path(tmp) / "images", args.images))
        rows = []
        for arch in args.arch:
            out = subprocess.run([sys.executable, __file__, "--one", "--arch", arch, "--folder", folder,
                                  "--images", str(args.images), "--toggles", str(args.toggles)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            if not args.json:
                r = rows[-1]
                print(f"{arch}: open {r['open_s']:.1f} s (trace {r['trace_s']:.2f} s), exact eval "
                      f"{r['exact_eval_s']:.1f} s, build C=8/K=64 {r['build_s']:.1f} s, all-table eval "
                      f"{r['all_table_eval_s']:.1f} s, "
                      f"first metrics {r['first_metrics_s']:.1f} s, toggle {r['toggle_s']:.2f} s, "
                      f"peak {r['peak_rss_gb']:.1f} GB; MACs {r['exact_macs']:,} (FlopCounterMode "
                      f"{r['flop_counter_macs']:,}), paper FLOPs {r['paper_flops_exact']:,}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
