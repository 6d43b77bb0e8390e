"""Automatic choices over a Session: the paper's priority masking, sensitivity sweeps, the error
propagation matrix, a budgeted greedy search, and Pareto fronts over everything evaluated."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tabconv.metrics import Metrics, Origin
from tabconv.progress import Progress, ProgressEvent, Stage
from tabconv.session import Session
from tabconv.settings import EXACT, LayerSetting

Judge = Callable[[Metrics], Metrics]  # a configuration as a search sees it (e.g. on some of its images)
RANKINGS = ("cumulative", "isolated")


@dataclass
class SearchResult:
    """Every configuration a search evaluated, and the best one meeting its constraints (if any)."""

    strategy: str
    points: list[Metrics]
    best: Metrics | None
    ranking: list[str] = field(default_factory=list)


def feasible(m: Metrics, min_retention: float, max_storage_bytes: int | None = None) -> bool:
    return m.retention >= min_retention and (max_storage_bytes is None or m.paper.storage_bytes <= max_storage_bytes)


CONVENTIONS = ("paper", "full", "latency")  # what a search minimises: FLOPs counted two ways, or measured time


def flops(m: Metrics, convention: str) -> float:
    """A configuration's cost by `convention`: FLOPs (paper or full), or measured latency in milliseconds."""
    if convention == "latency":
        if m.latency is None:
            raise ValueError("the latency convention needs measured latencies: call Session.enable_latency first")
        return m.latency.total_ms
    return m.flops_paper if convention == "paper" else m.flops_full


def pick_best(points: Iterable[Metrics], min_retention: float, max_storage_bytes: int | None = None,
              convention: str = "paper", judge: Judge | None = None) -> Metrics | None:
    """Fewest FLOPs among points feasible as `judge` sees them (default: on all their images); ties go to higher
    accuracy."""
    judge = judge or (lambda m: m)
    ok = [m for m in points if feasible(judge(m), min_retention, max_storage_bytes)]
    return min(ok, key=lambda m: (flops(m, convention), -judge(m).accuracy)) if ok else None


def on_images(session: Session, images: slice | None) -> Judge:
    """How a search judges a configuration: on all the session's evaluation images (None), or on a slice of them
    (its accuracy and retention recomputed from the per-image record), so that the rest can confirm the choice."""
    if images is None:
        return lambda m: m
    return lambda m: m.on_images(images, session.baseline)


def _notify(progress: Progress | None, stage: Stage, index: int, total: int, detail: str = "") -> None:
    if progress:
        progress(ProgressEvent(stage, index, total, detail))


def only_table(session: Session, layer: str, setting: LayerSetting) -> Metrics:
    """'Approximate only layer i': one layer tabled, the rest exact."""
    return session.apply({layer: setting}, label=f"only {layer} tabled", origin=Origin.SWEEP).metrics


def only_exact(session: Session, layer: str, setting: LayerSetting) -> Metrics:
    """'Keep only layer i exact': every other layer tabled."""
    settings = session.uniform(setting)
    settings[layer] = EXACT
    return session.apply(settings, label=f"all but {layer} tabled", origin=Origin.SWEEP).metrics


def priority_masking(session: Session, setting: LayerSetting, min_retention: float = 0.0,
                     rank_by: str = "cumulative", max_storage_bytes: int | None = None,
                     progress: Progress | None = None, images: slice | None = None) -> SearchResult:
    """The paper's masking: rank layers by the cosine of their output with every layer tabled
    ('cumulative', as the reference code does) or with only that layer tabled ('isolated', cosine at
    the network output), then sweep how many of the worst stay exact (0..L); every point is evaluated."""
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by must be one of {RANKINGS}, got {rank_by!r}")
    names = session.structure.names
    all_table = session.apply(session.uniform(setting), label="all tables", origin=Origin.PRIORITY,
                              progress=progress).metrics
    if rank_by == "cumulative":
        score = {n: all_table.errors[n].cosine for n in names}
    else:
        score = {n: only_table(session, n, setting).errors[names[-1]].cosine for n in names}
    ranking = sorted(names, key=lambda n: score[n])
    points = [all_table]
    for count in range(1, len(names) + 1):
        _notify(progress, Stage.PRIORITY, count, len(names), f"{count} exact")
        settings = session.uniform(setting)
        for name in ranking[:count]:
            settings[name] = EXACT
        points.append(session.apply(settings, label=f"priority: {count} worst exact", origin=Origin.PRIORITY).metrics)
    return SearchResult("priority", points, pick_best(points, min_retention, max_storage_bytes,
                                                      judge=on_images(session, images)), ranking)


def sensitivity(session: Session, setting: LayerSetting, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Per layer, both directions: tabling only it, and keeping only it exact."""
    names = session.structure.names
    rows = []
    for i, name in enumerate(names):
        _notify(progress, Stage.SENSITIVITY, i, len(names), name)
        alone, rest = only_table(session, name, setting), only_exact(session, name, setting)
        rows.append({"layer": name,
                     "only_table": _sweep_row(session, alone), "only_exact": _sweep_row(session, rest)})
    return rows


def _sweep_row(session: Session, m: Metrics) -> dict[str, Any]:
    base = session.baseline
    test = m.against(base)
    return {"accuracy": m.accuracy, "accuracy_ci95": list(m.accuracy_ci95), "retention": m.retention,
            "eval_images": m.eval_images, "p_value_vs_exact": test.p_value, "significant_vs_exact": test.significant,
            "flops_saved_paper": base.flops_paper - m.flops_paper, "flops_saved_full": base.flops_full - m.flops_full,
            "cosine_output": m.errors[session.structure.names[-1]].cosine, "config_id": m.id}


def propagation_matrix(session: Session, setting: LayerSetting, current: Metrics | None = None,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Rows: each layer tabled alone; columns: every layer's output in forward order; plus the current
    configuration's row. Values: cosine similarity and relative error against the exact network."""
    names = session.structure.names
    cosine, relative = [], []
    for i, name in enumerate(names):
        _notify(progress, Stage.PROPAGATION, i, len(names), name)
        m = only_table(session, name, setting)
        cosine.append([m.errors[n].cosine for n in names])
        relative.append([m.errors[n].relative_error for n in names])
    current = current or session.current
    return {"layers": names, "rows": list(names), "cosine": cosine, "relative_error": relative,
            "current": {"cosine": [current.errors[n].cosine for n in names],
                        "relative_error": [current.errors[n].relative_error for n in names],
                        "config_id": current.id}}


def _moves(settings: dict[str, LayerSetting], setting: LayerSetting, convention: str = "paper"
           ) -> list[tuple[str, LayerSetting]]:
    """Moves that can save cost: exact -> table; a table layer's C halved; its K halved; and, for latency, a table
    layer back to exact (a table layer can be slower than the layer it replaces)."""
    moves = []
    for name, s in settings.items():
        if not s.is_table:
            moves.append((name, setting))
            continue
        if convention == "latency":
            moves.append((name, EXACT))
        if s.codebooks > 1:
            moves.append((name, s.with_(codebooks=s.codebooks // 2, subvector=None)))
        if s.centroids > 2:
            moves.append((name, s.with_(centroids=s.centroids // 2)))
    return moves


def greedy_search(session: Session, setting: LayerSetting, min_retention: float,
                  max_storage_bytes: int | None = None, convention: str = "paper", max_evaluations: int = 400,
                  progress: Progress | None = None, images: slice | None = None) -> SearchResult:
    """Start from priority masking's best point (so never worse), then score every move that saves
    FLOPs (known from the cost model before evaluating) by accuracy lost per FLOP saved, and accept
    moves best score first while the constraints and the evaluation budget hold. `images`: judge on that
    slice of the evaluation images only (the others can then confirm the choice)."""
    judge = on_images(session, images)
    start = priority_masking(session, setting, min_retention, max_storage_bytes=max_storage_bytes,
                             progress=progress, images=images)
    points = list(start.points)
    current = start.best or session.baseline
    budget = max_evaluations
    improved = True
    while improved and budget > 0:
        improved = False
        scored = []
        for name, new in _saving_moves(session, current, setting, convention):
            if budget <= 0:
                break
            trial = _try(session, current, name, new, progress, max_evaluations - budget, max_evaluations, convention)
            budget -= 1
            points.append(trial)
            if feasible(judge(trial), min_retention, max_storage_bytes):
                saved = flops(current, convention) - flops(trial, convention)
                scored.append(((judge(current).accuracy - judge(trial).accuracy) / saved, name, new))
        for _, name, new in sorted(scored, key=lambda item: item[0]):
            if budget <= 0:
                break
            trial = _try(session, current, name, new, progress, max_evaluations - budget, max_evaluations, convention)
            budget -= 1
            points.append(trial)
            if flops(trial, convention) < flops(current, convention) and feasible(judge(trial), min_retention,
                                                                                  max_storage_bytes):
                current, improved = trial, True
    best = pick_best(points, min_retention, max_storage_bytes, convention, judge)
    return SearchResult("greedy", points, best, start.ranking)


def _try(session: Session, current: Metrics, name: str, new: LayerSetting, progress: Progress | None, done: int,
         total: int, convention: str) -> Metrics:
    """One greedy move evaluated, announced first (a view can cancel the search or let other work run here)."""
    _notify(progress, Stage.GREEDY, done, total)
    return session.apply({**current.settings, name: new}, label=f"greedy: {name} -> {_short(new)}",
                         origin=Origin.GREEDY).metrics


def _saving_moves(session: Session, current: Metrics, setting: LayerSetting,
                  convention: str) -> list[tuple[str, LayerSetting]]:
    """The moves whose configuration costs less than `current`, known before evaluating: FLOPs from the cost
    model, latency from the per-layer latency table."""
    now = flops(current, convention)
    moves = []
    for name, new in _moves(dict(current.settings), setting, convention):
        settings = {**current.settings, name: new}
        if convention == "latency":
            cost = session.latency_of(settings).total_ms
        else:
            paper, full = session.costs(settings)
            cost = (paper if convention == "paper" else full).flops
        if cost < now:
            moves.append((name, new))
    return moves


def _short(s: LayerSetting) -> str:
    return "exact" if not s.is_table else f"C={s.codebooks},K={s.centroids}"


def pareto_front(points: Iterable[Metrics], cost: str = "flops_paper") -> list[Metrics]:
    """Points not dominated in (lower cost, higher accuracy), sorted by cost: the step line of the plots."""
    def key(m: Metrics) -> float:
        return {"flops_paper": m.flops_paper, "flops_full": m.flops_full, "storage_bytes": m.paper.storage_bytes,
                "latency_ms": m.latency_ms}[cost]
    front: list[Metrics] = []
    for m in sorted(points, key=lambda m: (key(m), -m.accuracy)):
        if not front or m.accuracy > front[-1].accuracy:
            front.append(m)
    return front
