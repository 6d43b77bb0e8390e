"""Wilson intervals and McNemar's exact test against published values and scipy; the shared wording."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from tabconv.stats import accuracy_text, interval_text, mcnemar_p, p_text, paired, range_text, verdict, wilson


@pytest.mark.parametrize(("correct", "total", "low", "high"), [
    (45, 50, 0.7864, 0.9565),  # Newcombe (1998), and every textbook table of the Wilson interval
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (9120, 10000, 0.9063, 0.9174),
])
def test_wilson_matches_known_intervals(correct: int, total: int, low: float, high: float) -> None:
    got = wilson(correct, total)
    assert got == pytest.approx((low, high), abs=5e-5)
    assert 0.0 <= got[0] <= correct / total <= got[1] <= 1.0


def test_wilson_is_exact_at_the_ends_and_refuses_impossible_counts() -> None:
    assert wilson(0, 7)[0] == 0.0 and wilson(7, 7)[1] == 1.0
    for correct, total in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            wilson(correct, total)


@pytest.mark.parametrize(("b", "c"), [(1, 0), (5, 12), (14, 3), (3, 3), (100, 130), (2000, 2150), (0, 9)])
def test_exact_mcnemar_is_the_two_sided_binomial_test(b: int, c: int) -> None:
    assert mcnemar_p(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-12)


def test_exact_mcnemar_by_hand() -> None:
    assert mcnemar_p(0, 0) == 1.0  # no discordant image: no evidence of any difference
    assert mcnemar_p(0, 5) == 2 / 32  # 2 * P(X <= 0), X ~ Binomial(5, 1/2)
    assert mcnemar_p(1, 5) == 2 * (1 + 6) / 64
    assert mcnemar_p(0, 6) == mcnemar_p(6, 0) == 2 / 64


def test_paired_counts_discordant_images_and_says_whether_it_is_noise() -> None:
    first = np.array([True] * 40 + [False] * 5 + [True] * 2 + [False] * 3)
    second = np.array([True] * 40 + [True] * 5 + [False] * 2 + [False] * 3)
    result = paired(first, second)
    assert (result.only_first, result.only_second, result.images) == (2, 5, 50)
    assert result.p_value == pytest.approx(binomtest(2, 7, 0.5).pvalue) and not result.significant
    assert result.verdict() == f"within noise ({p_text(result.p_value)}, McNemar on 50 images)" == \
        "within noise (p=0.45, McNemar on 50 images)"
    assert result.verdict(name_test=False) == "within noise (p=0.45)"
    assert result.counts_text("exact", "#7") == "2 images right only with exact, 5 only with #7"
    record = result.to_dict("exact", "this")
    assert record["only_exact_correct"] == 2 and record["only_this_correct"] == 5 and record["significant"] is False
    strong = paired(np.ones(450, bool), np.r_[np.zeros(17, bool), np.ones(433, bool)])
    assert strong.significant and strong.verdict() == "significant (p<0.001, McNemar on 450 images)"
    with pytest.raises(ValueError, match="same images"):
        paired(np.ones(3, bool), np.ones(4, bool))


def test_wording() -> None:
    assert p_text(0.41) == "p=0.41" and p_text(0.003) == "p=0.003" and p_text(1.0) == "p=1"
    assert p_text(0.0496) == "p=0.0496"  # never shown as 0.05 while significant at 0.05
    assert verdict(0.41, 450) == "within noise (p=0.41, McNemar on 450 images)"
    assert verdict(0.003) == "significant (p=0.003)"
    assert interval_text(0.9063, 0.9174) == "95% CI 90.6-91.7%" and range_text(0.5, 0.75) == "50.0-75.0%"
    assert accuracy_text(9120, 10000) == "91.2% (95% CI 90.6-91.7%, 10,000 images)"
    assert accuracy_text(306, 450, 2) == "68.00% (95% CI 63.6-72.1%, 450 images)"
