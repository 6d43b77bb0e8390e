"""Reproduce the paper's table on the data we have: docs/results.json, docs/configs/, plots.

python bench/reproduce.py --data-root DIR            (DIR from ../shared/datasets/prepare.sh DIR)

Per row (model, dataset): train or reuse checkpoints/<model>-<dataset>.pt, search on the first
--search-images test images (priority masking, greedy on paper FLOPs, greedy on full FLOPs), then confirm every
choice on the REST of the test split, which no search saw (the checkpoints trained on every training image, so only
test images are unseen): while the target fails there, the layer whose return to exact gains most on the search
images goes back to exact (tabconv.confirm, as `tabconv search` does), so every row meets its target on the images
it reports. Rows with `backoffs` absent were made before searches were confirmed; rows with `eval_first` absent
were measured on the full test split, searched images included. Checkpoints and tables are cached, so a rerun only
repeats the (cheap) evaluations. The documents show these rows through the results
registry: `python -m bench.claims` refreshes docs/claims.json, `python -m tabconv.registry render` the tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabconv import zoo
from tabconv.cache import TableCache
from tabconv.config import Calibration
from tabconv.confirm import Confirmation, confirm
from tabconv.metrics import Metrics
from tabconv.progress import ProgressEvent, Stage
from tabconv.search import SearchResult, greedy_search, pareto_front, priority_masking
from tabconv.session import Session
from tabconv.settings import LayerSetting

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    model: str
    dataset: str
    paper_reduction: float | None  # the paper's arithmetic-op reduction for this pair (None: not in the paper)
    epochs: int
    train_images: int | None = None  # first N training images (None: all); bounded by 2-core CPU training time
    lr: float = 0.05
    augment: bool = False  # random shifts and flips while training (train --augment)
    note: str = ""
    offline: bool = True  # data available on the project's offline machines
    more_centroids: tuple[int, ...] = ()  # start settings searched besides --centroids


ROWS = [
    Row("resnet18", "mnist", 0.994, 2, more_centroids=(256,)),
    Row("resnet34", "mnist", 0.993, 2, more_centroids=(256,)),
    Row("nin", "mnist", 0.989, 2, note="trained with batch norm after every conv, folded into the convs "
        "after training (tabconv.models.deployable): the evaluated network is the plain NIN"),
    Row("resnet18", "cifar10", 0.365, 24, None, lr=0.1, augment=True,
        note="CIFAR-10 from the JPEG export in ../shared/datasets (lossy re-encoding)"),
    Row("resnet18", "fashion-mnist", None, 1, 12000, note="extra row, not in the paper"),
    Row("resnet18", "cifar100", 0.258, 15, None, note="needs the CIFAR-100 download", offline=False),
]


FIT_SUFFIX = {"kmeans": "", "least-squares": "-ls"}  # method names of rows whose tables were refit


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def progress(event: ProgressEvent) -> None:
    """Log each table built and each tenth of training."""
    if event.stage == Stage.TABLES and event.detail or (
            event.stage == Stage.TRAIN and event.total and event.index % max(1, event.total // 10) == 0):
        log(f"  {event.describe()}")


def searches(session: Session, setting: LayerSetting, args: argparse.Namespace) -> dict[str, SearchResult]:
    """The methods of the table: the paper's masking, then greedy on each FLOP convention."""
    log("  priority masking")
    results = {"priority": priority_masking(session, setting, args.min_retention)}
    log("  greedy (paper FLOPs)")
    results["greedy"] = greedy_search(session, setting, args.min_retention, convention="paper",
                                      max_evaluations=args.max_evaluations)
    log("  greedy (full FLOPs)")
    results["greedy-full"] = greedy_search(session, setting, args.min_retention, convention="full",
                                           max_evaluations=args.max_evaluations)
    return results


def confirmed(method: str, chosen: Metrics, search: Session, full: Session,
              args: argparse.Namespace) -> Confirmation:
    """The search's choice on the images it was not chosen on, backed off until the target holds there (back-offs
    give back the least cost in the FLOP convention the method searched on)."""
    convention = "full" if method.startswith("greedy-full") else "paper"
    checked = confirm(search, full, chosen, args.min_retention, convention=convention)
    for step in checked.backoffs:
        log(f"    back-off: {step.layer} -> exact, retention {step.confirmed.retention:.3f} on the confirmation "
            "images")
    return checked


def final_row(row: Row, method: str, checked: Confirmation, full: Session, search: Session, setting: LayerSetting,
              args: argparse.Namespace) -> dict[str, Any]:
    """The confirmed configuration on the test images after the search's, and its configuration file."""
    final = checked.confirmed
    config_path = Path("docs/configs") / f"{row.model}-{row.dataset}-{method}.json"
    full.configuration(final).save(ROOT / config_path)
    table = [s for s in final.settings.values() if s.is_table]
    return {
        "model": row.model, "dataset": row.dataset, "method": method, "note": row.note,
        "eval_images": final.eval_images, "eval_first": full.eval_set.first,
        "search_images": search.baseline.eval_images,
        "calibration_images": args.calibration_images,
        "baseline_accuracy": final.baseline_accuracy, "accuracy": final.accuracy, "retention": final.retention,
        "search_retention": checked.searched.retention,
        "chosen_search_retention": checked.chosen.retention,
        "chosen_confirmed_retention": checked.chosen_confirmed.retention,
        "backoffs": [step.layer for step in checked.backoffs],
        "flops_reduction_paper": final.reduction_paper, "flops_reduction_full": final.reduction_full,
        "baseline_flops": final.baseline.flops, "flops_paper": final.flops_paper, "flops_full": final.flops_full,
        "storage_ratio": final.storage_ratio, "table_layers": len(table), "layers": len(final.settings),
        "codebooks": setting.codebooks, "centroids": setting.centroids, "encoder": setting.encoder,
        "lut_dtype": setting.lut_dtype, "per_layer_codebooks": sorted({s.codebooks for s in table}),
        "config": str(config_path), "checkpoint_sha256": full.info.sha256,
        "paper_reduction": row.paper_reduction,
        "paper_target_met": None if row.paper_reduction is None else (
            final.retention >= args.min_retention and final.reduction_paper >= row.paper_reduction),
    }


def verify(record: dict[str, Any], checkpoint: Path, args: argparse.Namespace) -> None:
    """Reload the row's configuration file in a fresh process, as a user would, and re-measure its accuracy."""
    skip = ["--eval-skip", str(record["eval_first"])] if record.get("eval_first") else []
    command = [sys.executable, "-m", "tabconv", "evaluate", "--checkpoint", str(checkpoint), "--config",
               str(ROOT / record["config"]), "--json", *skip]
    command += ["--data-root", args.data_root] if args.data_root else []
    command += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout)
    record["verified_accuracy"] = measured["accuracy"]
    record["verified"] = measured["accuracy"] == record["accuracy"] and measured["eval_images"] == record[
        "eval_images"]
    record["verify_command"] = " ".join(  # as a user runs it, without this machine's paths
        ["python", "-m", "tabconv", "evaluate", "--checkpoint", f"checkpoints/{checkpoint.name}", "--config",
         record["config"], "--json", *skip, "--data-root", "DIR"])


def plot(title: str, search: Session, results: dict[str, SearchResult], out: Path) -> None:
    """Accuracy vs paper-convention FLOPs: every configuration these searches evaluated, the front, the choices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = list({m.id: m for result in results.values() for m in result.points}.values())
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.scatter([m.flops_paper for m in points], [100 * m.accuracy for m in points], s=9, c="#9aa5b1",
               label=f"evaluated ({len(points)})")
    front = pareto_front(points, "flops_paper")
    ax.step([m.flops_paper for m in front], [100 * m.accuracy for m in front], where="post", c="#d62728",
            label="Pareto front")
    for (method, result), marker in zip(results.items(), "o^s", strict=False):
        if result.best:
            ax.scatter([result.best.flops_paper], [100 * result.best.accuracy], marker=marker, s=60,
                       facecolors="none", edgecolors="k", label=f"{method} choice")
    ax.axhline(100 * 0.93 * search.baseline.accuracy, ls=":", c="k", lw=0.8, label="93% of baseline")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per image, paper convention (encoding free)")
    ax.set_ylabel(f"accuracy (%) on the first {search.baseline.eval_images} test images")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def run_row(row: Row, args: argparse.Namespace) -> list[dict[str, Any]]:
    log(f"{row.model} / {row.dataset}: checkpoint")
    checkpoint = zoo.ensure_checkpoint(row.model, row.dataset, args.data_root, progress, epochs=row.epochs,
                                       train_images=row.train_images, lr=row.lr, augment=row.augment)
    calibration = Calibration(images=args.calibration_images, fit=args.fit)
    cache = TableCache(args.cache_dir)
    search = Session.from_checkpoint(str(checkpoint), calibration=calibration, eval_images=args.search_images,
                                     data_root=args.data_root, cache=cache, progress=progress)
    full = Session.from_checkpoint(str(checkpoint), calibration=calibration, data_root=args.data_root,
                                   cache=cache, progress=progress, eval_skip=args.search_images)
    rows = []
    for centroids in (args.centroids, *(() if args.start_only else row.more_centroids)):
        setting = LayerSetting("table", args.codebooks, centroids)
        suffix = ("" if centroids == args.centroids else f"-K{centroids}") + FIT_SUFFIX[args.fit]
        log(f"  start setting C={setting.codebooks}, K={setting.centroids}")
        results = searches(search, setting, args)
        plot_path = Path("docs/plots") / f"{row.model}-{row.dataset}{suffix}.png"
        (ROOT / plot_path).parent.mkdir(parents=True, exist_ok=True)
        plot(f"{row.model} on {row.dataset}, start C={setting.codebooks} K={centroids}", search, results,
             ROOT / plot_path)
        for method, result in results.items():
            if result.best is None:
                log(f"  {method}: nothing kept {args.min_retention:.0%} on the search images")
                continue
            checked = confirmed(method, result.best, search, full, args)
            record = final_row(row, method + suffix, checked, full, search, setting, args)
            trained = full.info.details
            record.update(plot=str(plot_path), evaluated=len(result.points), fit=args.fit,
                          train_epochs=trained.get("epochs"), train_images=trained.get("train_images"),
                          train_accuracy=trained.get("test_accuracy"), train_augment=trained.get("augment"),
                          train_seconds=trained.get("train_seconds"))
            verify(record, checkpoint, args)
            rows.append(record)
            log(f"  {method}{suffix}: acc {record['accuracy']:.4f} ({record['eval_images']} images, "
                f"{len(checked.backoffs)} back-off(s)), retention {record['retention']:.3f}, "
                f"FLOPs paper {-record['flops_reduction_paper']:+.2%}, "
                f"full {-record['flops_reduction_full']:+.2%}; reloaded config: {record['verified_accuracy']:.4f}"
                f" ({'matches' if record['verified'] else 'MISMATCH'})")
    return rows


def _row_order(record: dict[str, Any]) -> tuple[int, int]:
    """Rows in the order of ROWS, k-means before least squares, searches in the order they ran."""
    pairs = [(r.model, r.dataset) for r in ROWS]
    pair = (record["model"], record["dataset"])
    return (pairs.index(pair) if pair in pairs else len(pairs), list(FIT_SUFFIX).index(record.get("fit", "kmeans")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None, help="torchvision data root (else $TABCONV_DATA)")
    parser.add_argument("--rows", nargs="*", default=None, help="e.g. resnet18-mnist nin-mnist (default: all)")
    parser.add_argument("--search-images", type=int, default=1000)
    parser.add_argument("--calibration-images", type=int, default=1000)
    parser.add_argument("--codebooks", type=int, default=8)
    parser.add_argument("--centroids", type=int, default=64)
    parser.add_argument("--min-retention", type=float, default=0.93)
    parser.add_argument("--max-evaluations", type=int, default=150)
    parser.add_argument("--fit", choices=list(FIT_SUFFIX), default="kmeans",
                        help="how tables are fitted; least-squares rows are added beside the k-means ones")
    parser.add_argument("--start-only", action="store_true",
                        help="search only the start setting (skip the rows' extra K values and their -K<K> rows)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    out = ROOT / "docs/results.json"
    previous = json.loads(out.read_text())["rows"] if out.exists() else []
    selected = [r for r in ROWS if (args.rows is None and r.offline) or f"{r.model}-{r.dataset}" in (args.rows or [])]
    redone = {(r.model, r.dataset, args.fit) for r in selected}
    rows = [r for r in previous if (r["model"], r["dataset"], r.get("fit", "kmeans")) not in redone]
    for row in selected:
        try:
            rows.extend(run_row(row, args))
        except Exception as exc:  # a missing dataset must not lose the other rows
            log(f"{row.model} / {row.dataset} failed: {exc}")
        rows.sort(key=_row_order)
        offline_missing = [{"model": r.model, "dataset": r.dataset, "paper_reduction": r.paper_reduction,
                            "command": f"python bench/reproduce.py --rows {r.model}-{r.dataset}  # online"}
                           for r in ROWS if not r.offline and not any(x["dataset"] == r.dataset for x in rows)]
        out.write_text(json.dumps({"rows": rows, "not_reproducible_offline": offline_missing}, indent=2))
    log(f"wrote {out}; now python -m bench.claims && python -m tabconv.registry render")


if __name__ == "__main__":
    main()
