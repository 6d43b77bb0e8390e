"""The library's searches, sweeps, fine-tuning and timing: each in its tab's turn (explorer.turns), under the
workbench lock, with a progress bar that can cancel it (a cancelled one says so and redraws the page). The
configurations a tab's sweep or search evaluated (or recalled from another tab's) join that tab's history.

Where sweep results are kept, and under which keys, is the library's (tabconv.sweepstore.SweepStore).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from explorer import state, turns
from explorer.progress import ProgressBar
from explorer.workbench import Workbench
from tabconv import search
from tabconv.confirm import Confirmation, confirm, halves
from tabconv.finetune import Tuned, finetune_session, first_half, tuner
from tabconv.latency import Latency, measure_configuration
from tabconv.metrics import Metrics, Origin
from tabconv.settings import LayerSetting
from tabconv.sweepstore import SIDES


def _run(wb: Workbench, title: str, work: Any, *args: Any, on_cancel: Callable[[], None] | None = None,
         **kwargs: Any) -> Any:
    """`work(session, *args, progress=bar, **kwargs)` in this tab's turn, under the lock, giving way to other tabs'
    short requests between its steps. Cancelled by its tab, it says so and redraws the page (after `on_cancel`)."""
    try:
        with turns.turn(title) as held, ProgressBar(title, cancellable=held, gives_way=wb.lock) as bar, wb.lock:
            return work(wb.session, *args, progress=bar, **kwargs)
    except turns.Cancelled as exc:
        if on_cancel is not None:
            on_cancel()
        state.cancelled(exc)


def propagation(wb: Workbench, setting: LayerSetting, run: bool = True,
                on_cancel: Callable[[], None] | None = None) -> dict[str, Any] | None:
    """Rows 'only layer i tabled' × columns 'output of every layer' (cosine and relative error); when not in
    the store, computed only when `run` (one evaluation per layer), else None."""
    layers = len(wb.structure.names)
    title = f"Error propagation: each of the {layers} layers tabled alone ({layers} evaluations, once)"
    compute = (lambda: _run(wb, title, search.propagation_matrix, setting, on_cancel=on_cancel)) if run else None
    return wb.sweeps.propagation(setting, compute)


def sensitivity(wb: Workbench, setting: LayerSetting, run: bool = False) -> dict[str, Any] | None:
    """Both directions per layer and the all-tables retention they compare with; computed only when
    `run` (2 evaluations per layer), else recalled from this process or the disk."""
    layers = len(wb.structure.names)

    def both(session: Any, progress: Any) -> tuple[list[dict[str, Any]], Any]:
        rows = search.sensitivity(session, setting, progress=progress)
        return rows, session.apply(session.uniform(setting), label="all tables", origin=Origin.SWEEP).metrics

    def compute() -> tuple[list[dict[str, Any]], Metrics]:
        rows, every = _run(wb, f"Sensitivity: {layers} layers × 2 directions", both)
        state.remember([wb.metrics(row[side]["config_id"]) for row in rows for side in SIDES] + [every])
        return rows, every

    return wb.sweeps.sensitivity(setting, compute if run else None)


def masking(wb: Workbench, setting: LayerSetting, rank_by: str) -> dict[str, Any]:
    """The paper's priority masking: point n keeps the n worst-ranked layers exact (0..L)."""
    sweep = wb.sweeps.masking(setting, rank_by, lambda: _run(
        wb, "Priority masking (one evaluation per number of exact layers)", search.priority_masking, setting,
        rank_by=rank_by))
    state.remember(wb.metrics(i) for i in sweep["ids"])  # this tab asked for them: they are on its plots
    return sweep


@dataclass(frozen=True)
class Budgeted:
    """A budgeted search, chosen on the first half of the evaluation images and confirmed on the second."""

    result: search.SearchResult
    checked: Confirmation | None  # None: nothing met the target, or too few images to split
    halves: tuple[slice, slice] | None

    @property
    def accepted(self) -> int | None:
        """The id of the configuration to show: the confirmed one (the search's best when none could be)."""
        if self.checked is not None:
            return self.checked.confirmed.id
        return None if self.result.best is None else self.result.best.id


def budgeted(wb: Workbench, setting: LayerSetting, min_retention: float, max_storage_bytes: int | None,
             convention: str, max_evaluations: int, tune_seconds: float | None = None,
             search_retention: float | None = None) -> Budgeted:
    """Greedy search from priority masking's best point (the most FLOPs saved within the budget), judged on the
    first half of the evaluation images, then confirmed on the second half (tabconv.confirm): one evaluation per
    configuration serves both halves. With `tune_seconds`, the search asks `search_retention` of untuned tables,
    and the choice (and each back-off) is fine-tuned for that long, its checks on the first half, before the
    target is judged on the second."""
    split = halves(len(wb.session.eval_set))
    result = _run(wb, "Budgeted search", search.greedy_search, setting, search_retention or min_retention,
                  max_storage_bytes=max_storage_bytes, convention=convention, max_evaluations=max_evaluations,
                  images=split[0] if split else None)
    state.remember(wb.metrics(m.id) for m in result.points)
    checked = None
    if result.best is not None and split is not None:
        title = ("Confirming the search's choice on the other half of the images"
                 + ("" if tune_seconds is None else f", each configuration fine-tuned for {tune_seconds:.0f} s first"))
        checked = _run(wb, title, _confirmed, result.best, min_retention, max_storage_bytes, convention,
                       search_images=split[0], confirmation_images=split[1], tune_seconds=tune_seconds)
        state.remember(wb.metrics(m.id) for m in (checked.chosen_tuned, *(b.searched for b in checked.backoffs))
                       if m is not None)
    return Budgeted(result, checked, split)


def _confirmed(session: Any, *args: Any, progress: Any, tune_seconds: float | None, **kwargs: Any) -> Confirmation:
    """One session's confirmation (tabconv.confirm), fine-tuning each configuration it judges when asked, with
    the same progress bar (and Cancel)."""
    tune = None if tune_seconds is None else tuner(session, session, held_out=first_half(session), progress=progress,
                                                  seconds=tune_seconds)
    return confirm(session, session, *args, progress=progress, tune=tune, **kwargs)


def finetune(wb: Workbench, parent: Metrics, steps: int, images: int, lr: float, layer_loss: float,
             seconds: float | None = None, patience: int | None = None) -> Tuned:
    """Fine-tune a configuration's tables (its tuned metrics land in the history); the run is kept by its
    tables' sha256, so that its configuration and tables file can be exported. Toggles never re-run it. The
    held-out checks use the first half of the evaluation images (the network never trained on them); the result
    is judged on the second."""
    layers = len(parent.table_layers)
    run = _run(wb, f"Fine-tuning the {layers} table layer(s) of #{parent.id}", finetune_session, parent,
               steps=steps, images=images, lr=lr, layer_loss=layer_loss, seconds=seconds, patience=patience,
               held_out=first_half(wb.session))
    return run


def speed(wb: Workbench, current: Metrics, batch: int, repeats: int) -> Latency:
    """Time a configuration's tabled network against the exact one on this machine's CPU (PyTorch eager, CPU
    copies: the session's runner and models are left as they are)."""
    return _run(wb, f"Measuring the speed of #{current.id} (batch {batch}, {repeats} runs each)",
                measure_configuration, current, batch, repeats)
