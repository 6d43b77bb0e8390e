"""Command line: python -m tabconv train | cost | evaluate | finetune | export | search | sensitivity | cache |
reproduce.

Every command prints JSON with --json; a bad argument or file exits with status 2 and one line
saying what is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tabconv import config as config_file
from tabconv import finetune as finetuning
from tabconv import native, registry
from tabconv.architectures import ArchitectureError, build_architecture
from tabconv.cache import TableCache
from tabconv.config import FIT_METHODS, Calibration, ConfigError, Configuration
from tabconv.cost import CONVENTIONS, model_cost
from tabconv.data import DATASETS, DatasetUnavailable
from tabconv.export import FORMATS
from tabconv.imagefolder import ImageFolderError
from tabconv.latencytable import DEFAULT_BATCH, LatencyTable
from tabconv.lowering import LoweringError
from tabconv.metrics import Origin
from tabconv.models import model_names
from tabconv.progress import Progress, ProgressEvent, Stage
from tabconv.search import CONVENTIONS as SEARCH_CONVENTIONS
from tabconv.settings import ENCODERS, EXACT, LUT_DTYPES, LayerSetting, SettingError
from tabconv.stats import accuracy_text, p_text, wilson
from tabconv.structure import ModelStructure, UnknownLayerError
from tabconv.tablesfile import TablesFileError
from tabconv.train import CheckpointError
from tabconv.userload import UserModelError, channel_values
from tabconv.weights import WeightsError

USER_ERRORS = (ConfigError, TablesFileError, CheckpointError, DatasetUnavailable, SettingError, UnknownLayerError,
               LoweringError, ArchitectureError, WeightsError, ImageFolderError, UserModelError, FileNotFoundError,
               ValueError, FloatingPointError)


KERNEL_CHECK_IMAGES = 64  # export: test images the written model.pt is run on, on --kernel and on torch


class CliError(Exception):
    """An error whose message is the whole story."""


def _progress_bar(desc: str) -> Progress:
    """A tqdm bar on stderr per stage, driven by the library's progress events."""
    from tqdm import tqdm

    bars: dict[Stage, tqdm] = {}

    def update(event: ProgressEvent) -> None:
        if event.total is None:
            return
        bar = bars.get(event.stage)
        if bar is None or bar.total != event.total:
            bar = bars[event.stage] = tqdm(total=event.total, desc=f"{desc}: {event.stage}", file=sys.stderr,
                                           leave=False)
        bar.update(max(0, event.index - bar.n))
        postfix = ", ".join(p for p in (event.detail, "" if event.loss is None else f"loss {event.loss:.3f}") if p)
        if postfix:
            bar.set_postfix_str(postfix)

    return update


def _shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must look like 3,32,32, got {text!r}") from None
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"input shape must be three positive integers C,H,W, got {text!r}")
    return parts


def _integer(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def _count(text: str) -> int:
    return _integer(text, 0, "a count (0, 1, 2, ...)")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _floats(text: str) -> tuple[float, ...]:
    """'0.485,0.456,0.406' (or one number for every channel), read by the library's rule."""
    try:
        values = channel_values(text, "value")
    except UserModelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if values is None:
        raise argparse.ArgumentTypeError("expected 3 numbers (R,G,B) or one, got nothing")
    return values


def _emit(data: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    print(json.dumps(data, indent=2) if as_json else "\n".join(lines))


# -- train -------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> None:
    from tabconv.train import train_and_save

    meta = train_and_save(args.model, args.dataset, args.out, epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, seed=args.seed, device=args.device, data_root=args.data_root,
                          progress=_progress_bar("train"), train_images=args.train_images, augment=args.augment)
    correct, images = round(meta["test_accuracy"] * meta["test_images"]), meta["test_images"]
    _emit({**meta, "test_accuracy_ci95": list(wilson(correct, images))}, args.json,
          [f"saved {args.out}: {meta['model']} on {meta['dataset']}, test accuracy "
           f"{accuracy_text(correct, images, 2)}"])


# -- cost --------------------------------------------------------------------------------------------
def cmd_cost(args: argparse.Namespace) -> None:
    model = build_architecture(args.model, args.num_classes, args.input_shape[0], image_size=args.input_shape[1])
    settings: dict[str, LayerSetting] = {}
    if args.config:
        structure = ModelStructure(model, args.input_shape)
        settings = config_file.load_for(args.config, structure, model=args.model).layers
    report = model_cost(model, args.input_shape, settings, args.convention)
    data = {"model": args.model, "num_classes": args.num_classes, "input_shape": list(args.input_shape),
            **report.to_dict()}
    _emit(data, args.json, [f"{args.model} at {','.join(map(str, args.input_shape))}: {report.flops:,} FLOPs "
                            f"({args.convention} convention), {report.storage_bytes:,} bytes"])


# -- evaluate / search / sensitivity -------------------------------------------------------------------
def _session(args: argparse.Namespace, calibration: Calibration | None = None):
    """The session of a command (a checkpoint, or --arch with --images); a configuration file's own calibration
    wins over the calibration flags."""
    from tabconv.session import Session

    if args.kernel is not None:
        _use_kernel(args.kernel)
    calibration = calibration or Calibration(images=args.calibration_images, mode=args.calibration,
                                             seed=args.seed, max_rows=args.max_rows, fit=args.fit,
                                             ridge=args.ridge, refit_classifier=args.refit_classifier)
    cache = None if args.no_cache else TableCache(args.cache_dir)
    if args.arch is None:
        given = [flag for flag, value in _user_model_flags(args).items() if value is not None]
        if given:
            raise CliError(f"{', '.join(given)} go with --arch (a checkpoint brings its own model and dataset)")
        return Session.from_checkpoint(args.checkpoint, calibration=calibration, eval_images=args.eval_images,
                                       data_root=args.data_root, cache=cache, device=args.device,
                                       progress=_progress_bar("session"), eval_skip=args.eval_skip)
    if args.eval_skip:
        raise CliError("--eval-skip goes with --checkpoint; with --arch, the image folder's evaluation part is the one "
                       "evaluated on")
    if args.image_folder is None:
        raise CliError(f"--arch {args.arch} needs {args.image_folder_flag} DIR (DIR/<class>/*.jpg|png, or DIR/train "
                       "and DIR/val)")
    return Session.from_user_model(args.arch, args.weights, images=args.image_folder, num_classes=args.num_classes,
                                   image_size=args.image_size, mean=args.mean, std=args.std,
                                   calibration=calibration, eval_images=args.eval_images, cache=cache,
                                   device=args.device, progress=_progress_bar("session"))


def _use_kernel(kernel: str) -> str:
    try:
        return native.use_kernel(kernel)
    except native.NativeUnavailable as exc:
        raise CliError(str(exc)) from None


def _user_model_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that only --arch uses, by their names on this command."""
    return {"--weights": args.weights, args.image_folder_flag: args.image_folder, "--num-classes": args.num_classes,
            "--image-size": args.image_size, "--mean": args.mean, "--std": args.std}


def _table_setting(args: argparse.Namespace) -> LayerSetting:
    return LayerSetting("table", args.codebooks, args.centroids, args.encoder, args.lut_dtype, args.subvector)


def _apply_config(session, loaded: Configuration, tables, label: str = ""):
    origin = Origin.EDIT if tables is None else Origin.IMPORTED
    return session.apply(loaded, progress=_progress_bar("evaluate"), label=label, origin=origin,
                         tables=tables).metrics


def _metrics_json(session, metrics) -> dict[str, Any]:
    return {"checkpoint": str(session.info.sha256), "model": session.info.model,
            "dataset": session.info.dataset, "calibration": vars(session.calibration),
            "eval_first": session.eval_set.first,
            **metrics.to_dict(session.structure, session.calibration.images), **_versus(metrics, session.baseline,
                                                                                         "exact")}


def _versus(metrics, reference, name: str) -> dict[str, Any]:
    """`p_value_vs_<name>` and the paired test's record (its discordant counts) against a reference."""
    test = metrics.against(reference)
    return {f"p_value_vs_{name}": test.p_value, f"vs_{name}": test.to_dict(name, "this")}


def _versus_line(metrics, reference, name: str) -> str:
    """'vs the exact network: 71.78% -> 68.00%, within noise (p=0.41, McNemar on 450 images): 21 images ...'."""
    test = metrics.against(reference)
    return (f"vs {name}: {reference.accuracy:.2%} -> {metrics.accuracy:.2%}, {test.verdict()}: "
            f"{test.counts_text(name, 'this one')}")


def _metrics_lines(session, metrics) -> list[str]:
    baseline, first = session.baseline, session.eval_set.first
    which = f" (test images {first}-{first + metrics.eval_images - 1})" if first else ""
    return [f"test accuracy {accuracy_text(metrics.correct, metrics.eval_images, 2)}{which}; "
            f"baseline {metrics.baseline_accuracy:.2%}, retention {metrics.retention:.1%}",
            _versus_line(metrics, baseline, "the exact network"),
            f"FLOPs paper convention (encoding free): {metrics.flops_paper:,} ({-metrics.reduction_paper:+.1%}); "
            f"full convention (encoding counted): {metrics.flops_full:,} ({-metrics.reduction_full:+.1%}); "
            f"baseline {metrics.baseline.flops:,}",
            f"storage {metrics.paper.storage_bytes:,} bytes (x{metrics.storage_ratio:.2f} of "
            f"{metrics.baseline.storage_bytes:,})", *_latency_lines(metrics)]


def _latency_lines(metrics) -> list[str]:
    """Measured time beside the counted work: end to end, and the table layers slower than their exact layer."""
    latency = metrics.latency
    if latency is None:
        return []
    slower = latency.slower_layers(metrics.table_layers)
    return [f"latency measured on this machine (batch {latency.batch}, {latency.threads} threads, table layers on "
            f"{latency.kernel}; per-layer medians summed): {latency.total_ms:.2f} ms against exact "
            f"{latency.baseline_ms:.2f} ms, {latency.versus_exact()}",
            *([f"slower tabled than exact: {', '.join(slower)}"] if slower else [])]


def _enable_latency(session, args: argparse.Namespace) -> None:
    """Measured latency beside the counted FLOPs (per-layer latency table kept beside the table cache)."""
    if not args.no_latency:
        root = None if args.no_cache else TableCache(args.cache_dir).root
        session.enable_latency(LatencyTable(root, batch=args.latency_batch))


def cmd_evaluate(args: argparse.Namespace) -> None:
    session = _session(args, config_file.load(args.config).calibration if args.config else None)
    _enable_latency(session, args)
    if args.retarget and not args.config:
        raise CliError("--retarget goes with --config (it rebuilds a configuration file's tables for this checkpoint)")
    loaded = None
    if args.config:
        loaded, tables = _load_config(session, args)
        metrics = _apply_config(session, loaded, tables)
    else:
        setting = _table_setting(args) if args.all_table else EXACT
        metrics = session.apply(session.uniform(setting), progress=_progress_bar("evaluate")).metrics
    if args.save_config:
        if metrics.tables_sha256:
            raise CliError("--save-config cannot copy a fine-tuned configuration (its tables file belongs to it); "
                           "copy the configuration and its .tables.pt file together instead")
        session.configuration(metrics, loaded and loaded.retargeted_from).save(args.save_config)
    _emit(_metrics_json(session, metrics), args.json, _metrics_lines(session, metrics))


def _load_config(session, args: argparse.Namespace):
    """--config for this session (--retarget: rebuilt for its checkpoint), with its tables file's tables if any."""
    try:
        return session.load_configuration(args.config, retarget=args.retarget)
    except ConfigError as exc:
        if exc.field == "checkpoint_sha256":
            raise CliError(f"{exc}; pass --retarget to rebuild its tables from this checkpoint with the "
                           "configuration's calibration settings") from None
        raise


def cmd_finetune(args: argparse.Namespace) -> None:
    if not args.out.endswith(".json"):
        raise CliError(f"--out {args.out!r} must name a .json configuration file (its tables go beside it)")
    if args.held_out == "test" and args.arch is None and not args.eval_skip:
        args.eval_skip = _search_images(args)  # the checks take the first test images, results the rest
    session = _session(args, config_file.load(args.config).calibration)
    loaded, tables = _load_config(session, args)
    parent = _apply_config(session, loaded, tables, label="before fine-tuning")
    tuned = finetuning.finetune_session(session, parent, held_out=_held_out(args, session),
                                        progress=_progress_bar("finetune"), **_finetuning(args))
    out = Path(args.out)
    tables_path = session.save_tuned(tuned.metrics, out, loaded.retargeted_from)
    report, metrics = tuned.report, tuned.metrics
    judged, judged_parent = tuned.judged()
    data = {**_metrics_json(session, metrics), "finetune": tuned.record(), "config_file": str(out),
            "tables_file": str(tables_path), "parent_accuracy_ci95": list(parent.accuracy_ci95),
            **_versus(metrics, parent, "parent"),
            "unseen": None if tuned.unseen is None else {
                "first": tuned.unseen.start, "images": judged.eval_images, "accuracy": judged.accuracy,
                "retention": judged.retention, "parent_accuracy": judged_parent.accuracy}}
    unseen = ([] if tuned.unseen is None else
              [f"on the {judged.eval_images} evaluation images after the held-out ones: "
               + _versus_line(judged, judged_parent, "the untuned parent")])
    _emit(data, args.json, [f"fine-tuned {len(tuned.quantizers)} table layers in {report.steps} steps "
                            f"({report.seconds:.0f} s; stopped: {report.stopped}): held-out distillation loss "
                            f"{report.loss_before:.4f} -> {report.loss_after:.4f} (step {report.best_step} kept; "
                            f"held out: {report.held_out_from})",
                            _versus_line(metrics, parent, "the untuned parent"), *unseen,
                            f"-> {out} + {tables_path.name}", *_metrics_lines(session, metrics)])


def _finetune_options(p: argparse.ArgumentParser, images: str = "--images") -> None:
    """Fine-tuning's options; `images` names the training-image count's flag (a search's --images is its folder)."""
    p.add_argument("--steps", type=_positive, default=finetuning.DEFAULT_STEPS,
                   help="at most this many Adam steps (default %(default)s)")
    p.add_argument("--seconds", type=float, default=None,
                   help="time budget: the first steps' speed sets how many fit (and the schedule follows them)")
    p.add_argument("--patience", type=_positive, default=None,
                   help=f"stop after this many of the {finetuning.CHECKS} held-out checks in a row without improvement")
    p.add_argument(images, dest="images", type=_positive, default=finetuning.DEFAULT_IMAGES,
                   help="first N training images (default %(default)s)")
    p.add_argument("--lr", type=float, default=finetuning.DEFAULT_LR, help="Adam learning rate (default %(default)g)")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--layer-loss", type=float, default=finetuning.DEFAULT_LAYER_LOSS,
                   help="weight of the per-layer output loss beside the logits' (default %(default)g; 0: logits only)")


def _finetuning(args: argparse.Namespace) -> dict[str, Any]:
    """The fine-tuning options as `finetune_session` takes them."""
    return {"steps": args.steps, "images": args.images, "lr": args.lr, "batch_size": args.batch_size,
            "layer_loss": args.layer_loss, "seed": args.seed, "seconds": args.seconds, "patience": args.patience}


def _held_out(args: argparse.Namespace, session):
    """The images a fine-tuning run checks itself on: the test images left out (--checkpoint), the first half of
    the folder's evaluation images (--arch), or None (--held-out train: the last fine-tuning images)."""
    if args.held_out == "train":
        return None
    if args.arch is None:
        return session.left_out
    if (half := finetuning.first_half(session)) is None:
        raise CliError(f"--held-out test needs 2 or more evaluation images in {args.image_folder}, it has "
                       f"{len(session.eval_set)}; add images or pass --held-out train")
    return half


def cmd_search(args: argparse.Namespace) -> None:
    from tabconv.confirm import confirm
    from tabconv.search import greedy_search, priority_masking

    if args.convention == "latency" and args.no_latency:
        raise CliError("--convention latency measures latency: drop --no-latency")
    confirming = not args.no_confirm and args.arch is None
    if args.finetune and not confirming:
        raise CliError("--finetune fine-tunes before confirming: drop --no-confirm (and use --checkpoint, whose test "
                       "images split into search and confirmation images)")
    if args.search_retention is not None and not args.finetune:
        raise CliError("--search-retention is the untuned target of a search that fine-tunes: add --finetune")
    target = args.search_retention if args.search_retention is not None else args.min_retention
    if confirming and args.eval_images is None:
        args.eval_images = _search_images(args)
    session = _session(args)
    _enable_latency(session, args)
    setting = _table_setting(args)
    if args.strategy == "priority":
        result = priority_masking(session, setting, target, max_storage_bytes=args.max_storage_bytes,
                                  progress=_progress_bar("priority"))
    else:
        result = greedy_search(session, setting, target, args.max_storage_bytes, args.convention,
                               args.max_evaluations, progress=_progress_bar("greedy"))
    if result.best is None:
        lower = "--search-retention" if args.search_retention is not None else "--min-retention"
        raise CliError(f"no evaluated configuration keeps {target:.0%} of the baseline accuracy "
                       f"({len(result.points)} tried); lower {lower} or raise --centroids")
    data = {"strategy": args.strategy, "evaluated": len(result.points), "ranking": result.ranking,
            "config_file": str(args.out)}
    if not confirming:
        session.configuration(result.best).save(args.out)
        searched = len(session.eval_set) + session.eval_set.first
        why = ("--arch searches are not confirmed (their image folder's evaluation part is not split)"
               if args.arch is not None else "--no-confirm")
        chosen_on = [f"not confirmed ({why}): chosen on these test images, so this accuracy is optimistic"
                     + ("" if args.arch is not None else f"; `evaluate --config {args.out} --eval-skip {searched}` "
                        "measures it on test images the search never saw")]
        _emit({**_metrics_json(session, result.best), **data, "confirmation": None}, args.json,
              [f"{args.strategy}: best of {len(result.points)} configurations -> {args.out}",
               *_metrics_lines(session, result.best), *chosen_on])
        return
    confirmation_session = _confirmation_session(args, session)
    _enable_latency(confirmation_session, args)
    tune = (finetuning.tuner(session, confirmation_session, progress=_progress_bar("finetune"), **_finetuning(args))
            if args.finetune else None)
    checked = confirm(session, confirmation_session, result.best, args.min_retention, args.max_storage_bytes,
                      args.convention, progress=_progress_bar("back-off"), tune=tune)
    accepted = checked.confirmed
    if tune is None:
        confirmation_session.configuration(accepted).save(args.out)
    else:
        data["tables_file"] = str(confirmation_session.save_tuned(accepted, args.out))
    data["confirmation"] = _confirmation_json(checked, session, confirmation_session)
    _emit({**_metrics_json(confirmation_session, accepted), **data}, args.json,
          [f"{args.strategy}: best of {len(result.points)} configurations, chosen on test images "
           f"{_image_range(session)}, confirmed on {_image_range(confirmation_session)} -> {args.out}",
           *_confirmation_lines(checked), "on the confirmation images:",
           *_metrics_lines(confirmation_session, accepted)])


RETARGET_HELP = ("the configuration was made for another checkpoint of this architecture: rebuild its tables from this "
                 "one with its calibration settings (a fine-tuned tables file is not used) and record where it came "
                 "from")
DEFAULT_SEARCH_IMAGES = 1000  # a search chooses on these (or half the test split when smaller), confirms on the rest


def _search_images(args: argparse.Namespace) -> int:
    """How many test images a confirmed search chooses on when --eval-images is not given."""
    from tabconv.data import load_dataset
    from tabconv.train import load_checkpoint

    _, meta = load_checkpoint(args.checkpoint, "cpu")
    known = DATASETS[meta["dataset"]].test_images  # the registry's count: no need to load the split for it
    available = (known or len(load_dataset(meta["dataset"], "test", args.data_root))) - args.eval_skip
    if available < 2:
        raise CliError(f"--eval-skip {args.eval_skip} leaves {max(available, 0)} test images: too few to search on "
                       "some and confirm on others; lower --eval-skip or pass --no-confirm")
    return min(DEFAULT_SEARCH_IMAGES, available // 2)


def _confirmation_session(args: argparse.Namespace, search):
    """The same model, calibration and table cache on the test images after the search's (--confirm-images of
    them, default all)."""
    from tabconv.session import Session

    skip = search.eval_set.first + len(search.eval_set)
    try:
        return Session.from_checkpoint(args.checkpoint, calibration=search.calibration,
                                       eval_images=args.confirm_images, data_root=args.data_root,
                                       cache=search.builder.cache, device=args.device, eval_skip=skip)
    except ConfigError as exc:
        raise CliError(f"no test images left to confirm on after the {skip} the search used ({exc}); lower "
                       "--eval-images or pass --no-confirm") from None


def _image_range(session) -> str:
    first = session.eval_set.first
    return f"{first}-{first + len(session.eval_set) - 1}"


def _confirmation_json(checked, search, confirmation) -> dict[str, Any]:
    return {"search_images": [search.eval_set.first, len(search.eval_set)],
            "confirmation_images": [confirmation.eval_set.first, len(confirmation.eval_set)],
            "min_retention": checked.min_retention, "finetuned": checked.chosen_tuned is not None,
            "chosen": _on_both(checked.chosen, checked.chosen_confirmed),
            "chosen_finetuned_searched": None if checked.chosen_tuned is None else {
                "accuracy": checked.chosen_tuned.accuracy, "retention": checked.chosen_tuned.retention},
            "backoffs": [{"layer": b.layer, **_on_both(b.searched, b.confirmed)} for b in checked.backoffs],
            "accepted": _on_both(checked.searched, checked.confirmed)}


def _on_both(searched, confirmed) -> dict[str, Any]:
    """One configuration's accuracy and retention on the search images and on the confirmation images."""
    return {"accuracy_searched": searched.accuracy, "retention_searched": searched.retention,
            "accuracy_confirmed": confirmed.accuracy, "retention_confirmed": confirmed.retention,
            "table_layers": confirmed.table_layers}


def _confirmation_lines(checked) -> list[str]:
    chosen, first, tuned = checked.chosen, checked.chosen_confirmed, checked.chosen_tuned
    lines = [f"the search's choice: retention {chosen.retention:.1%} on its images, {first.retention:.1%} on the "
             f"confirmation images (target {checked.min_retention:.1%})" if tuned is None else
             f"the search's choice: retention {chosen.retention:.1%} on its images untuned; fine-tuned "
             f"{tuned.retention:.1%} there, {first.retention:.1%} on the confirmation images (target "
             f"{checked.min_retention:.1%}; each back-off is fine-tuned too)"]
    for step, b in enumerate(checked.backoffs, 1):
        lines.append(f"back-off {step}: {b.layer} -> exact: retention {b.searched.retention:.1%} on the search "
                     f"images, {b.confirmed.retention:.1%} on the confirmation images")
    if checked.backoffs:
        lines.append(f"accepted after {len(checked.backoffs)} back-off(s): {len(checked.confirmed.table_layers)} "
                     "table layers")
    return lines


def cmd_sensitivity(args: argparse.Namespace) -> None:
    from tabconv.search import sensitivity

    session = _session(args)
    rows = sensitivity(session, _table_setting(args), progress=_progress_bar("sensitivity"))
    base = session.baseline
    data = {"model": session.info.model, "dataset": session.info.dataset,
            "eval_images": base.eval_images, "baseline_accuracy": base.accuracy,
            "baseline_accuracy_ci95": list(base.accuracy_ci95), "setting": _table_setting(args).to_dict(),
            "layers": rows}
    lines = [f"exact network: accuracy {accuracy_text(base.correct, base.eval_images, 2)}",
             f"{'layer':28s} {'only this tabled':>22s} {'only this exact':>22s}",
             *(f"{r['layer']:28s} {_sweep_cell(r['only_table']):>22s} {_sweep_cell(r['only_exact']):>22s}"
               for r in rows),
             "p: McNemar's exact test against the exact network on the same images; * significant at 0.05"]
    _emit(data, args.json, lines)


def _sweep_cell(row: dict[str, Any]) -> str:
    """'68.00% p=0.41' or '61.33% p<0.001*'."""
    return f"{row['accuracy']:.2%} {p_text(row['p_value_vs_exact'])}{'*' if row['significant_vs_exact'] else ''}"


# -- export --------------------------------------------------------------------------------------------
def _formats(text: str) -> tuple[str, ...]:
    from tabconv.export import ExportError, parse_formats

    try:
        return parse_formats(text)
    except ExportError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_export(args: argparse.Namespace) -> None:
    from tabconv.export import MODEL_FILE, TabledNetwork, export_files, kernel_check, prepare_folder, write_export

    calibration = config_file.load(args.config).calibration
    prepare_folder(args.out)  # an unwritable folder is refused before any table is built
    session = _session(args, calibration)
    loaded, tables = _load_config(session, args)
    quantizers = tables.quantizers if tables is not None else session.tables(loaded.layers)
    paths = write_export(args.out, export_files(TabledNetwork.from_session(session, quantizers), args.format))
    sizes = {path.name: path.stat().st_size for path in paths}
    kind = "fine-tuned" if tables is not None else "built"
    data = {"model": session.info.model, "dataset": session.info.dataset, "config_file": args.config,
            "table_layers": len(quantizers), "tables": kind, "out": str(args.out), "files": sizes}
    lines = [f"exported {session.info.model} with {len(quantizers)} table layers ({kind} tables) -> {args.out}",
             *(f"  {name}: {size:,} bytes" for name, size in sizes.items())]
    if MODEL_FILE in sizes:
        images = session.eval_set.normalize(session.eval_set.images[:KERNEL_CHECK_IMAGES]).float().cpu()
        check = data["kernel_check"] = kernel_check(Path(args.out) / MODEL_FILE, images, native.default_kernel())
        lines.append(f"model.pt on the {check['runs_on']} kernels against the torch path, {check['images']} test "
                     f"images: same predictions {check['same_predictions']:.0%}, logits within "
                     f"{check['max_abs_diff_relative']:.1e} of the largest")
    _emit(data, args.json, lines)


# -- cache ---------------------------------------------------------------------------------------------
def cmd_cache(args: argparse.Namespace) -> None:
    cache = TableCache(args.cache_dir)
    if args.action == "clear":
        removed = cache.clear()
        _emit({"root": str(cache.root), "removed": removed}, args.json,
              [f"removed {removed} entries from {cache.root}"])
        return
    entries = cache.entries()
    data = {"root": str(cache.root), "entries": len(entries), "bytes": sum(e.size_bytes for e in entries),
            "items": [{"key": e.key, "layer": e.layer, "bytes": e.size_bytes,
                       "setting": e.description.get("setting"), "damaged": e.description.get("damaged", False)}
                      for e in entries]}
    lines = [f"{e.key[:12]}  {e.size_bytes:>10,}  {e.layer}  {e.description.get('setting', 'damaged')}"
             for e in entries] + [f"{len(entries)} entries, {data['bytes']:,} bytes in {cache.root}"]
    _emit(data, args.json, lines)


# -- parser --------------------------------------------------------------------------------------------
def _session_options(p: argparse.ArgumentParser, folder_flags: tuple[str, ...] = ("--images", "--image-folder")
                     ) -> None:
    """The flags that open a session. `finetune` has its own --images (a count), so there the folder is
    --image-folder only."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint written by `tabconv train`")
    source.add_argument("--arch", metavar="NAME", help="your own model instead: tabconv's (resnet18, resnet34, nin, "
                        "tiny) or any torchvision classification architecture (resnet50, mobilenet_v2, ...), with an "
                        "image folder")
    p.add_argument("--weights", default=None, metavar="FILE|NAME",
                   help="with --arch: a state_dict file (torch.save(model.state_dict(), ...)), a tabconv checkpoint, "
                   "or a torchvision weight name (IMAGENET1K_V1, DEFAULT); default: random weights (seed 0)")
    p.add_argument(*folder_flags, dest="image_folder", default=None, metavar="DIR",
                   help="with --arch: an image folder, DIR/<class>/*.jpg|png (split 80/20 per class) or DIR/train and "
                   "DIR/val")
    p.set_defaults(image_folder_flag=folder_flags[0])
    p.add_argument("--num-classes", type=_positive, default=None,
                   help="with --arch: classes of the model (default: the weights', else the folder's)")
    p.add_argument("--image-size", type=_positive, default=None,
                   help="with --arch: centre crop size (default 224, or the weight name's)")
    p.add_argument("--mean", type=_floats, default=None,
                   help="with --arch: per-channel mean, e.g. 0.485,0.456,0.406 (default ImageNet's, or the weight "
                   "name's)")
    p.add_argument("--std", type=_floats, default=None,
                   help="with --arch: per-channel std, e.g. 0.229,0.224,0.225 (default ImageNet's, or the weight "
                   "name's)")
    p.add_argument("--calibration-images", type=_positive, default=Calibration.images,
                   help="first N training images used to learn prototypes (default %(default)s)")
    p.add_argument("--eval-images", type=_positive, default=None,
                   help="first N test images to evaluate on (default: the whole test split)")
    p.add_argument("--eval-skip", type=_count, default=0, metavar="N",
                   help="leave out the first N test images (e.g. those a search chose on) and evaluate on the ones "
                   "after them (--eval-images of them, default all)")
    p.add_argument("--calibration", choices=("independent", "sequential"), default="independent",
                   help="learn each layer on exact activations, or on approximated upstream ones (the paper's)")
    p.add_argument("--max-rows", type=_positive, default=Calibration.max_rows,
                   help="calibration rows per layer sampled for k-means (default %(default)s)")
    p.add_argument("--fit", choices=FIT_METHODS, default="kmeans",
                   help="tables: k-means prototypes x weights, or refit by least squares to the exact output")
    p.add_argument("--ridge", type=float, default=Calibration.ridge,
                   help="least-squares pull toward the k-means tables (default %(default)s)")
    p.add_argument("--refit-classifier", action="store_true",
                   help="refit the classifier's weights to the exact logits before tabling it (the reference's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="dataset root (else $TABCONV_DATA, else the user cache)")
    p.add_argument("--cache-dir", default=None, help="table cache (else $TABCONV_CACHE, else cached_tables/)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the table cache")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--latency-batch", type=_positive, default=DEFAULT_BATCH,
                   help="evaluate / search: batch size of the measured latency (default %(default)s)")
    p.add_argument("--no-latency", action="store_true",
                   help="evaluate / search: do not measure latency (no per-layer timing on this machine)")
    p.add_argument("--kernel", choices=native.KERNELS, default=None,
                   help="table layers' kernels: native (C, SIMD lookups; fails when they cannot be built), torch, or "
                   "auto (native when available); default: $TABCONV_KERNEL, else auto")


def _table_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codebooks", "-C", type=_positive, default=8, help="C: subspaces per layer (default 8)")
    p.add_argument("--subvector", "-S", type=_positive, default=None,
                   help="sub-vector length S: each layer's C becomes ceil(D/S) (overrides -C)")
    p.add_argument("--centroids", "-K", type=_positive, default=64, help="K: prototypes per subspace (default 64)")
    p.add_argument("--encoder", choices=ENCODERS, default="exhaustive")
    p.add_argument("--lut-dtype", choices=LUT_DTYPES, default="float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tabconv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model and save a checkpoint")
    p.add_argument("--model", choices=model_names(), required=True)
    p.add_argument("--dataset", choices=list(DATASETS), required=True)
    p.add_argument("--epochs", type=_positive, default=None, help="default: per dataset")
    p.add_argument("--train-images", type=_positive, default=None,
                   help="train on the first N training images only (default: all)")
    p.add_argument("--batch-size", type=_positive, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--augment", action="store_true",
                   help="random 4-pixel shifts and horizontal flips (CIFAR-10; not for digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cost", help="FLOPs and storage of a model, optionally under a configuration")
    p.add_argument("--model", required=True, help=f"{', '.join(model_names())}, or any torchvision classification "
                   "architecture (resnet50, mobilenet_v2, efficientnet_b0, ...)")
    p.add_argument("--num-classes", type=_positive, required=True)
    p.add_argument("--input-shape", type=_shape, required=True, help="C,H,W e.g. 3,32,32")
    p.add_argument("--config", default=None, help="a configuration file; its table layers are costed as tables")
    p.add_argument("--convention", choices=CONVENTIONS, default="paper",
                   help="paper: encoding free, as the paper counted; full: encoding counted")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("evaluate", help="accuracy, FLOPs and storage of a configuration")
    _session_options(p)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--all-exact", action="store_true")
    mode.add_argument("--all-table", action="store_true")
    mode.add_argument("--config", default=None, help="a configuration file (its calibration settings are used)")
    p.add_argument("--retarget", action="store_true", help=RETARGET_HELP)
    _table_options(p)
    p.add_argument("--save-config", default=None, help="write this run's configuration file here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("finetune", help="train a configuration's tables end to end, distilling the exact network")
    _session_options(p, ("--image-folder",))
    p.add_argument("--config", required=True, help="the configuration to fine-tune (its calibration is used)")
    p.add_argument("--retarget", action="store_true", help=RETARGET_HELP)
    _finetune_options(p)
    p.add_argument("--held-out", choices=("test", "train"), default="test",
                   help="images the held-out checks use (they pick the tables kept): test (default) = the first "
                   "--eval-skip test images (default: as a search, 1000 or half the split), the results are measured "
                   "on those after them; with --arch the first half of the folder's evaluation images; train = the "
                   "last fine-tuning images, which the network may have trained on")
    p.add_argument("--out", required=True, help="TUNED.json; the tables go to TUNED.tables.pt beside it")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="write the tabled network of a configuration: model.pt, model.onnx, "
                       "model-ops.onnx, tables.npz + manifest.json")
    _session_options(p)
    p.add_argument("--config", required=True, help="the configuration to export (its calibration is used; "
                   "a fine-tuned one exports its tables file)")
    p.add_argument("--retarget", action="store_true", help=RETARGET_HELP)
    p.add_argument("--out", required=True, help="folder for the files (created if needed)")
    p.add_argument("--format", type=_formats, default=FORMATS,
                   help=f"comma-separated subset of {','.join(FORMATS)} (default: all; onnx-ops: model-ops.onnx, "
                   "the table layers as tabconv's onnxruntime operator); manifest.json is always written")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("search", help="find a configuration: priority masking or greedy, under a retention budget")
    _session_options(p)
    _table_options(p)
    p.add_argument("--strategy", choices=("priority", "greedy"), required=True)
    p.add_argument("--min-retention", type=_fraction, required=True, help="fraction of baseline accuracy to keep")
    p.add_argument("--max-storage-bytes", type=_positive, default=None)
    p.add_argument("--convention", choices=SEARCH_CONVENTIONS, default="paper",
                   help="what the greedy search minimises: FLOPs (paper: encoding free; full: encoding counted) or "
                   "latency measured on this machine (per-layer latency table)")
    p.add_argument("--max-evaluations", type=_positive, default=400, help="greedy: evaluation budget")
    p.add_argument("--confirm-images", type=_positive, default=None, metavar="N",
                   help="confirm the choice on N test images after the search's (default: all of them); while the "
                   "target fails there, table layers go back to exact, the costliest on the search images first")
    p.add_argument("--no-confirm", action="store_true",
                   help="keep the search's choice unconfirmed (its accuracy is then measured on the images that "
                   "chose it)")
    p.add_argument("--finetune", action="store_true",
                   help="fine-tune the choice (and each back-off) before confirming it: the held-out checks use the "
                   "search's images, the target is judged on the confirmation images; the fine-tuning options below "
                   "apply, with --finetune-images for the training images")
    p.add_argument("--search-retention", type=_fraction, default=None,
                   help="with --finetune: the retention the search asks of untuned tables (default --min-retention; "
                   "lower, since fine-tuning lifts it)")
    _finetune_options(p, "--finetune-images")
    p.add_argument("--out", required=True, help="where the configuration file is written (the confirmed one, with "
                   "its accuracy on the confirmation images)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("sensitivity", help="per layer: tabling only it, and keeping only it exact")
    _session_options(p)
    _table_options(p)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("cache", help="list or clear the table cache")
    p.add_argument("action", choices=("ls", "clear"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("reproduce", help="re-run a published claim's evaluation (docs/claims.json) and compare")
    registry.add_reproduce_arguments(p)
    p.set_defaults(func=registry.cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, *USER_ERRORS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
