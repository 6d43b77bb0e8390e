"""Honest uncertainty for accuracies measured on a finite number of images.

An accuracy on n images is a binomial proportion: its Wilson 95% interval says where the true accuracy
plausibly lies (it stays inside [0, 1] and behaves at 0% and 100%, unlike the normal approximation).
Two configurations evaluated on the same images are compared pairwise with McNemar's exact test: only
the images exactly one of them gets right carry information, which is far more sensitive than comparing
two intervals. The wording helpers live here so the command line and the explorer say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import sqrt
from statistics import NormalDist

import numpy as np

ALPHA = 0.05
Z95 = NormalDist().inv_cdf(1 - ALPHA / 2)
TEST_NAME = "McNemar exact (two-sided binomial test on the images exactly one configuration gets right)"


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (default 95%) of the proportion correct/total."""
    if total < 1 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total >= 1, got {correct}/{total}")
    p = correct / total
    scale = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / scale
    half = z * sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / scale
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact at the ends (no rounding residue)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: the discordant pairs b and c against Binomial(b + c, 1/2)."""
    if min(b, c) < 0:
        raise ValueError(f"discordant counts must be non-negative, got {b}, {c}")
    n = b + c
    term = tail = 1  # C(n, 0), then C(n, i) for i up to min(b, c): exact integers, no overflow or rounding
    for i in range(min(b, c)):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / (1 << n))


@dataclass(frozen=True)
class Paired:
    """McNemar's test of two configurations on the same images (first = the reference)."""

    only_first: int  # images only the first configuration classifies correctly (b)
    only_second: int  # images only the second one classifies correctly (c)
    images: int
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    def verdict(self, name_test: bool = True) -> str:
        """'within noise (p=0.41, McNemar on 450 images)'; 'significant (p=0.003)' without `name_test`."""
        return verdict(self.p_value, self.images if name_test else None)

    def counts_text(self, first: str, second: str) -> str:
        """'12 images right only with exact, 5 only with this configuration': what the test rests on."""
        return f"{self.only_first:,} images right only with {first}, {self.only_second:,} only with {second}"

    def to_dict(self, first: str, second: str) -> dict[str, object]:
        """JSON record; `first` and `second` name the configurations in the discordant counts' keys."""
        return {"p_value": self.p_value, "significant": self.significant, "alpha": ALPHA, "images": self.images,
                f"only_{first}_correct": self.only_first, f"only_{second}_correct": self.only_second,
                "test": TEST_NAME}


def paired(first: np.ndarray, second: np.ndarray) -> Paired:
    """Compare per-image correctness (boolean arrays over the same images in the same order)."""
    if first.shape != second.shape:
        raise ValueError(f"paired comparison needs the same images, got {first.shape} and {second.shape}")
    b = int(np.count_nonzero(first & ~second))
    c = int(np.count_nonzero(~first & second))
    return Paired(b, c, len(first), mcnemar_p(b, c))


def verdict_word(p_value: float) -> str:
    """'significant' or 'within noise': a verdict where there is no room for its p-value."""
    return "significant" if p_value < ALPHA else "within noise"


def verdict(p_value: float, images: int | None = None) -> str:
    """'within noise (p=0.41, McNemar on 450 images)' or 'significant (p=0.003, …)'; the test unnamed without
    `images` (where the page names it once)."""
    word = verdict_word(p_value)
    test = f", McNemar on {images:,} images" if images else ""
    return f"{word} ({p_text(p_value)}{test})"


def p_text(p: float) -> str:
    """'p=0.41', 'p=0.003', 'p<0.001'; never rounded across the 0.05 threshold."""
    if p < 0.001:
        return "p<0.001"
    text = f"{p:.2g}"
    if (float(text) < ALPHA) != (p < ALPHA):
        text = f"{p:.3g}"
    return f"p={text}"


def range_text(low: float, high: float) -> str:
    """'90.6-91.7%': an interval of proportions, to 0.1% (finer is false precision on thousands of images)."""
    return f"{100 * low:.1f}-{100 * high:.1f}%"


def interval_text(low: float, high: float) -> str:
    """'95% CI 90.6-91.7%'."""
    return f"95% CI {range_text(low, high)}"


def accuracy_text(correct: int, total: int, decimals: int = 1) -> str:
    """'91.2% (95% CI 90.6-91.7%, 10,000 images)': the accuracy as measured (`decimals`), its interval to 0.1%."""
    return f"{100 * correct / total:.{decimals}f}% ({interval_text(*wilson(correct, total))}, {total:,} images)"
