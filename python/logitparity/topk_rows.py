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

__all__ = ["TopRows", "sorted_top", "top_from_full", "topk_row_metrics"]


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
    u = np.sort(np.concatenate([a.indices, b.indices], axis=1), axis=1)
    dup = np.zeros_like(u, dtype=bool)
    dup[:, 1:] = u[:, 1:] == u[:, :-1]
    u = np.where(dup | (u >= v), -1, u)
    lpa, ka = _known_logprobs(a, u)
    lpb, kb = _known_logprobs(b, u)
    both = ka & kb & (u >= 0)
    lpa_b = np.where(both, lpa, -np.inf)
    lpb_b = np.where(both, lpb, -np.inf)
    ta, tb = _tail_mass(a, lpa_b), _tail_mass(b, lpb_b)
    kl_ab, kl_ba, js = _bucket_divergences(lpa_b, lpb_b, ta, tb)
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
        lse_ref=a.lse.astype(np.float64), lse_cand=b.lse.astype(np.float64),
        kl_ref_cand=fl(kl_ab), kl_cand_ref=fl(kl_ba), js=fl(js), cosine=nan.copy(),
        max_abs_logit=fl(max_abs_logit), mean_abs_logit=nan.copy(), max_abs_logprob=fl(max_abs_logprob),
        entropy_ref=nan.copy(), entropy_cand=nan.copy(), margin_ref=_margin(a.values), margin_cand=_margin(b.values),
        nll_ref=nll_a, nll_cand=nll_b, delta_p=fl(delta_p),
        argmax_ref=arg_a.astype(np.int64), argmax_cand=arg_b.astype(np.int64),
        rank_of_ref_top1_in_cand=rank, nonfinite_ref=nf_a, nonfinite_cand=nf_b,
        topk_overlap=overlap, shape=(n,),
    )


def _margin(values: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit of rows sorted descending (NaN when K = 1)."""
    if values.shape[1] < 2:
        return np.full(values.shape[0], np.nan)
    return values[:, 0] - values[:, 1]


def _nonfinite(values: np.ndarray) -> np.ndarray:
    """NaN and +inf entries per row."""
    return (np.isnan(values) | np.isposinf(values)).sum(-1).astype(np.int64)
