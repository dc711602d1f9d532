"""Per-token metrics between rows known only by their top-K entries (top-K
dumps, top-K baseline caches): numpy over K entries, never the vocabulary.

KL is computed over the union of both sides' stored tokens plus one tail
bucket holding the remaining mass, so it is a lower bound of the full KL (the
data-processing inequality); docs/report.md defines the bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from logitparity.metrics import RowMetrics, logsumexp, topk as _topk

__all__ = ["KlBounds", "TopRows", "exact_lse", "lse_interval", "sorted_top", "top_from_full", "topk_kl_bounds",
           "topk_row_metrics", "unknown_lse"]


@dataclasses.dataclass
class TopRows:
    """Top-K view of one side: values [n, K] logits, indices [n, K] (sorted by
    value desc, ties to the lower id), lse [n]; a top-K dump also has tail
    [n] (the stored mass outside its K tokens), a full dump has full [n, V]
    (its logits, so every token's probability is known)."""

    values: np.ndarray
    indices: np.ndarray
    lse: np.ndarray
    tail: np.ndarray | None = None
    full: np.ndarray | None = None
    bf16: bool = False


def sorted_top(values: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((indices, -values), axis=-1)
    return np.take_along_axis(values, order, -1), np.take_along_axis(indices, order, -1)


def top_from_full(rows: np.ndarray, k: int, bf16: bool, threads) -> TopRows:
    v, i = _topk(rows, k, threads=threads, bf16=bf16)
    lse = logsumexp(rows, threads=threads, bf16=bf16)
    return TopRows(v.astype(np.float64), i.astype(np.int64), lse, None, rows, bf16)


def _full_values(rows: np.ndarray, idx: np.ndarray, bf16: bool) -> np.ndarray:
    """Logits of rows at token ids idx ([n, m]) as float64."""
    g = np.take_along_axis(rows, idx, axis=1)
    if bf16:
        g = (g.astype(np.uint32) << 16).view(np.float32)
    return g.astype(np.float64)


def _known_logprobs(side: TopRows, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (log-prob at each token of u [n, m], known mask [n, m])."""
    if side.full is not None:
        return _full_values(side.full, np.maximum(u, 0), side.bf16) - side.lse[:, None], u >= 0
    hit = (u[:, :, None] == side.indices[:, None, :]) & (u[:, :, None] >= 0)
    known = hit.any(-1)
    pos = hit.argmax(-1)
    lp = np.take_along_axis(side.values, pos, axis=1) - side.lse[:, None]
    return np.where(known, lp, -np.inf), known


def _tail_mass(side: TopRows, lp_known: np.ndarray) -> np.ndarray:
    """Mass of one side outside the known buckets (lp_known: log-probs on
    them, -inf elsewhere). A top-K side adds its stored tail to its stored
    tokens that fell outside the buckets, which keeps a tiny tail exact."""
    with np.errstate(invalid="ignore"):
        inside = np.exp(lp_known).sum(-1)
        if side.full is not None:
            return np.clip(1.0 - inside, 0.0, 1.0)
        stored = np.exp(side.values - side.lse[:, None]).sum(-1)
        return np.clip(side.tail + (stored - inside), 0.0, 1.0)


def _bucket_divergences(lp: np.ndarray, lq: np.ndarray, tp: np.ndarray, tq: np.ndarray):
    """KL(P||Q), KL(Q||P), JS on the partition {known tokens} + {tail}.

    lp, lq: [n, m] log-probs (-inf where p = 0), tp, tq: [n] tail masses.
    """
    p, q = np.exp(lp), np.exp(lq)
    P = np.concatenate([p, tp[:, None]], axis=1)
    Q = np.concatenate([q, tq[:, None]], axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        LP, LQ = np.log(P), np.log(Q)
        kl_pq = np.where(P > 0, P * (LP - LQ), 0.0).sum(-1)
        kl_qp = np.where(Q > 0, Q * (LQ - LP), 0.0).sum(-1)
        M = 0.5 * (P + Q)
        LM = np.log(M)
        js = 0.5 * (np.where(P > 0, P * (LP - LM), 0.0).sum(-1) + np.where(Q > 0, Q * (LQ - LM), 0.0).sum(-1))
    return np.maximum(kl_pq, 0.0), np.maximum(kl_qp, 0.0), np.maximum(js, 0.0)


# --------------------------------------------------------------------------
# engines that store top-K logits without the row's log-sum-exp
#
# Such a row (lse NaN while its K values are finite) fixes the probabilities
# of its K tokens only up to the normalizer L: every unstored token's logit is
# at most the K-th value, so L lies in [L_lo, L_hi] with L_lo = log Σ_K exp(v)
# (no mass outside the K) and L_hi = log(exp(L_lo) + (V − K)·exp(v_K)). With
# x = exp(−L) the bucket distribution (x·exp(v_i) on the kept tokens, 1 −
# x·Σ exp(v) for the rest) is affine in x, so each bucket KL is a convex
# function of (x_ref, x_cand): its minimum over the box (found by nested
# ternary search) is a lower bound of the full KL for every admissible
# normalizer, and its maximum sits at a corner. The minimum is what
# topk_row_metrics reports; the width (max − min) says how much the unknown
# normalizer leaves open (+inf when the other side has mass outside the
# shared buckets and the tail may be empty).

_TERNARY_STEPS = 48  # shrinks the x interval by (2/3)^48 ≈ 4e-9 of its width


def unknown_lse(side: TopRows) -> np.ndarray:
    """Rows of a top-K side whose log-sum-exp is unknown: lse NaN while every
    stored value is finite (a NaN lse with non-finite values is a NaN row)."""
    if side.full is not None:
        return np.zeros(side.values.shape[0], dtype=bool)
    return np.isnan(side.lse) & np.isfinite(side.values).all(-1)


def lse_interval(values: np.ndarray, v: int) -> tuple[np.ndarray, np.ndarray]:
    """[L_lo, L_hi] of rows of K values (sorted descending) from a
    vocabulary of v tokens (see above), float64."""
    x = np.asarray(values, np.float64)
    m = x.max(-1)
    lo = m + np.log(np.exp(x - m[:, None]).sum(-1))
    rest = v - x.shape[1]
    hi = np.logaddexp(lo, np.log(rest) + x[:, -1]) if rest > 0 else lo
    return lo, hi


@dataclasses.dataclass
class KlBounds:
    """Per row: the bucket KL both ways at its minimum and maximum over the
    admissible normalizers, and which rows had an unknown normalizer (rows
    with known normalizers have lo == hi)."""

    kl_ref_cand_lo: np.ndarray
    kl_ref_cand_hi: np.ndarray
    kl_cand_ref_lo: np.ndarray
    kl_cand_ref_hi: np.ndarray
    unknown: np.ndarray

    @property
    def width_ref_cand(self) -> np.ndarray:
        return self.kl_ref_cand_hi - self.kl_ref_cand_lo


def exact_lse(x) -> np.ndarray:
    """Row-wise log-sum-exp [n] in float64 throughout (exp included), so
    that the tail mass 1 - sum(exp(v - lse)) keeps its small values: -inf for
    an all -inf row, NaN for a row holding NaN or +inf. Rows on a GPU are
    read in place by the CUDA kernel (float64 with exact exps too); host rows
    (numpy, torch, bf16) in float64 numpy."""
    from logitparity.metrics import on_gpu

    if on_gpu(x):
        return np.asarray(logsumexp(x), np.float64)
    from logitparity.dump import logits_as_array

    x = logits_as_array(x, "fp32")
    out = np.empty(x.shape[0], np.float64)
    for start in range(0, x.shape[0], 64):  # bounded float64 temporaries
        c = x[start:start + 64].astype(np.float64)
        m = c.max(axis=1)
        bad = ~np.isfinite(m)
        m_safe = np.where(bad, 0.0, m)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            s = np.exp(c - m_safe[:, None]).sum(axis=1)
            lse = m_safe + np.log(s)
        out[start:start + 64] = np.where(bad, np.where(m == -np.inf, -np.inf, np.nan), lse)
    return out


def tail_mass(values: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """The probability outside the stored top-K, 1 - sum exp(values - lse),
    in float64 and clipped to [0, 1] (NaN stays NaN). The one definition the
    dump writer, the baseline cache and the top-K comparison share; with
    ``lse`` from exact_lse it keeps tail masses far below float32's epsilon."""
    with np.errstate(invalid="ignore", over="ignore"):
        kept = np.exp(np.asarray(values, np.float64) - np.asarray(lse, np.float64)[:, None]).sum(-1)
    return np.clip(1.0 - kept, 0.0, 1.0)


def _with_lse(side: TopRows, lse: np.ndarray) -> TopRows:
    return TopRows(side.values, side.indices, lse, tail_mass(side.values, lse), side.full, side.bf16)


def _shared_buckets(a: TopRows, b: TopRows, v: int):
    """The union of both sides' top-K ids per row (-1 for duplicates and ids
    past the common width v), each side's log-probs there, which of them both
    sides know, and each side's tail mass outside the shared buckets. ->
    (lpa, lpb, both, tail_a, tail_b); lpa/lpb are -inf where not known."""
    u = np.sort(np.concatenate([a.indices, b.indices], axis=1), axis=1)
    dup = np.zeros_like(u, dtype=bool)
    dup[:, 1:] = u[:, 1:] == u[:, :-1]
    u = np.where(dup | (u >= v), -1, u)
    lpa, ka = _known_logprobs(a, u)
    lpb, kb = _known_logprobs(b, u)
    both = ka & kb & (u >= 0)
    lpa_b, lpb_b = np.where(both, lpa, -np.inf), np.where(both, lpb, -np.inf)
    return lpa, lpb, both, _tail_mass(a, lpa_b), _tail_mass(b, lpb_b)


def _bucket_kl(a: TopRows, b: TopRows, v: int) -> tuple[np.ndarray, np.ndarray]:
    """KL both ways on the shared buckets + tail (as topk_row_metrics)."""
    lpa, lpb, both, ta, tb = _shared_buckets(a, b, v)
    kl_ab, kl_ba, _ = _bucket_divergences(np.where(both, lpa, -np.inf), np.where(both, lpb, -np.inf), ta, tb)
    return kl_ab, kl_ba


def topk_kl_bounds(a: TopRows, b: TopRows, v: int) -> KlBounds:
    """KL bounds of top-K rows whose log-sum-exp may be unknown on either
    side (module notes above). Known sides keep their lse."""
    ua, ub = unknown_lse(a), unknown_lse(b)

    def box(side: TopRows, unk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lse = np.asarray(side.lse, np.float64)
        if not unk.any():
            return lse, lse
        lo, hi = lse_interval(side.values, v)
        return np.where(unk, lo, lse), np.where(unk, hi, lse)

    la_lo, la_hi = box(a, ua)
    lb_lo, lb_hi = box(b, ub)

    def at(la: np.ndarray, lb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _bucket_kl(_with_lse(a, la), _with_lse(b, lb), v)

    corners = [at(x, y) for x in (la_lo, la_hi) for y in (lb_lo, lb_hi)]
    hi_ab = np.max([c[0] for c in corners], axis=0)
    hi_ba = np.max([c[1] for c in corners], axis=0)

    def minimize(which: int) -> np.ndarray:
        def inner(la: np.ndarray) -> np.ndarray:  # min over b's normalizer, ternary search in x = exp(-L)
            xl, xh = np.exp(-lb_hi), np.exp(-lb_lo)
            for _ in range(_TERNARY_STEPS if ub.any() else 0):
                m1, m2 = xl + (xh - xl) / 3, xh - (xh - xl) / 3
                f1, f2 = at(la, -np.log(m1))[which], at(la, -np.log(m2))[which]
                left = f1 <= f2  # the minimum lies in [xl, m2]
                xh, xl = np.where(left, m2, xh), np.where(left, xl, m1)
            return at(la, -np.log(0.5 * (xl + xh)) if ub.any() else lb_lo)[which]

        xl, xh = np.exp(-la_hi), np.exp(-la_lo)
        for _ in range(_TERNARY_STEPS if ua.any() else 0):
            m1, m2 = xl + (xh - xl) / 3, xh - (xh - xl) / 3
            f1, f2 = inner(-np.log(m1)), inner(-np.log(m2))
            left = f1 <= f2
            xh, xl = np.where(left, m2, xh), np.where(left, xl, m1)
        best = inner(-np.log(0.5 * (xl + xh)) if ua.any() else la_lo)
        # the corners are admissible too: never report more than their minimum
        return np.minimum(best, np.min([c[which] for c in corners], axis=0))

    return KlBounds(minimize(0), hi_ab, minimize(1), hi_ba, ua | ub)


def topk_row_metrics(a: TopRows, b: TopRows, targets: np.ndarray, ks: Sequence[int], v: int) -> RowMetrics:
    """RowMetrics from top-K data over token ids < v.

    The buckets are the tokens of the union of both stored sets whose
    probability both sides know (every union token when one side is full),
    plus one tail bucket holding the rest of each side's mass. KL and JS on
    this coarser partition are lower bounds on the full-vocabulary values
    (data-processing inequality). cosine, entropy and mean |delta logit| are
    NaN (undefined); max |delta logit| and max |delta log-prob| are over the
    known tokens only.
    """
    n = a.values.shape[0]
    ua, ub = unknown_lse(a), unknown_lse(b)
    bounds = topk_kl_bounds(a, b, v) if (ua.any() or ub.any()) else None
    if bounds is not None:  # the rest below uses the normalizer at the low end of the KL range
        lo_a, _ = lse_interval(a.values, v) if ua.any() else (a.lse, None)
        lo_b, _ = lse_interval(b.values, v) if ub.any() else (b.lse, None)
        a = _with_lse(a, np.where(ua, lo_a, a.lse)) if ua.any() else a
        b = _with_lse(b, np.where(ub, lo_b, b.lse)) if ub.any() else b
    lpa, lpb, both, ta, tb = _shared_buckets(a, b, v)
    kl_ab, kl_ba, js = _bucket_divergences(np.where(both, lpa, -np.inf), np.where(both, lpb, -np.inf), ta, tb)
    if bounds is not None:  # lower bounds over every admissible normalizer; JS, NLL, Δp are not defined
        unk = bounds.unknown
        kl_ab = np.where(unk, bounds.kl_ref_cand_lo, kl_ab)
        kl_ba = np.where(unk, bounds.kl_cand_ref_lo, kl_ba)
        js = np.where(unk, np.nan, js)
    any_both = both.any(-1)
    # -inf on one side only gives +inf; -inf on both sides and tokens not
    # known on both are left out (-1)
    skip = ~both | (np.isneginf(lpa) & np.isneginf(lpb))
    with np.errstate(invalid="ignore"):
        dlp = np.where(skip, -1.0, np.abs(lpa - lpb))
        dlg = np.where(skip, -1.0, np.abs((lpa + a.lse[:, None]) - (lpb + b.lse[:, None])))
    max_abs_logprob = np.where(any_both, dlp.max(-1), np.nan)
    max_abs_logit = np.where(any_both, dlg.max(-1), np.nan)
    arg_a, arg_b = a.indices[:, 0], b.indices[:, 0]
    rank = np.full(n, -1, dtype=np.int64)
    hit = b.indices == arg_a[:, None]
    rank[hit.any(-1)] = hit.argmax(-1)[hit.any(-1)]
    # target token: known on both sides?
    t = targets.astype(np.int64)
    tl = t[:, None]
    lta, kta = _known_logprobs(a, tl)
    ltb, ktb = _known_logprobs(b, tl)
    kt = (kta & ktb)[:, 0] & (t >= 0)
    nll_a = np.where(kta[:, 0] & (t >= 0), -lta[:, 0], np.nan)
    nll_b = np.where(ktb[:, 0] & (t >= 0), -ltb[:, 0], np.nan)
    delta_p = np.where(kt, np.exp(ltb[:, 0]) - np.exp(lta[:, 0]), np.nan)
    if bounds is not None:  # probabilities need the normalizer
        nll_a, nll_b = np.where(ua, np.nan, nll_a), np.where(ub, np.nan, nll_b)
        delta_p = np.where(ua | ub, np.nan, delta_p)
        max_abs_logprob = np.where(ua | ub, np.nan, max_abs_logprob)
    K = min(a.indices.shape[1], b.indices.shape[1])
    overlap = {}
    for k in ks:
        if k <= K:
            ia, ib = a.indices[:, :k], b.indices[:, :k]
            overlap[k] = (ia[:, :, None] == ib[:, None, :]).any(-1).sum(-1).astype(np.int32)
    nan = np.full(n, np.nan)
    nf_a, nf_b = _nonfinite(a.values), _nonfinite(b.values)
    bad = (nf_a > 0) | (nf_b > 0)

    def fl(x: np.ndarray) -> np.ndarray:
        return np.where(bad, np.nan, x)

    return RowMetrics(
        lse_ref=np.where(ua, np.nan, a.lse.astype(np.float64)), lse_cand=np.where(ub, np.nan, b.lse.astype(np.float64)),
        kl_ref_cand=fl(kl_ab), kl_cand_ref=fl(kl_ba), js=fl(js), cosine=nan.copy(),
        max_abs_logit=fl(max_abs_logit), mean_abs_logit=nan.copy(), max_abs_logprob=fl(max_abs_logprob),
        entropy_ref=nan.copy(), entropy_cand=nan.copy(), margin_ref=_margin(a.values), margin_cand=_margin(b.values),
        nll_ref=nll_a, nll_cand=nll_b, delta_p=fl(delta_p),
        argmax_ref=arg_a.astype(np.int64), argmax_cand=arg_b.astype(np.int64),
        rank_of_ref_top1_in_cand=rank, nonfinite_ref=nf_a, nonfinite_cand=nf_b,
        topk_common=overlap, shape=(n,),
    )


def _margin(values: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit of rows sorted descending (NaN when K = 1)."""
    if values.shape[1] < 2:
        return np.full(values.shape[0], np.nan)
    return values[:, 0] - values[:, 1]


def _nonfinite(values: np.ndarray) -> np.ndarray:
    """NaN and +inf entries per row."""
    return (np.isnan(values) | np.isposinf(values)).sum(-1).astype(np.int64)
