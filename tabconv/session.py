"""The incremental session: a model, its calibration and evaluation images, and `apply(settings)`.

It rebuilds only the tables whose own key changed (memory, then the disk cache), re-evaluates only
the graph nodes a changed layer can influence (reusing every activation before it), and keeps every
evaluated configuration in its history for plots, searches and comparisons.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tabconv.atomic import atomic_write_bytes
from tabconv.bounded import BoundedDict
from tabconv.cache import TableCache
from tabconv.calibrate import FITTED, TableBuilder
from tabconv.config import Calibration, ConfigError, Configuration, load_for
from tabconv.convert import convert, swaps, table_module
from tabconv.cost import CostModel, CostReport
from tabconv.data import ImageSet, load_dataset
from tabconv.devices import resolve_device
from tabconv.evaluate import ErrorAccumulator, LayerError, evaluate
from tabconv.incremental import IncrementalRunner
from tabconv.latencytable import LatencyEstimate, LatencyTable
from tabconv.metrics import Metrics, Origin, pack_hits
from tabconv.modelinfo import ModelInfo
from tabconv.progress import Progress, ProgressEvent, Stage
from tabconv.quantizer import ProductQuantizer
from tabconv.settings import EXACT, LayerSetting
from tabconv.structure import ModelStructure
from tabconv.tablesfile import load_tables, save_tables, tables_bytes, tables_path_for
from tabconv.train import load_checkpoint

MAX_INCREMENTAL_IMAGES = 2500  # above this, activations are not kept: evaluation streams in batches
# Kept activations (exact and current, each): every node's when they fit, else the latest nodes' (2 GiB each keeps
# layer4 and most of layer3 of ResNet-50 at 224x224 for 256 images, so late toggles start from kept inputs)
ACTIVATION_MEMORY_BYTES = 2 << 30
if TYPE_CHECKING:
    from tabconv.finetune import Tuned

BATCH_ACTIVATION_BYTES = 256 << 20  # a batch's largest activation: bounds the transient memory of a pass
MAX_GIVEN_TABLES = 8  # sets of given (fine-tuned) tables kept for re-activation and export: each is a network's tables
GIVEN = "given"  # where a layer's tables came from when the caller passed them (e.g. fine-tuned ones)


@dataclass(frozen=True)
class Applied:
    """What one `Session.apply` did: the configuration's metrics, who asked and why, and the work it took —
    nothing when the configuration was evaluated before (`recalled`)."""

    metrics: Metrics
    label: str  # as asked (a recalled configuration keeps the label it was first evaluated under)
    origin: Origin  # as asked
    recalled: bool
    tables: Mapping[str, str]  # table layer -> where its tables came from (calibrate.FITTED, LOADED, REUSED; GIVEN)
    recomputed: int  # graph nodes re-run by the incremental runner (0 when recalled or streaming)
    nodes: int | None  # graph nodes of the incremental runner; None: evaluation streams the whole network
    seconds: float

    @property
    def fitted(self) -> list[str]:
        """Table layers whose tables were fitted for this request (not read from memory, disk or the caller)."""
        return [name for name, source in self.tables.items() if source == FITTED]

    @classmethod
    def recalled_now(cls, metrics: Metrics, label: str, origin: Origin, seconds: float) -> Applied:
        """The record of a request answered from `Session.recall` (no work, no runner)."""
        return cls(metrics, label, origin, True, {}, 0, None, seconds)


@dataclass
class GivenTables:
    """Tables given to a session instead of built from calibration: fine-tuned in this process or read from a
    tables file. The session keeps the latest MAX_GIVEN_TABLES of them, with what re-exporting them needs."""

    sha256: str  # the tables file's sha256: the tables' identity
    quantizers: Mapping[str, ProductQuantizer]
    data: bytes | None = None  # the tables file's content (None: not kept; serialised from `quantizers` when asked)
    finetune: Mapping[str, Any] = field(default_factory=dict)  # how they were trained (a configuration's record)
    run: Tuned | None = None  # the fine-tuning run that made them, when it ran in this process

    def content(self) -> bytes:
        """The tables file's content (for a download), serialised the first time it is asked for when not kept."""
        if self.data is None:
            self.data = tables_bytes(self.quantizers, self.sha256)[0]
        return self.data

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the tables file atomically: its kept content, else streamed from `quantizers` (no copy in memory),
        refused unless it hashes to `sha256`."""
        if self.data is not None:
            atomic_write_bytes(path, self.data)
        else:
            save_tables(path, self.quantizers, self.sha256)


class Session:
    """Evaluate configurations of one trained model fast and without redoing work."""

    def __init__(self, model: nn.Module, meta: Mapping[str, Any], calibration_set: ImageSet, eval_set: ImageSet,
                 calibration: Calibration | None = None, cache: TableCache | None = None,
                 device: torch.device | str | None = None, batch_size: int = 500,
                 progress: Progress | None = None) -> None:
        self.device = resolve_device(device if device is None else str(device))
        # channels-last: measured 1.8x faster for ResNet-18 on this CPU, and the layout of table-layer outputs
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.info = ModelInfo.from_meta(meta)
        self.calibration = calibration or Calibration()
        self.input_shape = self.info.input_shape
        self.structure = ModelStructure(self.model, self.input_shape)
        if self.calibration.images > len(calibration_set):
            raise ConfigError(f"calibration.images={self.calibration.images} but the {calibration_set.split} split "
                              f"of {calibration_set.info.name} has only {len(calibration_set)} images")
        self.eval_set = eval_set
        self.calibration_set = calibration_set  # fine-tuning draws its images from here
        self.left_out: ImageSet | None = None  # test images before eval_set (from_checkpoint's eval_skip)
        self.batch_size = _bounded_batch(batch_size, self.structure)
        calib = calibration_set.head(self.calibration.images)
        self.builder = TableBuilder(self.model, self.structure, calib.normalize(calib.images), self.calibration,
                                    {"checkpoint_sha256": self.info.sha256, "dataset": self.info.dataset},
                                    cache)
        if progress:
            progress(ProgressEvent(Stage.BASELINE, images=len(eval_set)))
        self.notes: list[str] = []  # what the user should know about how this session evaluates
        self.runner = self._runner(len(eval_set))
        self.incremental = self.runner is not None
        self._labels = eval_set.labels.to(self.device)
        self._identities: dict[str, nn.Identity] = {}
        self._tables: dict[int, nn.Module] = {}
        self._costs: dict[tuple, tuple[CostReport, CostReport]] = {}
        self.latency_table: LatencyTable | None = None  # set by enable_latency: every evaluation is then timed
        self._latencies: dict[tuple, LatencyEstimate] = {}
        self._seen: dict[tuple, Metrics] = {}
        # given (e.g. fine-tuned) tables by sha256, the most recent MAX_GIVEN_TABLES of them
        self._given: BoundedDict = BoundedDict(MAX_GIVEN_TABLES)
        self.history: list[Metrics] = []
        self._errors = {info.name: LayerError(info.name, 1.0, 0.0) for info in self.structure.layers}  # exact
        self.cost_model = CostModel(self.model, self.input_shape, self.structure.calls)
        self.baseline_cost = self.cost_model.report(None, "paper")
        self.baseline_accuracy = 0.0
        self._held: int | None = None  # the configuration whose activations the incremental runner holds
        self.baseline = self.apply({}, label="baseline (exact)", origin=Origin.BASELINE).metrics
        self.baseline_accuracy = self.baseline.accuracy
        self.baseline.baseline_accuracy = self.baseline.accuracy
        self.current = self.baseline

    def _runner(self, images: int) -> IncrementalRunner | None:
        """The incremental runner, or None (evaluation streams) when there are too many images or torch.fx
        cannot trace the model; the reason goes to `notes`."""
        if images > MAX_INCREMENTAL_IMAGES:
            self.notes.append(f"{images} evaluation images: more than {MAX_INCREMENTAL_IMAGES}, so every change "
                              "re-evaluates the whole network in batches")
            return None
        try:
            runner = IncrementalRunner(self.model, self.eval_batches(), ACTIVATION_MEMORY_BYTES)
        except Exception as err:  # torch.fx raises many kinds for code it cannot trace
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.notes.append(f"torch.fx cannot trace this model ({first[:200]}), so every change re-evaluates the "
                              "whole network in batches")
            return None
        if not runner.keeps_everything:
            self.notes.append(f"activations of {len(runner.kept)} of {len(runner.nodes)} graph nodes are kept "
                              f"({ACTIVATION_MEMORY_BYTES >> 20} MiB): changes to early layers recompute from the "
                              "input")
        return runner

    def eval_batches(self) -> list[torch.Tensor]:
        """The evaluation images as batches on the device, in the session's (channels-last) layout."""
        return [x for x, _ in self._labelled_batches()]

    def _labelled_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.eval_set.batches(self.batch_size, self.device):
            yield (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x), y

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, *, calibration: Calibration | None = None, eval_images: int | None = None,
                        data_root: str | None = None, cache: TableCache | None = None, device: str | None = None,
                        progress: Progress | None = None, batch_size: int = 500, download: bool = True,
                        clamp: bool = False, eval_skip: int = 0) -> Session:
        """Load a checkpoint and its dataset (calibration: first N train images; evaluation: first N test).

        `eval_skip`: leave out the first test images (e.g. the ones a search chose on) and evaluate on those after
        them, which the choice never saw. `clamp`: image counts above a split's size use the whole split (an
        interactive view shows the counts it uses) instead of being refused; `download=False` never fetches a
        missing dataset."""
        device = resolve_device(device)
        model, meta = load_checkpoint(path, device)
        calibration = calibration or Calibration()
        calib_set = load_dataset(meta["dataset"], calibration.split, data_root, download)
        eval_set = load_dataset(meta["dataset"], "test", data_root, download)
        left_out = None
        if eval_skip:
            try:
                eval_set, left_out = eval_set.skip(eval_skip), eval_set.head(eval_skip)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if clamp:
            calibration = replace(calibration, images=min(calibration.images, len(calib_set)))
            eval_images = None if eval_images is None else min(eval_images, len(eval_set))
        if eval_images is not None:
            eval_set = eval_set.head(eval_images)
        session = cls(model, meta, calib_set, eval_set, calibration, cache, device, batch_size, progress)
        session.left_out = left_out
        return session

    @classmethod
    def from_user_model(cls, arch: str, weights: str | None = None, *, images: str, num_classes: int | None = None,
                        image_size: int | None = None, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None, calibration: Calibration | None = None,
                        eval_images: int | None = None, cache: TableCache | None = None, device: str | None = None,
                        progress: Progress | None = None, batch_size: int = 500, clamp: bool = False) -> Session:
        """A user's own network: any architecture name (tabconv's or torchvision's), a weights file or torchvision
        weight name (None: seeded random weights), and an image folder (tabconv.userload says how each is read).
        The calibration's image count is clamped to the folder's calibration part; meta records it; `clamp` does
        the same for the evaluation images (else more than the folder has is refused)."""
        from tabconv.imagefolder import scan_image_folder
        from tabconv.userload import open_user_model

        device = resolve_device(device)
        if clamp and eval_images is not None:
            eval_images = min(eval_images, len(scan_image_folder(images).evaluation))
        opened = open_user_model(arch, weights, images, num_classes=num_classes, image_size=image_size, mean=mean,
                                 std=std, calibration=calibration, eval_images=eval_images, device=device,
                                 progress=progress)
        return cls(opened.model, opened.meta, opened.calibration_set, opened.eval_set, opened.calibration, cache,
                   device, batch_size, progress)

    @cached_property
    def eval_sha256(self) -> str:
        """sha256 of the evaluation images and labels (an image folder can change under the same name)."""
        digest = hashlib.sha256(self.eval_set.images.numpy().tobytes())
        digest.update(self.eval_set.labels.numpy().tobytes())
        return digest.hexdigest()

    def result_key(self, kind: str, **parts: Any) -> dict[str, Any]:
        """What a result computed on this session depends on (the key of a stored result, e.g. a sweep): its
        kind, the weights, dataset, calibration and evaluation images, and the caller's own `parts`."""
        return {"kind": kind, "checkpoint_sha256": self.info.sha256, "dataset": self.info.dataset,
                "calibration": asdict(self.calibration), "eval_images": len(self.eval_set),
                "eval_sha256": self.eval_sha256, **parts}

    # -- configurations ----------------------------------------------------------------------------
    def complete(self, settings: Mapping[str, LayerSetting] | Configuration) -> dict[str, LayerSetting]:
        """Every layer's setting in forward order (unnamed layers exact); unknown names are refused."""
        if isinstance(settings, Configuration):
            settings.validate_against(self.structure, self.info.sha256, model=self.info.model,
                                      dataset=self.info.dataset)
            settings = settings.layers
        for name in settings:
            self.structure.index(name)
        return {info.name: settings.get(info.name, EXACT).for_inner_dim(info.inner_dim)
                for info in self.structure.layers}

    def uniform(self, setting: LayerSetting) -> dict[str, LayerSetting]:
        return {name: setting for name in self.structure.names}

    def load_configuration(self, path: str, retarget: bool = False) -> tuple[Configuration, GivenTables | None]:
        """A configuration file checked against this session's model, dataset and checkpoint, with its fine-tuned
        tables when it names a tables file (else None: its tables are built like any others). `retarget`: made for
        another checkpoint of the same architecture, its tables are rebuilt from this one with its calibration
        settings (a tables file is not used), and it records where it came from."""
        loaded = load_for(path, self.structure, self.info.sha256, model=self.info.model,
                          dataset=self.info.dataset, retarget=retarget)
        tables_path = loaded.tables_path()
        if tables_path is None:
            return loaded, None
        quantizers = load_tables(tables_path, loaded.tables_sha256, self.structure, loaded.layers, self.device)
        return loaded, GivenTables(loaded.tables_sha256, quantizers, finetune=dict(loaded.finetune))

    def configuration(self, metrics: Metrics | None = None, retargeted_from: dict[str, Any] | None = None
                      ) -> Configuration:
        """The configuration file of a metrics record (default: the current one), metrics included, and the
        configuration it was retargeted from, if any."""
        metrics = metrics or self.current
        return Configuration(self.info.model, self.info.dataset, self.info.num_classes, self.input_shape,
                             dict(metrics.settings), self.calibration, self.info.sha256,
                             _metrics_summary(metrics), retargeted_from=retargeted_from)

    # -- evaluation --------------------------------------------------------------------------------
    def apply(self, settings: Mapping[str, LayerSetting] | Configuration, progress: Progress | None = None,
              label: str = "", origin: Origin = Origin.EDIT, tables: GivenTables | None = None) -> Applied:
        """Evaluate a configuration (it becomes the current one), once per distinct settings: what it cost is in
        the returned record.

        `tables` (e.g. fine-tuned ones) replace the built tables of every table layer instead of building them;
        the session keeps them (`given`).
        """
        started = time.perf_counter()
        settings = self.complete(settings)
        tables_id = tables.sha256 if tables is not None else None
        key = _key(settings, tables_id)
        if key in self._seen:
            self.current = self._seen[key]
            return Applied(self.current, label or self.current.label, origin, True, {}, 0, self._nodes,
                           time.perf_counter() - started)
        sources: dict[str, str] = {}
        if tables is None:
            quantizers = self.builder.build_all(settings, progress, sources)
        else:
            quantizers = self._pinned(settings, tables.quantizers)
            sources = dict.fromkeys(quantizers, GIVEN)
        metrics = self._evaluate(settings, quantizers, progress, label or f"config {len(self.history)}", origin)
        if tables is not None:
            metrics.tables_sha256 = tables.sha256
            tables.quantizers = quantizers
            self._given[tables.sha256] = tables
        self._seen[key] = metrics
        return Applied(metrics, metrics.label, origin, False, sources, self.runner.recomputed if self.incremental
                       else 0, self._nodes, time.perf_counter() - started)

    def recall(self, settings: Mapping[str, LayerSetting] | Configuration, tables_id: str | None = None
               ) -> Metrics | None:
        """The metrics of a configuration evaluated before (None if it never was), changing nothing: safe to ask
        while another thread evaluates, so a view can show a recalled configuration without waiting for it."""
        return self._seen.get(_key(self.complete(settings), tables_id))

    def unbuilt(self, settings: Mapping[str, LayerSetting] | Configuration) -> list[str]:
        """Table layers whose tables evaluating `settings` would first build (fit, or read from the disk cache):
        none for a toggle among known tables, so a view can let such quick requests go first."""
        return self.builder.missing(self.complete(settings))

    def _evaluate(self, settings: Mapping[str, LayerSetting], quantizers: Mapping[str, ProductQuantizer],
                  progress: Progress | None, label: str, origin: Origin) -> Metrics:
        """Evaluate with these tables and add the result to the history (it becomes the current one)."""
        if progress:
            progress(ProgressEvent(Stage.EVALUATE, images=len(self.eval_set)))
        if self.incremental:
            hits, errors = self._evaluate_incremental(quantizers)
        else:
            hits, errors = self._evaluate_streaming(quantizers)
        paper, full = self.costs(settings)
        metrics = Metrics(dict(settings), int(hits.sum()) / len(self.eval_set), len(self.eval_set),
                          self.baseline_accuracy, paper, full, self.baseline_cost, errors, pack_hits(hits), label,
                          len(self.history), origin, latency=self.latency_of(settings))
        self.history.append(metrics)
        self.current = metrics
        if self.incremental:
            self._held = metrics.id
        return metrics

    @property
    def _nodes(self) -> int | None:
        return len(self.runner.nodes) if self.runner else None

    def _pinned(self, settings: Mapping[str, LayerSetting], tables: Mapping[str, ProductQuantizer]
                ) -> dict[str, ProductQuantizer]:
        names = [n for n, s in settings.items() if s.is_table]
        missing = [n for n in names if n not in tables]
        if missing:
            raise ConfigError(f"the given tables lack table layer(s) {missing}")
        return {n: tables[n].to(self.device) for n in names}

    def costs(self, settings: Mapping[str, LayerSetting]) -> tuple[CostReport, CostReport]:
        """(paper, full) cost reports, memoised per distinct table settings."""
        tables = {n: s for n, s in settings.items() if s.is_table}
        key = tuple(tables.items())
        if key not in self._costs:
            self._costs[key] = tuple(self.cost_model.report(tables, c) for c in ("paper", "full"))
        return self._costs[key]

    def enable_latency(self, table: LatencyTable) -> None:
        """Time every configuration from now on (and the ones evaluated so far) with this per-layer latency table."""
        self.latency_table = table
        self._latencies.clear()
        for metrics in self.history:
            metrics.latency = self.latency_of(metrics.settings)

    def latency_of(self, settings: Mapping[str, LayerSetting]) -> LatencyEstimate | None:
        """The measured latency of a configuration (memoised per distinct settings), None without a latency table
        or off the CPU (the table times this machine's CPU)."""
        if self.latency_table is None or self.device.type != "cpu":
            return None
        settings = self.complete(settings)
        key = tuple((n, s) for n, s in settings.items() if s.is_table)
        if key not in self._latencies:
            self._latencies[key] = self.latency_table.estimate(self.model, self.structure, settings)
        return self._latencies[key]

    def tables(self, settings: Mapping[str, LayerSetting]) -> dict[str, ProductQuantizer]:
        """Built tables of the configuration's table layers (from memory or the cache when possible)."""
        return self.builder.build_all(self.complete(settings))

    def _overrides(self, quantizers: Mapping[str, ProductQuantizer]) -> dict[str, nn.Module]:
        """Module swaps for the runner: stable objects, so an unchanged layer is never recomputed."""
        overrides: dict[str, nn.Module] = {}
        for name, quantizer in quantizers.items():
            info = self.structure.layer(name)
            if id(quantizer) not in self._tables:
                self._tables[id(quantizer)] = table_module(self.model, info, quantizer).to(self.device)
            identity = self._identities.setdefault(info.bn, nn.Identity()) if info.bn else None
            overrides.update(swaps(info, self._tables[id(quantizer)], identity))
        return overrides

    def _evaluate_incremental(self, quantizers: Mapping[str, ProductQuantizer]
                              ) -> tuple[torch.Tensor, dict[str, LayerError]]:
        layer_of = {self.runner.node_for_module(info.output_name): info.name for info in self.structure.layers}
        accumulators = {node: ErrorAccumulator() for node in layer_of}
        dirty = self.runner.run(self._overrides(quantizers), layer_of,
                                lambda node, exact, approx: accumulators[node].add(exact, approx))
        for node in dirty & set(layer_of):
            self._errors[layer_of[node]] = accumulators[node].result(layer_of[node])
        logits = torch.cat(self.runner.output())
        return logits.argmax(1) == self._labels, dict(self._errors)

    def _evaluate_streaming(self, quantizers: Mapping[str, ProductQuantizer]
                            ) -> tuple[torch.Tensor, dict[str, LayerError]]:
        model = convert(self.model, self.structure, quantizers)
        result = evaluate(model, self._labelled_batches(), self.model, self.structure)
        return result.hits, result.layers

    def holds(self, metrics: Metrics) -> bool:
        """Whether the incremental runner holds this configuration's activations (so a change from it re-runs only
        the layers it affects); always true when evaluation streams."""
        return not self.incremental or self._held == metrics.id

    def activate(self, metrics: Metrics) -> None:
        """Make an evaluated configuration current and the incremental runner's state, so the next change
        re-runs only what it affects (after a sweep the runner holds the sweep's last configuration)."""
        if not self.holds(metrics):
            self._evaluate_incremental(self.quantizers(metrics))
            self._held = metrics.id
        self.current = metrics

    def release_activations(self) -> None:
        """Free the incremental runner's activations of the current configuration (the exact network's stay) before
        memory-hungry work: fine-tuning every layer of ResNet-18/CIFAR-10 at S=3 otherwise kept 2 GiB of them."""
        if self.incremental:
            self.runner.forget()
            self._held = self.baseline.id

    def has_tables(self, metrics: Metrics) -> bool:
        """Whether this session can give an evaluated configuration's tables: built ones always (from memory, the
        cache or a rebuild), given (fine-tuned) ones while they are among the latest MAX_GIVEN_TABLES sets."""
        tuned = metrics.tables_sha256
        return not tuned or tuned in self._given

    def given(self, metrics: Metrics) -> GivenTables | None:
        """The given (fine-tuned or imported) tables an evaluated configuration used, while the session keeps them;
        None for built tables."""
        return self._given.get(metrics.tables_sha256) if metrics.tables_sha256 else None

    def given_tables(self) -> list[GivenTables]:
        """Every set of given tables the session keeps, oldest first."""
        return list(self._given.values())

    def tuned_configuration(self, metrics: Metrics, tables_file: str) -> Configuration:
        """The configuration file of a configuration with given tables, naming `tables_file` (a file beside it
        holding them) and how they were trained."""
        given = self.given(metrics)
        if given is None:
            raise ConfigError(f"configuration #{metrics.id} has no given tables in this session")
        config = self.configuration(metrics)
        config.tables_file, config.tables_sha256, config.finetune = tables_file, given.sha256, dict(given.finetune)
        return config

    def save_tuned(self, metrics: Metrics, path: str | os.PathLike[str],
                   retargeted_from: dict[str, Any] | None = None) -> Path:
        """Write the configuration file of a configuration with given tables to `path` and its tables file beside
        it (both atomically); returns the tables file's path."""
        given = self.given(metrics)
        if given is None:
            raise ConfigError(f"configuration #{metrics.id} has no given tables in this session")
        tables_path = tables_path_for(path)
        given.write(tables_path)
        config = self.tuned_configuration(metrics, tables_path.name)
        config.retargeted_from = retargeted_from
        config.save(path)
        return tables_path

    def quantizers(self, metrics: Metrics) -> dict[str, ProductQuantizer]:
        """The tables an evaluated configuration used: given (fine-tuned) ones, else built ones."""
        tuned = metrics.tables_sha256
        if not tuned:
            return self.builder.build_all(metrics.settings)
        if not self.has_tables(metrics):
            raise ConfigError(f"configuration #{metrics.id}'s fine-tuned tables are no longer in memory (this session "
                              f"keeps the latest {MAX_GIVEN_TABLES} sets): load them again from their tables file")
        return dict(self._given[tuned].quantizers)


def _key(settings: Mapping[str, LayerSetting], tables_id: str | None) -> tuple:
    """What makes two evaluations the same: every layer's setting, and the given tables' id."""
    return tuple(settings.items()), tables_id


def _bounded_batch(batch_size: int, structure: ModelStructure) -> int:
    """The batch size, lowered so that a batch's largest activation stays within BATCH_ACTIVATION_BYTES."""
    largest = max((math.prod(call.output_shape) * 4 for call in structure.calls), default=1)
    return max(1, min(batch_size, BATCH_ACTIVATION_BYTES // max(largest, 1)))


def _metrics_summary(metrics: Metrics) -> dict[str, Any]:
    data = metrics.to_dict()
    data.pop("layers")
    data["layer_errors"] = {n: {"cosine": e.cosine, "relative_error": e.relative_error}
                            for n, e in metrics.errors.items()}
    return data
