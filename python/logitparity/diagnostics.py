"""Distribution diagnostics of one model: weights and activations per layer
and module, outlier channels, heavy tails, logit norm and entropy, the
attention-score range; and an ablation ranking of the outlier channels by
the damage their removal does (docs/stats.md).

``stats_of(model, prompts)`` runs the model once per prompt (the prefill,
batch 1, no cache) with observation sites on every decoder layer
(``capture.sites``: attention input, query/key/value after rotary embedding,
score range, o_proj input, attention output, MLP input, down_proj input, MLP
output, the layer's output) and the final norm, and accumulates each site in
a C++ ``DistributionAccumulator`` (moments merged with the Chan/Pébay
formulas, min/max, zero/NaN/inf counts, per-channel max |x|, an |x|
histogram). Weights go through the same accumulator, with exact quantiles.

``ablate(model, stats, n)`` zeroes (or clamps) each of the top ``n`` outlier
channels in turn and ranks them by the mean KL of the untouched model's
next-token distribution to the ablated one's (C++ ``compare_logits``) and by
ΔPPL on the prompts' own tokens.

Definitions (tested against float64 numpy in tests/test_diagnostics.py):

- mean, variance (population, M2/n), skewness √n·M3/M2^1.5, kurtosis
  n·M4/M2² (Pearson: 3 for a Gaussian) and the excess kurtosis (minus 3),
  min, max: over the finite values;
- ``abs_p99``, ``abs_p999``, ``abs_p9999``: nearest-rank quantiles of |x| over
  the finite values: exact for weights; for activations from the core's
  histogram, relative error at most 2⁻⁸ (``abs_quantile_rel_error_bound``);
- zero / NaN / inf fractions over every value;
- channel: a weight's output channel (a Linear weight's row, an embedding's
  or a norm's entry along the hidden width); an activation's last dimension;
- outlier channel (``OUTLIER_FACTOR`` = k): a channel whose max |x| exceeds
  k times the median over the tensor's channels of their max |x| (the peak
  of a typical channel; robust to the outlier itself, which a σ of the whole
  tensor is not: one ×50 channel of 64 inflates σ 6×), ranked by that ratio
  (``score``); its max |x| / σ is reported beside it, and (one more pass
  over the prompts, on the outlier sites only) the positions where the
  channel exceeds the cut and their most frequent tokens: over the cut at
  ``SYSTEMATIC_FRACTION`` of the positions or more it is *systematic* (an
  outlier of every token), else token-specific (such as the first token's
  massive activations);
- heavy-tailed: excess kurtosis above ``HEAVY_TAIL_EXCESS_KURTOSIS``;
- position norm: the L2 norm of each position's row, averaged over prompts
  per position index;
- logit norm and entropy per position (entropy from the core: H(softmax), nats).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from logitparity.stats import Describe, describe

__all__ = ["ABLATION_MODES", "HEAVY_TAIL_EXCESS_KURTOSIS", "OUTLIER_FACTOR", "SHIFT_FACTOR", "SYSTEMATIC_FRACTION",
           "Ablation", "AblationRow", "ChannelShift", "outlier_shift",
           "ModelStats", "Outlier", "TensorStats", "ablate", "stats_of"]

# A channel is an outlier when its max |x| exceeds this many times the
# median channel's max |x| in the same tensor. 10: in a Gaussian tensor every
# channel peaks near the same sqrt(2 ln n) sigma, so the ratio stays under 2;
# on the default model the natural outliers (down_proj inputs, the residual
# stream's massive channel) reach 500-4000 (docs/stats.md).
OUTLIER_FACTOR = 10.0
# Excess kurtosis (Pearson kurtosis - 3) above this marks a heavy tail:
# a Laplace distribution has 3, Student's t with 5 degrees of freedom 6.
HEAVY_TAIL_EXCESS_KURTOSIS = 10.0
# outlier_shift: a channel whose max |x| grew more than this many times from
# the reference to the candidate (a bf16 cast or an int8 round moves a max by
# well under 2x; a broken scale or layout by far more).
SHIFT_FACTOR = 4.0
# An outlier channel over its cut at this share of the positions or more
# is "systematic" (every token), else token-specific.
SYSTEMATIC_FRACTION = 0.5
QUANTILES = {"abs_p99": 0.99, "abs_p999": 0.999, "abs_p9999": 0.9999}
ABLATION_MODES = ("zero", "clamp")
# Sites whose channels are not features (per-head score max/min): no outliers there.
_NO_OUTLIERS = (".scores",)


def _core():
    from logitparity._native import core

    return core()


def _num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# --------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class TensorStats:
    """Distribution of one weight tensor or one activation site."""

    key: str  # parameter name, or site key (capture.sites)
    kind: str  # "weight" | "activation"
    layer: int | None
    module: str  # module kind: 'mlp', 'self_attn.o_proj', 'layer', …
    tensor: str  # 'weight', 'input', 'output', 'query', 'key', 'value', 'scores'
    shape: tuple[int, ...]
    count: int
    finite: int
    mean: float
    variance: float
    skewness: float
    kurtosis: float  # Pearson (3 for a Gaussian)
    min: float
    max: float
    abs_p99: float
    abs_p999: float
    abs_p9999: float
    quantiles: str  # "exact" or "histogram"
    zero_fraction: float
    nan_fraction: float
    inf_fraction: float
    channel_max_abs: np.ndarray
    position_norm: np.ndarray | None = None  # activations: mean L2 norm per position index

    @property
    def excess_kurtosis(self) -> float:
        return self.kurtosis - 3.0

    @property
    def std(self) -> float:
        return math.sqrt(self.variance) if self.variance == self.variance else math.nan

    @property
    def max_abs(self) -> float:
        return float(np.max(self.channel_max_abs)) if self.channel_max_abs.size else math.nan

    @property
    def heavy_tailed(self) -> bool:
        return bool(self.excess_kurtosis > HEAVY_TAIL_EXCESS_KURTOSIS)

    def to_dict(self, *, channels: bool = True) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("channel_max_abs", "position_norm")}
        d["shape"] = list(self.shape)
        d["excess_kurtosis"] = self.excess_kurtosis
        d["max_abs"] = self.max_abs
        d["heavy_tailed"] = self.heavy_tailed
        if self.quantiles == "histogram":
            d["abs_quantile_rel_error_bound"] = 2.0 ** -(_core().ABS_HIST_MANTISSA_BITS + 1)
        if channels:
            d["channel_max_abs"] = self.channel_max_abs.astype(float).tolist()
            if self.position_norm is not None:
                d["position_norm"] = self.position_norm.tolist()
        return {k: _num(v) for k, v in d.items()}


@dataclasses.dataclass(frozen=True)
class Outlier:
    """One outlier channel: where, how large, and what triggers it."""

    key: str
    kind: str  # "weight" | "activation"
    layer: int | None
    channel: int
    max_abs: float
    typical: float  # the median over the tensor's channels of their max |x|
    score: float  # max_abs / typical
    sigma_score: float  # max_abs / sigma of the whole tensor
    prompt_id: str | None = None  # activations: the prompt and position of the max
    position: int | None = None
    token: str | None = None  # that position's token, as text
    context: str | None = None  # up to 8 tokens before it and the token
    categories: tuple[str, ...] = ()  # prompt categories where the channel exceeds the cut too
    positions_over: int = 0  # activations: positions where |x_c| exceeds the cut (k x typical)
    fraction_over: float = 0.0  # that count over every position of the site
    top_tokens: tuple[tuple[str, int], ...] = ()  # the tokens most often over the cut, with their counts

    @property
    def systematic(self) -> bool:
        """Over the cut at SYSTEMATIC_FRACTION of the positions or more: a
        channel outlier of every token (what per-channel scales address),
        not a token-specific one such as the first token's massive activations."""
        return self.fraction_over >= SYSTEMATIC_FRACTION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["categories"] = list(self.categories)
        d["top_tokens"] = [list(t) for t in self.top_tokens]
        d["systematic"] = self.systematic
        return {k: _num(v) for k, v in d.items()}


@dataclasses.dataclass
class ModelStats:
    """Everything ``stats_of`` measured (see the module docstring)."""

    model: str
    dtype: str
    prompts: list[dict[str, Any]]  # id, category, positions
    positions: int
    weights: list[TensorStats]
    activations: list[TensorStats]
    outliers: list[Outlier]  # activation channels, highest score first
    weight_outliers: list[Outlier]
    attention: list[dict[str, Any]]  # per layer: path, heads, score max/min per head
    logits: dict[str, Describe]  # 'norm', 'entropy' over every position
    categories: list[dict[str, Any]]  # per prompt category
    missing_categories: list[str]
    warnings: list[str]
    outlier_factor: float
    seconds: float
    token_ids: list[list[int]] = dataclasses.field(default_factory=list, repr=False)

    def activation(self, key: str) -> TensorStats:
        for t in self.activations:
            if t.key == key:
                return t
        raise KeyError(f"no activation site {key!r}; sites: {self.activations[0].key} … {self.activations[-1].key}")

    def weight(self, name: str) -> TensorStats:
        for t in self.weights:
            if t.key == name:
                return t
        raise KeyError(f"no weight {name!r}")

    @property
    def systematic_outliers(self) -> list[Outlier]:
        """Activation outliers over the cut at SYSTEMATIC_FRACTION of the positions or more, by score."""
        return [o for o in self.outliers if o.systematic]

    @property
    def heavy_tailed(self) -> list[TensorStats]:
        return [t for t in self.weights + self.activations if t.heavy_tailed]

    def to_dict(self, *, channels: bool = True) -> dict[str, Any]:
        return {"format": "logitparity-stats", "version": "1.0", "model": self.model, "dtype": self.dtype,
                "rules": {"outlier_factor": self.outlier_factor, "outlier_rule": "channel max |x| > outlier_factor x the median channel max |x| of its tensor",
                          "heavy_tail_excess_kurtosis": HEAVY_TAIL_EXCESS_KURTOSIS,
                          "kurtosis": "Pearson n M4 / M2^2 (3 for a Gaussian); excess_kurtosis = kurtosis - 3"},
                "prompts": self.prompts, "positions": self.positions, "seconds": self.seconds,
                "missing_categories": self.missing_categories, "warnings": self.warnings,
                "outliers": [o.to_dict() for o in self.outliers],
                "weight_outliers": [o.to_dict() for o in self.weight_outliers],
                "heavy_tailed": [t.key for t in self.heavy_tailed],
                "logits": {k: v.to_dict() for k, v in self.logits.items()},
                "attention": self.attention, "categories": self.categories,
                "activations": [t.to_dict(channels=channels) for t in self.activations],
                "weights": [t.to_dict(channels=channels) for t in self.weights]}

    def to_markdown(self) -> str:
        from logitparity.report.stats import stats_markdown

        return stats_markdown(self)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        top = self.outliers[0] if self.outliers else None
        where = f"{top.key} channel {top.channel} ({top.score:.1f}x the typical channel)" if top else "none"
        return (f"ModelStats(model={self.model!r}, prompts={len(self.prompts)}, positions={self.positions}, "
                f"sites={len(self.activations)}, weights={len(self.weights)}, top outlier={where})")


# --------------------------------------------------------------------------
# Accumulation


def _tensor_stats(acc: Any, key: str, kind: str, shape: tuple[int, ...], exact: list[float] | None,
                  position_norm: np.ndarray | None = None) -> TensorStats:
    from logitparity.layers import module_kind

    n = acc.count
    layer, mod = module_kind(key.split(":")[0])
    tensor = "weight" if kind == "weight" else "output"
    if kind == "weight":
        mod = module_kind(key.rsplit(".", 1)[0])[1] if layer is not None else key.rsplit(".", 1)[0]
    elif key.endswith(":input"):
        tensor = "input"
    else:
        for t in ("query", "key", "value", "scores"):
            if key.endswith(f".self_attn.{t}"):
                tensor, mod = t, "self_attn"
    if exact is not None:
        qs = dict(zip(QUANTILES, exact))
    else:
        qs = {name: acc.abs_quantile(q) for name, q in QUANTILES.items()}
    return TensorStats(
        key=key, kind=kind, layer=layer, module=mod, tensor=tensor, shape=tuple(int(s) for s in shape),
        count=int(n), finite=int(acc.finite), mean=acc.mean, variance=acc.variance, skewness=acc.skewness,
        kurtosis=acc.kurtosis, min=acc.min, max=acc.max, quantiles="exact" if exact is not None else "histogram",
        zero_fraction=acc.zeros / n if n else math.nan, nan_fraction=acc.nans / n if n else math.nan,
        inf_fraction=acc.infs / n if n else math.nan, channel_max_abs=np.asarray(acc.channel_max_abs),
        position_norm=position_norm, **qs)


class _Site:
    """Running figures of one activation site over the prompts."""

    def __init__(self, width: int):
        self.acc = _core().DistributionAccumulator(width)
        self.width = width
        self.rows = 0
        self.norm_sum = np.zeros(0)
        self.norm_n = np.zeros(0, dtype=np.int64)
        self.prompt_max: list[np.ndarray] = []  # per prompt: channel max |x| (finite values)
        self.prompt_argmax: list[np.ndarray] = []  # per prompt: the position of that max
        self.col_max = np.full(width, -np.inf)  # signed max and min per column (finite values)
        self.col_min = np.full(width, np.inf)

    def add(self, arr: np.ndarray, bf16: bool, figures: tuple[np.ndarray, ...]):
        chan_max, chan_pos, norms, col_max, col_min = figures
        self.acc.add(arr, bf16)
        self.col_max = np.maximum(self.col_max, col_max)
        self.col_min = np.minimum(self.col_min, col_min)
        self.rows += arr.shape[0]
        if norms.size > self.norm_sum.size:
            grow = norms.size - self.norm_sum.size
            self.norm_sum = np.concatenate([self.norm_sum, np.zeros(grow)])
            self.norm_n = np.concatenate([self.norm_n, np.zeros(grow, dtype=np.int64)])
        self.norm_sum[:norms.size] += norms
        self.norm_n[:norms.size] += 1
        self.prompt_max.append(chan_max)
        self.prompt_argmax.append(chan_pos)


def _default_prompts() -> list[Any]:
    """The first prompt of each category of the default set, in file order,
    leaving out HEAVY_CATEGORIES (a 7k-token prefill; pass prompts to include it)."""
    from logitparity.prompts import HEAVY_CATEGORIES, load_prompts

    seen, out = set(HEAVY_CATEGORIES), []
    for p in load_prompts():
        if p.category not in seen:
            seen.add(p.category)
            out.append(p)
    return out


def _prompt_list(prompts: Any, limit: int | None) -> list[Any]:
    from logitparity.prompts import Prompt, load_prompts

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None (the first N prompts), got {limit!r}")
    if prompts is None:
        items: list[Any] = _default_prompts()
    elif isinstance(prompts, (str, os.PathLike)):
        items = load_prompts(prompts)
    elif isinstance(prompts, (list, tuple)) and prompts:
        items = [p if isinstance(p, Prompt) else Prompt(f"prompt-{i}", "default", p) if isinstance(p, str) else p
                 for i, p in enumerate(prompts)]
    else:
        raise ValueError(f"prompts must be None (one prompt of each default category), a prompts file, or a "
                         f"non-empty list of Prompt or str, got {prompts!r}")
    for i, p in enumerate(items):
        # An empty text is a prompt too (the chat template gives it tokens;
        # tokenize_prompts refuses one that has none).
        if not isinstance(p, Prompt) or not isinstance(p.text, str):
            raise ValueError(f"prompts[{i}] must be a Prompt or a str, got {p!r}")
    return items[:limit] if limit else items


def _check_positive(value: Any, name: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number ({what}), got {value!r}")
    return float(value)


def _outliers(sites: dict[str, _Site], stats: dict[str, TensorStats], k: float, records: list[dict],
              decode: Any, tokens: list[list[int]]) -> list[Outlier]:
    out = []
    for key, t in stats.items():
        typical = _typical(t)
        if key.endswith(_NO_OUTLIERS) or not typical > 0:
            continue
        s = sites[key]
        score = t.channel_max_abs / typical
        for c in np.nonzero(score > k)[0]:
            per_prompt = np.array([m[c] for m in s.prompt_max])
            pi = int(np.argmax(per_prompt))
            pos = int(s.prompt_argmax[pi][c])
            cats = sorted({records[i]["category"] for i in np.nonzero(per_prompt > k * typical)[0]})
            tok = ctx = None
            if decode is not None and pos < len(tokens[pi]):
                tok = decode(tokens[pi][pos:pos + 1])
                ctx = decode(tokens[pi][max(0, pos - 8):pos + 1])
            out.append(Outlier(key, "activation", t.layer, int(c), float(t.channel_max_abs[c]), typical,
                               float(score[c]), float(t.channel_max_abs[c] / t.std) if t.std > 0 else math.nan,
                               records[pi]["id"], pos, tok, ctx, tuple(cats)))
    out.sort(key=lambda o: -o.score)
    return out


def _trigger_pass(hf: Any, tokens: list[list[int]], outs: list[Outlier], k: float, decode: Any) -> list[Outlier]:
    """One more pass over the prompts, observing only the outlier sites:
    per outlier, the positions where |x_c| exceeds its cut and their tokens."""
    import collections

    from logitparity.capture import sites as S

    by_site: dict[str, list[int]] = {}
    for i, o in enumerate(outs):
        by_site.setdefault(o.key, []).append(i)
    counts = np.zeros(len(outs), dtype=np.int64)
    total = np.zeros(len(outs), dtype=np.int64)
    toks: list[collections.Counter] = [collections.Counter() for _ in outs]
    current: list[int] = []

    def on_rows(key: str, rows: Any) -> None:
        idx = by_site[key]
        cols = [outs[i].channel for i in idx]
        cuts = np.array([k * outs[i].typical for i in idx])
        over = S.channels_over(rows, cols, cuts)  # bool [positions, len(idx)]
        counts[idx] += over.sum(0)
        total[idx] += over.shape[0]
        ids = np.asarray(current[: over.shape[0]])
        for j, i in enumerate(idx):
            hit = ids[over[:, j]]
            if hit.size:
                toks[i].update(hit.tolist())

    with S.observing(hf, list(by_site), on_rows):
        for t in tokens:
            current[:] = t
            S.forward_logits(hf, t)
    out = []
    for i, o in enumerate(outs):
        top = tuple((decode([tid]) if decode is not None else str(tid), int(n)) for tid, n in toks[i].most_common(3))
        out.append(dataclasses.replace(o, positions_over=int(counts[i]),
                                       fraction_over=float(counts[i] / total[i]) if total[i] else 0.0,
                                       top_tokens=top))
    return out


def _typical(t: TensorStats) -> float:
    """The median over channels of their max |x| (the outlier rule's yardstick)."""
    return float(np.median(t.channel_max_abs)) if t.channel_max_abs.size else math.nan


def _weight_outliers(weights: list[TensorStats], k: float) -> list[Outlier]:
    out = []
    for t in weights:
        typical = _typical(t)
        if not typical > 0:
            continue
        score = t.channel_max_abs / typical
        for c in np.nonzero(score > k)[0]:
            out.append(Outlier(t.key, "weight", t.layer, int(c), float(t.channel_max_abs[c]), typical, float(score[c]),
                               float(t.channel_max_abs[c] / t.std) if t.std > 0 else math.nan))
    out.sort(key=lambda o: -o.score)
    return out


def _per_category(records: list[dict], norms: list[np.ndarray], entropies: list[np.ndarray],
                  sites: dict[str, _Site], outliers: list[Outlier]) -> list[dict[str, Any]]:
    cats = sorted({r["category"] for r in records})
    rows = []
    for cat in cats:
        idx = [i for i, r in enumerate(records) if r["category"] == cat]
        n = np.concatenate([norms[i] for i in idx])
        e = np.concatenate([entropies[i] for i in idx])
        top = {}
        for o in outliers[:5]:
            top[f"{o.key}#{o.channel}"] = float(max(sites[o.key].prompt_max[i][o.channel] for i in idx))
        rows.append({"category": cat, "prompts": len(idx), "positions": int(n.size),
                     "logit_norm": describe(n).to_dict(), "entropy": describe(e).to_dict(),
                     "top_outliers_max_abs": top})
    return rows


def stats_of(model: Any, prompts: Any = None, *, limit: int | None = None, weights: bool = True,
             attention: bool = True, outlier_factor: float = OUTLIER_FACTOR, tokenizer: Any = None) -> ModelStats:
    """Distribution statistics of ``model`` (a LoadedModel or an HF
    Llama-style causal LM): its weights, and its activations on ``prompts``
    (None: the first prompt of each category of the default set but context_limit; a prompts
    file; a list of Prompt or str). weights=False skips the weights;
    attention=False the query/key/value and score sites. Prompts are
    tokenized as ``capture`` does (the chat template when the tokenizer has
    one). See the module docstring for every definition."""
    from logitparity.capture import hooks, sites as S
    from logitparity.prompts import coverage_warning, missing_categories

    t0 = time.perf_counter()
    k = _check_positive(outlier_factor, "outlier_factor", "k in max |x| > k x the median channel's max |x|")
    hf = hooks.hf_module(model)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("model has no tokenizer: pass a LoadedModel (logitparity.capture.load_model) or tokenizer=")
    items = _prompt_list(prompts, limit)
    tokens = hooks.tokenize_prompts(tok, items)
    records = [{"id": p.id, "category": p.category, "positions": len(t)} for p, t in zip(items, tokens)]
    site_keys = S.default_sites(hf, attention=attention)
    core = _core()
    sites: dict[str, _Site] = {}
    order: list[str] = []

    def on_rows(key: str, rows: Any) -> None:
        arr, bf16 = hooks.to_numpy_rows(rows)
        s = sites.get(key)
        if s is None:
            s = sites[key] = _Site(arr.shape[1])
            order.append(key)
        s.add(arr, bf16, S.row_figures(rows))

    from logitparity.metrics import compare_logits

    norms, entropies = [], []
    with S.observing(hf, site_keys, on_rows):
        for t in tokens:
            logits = S.forward_logits(hf, t)
            arr, bf16 = hooks.to_numpy_rows(logits)
            m = compare_logits(arr, arr, ref_bf16=bf16, cand_bf16=bf16, topk=[1])
            entropies.append(m.entropy_ref)
            norms.append(S.row_norms(logits))
    missing_sites = [k_ for k_ in site_keys if k_ not in sites]
    warnings = []
    if missing_sites:
        warnings.append(f"{len(missing_sites)} sites recorded nothing (first: {missing_sites[0]}); a module whose "
                        "forward does not call the attention function records no query/key/value/scores")
    acts = {}
    for key in order:
        s = sites[key]
        pn = s.norm_sum / np.maximum(s.norm_n, 1)
        acts[key] = _tensor_stats(s.acc, key, "activation", (s.rows, s.width), None, pn)
    wstats = []
    if weights:
        for name, rows in S.weight_rows(hf):
            arr, bf16 = hooks.to_numpy_rows(rows)
            acc = core.DistributionAccumulator(arr.shape[1])
            acc.add(arr, bf16)
            exact = core.exact_abs_quantiles(arr, bf16, list(QUANTILES.values()))
            wstats.append(_tensor_stats(acc, name, "weight", tuple(arr.shape), exact))
    decode = getattr(tok, "decode", None)
    outs = _outliers(sites, acts, k, records, decode, tokens)
    if outs:
        outs = _trigger_pass(hf, tokens, outs, k, decode)
    att = []
    for key in order:
        if key.endswith(".self_attn.scores"):
            s = sites[key]
            h = s.width // 2
            att.append({"path": key[: -len(".scores")], "layer": acts[key].layer, "heads": h,
                        "max": s.col_max[:h].astype(float).tolist(), "min": s.col_min[h:].astype(float).tolist(),
                        "range": [float(np.min(s.col_min[h:])), float(np.max(s.col_max[:h]))]})
    all_norm = np.concatenate(norms)
    all_ent = np.concatenate(entropies)
    cats = _per_category(records, norms, entropies, sites, outs)
    miss = missing_categories(r["category"] for r in records)
    warn = coverage_warning(r["category"] for r in records)
    if warn:
        warnings.append(warn)
    return ModelStats(
        model=_model_name(model), dtype=_dtype(hf), prompts=records, positions=int(sum(len(t) for t in tokens)),
        weights=wstats, activations=list(acts.values()), outliers=outs, weight_outliers=_weight_outliers(wstats, k),
        attention=att, logits={"norm": describe(all_norm), "entropy": describe(all_ent)}, categories=cats,
        missing_categories=miss, warnings=warnings, outlier_factor=k, seconds=time.perf_counter() - t0,
        token_ids=tokens)


def _model_name(model: Any) -> str:
    ident = getattr(model, "identity", None)
    if isinstance(ident, dict):
        m = ident.get("model", {})
        return str(m.get("name") or m.get("path") or "model")
    return type(model).__name__


def _dtype(hf: Any) -> str:
    from logitparity.layers import dtype_name

    return dtype_name(hf)


# --------------------------------------------------------------------------
# Ablation


@dataclasses.dataclass(frozen=True)
class AblationRow:
    """One ablated channel: its damage against the untouched model, on the
    same prompts (every position for KL; next-token positions for ΔPPL)."""

    key: str
    layer: int | None
    channel: int
    mode: str  # 'zero' | 'clamp'
    limit: float | None  # clamp: the bound (k x the median channel's max |x|)
    outlier_score: float
    kl: Describe  # KL(untouched || ablated) per position, nats
    same_top1: float
    ppl: float  # untouched
    ppl_ablated: float
    delta_ppl: float
    delta_ppl_se: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kl"] = self.kl.to_dict()
        return {k: _num(v) for k, v in d.items()}


@dataclasses.dataclass
class Ablation:
    """Outlier channels ranked by the damage their ablation does (mean KL first)."""

    rows: list[AblationRow]
    mode: str
    prompts: int
    positions: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "prompts": self.prompts, "positions": self.positions, "seconds": self.seconds,
                "ranking": [r.to_dict() for r in self.rows]}

    def to_markdown(self) -> str:
        from logitparity.report.stats import ablation_markdown

        return ablation_markdown(self)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


@dataclasses.dataclass(frozen=True)
class ChannelShift:
    """An activation channel whose max |x| grew from the reference to the candidate."""

    key: str
    layer: int | None
    channel: int
    ref_max_abs: float
    cand_max_abs: float
    ratio: float  # cand / ref; inf where the reference channel is 0 and the candidate's is not
    order: int  # the site's place among the candidate's sites (forward order)
    typical: float  # the candidate tensor's median channel max |x| (ablate's clamp uses it)

    def to_dict(self) -> dict[str, Any]:
        return {k: _num(v) for k, v in dataclasses.asdict(self).items()}


def outlier_shift(ref: ModelStats, cand: ModelStats, *, factor: float = SHIFT_FACTOR) -> list[ChannelShift]:
    """The activation channels whose max |x| grew more than ``factor`` times
    from ``ref`` to ``cand`` (stats_of of a reference and a candidate on the
    same prompts): the outliers a port, a quantization or a bug introduced.
    A model's own outliers (a first token's massive activations, thousands of
    times its typical channel) hide a new one in a ranking by size; against
    the reference they cancel (ratio ~1). In forward order, the highest
    ratio first within a site: the first entry is where the change enters
    (later sites carry its consequences, often grown further: a scaled MLP
    input reaches down_proj's input squared through gate x up). Score sites
    (per-head extremes, not features) are left out."""
    if not isinstance(ref, ModelStats) or not isinstance(cand, ModelStats):
        raise TypeError(f"ref and cand must be ModelStats from stats_of, got {type(ref).__name__} and "
                        f"{type(cand).__name__}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (math.isfinite(factor) and factor > 1):
        raise ValueError(f"factor must be a number > 1 (how many times a channel's max |x| must grow), got {factor!r}")
    if ref.token_ids != cand.token_ids:
        raise ValueError("ref and cand were measured on different tokens (prompts or tokenizer differ): run stats_of "
                         "on the same prompts with the same tokenizer for both")
    ref_by = {t.key: t for t in ref.activations}
    out = []
    for order, t in enumerate(cand.activations):
        r = ref_by.get(t.key)
        if r is None or t.key.endswith(_NO_OUTLIERS) or r.channel_max_abs.shape != t.channel_max_abs.shape:
            continue
        rc = np.asarray(r.channel_max_abs, np.float64)
        cc = np.asarray(t.channel_max_abs, np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(rc > 0, cc / np.where(rc > 0, rc, 1.0), np.where(cc > 0, np.inf, 1.0))
        typical = _typical(t)
        for c in np.flatnonzero(ratio > factor):
            out.append(ChannelShift(t.key, t.layer, int(c), float(rc[c]), float(cc[c]), float(ratio[c]), order,
                                    typical))
    out.sort(key=lambda x: (x.order, -x.ratio, x.channel))
    return out


def ablate(model: Any, stats: ModelStats, n: int = 5, *, mode: str = "zero", channels: Sequence[Any] | None = None,
           systematic: bool = False, threads: int | None = None) -> Ablation:
    """Ablate each of the top ``n`` activation outlier channels of ``stats``
    (``stats_of`` on the same model) in turn, on the prompts ``stats`` used,
    and rank them by mean KL(untouched ‖ ablated) over every position, then
    ΔPPL. mode 'zero' sets the channel to 0; 'clamp' clamps it to ±k·σ of its
    tensor (k = stats.outlier_factor). channels: explicit (site key, channel)
    pairs instead of the top n. systematic=True: the top n systematic
    outliers (over their cut at SYSTEMATIC_FRACTION of the positions or more)."""
    from logitparity.capture import hooks, sites as S
    from logitparity.metrics import compare_logits
    from logitparity.ppl import PairFigures, PplFigures

    t0 = time.perf_counter()
    if mode not in ABLATION_MODES:
        raise ValueError(f"mode must be one of {ABLATION_MODES} (set the channel to 0, or clamp it to "
                         f"+-k x the typical channel max), got {mode!r}")
    if not isinstance(stats, ModelStats):
        raise TypeError(f"stats must be the ModelStats of stats_of(model, ...), got {type(stats).__name__}")
    hf = hooks.hf_module(model)
    by_key = {o.key: o for o in stats.activations}
    if channels is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1 (the number of top outlier channels to ablate), got {n!r}")
        pool = stats.systematic_outliers if systematic else stats.outliers
        todo = [(o.key, o.channel, o.score) for o in pool if S.site_module(o.key)[1] in ("input", "output")]
        todo = todo[:n]
    else:
        todo = []
        for item in channels:
            key, c = item
            if key not in by_key:
                raise ValueError(f"channels: site {key!r} is not in stats (sites such as {stats.activations[0].key!r})")
            if not (isinstance(c, int) and 0 <= c < by_key[key].shape[1]):
                raise ValueError(f"channels: channel of {key} must be in [0, {by_key[key].shape[1] - 1}], got {c!r}")
            t = by_key[key]
            typical = _typical(t)
            todo.append((key, c, float(t.channel_max_abs[c] / typical) if typical > 0 else math.nan))
    tokens = stats.token_ids
    targets = [np.array(list(t[1:]) + [-1], dtype=np.int64) for t in tokens]
    tgt = np.concatenate(targets)
    scored = tgt >= 0

    def run() -> tuple[np.ndarray, bool]:
        rows = [hooks.to_numpy_rows(S.forward_logits(hf, t)) for t in tokens]
        return np.concatenate([r[0] for r in rows]), rows[0][1]

    base, bf16 = run()
    out = []
    for key, c, score in todo:
        t = by_key[key]
        limit = stats.outlier_factor * _typical(t) if mode == "clamp" else None
        with S.channel_ablation(hf, key, c, mode=mode, limit=limit or 0.0):
            abl, _ = run()
        m = compare_logits(base, abl, targets=tgt, ref_bf16=bf16, cand_bf16=bf16, topk=[1], threads=threads)
        ref_f = PplFigures.from_nll(m.nll_ref[scored], 0, 0)
        cand_f = PplFigures.from_nll(m.nll_cand[scored], 0, 0)
        pair = PairFigures.from_tokens(ref_f, cand_f, m.nll_ref[scored], m.nll_cand[scored], m.kl_ref_cand[scored],
                                       m.kl_cand_ref[scored], m.delta_p[scored], m.same_top1[scored], kl="exact",
                                       bootstrap=0, seed=0)
        out.append(AblationRow(key, t.layer, int(c), mode, limit, float(score), describe(m.kl_ref_cand),
                               float(np.mean(m.same_top1)), ref_f.ppl, cand_f.ppl, pair.delta_ppl,
                               pair.delta_ppl_se))
    out.sort(key=lambda r: (-(r.kl.mean if r.kl.mean == r.kl.mean else math.inf), -abs(r.delta_ppl)))
    return Ablation(out, mode, len(tokens), int(base.shape[0]), time.perf_counter() - t0)
