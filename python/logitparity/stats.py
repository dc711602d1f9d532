"""Summary statistics shared by every report: every mean with its standard
error, heavy tails with percentiles, rates with a binomial error.

These are the only places where per-row numbers become report figures, so the
definitions live here once:

- ``describe``: mean, standard error of the mean (sample std / sqrt(n), ddof=1),
  median, p90/p95/p99/p99.9 (numpy's linear interpolation), min and max over
  the finite values; NaN values are counted and excluded; +inf/-inf values are
  counted, excluded from mean/se, and make ``max``/``min`` infinite.
- ``rate``: k successes out of n, with the binomial standard error
  sqrt(p (1 - p) / n).
- ``ratio_test``: the ratio of two paired per-group sums (candidate over
  noise floor), a percentile bootstrap interval over groups (prompts) and a
  one-sided bootstrap p-value against a stated factor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["Describe", "Rate", "RatioTest", "describe", "rate", "ratio_test"]

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


@dataclasses.dataclass(frozen=True)
class Describe:
    """Distribution of one per-row figure. Values are floats (NaN when empty)."""

    n: int  # finite values used for mean/se/percentiles
    mean: float
    se: float  # standard error of the mean; NaN when n < 2
    median: float
    p90: float
    p95: float
    p99: float
    p999: float
    min: float
    max: float
    n_nan: int = 0
    n_inf: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return format_mean_se(self.mean, self.se)


@dataclasses.dataclass(frozen=True)
class Rate:
    """k successes out of n with the binomial standard error."""

    k: int
    n: int
    rate: float
    se: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{100 * self.rate:.2f}% ± {100 * self.se:.2f}% ({self.k}/{self.n})"


def describe(values: Any) -> Describe:
    """Summarise a 1-D array of per-row values (see the module docstring)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    nan = np.isnan(x)
    inf = np.isinf(x)
    finite = x[~(nan | inf)]
    n = int(finite.size)
    n_inf = int(inf.sum())
    pos_inf = bool(np.any(x[inf] > 0)) if n_inf else False
    neg_inf = bool(np.any(x[inf] < 0)) if n_inf else False
    if n == 0:
        nanv = float("nan")
        return Describe(0, nanv, nanv, nanv, nanv, nanv, nanv, nanv,
                        -math.inf if neg_inf else nanv,
                        math.inf if pos_inf else nanv,
                        int(nan.sum()), n_inf)
    mean = float(np.mean(finite))
    se = float(np.std(finite, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    q = np.percentile(finite, PERCENTILES)
    return Describe(
        n=n,
        mean=mean,
        se=se,
        median=float(q[0]),
        p90=float(q[1]),
        p95=float(q[2]),
        p99=float(q[3]),
        p999=float(q[4]),
        min=-math.inf if neg_inf else float(finite.min()),
        max=math.inf if pos_inf else float(finite.max()),
        n_nan=int(nan.sum()),
        n_inf=n_inf,
    )


def rate(k: int, n: int) -> Rate:
    """k successes out of n; rate and se are NaN when n == 0."""
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"rate needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Rate(k, n, float("nan"), float("nan"))
    p = k / n
    return Rate(k, n, p, math.sqrt(p * (1.0 - p) / n))


def format_mean_se(mean: float, se: float, digits: int = 4) -> str:
    """'1.2345e-03 ± 2.1000e-05' style, fixed significant digits."""
    if math.isnan(se):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {se:.2g}"


@dataclasses.dataclass(frozen=True)
class RatioTest:
    """R = sum(x) / sum(f) over groups, its bootstrap interval and the
    one-sided p-value of "the true ratio is at most ``factor``"."""

    ratio: float
    ci_low: float
    ci_high: float
    confidence: float  # of the two-sided interval
    p_value: float  # H0: ratio <= factor
    factor: float
    groups: int
    resamples: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ratio_test(x: Any, f: Any, *, factor: float, confidence: float = 0.95, resamples: int = 2000,
               seed: int = 0, index: Any = None) -> RatioTest:
    """x, f: per-group sums (candidate, floor), paired; f > 0. The groups are
    resampled with replacement ``resamples`` times (numpy default_rng(seed),
    or the given ``index`` matrix [resamples, groups] so several tests share
    one resampling); R* = sum(x*) / sum(f*). Interval: the (1 - c)/2 and
    (1 + c)/2 percentiles of R*. p = (1 + #{R* <= factor}) / (resamples + 1),
    the bootstrap p-value of H0 "ratio <= factor" (small p: the candidate is
    worse than factor x its floor). Deterministic for a given seed."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    f = np.asarray(f, dtype=np.float64).reshape(-1)
    if x.shape != f.shape or x.size == 0:
        raise ValueError(f"ratio_test needs two non-empty paired arrays of equal length, got {x.size} and {f.size}")
    if not np.all(f > 0):
        raise ValueError("ratio_test: every floor sum must be > 0 (regularise zero floors first)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    ratio = float(x.sum() / f.sum())
    if index is None:
        index = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    r = x[index].sum(1) / f[index].sum(1)
    # inverted_cdf: no interpolation, so an infinite ratio (a candidate with
    # infinite KL) gives an infinite bound, not inf - inf
    lo, hi = np.percentile(r, [50 * (1 - confidence), 50 * (1 + confidence)], method="inverted_cdf")
    p = (1.0 + float(np.sum(r <= factor))) / (r.size + 1.0)
    return RatioTest(ratio, float(lo), float(hi), float(confidence), p, float(factor), int(x.size),
                     int(r.size), int(seed))
