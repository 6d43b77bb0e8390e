"""Seconds per fine-tuning step, every layer tabled: what bounds how far a time budget gets.

python bench/finetune_step.py --checkpoint checkpoints/resnet18-cifar10.pt --data-root DIR [-S 9 -K 16]
    [--encoder tree] [--lut-dtype int8] [--steps 40] [--batch 64] [--repeats 3]

Builds the all-table configuration on 200 calibration images (the weights do not change a step's work), then runs
`finetune` for --steps steps, --repeats times. A step's time is the gap between consecutive progress events; the
median over all steps of a run (held-out checks land on a few of them) is the run's figure, and the median run is
the result. Run it alone: other work on the cores changes every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tabconv import finetune as finetuning
from tabconv.config import Calibration
from tabconv.session import Session
from tabconv.settings import LayerSetting


def step_seconds(session: Session, settings: dict, steps: int, batch: int) -> float:
    """Median seconds between consecutive fine-tuning steps of one run."""
    metrics = session.apply(settings).metrics
    images = session.calibration_set.normalize(session.calibration_set.images)
    stamps: list[float] = []
    finetuning.finetune(session.model, session.structure, session.quantizers(metrics), images, steps=steps,
                        batch_size=batch, held_out=images[:batch],
                        progress=lambda _: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("-S", "--subvector", type=int, default=9)
    p.add_argument("-K", "--centroids", type=int, default=16)
    p.add_argument("--encoder", default="tree")
    p.add_argument("--lut-dtype", default="int8")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    session = Session.from_checkpoint(args.checkpoint, calibration=Calibration(images=200), eval_images=200,
                                      data_root=args.data_root)
    setting = LayerSetting("table", 8, args.centroids, args.encoder, args.lut_dtype, args.subvector)
    settings = session.uniform(setting)
    runs = [step_seconds(session, settings, args.steps, args.batch) for _ in range(args.repeats)]
    print(json.dumps({"setting": vars(args), "threads": torch.get_num_threads(),
                      "seconds_per_step": statistics.median(runs), "runs": runs}))
    print(f"{statistics.median(runs):.3f} s a step (runs: {', '.join(f'{v:.3f}' for v in runs)})")


if __name__ == "__main__":
    main()
