"""Sampling done right: compare the distributions that were sampled from.

**The sampled-from distribution** of a logit row x at temperature T and
nucleus top_p (one definition, used by the capture's sampler in
capture/decode.py and by the comparison here):

1. z = x / T in float64; p = softmax(z) (max-subtracted).
2. With top_p < 1: order the tokens by p, descending, ties by lower token
   id (a stable sort); keep the shortest prefix whose cumulative p (a float64
   running sum in that order) reaches top_p: the first k with cum[k-1] >=
   top_p. So at a tie on the boundary the lower ids are kept and the others
   dropped, and at least one token is always kept.
3. Renormalize: the kept tokens' p divided by their sum (equivalently the
   softmax of z over the kept tokens; dropped tokens get logit -inf).

The sampler draws u ~ U[0, 1) from a generator seeded by (seed, prompt id)
and takes the first token whose cumulative renormalized p (in token-id
order) exceeds u, so two runs with the same seed share every u: their draws
agree until the distributions differ where it matters.

**compare_sampled(ref, cand)** takes two sample sets (``dump --mode sample
--seeds ...``: one dump per seed) or two sample dumps, and optionally each
side scored on the other's samples (``dump --mode score --reference-dump``):

- along the reference's sampled path (every position when the candidate was
  scored on the reference's tokens, else the positions before the first
  differing draw) and along the candidate's path (when the reference was
  scored on the candidate's tokens): the fused row metrics of the
  sampled-from distributions (KL both ways, JS, same top-1, NLL of the drawn
  token under each side), and the raw-logit KL beside them; a drawn token
  the other side could not have drawn (outside its nucleus) gives KL = +inf
  and counts as an impossible draw;
- over every (prompt, seed) pair: output lengths, token frequencies, stop
  reasons, repetition and JSON validity with paired two-sample tests
  (logitparity.drift; the pairs share their u's, so the paired permutation
  swaps the two outputs of a pair);
- the sampled match at N (share of pairs whose first N draws agree),
  labelled "sampled", never "greedy".

The verdict is a policy over these figures (default ``sampled``: JS of the
sampled-from distributions ≤ 0.005 nats on average, and the length, token
frequency and stop-reason tests at p ≥ 0.01).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from logitparity._dicts import dig as _get
from logitparity._fileio import read_tagged_json, write_text_atomic
from logitparity.drift import Drift, Unit, answer_tokens
from logitparity.stats import Rate, describe, rate

__all__ = ["SAMPLE_SET_FORMAT", "SampleSet", "SampledComparison", "compare_sampled", "is_sample_set",
           "load_sample_set", "sampling_logits", "sampling_probs", "write_sample_index"]

SAMPLE_SET_FORMAT = "logitparity-sample-set"  # "logitparity.sample-set", version 1, before (_fileio.LEGACY_TAGS)
SAMPLE_SET_VERSION = "1.0"
INDEX = "samples.json"
DEFAULT_POLICY = "sampled"


# --------------------------------------------------------------------------
# the sampled-from distribution


def _nucleus_full(p: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean mask of the kept tokens of each row of probabilities p, by a
    full stable sort (the definition; _nucleus computes the same faster)."""
    order = np.argsort(-p, axis=-1, kind="stable")  # descending, ties by lower id
    cum = np.cumsum(np.take_along_axis(p, order, axis=-1), axis=-1)
    k = (cum < top_p).sum(axis=-1, keepdims=True) + 1  # first k with cum[k-1] >= top_p
    keep_sorted = np.arange(p.shape[-1])[None, :] < k
    mask = np.zeros_like(p, dtype=bool)
    np.put_along_axis(mask, order, keep_sorted, axis=-1)
    return mask


NUCLEUS_START = 64  # candidates sorted first; x4 until their mass reaches top_p


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """_nucleus_full, bitwise, without sorting whole rows: the tokens with p at
    least the M-th largest (every tie at that value included) precede all
    others in the stable descending order, so sorting only them (by -p, then
    id) gives the same order, the same running sums, and the same cut, when
    their mass reaches top_p; else M grows. About 0.3 ms per 49152-wide row
    instead of 5 ms for the full sort."""
    mask = np.zeros_like(p, dtype=bool)
    v = p.shape[-1]
    for r in range(p.shape[0]):
        row = p[r]
        m = NUCLEUS_START
        while True:
            if m >= v:
                mask[r] = _nucleus_full(row[None, :], top_p)[0]
                break
            kth = np.partition(row, v - m)[v - m]  # the m-th largest
            cand = np.flatnonzero(row >= kth)
            order = cand[np.lexsort((cand, -row[cand]))]
            cum = np.cumsum(row[order])
            if cum[-1] >= top_p:
                k = int((cum < top_p).sum()) + 1
                mask[r, order[:k]] = True
                break
            m *= 4
    return mask


def _check_sampling(temperature: float, top_p: float | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sampling_probs(logits: Any, temperature: float, top_p: float | None = None) -> np.ndarray:
    """The renormalized sampled-from probabilities (module docstring), float64,
    of a row [V] or rows [n, V] of raw logits."""
    _check_sampling(temperature, top_p)
    x = np.asarray(logits, dtype=np.float64)
    one = x.ndim == 1
    z = np.atleast_2d(x) / float(temperature)
    m = z.max(axis=-1, keepdims=True)
    e = np.exp(z - m)
    p = e / e.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        p = np.where(_nucleus(p, float(top_p)), p, 0.0)
        p = p / p.sum(axis=-1, keepdims=True)
    return p[0] if one else p


def sampling_logits(logits: Any, temperature: float, top_p: float | None = None) -> np.ndarray:
    """Logits of the sampled-from distribution: x / T, -inf outside the
    nucleus (float64; their softmax is sampling_probs)."""
    _check_sampling(temperature, top_p)
    x = np.asarray(logits, dtype=np.float64)
    one = x.ndim == 1
    z = np.atleast_2d(x) / float(temperature)
    if top_p is not None and top_p < 1.0:
        m = z.max(axis=-1, keepdims=True)
        e = np.exp(z - m)
        z = np.where(_nucleus(e / e.sum(axis=-1, keepdims=True), float(top_p)), z, -np.inf)
    return z[0] if one else z


def draw(probs: np.ndarray, u: float) -> int:
    """The token of one inverse-CDF draw: the first id whose cumulative p (in
    id order) exceeds u * total."""
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), probs.size - 1)


# --------------------------------------------------------------------------
# sample sets: one dump per seed


@dataclasses.dataclass
class SampleSet:
    """Dumps of one run per seed (``seeds[i]`` -> ``dumps[i]``); mode "sample",
    or "score" for a set scored on another set's samples."""

    path: Path
    seeds: list[int | None]
    dumps: list[Any]
    mode: str


def is_sample_set(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX).is_file()


def write_sample_index(out: str | os.PathLike, seeds: Sequence[int], mode: str) -> Path:
    """samples.json naming the per-seed dumps seed-S of ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    body = {"format": SAMPLE_SET_FORMAT, "version": SAMPLE_SET_VERSION, "mode": mode,
            "seeds": [int(s) for s in seeds], "dumps": {str(int(s)): f"seed-{int(s)}" for s in seeds}}
    write_text_atomic(out / INDEX, json.dumps(body, indent=1) + "\n")
    return out / INDEX


def load_sample_set(x: Any, name: str = "sample set") -> SampleSet:
    """A sample set directory (samples.json), a single dump directory (a set
    of one: its decoding.seed), or a Dump."""
    from logitparity.dump import Dump, load_dump

    if isinstance(x, SampleSet):
        return x
    if isinstance(x, Dump):
        return SampleSet(x.path, [_get(x.manifest, "decoding", "seed")], [x], _mode(x.manifest))
    path = Path(x)
    if not (path / INDEX).is_file():
        d = load_dump(path)
        return SampleSet(path, [_get(d.manifest, "decoding", "seed")], [d], _mode(d.manifest))
    where = path / INDEX
    idx = read_tagged_json(where, fmt=SAMPLE_SET_FORMAT, what=f"{name} index", reads=SAMPLE_SET_VERSION,
                           fix="not a sample set: re-run `logitparity dump --seeds`")
    seeds, dumps = idx.get("seeds"), idx.get("dumps")
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            or not isinstance(dumps, dict)):
        raise ValueError(f"{where}: 'seeds' must be a non-empty list of ints and 'dumps' a map seed -> directory")
    out = []
    for s in seeds:
        rel = dumps.get(str(s))
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"{where}: dumps[{str(s)!r}] must be a directory name inside {path}, got {rel!r}")
        out.append(load_dump(path / rel))
    return SampleSet(path, list(seeds), out, str(idx.get("mode", "sample")))


def _mode(manifest: dict) -> str:
    return str(_get(manifest, "decoding", "mode") or "greedy")


# --------------------------------------------------------------------------
# the comparison


@dataclasses.dataclass
class SampledComparison:
    """Everything compare_sampled measured (module docstring).

    tokens: RowMetrics of the sampled-from distributions at every compared
    position; raw: the same positions' raw-logit metrics; token_path: 0 on
    the reference's sampled path, 1 on the candidate's; token_unit: index
    into units; token_position: generated-token position. units: one
    drift.Unit per (prompt, seed), id "PROMPT@seed=S"; first_divergence: per
    unit, the first position where the two draws differ (None: identical).
    """

    ref_manifest: dict
    cand_manifest: dict
    ref_path: str
    cand_path: str
    temperature: float
    top_p: float | None
    seeds: list[int | None]
    units: list[Unit]
    first_divergence: list[int | None]
    tokens: Any
    raw: Any
    token_path: np.ndarray
    token_unit: np.ndarray
    token_position: np.ndarray
    paths: dict[str, bool]  # {"reference": scored both ways?, "candidate": ...}
    notes: list[str]
    policy: Any
    n_values: tuple[int, ...] = (10, 50)
    incomplete: list[str] = dataclasses.field(default_factory=list)
    resamples: int = 4096
    seed: int = 0
    decode: Callable[[Sequence[int]], str] | None = dataclasses.field(default=None, repr=False)
    verdict: Any = dataclasses.field(init=False)
    drift: Drift = dataclasses.field(init=False)

    match_label = "sampled"
    mode = "sampled"
    sampled = True

    def __post_init__(self) -> None:
        self.drift = Drift(self.units, (), free_running=True, decoded=self.decode is not None,
                           resamples=self.resamples, seed=self.seed)
        self.verdict = self.policy.evaluate(self.metric, None)

    # ---- figures
    def sampled_match(self, n: int | None) -> Rate:
        """Share of (prompt, seed) pairs whose first n draws agree (all
        draws and the same stop when n is None)."""
        k = 0
        for u, d in zip(self.units, self.first_divergence):
            if n is None:
                k += d is None and u.stop_ref == u.stop_cand
            else:
                k += d is None or d >= n
        return rate(k, len(self.units))

    def path_mask(self, path: str | None) -> np.ndarray:
        if path is None:
            return np.ones(len(self.token_path), dtype=bool)
        return self.token_path == {"reference": 0, "candidate": 1}[path]

    def impossible_draws(self, path: str) -> Rate:
        """Positions on the path whose drawn token the other side could not
        have drawn (probability 0 in its sampled-from distribution)."""
        m = self.path_mask(path)
        other = self.tokens.nll_cand if path == "reference" else self.tokens.nll_ref
        return rate(int(np.isposinf(other[m]).sum()), int(m.sum()))

    def token_values(self, field: str, mask: np.ndarray | None = None, raw: bool = False) -> np.ndarray:
        from logitparity.fields import values

        v = values(self.raw if raw else self.tokens, field)
        return v if mask is None else v[mask]

    def metric(self, name: str) -> tuple[float, str]:
        """-> (value, note) of a metric name (policy.parse_metric): FIELD.STAT
        over the sampled-from distributions of both paths, same_top1,
        greedy_match@N read as the sampled match at N, exact_match, and the
        drift metrics over (prompt, seed) pairs."""
        from logitparity.policy import parse_metric

        s = parse_metric(name)
        if s.kind == "drift":
            return self.drift.metric(s.field, s.stat, s.category)
        if s.kind == "length_ratio":
            return self.drift.length_ratio("total"), ""
        if s.kind == "greedy_match":
            return self.sampled_match(s.n).rate, "sampled match: the two draws of a (prompt, seed) pair agree"
        if s.kind == "exact_match":
            return self.sampled_match(None).rate, ""
        if s.kind == "real_divergence":
            return float("nan"), "sampled runs: a split is a different draw, not a divergence"
        mask = np.ones(len(self.token_path), dtype=bool)
        if s.positions is not None:
            mask &= self.token_position < s.positions
        if not mask.any():
            return float("nan"), "no compared positions"
        if s.kind == "same_top1":
            v = self.tokens.same_top1[mask]
            return float(np.mean(v)), ""
        v = self.token_values(s.field, mask)
        if np.isnan(v).all():
            return float("nan"), f"{s.field} is not defined for these dumps"
        d = describe(v)
        if d.n_inf and s.higher_is_better is False and s.stat != "min":
            return float("inf"), f"{d.n_inf} positions are +inf (a drawn token outside the other side's nucleus)"
        return float(getattr(d, s.stat)), ""

    def to_dict(self) -> dict[str, Any]:
        from logitparity.report import sampled_dict

        return sampled_dict(self)

    def to_markdown(self) -> str:
        from logitparity.report import render_sampled_markdown

        return render_sampled_markdown(self)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        return f"SampledComparison({len(self.units)} (prompt, seed) pairs, {len(self.token_path)} positions, {self.verdict})"


def _pair_sets(a, b, what: str) -> list[tuple[Any, Any, Any]]:
    """Dumps of two sets matched by seed; a set of one with an unknown seed
    (a score dump) pairs with a set of one."""
    from logitparity.compare import IncompatibleRuns

    if len(a.dumps) == 1 and len(b.dumps) == 1:
        return [(a.seeds[0] if a.seeds[0] is not None else b.seeds[0], a.dumps[0], b.dumps[0])]
    sa, sb = list(a.seeds), list(b.seeds)
    if sorted(map(str, sa)) != sorted(map(str, sb)):
        raise IncompatibleRuns(f"{what} hold different seeds: {a.path} has {sa}, {b.path} has {sb}; "
                               "sample both with the same --seeds (and score each seed's dump)")
    by = {str(s): d for s, d in zip(sb, b.dumps)}
    return [(s, d, by[str(s)]) for s, d in zip(sa, a.dumps)]


def compare_sampled(
    ref: Any,
    cand: Any,
    *,
    cand_on_ref: Any = None,
    ref_on_cand: Any = None,
    policy: Any = None,
    threads: int | None = None,
    max_positions: int | None = None,
    decode: "Callable[[Sequence[int]], str] | str | None" = "auto",
    n_values: Sequence[int] = (10, 50),
    resamples: int = 4096,
    seed: int = 0,
    allow_partial: bool = False,
) -> SampledComparison:
    """Compare two sampled runs (module docstring). ref, cand: sample sets
    (directories with samples.json), sample dumps or Dumps, with the same
    seeds. cand_on_ref: the candidate scored on the reference's samples (a
    score set made by ``dump --mode score --reference-dump REF``), so the
    reference's whole sampled path is compared; ref_on_cand: the reference
    scored on the candidate's. Without them only the positions before the
    first differing draw are compared (both sides saw the same prefix there).
    policy: a built-in name, TOML path or Policy (default "sampled").
    resamples, seed: of the permutation tests. Raises IncompatibleRuns /
    IncompleteRuns (ValueErrors) naming what differs."""
    from logitparity.compare import (IncompatibleRuns, IncompleteRuns, auto_decoder, check_decoding,
                                     check_tokenizers, first_diff, match_prompts, tokenizer_size, incompleteness)
    from logitparity.metrics import compare_logits
    from logitparity.policy import load_policy

    pol = load_policy(DEFAULT_POLICY if policy is None else policy)
    if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int)
                                      or max_positions < 1):
        raise ValueError(f"max_positions must be a positive int or None, got {max_positions!r}")
    rs, cs = load_sample_set(ref, "reference"), load_sample_set(cand, "candidate")
    for side, st in (("reference", rs), ("candidate", cs)):
        for d in st.dumps:
            if _mode(d.manifest) != "sample":
                raise IncompatibleRuns(
                    f"the {side} {d.path} is a {_mode(d.manifest)!r} dump; compare_sampled needs sample-mode dumps "
                    "(dump --mode sample --seeds ...) on both sides")
            if d.k is not None:
                raise ValueError(f"the {side} {d.path} stores {d.storage} logits; the sampled-from distributions "
                                 "need full rows (dump --logits full)")
    pairs = _pair_sets(rs, cs, "the reference and the candidate")
    cross: dict[str, dict[str, Any]] = {}
    for key, given, base in (("cand_on_ref", cand_on_ref, rs), ("ref_on_cand", ref_on_cand, cs)):
        if given is None:
            continue
        st = load_sample_set(given, key)
        for d in st.dumps:
            if _mode(d.manifest) != "score":
                raise ValueError(f"{key} {d.path} must be a score-mode dump on the other side's samples "
                                 f"(dump --mode score --reference-dump ...), got mode {_mode(d.manifest)!r}")
            if d.k is not None:
                raise ValueError(f"{key} {d.path} stores {d.storage} logits; full rows are needed")
        cross[key] = {str(s): d for s, _, d in _pair_sets(base, st, f"{key} and its sampled run")}
    notes: list[str] = []
    d0r, d0c = pairs[0][1], pairs[0][2]
    temperature = float(_get(d0r.manifest, "decoding", "temperature"))
    top_p = _get(d0r.manifest, "decoding", "top_p")
    if not (decode is None or callable(decode) or decode == "auto"):
        raise TypeError(f"decode must be 'auto', None or a function ids -> text, got {decode!r}")
    dec = (auto_decoder(d0r.manifest) or auto_decoder(d0c.manifest)) if decode == "auto" else decode
    units: list[Unit] = []
    firsts: list[int | None] = []
    parts, raws, paths_, unit_ix, pos_ix = [], [], [], [], []
    incomplete: list[str] = []
    for s, rd, cd in pairs:
        check_tokenizers(rd, cd, notes)
        check_decoding(rd, cd)
        if float(_get(rd.manifest, "decoding", "temperature")) != temperature or \
                _get(rd.manifest, "decoding", "top_p") != top_p:
            raise IncompatibleRuns(f"seed {s}: the dumps of one set were sampled with other temperature / top-p "
                                   f"than seed {pairs[0][0]}'s; sample every seed with the same settings")
        matched, only_r, only_c = match_prompts(rd, cd)
        incomplete += [f"seed {s}: {w}" for w in incompleteness(rd, cd, only_r, only_c)]
        v = min(int(rd.vocab_size or 0), int(cd.vocab_size or 0))
        if rd.vocab_size != cd.vocab_size:
            real = tokenizer_size(rd.manifest)
            if real is not None and real > v:
                raise IncompatibleRuns(f"logit rows have different widths ({rd.vocab_size} and {cd.vocab_size}) "
                                       f"below the tokenizer's {real}")
        cor, roc = cross.get("cand_on_ref", {}).get(str(s)), cross.get("ref_on_cand", {}).get(str(s))
        for r, c in matched:
            rid = r["id"]
            rt, ct = [int(t) for t in r["generated_token_ids"]], [int(t) for t in c["generated_token_ids"]]
            d = first_diff(rt, ct)
            ui = len(units)
            sides = []
            if cor is not None:
                sides.append((0, rt, rd.logits(rid, as_float32=True), _scored(cor, rid, rt, "cand_on_ref")))
            else:
                n = min(len(rt), len(ct)) if d is None else min(d + 1, len(rt), len(ct))
                sides.append((0, rt[:n], rd.logits(rid, as_float32=True)[:n], cd.logits(rid, as_float32=True)[:n]))
            if roc is not None:
                sides.append((1, ct, _scored(roc, rid, ct, "ref_on_cand"), cd.logits(rid, as_float32=True)))
            e_shift = []
            for path, toks, A, B in sides:
                n = len(toks) if max_positions is None else min(len(toks), max_positions)
                if n == 0:
                    continue
                A, B = np.asarray(A[:n, :v]), np.asarray(B[:n, :v])
                tg = np.asarray(toks[:n], np.int64)
                raw = compare_logits(A, B, targets=tg, js=True, threads=threads)
                sa = sampling_logits(A, temperature, top_p).astype(np.float32)
                sb = sampling_logits(B, temperature, top_p).astype(np.float32)
                m = compare_logits(sa, sb, targets=tg, js=True, threads=threads)
                parts.append(m)
                raws.append(raw)
                paths_.append(np.full(n, path, np.int64))
                unit_ix.append(np.full(n, ui, np.int64))
                pos_ix.append(np.arange(n, dtype=np.int64))
                e_shift.append(raw.entropy_cand - raw.entropy_ref)
            es = np.concatenate(e_shift) if e_shift else np.zeros(0)
            es = es[np.isfinite(es)]
            units.append(Unit(f"{rid}@seed={s}", str(r.get("category", "")), rt, ct, str(r["stop_reason"]),
                              str(c["stop_reason"]),
                              dec(answer_tokens(rt, str(r["stop_reason"]))) if dec else None,
                              dec(answer_tokens(ct, str(c["stop_reason"]))) if dec else None,
                              float(es.mean()) if es.size else float("nan")))
            firsts.append(d)
    if incomplete and not allow_partial:
        raise IncompleteRuns("incomplete input: " + "; ".join(incomplete) + ". Finish the capture (dump --resume), "
                             "or pass --allow-partial (allow_partial=True) to judge only what is there")
    from logitparity.compare import concat_metrics

    ks = (1, 5, 10)
    tokens, raw_all = concat_metrics(parts, ks), concat_metrics(raws, ks)
    if "cand_on_ref" not in cross:
        notes.append("the candidate was not scored on the reference's samples: along the reference's path only the "
                     "positions before the first differing draw are compared (dump --mode score --reference-dump REF "
                     "with the candidate model gives the whole path)")
    if "ref_on_cand" not in cross:
        notes.append("the reference was not scored on the candidate's samples: the candidate's path is not compared "
                     "(dump --mode score --reference-dump CAND with the reference model)")
    notes.append(f"sampled-from distributions: softmax(logits / {temperature:g})"
                 + (f", top-p {top_p:g} (ties at the boundary by lower token id), renormalized" if top_p not in (None, 1, 1.0)
                    else ", no nucleus") + "; docs/report.md")
    return SampledComparison(
        ref_manifest=d0r.manifest, cand_manifest=d0c.manifest, ref_path=str(rs.path), cand_path=str(cs.path),
        temperature=temperature, top_p=top_p, seeds=[p[0] for p in pairs], units=units, first_divergence=firsts,
        tokens=tokens, raw=raw_all,
        token_path=np.concatenate(paths_) if paths_ else np.zeros(0, np.int64),
        token_unit=np.concatenate(unit_ix) if unit_ix else np.zeros(0, np.int64),
        token_position=np.concatenate(pos_ix) if pos_ix else np.zeros(0, np.int64),
        paths={"reference": "cand_on_ref" in cross, "candidate": "ref_on_cand" in cross},
        notes=notes, policy=pol, n_values=tuple(int(n) for n in n_values), incomplete=incomplete,
        resamples=int(resamples), seed=int(seed), decode=dec,
    )


def _scored(d: Any, rid: str, tokens: list[int], key: str) -> np.ndarray:
    from logitparity.compare import IncompatibleRuns

    try:
        r = d.record(rid)
    except KeyError:
        raise IncompatibleRuns(f"{key} {d.path} has no prompt {rid!r}; score every prompt of the sampled run") from None
    if [int(t) for t in r["generated_token_ids"]] != tokens:
        raise IncompatibleRuns(f"{key} {d.path}: prompt {rid!r} was scored on other tokens than the sampled run drew; "
                               "make it with dump --mode score --reference-dump on that run (the same seed)")
    return d.logits(rid, as_float32=True)
