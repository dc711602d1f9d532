"""The activation-statistics bindings against float64 numpy: difference sums
of two [rows, width] tensors (fp32/fp16/bf16, NaN, inf), their merge, and
the distribution accumulator (moments, extremes, fractions, per-channel
max, quantiles within the stated bound)."""

from __future__ import annotations

import numpy as np
import pytest

from logitparity import _core
from logitparity.dump import bf16_to_float32, float32_to_bf16_bits

F = list(_core.DIFF_FIELDS)


def _as(x: np.ndarray, dtype: str):
    if dtype == "fp32":
        return x.astype(np.float32), False, x.astype(np.float32).astype(np.float64)
    if dtype == "fp16":
        h = x.astype(np.float16)
        return h, False, h.astype(np.float64)
    bits = float32_to_bf16_bits(x.astype(np.float32))
    return bits, True, bf16_to_float32(bits).astype(np.float64)


@pytest.mark.parametrize("da,db", [("fp32", "fp32"), ("fp32", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")])
def test_activation_diff_matches_float64(da, db):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 577)).astype(np.float32)
    b = a + 0.01 * rng.normal(size=a.shape).astype(np.float32)
    a[2, 5] = np.nan
    b[3, 7] = np.inf
    A, abf, a64 = _as(a, da)
    B, bbf, b64 = _as(b, db)
    per_row, total = _core.activation_diff(A, abf, B, bbf, 2)
    ok = np.isfinite(a64) & np.isfinite(b64)
    x, y = np.where(ok, a64, 0), np.where(ok, b64, 0)
    d = y - x
    for r in range(7):
        got = dict(zip(F, per_row[r]))
        assert got["rel_l2"] == pytest.approx(np.sqrt((d[r] ** 2).sum() / (x[r] ** 2).sum()), rel=1e-12)
        assert got["cosine"] == pytest.approx((x[r] * y[r]).sum() / np.sqrt((x[r] ** 2).sum() * (y[r] ** 2).sum()),
                                              rel=1e-12)
        assert got["max_abs"] == np.abs(d[r]).max()
        assert got["nonfinite_ref"] == (~np.isfinite(a64[r])).sum()
        assert got["nonfinite_cand"] == (~np.isfinite(b64[r])).sum()
        assert got["count"] == ok[r].sum()
    t = dict(zip(F, total))
    assert t["sqnr_db"] == pytest.approx(10 * np.log10((x ** 2).sum() / (d ** 2).sum()), rel=1e-12)
    # Merging the rows again gives the same totals.
    np.testing.assert_array_equal(_core.merge_diff(per_row), total)


def test_activation_diff_errors():
    a = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"reference and candidate activations must have the same shape, got "
                                         r"\(2, 4\) and \(2, 3\)"):
        _core.activation_diff(a, False, a[:, :3].copy(), False, 1)
    with pytest.raises(ValueError, match=r"parts must be \[k, 11\] rows of DIFF_FIELDS"):
        _core.merge_diff(np.zeros((2, 3)))


def test_distribution_accumulator_against_numpy():
    rng = np.random.default_rng(1)
    x = (3.0 + rng.standard_t(4, size=(300, 96))).astype(np.float32)
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = np.nan, np.inf, -np.inf, 0.0
    acc = _core.DistributionAccumulator(96)
    acc.add(x[:100], False)
    other = _core.DistributionAccumulator(96)
    other.add(x[100:], False)
    acc.merge(other)
    f = x[np.isfinite(x)].astype(np.float64)
    assert acc.count == x.size and acc.finite == f.size and acc.nans == 1 and acc.infs == 2 and acc.zeros == 1
    assert acc.mean == pytest.approx(f.mean(), rel=1e-13)
    assert acc.variance == pytest.approx(f.var(), rel=1e-11)
    z = (f - f.mean()) / f.std()
    assert acc.skewness == pytest.approx((z ** 3).mean(), rel=1e-9)
    assert acc.kurtosis == pytest.approx((z ** 4).mean(), rel=1e-9)
    assert acc.min == f.min() and acc.max == f.max()
    np.testing.assert_array_equal(acc.channel_max_abs, np.nanmax(np.where(np.isfinite(x), np.abs(x), 0), axis=0))
    srt = np.sort(np.abs(f))
    for q in (0.99, 0.999, 0.9999):
        exact = srt[int(np.ceil(q * f.size - 1e-9)) - 1]
        assert _core.exact_abs_quantiles(x, False, [q])[0] == exact
        assert abs(acc.abs_quantile(q) - exact) <= 2.0 ** -(_core.ABS_HIST_MANTISSA_BITS + 1) * exact
    assert acc.abs_histogram.sum() == f.size


def test_distribution_accumulator_bf16_and_errors():
    x = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
    acc = _core.DistributionAccumulator(4)
    acc.add(float32_to_bf16_bits(x), True)
    assert acc.mean == pytest.approx(0.625) and acc.max == 3.0
    with pytest.raises(ValueError, match=r"block has 3 channels, the accumulator 4"):
        acc.add(x[:, :3].copy(), False)
    with pytest.raises(ValueError, match=r"cannot merge an accumulator of 5 channels into one of 4"):
        acc.merge(_core.DistributionAccumulator(5))
    with pytest.raises(ValueError, match=r"quantile q must be in \(0, 1\]"):
        acc.abs_quantile(0.0)
    with pytest.raises(ValueError, match=r"channels must be >= 1"):
        _core.DistributionAccumulator(0)
