"""Two-sample tests for behaviour drift: is the candidate's distribution of
output lengths, tokens, stop reasons or repetition the reference's?

- ``paired_permutation``: the units come in pairs (the same prompt, and in
  sampled runs the same seed, on both sides). Each unit contributes a
  feature vector on each side (a length, a histogram of tokens, a one-hot
  stop reason); the statistic is a function of the two pooled sums. Under
  the null hypothesis (both sides draw from one distribution) the two
  members of a pair are exchangeable, so the test swaps them: exactly, over
  all 2^n assignments, when 2^n <= ``resamples``, else over ``resamples``
  random assignments (seeded) with the observed one counted in, p = (1 + #)
  / (1 + resamples). A statistic counts as "at least as extreme" within a
  relative 1e-12 of the observed value, so ties from symmetric assignments
  are not lost to rounding.
- ``mann_whitney``: the unpaired rank-sum test of two samples (pooled over
  pairs); U counts x > y pairs plus one half per tie; the two-sided p-value
  is exact (the null distribution of U by counting, no ties, n·m <= 2500)
  or the normal approximation with the tie correction and a continuity
  correction of 1/2.
- Statistics of pooled sums: ``mean_difference`` (|Δ mean| of a scalar
  feature), ``js_frequencies`` (Jensen–Shannon divergence of two histograms,
  nats), ``total_variation`` (half the L1 distance of two histograms).

Written with numpy only; tests/test_twosample.py pins every p-value to a
hand-computed one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

__all__ = ["TestResult", "js_frequencies", "mann_whitney", "mean_difference", "paired_permutation",
           "total_variation"]

DEFAULT_RESAMPLES = 4096  # 2^12: exact for up to 12 pairs
_REL_TIE = 1e-12


@dataclasses.dataclass(frozen=True)
class TestResult:
    """statistic: the observed value; p_value: two-sided (a distance: large
    is extreme); method: "exact permutation (2^n)", "permutation (R
    resamples)", "exact" or "normal approximation"; n: pairs (or n + m)."""

    __test__ = False  # not a pytest class
    name: str
    statistic: float
    p_value: float
    method: str
    n: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------
# statistics of the two pooled sums (rows: assignments; columns: features)


def mean_difference(n: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """|mean(candidate) - mean(reference)| of feature 0 over n pairs."""
    return lambda r, c: np.abs(c[:, 0] - r[:, 0]) / n


def _normalize(h: np.ndarray) -> np.ndarray:
    s = h.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, h / np.where(s > 0, s, 1.0), 0.0)


def js_frequencies(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence (nats) of the normalized histograms r and c:
    ½ KL(P ‖ M) + ½ KL(Q ‖ M), M = (P + Q) / 2; 0 ≤ JS ≤ log 2."""
    p, q = _normalize(np.asarray(r, np.float64)), _normalize(np.asarray(c, np.float64))
    m = 0.5 * (p + q)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(p > 0, p * np.log(p / np.where(m > 0, m, 1.0)), 0.0)
        b = np.where(q > 0, q * np.log(q / np.where(m > 0, m, 1.0)), 0.0)
    return 0.5 * (a.sum(axis=1) + b.sum(axis=1))


def total_variation(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """½ Σ |P − Q| of the normalized histograms (a share in [0, 1])."""
    return 0.5 * np.abs(_normalize(np.asarray(r, np.float64)) - _normalize(np.asarray(c, np.float64))).sum(axis=1)


# --------------------------------------------------------------------------


def _as_units(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [pairs] or [pairs, features], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or inf values; drop those pairs first")
    return a


def paired_permutation(ref: Any, cand: Any, statistic: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
                       name: str = "", resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> TestResult:
    """The paired permutation test (module docstring). ref, cand: [pairs]
    or [pairs, features], row i the two members of pair i. statistic(R, C):
    rows of pooled reference and candidate sums -> one value per row."""
    r, c = _as_units(ref, "ref"), _as_units(cand, "cand")
    if r.shape != c.shape:
        raise ValueError(f"ref and cand must have the same shape (one row per pair), got {r.shape} and {c.shape}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    n = r.shape[0]
    obs = float(statistic(r.sum(0, keepdims=True), c.sum(0, keepdims=True))[0])
    if n == 0:
        return TestResult(name, obs, 1.0, "no pairs", 0)
    exact = n <= 30 and 2**n <= resamples
    if exact:
        swaps = ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(np.float64)
    else:
        swaps = np.random.default_rng(seed).integers(0, 2, size=(resamples, n)).astype(np.float64)
    count = 0
    tol = _REL_TIE * max(abs(obs), 1e-300)
    for lo in range(0, swaps.shape[0], 1024):  # bounded memory for wide features
        s = swaps[lo:lo + 1024]
        keep = 1.0 - s
        vals = statistic(keep @ r + s @ c, s @ r + keep @ c)
        count += int((vals >= obs - tol).sum())
    if exact:
        return TestResult(name, obs, count / swaps.shape[0], f"exact permutation (2^{n})", n)
    return TestResult(name, obs, (1 + count) / (1 + resamples), f"permutation ({resamples} resamples)", n)


def _u_counts(n: int, m: int) -> np.ndarray:
    """Number of rank arrangements giving each U = 0 .. n·m (no ties), by the
    recurrence f(n, m, u) = f(n - 1, m, u - m) + f(n, m - 1, u)."""
    # f[j][u] for the current n, j = 0..m
    prev = [np.ones(1, dtype=np.float64) for _ in range(m + 1)]  # n = 0: U = 0 only
    for i in range(1, n + 1):
        cur = [np.ones(1, dtype=np.float64)]  # m = 0
        for j in range(1, m + 1):
            out = np.zeros(i * j + 1)
            a = prev[j]  # f(i-1, j, u - j)
            out[j:j + a.size] += a
            b = cur[j - 1]  # f(i, j-1, u)
            out[:b.size] += b
            cur.append(out)
        prev = cur
    return prev[m]


def mann_whitney(x: Any, y: Any, *, name: str = "") -> TestResult:
    """Two-sided Mann–Whitney U test of samples x and y (module docstring).
    statistic: U of x (pairs x_i > y_j, ties ½)."""
    a, b = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("mann_whitney: x and y must be finite")
    n, m = a.size, b.size
    if n == 0 or m == 0:
        return TestResult(name, float("nan"), 1.0, "empty sample", n + m)
    u = float((a[:, None] > b[None, :]).sum() + 0.5 * (a[:, None] == b[None, :]).sum())
    pooled = np.concatenate([a, b])
    _, counts = np.unique(pooled, return_counts=True)
    ties = bool((counts > 1).any())
    if not ties and n * m <= 2500:
        f = _u_counts(n, m)
        total = f.sum()
        k = int(round(u))
        lo, hi = f[:k + 1].sum() / total, f[k:].sum() / total
        return TestResult(name, u, min(1.0, 2.0 * min(lo, hi)), "exact", n + m)
    mu = n * m / 2.0
    big = n + m
    var = n * m / 12.0 * ((big + 1) - float((counts**3 - counts).sum()) / (big * (big - 1)))
    if var <= 0:  # every value tied
        return TestResult(name, u, 1.0, "normal approximation", big)
    z = max(0.0, abs(u - mu) - 0.5) / math.sqrt(var)
    return TestResult(name, u, min(1.0, math.erfc(z / math.sqrt(2.0))), "normal approximation", big)
