"""Compare two dumps: compatibility, free-running agreement, per-token
distribution metrics, behaviour drift, and a verdict under a policy.

``compare_dumps(ref, cand)`` checks that the two runs are comparable (same
tokenizer, prompts and decoding settings), then

- free-running (greedy or seeded sampling, both sides generated): per prompt
  the first position where the generated tokens differ, greedy match rates at
  N, the full-sequence exact match rate, and at each split both sides'
  top-1/top-2 margins, classified near-tie vs real divergence;
- per token, at every position where both runs saw the same prefix (every
  position when the candidate was scored on the reference's tokens): the
  fused row metrics of ``compare_logits`` (KL both ways, JS, same top-1,
  top-k overlap, delta-p of the reference token, cosine, max |delta logit|);
- behaviour drift: output length, stop reasons, repeated n-grams, JSON
  validity, entropy and margin shift.

All figures are defined in docs/report.md. The per-token work runs in the C++
core; with ``topk:K`` dumps the KL is computed here over the tokens whose
probability both sides know, plus one tail bucket (a lower bound).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from logitparity._dicts import dig as _get
from logitparity.drift import REPETITION_N, Drift, StopRank, Unit, answer_tokens, is_valid_json, json_complete_at, repeated_ngrams, token_rank
from logitparity.dump import TOKENIZER_IDENTITY
from logitparity.fields import INT_FIELDS, REPORT_FIELDS, ROW_FIELDS, values as _field_values
from logitparity.metrics import RowMetrics, compare_logits, topk as _topk
from logitparity.policy import (
    NoiseFloor,
    Policy,
    Verdict,
    load_policy,
    parse_metric,
    standard_metrics,
)
from logitparity.stats import Rate, describe, rate
from logitparity.topk_rows import TopRows, sorted_top, top_from_full, topk_kl_bounds, topk_row_metrics

__all__ = ["Comparison", "IncompatibleRuns", "IncompleteRuns", "PromptResult", "compare_dumps"]

SPLIT_TOP = 5  # alternatives shown at a split


# --------------------------------------------------------------------------
# Reading the two dumps


def _load(d: Any, name: str):
    from logitparity.dump import Dump, load_dump

    if isinstance(d, (str, os.PathLike)):
        return load_dump(d)
    if not isinstance(d, Dump):
        raise TypeError(f"{name} must be a dump directory path or a Dump (load_dump), got {type(d).__name__}")
    return d


def _mode(manifest: dict) -> str:
    return str(_get(manifest, "decoding", "mode", default="greedy"))


class IncompatibleRuns(ValueError):
    """The two dumps cannot be compared (a ValueError: exit 2 in the CLI)."""


class IncompleteRuns(ValueError):
    """A run marked incomplete, or prompts missing on one side, without
    allow_partial (a ValueError: exit 2 in the CLI). An incomplete run never
    passes silently."""


def incompleteness(ref, cand, only_ref: list[str], only_cand: list[str]) -> list[str]:
    """Why the comparison does not cover both runs whole (empty: it does)."""
    out = []
    for side, d in (("reference", ref), ("candidate", cand)):
        if d.manifest.get("complete") is False:  # absent (a writer that does not say) is not "marked"
            out.append(f"the {side} run is incomplete ({d.path}: manifest complete is "
                       f"{json.dumps(d.manifest.get('complete'))}; an interrupted or running capture)")
    if only_ref:
        out.append(f"the candidate lacks {len(only_ref)} of the reference's {len(ref.records)} prompts "
                   f"({', '.join(repr(i) for i in only_ref[:5])}{', ...' if len(only_ref) > 5 else ''})")
    if only_cand:
        out.append(f"the reference lacks {len(only_cand)} of the candidate's {len(cand.records)} prompts "
                   f"({', '.join(repr(i) for i in only_cand[:5])}{', ...' if len(only_cand) > 5 else ''})")
    return out


def check_tokenizers(ref, cand, notes: list[str]) -> None:
    a, b = ref.manifest.get("tokenizer") or {}, cand.manifest.get("tokenizer") or {}
    for key in TOKENIZER_IDENTITY:
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:
            if va != vb:
                notes.append(f"tokenizer {key} recorded on one side only; not checked")
            continue
        if va != vb:
            from logitparity.validate import set_difference

            raise IncompatibleRuns(
                f"the runs used different tokenizers: tokenizer.{key} differs ({set_difference(va, vb)}); "
                "capture both with the same tokenizer files"
            )


def _short(v: Any) -> str:
    if v is None:
        return "not set"
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


# manifest keys that must agree (docs/dump-format.md)
_DECODING_KEYS = ("temperature", "top_p", "seed", "max_new_tokens", "category_budgets", "stop_token_ids", "eos_token_ids",
                  "repetition_penalty", "logit_processors")


def check_decoding(ref, cand) -> str:
    """-> "free-running" or "teacher-forced"."""
    mr, mc = _mode(ref.manifest), _mode(cand.manifest)
    if mr == "score" and mc != "score":
        raise IncompatibleRuns(
            f"the reference is a score-mode dump and the candidate is {mc!r}: a score-mode reference "
            "needs a candidate scored on the same tokens (dump --mode score --reference-dump REF)"
        )
    if mc == "score":
        return "teacher-forced"
    if mr != mc:
        raise IncompatibleRuns(
            f"decoding mode differs: reference {mr!r}, candidate {mc!r}; capture both in the same mode, "
            "or score the candidate on the reference's tokens (dump --mode score --reference-dump REF)"
        )
    da, db = dict(ref.manifest.get("decoding") or {}), dict(cand.manifest.get("decoding") or {})
    for d, m in ((da, ref.manifest), (db, cand.manifest)):  # dumps without a declared stop rule: the tokenizer's
        if d.get("eos_token_ids") is None and _get(m, "tokenizer", "eos_token_ids") is not None:
            d["eos_token_ids"] = _get(m, "tokenizer", "eos_token_ids")
    keys = [k for k in _DECODING_KEYS if not (mr == "greedy" and k in ("temperature", "top_p", "seed"))]
    for k in keys:
        if k in ("eos_token_ids", "stop_token_ids") and da.get(k) != db.get(k):
            from logitparity.validate import set_difference

            raise IncompatibleRuns(
                f"the engines stop differently (same tokenizer, other stop rule): decoding.{k} differs "
                f"({set_difference(da.get(k), db.get(k))}); make both stop on the same ids, or score the "
                "candidate on the reference's tokens (dump --mode score --reference-dump REF)"
            )
        if da.get(k) != db.get(k):
            raise IncompatibleRuns(
                f"decoding setting {k} differs: reference {_short(da.get(k))}, candidate "
                f"{_short(db.get(k))}; capture both with the same decoding settings"
            )
    return "free-running"


def run_speed(dump) -> dict[str, float | None]:
    """Speed and memory of one run (None where not recorded).

    prefill_tokens_per_s: the manifest's run value, else prompt tokens over
    time to first token summed per batch (each record's ttft_s divided by
    its batch_size); decode_tokens_per_s: the run value, else the mean of the
    records' per-sequence decode tokens/s; tokens_per_s and wall_s: generated
    tokens over wall time, from the run; peak_host_bytes, peak_gpu_bytes.
    """
    run = dump.manifest.get("run") or {}
    toks = secs = 0.0
    dec = []
    for r in dump.records:
        t = r.get("timing") or {}
        if t.get("ttft_s") is not None:
            toks += len(r["prompt_token_ids"])
            secs += float(t["ttft_s"]) / max(1, int(t.get("batch_size") or 1))
        if t.get("decode_tokens_per_s") is not None:
            dec.append(float(t["decode_tokens_per_s"]))
    prefill = run.get("prefill_tokens_per_s")
    decode = run.get("decode_tokens_per_s")
    out = {
        "prefill_tokens_per_s": prefill if prefill is not None else (toks / secs if secs > 0 else None),
        "decode_tokens_per_s": decode if decode is not None else (describe(dec).mean if dec else None),
        "tokens_per_s": run.get("tokens_per_s"),
        "wall_s": run.get("wall_s"),
        "peak_host_bytes": run.get("peak_host_rss_bytes", run.get("peak_host_bytes")),
        "peak_gpu_bytes": run.get("peak_gpu_bytes"),
    }
    return {k: None if v is None else float(v) for k, v in out.items()}


def match_prompts(ref, cand) -> tuple[list[tuple[dict, dict]], list[str], list[str]]:
    by_id = {r["id"]: r for r in cand.records}
    ref_ids = [r["id"] for r in ref.records]
    pairs = []
    for r in ref.records:
        c = by_id.get(r["id"])
        if c is None:
            continue
        if r.get("prompt") != c.get("prompt"):
            raise IncompatibleRuns(
                f"prompt {r['id']!r} has different text in the two dumps "
                f"(reference {_short(r.get('prompt'))}, candidate {_short(c.get('prompt'))}); "
                "capture both from the same prompts file"
            )
        if list(r.get("prompt_token_ids", [])) != list(c.get("prompt_token_ids", [])):
            pa, pc = list(r.get("prompt_token_ids", [])), list(c.get("prompt_token_ids", []))
            i = next((i for i, (x, y) in enumerate(zip(pa, pc)) if x != y), min(len(pa), len(pc)))
            raise IncompatibleRuns(
                f"prompt {r['id']!r} was tokenized differently: prompt_token_ids differ at index {i} "
                f"(lengths {len(pa)} and {len(pc)}); check the tokenizer and the chat template "
                f"(chat_template {r.get('chat_template')!r} vs {c.get('chat_template')!r})"
            )
        pairs.append((r, c))
    only_ref = [i for i in ref_ids if i not in by_id]
    ref_set = set(ref_ids)
    only_cand = [c["id"] for c in cand.records if c["id"] not in ref_set]
    if not pairs:
        raise IncompatibleRuns(
            f"the dumps have no prompt id in common (reference has {len(ref_ids)}, candidate "
            f"{len(by_id)}; e.g. {ref_ids[:3]} vs {list(by_id)[:3]}); capture both from the same prompts file"
        )
    return pairs, only_ref, only_cand


# --------------------------------------------------------------------------
# Per-prompt data


@dataclasses.dataclass
class PromptResult:
    """One prompt of the comparison. Positions count generated tokens from 0.

    first_divergence: first position where the candidate's token differs from
    the reference's (in teacher-forced mode: where the candidate's top-1 on
    the reference prefix differs from the reference token); None when the
    sequences are identical. split: "near-tie" when the reference's top-1
    minus top-2 logit at the split is below the near-tie margin, "real"
    otherwise, "length" when one run stopped and the other went on, None
    without a split. split_top_ref/cand: (token id, probability) of the top
    alternatives at the split.
    """

    id: str
    category: str
    ref_tokens: list[int]
    cand_tokens: list[int]
    stop_ref: str
    stop_cand: str
    first_divergence: int | None
    split: str | None
    margin_ref_at_split: float
    margin_cand_at_split: float
    split_top_ref: list[tuple[int, float]]
    split_top_cand: list[tuple[int, float]]
    n_compared: int
    ref_text: str | None = None
    cand_text: str | None = None

    @property
    def identical(self) -> bool:
        return self.first_divergence is None and self.stop_ref == self.stop_cand

    def matches_at(self, n: int) -> bool:
        """First n tokens identical; a shorter run matches only if both
        stopped identically."""
        if self.first_divergence is None:
            return self.stop_ref == self.stop_cand or min(len(self.ref_tokens), len(self.cand_tokens)) >= n
        return self.first_divergence >= n


# --------------------------------------------------------------------------
def concat_metrics(parts: list[RowMetrics], ks: Iterable[int]) -> RowMetrics:
    names = [f.name for f in ROW_FIELDS + INT_FIELDS]
    kw = {}
    for name in names:
        arrs = [getattr(p, name) for p in parts]
        kw[name] = np.concatenate(arrs) if arrs else np.zeros(0, np.int64 if name.startswith(("arg", "rank", "non")) else np.float64)
    ov = {k: np.concatenate([p.topk_common[k] for p in parts]) if parts else np.zeros(0, np.int32) for k in ks}
    n = int(kw["lse_ref"].shape[0])
    return RowMetrics(**kw, topk_common=ov, shape=(n,))


def _take(m: RowMetrics, mask: np.ndarray) -> RowMetrics:
    kw = {f.name: getattr(m, f.name)[mask] for f in dataclasses.fields(m) if f.name not in ("topk_common", "shape")}
    return RowMetrics(**kw, topk_common={k: v[mask] for k, v in m.topk_common.items()},
                      shape=(int(mask.sum()),))


# --------------------------------------------------------------------------
# Behaviour drift helpers


def auto_decoder(manifest: dict) -> Callable[[Sequence[int]], str] | None:
    """A token-id decoder from the manifest's tokenizer or model directory
    (its tokenizer.json, checked against tokens_hash; no transformers
    import); None when there is none."""
    from logitparity._tokentext import auto_decoder

    return auto_decoder(manifest)


# --------------------------------------------------------------------------
# The comparison


# Speed and memory figures of Comparison.speed_figures: (label, key of
# run_speed, unit, higher_is_better).
SPEED_FIELDS: tuple[tuple[str, str, str, bool], ...] = (
    ("prefill", "prefill_tokens_per_s", "tokens/s", True),
    ("decode, per sequence", "decode_tokens_per_s", "tokens/s", True),
    ("generated tokens over wall time", "tokens_per_s", "tokens/s", True),
    ("wall time", "wall_s", "s", False),
    ("peak host memory", "peak_host_bytes", "MiB", False),
    ("peak GPU memory", "peak_gpu_bytes", "MiB", False),
)


@dataclasses.dataclass
class Comparison:
    """Everything ``compare_dumps`` measured. Figures are computed from the
    fields on demand; ``to_dict`` holds every number."""

    ref_manifest: dict
    cand_manifest: dict
    ref_path: str
    cand_path: str
    mode: str  # "free-running" | "teacher-forced"
    storage: str  # "full" | "topk:K" (the coarser of the two)
    kl_is_bound: bool
    prompts: list[PromptResult]
    only_ref: list[str]
    only_cand: list[str]
    tokens: RowMetrics  # every compared position, all prompts
    token_prompt: np.ndarray  # int64 [rows]: index into prompts
    token_position: np.ndarray  # int64 [rows]: generated-token position
    near_tie_margin: float
    n_values: tuple[int, ...]
    topk: tuple[int, ...]
    notes: list[str]
    policy: Policy | None  # None: judged against the noise floor (judge_settings)
    noise: NoiseFloor | None  # a floor.Floor when loaded from a file
    ref_speed: dict[str, float | None]
    cand_speed: dict[str, float | None]
    verdict: Verdict = dataclasses.field(init=False)
    decode: Callable[[Sequence[int]], str] | None = dataclasses.field(default=None, repr=False)
    # why the comparison does not cover both runs whole (allow_partial); empty when it does
    incomplete: list[str] = dataclasses.field(default_factory=list)
    # floor.judge settings (factor, confidence, resamples, seed, name) of the statistical verdict
    judge_settings: dict[str, Any] | None = None
    # per compared position: True where the row is past a free-running split,
    # from the teacher-forced continuation (the candidate scored on the reference's tokens)
    token_forced: np.ndarray | None = None
    tie_aware: bool = False  # splits classified against the noise floor (else near_tie_margin)
    floor_judgement: Any = dataclasses.field(init=False, default=None)
    # end-of-answer positions with both sides' rank of the stop token (drift.StopRank)
    stop_ranks: list = dataclasses.field(default_factory=list)
    drift_resamples: int = 4096
    drift_seed: int = 0
    _drift: Any = dataclasses.field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.token_forced is None:
            self.token_forced = np.zeros(len(self.tokens), dtype=bool)
        if self.judge_settings is not None:
            from logitparity.floor import judge

            self.verdict, self.floor_judgement = judge(self, self.noise, **self.judge_settings)
        else:
            self.verdict = self.policy.evaluate(self.metric, self.noise)

    # ---- free-running
    @property
    def free_running_available(self) -> bool:
        return self.mode == "free-running" or _mode(self.ref_manifest) != "score"

    def greedy_match(self, n: int) -> Rate:
        """Share of prompts whose first n generated tokens are identical."""
        return rate(sum(p.matches_at(n) for p in self.prompts), len(self.prompts))

    def exact_match(self) -> Rate:
        return rate(sum(p.identical for p in self.prompts), len(self.prompts))

    def divergence_histogram(self) -> list[dict[str, Any]]:
        """Bins [0], [1], [2, 3], [4, 7], ... up to the longest run, then
        "none" (no divergence). Each: {"lo", "hi", "count"} (hi inclusive,
        None for the "none" bin)."""
        longest = max([max(len(p.ref_tokens), len(p.cand_tokens)) for p in self.prompts] + [1])
        bins = [(0, 0)]
        lo = 1
        while lo < longest:
            bins.append((lo, min(2 * lo - 1, longest - 1)))
            lo *= 2
        out = [{"lo": a, "hi": b, "count": 0} for a, b in bins]
        none = 0
        for p in self.prompts:
            d = p.first_divergence
            if d is None:
                none += 1
                continue
            for b in out:
                if b["lo"] <= d <= b["hi"]:
                    b["count"] += 1
                    break
            else:
                out[-1]["count"] += 1
        out.append({"lo": None, "hi": None, "count": none})
        return out

    def splits(self) -> dict[str, int]:
        """Counts of split kinds: near-tie, real, length; and sampled (both
        runs sampled: a split is a different draw, neither kind)."""
        c = collections.Counter(p.split for p in self.prompts if p.split is not None)
        kinds = ("near-tie", "real", "length") + (("sampled",) if self.sampled else ())
        return {k: int(c.get(k, 0)) for k in kinds}

    def real_divergence(self, n: int | None = None) -> Rate:
        """Share of prompts with a real divergence (a split that is not a
        tie, nor one run stopping) before position n (anywhere when None)."""
        k = sum(1 for p in self.prompts if p.split == "real" and (n is None or p.first_divergence < n))
        return rate(k, len(self.prompts))

    @property
    def sampled(self) -> bool:
        """True when the runs were sampled (mode sample): splits are then
        sampling splits, not greedy ones."""
        return _mode(self.ref_manifest) == "sample" or _mode(self.cand_manifest) == "sample"

    @property
    def match_label(self) -> str:
        return "sampled" if self.sampled else "greedy"

    # ---- per token
    def _token_mask(self, positions: int | None = None, prompts: Iterable[int] | None = None) -> np.ndarray:
        m = np.ones(len(self.tokens), dtype=bool)
        if positions is not None:
            m &= self.token_position < positions
        if prompts is not None:
            m &= np.isin(self.token_prompt, np.fromiter(prompts, dtype=np.int64))
        return m

    def token_values(self, field: str, mask: np.ndarray | None = None) -> np.ndarray:
        """Per-token values of a field (logitparity.fields.values)."""
        v = _field_values(self.tokens, field)
        return v if mask is None else v[mask]

    @property
    def speedup(self) -> float | None:
        """Reference wall time / candidate wall time for the same prompts
        (> 1: the candidate is faster; length drift included, since more
        generated tokens cost more time); None when either run lacks it."""
        a, b = self.ref_speed.get("wall_s"), self.cand_speed.get("wall_s")
        return a / b if a and b else None

    @property
    def speedup_valid(self) -> bool:
        """A speedup counts only when the candidate passes and is faster."""
        return bool(self.verdict.passed and self.speedup is not None and self.speedup > 1.0)

    def same_top1(self, mask: np.ndarray | None = None) -> Rate:
        """Share of the selected positions (all by default) where the
        candidate's top-1 token is the reference's."""
        valid = self.tokens.argmax_ref >= 0
        if mask is not None:
            valid = valid & mask
        return rate(int((self.tokens.same_top1 & valid).sum()), int(valid.sum()))

    def token_summary(self, mask: np.ndarray | None = None):
        """RowMetricsSummary of the selected tokens (all by default)."""
        return (self.tokens if mask is None else _take(self.tokens, mask)).summary()

    def prompt_index(self, category: str | None = None) -> list[int]:
        return [i for i, p in enumerate(self.prompts) if category is None or p.category == category]

    def categories(self) -> list[str]:
        return sorted({p.category for p in self.prompts})

    # ---- drift
    @property
    def drift(self) -> Drift:
        """The behaviour-drift figures and their two-sample tests (drift.Drift),
        one unit per prompt."""
        if self._drift is None:
            units = []
            es = self.token_values("entropy_shift")
            ms = self.token_values("margin_shift")
            for i, p in enumerate(self.prompts):
                m = self.token_prompt == i
                e, g = es[m], ms[m]
                e, g = e[np.isfinite(e)], g[np.isfinite(g)]
                ra, ca = self.answer_texts(p)
                units.append(Unit(p.id, p.category, p.ref_tokens, p.cand_tokens, p.stop_ref, p.stop_cand,
                                  ra, ca, float(e.mean()) if e.size else float("nan"),
                                  float(g.mean()) if g.size else float("nan")))
            self._drift = Drift(units, self.stop_ranks, free_running=self.mode == "free-running",
                                decoded=self.decode is not None, resamples=self.drift_resamples, seed=self.drift_seed)
        return self._drift

    def answer_texts(self, p: PromptResult) -> tuple[str | None, str | None]:
        """Both decoded answers without the stop token that ended them (None
        without a decoder)."""
        if self.decode is None:
            return None, None
        return (self.decode(answer_tokens(p.ref_tokens, p.stop_ref)),
                self.decode(answer_tokens(p.cand_tokens, p.stop_cand)))

    def length_ratio(self, idx: Sequence[int] | None = None) -> float:
        idx = range(len(self.prompts)) if idx is None else idx
        r = sum(len(self.prompts[i].ref_tokens) for i in idx)
        c = sum(len(self.prompts[i].cand_tokens) for i in idx)
        return c / r if r else float("nan")

    def stop_reasons(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for p in self.prompts:
            out.setdefault(p.stop_ref, {"reference": 0, "candidate": 0})["reference"] += 1
            out.setdefault(p.stop_cand, {"reference": 0, "candidate": 0})["candidate"] += 1
        return dict(sorted(out.items()))

    def repetition(self, idx: Sequence[int] | None = None) -> tuple[Rate, Rate]:
        idx = range(len(self.prompts)) if idx is None else idx
        out = []
        for side in ("ref_tokens", "cand_tokens"):
            k = n = 0
            for i in idx:
                a, b = repeated_ngrams(getattr(self.prompts[i], side))
                k, n = k + a, n + b
            out.append(rate(k, n))
        return out[0], out[1]

    def json_validity(self) -> tuple[Rate, Rate] | None:
        """Over prompts of category "json"; None without decoded text."""
        jv = self.drift.json_validity()
        return None if jv is None else (jv[0], jv[1])

    # ---- metrics by name (policies)
    def metric(self, name: str) -> tuple[float, str]:
        """-> (value, note) for a metric name (see policy.parse_metric); NaN
        with a note when these dumps cannot give it."""
        s = parse_metric(name)
        if s.kind in ("greedy_match", "exact_match") and not self.free_running_available:
            # two teacher-forced dumps: what greedy decoding of each would
            # do is read from the top-1 of both at every scored position
            return self.forced_top1_match(s.n if s.kind == "greedy_match" else None).rate, \
                "teacher-forced pair: share of prompts whose top-1 agrees at every position < N"
        if s.kind == "drift":
            return self.drift.metric(s.field, s.stat, s.category)
        if s.kind == "real_divergence":
            if self.sampled:
                return float("nan"), "sampled runs: a split is a different draw, not a divergence (compare_sampled)"
            if not self.free_running_available:
                return float("nan"), "needs generated tokens: the reference is a score-mode dump"
            return self.real_divergence(s.n).rate, ""
        if s.kind in ("greedy_match", "exact_match", "length_ratio"):
            if not self.free_running_available:
                return float("nan"), "needs generated tokens: the reference is a score-mode dump"
            if s.kind == "length_ratio":
                if self.mode == "teacher-forced":
                    return float("nan"), "teacher-forced: lengths are the reference's"
                return self.length_ratio(), ""
            r = self.greedy_match(s.n) if s.kind == "greedy_match" else self.exact_match()
            return r.rate, ""
        mask = self._token_mask(s.positions)
        if not mask.any():
            return float("nan"), "no compared positions"
        if s.kind == "same_top1":
            return self.same_top1(mask).rate, ""
        v = self.token_values(s.field, mask)
        n_nan = int(np.isnan(v).sum())
        if n_nan == len(v):
            return float("nan"), f"{s.field} is not defined for these dumps ({self.storage} logits)"
        bad = int((self.tokens.nonfinite_ref[mask] > 0).sum() + (self.tokens.nonfinite_cand[mask] > 0).sum())
        if bad:
            return float("nan"), f"{bad} compared rows hold NaN or +inf logits"
        d = describe(v)
        better = s.higher_is_better
        if d.n_inf and better is False and s.stat != "min":
            return float("inf"), f"{d.n_inf} positions are +inf"
        return float(getattr(d, s.stat)), (f"{n_nan} positions undefined" if n_nan else "")

    def forced_top1_match(self, n: int | None) -> Rate:
        """Share of prompts whose two top-1 tokens agree at every compared
        position < n (all positions when None)."""
        k = 0
        for i in range(len(self.prompts)):
            m = self.token_prompt == i
            if n is not None:
                m &= self.token_position < n
            k += bool(np.all(self.tokens.same_top1[m]))
        return rate(k, len(self.prompts))

    def metrics(self, names: Iterable[str] | None = None) -> dict[str, float]:
        """{metric name: value} (NaN where not measurable) for the given names,
        by default policy.standard_metrics() plus the policy's own."""
        if names is None:
            names = list(dict.fromkeys([*standard_metrics(), *(self.policy.metrics() if self.policy else [])]))
        return {n: self.metric(n)[0] for n in names}

    # ------------------------------------------------------------ figures the renderers show

    def token_summaries(self, mask: np.ndarray | None = None) -> dict[str, Any]:
        """Every per-token figure of the report (fields.REPORT_FIELDS) over the
        selected positions, as describe records, and the same-top-1 rate."""
        out = {field: describe(self.token_values(field, mask)).to_dict() for field in REPORT_FIELDS}
        out["same_top1"] = self.same_top1(mask).to_dict()
        return out

    def speed_figures(self) -> list[dict[str, Any]]:
        """Speed and memory of both runs (run_speed): [{"figure", "key",
        "unit", "higher_is_better", "reference", "candidate", "ratio"}], ratio
        = candidate / reference (None when either is missing); MiB for memory."""
        out = []
        for label, key, unit, better in SPEED_FIELDS:
            a, b = self.ref_speed.get(key), self.cand_speed.get(key)
            if a is None and b is None:
                continue
            scale = 1 / 2**20 if unit == "MiB" else 1.0
            a = None if a is None else a * scale
            b = None if b is None else b * scale
            ratio = b / a if a and b is not None else None
            out.append({"figure": label, "key": key, "unit": unit, "higher_is_better": better,
                        "reference": a, "candidate": b, "ratio": ratio})
        return out

    def category_figures(self) -> list[dict[str, Any]]:
        """Per prompt category: prompts, positions, greedy and exact match,
        the per-token figures and (free-running) the length ratio."""
        rows = []
        for cat in self.categories():
            idx = self.prompt_index(cat)
            mask = np.isin(self.token_prompt, np.asarray(idx, dtype=np.int64))
            ps = [self.prompts[i] for i in idx]
            rows.append({
                "category": cat,
                "prompts": len(idx),
                "positions": int(mask.sum()),
                "greedy_match": {str(n): rate(sum(p.matches_at(n) for p in ps), len(ps)).to_dict()
                                 for n in self.n_values},
                "exact_match": rate(sum(p.identical for p in ps), len(ps)).to_dict(),
                "tokens": self.token_summaries(mask),
                "length_ratio": self.length_ratio(idx) if self.mode == "free-running" else None,
            })
        return rows

    def drift_figures(self) -> dict[str, Any]:
        """Behaviour drift figures (docs/report.md, logitparity.drift):
        entropy and margin shifts, stop-token ranks and the two-sample tests;
        free-running also lengths, stop reasons, repetition and JSON validity.
        ``by_category``: the same per category."""
        ent = describe(self.tokens.entropy_ref), describe(self.tokens.entropy_cand)
        mar = describe(self.tokens.margin_ref), describe(self.tokens.margin_cand)
        dr = self.drift
        full = dr.to_dict()
        out: dict[str, Any] = {
            "entropy_ref": ent[0].to_dict(), "entropy_cand": ent[1].to_dict(),
            "entropy_shift": describe(self.token_values("entropy_shift")).to_dict(),
            "margin_ref": mar[0].to_dict(), "margin_cand": mar[1].to_dict(),
            "margin_shift": describe(self.token_values("margin_shift")).to_dict(),
            "stop_rank": full["stop_rank"], "tests": full["tests"],
            "by_category": {cat: dr.to_dict(cat) for cat in dr.categories()} if self.mode == "free-running" else {},
        }
        if self.mode != "free-running":
            return out
        out.update({
            "length_ref": full["length_ref"],
            "length_cand": full["length_cand"],
            "length_ratio": self.length_ratio(),
            "length_ratio_stats": full["length_ratio"],
            "stop_reasons": full["stop_reasons"],
            "repetition_ref": full["repetition_ref"],
            "repetition_cand": full["repetition_cand"],
            "repetition_n": REPETITION_N,
            "json_valid_ref": full["json_valid_ref"],
            "json_valid_cand": full["json_valid_cand"],
        })
        return out

    def worst_prompts(self, n: int) -> list[int]:
        """Indices of the n worst prompts: real divergences first (earliest
        split first), then near-ties, length and sampled splits, then by mean KL."""
        means = {}
        for i in range(len(self.prompts)):
            v = self.tokens.kl_ref_cand[self.token_prompt == i]
            v = v[~np.isnan(v)]
            means[i] = float(v.mean()) if v.size else 0.0
        order = {"real": 0, "near-tie": 1, "length": 1, "sampled": 1, None: 2}

        def key(i: int) -> tuple:
            p = self.prompts[i]
            d = p.first_divergence if p.first_divergence is not None else 1 << 30
            return (order[p.split], d, -means[i])

        ranked = sorted(range(len(self.prompts)), key=key)
        return [i for i in ranked[:n] if self.prompts[i].split is not None or means[i] > 0]

    def to_dict(self) -> dict[str, Any]:
        from logitparity.report import comparison_dict

        return comparison_dict(self)

    def to_markdown(self, top_worst: int = 5) -> str:
        from logitparity.report import render_markdown

        return render_markdown(self, top_worst=top_worst)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        return f"Comparison({len(self.prompts)} prompts, {len(self.tokens)} positions, {self.verdict})"


def first_diff(a: Sequence[int], b: Sequence[int]) -> int | None:
    n = min(len(a), len(b))
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    if diff.size:
        return int(diff[0])
    return None if len(a) == len(b) else n


def _probs(v: np.ndarray, i: np.ndarray, lse: float) -> list[tuple[int, float]]:
    return [(int(t), float(np.exp(float(x) - lse))) for x, t in zip(v, i)]


def compare_dumps(
    ref: Any,
    cand: Any,
    *,
    policy: "str | os.PathLike[str] | Policy | None" = None,
    noise_floor: "str | os.PathLike[str] | NoiseFloor | None" = None,
    near_tie_margin: float = 0.5,
    n_values: Sequence[int] = (10, 50),
    topk: Sequence[int] = (1, 5, 10),
    threads: int | None = None,
    max_positions: int | None = None,
    decode: "Callable[[Sequence[int]], str] | str | None" = "auto",
    allow_partial: bool = False,
    continuation: Any = None,
    factor: float | None = None,
    confidence: float | None = None,
    resamples: int | None = None,
    seed: int = 0,
    _share: Any = None,
) -> Comparison:
    """Compare a candidate dump with a reference dump (paths or Dump objects).

    policy: built-in name, TOML path or Policy; None (the default) means
    "fp16" without a noise floor and the statistical verdict with one.
    noise_floor: a calibrate file (floor.Floor) or NoiseFloor. With a
    version-2 floor and no policy (or a built-in one) the candidate is judged
    against the floor, paired by position (floor.judge; factor, confidence,
    resamples and seed set the test: default 2x at 95%, 2000 resamples, seed
    0), and free-running splits are classified against the floor's margin
    spread and the candidate dtype's rounding step. near_tie_margin: without
    a floor, a split where the reference's top-1 minus top-2 logit is below
    this is a near-tie. continuation: a score-mode dump of the candidate on
    the reference's tokens; past each free-running split its rows are
    compared too (teacher-forced), so a bug behind a tie is still seen.
    n_values: the N of greedy match at N reported. topk: k values of the top-k
    overlap. max_positions: compare at most this many positions per prompt.
    decode: "auto" (tokenizer from the manifest, local files only), a function
    ids -> text, or None (show ids). Raises IncompatibleRuns (a ValueError)
    naming what differs when the runs cannot be compared, and IncompleteRuns
    when a run is marked incomplete or prompts are missing on one side,
    unless ``allow_partial`` (then ``Comparison.incomplete`` says why and the
    report says so first). Split across torchrun's ranks with
    ``logitparity.distributed.compare_ranks`` (``_share``: this rank's
    prompts; rank 0 gathers and returns the same Comparison, the others None).
    """
    if not isinstance(near_tie_margin, (int, float)) or isinstance(near_tie_margin, bool) or not near_tie_margin >= 0:
        raise ValueError(f"near_tie_margin must be a number >= 0 (logits), got {near_tie_margin!r}")
    n_values = tuple(int(n) for n in n_values)
    if any(n < 1 for n in n_values):
        raise ValueError(f"n_values must be positive token counts, got {n_values}")
    if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1):
        raise ValueError(f"max_positions must be a positive int or None, got {max_positions!r}")
    from logitparity.floor import (DEFAULT_CONFIDENCE, DEFAULT_FACTOR, DEFAULT_RESAMPLES, TIE_FACTOR, check_settings,
                                   load_floor, tie_tolerance)
    from logitparity.policy import FLOOR_FACTORS

    noise = None if noise_floor is None else load_floor(noise_floor)
    settings = None
    if noise is not None and (policy is None or (isinstance(policy, str) and policy in FLOOR_FACTORS)):
        if noise.version < 2:
            raise ValueError(
                f"noise-floor file {noise.source!r} is version 1 (aggregate metrics only, no per-position "
                "figures); the statistical verdict needs version 2: re-run `logitparity calibrate`, or pass a "
                "TOML policy with noise_factor thresholds to use the old file"
            )
        settings = {
            "factor": float(factor if factor is not None else FLOOR_FACTORS.get(policy, DEFAULT_FACTOR)),
            "confidence": float(confidence if confidence is not None else DEFAULT_CONFIDENCE),
            "resamples": int(resamples if resamples is not None else DEFAULT_RESAMPLES), "seed": int(seed),
            "name": "noise-floor" if policy is None else f"{policy} (noise-floor relative)",
        }
        check_settings(settings["factor"], settings["confidence"], settings["resamples"])
        pol = None
    else:
        if factor is not None or confidence is not None or resamples is not None:
            raise ValueError("factor, confidence and resamples set the noise-floor verdict: pass noise_floor=FILE "
                             "(a version-2 file from `logitparity calibrate`) and no TOML policy")
        pol = load_policy("fp16" if policy is None else policy)
        for t in pol.thresholds:  # fail before the expensive part
            t.effective_limit(noise.get(t.metric) if noise else None)
    ref_d, cand_d = _load(ref, "ref"), _load(cand, "cand")
    cont_d = None if continuation is None else _load(continuation, "continuation")
    notes: list[str] = []
    check_tokenizers(ref_d, cand_d, notes)
    mode = check_decoding(ref_d, cand_d)
    pairs, only_ref, only_cand = match_prompts(ref_d, cand_d)
    incomplete = incompleteness(ref_d, cand_d, only_ref, only_cand)
    if incomplete and not allow_partial:
        raise IncompleteRuns(
            "incomplete input: " + "; ".join(incomplete) + ". Finish the capture (dump --resume), or pass "
            "--allow-partial (allow_partial=True) to judge only what is there"
        )
    if cont_d is not None:
        if mode != "free-running":
            raise ValueError("continuation is for a free-running candidate; this candidate is already "
                             "teacher-forced (every position is compared)")
        if _mode(cont_d.manifest) != "score":
            raise ValueError(f"continuation {cont_d.path} must be a score-mode dump of the candidate on the "
                             f"reference's tokens (dump --mode score --reference-dump REF), got mode "
                             f"{_mode(cont_d.manifest)!r}")
        if cont_d.k is not None or ref_d.k is not None or cand_d.k is not None:
            raise ValueError("continuation needs full logits in the reference, the candidate and the continuation "
                             "dump (they store top-K)")
        check_tokenizers(ref_d, cont_d, [])
        cont_records = {r["id"]: r for r in cont_d.records}
    tie_dtype = str(cand_d.manifest.get("dtype", "fp32"))
    sampled = _mode(ref_d.manifest) == "sample" and _mode(cand_d.manifest) == "sample"
    stop_ids = sorted({int(t) for t in (_get(ref_d.manifest, "decoding", "eos_token_ids")
                                          or _get(ref_d.manifest, "tokenizer", "eos_token_ids") or [])}
                      | {int(t) for t in (_get(ref_d.manifest, "decoding", "stop_token_ids") or [])})
    stop_ranks: list[StopRank] = []
    tie_aware = noise is not None and noise.version >= 2

    # Dump.k: None for full storage, K for topk:K (checked by load_dump)
    use_topk = ref_d.k is not None or cand_d.k is not None
    k_top = min(k for k in (ref_d.k, cand_d.k) if k is not None) if use_topk else None
    ks = tuple(sorted({int(k) for k in topk}))
    if use_topk:
        dropped = [k for k in ks if k > k_top]
        if dropped:
            notes.append(f"{', '.join(f'top-{k}' for k in dropped)} overlap not computed: the dumps store only "
                         f"the top {k_top} logits")
        ks = tuple(k for k in ks if k <= k_top)
        notes.append(
            f"logits stored as top-{k_top}: KL and JS are computed over the tokens both sides store plus one "
            "tail bucket, a lower bound on the full-vocabulary value; cosine and entropy are not available"
        )
    bf16_a, bf16_b = ref_d.logits_dtype == "bf16", cand_d.logits_dtype == "bf16"

    if not (decode is None or callable(decode) or decode == "auto"):
        raise TypeError(f"decode must be 'auto', None or a function ids -> text, got {decode!r}")
    dec = (auto_decoder(ref_d.manifest) or auto_decoder(cand_d.manifest)) if decode == "auto" else decode

    va, vb = int(ref_d.vocab_size or 0), int(cand_d.vocab_size or 0)
    v = min(va, vb)
    if va != vb:
        real = tokenizer_size(ref_d.manifest)
        if real is not None and real > v:
            raise IncompatibleRuns(
                f"logit rows have different widths (reference {va}, candidate {vb}) and the narrower is "
                f"below the tokenizer's {real} tokens: one run dropped real tokens; capture both with the same model"
            )
        notes.append(
            f"padded vocabulary: the reference stores {va} logits per position, the candidate {vb}; "
            f"compared over the common first {v}"
            + (f" (the tokenizer has {real} tokens)" if real is not None else "")
        )

    pad_worst = 0.0
    prompts: list[PromptResult] = []
    parts: list[RowMetrics] = []
    tok_prompt: list[np.ndarray] = []
    tok_pos: list[np.ndarray] = []
    tok_forced: list[np.ndarray] = []
    mismatch_top1 = {"reference": 0, "candidate": 0}
    kl_widths: list[np.ndarray] = []
    for pi, (r, c) in enumerate(pairs):
        if _share is not None and not _share.mine(pi):
            continue  # another rank's prompt
        rid = r["id"]
        rt = [int(t) for t in r["generated_token_ids"]]
        ct = [int(t) for t in c["generated_token_ids"]]
        if mode == "teacher-forced" and ct != rt:
            raise IncompatibleRuns(
                f"prompt {rid!r}: the candidate was scored on other tokens than the reference generated "
                f"(they differ at position {first_diff(rt, ct)}); score it on this reference: "
                "dump --mode score --reference-dump REF"
            )
        # rows computed by both sides from the same prefix
        if mode == "teacher-forced":
            d = None
            n_rows = len(rt)
        else:
            d = first_diff(rt, ct)
            n_rows = min(len(rt), len(ct)) if d is None else min(d + 1, len(rt), len(ct))
        if max_positions is not None:
            n_rows = min(n_rows, max_positions)
        if va != vb:  # a padded vocabulary: only when the cut columns provably hold no mass
            from logitparity.dump import PAD_MASS_BOUND

            wide, side = (ref_d, "reference") if va > vb else (cand_d, "candidate")
            mass = wide.mass_beyond(rid, v)
            worst = float(np.nanmax(mass)) if mass.size and not np.isnan(mass).all() else 0.0
            if worst > PAD_MASS_BOUND:
                raise IncompatibleRuns(
                    f"prompt {rid!r}: the {side}'s rows are wider ({max(va, vb)} vs {v}) and its columns from {v} "
                    f"on hold up to {worst:.3g} of the probability (row {int(np.nanargmax(mass))}); a padded "
                    f"vocabulary is compared over the common columns only when that is <= {PAD_MASS_BOUND:g} "
                    "(top-K rows count their whole tail): capture both with the same vocabulary width"
                )
            pad_worst = max(pad_worst, worst)
        tgt_all = np.asarray(rt, dtype=np.int64)
        if tgt_all.size and int(tgt_all.max()) >= v:
            raise IncompatibleRuns(
                f"prompt {rid!r}: reference token id {int(tgt_all.max())} is outside the compared vocabulary of {v}"
            )
        full_a = None if use_topk else ref_d.logits(rid)
        full_b = None if use_topk else cand_d.logits(rid)

        def pair(rows: slice):
            """(RowMetrics, ref side, cand side) of rows of this prompt."""
            if use_topk:
                a = _side_top(ref_d, rid, k_top, rows, v, bf16_a, threads)
                b = _side_top(cand_d, rid, k_top, rows, v, bf16_b, threads)
                return topk_row_metrics(a, b, tgt_all[rows], ks, v), a, b
            a, b = full_a[rows, :v], full_b[rows, :v]
            return compare_logits(a, b, targets=tgt_all[rows], topk=ks, threads=threads, js=True,
                                  ref_bf16=bf16_a, cand_bf16=bf16_b), a, b

        m, A, B = pair(slice(0, n_rows)) if n_rows else (None, None, None)
        if m is not None and not (ref_d.lse_known and cand_d.lse_known):  # top-K engines without lse
            wb = topk_kl_bounds(A, B, v)
            kl_widths.append(wb.width_ref_cand[wb.unknown])
        tgt = tgt_all[:n_rows]
        if mode == "teacher-forced" and m is not None:
            agree = m.argmax_cand == tgt
            d = None if agree.all() else int(np.argmin(agree))
        if m is not None:
            if _mode(ref_d.manifest) == "greedy":
                mismatch_top1["reference"] += int((m.argmax_ref != tgt).sum())
            if mode == "free-running" and _mode(cand_d.manifest) == "greedy":
                mismatch_top1["candidate"] += int((m.argmax_cand != np.asarray(ct[:n_rows])).sum())
        split, mr_s, mc_s, top_r, top_c = None, float("nan"), float("nan"), [], []
        if d is not None and d >= min(len(rt), len(ct)):
            split = "length"
        elif d is not None:
            # the split row, both sides from the same prefix (computed on its
            # own when max_positions stopped short of it)
            ms, As, Bs, j = (m, A, B, d) if d < n_rows else (*pair(slice(d, d + 1)), 0)
            mr_s, mc_s = float(ms.margin_ref[j]), float(ms.margin_cand[j])
            top_r = _split_top(As, j, bf16_a, float(ms.lse_ref[j]), threads)
            top_c = _split_top(Bs, j, bf16_b, float(ms.lse_cand[j]), threads)
            if sampled:
                split = "sampled"  # a different draw: margins of the raw logits do not classify it
            elif tie_aware:
                # the reference's top-1 logit: lse + log p(top-1)
                top1 = float(ms.lse_ref[j]) + math.log(top_r[0][1]) if top_r and top_r[0][1] > 0 else 0.0
                tol = tie_tolerance(noise, str(rid), rt, d, top1, tie_dtype)
                split = "near-tie" if mr_s <= tol else "real"
            else:
                split = "near-tie" if mr_s < near_tie_margin else "real"
        if mode == "teacher-forced":
            # the candidate's would-be greedy continuation: the reference's
            # tokens up to the split, then its own top-1 there
            cand_tokens = rt if d is None else rt[:d] + [int(m.argmax_cand[d])]
            stop_c = str(r["stop_reason"]) if d is None else "diverged"
        else:
            cand_tokens, stop_c = ct, str(c["stop_reason"])
        pr = PromptResult(
            id=str(rid), category=str(r.get("category", "")), ref_tokens=rt, cand_tokens=cand_tokens,
            stop_ref=str(r["stop_reason"]), stop_cand=stop_c, first_divergence=d, split=split,
            margin_ref_at_split=mr_s, margin_cand_at_split=mc_s, split_top_ref=top_r, split_top_cand=top_c,
            n_compared=n_rows,
        )
        if dec is not None:
            pr.ref_text, pr.cand_text = dec(rt), dec(cand_tokens)
        prompts.append(pr)
        if m is not None:
            parts.append(m)
            tok_prompt.append(np.full(n_rows, pi, dtype=np.int64))
            tok_pos.append(np.arange(n_rows, dtype=np.int64))
            tok_forced.append(np.zeros(n_rows, dtype=bool))
        if cont_d is not None and d is not None and split != "length" and d + 1 < len(rt):
            cr = cont_records.get(rid)
            if cr is None or [int(t) for t in cr["generated_token_ids"]] != rt:
                raise IncompatibleRuns(
                    f"prompt {rid!r}: the continuation dump {cont_d.path} did not score this reference's tokens; "
                    "make it with dump --mode score --reference-dump REF"
                )
            hi = len(rt) if max_positions is None else min(len(rt), max_positions)
            if d + 1 < hi:
                rows = slice(d + 1, hi)
                a = full_a[rows, :v]
                b = cont_d.logits(rid)[rows, :v]
                mc = compare_logits(a, b, targets=tgt_all[rows], topk=ks, threads=threads, js=True,
                                    ref_bf16=bf16_a, cand_bf16=cont_d.logits_dtype == "bf16")
                parts.append(mc)
                tok_prompt.append(np.full(hi - d - 1, pi, dtype=np.int64))
                tok_pos.append(np.arange(d + 1, hi, dtype=np.int64))
                tok_forced.append(np.ones(hi - d - 1, dtype=bool))
                pr.n_compared += hi - d - 1
        if not use_topk and stop_ids and m is not None:
            cont_rows = None
            if cont_d is not None and d is not None and split != "length" and d + 1 < len(rt):
                cont_rows = (d + 1, cont_d.logits(rid))
            stop_ranks += _stop_ranks(pi, r, rt, _float_rows(full_a, bf16_a), _float_rows(full_b, bf16_b), n_rows,
                                      None if cont_rows is None else
                                      (cont_rows[0], _float_rows(cont_rows[1], cont_d.logits_dtype == "bf16")),
                                      stop_ids, v, dec)
    if _share is not None:  # every rank's results, back in the one-process order, on rank 0
        mine = [pi for pi in range(len(pairs)) if _share.mine(pi)]
        got = _share.collect((list(zip(mine, prompts)), list(zip(parts, tok_prompt, tok_pos, tok_forced)),
                              mismatch_top1, kl_widths, pad_worst, stop_ranks))
        if got is None:
            return None  # type: ignore[return-value]  # not rank 0
        indexed, chunks, kl_widths, stop_ranks = [], [], [], []
        mismatch_top1 = {side: sum(g[2][side] for g in got) for side in mismatch_top1}
        for ps, cs, _, widths, pw, sr in got:
            indexed += ps
            chunks += cs
            kl_widths += widths
            pad_worst = max(pad_worst, pw)
            stop_ranks += sr
        prompts = [pr for _, pr in sorted(indexed, key=lambda t: t[0])]
        chunks.sort(key=lambda ch: int(ch[1][0]))  # stable: a prompt's own rows, then its continuation's
        parts, tok_prompt, tok_pos, tok_forced = (list(x) for x in zip(*chunks)) if chunks else ([], [], [], [])
        stop_ranks.sort(key=lambda s: (s.unit, s.position))  # the one-process order: by prompt, then position
    if sampled:
        notes.append("both runs were sampled: splits are different draws (labelled sampled, not classified by "
                     "greedy margins); compare the sampled-from distributions with compare_sampled "
                     "(logitparity compare on sample sets, docs/report.md)")
    if va != vb:
        notes.append(f"padded vocabulary: the wider rows hold at most {pad_worst:.3g} of the probability beyond "
                     f"column {v} (accepted up to 1e-06)")
    if mode == "teacher-forced":
        notes.append(
            "teacher-forced: the candidate was scored on the reference's tokens; its first divergence is the "
            "first position where its top-1 differs from the reference token (what greedy decoding would do)"
        )
    for side, count in mismatch_top1.items():
        if count:
            notes.append(
                f"{side}: {count} compared positions where the generated token is not the top-1 of the stored "
                "logits (ties, or a logit processor was active during capture)"
            )
    if not (ref_d.lse_known and cand_d.lse_known):
        w = np.concatenate(kl_widths) if kl_widths else np.zeros(0)
        sides = " and ".join(n for n, d in (("reference", ref_d), ("candidate", cand_d)) if not d.lse_known)
        notes.append(
            f"the {sides} stored top-{k_top} logits without their log-sum-exp (logits.lse = 'unknown'): KL is the "
            "lowest value over every admissible normalizer (unstored logits at most the K-th, tail mass >= 0), a "
            f"lower bound; the KL(ref || cand) range width over {w.size} rows: median {np.median(w) if w.size else float('nan'):.4g}, "
            f"max {w.max() if w.size else float('nan'):.4g} nats (inf: the tail may be empty while the other side has "
            "mass there); NLL, delta-p and JS are not available for those rows"
        )
    if only_ref or only_cand:
        notes.append(f"prompts on one side only (not compared): reference {len(only_ref)}, candidate {len(only_cand)}")
    if cont_d is not None:
        n_forced = int(sum(int(f.sum()) for f in tok_forced))
        notes.append(f"past each free-running split the candidate is compared teacher-forced on the reference's "
                     f"tokens ({n_forced} positions from {cont_d.path})")
    if tie_aware:
        notes.append(f"splits classified against the noise floor: a near-tie when the reference's top-1 margin is "
                     f"within {TIE_FACTOR:g}x the floor's margin movement (at the split, or its p99) or the {tie_dtype} "
                     "rounding step at the top-1 logit")
    tokens = concat_metrics(parts, ks)
    storage = "full" if not use_topk else f"topk:{k_top}"
    return Comparison(
        ref_manifest=ref_d.manifest, cand_manifest=cand_d.manifest,
        ref_path=str(ref_d.path), cand_path=str(cand_d.path),
        mode=mode, storage=storage, kl_is_bound=use_topk, prompts=prompts,
        only_ref=only_ref, only_cand=only_cand, tokens=tokens,
        token_prompt=np.concatenate(tok_prompt) if tok_prompt else np.zeros(0, np.int64),
        token_position=np.concatenate(tok_pos) if tok_pos else np.zeros(0, np.int64),
        near_tie_margin=float(near_tie_margin), n_values=n_values, topk=ks, notes=notes,
        policy=pol, noise=noise, ref_speed=run_speed(ref_d), cand_speed=run_speed(cand_d), decode=dec,
        incomplete=incomplete,
        judge_settings=settings, token_forced=np.concatenate(tok_forced) if tok_forced else np.zeros(0, bool),
        tie_aware=tie_aware, stop_ranks=stop_ranks,
    )


class _float_rows:
    """Rows of a dump as float32 on access (bf16 dumps store uint16 bit
    patterns, which do not order like the values)."""

    def __init__(self, x, bf16: bool):
        self.x, self.bf16 = x, bf16
        self.shape = x.shape

    def __getitem__(self, key):
        from logitparity.dump import bf16_to_float32

        y = self.x[key]
        return bf16_to_float32(np.asarray(y)) if self.bf16 else np.asarray(y, dtype=np.float32)


def _stop_ranks(pi: int, rec: dict, rt: list[int], full_a, full_b, n_rows: int, cont_rows, stop_ids: list[int],
                v: int, dec) -> list[StopRank]:
    """End-of-answer positions of one prompt where both sides' rows come from
    the same prefix (compared rows, or the teacher-forced continuation):
    where the reference emitted a stop token (the rank of that token), and in
    a json prompt the first row after complete JSON (the best rank of any
    stop id on each side)."""
    def rows(j: int):
        if j < n_rows:
            return full_a[j, :v], full_b[j, :v]
        if cont_rows is not None and j >= cont_rows[0] and j < cont_rows[1].shape[0]:
            return full_a[j, :v], cont_rows[1][j, :v]
        return None

    out = []
    ids = [t for t in stop_ids if t < v]
    if rt and str(rec.get("stop_reason")) in ("eos", "stop_token") and rt[-1] in ids:
        ab = rows(len(rt) - 1)
        if ab is not None:
            out.append(StopRank(pi, len(rt) - 1, token_rank(ab[0], rt[-1]), token_rank(ab[1], rt[-1]), "eos"))
    if dec is not None and str(rec.get("category", "")) == "json" and ids:
        j = json_complete_at(rt, dec)
        if j is not None and j < len(rt) and not (out and out[-1].position == j):
            ab = rows(j)
            if ab is not None:
                out.append(StopRank(pi, j, min(token_rank(ab[0], t) for t in ids),
                                    min(token_rank(ab[1], t) for t in ids), "json"))
    return out


def tokenizer_size(manifest: dict) -> int | None:
    v = _get(manifest, "tokenizer", "vocab_size")
    return None if v is None else int(v)


def _side_top(dump, rid, k: int, rows: slice, v: int, bf16: bool, threads) -> TopRows:
    """Top-k view of one prompt's rows over the first v tokens."""
    if dump.k is None:
        return top_from_full(dump.logits(rid)[rows, :v], k, bf16, threads)
    vals, idx, lse, tail = dump.topk(rid)
    # keep every stored token (the stored set defines the tail), sorted by value
    vals, idx = sorted_top(np.asarray(vals[rows], np.float64), np.asarray(idx[rows], np.int64))
    return TopRows(vals, idx, np.asarray(lse[rows], np.float64), np.asarray(tail[rows], np.float64))


def _split_top(x, j: int, bf16: bool, lse: float, threads) -> list[tuple[int, float]]:
    """(token id, probability) of the top SPLIT_TOP tokens of row j."""
    if isinstance(x, TopRows):
        return _probs(x.values[j, :SPLIT_TOP], x.indices[j, :SPLIT_TOP], float(x.lse[j]))
    vals, idx = _topk(x[j:j + 1], min(SPLIT_TOP, x.shape[1]), threads=threads, bf16=bf16)
    return _probs(vals[0], idx[0], lse)
