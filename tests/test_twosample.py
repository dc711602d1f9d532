"""Two-sample tests against hand-computed p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from logitparity.twosample import (js_frequencies, mann_whitney, mean_difference, paired_permutation,
                                   total_variation)


def test_paired_permutation_exact_by_hand():
    # differences 1, 2, 3: the 8 sign assignments give sums 6, 4, 2, 0, 0, -2, -4, -6;
    # |sum| >= 6 twice -> p = 2/8
    t = paired_permutation([0, 0, 0], [1, 2, 3], mean_difference(3))
    assert t.statistic == pytest.approx(2.0)
    assert t.p_value == 0.25 and t.method == "exact permutation (2^3)" and t.n == 3
    # a tie at the observed value counts: differences 1, 1 -> sums 2, 0, 0, -2 -> p = 2/4
    assert paired_permutation([0, 0], [1, 1], mean_difference(2)).p_value == 0.5
    # identical sides: every assignment ties -> p = 1
    assert paired_permutation([3, 4, 5], [3, 4, 5], mean_difference(3)).p_value == 1.0


def test_paired_permutation_monte_carlo_is_seeded_and_close_to_exact():
    d = np.array([0.5, -0.2, 1.1, 0.9, 0.3, 1.4, -0.1, 0.8, 0.6, 1.0, 0.7, 0.2, 0.4, 1.2])
    exact = paired_permutation(np.zeros_like(d), d, mean_difference(d.size), resamples=2**14)
    assert exact.method == "exact permutation (2^14)"
    # by enumeration in plain Python, independently of the vectorized code
    signs = [[1 if (k >> i) & 1 else -1 for i in range(d.size)] for k in range(2**d.size)]
    obs = abs(d.sum())
    want = sum(abs(sum(s * x for s, x in zip(sg, d))) >= obs - 1e-12 for sg in signs) / 2**d.size
    assert exact.p_value == pytest.approx(want, abs=1e-15)
    a = paired_permutation(np.zeros_like(d), d, mean_difference(d.size), resamples=4000, seed=3)
    b = paired_permutation(np.zeros_like(d), d, mean_difference(d.size), resamples=4000, seed=3)
    assert a == b and a.method == "permutation (4000 resamples)"
    assert abs(a.p_value - want) < 0.01


def test_histogram_statistics_by_hand():
    assert js_frequencies(np.array([[1.0, 0.0]]), np.array([[0.0, 3.0]]))[0] == pytest.approx(math.log(2))
    # P = (1/2, 1/2), Q = (1, 0): M = (3/4, 1/4)
    want = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + 0.5 * math.log(1 / 0.75)
    assert js_frequencies(np.array([[1.0, 1.0]]), np.array([[2.0, 0.0]]))[0] == pytest.approx(want, rel=1e-14)
    assert total_variation(np.array([[1.0, 1.0]]), np.array([[2.0, 0.0]]))[0] == pytest.approx(0.5)
    # stop reasons of 2 pairs: ref (eos, eos), cand (max, eos): TV = 1/2; the swaps give
    # TV 1/2 (pair 0 as is or swapped either way) or 0 (never): 4 assignments, all at 1/2 -> p = 1
    r = np.array([[1.0, 0.0], [1.0, 0.0]])
    c = np.array([[0.0, 1.0], [1.0, 0.0]])
    t = paired_permutation(r, c, total_variation)
    assert t.statistic == pytest.approx(0.5) and t.p_value == 1.0


def test_mann_whitney_exact_by_hand():
    # no overlap: U = 0; P(U <= 0) = 1 / C(6, 3) = 1/20 -> p = 0.1
    t = mann_whitney([1, 2, 3], [4, 5, 6])
    assert t.statistic == 0.0 and t.p_value == pytest.approx(0.1) and t.method == "exact"
    # x = 1, 3, 5 vs y = 2, 4, 6: U = 3; counts of U = 0..9 for n = m = 3 are
    # 1, 1, 2, 3, 3, 3, 3, 2, 1, 1 -> P(U <= 3) = 7/20 -> p = 0.7
    t = mann_whitney([1, 3, 5], [2, 4, 6])
    assert t.statistic == 3.0 and t.p_value == pytest.approx(0.7)
    assert mann_whitney([4, 5, 6], [1, 2, 3]).p_value == pytest.approx(0.1)  # symmetric


def test_mann_whitney_normal_approximation_with_ties_by_hand():
    # x = 1, 2, 2; y = 2, 3, 4: U = 0 + 1/2 * 2 ties = 1; mu = 4.5; the value 2 three times:
    # var = 9/12 * (7 - (27 - 3) / 30) = 4.65; z = (3.5 - 0.5) / sqrt(4.65)
    t = mann_whitney([1, 2, 2], [2, 3, 4])
    assert t.statistic == 1.0 and t.method == "normal approximation"
    z = 3.0 / math.sqrt(4.65)
    assert t.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-12)
    assert mann_whitney([2, 2], [2, 2]).p_value == 1.0  # all tied


def test_twosample_errors():
    with pytest.raises(ValueError, match=r"ref and cand must have the same shape \(one row per pair\), got \(2, 1\) and \(3, 1\)"):
        paired_permutation([1, 2], [1, 2, 3], mean_difference(2))
    with pytest.raises(ValueError, match=r"cand holds NaN or inf values; drop those pairs first"):
        paired_permutation([1, 2], [1, float("nan")], mean_difference(2))
    with pytest.raises(ValueError, match=r"resamples must be a positive int, got 0"):
        paired_permutation([1, 2], [1, 2], mean_difference(2), resamples=0)
    with pytest.raises(ValueError, match=r"mann_whitney: x and y must be finite"):
        mann_whitney([1, float("inf")], [1])
