"""Perplexity and corpus-level KL: a reference and optionally a candidate
scored on the same text with sliding windows.

Windows (the Hugging Face perplexity recipe): window w covers text tokens
[w·stride, w·stride + span), span = ctx − 1 when the tokenizer has a BOS
token (it starts every window) else ctx; the last window ends at the text's
end. Window w scores only the tokens no earlier window scored, i.e. those at
or after the previous window's end, so every token is scored exactly once,
with at least span − stride tokens of context (stride = span: disjoint
windows). Without BOS the first token of the text has no prediction and is
not scored. ``windows="llama.cpp"`` uses llama-perplexity's disjoint chunks
instead (``plan_chunks``: the second half of each chunk scored).

Token NLLs, log-sum-exps and KL come from the C++ core; Python only
gathers rows and summarises. Every figure is defined in docs/perplexity.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from logitparity._fileio import write_text_atomic

from logitparity._renamed import renamed_keyword, storage_from_cache_topk
from logitparity.baseline_cache import BaselineCache, BaselineCacheWriter, CacheRows
from logitparity.dump import check_tokenizer, parse_storage, text_sha256
from logitparity.metrics import compare_logits, logsumexp, nll as _nll, topk as _topk
from logitparity.stats import Describe, Rate, describe, format_mean_se, rate

__all__ = ["DEFAULT_CORPUS", "PairFigures", "PerplexityResult", "PplFigures", "WINDOW_SCHEMES", "Window",
           "perplexity", "plan_chunks", "plan_windows"]

DEFAULT_CORPUS = Path(__file__).parent / "data" / "pride_and_prejudice.txt"
DEFAULT_CTX = 512
BOOTSTRAP = 1000  # paired bootstrap resamples for the ΔPPL interval
SCORING_NOTE = (
    "each token is scored once, by the first window that reaches it (Hugging Face perplexity "
    "recipe: window w covers tokens [w·stride, w·stride + span) and scores those past the "
    "previous window's end)"
)


# --------------------------------------------------------------------------
# windows

WINDOW_SCHEMES = ("hf", "llama.cpp")
CHUNK_NOTE = (
    "llama-perplexity's scheme: disjoint chunks of ctx positions, each chunk's first position BOS (when the "
    "tokenizer adds one to a text; it replaces the chunk's first token), the positions from score_from on "
    "scored (default ctx/2: the second half)"
)


@dataclasses.dataclass(frozen=True)
class Window:
    """Text token indices: the window feeds [begin, end) (after BOS, if any)
    and scores the tokens [first, end)."""

    begin: int
    end: int
    first: int

    @property
    def scored(self) -> int:
        return self.end - self.first


def plan_windows(n_tokens: int, ctx: int, stride: int, bos: bool) -> list[Window]:
    """The sliding windows over n_tokens text tokens (see the module doc).

    ctx counts the model's input positions, BOS included; a text shorter than
    one window gives one window of all its tokens.
    """
    span = ctx - 1 if bos else ctx
    if span < (1 if bos else 2):
        raise ValueError(f"ctx must be at least 2 (one context and one scored token), got {ctx}")
    if not 1 <= stride <= span:
        raise ValueError(
            f"stride must be in [1, {span}] (ctx{' − 1 for BOS' if bos else ''}); a larger stride "
            f"would leave tokens unscored, got {stride}"
        )
    if n_tokens < (1 if bos else 2):
        raise ValueError(
            f"the text has {n_tokens} token(s); scoring needs at least {1 if bos else 2} "
            f"({'' if bos else 'the tokenizer has no BOS, so the first token has no prediction; '}"
            "pass a longer text)"
        )
    windows, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + span, n_tokens)
        windows.append(Window(begin, end, max(prev_end, begin if bos else begin + 1)))
        if end == n_tokens:
            return windows
        prev_end, begin = end, begin + stride


def plan_chunks(n_tokens: int, ctx: int, bos: bool, score_from: int | None = None) -> list[Window]:
    """llama-perplexity's windows over n_tokens text tokens (BOS excluded).

    llama.cpp tokenizes the whole text (BOS first when the vocabulary adds
    one), cuts the token array into n_chunk = len // ctx disjoint chunks of
    ctx positions, overwrites each chunk's first token with BOS (when it adds
    one), and scores the predictions made at chunk positions score_from …
    ctx − 2, i.e. the chunk tokens score_from + 1 … ctx − 1 (default
    score_from = ctx // 2, so ctx − 1 − ctx // 2 tokens per chunk). In text
    token indices, chunk c feeds BOS + text[c·ctx, (c+1)·ctx − 1) and scores
    [c·ctx + score_from, (c+1)·ctx − 1) with BOS, or feeds text[c·ctx,
    (c+1)·ctx) and scores [c·ctx + score_from + 1, (c+1)·ctx) without.
    Tokens past the last whole chunk are not scored (llama-perplexity further
    refuses texts of fewer than 2·ctx tokens; one chunk is enough here).
    """
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"ctx must be an int >= 2 (one context and one scored position), got {ctx!r}")
    first = ctx // 2 if score_from is None else score_from
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first <= ctx - 2:
        raise ValueError(f"score_from must be an int in [0, {ctx - 2}] (ctx − 2: the last position that predicts "
                         f"a token of the chunk), got {score_from!r}")
    n_array = n_tokens + (1 if bos else 0)
    n_chunk = n_array // ctx
    if n_chunk < 1:
        raise ValueError(
            f"the text has {n_tokens} token(s){' (+ BOS)' if bos else ''}, fewer than one chunk of ctx={ctx}; "
            f"pass a longer text or a smaller ctx (llama-perplexity itself wants at least 2·ctx = {2 * ctx})"
        )
    out = []
    for c in range(n_chunk):
        if bos:
            out.append(Window(c * ctx, (c + 1) * ctx - 1, c * ctx + first))
        else:
            out.append(Window(c * ctx, (c + 1) * ctx, c * ctx + first + 1))
    return out


def _batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of identical shape (fed length, scored count), at
    most batch_size at a time, so no batch needs padding."""
    group: list[Window] = []
    for w in windows:
        if group and (len(group) == batch_size or (w.end - w.begin, w.scored) != (
                group[0].end - group[0].begin, group[0].scored)):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


# --------------------------------------------------------------------------
# figures


@dataclasses.dataclass(frozen=True)
class PplFigures:
    """One side's perplexity figures over ``tokens`` scored tokens.

    ppl = exp(mean NLL) with se = ppl · se(mean NLL); word/byte perplexity
    and bits per byte spread the total NLL over the text's words and UTF-8
    bytes (docs/perplexity.md).
    """

    tokens: int
    nll: Describe  # per-token NLL, nats
    mean_nll: float
    ppl: float
    ppl_se: float
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float

    @classmethod
    def from_nll(cls, nll: np.ndarray, words: int, n_bytes: int) -> "PplFigures":
        d = describe(nll)
        # describe() leaves NaN/inf out of its mean; a PPL must not: they propagate.
        total = float(np.sum(nll))
        finite = math.isfinite(total)
        mean = d.mean if finite else total
        ppl = _exp(mean)
        word = _exp(total / words) if words else math.nan
        byte = _exp(total / n_bytes) if n_bytes else math.nan
        bpb = total / (n_bytes * math.log(2)) if n_bytes else math.nan
        return cls(int(nll.size), d, mean, ppl, ppl * d.se if finite else math.nan, word, byte, bpb)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["nll"] = self.nll.to_dict()
        return out


@dataclasses.dataclass(frozen=True)
class PairFigures:
    """Candidate against reference on the same tokens (docs/perplexity.md).

    ln_ppl_ratio = mean(nll_cand − nll_ref), its se from the paired
    differences (so it accounts for the correlation of the two sides);
    ppl_ratio = exp(ln_ppl_ratio); delta_ppl = ppl_cand − ppl_ref with a
    delta-method se using the covariance of the token NLLs, and a paired
    bootstrap 95% interval (token resampling, seeded). ``kl`` says whether KL
    is exact or a lower bound (top-K baseline cache).
    """

    ppl_ratio: float
    ppl_ratio_se: float
    ln_ppl_ratio: float
    ln_ppl_ratio_se: float
    delta_ppl: float
    delta_ppl_se: float
    delta_ppl_ci95: tuple[float, float]
    bootstrap: int
    seed: int
    nll_pearson: float
    kl_ref_cand: Describe
    kl_cand_ref: Describe
    kl: str
    delta_p: Describe
    delta_p_rms: float
    delta_p_rms_se: float
    delta_p_low: dict[str, float]  # lower tail of Δp: p0.1, p1, p5, p10
    same_top1: Rate

    @classmethod
    def from_tokens(cls, ref: PplFigures, cand: PplFigures, nll_ref: np.ndarray, nll_cand: np.ndarray,
                    kl_ref_cand: np.ndarray, kl_cand_ref: np.ndarray, delta_p: np.ndarray,
                    same_top1: np.ndarray, *, kl: str, bootstrap: int, seed: int) -> "PairFigures":
        a, b = nll_ref, nll_cand
        n = a.size
        finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
        diff = describe(b - a)
        ln_ratio = diff.mean if finite else float(np.mean(b - a))
        ln_se = diff.se if finite else math.nan
        ratio = _exp(ln_ratio)
        delta = cand.ppl - ref.ppl if finite else math.nan
        delta_se, pearson, ci = math.nan, math.nan, (math.nan, math.nan)
        if finite and n >= 2:
            c = np.cov(np.stack([a, b]), ddof=1)
            var = (ref.ppl**2 * c[0, 0] + cand.ppl**2 * c[1, 1] - 2 * ref.ppl * cand.ppl * c[0, 1]) / n
            delta_se = math.sqrt(max(var, 0.0))
            if c[0, 0] > 0 and c[1, 1] > 0:
                pearson = float(c[0, 1] / math.sqrt(c[0, 0] * c[1, 1]))
            if bootstrap > 0:
                ci = _bootstrap_delta_ppl(a, b, bootstrap, seed)
        dp_sq = describe(delta_p * delta_p)
        rms = math.sqrt(dp_sq.mean) if not math.isnan(dp_sq.mean) else math.nan
        rms_se = dp_sq.se / (2 * rms) if rms > 0 else (0.0 if rms == 0 else math.nan)
        low = describe(-delta_p)
        return cls(
            ppl_ratio=ratio, ppl_ratio_se=ratio * ln_se, ln_ppl_ratio=ln_ratio, ln_ppl_ratio_se=ln_se,
            delta_ppl=delta, delta_ppl_se=delta_se, delta_ppl_ci95=ci, bootstrap=bootstrap, seed=seed,
            nll_pearson=pearson, kl_ref_cand=describe(kl_ref_cand), kl_cand_ref=describe(kl_cand_ref),
            kl=kl, delta_p=describe(delta_p), delta_p_rms=rms, delta_p_rms_se=rms_se,
            delta_p_low={"p0.1": 0.0 - low.p999, "p1": 0.0 - low.p99, "p5": 0.0 - low.p95, "p10": 0.0 - low.p90},
            same_top1=rate(int(np.sum(same_top1)), n),
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("kl_ref_cand", "kl_cand_ref", "delta_p"):
            out[key] = getattr(self, key).to_dict()
        out["same_top1"] = self.same_top1.to_dict()
        out["delta_ppl_ci95"] = list(self.delta_ppl_ci95)
        return out


def _exp(x: float) -> float:
    """exp that returns inf past the float range and NaN for NaN."""
    if math.isnan(x):
        return math.nan
    return math.exp(x) if x < 709.0 else math.inf


def _bootstrap_delta_ppl(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of exp(mean b*) − exp(mean a*) over paired
    token resamples (the same indices for both sides)."""
    rng = np.random.default_rng(seed)
    n = a.size
    chunk = max(1, min(resamples, (1 << 22) // n))  # bounded memory for the index matrix
    out = np.empty(resamples)
    for lo in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - lo), n))
        out[lo:lo + idx.shape[0]] = np.exp(b[idx].mean(1)) - np.exp(a[idx].mean(1))
    lo_q, hi_q = np.percentile(out, [2.5, 97.5])
    return float(lo_q), float(hi_q)


# --------------------------------------------------------------------------
# the result


@dataclasses.dataclass
class PerplexityResult:
    """Figures of one ``perplexity`` run; per-token arrays (scoring order)
    are kept for plots and are left out of ``to_dict``."""

    reference: dict[str, Any]
    candidate: dict[str, Any] | None
    text: dict[str, Any]
    settings: dict[str, Any]
    ref: PplFigures
    cand: PplFigures | None
    pair: PairFigures | None
    cache: dict[str, Any] | None
    timing: dict[str, float]
    tokens: dict[str, np.ndarray] = dataclasses.field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Every figure as plain JSON types (NaN -> None, ±inf -> "inf"/"-inf")."""
        from logitparity.report import jsonable

        return jsonable({
            "reference": self.reference, "candidate": self.candidate, "text": self.text,
            "settings": self.settings, "ref": self.ref.to_dict(),
            "cand": self.cand.to_dict() if self.cand else None,
            "pair": self.pair.to_dict() if self.pair else None,
            "cache": self.cache, "timing": self.timing,
        })

    def __repr__(self) -> str:
        out = f"PerplexityResult(ref PPL {self.ref.ppl:.4f}"
        if self.pair is not None and self.cand is not None:
            out += (f", cand PPL {self.cand.ppl:.4f}, ΔPPL {self.pair.delta_ppl:+.4f}"
                    f" ± {self.pair.delta_ppl_se:.4f}")
        return out + ")"

    def to_markdown(self) -> str:
        return _markdown(self)

    def write_json(self, path: str | os.PathLike) -> Path:
        return write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=1, ensure_ascii=False,
                                                    allow_nan=False) + "\n")

    def write_markdown(self, path: str | os.PathLike) -> Path:
        return write_text_atomic(Path(path), self.to_markdown())

    _repr_markdown_ = to_markdown

    def __str__(self) -> str:
        return self.to_markdown()


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.{digits}f}"


def _g(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"


def _two_sided(lo: float, hi: float) -> str:
    """The two-sided test of ΔPPL = 0 from its 95% interval."""
    if math.isnan(lo) or math.isnan(hi):
        return "not tested (no bootstrap interval)"
    if lo > 0:
        return "yes: the candidate's PPL is higher"
    if hi < 0:
        return "yes: the candidate's PPL is lower (too good to be true? e.g. attention that sees the next token)"
    return "no: the interval includes 0"


def _side_label(side: dict[str, Any]) -> str:
    return f"{side.get('name')} ({side.get('dtype')}, {side.get('device')})"


def _markdown(r: PerplexityResult) -> str:
    s, t = r.settings, r.text
    lines = ["## Perplexity", ""]
    lines.append(f"- reference: {_side_label(r.reference)}")
    if r.candidate:
        lines.append(f"- candidate: {_side_label(r.candidate)}")
    lines.append(f"- text: {t['name']} ({t['sha256'][:19]}…), {t['bytes']} bytes, {t['words']} words, "
                 f"{t['tokens']} tokens")
    bos = f"BOS {s['bos_token']!r} + {s['ctx'] - 1} text tokens" if s["bos_token_id"] is not None else \
        "no BOS: the text's first token is not scored"
    if s.get("scheme") == "llama.cpp":
        lines.append(f"- windows: {s['windows']} llama.cpp chunks of ctx {s['ctx']} ({bos}), scored from "
                     f"position {s['score_from']}; {s['scored']} tokens scored; {CHUNK_NOTE}")
    else:
        lines.append(f"- windows: {s['windows']} of ctx {s['ctx']} ({bos}), stride {s['stride']}; "
                     f"{s['scored']} tokens scored; {SCORING_NOTE}")
    lines += ["", "| figure | | reference | " + ("candidate |" if r.cand else ""),
              "|---|---|---|" + ("---|" if r.cand else "")]
    rows = [
        ("PPL", lambda f: f"{_fmt(f.ppl)} ± {_fmt(f.ppl_se)}"),
        ("mean NLL (nats/token)", lambda f: f"{_fmt(f.mean_nll, 5)} ± {_fmt(f.nll.se, 5)}"),
        ("word perplexity", lambda f: _fmt(f.word_perplexity)),
        ("byte perplexity", lambda f: _fmt(f.byte_perplexity, 5)),
        ("bits per byte", lambda f: _fmt(f.bits_per_byte, 5)),
    ]
    for label, fn in rows:
        lines.append(f"| {label} | ↓ | {fn(r.ref)} | " + (f"{fn(r.cand)} |" if r.cand else ""))
    p = r.pair
    if p is not None:
        lo, hi = p.delta_ppl_ci95
        lines += [
            "", "| comparison (candidate vs reference) | | value |", "|---|---|---|",
            f"| PPL ratio cand/ref | ↓ | {_fmt(p.ppl_ratio, 6)} ± {_fmt(p.ppl_ratio_se, 6)} |",
            f"| ln(PPL ratio) | ↓ | {_fmt(p.ln_ppl_ratio, 6)} ± {_fmt(p.ln_ppl_ratio_se, 6)} |",
            f"| ΔPPL | ↓ | {p.delta_ppl:+.5f} ± {_fmt(p.delta_ppl_se, 5)} "
            f"(paired bootstrap 95%: [{lo:+.5f}, {hi:+.5f}], {p.bootstrap} resamples, seed {p.seed}) |",
            f"| ΔPPL ≠ 0, two-sided at 95% | | {_two_sided(lo, hi)} |",
            f"| Pearson r of token NLLs | ↑ | {_fmt(p.nll_pearson, 6)} |",
            f"| same top-1 | ↑ | {p.same_top1} |",
            f"| RMS Δp of the true token | ↓ | {_g(p.delta_p_rms)} ± {_g(p.delta_p_rms_se)} |",
            "", f"KL: {p.kl}.", "",
            "| per token | | mean ± se | median | p90 | p95 | p99 | p99.9 | max |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, d, arrow in (("KL(ref ‖ cand), nats", p.kl_ref_cand, "↓"),
                                ("KL(cand ‖ ref), nats", p.kl_cand_ref, "↓"),
                                ("Δp of the true token", p.delta_p, "")):
            lines.append(f"| {label} | {arrow} | {format_mean_se(d.mean, d.se)} | {_g(d.median)} | "
                         f"{_g(d.p90)} | {_g(d.p95)} | {_g(d.p99)} | {_g(d.p999)} | {_g(d.max)} |")
        low = p.delta_p_low
        lines.append(f"\nΔp lower tail: min {_g(p.delta_p.min)}, p0.1 {_g(low['p0.1'])}, p1 {_g(low['p1'])}, "
                     f"p5 {_g(low['p5'])}, p10 {_g(low['p10'])}.")
    if r.cache:
        c = r.cache
        lines.append(f"\nBaseline cache ({c['role']}): {c['path']}, storage {c['storage']}, "
                     f"{c['bytes_per_token']:.0f} bytes per token.")
    tm = r.timing
    lines.append(f"\nTime: {tm['total_s']:.1f} s ({tm['forward_s']:.1f} s model forward, "
                 f"{tm['metric_s']:.2f} s metrics), {tm['tokens_per_s']:.0f} scored tokens/s.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# inputs


def _read_text(text: str | None, text_file: str | os.PathLike | None) -> tuple[str, str]:
    """-> (text, name)."""
    if text is not None and text_file is not None:
        raise ValueError("pass either text or text_file, not both")
    if text_file is not None:
        p = Path(text_file)
        if not p.is_file():
            raise FileNotFoundError(f"text_file {p} does not exist; pass a UTF-8 text file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"text_file {p} is not UTF-8 text ({e}); convert it with iconv") from e
        name = p.name
    elif text is not None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}; pass a file with text_file=")
        name = "<text>"
    else:
        text, name = DEFAULT_CORPUS.read_text(encoding="utf-8"), DEFAULT_CORPUS.name
    if not text.strip():
        raise ValueError(f"text {name} is empty (or only whitespace); pass some prose to score")
    return text, name


def _tokenize(tokenizer: Any, text: str, max_tokens: int | None) -> tuple[np.ndarray, str]:
    """-> (token ids, the text those tokens cover)."""
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    if max_tokens is not None and ids.size > max_tokens:
        covered = text[:enc["offset_mapping"][max_tokens - 1][1]] if fast else tokenizer.decode(ids[:max_tokens])
        return ids[:max_tokens], covered
    return ids, text


def _check_int(value: Any, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return int(value)


def _text_counts(covered: str) -> dict[str, int]:
    return {"words": len(covered.split()), "bytes": len(covered.encode("utf-8"))}


# --------------------------------------------------------------------------
# the sides


def _load(spec: Any, dtype: str, device: str):
    """A LoadedModel from a path / None (default model) / an already loaded model."""
    if (hasattr(spec, "model") and hasattr(spec, "tokenizer")) or hasattr(spec, "score"):
        return spec  # a LoadedModel or a capture engine
    from logitparity.capture.hf import load_model

    return load_model(spec, dtype=dtype, device=device)


def _describe_side(lm: Any) -> dict[str, Any]:
    ident = lm.identity.get("model", {})
    name = ident.get("path") or ident.get("name")
    if ident.get("format") == "gguf" and name:
        name = Path(name).name
    if ident.get("default"):
        name = f"{name} (default model)"
    return {"name": name, "dtype": lm.dtype, "device": lm.device, "model": ident}


def _max_context(lm: Any) -> int | None:
    if not hasattr(lm, "model"):  # a capture engine
        n = getattr(lm, "max_context", None)
        return int(n) if isinstance(n, int) else None
    n = getattr(lm.model.config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) else None


def _check_context(lm: Any, ctx: int, role: str) -> None:
    limit = _max_context(lm)
    if limit is not None and ctx > limit:
        raise ValueError(
            f"ctx={ctx} exceeds the {role} model's context ({limit} positions, "
            f"max_position_embeddings); pass ctx <= {limit}"
        )


def _forward(lm: Any, token_ids: np.ndarray, group: list[Window], bos_id: int | None):
    """Logits [rows, V] (torch, on the model's device) predicting the
    group's scored tokens, in order."""
    from logitparity.capture.decode import score_batch

    head = [bos_id] if bos_id is not None else []
    prompts = [head + token_ids[w.begin:w.first].tolist() for w in group]
    conts = [token_ids[w.first:w.end].tolist() for w in group]
    if not hasattr(lm, "model"):  # a capture engine (capture.engine): numpy rows
        rows = lm.score(prompts, conts)
        return rows[0] if len(rows) == 1 else np.concatenate(rows, 0)
    pad = getattr(lm.tokenizer, "pad_token_id", None)
    rows = score_batch(lm.model, prompts, conts, device=lm.device, pad_id=pad if pad is not None else 0)
    return rows[0] if len(rows) == 1 else _cat(rows)


def _cat(rows: list[Any]):
    import torch

    return torch.cat(rows, 0)


def _host_rows(logits: Any) -> tuple[np.ndarray, bool]:
    """Torch CPU logits [n, V] -> (numpy fp32/fp16, or uint16 bf16 bits; is_bf16)."""
    if isinstance(logits, np.ndarray):
        return logits, False
    import torch

    x = logits.contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16), True
    return x.numpy(), False


# --------------------------------------------------------------------------
# per-batch metrics


@dataclasses.dataclass
class _Tokens:
    """Per scored token, appended batch by batch."""

    parts: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)

    def add(self, **arrays: np.ndarray) -> None:
        for k, v in arrays.items():
            self.parts.setdefault(k, []).append(np.asarray(v))

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.parts.items()}


def _pair_live(ref, cand, targets: np.ndarray, threads) -> dict[str, np.ndarray]:
    """KL both ways and argmaxes from the fused pair kernel; each side's NLL
    from the NLL kernel, as in every other mode, so a reference NLL is the
    same number whether it was scored alone, in a pair or read from a cache."""
    if _device(ref) != _device(cand):  # e.g. the reference on a GPU, the candidate on the CPU
        ref, cand = _on_host(ref), _on_host(cand)
    m = compare_logits(ref, cand, topk=(1,), threads=threads, js=False)
    return {"nll_ref": _nll(ref, targets, threads=threads), "nll_cand": _nll(cand, targets, threads=threads),
            "kl_ref_cand": m.kl_ref_cand, "kl_cand_ref": m.kl_cand_ref, "argmax_ref": m.argmax_ref,
            "argmax_cand": m.argmax_cand, "lse_ref": m.lse_ref}


def _device(x: Any) -> str:
    return "cpu" if isinstance(x, np.ndarray) else str(x.device)


def _on_host(x: Any) -> Any:
    return x if isinstance(x, np.ndarray) else x.cpu()


def _pair_cache(rows: CacheRows, cand, targets: np.ndarray, vocab: int, threads) -> dict[str, np.ndarray]:
    """Candidate logits against cached reference rows: exact NLL/argmax from the
    cache; KL exact up to the stored rounding (full storage) or a lower bound
    (topk storage)."""
    cand = _on_host(cand)  # the cached rows are on the host: the candidate's cross to meet them
    if rows.logprobs is not None:
        m = compare_logits(rows.logprobs, cand, topk=(1,), threads=threads, js=False, ref_bf16=rows.bf16)
    else:
        from logitparity.topk_rows import TopRows, top_from_full, topk_row_metrics

        host, bf16 = _host_rows(cand)
        top_ref = TopRows(rows.topk_values.astype(np.float64), rows.topk_indices.astype(np.int64),
                           rows.lse, rows.tail)
        k = rows.topk_indices.shape[1]
        m = topk_row_metrics(top_ref, top_from_full(host, k, bf16, threads), targets, (1,), vocab)
    return {"nll_ref": rows.nll, "nll_cand": _nll(cand, targets, threads=threads), "kl_ref_cand": m.kl_ref_cand,
            "kl_cand_ref": m.kl_cand_ref, "argmax_ref": rows.argmax, "argmax_cand": m.argmax_cand}


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="win", desc="ppl", disable=not enabled, dynamic_ncols=True, leave=False)


# --------------------------------------------------------------------------
# planning and the scoring loop


@dataclasses.dataclass
class _Plan:
    """What gets scored: the text's tokens, the windows and their settings."""

    token_ids: np.ndarray
    windows: list[Window]
    bos_id: int | None
    text: dict[str, Any]
    settings: dict[str, Any]
    tokenizer: dict[str, Any]


def _make_plan(token_ids: np.ndarray, ctx: int, stride: int, bos_id: int | None, bos_token: str | None,
               max_tokens: int | None, text: dict[str, Any], tokenizer: dict[str, Any], *,
               scheme: str = "hf", score_from: int | None = None) -> _Plan:
    if scheme == "llama.cpp":
        windows = plan_chunks(int(token_ids.size), ctx, bos_id is not None, score_from)
        stride = ctx
    else:
        windows = plan_windows(int(token_ids.size), ctx, stride, bos_id is not None)
    settings = {"ctx": ctx, "stride": stride, "bos_token_id": bos_id, "bos_token": bos_token,
                "max_tokens": max_tokens, "windows": len(windows), "scored": sum(w.scored for w in windows),
                "recipe": SCORING_NOTE if scheme == "hf" else CHUNK_NOTE}
    if scheme != "hf":
        settings["scheme"] = scheme
        settings["score_from"] = ctx // 2 if score_from is None else score_from
    return _Plan(token_ids, windows, bos_id, text, settings, tokenizer)


def _adds_bos(tok: Any) -> bool:
    """Whether the tokenizer starts a plain text with its BOS token (llama.cpp:
    the vocabulary's add_bos flag), the rule of llama-perplexity's chunks."""
    if hasattr(tok, "add_bos"):
        return bool(tok.add_bos)
    bos = getattr(tok, "bos_token_id", None)
    return bos is not None and list(tok("a")["input_ids"][:1]) == [bos]


def _plan_from_text(ref_lm: Any, cand_lm: Any, txt: str, name: str, *, ctx: int | None, stride: int | None,
                    max_tokens: int | None, add_bos: bool | None, scheme: str = "hf",
                    score_from: int | None = None) -> _Plan:
    ctx = DEFAULT_CTX if ctx is None else ctx
    if scheme == "llama.cpp" and stride is not None:
        raise ValueError("stride applies to windows='hf'; llama.cpp's chunks are disjoint (stride = ctx)")
    if scheme == "hf" and score_from is not None:
        raise ValueError("score_from applies to windows='llama.cpp'; the HF recipe scores past the previous window")
    stride = max(1, ctx // 2) if stride is None else stride
    tok, ident = ref_lm.tokenizer, ref_lm.identity["tokenizer"]
    if cand_lm is not None:  # perplexity is compared token by token: both must tokenize the text identically
        check_tokenizer(ident, cand_lm.identity["tokenizer"], ours_name="the reference model",
                        theirs_name="the candidate model")
    bos_id = getattr(tok, "bos_token_id", None) if add_bos is not False else None
    if scheme == "llama.cpp" and add_bos is None and not _adds_bos(tok):
        bos_id = None  # llama-perplexity adds BOS only where the tokenizer adds it to a text
    if add_bos and bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token; leave add_bos unset")
    token_ids, covered = _tokenize(tok, txt, max_tokens)
    text = {"name": name, "sha256": text_sha256(txt), "tokens": int(token_ids.size),
            "truncated": covered != txt, **_text_counts(covered)}
    bos_token = getattr(tok, "bos_token", None) if bos_id is not None else None
    return _make_plan(token_ids, ctx, stride, bos_id, bos_token, max_tokens, text, ident, scheme=scheme,
                      score_from=score_from)


def _plan_from_cache(cache: BaselineCache, cand_lm: Any, given: tuple[str, str] | None, *, ctx: int | None,
                     stride: int | None, max_tokens: int | None, add_bos: bool | None) -> _Plan:
    cache.check_compatible(
        tokenizer=cand_lm.identity["tokenizer"] if cand_lm else None, text=given[0] if given else None,
        settings={"ctx": ctx, "stride": stride, "max_tokens": max_tokens},
    )
    s = cache.settings
    bos_id = s["bos_token_id"]
    if add_bos is not None and add_bos != (bos_id is not None):
        raise ValueError(f"baseline cache {cache.path} was made with add_bos={bos_id is not None}, "
                         f"got add_bos={add_bos}; leave it unset to use the cache's setting")
    return _make_plan(cache.token_ids, int(s["ctx"]), int(s["stride"]), bos_id, s.get("bos_token"),
                      s.get("max_tokens"), dict(cache.manifest["text"]), cache.manifest["tokenizer"])


def _score(plan: _Plan, ref_lm: Any, cand_lm: Any, cache: BaselineCache | None,
           writer: BaselineCacheWriter | None, *, batch_size: int, threads: int | None,
           progress: bool) -> tuple[dict[str, np.ndarray], float, float, dict[str, Any] | None]:
    """Run every window -> (per-token arrays, forward seconds, metric seconds,
    the written cache's manifest or None)."""
    acc = _Tokens()
    t_fwd = t_met = 0.0
    cursor = 0
    t_loop = time.perf_counter()
    bar = _progress(len(plan.windows), progress)
    try:
        for group in _batches(plan.windows, batch_size):
            positions = np.concatenate([np.arange(w.first, w.end) for w in group])
            targets = plan.token_ids[positions]
            t0 = time.perf_counter()
            ref_logits = _forward(ref_lm, plan.token_ids, group, plan.bos_id) if ref_lm is not None else None
            cand_logits = _forward(cand_lm, plan.token_ids, group, plan.bos_id) if cand_lm is not None else None
            t1 = time.perf_counter()
            if cache is not None:
                rows = cache.rows(cursor, cursor + positions.size)
                if not np.array_equal(rows.position, positions):
                    raise ValueError(f"baseline cache {cache.path} rows do not follow its own windows; recreate it")
                if cand_logits is None:
                    out = {"nll_ref": rows.nll}
                else:
                    cache.check_compatible(vocab=int(cand_logits.shape[-1]))
                    out = _pair_cache(rows, cand_logits, targets, cache.vocab, threads)
            elif cand_logits is not None:
                out = _pair_live(ref_logits, cand_logits, targets, threads)
            else:
                out = {"nll_ref": _nll(ref_logits, targets, threads=threads)}
            lse = out.pop("lse_ref", None)
            if writer is not None:
                arg = out.get("argmax_ref")
                writer.add(ref_logits, position=positions, target=targets, nll=out["nll_ref"],
                           lse=logsumexp(ref_logits, threads=threads) if lse is None else lse,
                           argmax=_topk(ref_logits, 1, threads=threads)[1][:, 0] if arg is None else arg)
            acc.add(**out)
            cursor += positions.size
            t_fwd += t1 - t0
            t_met += time.perf_counter() - t1
            bar.update(len(group))
            bar.set_postfix_str(f"{cursor / (time.perf_counter() - t_loop):.0f} tok/s", refresh=False)
        saved = None
        if writer is not None:
            keys = ("ctx", "stride", "bos_token_id", "bos_token", "max_tokens")
            saved = writer.close({"text": plan.text, "settings": {k: plan.settings[k] for k in keys},
                                  "tokenizer": plan.tokenizer, "model": _describe_side(ref_lm)}, plan.token_ids)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    return acc.arrays(), t_fwd, t_met, saved


def _kl_note(cache: BaselineCache | None) -> str:
    if cache is None:
        return "exact (full distributions)"
    if cache.k is not None:
        return (f"a lower bound: the baseline cache keeps the reference's top {cache.k} tokens, so KL is "
                "taken over those tokens plus one bucket for the rest (data-processing inequality)")
    return f"from the baseline cache's {cache.manifest['storage']['dtype']} log-probs (exact up to their rounding)"


# --------------------------------------------------------------------------
# the public function


@renamed_keyword("cache_topk", "storage", storage_from_cache_topk)
def perplexity(
    model: Any = None,
    *,
    text: str | None = None,
    text_file: str | os.PathLike | None = None,
    candidate: Any = None,
    ctx: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    dtype: str = "fp32",
    device: str = "cpu",
    candidate_dtype: str | None = None,
    candidate_device: str | None = None,
    baseline_cache: str | os.PathLike | BaselineCache | None = None,
    save_baseline: str | os.PathLike | None = None,
    storage: str = "full",
    cache_dtype: str = "fp16",
    max_tokens: int | None = None,
    add_bos: bool | None = None,
    bootstrap: int = BOOTSTRAP,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    windows: str = "hf",
    score_from: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` (the reference) on a text and, with
    ``candidate``, the candidate's perplexity and its distance from the
    reference on the same tokens.

    model, candidate: a Hugging Face directory, a .gguf file, None (the
    embedded default model; for ``candidate`` None means no candidate) or a
    ``LoadedModel``. baseline_cache: a cache directory (or BaselineCache)
    that stands in for the reference (then leave ``model`` unset); the text
    and settings default to the cache's and must match when given.
    save_baseline: write the reference's rows to this directory; storage
    says what it keeps of each row (``dump.parse_storage``, as for a dump):
    'full' log-probs in ``cache_dtype`` (fp16 | bf16 | fp32), or 'topk:K',
    the top K logits + tail mass (``cache_topk=K`` is the old spelling of
    ``storage="topk:K"``, deprecated).

    text / text_file: the text (default: the bundled corpus,
    data/pride_and_prejudice.txt). ctx: input positions per window, BOS
    included (default 512); stride: tokens between window starts (default
    ctx // 2; ctx − 1 with BOS, or ctx without, gives disjoint windows).
    max_tokens: score only the first N tokens of the text (no other length
    limit). add_bos: start every window with the tokenizer's BOS token
    (None: when it has one; True without one is an error). batch_size:
    windows per forward pass. bootstrap, seed: paired
    bootstrap resamples for the ΔPPL interval. threads: core threads.
    windows: "hf" (the sliding windows above) or "llama.cpp"
    (llama-perplexity's disjoint chunks, ``plan_chunks``; stride unused,
    ``score_from`` the first scored chunk position, default ctx // 2).
    model and candidate may also be capture engines (capture.engine, e.g.
    a LlamaCppEngine): their ``score`` produces the rows.
    """
    if windows not in WINDOW_SCHEMES:
        raise ValueError(f"windows must be one of {WINDOW_SCHEMES}, got {windows!r}")
    if windows != "hf" and (baseline_cache is not None or save_baseline is not None):
        raise ValueError("baseline caches record the HF windows only; use windows='hf' with a baseline cache")
    cache = None
    if baseline_cache is not None:
        if model is not None:
            raise ValueError("pass either model (a live reference) or baseline_cache, not both")
        if save_baseline is not None:
            raise ValueError("save_baseline needs a live reference model; the reference is already a cache")
        cache = baseline_cache if isinstance(baseline_cache, BaselineCache) else BaselineCache(baseline_cache)
    batch_size = _check_int(batch_size, "batch_size", 1)
    bootstrap = _check_int(bootstrap, "bootstrap", 0)
    parse_storage(storage)
    max_tokens, ctx, stride = (
        None if v is None else _check_int(v, name, 1)
        for name, v in (("max_tokens", max_tokens), ("ctx", ctx), ("stride", stride)))
    given = None if cache is not None and text is None and text_file is None else _read_text(text, text_file)

    t_start = time.perf_counter()
    ref_lm = None if cache is not None else _load(model, dtype, device)
    cand_lm = None if candidate is None else _load(candidate, candidate_dtype or dtype, candidate_device or device)
    if cache is not None:
        plan = _plan_from_cache(cache, cand_lm, given, ctx=ctx, stride=stride, max_tokens=max_tokens,
                                add_bos=add_bos)
    else:
        plan = _plan_from_text(ref_lm, cand_lm, *given, ctx=ctx, stride=stride, max_tokens=max_tokens,
                               add_bos=add_bos, scheme=windows, score_from=score_from)
    for lm, role in ((ref_lm, "reference"), (cand_lm, "candidate")):
        if lm is not None:
            _check_context(lm, plan.settings["ctx"], role)
    plan.settings["batch_size"] = batch_size

    writer = None
    if save_baseline is not None:
        writer = BaselineCacheWriter(save_baseline, storage=storage, dtype=cache_dtype, threads=threads)
    t_loop = time.perf_counter()
    tokens, t_fwd, t_met, saved = _score(plan, ref_lm, cand_lm, cache, writer, batch_size=batch_size,
                                         threads=threads, progress=progress)
    t_end = time.perf_counter()

    words, n_bytes = plan.text["words"], plan.text["bytes"]
    ref_fig = PplFigures.from_nll(tokens["nll_ref"], words, n_bytes)
    cand_fig = pair = None
    if cand_lm is not None:
        tokens["delta_p"] = np.exp(-tokens["nll_cand"]) - np.exp(-tokens["nll_ref"])
        tokens["same_top1"] = tokens["argmax_ref"] == tokens["argmax_cand"]
        cand_fig = PplFigures.from_nll(tokens["nll_cand"], words, n_bytes)
        pair = PairFigures.from_tokens(
            ref_fig, cand_fig, tokens["nll_ref"], tokens["nll_cand"], tokens["kl_ref_cand"],
            tokens["kl_cand_ref"], tokens["delta_p"], tokens["same_top1"], kl=_kl_note(cache),
            bootstrap=bootstrap, seed=seed)

    cache_info = None
    if cache is not None:
        cache_info = {"role": "reference read from", "path": str(cache.path),
                      "storage": cache.manifest["storage"]["logits"], "bytes_per_token": cache.bytes_per_token}
        reference = {**cache.manifest.get("model", {}), "baseline_cache": str(cache.path)}
    else:
        reference = _describe_side(ref_lm)
    if saved is not None:
        st = saved["storage"]
        cache_info = {"role": "written to", "path": str(Path(save_baseline)),
                      "storage": st["logits"] + (f" {st['dtype']}" if st["dtype"] else ""),
                      "bytes_per_token": saved["bytes_per_token"]}
    n_scored = plan.settings["scored"]
    timing = {"total_s": t_end - t_start, "load_s": t_loop - t_start, "forward_s": t_fwd, "metric_s": t_met,
              "tokens_per_s": n_scored / (t_end - t_loop) if t_end > t_loop else math.nan}
    return PerplexityResult(
        reference=reference, candidate=_describe_side(cand_lm) if cand_lm else None, text=plan.text,
        settings=plan.settings, ref=ref_fig, cand=cand_fig, pair=pair, cache=cache_info, timing=timing,
        tokens=tokens,
    )


# --------------------------------------------------------------------------
# the gate: a verdict on a perplexity result

DIRECTIONS = ("both", "increase")


def _parse_change(value: Any, name: str) -> tuple[float, bool]:
    """0.1 -> (0.1, False); "1%" -> (0.01, True)."""
    if isinstance(value, str):
        import re

        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*", value)
        if not m:
            raise ValueError(f"{name} must be a non-negative number, optionally with a % sign, got {value!r}")
        x = float(m.group(1))
        return (x / 100.0, True) if m.group(2) else (x, False)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number (PPL units) or a string like '1%', got {value!r}")
    return float(value), False


def gate(result: PerplexityResult, *, max_ppl_change: Any = None, direction: str = "both",
         max_mean_kl: float | None = None):
    """The verdict of a candidate's perplexity result (``perplexity(...,
    candidate=...)``), as the policy.Verdict that ``compare`` returns.

    max_ppl_change: the largest allowed ΔPPL = PPL_cand − PPL_ref, in PPL
    units (0.1) or relative to the reference's PPL ("1%"). A ΔPPL is flagged
    when its 95% interval (the paired bootstrap, or ±1.96 se without one)
    excludes zero *and* its size passes the limit: in either direction with
    direction="both" (a bug that lowers PPL, such as attention that sees the
    next token, is flagged), only upwards with "increase". max_mean_kl: the
    largest allowed mean KL(ref ‖ cand), nats. NaN figures fail."""
    from logitparity.policy import ThresholdResult, Verdict

    if not isinstance(result, PerplexityResult):
        raise TypeError(f"gate needs a PerplexityResult (from perplexity(...)), got {type(result).__name__}")
    if result.pair is None:
        raise ValueError("gate needs a perplexity result with a candidate: perplexity(..., candidate=CAND)")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if max_ppl_change is None and max_mean_kl is None:
        raise ValueError("give at least one limit: max_ppl_change and/or max_mean_kl")
    results = []
    p = result.pair
    if max_ppl_change is not None:
        limit, relative = _parse_change(max_ppl_change, "max_ppl_change")
        lo, hi = p.delta_ppl_ci95
        src = f"paired bootstrap 95% ({p.bootstrap} resamples)"
        if math.isnan(lo) or math.isnan(hi):
            lo, hi = p.delta_ppl - 1.96 * p.delta_ppl_se, p.delta_ppl + 1.96 * p.delta_ppl_se
            src = "±1.96 se"
        scale = 1.0 / result.ref.ppl if relative else 1.0
        delta, lo, hi = p.delta_ppl * scale, lo * scale, hi * scale
        if direction == "both":
            measured = abs(delta)
            significant = lo > 0 or hi < 0
            bad = significant and measured > limit
        else:
            measured = delta
            significant = lo > 0
            bad = significant and delta > limit
        unit = "relative" if relative else "PPL"
        shown = (lambda x: f"{100 * x:+.4f}%") if relative else (lambda x: f"{x:+.5f}")
        note = (f"ΔPPL {shown(delta)}, 95% interval [{shown(lo)}, {shown(hi)}] ({src}) "
                f"{'excludes' if significant else 'includes'} 0; PPL {result.ref.ppl:.4f} -> {result.cand.ppl:.4f}")
        ok = not bad and not math.isnan(delta) and not (math.isnan(lo) or math.isnan(hi))
        if math.isnan(delta) or math.isnan(lo) or math.isnan(hi):
            note += "; not measured (non-finite NLL)"
        name = "|ΔPPL|" if direction == "both" else "ΔPPL"
        results.append(ThresholdResult(
            name=f"ppl_change ({direction})", metric=name + (" / PPL_ref" if relative else ""), comparison="<=",
            limit=limit, limit_source=f"{unit}, flagged only when the interval excludes 0", measured=measured,
            passed=ok, note=note, ci_low=lo, ci_high=hi,
        ))
    if max_mean_kl is not None:
        if isinstance(max_mean_kl, bool) or not isinstance(max_mean_kl, (int, float)) or not max_mean_kl >= 0:
            raise ValueError(f"max_mean_kl must be a non-negative number of nats, got {max_mean_kl!r}")
        kl = p.kl_ref_cand
        mean = kl.mean if kl.n_nan == 0 and kl.n_inf == 0 else math.nan
        results.append(ThresholdResult(
            name="mean_kl", metric="kl_ref_cand.mean", comparison="<=", limit=float(max_mean_kl),
            limit_source="absolute", measured=mean, passed=bool(mean <= max_mean_kl),
            note=f"KL {p.kl}; ± {kl.se:.2g}" if not math.isnan(kl.se) else f"KL {p.kl}",
        ))
    desc = f"{result.settings.get('scored')} tokens scored; candidate {_side_label(result.candidate or {})}"
    return Verdict(all(r.passed for r in results), "perplexity gate", desc, tuple(results))
