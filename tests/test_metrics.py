"""compare_logits, log_softmax, topk, nll and logsumexp against float64 numpy
references written directly from the DESIGN definitions.

Tolerances: the core takes exp/log in float32 (<= 4 ulp) and sums in float64,
so log-sum-exp, entropy and NLL agree to 1e-6 absolute + 1e-6 relative; KL and
JS to 1e-6 absolute + 1e-5 relative (the C++ tests pin KL on close rows to
1e-4 relative at KL ~ 1e-10); 1 - cosine to 1e-6 relative; margins, indices, ranks, counts
and overlaps exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import logitparity as lp

NINF = -np.inf


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (NaN kept)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def ref_row(a: np.ndarray, b: np.ndarray, target: int | None, ks=(1, 5, 10)) -> dict:
    """DESIGN's definitions for one row pair, in float64."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    out = {}
    bad_a = int(np.sum(np.isnan(a) | (a == np.inf)))
    bad_b = int(np.sum(np.isnan(b) | (b == np.inf)))
    out["nonfinite_ref"], out["nonfinite_cand"] = bad_a, bad_b
    if bad_a or bad_b:
        return out

    def lse(x):
        m = x.max()
        return m + math.log(np.exp(x - m).sum()) if m > NINF else NINF

    la, lb = lse(a), lse(b)
    out["lse_ref"], out["lse_cand"] = la, lb
    lpa, lpb = a - la, b - lb
    p, q = np.exp(lpa), np.exp(lpb)
    fa, fb = a > NINF, b > NINF
    both = fa & fb
    with np.errstate(invalid="ignore", divide="ignore"):
        out["kl_ref_cand"] = np.inf if np.any(fa & ~fb) else float(np.sum(p[fa] * (lpa[fa] - lpb[fa])))
        out["kl_cand_ref"] = np.inf if np.any(fb & ~fa) else float(np.sum(q[fb] * (lpb[fb] - lpa[fb])))
        m = 0.5 * (p + q)
        out["js"] = float(0.5 * np.sum(p[p > 0] * np.log(p[p > 0] / m[p > 0]))
                          + 0.5 * np.sum(q[q > 0] * np.log(q[q > 0] / m[q > 0])))
        out["entropy_ref"] = float(-np.sum(p[fa] * lpa[fa]))
        out["entropy_cand"] = float(-np.sum(q[fb] * lpb[fb]))
    x, y = a[both], b[both]
    out["cosine"] = float(x @ y / math.sqrt((x @ x) * (y @ y)))
    out["cosine_scale"] = float((x - y) @ (x - y) / (2 * math.sqrt((x @ x) * (y @ y))))
    compared = fa | fb
    one_sided = np.any(fa != fb)
    out["max_abs_logit"] = np.inf if one_sided else float(np.max(np.abs(x - y)))
    out["mean_abs_logit"] = np.inf if one_sided else float(np.sum(np.abs(x - y)) / compared.sum())
    out["max_abs_logprob"] = np.inf if one_sided else float(np.max(np.abs(lpa[both] - lpb[both])))
    order_a = np.lexsort((np.arange(a.size), -a))  # value desc, index asc
    order_b = np.lexsort((np.arange(b.size), -b))
    out["argmax_ref"], out["argmax_cand"] = int(order_a[0]), int(order_b[0])
    out["margin_ref"] = float(a[order_a[0]] - a[order_a[1]]) if a.size > 1 else np.inf
    out["margin_cand"] = float(b[order_b[0]] - b[order_b[1]]) if b.size > 1 else np.inf
    out["rank_of_ref_top1_in_cand"] = int(np.nonzero(order_b == order_a[0])[0][0])
    out["topk_common"] = {k: len(set(order_a[:k]) & set(order_b[:k])) for k in ks if k <= a.size}
    if target is not None:
        out["nll_ref"], out["nll_cand"] = la - a[target], lb - b[target]
        out["delta_p"] = math.exp(-out["nll_cand"]) - math.exp(-out["nll_ref"])
    return out


TOL = {
    "lse_ref": (1e-6, 1e-6), "lse_cand": (1e-6, 1e-6),
    "kl_ref_cand": (1e-6, 1e-5), "kl_cand_ref": (1e-6, 1e-5), "js": (1e-6, 1e-5),
"max_abs_logit": (0, 1.2e-7), "mean_abs_logit": (0, 1e-6),
    "max_abs_logprob": (1e-6, 1e-6), "entropy_ref": (1e-6, 1e-6), "entropy_cand": (1e-6, 1e-6),
    "nll_ref": (1e-6, 1e-6), "nll_cand": (1e-6, 1e-6), "delta_p": (1e-7, 1e-6),
    "margin_ref": (0, 0), "margin_cand": (0, 0),
}
EXACT = ("argmax_ref", "argmax_cand", "rank_of_ref_top1_in_cand", "nonfinite_ref", "nonfinite_cand")


def assert_row_matches(m: lp.RowMetrics, i: int, want: dict) -> None:
    """Every field of row i within TOL of the reference."""
    for name, (atol, rtol) in TOL.items():
        got = float(getattr(m, name)[i])
        if name not in want:
            assert math.isnan(got), f"{name}: got {got}, want NaN"
            continue
        w = float(want[name])
        if math.isinf(w):
            assert got == w, f"row {i} {name}: got {got}, want {w}"
        else:
            assert abs(got - w) <= atol + rtol * abs(w), f"row {i} {name}: got {got!r}, want {w!r}"
    # cosine: to 1e-6 relative of the rows' distance |a-b|^2 / (2 |a| |b|),
    # so that 1 - cosine of close rows (1e-8 and below) stays meaningful.
    got, w = float(m.cosine[i]), want.get("cosine", math.nan)
    if math.isnan(w):
        assert math.isnan(got)
    else:
        scale = abs(1 - w) + want["cosine_scale"]
        assert abs(got - w) <= 1e-12 + 1e-6 * scale, f"row {i} cosine: got {got!r}, want {w!r}"
    for name in EXACT:
        w = want.get(name, -1)
        assert int(getattr(m, name)[i]) == w, f"row {i} {name}: got {getattr(m, name)[i]}, want {w}"
    for k, ov in m.topk_common.items():
        assert int(ov[i]) == want.get("topk_common", {}).get(k, -1), f"row {i} top-{k} overlap"


def lm_logits(rng, rows, vocab):
    x = rng.normal(4.0, 2.5, size=(rows, vocab)).astype(np.float32)
    for r in range(rows):
        x[r, rng.integers(0, vocab, 4)] += rng.uniform(6, 14, 4).astype(np.float32)
    return x


@pytest.mark.parametrize("vocab", [1, 7, 16, 33, 2049, 32000])
@pytest.mark.parametrize("sigma", [0.0, 1e-3, 0.5])
def test_every_field_matches_float64_reference(vocab, sigma):
    rng = np.random.default_rng(vocab)
    a = lm_logits(rng, 5, vocab)
    b = (a + sigma * rng.normal(size=a.shape)).astype(np.float32)
    targets = rng.integers(0, vocab, 5)
    m = lp.compare_logits(a, b, targets=targets, topk=[k for k in (1, 5, 10) if k <= vocab], js=True)
    for i in range(5):
        assert_row_matches(m, i, ref_row(a[i], b[i], int(targets[i]), ks=m.topk_common))


def adversarial_rows(rng, v: int, *, far: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs that exercise every special case of the row kernel, in this
    order: ties everywhere; all -inf but one; masked on both sides; masked
    in cand only (KL(P||Q) = inf); NaN in cand; +inf in ref; shifted logits
    (same distribution); with ``far``, an unrelated row (rank by recount)."""
    base = lm_logits(rng, 1, v)[0]
    rows_a, rows_b = [], []
    rows_a.append(np.full(v, 2.0, np.float32)); rows_b.append(np.full(v, 2.0, np.float32))
    x = np.full(v, NINF, np.float32); x[17] = 3.0
    y = np.full(v, NINF, np.float32); y[17] = -5.0
    rows_a.append(x); rows_b.append(y)
    x = base.copy(); x[::3] = NINF
    y = (base + 0.01).astype(np.float32); y[::3] = NINF
    rows_a.append(x); rows_b.append(y)
    y = base.copy(); y[5] = NINF
    rows_a.append(base.copy()); rows_b.append(y)
    y = base.copy(); y[9] = np.nan
    rows_a.append(base.copy()); rows_b.append(y)
    x = base.copy(); x[3] = np.inf
    rows_a.append(x); rows_b.append(base.copy())
    rows_a.append(base.copy()); rows_b.append((base + 5.5).astype(np.float32))
    if far:
        rows_a.append(base.copy()); rows_b.append(lm_logits(rng, 1, v)[0])
    return np.stack(rows_a), np.stack(rows_b)


def test_adversarial_rows():
    a, b = adversarial_rows(np.random.default_rng(0), 300)
    targets = np.array([0, 17, 1, 2, 4, 4, 8])
    m = lp.compare_logits(a, b, targets=targets, js=True)
    for i in range(len(a)):
        assert_row_matches(m, i, ref_row(a[i], b[i], int(targets[i]), ks=(1, 5, 10)))
    assert m.kl_ref_cand[3] == np.inf and math.isfinite(m.kl_cand_ref[3])
    assert m.kl_ref_cand[6] == pytest.approx(0, abs=1e-12)  # shift-invariant
    assert m.nonfinite_cand[4] == 1 and m.nonfinite_ref[5] == 1
    assert np.isnan(m.kl_ref_cand[4]) and m.argmax_ref[4] == -1 and m.topk_common[5][4] == -1


def test_identical_rows_give_exact_zeros():
    rng = np.random.default_rng(3)
    a = lm_logits(rng, 8, 5000)
    m = lp.compare_logits(a, a.copy(), js=True)
    for name in ("kl_ref_cand", "kl_cand_ref", "js", "max_abs_logit", "mean_abs_logit", "max_abs_logprob"):
        assert np.all(getattr(m, name) == 0.0), name
    assert np.all(m.rank_of_ref_top1_in_cand == 0) and np.all(m.topk_common[10] == 10)


@pytest.mark.parametrize("ref_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("cand_dtype", ["float32", "float16", "bfloat16"])
def test_storage_dtypes(ref_dtype, cand_dtype):
    rng = np.random.default_rng(11)
    a32 = lm_logits(rng, 3, 1000)
    b32 = (a32 + 0.05 * rng.normal(size=a32.shape)).astype(np.float32)

    def store(x, dt):
        if dt == "bfloat16":
            bits = _bf16_bits(x)
            return bits, True, _bf16_values(bits)
        y = x.astype(dt)
        return y, False, y.astype(np.float32)

    a, a_bf, a_val = store(a32, ref_dtype)
    b, b_bf, b_val = store(b32, cand_dtype)
    m = lp.compare_logits(a, b, ref_bf16=a_bf, cand_bf16=b_bf, targets=[1, 2, 3], js=True)
    for i in range(3):
        assert_row_matches(m, i, ref_row(a_val[i], b_val[i], i + 1))


def test_torch_tensors_zero_copy_and_bf16():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 6, 777, generator=g) * 3
    b = a + 0.01 * torch.randn(2, 6, 777, generator=g)
    m = lp.compare_logits(a, b.to(torch.bfloat16), targets=torch.zeros(2, 6, dtype=torch.long), js=True)
    assert m.shape == (2, 6) and len(m) == 12
    b_vals = b.to(torch.bfloat16).float().numpy().reshape(12, 777)
    a_np = a.numpy().reshape(12, 777)
    for i in range(12):
        assert_row_matches(m, i, ref_row(a_np[i], b_vals[i], 0))
    # torch's own KL as a second oracle
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(b.to(torch.bfloat16).double(), -1),
        torch.log_softmax(a.double(), -1), log_target=True, reduction="none").sum(-1)
    np.testing.assert_allclose(m.kl_ref_cand, kl.reshape(-1).numpy(), rtol=1e-5, atol=1e-7)


def test_strided_and_non_contiguous_inputs():
    rng = np.random.default_rng(5)
    big = lm_logits(rng, 10, 900)
    a = big[::2, :700]           # row stride 900, partial rows
    b = np.asfortranarray(big[1::2, :700])  # last dim not contiguous: copied
    m = lp.compare_logits(a, b, js=True)
    for i in range(5):
        assert_row_matches(m, i, ref_row(a[i], b[i], None))


def test_thread_count_and_batching_are_bitwise_invariant():
    rng = np.random.default_rng(9)
    a = lm_logits(rng, 33, 3001)
    b = (a + 0.1 * rng.normal(size=a.shape)).astype(np.float32)
    t = rng.integers(0, 3001, 33)
    base = lp.compare_logits(a, b, targets=t, threads=1, js=True)
    for threads in (2, 5):
        other = lp.compare_logits(a, b, targets=t, threads=threads, js=True)
        for name in lp.metrics.FIELDS:
            assert getattr(base, name).tobytes() == getattr(other, name).tobytes(), name
    part = lp.compare_logits(a[7:20], b[7:20], targets=t[7:20], threads=3, js=True)
    for name in lp.metrics.FIELDS:
        assert getattr(base, name)[7:20].tobytes() == getattr(part, name).tobytes(), name


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 4),
    vocab=st.integers(1, 300),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    sigma=st.sampled_from([0.0, 1e-3, 1.0]),
    dtype=st.sampled_from(["float32", "float16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_reference(rows, vocab, scale, sigma, dtype, seed):
    rng = np.random.default_rng(seed)
    a = (scale * rng.normal(size=(rows, vocab))).astype(dtype)
    b = (a.astype(np.float32) + sigma * rng.normal(size=(rows, vocab))).astype(dtype)
    m = lp.compare_logits(a, b, topk=[1], js=True)
    for i in range(rows):
        want = ref_row(a[i].astype(np.float32), b[i].astype(np.float32), None, ks=(1,))
        assert_row_matches(m, i, want)
        assert m.kl_ref_cand[i] >= -1e-9 and m.js[i] >= -1e-9  # non-negative up to rounding
        assert m.js[i] <= math.log(2) + 1e-6


def test_log_softmax_logsumexp_nll_topk():
    rng = np.random.default_rng(2)
    x = lm_logits(rng, 6, 4099)
    x[1, ::2] = NINF
    x64 = x.astype(np.float64)
    m = x64.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(x64 - m).sum(axis=1, keepdims=True)))[:, 0]
    np.testing.assert_allclose(lp.logsumexp(x), lse, rtol=1e-6, atol=1e-6)
    ls = lp.log_softmax(x)
    assert ls.dtype == np.float32 and ls.shape == x.shape
    fin = np.isfinite(x)
    np.testing.assert_allclose(ls[fin], (x64 - lse[:, None])[fin], rtol=1.2e-7, atol=2e-6)
    assert np.all(ls[~fin] == NINF)
    t = rng.integers(0, 4099, 6)
    t[1] = 2  # a masked token (even index in row 1): NLL = +inf
    got = lp.nll(x, t)
    want = lse - x64[np.arange(6), t]
    assert got[1] == np.inf
    np.testing.assert_allclose(got[[0, 2, 3, 4, 5]], want[[0, 2, 3, 4, 5]], rtol=1e-6, atol=1e-6)
    v, i = lp.topk(x, 7)
    order = np.lexsort((np.tile(np.arange(4099), (6, 1)), -x), axis=1)[:, :7]
    np.testing.assert_array_equal(i, order)
    np.testing.assert_array_equal(v, np.take_along_axis(x, order, 1))
    # ties go to the lower index
    v, i = lp.topk(np.zeros((1, 10), np.float32), 3)
    assert i.tolist() == [[0, 1, 2]]
    # 1-D input keeps its shape
    assert lp.logsumexp(x[0]).shape == () and lp.topk(x[0], 2)[1].shape == (2,)


def test_summary_statistics():
    rng = np.random.default_rng(4)
    a = lm_logits(rng, 50, 200)
    b = (a + 0.2 * rng.normal(size=a.shape)).astype(np.float32)
    m = lp.compare_logits(a, b, js=True)
    s = m.summary()
    kl = m.kl_ref_cand
    d = s.fields["kl_ref_cand"]
    assert d.n == 50
    assert d.mean == pytest.approx(kl.mean(), rel=1e-12)
    assert d.se == pytest.approx(kl.std(ddof=1) / math.sqrt(50), rel=1e-12)
    assert d.p99 == pytest.approx(np.percentile(kl, 99), rel=1e-12)
    r = s.rates["same_top1"]
    k = int((m.argmax_ref == m.argmax_cand).sum())
    assert (r.k, r.n) == (k, 50)
    assert r.se == pytest.approx(math.sqrt(k / 50 * (1 - k / 50) / 50))
    md = s.to_markdown()
    assert "kl_ref_cand | ↓" in md and "same_top1" in md
    assert "RowMetrics(rows=50" in repr(m)


# One test per error message.
def test_error_vocab_mismatch_mentions_tokenizer_and_padding():
    with pytest.raises(ValueError, match=r"same vocab size.*49152 and 49280.*tokenizer.*padded"):
        lp.compare_logits(np.zeros((2, 49152), np.float32), np.zeros((2, 49280), np.float32))


def test_error_row_mismatch():
    with pytest.raises(ValueError, match=r"same number of rows, got 2 and 3"):
        lp.compare_logits(np.zeros((2, 10), np.float32), np.zeros((3, 10), np.float32))


def test_error_empty():
    with pytest.raises(ValueError, match=r"ref is empty \(shape \(0, 10\)\)"):
        lp.compare_logits(np.zeros((0, 10), np.float32), np.zeros((0, 10), np.float32))


def test_error_scalar():
    with pytest.raises(ValueError, match="at least one dimension"):
        lp.compare_logits(np.float32(1.0), np.float32(1.0))


def test_error_unsupported_dtype_names_fix():
    with pytest.raises(TypeError, match=r"ref must be float32, float16 or bfloat16.*got float64.*astype\(np.float32\)"):
        lp.compare_logits(np.zeros((2, 10)), np.zeros((2, 10), np.float32))


def test_error_torch_int_tensor():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"cand must be float32, float16 or bfloat16, got torch.int64"):
        lp.compare_logits(torch.zeros(2, 10), torch.zeros(2, 10, dtype=torch.long))


def test_error_uint16_without_bf16_flag():
    with pytest.raises(TypeError, match="pass bf16=True"):
        lp.compare_logits(np.zeros((2, 10), np.uint16), np.zeros((2, 10), np.float32))


def test_error_non_numeric_objects():
    with pytest.raises(TypeError, match=r"ref must be a numpy array or torch tensor of logits, got a list"):
        lp.compare_logits([[1.0, 2.0]], np.zeros((1, 2), np.float32))
    with pytest.raises(TypeError, match=r"got str"):
        lp.compare_logits("logits", np.zeros((1, 2), np.float32))


def test_error_targets_out_of_range():
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\).*got 10 at row 1"):
        lp.compare_logits(np.zeros((2, 10), np.float32), np.zeros((2, 10), np.float32), targets=[0, 10])


def test_error_targets_wrong_count():
    with pytest.raises(ValueError, match=r"one token id per row \(2 rows"):
        lp.compare_logits(np.zeros((2, 10), np.float32), np.zeros((2, 10), np.float32), targets=[0])


def test_error_targets_not_integer():
    with pytest.raises(TypeError, match="integer token ids"):
        lp.compare_logits(np.zeros((2, 10), np.float32), np.zeros((2, 10), np.float32), targets=[0.5, 1.0])


@pytest.mark.parametrize("k", [0, 11, 65])
def test_error_topk_range(k):
    v = 10 if k != 65 else 100
    with pytest.raises(ValueError, match=rf"topk must be in \[1, {min(64, v)}\].*got {k}"):
        lp.compare_logits(np.zeros((1, v), np.float32), np.zeros((1, v), np.float32), topk=[k])


@pytest.mark.parametrize("good, bad", [(1, True), (5, 5.0), ((1, 5), (True, 5)), ((1, 5), (1, 5.0))])
def test_error_topk_not_int_after_an_equal_int(good, bad):
    # topk lists are remembered per (topk, vocab); True == 1 and 5.0 == 5 as
    # keys, so a remembered int must not let them through.
    z = np.zeros((1, 10), np.float32)
    lp.compare_logits(z, z, topk=good)
    with pytest.raises(TypeError, match="topk must hold ints"):
        lp.compare_logits(z, z, topk=bad)


def test_row_metrics_field_arrays():
    # Float fields are views of the core's array, integer fields int64 copies,
    # contiguous per field; both against the core's own columns.
    rng = np.random.default_rng(3)
    a = rng.standard_normal((7, 50)).astype(np.float32)
    b = a + 0.1 * rng.standard_normal((7, 50)).astype(np.float32)
    from logitparity import _core

    fields, names, overlap = _core.compare_rows(a, False, b, False, None, [1, 5], False, 1)
    m = lp.compare_logits(a, b, topk=(1, 5), threads=1)
    for i, name in enumerate(names):
        got = getattr(m, name)
        if name in lp.metrics.INT_FIELDS:
            assert got.dtype == np.int64 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, fields[:, i].astype(np.int64))
        else:
            assert got.dtype == np.float64
            np.testing.assert_array_equal(got, fields[:, i])
    np.testing.assert_array_equal(m.topk_common[5], overlap[:, 1])


def test_error_topk_function_k():
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\] \(the vocab size\), got 11"):
        lp.topk(np.zeros((1, 10), np.float32), 11)


def test_error_threads():
    with pytest.raises(ValueError, match="threads must be a positive int or None"):
        lp.compare_logits(np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32), threads=0)


def test_error_threads_above_range():
    hi = lp.metrics._core().max_threads()
    with pytest.raises(ValueError, match=rf"threads must be in \[1, {hi}\] \(at most 4x the .* cores here, or 64\), got 1000000; pass None"):
        lp.compare_logits(np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32), threads=10**6)


def test_error_core_threads_out_of_range():
    from logitparity import _core

    z = np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match=r"threads must be in \[0, \d+\] \(0 = all \d+ cores; at most 4x the cores or 64\), got -1"):
        _core.compare_rows(z, False, z, False, None, [1], False, -1)


def test_error_leading_shapes_differ():
    with pytest.raises(ValueError, match=r"same leading shape .*got \(2, 3\) and \(3, 2\); rows are compared by position"):
        lp.compare_logits(np.zeros((2, 3, 8), np.float32), np.zeros((3, 2, 8), np.float32))


def test_leading_ones_and_one_dim_rows_match():
    rng = np.random.default_rng(12)
    a = lm_logits(rng, 5, 64)
    m = lp.compare_logits(a[None], a + 0.5)  # [1, 5, V] vs [5, V]
    assert m.shape == (1, 5) and np.all(np.abs(m.kl_ref_cand) < 1e-12)


def test_error_unsigned_targets_that_would_wrap():
    t = np.array([0, 2**64 - 1], dtype=np.uint64)  # -1 as int64: would mean "no target"
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\).*got 18446744073709551615 at row 1 \(unsigned uint64: -1 for none needs a signed dtype\)"):
        lp.compare_logits(np.zeros((2, 10), np.float32), np.zeros((2, 10), np.float32), targets=t)


def test_unsigned_targets_in_range_are_used():
    rng = np.random.default_rng(13)
    a = lm_logits(rng, 2, 50)
    m = lp.compare_logits(a, a, targets=np.array([3, 7], dtype=np.uint32))
    assert m.nll_ref[1] == pytest.approx(ref_row(a[1], a[1], 7)["nll_ref"], rel=1e-6)


def test_broadcast_and_stride0_rows_are_copied():
    rng = np.random.default_rng(14)
    row = lm_logits(rng, 1, 300)[0]
    b = (lm_logits(rng, 4, 300)).astype(np.float32)
    a = np.broadcast_to(row, (4, 300))  # row stride 0
    assert a.strides[0] == 0
    m = lp.compare_logits(a, b, js=True)
    for i in range(4):
        assert_row_matches(m, i, ref_row(row, b[i], None))
    # stride 0 along the vocabulary (a constant row) and a broadcast 3-D view
    c = np.broadcast_to(b[:, :1], (4, 300))
    m2 = lp.compare_logits(c, b, js=True)
    for i in range(4):
        assert_row_matches(m2, i, ref_row(np.full(300, b[i, 0], np.float32), b[i], None))
    d = np.broadcast_to(row, (2, 2, 300))
    m3 = lp.compare_logits(d, b.reshape(2, 2, 300))
    assert m3.shape == (2, 2)
    np.testing.assert_array_equal(m3.kl_ref_cand.reshape(-1), m.kl_ref_cand)


def test_torch_expanded_rows_are_copied():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(15)
    row = torch.from_numpy(lm_logits(rng, 1, 200))
    b = torch.from_numpy(lm_logits(rng, 3, 200))
    m = lp.compare_logits(row.expand(3, 200), b, js=True)
    for i in range(3):
        assert_row_matches(m, i, ref_row(row[0].numpy(), b[i].numpy(), None))


def test_error_nll_needs_targets_in_range():
    with pytest.raises(ValueError, match=r"targets must be in \[0, 4\) for nll, got -1"):
        lp.nll(np.zeros((2, 4), np.float32), [0, -1])


def test_log_softmax_in_place_matches_out_of_place():
    rng = np.random.default_rng(8)
    x = lm_logits(rng, 3, 1001)
    want = lp.log_softmax(x)
    y = x.copy()
    assert lp.log_softmax(y, inplace=True) is y
    np.testing.assert_array_equal(y, want)
    with pytest.raises(TypeError, match="inplace=True needs a non-empty, writeable, C-contiguous float32"):
        lp.log_softmax(x.astype(np.float16), inplace=True)


def test_js_is_opt_in_and_changes_nothing_else():
    rng = np.random.default_rng(12)
    a = lm_logits(rng, 4, 3000)
    b = (a + 0.1 * rng.normal(size=a.shape)).astype(np.float32)
    off = lp.compare_logits(a, b)
    on = lp.compare_logits(a, b, js=True)
    assert np.all(np.isnan(off.js)) and np.all(on.js > 0)
    for name in lp.metrics.FIELDS:
        if name != "js":
            assert getattr(off, name).tobytes() == getattr(on, name).tobytes(), name
