"""Behaviour drift that can gate: what users see of an output, measured on
both runs and tested as two samples.

The units are pairs: one prompt (and in sampled runs one seed) seen by both
sides. Per unit: the generated tokens of each side, their stop reasons,
their decoded text, the category, and the per-position entropy and top-1
margin shifts where both sides saw the same prefix. Per end-of-answer
position (the reference emitted a stop token there, or its text up to there
is complete JSON in a ``json`` prompt): the rank of the stop token in each
side's row (0 = the top-1; ties broken by lower index, as everywhere).

Figures (names as in ``logitparity.fields.DRIFT_FIELDS``; each may be asked
of one category, ``length_ratio.p95[json]``):

- ``length_ratio``: Σ candidate tokens / Σ reference tokens; with a
  statistic (mean, median, p95, min, max) over the per-unit ratios
  len(cand) / len(ref); ``length_p``: the paired permutation test of the
  mean length difference; ``length_mw_p``: Mann–Whitney on the two samples.
- ``stop_reason_tv``: total variation between the stop-reason shares;
  ``stop_reason_p``: the paired permutation test with that statistic.
- ``repetition_ref|cand``: repeated n-grams (n = REPETITION_N) over all
  n-grams; ``repetition_shift`` cand − ref; ``repetition_p``: paired test of
  the rate difference.
- ``json_valid_ref|cand``: share of ``json`` prompts whose text parses with
  the json module (after one optional code fence); ``json_valid_shift``;
  ``json_valid_p``: exact McNemar on the paired outcomes.
- ``token_frequency_js``: Jensen–Shannon divergence (nats) of the two
  unigram distributions of generated tokens; ``token_frequency_p``.
- ``stop_rank``, ``stop_rank_ref``, ``stop_rank_shift``: per end-of-answer
  position, the candidate's rank, the reference's, and their difference.
- ``entropy_shift_p``, ``margin_shift_p``: paired sign-flip test of the
  per-unit mean shift (H0: no shift).

Lengths, stop reasons, repetition and JSON need a free-running candidate;
for a teacher-forced one they are NaN with a note.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Any, Sequence

import numpy as np

from logitparity.stats import describe, rate
from logitparity.twosample import (DEFAULT_RESAMPLES, TestResult, js_frequencies, mann_whitney, mean_difference,
                                   paired_permutation, total_variation)

__all__ = ["Drift", "Unit", "answer_tokens", "is_valid_json", "json_complete_at", "repeated_ngrams", "token_rank", "REPETITION_N"]

REPETITION_N = 4  # n-gram length for the repetition rate
JSON_CATEGORY = "json"


@dataclasses.dataclass
class Unit:
    """One pair of outputs (see the module docstring). ref_text, cand_text:
    the decoded answers without the stop token that ended them
    (answer_tokens)."""

    id: str
    category: str
    ref_tokens: list[int]
    cand_tokens: list[int]
    stop_ref: str
    stop_cand: str
    ref_text: str | None = None
    cand_text: str | None = None
    entropy_shift: float = float("nan")  # mean over this unit's compared positions
    margin_shift: float = float("nan")


def repeated_ngrams(tokens: Sequence[int], n: int = REPETITION_N) -> tuple[int, int]:
    """-> (repeated, total): n-grams of ``tokens`` that occurred earlier in
    the same sequence, out of all n-grams (len - n + 1)."""
    seen: set[tuple[int, ...]] = set()
    rep = 0
    total = max(0, len(tokens) - n + 1)
    for i in range(total):
        g = tuple(tokens[i:i + n])
        if g in seen:
            rep += 1
        else:
            seen.add(g)
    return rep, total


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*?)\n?```\s*$", re.S)


def is_valid_json(text: str) -> bool:
    """The text parses as JSON after stripping whitespace and one optional
    markdown code fence (```json ... ```)."""
    s = text.strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1).strip()
    if not s:
        return False
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


STOP_REASONS_WITH_TOKEN = ("eos", "stop_token")


def answer_tokens(tokens: Sequence[int], stop_reason: str) -> list[int]:
    """The answer without the stop token that ended it (the text a user sees:
    an EOS decodes to a special-token string that no JSON parser accepts)."""
    t = list(tokens)
    return t[:-1] if t and stop_reason in STOP_REASONS_WITH_TOKEN else t


def json_complete_at(tokens: Sequence[int], decode: Any) -> int | None:
    """The first position j (counting generated tokens from 0) whose row
    follows complete JSON: the text of tokens[:j] ends with a closing brace,
    bracket or code fence and parses (is_valid_json); None when there is
    none."""
    for j in range(1, len(tokens) + 1):
        text = decode(list(tokens[:j])).rstrip()
        if text.endswith(("}", "]", "```")) and is_valid_json(text):
            return j
    return None


def token_rank(row: np.ndarray, token: int) -> int:
    """0-based rank of ``token`` in a logit row: entries larger than its
    logit, plus equal ones at a lower index (ties by lower index)."""
    x = np.asarray(row)
    v = x[token]
    return int((x > v).sum() + (x[:token] == v).sum())


@dataclasses.dataclass(frozen=True)
class StopRank:
    unit: int
    position: int
    rank_ref: int
    rank_cand: int
    where: str  # "eos" (the reference stopped here) or "json" (complete JSON before this row)


class Drift:
    """The drift figures of a set of units (module docstring).

    free_running: False when the candidate was teacher-forced (its lengths
    and stop reasons are the reference's). resamples, seed: of the
    permutation tests (exact when 2^pairs <= resamples).
    """

    def __init__(self, units: Sequence[Unit], stop_ranks: Sequence[StopRank] = (), *, free_running: bool = True,
                 decoded: bool = True, resamples: int = DEFAULT_RESAMPLES, seed: int = 0):
        self.units = list(units)
        self.stop_ranks = list(stop_ranks)
        self.free_running = free_running
        self.decoded = decoded
        self.resamples = int(resamples)
        self.seed = int(seed)
        self._tests: dict[tuple[str, str | None], TestResult | None] = {}

    # ---- selection
    def categories(self) -> list[str]:
        return sorted({u.category for u in self.units})

    def _idx(self, category: str | None) -> list[int]:
        return [i for i, u in enumerate(self.units) if category is None or u.category == category]

    # ---- figures
    def lengths(self, category: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        idx = self._idx(category)
        return (np.array([len(self.units[i].ref_tokens) for i in idx], np.float64),
                np.array([len(self.units[i].cand_tokens) for i in idx], np.float64))

    def length_ratio(self, stat: str = "total", category: str | None = None) -> float:
        r, c = self.lengths(category)
        if stat == "total":
            return float(c.sum() / r.sum()) if r.sum() > 0 else float("nan")
        ok = r > 0
        if not ok.any():
            return float("nan")
        d = describe(c[ok] / r[ok])
        return float(getattr(d, stat))

    def stop_reasons(self, category: str | None = None) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for i in self._idx(category):
            u = self.units[i]
            out.setdefault(u.stop_ref, {"reference": 0, "candidate": 0})["reference"] += 1
            out.setdefault(u.stop_cand, {"reference": 0, "candidate": 0})["candidate"] += 1
        return dict(sorted(out.items()))

    def repetition(self, category: str | None = None):
        out = []
        for side in ("ref_tokens", "cand_tokens"):
            k = n = 0
            for i in self._idx(category):
                a, b = repeated_ngrams(getattr(self.units[i], side))
                k, n = k + a, n + b
            out.append(rate(k, n))
        return out[0], out[1]

    def json_units(self, category: str | None = None) -> list[int]:
        cat = JSON_CATEGORY if category in (None, JSON_CATEGORY) else None
        return [] if cat is None else [i for i in self._idx(cat)]

    def json_validity(self, category: str | None = None):
        """(reference rate, candidate rate) over the json units; None without
        json units or decoded text."""
        idx = self.json_units(category)
        if not idx or any(self.units[i].ref_text is None or self.units[i].cand_text is None for i in idx):
            return None
        vr = [is_valid_json(self.units[i].ref_text) for i in idx]
        vc = [is_valid_json(self.units[i].cand_text) for i in idx]
        return rate(sum(vr), len(idx)), rate(sum(vc), len(idx)), vr, vc

    def stop_rank_values(self, which: str, category: str | None = None) -> np.ndarray:
        keep = set(self._idx(category))
        rows = [s for s in self.stop_ranks if s.unit in keep]
        if which == "stop_rank":
            return np.array([s.rank_cand for s in rows], np.float64)
        if which == "stop_rank_ref":
            return np.array([s.rank_ref for s in rows], np.float64)
        return np.array([s.rank_cand - s.rank_ref for s in rows], np.float64)

    # ---- two-sample tests
    def test(self, name: str, category: str | None = None) -> TestResult | None:
        """The named test (length, length_mw, stop_reason, repetition,
        token_frequency, json_valid, entropy_shift, margin_shift) over a
        category; None where it cannot be run."""
        key = (name, category)
        if key not in self._tests:
            self._tests[key] = self._run_test(name, category)
        return self._tests[key]

    def _perm(self, r, c, stat, name) -> TestResult:
        return paired_permutation(r, c, stat, name=name, resamples=self.resamples, seed=self.seed)

    def _run_test(self, name: str, category: str | None) -> TestResult | None:
        idx = self._idx(category)
        units = [self.units[i] for i in idx]
        if not units:
            return None
        if name in ("entropy_shift", "margin_shift"):
            d = np.array([getattr(u, name) for u in units], np.float64)
            d = d[np.isfinite(d)]
            if not d.size:
                return None
            return self._perm(np.zeros_like(d), d, mean_difference(d.size), name)
        if not self.free_running:
            return None
        if name == "length":
            r, c = self.lengths(category)
            return self._perm(r, c, mean_difference(len(r)), name)
        if name == "length_mw":
            r, c = self.lengths(category)
            return mann_whitney(c, r, name=name)
        if name == "stop_reason":
            reasons = sorted({u.stop_ref for u in units} | {u.stop_cand for u in units})
            col = {s: j for j, s in enumerate(reasons)}
            r, c = np.zeros((len(units), len(reasons))), np.zeros((len(units), len(reasons)))
            for i, u in enumerate(units):
                r[i, col[u.stop_ref]] = 1
                c[i, col[u.stop_cand]] = 1
            return self._perm(r, c, total_variation, name)
        if name == "repetition":
            r = np.array([repeated_ngrams(u.ref_tokens) for u in units], np.float64)
            c = np.array([repeated_ngrams(u.cand_tokens) for u in units], np.float64)

            def shift(a, b):
                with np.errstate(invalid="ignore", divide="ignore"):
                    return np.nan_to_num(np.abs(b[:, 0] / b[:, 1] - a[:, 0] / a[:, 1]))
            return self._perm(r, c, shift, name)
        if name == "token_frequency":
            vocab = sorted({t for u in units for t in u.ref_tokens} | {t for u in units for t in u.cand_tokens})
            col = {t: j for j, t in enumerate(vocab)}
            r, c = np.zeros((len(units), len(vocab))), np.zeros((len(units), len(vocab)))
            for i, u in enumerate(units):
                for t, k in collections.Counter(u.ref_tokens).items():
                    r[i, col[t]] = k
                for t, k in collections.Counter(u.cand_tokens).items():
                    c[i, col[t]] = k
            return self._perm(r, c, js_frequencies, name)
        if name == "json_valid":
            jv = self.json_validity(category)
            if jv is None:
                return None
            from logitparity.tasks import mcnemar_exact

            vr, vc = jv[2], jv[3]
            b = sum(1 for a, z in zip(vr, vc) if a and not z)
            c2 = sum(1 for a, z in zip(vr, vc) if z and not a)
            return TestResult(name, float(b - c2), mcnemar_exact(b, c2), "exact McNemar", len(vr))
        raise KeyError(f"unknown drift test {name!r}")

    # ---- metrics by name (policies)
    def metric(self, field: str, stat: str | None = None, category: str | None = None) -> tuple[float, str]:
        """-> (value, note) of a drift metric (module docstring); NaN with a
        note where it cannot be measured."""
        if category is not None and category not in self.categories():
            return float("nan"), f"no prompt of category {category!r}"
        nan = float("nan")
        needs_free = field.startswith(("length", "stop_reason", "repetition", "json_valid", "token_frequency"))
        if needs_free and not self.free_running:
            return nan, "teacher-forced: the candidate's outputs are the reference's"
        if field == "length_ratio":
            return self.length_ratio(stat or "total", category), ""
        if field.startswith("stop_rank"):
            v = self.stop_rank_values(field, category)
            if not v.size:
                return nan, "no end-of-answer position where both sides saw the same prefix"
            return float(getattr(describe(v), stat or "mean")), ""
        if field in ("repetition_ref", "repetition_cand", "repetition_shift"):
            r, c = self.repetition(category)
            if r.n == 0 or c.n == 0:
                return nan, f"outputs shorter than {REPETITION_N} tokens"
            return {"repetition_ref": r.rate, "repetition_cand": c.rate, "repetition_shift": c.rate - r.rate}[field], ""
        if field in ("json_valid_ref", "json_valid_cand", "json_valid_shift"):
            jv = self.json_validity(category)
            if jv is None:
                return nan, ("no prompt of category 'json'" if not self.json_units(category)
                             else "no tokenizer to decode the text")
            r, c = jv[0], jv[1]
            return {"json_valid_ref": r.rate, "json_valid_cand": c.rate, "json_valid_shift": c.rate - r.rate}[field], ""
        if field == "stop_reason_tv":
            t = self.test("stop_reason", category)
            return (nan, "no prompts") if t is None else (t.statistic, "")
        if field == "token_frequency_js":
            t = self.test("token_frequency", category)
            return (nan, "no prompts") if t is None else (t.statistic, "")
        if field.endswith("_p"):
            t = self.test(field[:-2], category)
            if t is None:
                return nan, f"{field[:-2].replace('_', ' ')} test not available for these runs"
            return t.p_value, t.method
        raise KeyError(f"unknown drift metric {field!r}")

    def tests(self, category: str | None = None) -> dict[str, TestResult | None]:
        return {n: self.test(n, category) for n in ("length", "length_mw", "stop_reason", "repetition",
                                                     "token_frequency", "json_valid", "entropy_shift",
                                                     "margin_shift")}

    def to_dict(self, category: str | None = None) -> dict[str, Any]:
        r, c = self.lengths(category)
        rep = self.repetition(category)
        jv = self.json_validity(category)
        sr = self.stop_rank_values("stop_rank", category)
        return {
            "units": len(self._idx(category)),
            "length_ref": describe(r).to_dict(), "length_cand": describe(c).to_dict(),
            "length_ratio": {s: self.length_ratio(s, category) for s in ("total", "mean", "p95")},
            "stop_reasons": self.stop_reasons(category),
            "repetition_ref": rep[0].to_dict(), "repetition_cand": rep[1].to_dict(),
            "json_valid_ref": None if jv is None else jv[0].to_dict(),
            "json_valid_cand": None if jv is None else jv[1].to_dict(),
            "stop_rank": {"n": int(sr.size),
                          "ref": describe(self.stop_rank_values("stop_rank_ref", category)).to_dict(),
                          "cand": describe(sr).to_dict()},
            "tests": {k: None if v is None else v.to_dict() for k, v in self.tests(category).items()},
        }
