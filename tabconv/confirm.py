"""Confirmation: a search's choice checked on test images it was not chosen on, backed off until its target holds.

A search keeps the configuration that meets its target on the images it evaluated; on other images the same
configuration usually keeps a little less (on CIFAR-10, choices that held 93% on their 1,000 search images kept
89.6-91.2% on the other 9,000). `confirm` evaluates the choice on separate confirmation images and, while the
target fails there, backs off: the table layer whose return to exact gains the most accuracy on the *search*
images goes back to exact (choosing on the confirmation images would make them search images too), and the new
choice is confirmed again. The exact network always holds, so a back-off ends.

The two sets of images are two sessions' (the CLI: the test images after the search's), or two slices of one
session's (the explorer: the halves of its evaluation images), where one evaluation serves both: a configuration's
accuracy on a slice comes from its per-image record.

With `tune`, every configuration confirmed is fine-tuned first and its fine-tuned tables are what the target is
judged on (the best rows need fine-tuning). Backing off still chooses on the untuned tables of the search images:
fine-tuning every candidate layer would cost one run per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tabconv.metrics import Metrics, Origin
from tabconv.progress import Progress, ProgressEvent, Stage
from tabconv.search import Judge, feasible, flops, on_images
from tabconv.session import Session
from tabconv.settings import EXACT

# Fine-tunes a configuration as the confirmation session evaluated it: (the fine-tuned tables on the search
# images' session, the same on the confirmation images' session).
Tune = Callable[[Metrics], tuple[Metrics, Metrics]]


@dataclass(frozen=True)
class BackOff:
    """One step back: a table layer returned to exact, and the configuration it left on both sets of images
    (fine-tuned, when the confirmation fine-tunes)."""

    layer: str
    searched: Metrics  # on the search images
    confirmed: Metrics  # on the confirmation images


@dataclass(frozen=True)
class Confirmation:
    """What the confirmation images said of a search's choice, and what backing off took."""

    min_retention: float
    chosen: Metrics  # the search's choice, on its own images
    chosen_confirmed: Metrics  # the same configuration on the confirmation images (fine-tuned, with `tune`)
    backoffs: tuple[BackOff, ...]
    chosen_tuned: Metrics | None = None  # the choice fine-tuned, on the search images (None: no fine-tuning)

    @property
    def searched(self) -> Metrics:
        """The accepted configuration on the search images."""
        if self.backoffs:
            return self.backoffs[-1].searched
        return self.chosen if self.chosen_tuned is None else self.chosen_tuned

    @property
    def confirmed(self) -> Metrics:
        """The accepted configuration on the confirmation images: what its target is judged on."""
        return self.backoffs[-1].confirmed if self.backoffs else self.chosen_confirmed


def halves(images: int) -> tuple[slice, slice] | None:
    """A session's evaluation images split for one search: choose on the first half, confirm on the second (None
    when there are too few to split)."""
    half = images // 2
    return (slice(0, half), slice(half, images)) if half else None


def confirm(search: Session, confirmation: Session, chosen: Metrics, min_retention: float,
            max_storage_bytes: int | None = None, convention: str = "paper", progress: Progress | None = None,
            search_images: slice | None = None, confirmation_images: slice | None = None,
            tune: Tune | None = None) -> Confirmation:
    """`chosen` (evaluated by `search`) on `confirmation`'s images, backed off until it meets `min_retention`
    (and the storage bound) there. Both sessions must be of the same model and calibration, so that their tables
    are the same (the confirmation session reads them from the shared cache); they may be one session judged on
    two slices of its images (`search_images`, `confirmation_images`). Every Metrics reported is as seen on its
    images (its id is the session's record of the whole configuration). With `tune`, what is confirmed (and
    accepted) is each configuration's fine-tuned tables."""
    searched, confirming = on_images(search, search_images), on_images(confirmation, confirmation_images)

    def judged(current: Metrics, label: str) -> tuple[Metrics, Metrics]:
        untuned = _on(confirmation, current, label)
        if tune is None or not current.table_layers:  # the exact network has nothing to fine-tune
            return current, confirming(untuned)
        on_search, on_confirmation = tune(untuned)
        return searched(on_search), confirming(on_confirmation)

    chosen = searched(chosen)
    chosen_tuned, confirmed = judged(chosen, "confirmation")
    first, current, steps = confirmed, chosen, []
    while not feasible(confirmed, min_retention, max_storage_bytes) and current.table_layers:
        layer, current = _costliest(search, searched, current, convention, progress, len(steps))
        now, confirmed = judged(current, f"confirmation after {len(steps) + 1} back-off(s)")
        steps.append(BackOff(layer, now, confirmed))
    return Confirmation(min_retention, chosen, first, tuple(steps), chosen_tuned if tune is not None else None)


def _on(session: Session, m: Metrics, label: str) -> Metrics:
    return session.apply(dict(m.settings), label=f"{label}: {m.label}", origin=Origin.GREEDY).metrics


def _costliest(search: Session, searched: Judge, current: Metrics, convention: str, progress: Progress | None,
               done: int) -> tuple[str, Metrics]:
    """The table layer whose return to exact gains the most accuracy on the search images (ties: the one that
    gives back the least cost), with the configuration it leaves (as seen on the search images)."""
    trials = []
    for index, layer in enumerate(current.table_layers):
        if progress:
            progress(ProgressEvent(Stage.BACK_OFF, index + 1, len(current.table_layers),
                                   f"back-off {done + 1}: trying {layer} exact"))
        trial = searched(search.apply({**current.settings, layer: EXACT}, label=f"back-off: {layer} -> exact",
                                      origin=Origin.GREEDY).metrics)
        trials.append((trial.accuracy, -flops(trial, convention), layer, trial))
    _, _, layer, trial = max(trials, key=lambda item: item[:2])
    return layer, trial
