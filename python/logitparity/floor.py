"""The noise floor: the reference measured against itself under named benign
changes, per prompt and per position, and the statistical verdict that
judges a candidate against it.

A floor is built from one or more *pairs* of reference runs that differ only
by a benign change (batch size, torch threads, greedy KV-cached decoding vs
one teacher-forced forward pass, and the precision twin: the reference model
run by the reference engine in the candidate's dtype). For every pair and
every compared position it records KL(ref ‖ other), KL(other ‖ ref),
max |Δ log-prob|, whether the top-1 token changed, and how far the top-1
margin moved. The floor at a position is the largest value over the pairs
that computed that position from the reference's own prefix (the envelope of
the benign changes named).

``judge(comparison, floor)`` pairs the candidate's positions with the
floor's (same prompt id, same position, same reference tokens before it),
sums both per prompt and tests the ratio R = Σ candidate / Σ floor for each
judged figure with a bootstrap over prompts (positions inside a prompt are
correlated, prompts are not): FAIL when the one-sided bootstrap p-value of
"R ≤ factor" is below (1 − confidence) / 3 (Bonferroni over the three
figures). Everything is defined in docs/noise-floor.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from logitparity._fileio import read_tagged_json
from logitparity.policy import NOISE_FORMAT, NoiseFloor, ThresholdResult, Verdict, parse_metric, standard_metrics
from logitparity.stats import RatioTest, rate, ratio_test

if TYPE_CHECKING:
    from logitparity.compare import Comparison

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_FACTOR",
    "FLOOR_FIELDS",
    "Floor",
    "FloorPair",
    "build_floor",
    "judge",
    "load_floor",
    "rounding_step",
    "write_floor",
]

FLOOR_VERSION = "2.0"  # written as the integer 2 before (read as "2.0": _fileio.LEGACY_INT_VERSIONS)
_FLOOR_MAJOR = int(FLOOR_VERSION.split(".")[0])
# Judged per position, summed per prompt (mean per-token figures).
FLOOR_FIELDS: tuple[str, ...] = ("kl_ref_cand", "kl_cand_ref", "max_abs_logprob")
_LABELS = {"kl_ref_cand": "KL(ref ‖ cand)", "kl_cand_ref": "KL(cand ‖ ref)", "max_abs_logprob": "max |Δ log-prob|"}
# Recorded per position beside them: top-1 changed (0/1) and |Δ top-1 margin| (logits).
EXTRA_FIELDS: tuple[str, ...] = ("top1_changed", "margin_move")
# A floor value below its resolution counts as the resolution, so a bitwise
# identical floor (0) still gives a finite ratio: KL in nats near the fp32
# kernel's relative accuracy on identical rows, |Δ log-prob| near one fp32
# ulp of a log-prob of magnitude 1.
RESOLUTION = {"kl_ref_cand": 1e-12, "kl_cand_ref": 1e-12, "max_abs_logprob": 1e-7}
# The default verdict: FAIL when the candidate is worse than DEFAULT_FACTOR x
# its floor at DEFAULT_CONFIDENCE. 2x sits between what the issue asks to pass
# (a candidate at <= 1.5x its floor) and to fail (>= 5x) on 8 prompts.
DEFAULT_FACTOR = 2.0
DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
# A split is a tie when the reference's top-1 margin there is within
# TIE_FACTOR x the largest benign movement of that margin (the floor's at
# that position, its p99 over all positions, the dtype's rounding step).
TIE_FACTOR = 2.0
# Significand bits (implicit bit included) of each dtype: the rounding step
# of x in [2^e, 2^(e+1)) is 2^(e + 1 - bits); bf16: a logit in [16, 32)
# moves in steps of 0.125 (2^-8 relative at the top of the binade).
SIGNIFICAND_BITS = {"fp32": 24, "fp16": 11, "bf16": 8}


def rounding_step(dtype: str, x: float) -> float:
    """Spacing of ``dtype`` numbers at magnitude |x| (0 for x = 0)."""
    bits = SIGNIFICAND_BITS.get(str(dtype))
    if bits is None:
        raise ValueError(f"rounding_step: dtype must be one of {sorted(SIGNIFICAND_BITS)}, got {dtype!r}")
    x = abs(float(x))
    if x == 0 or not math.isfinite(x):
        return 0.0
    return math.ldexp(1.0, math.frexp(x)[1] - bits)


@dataclasses.dataclass(frozen=True)
class FloorPair:
    """One benign pair: what changed, both runs, their size and figures."""

    change: str
    a: str
    b: str
    mode: str  # "free-running" | "teacher-forced"
    dtype_a: str
    dtype_b: str
    prompts: int
    positions: int
    mean_kl: float  # mean KL(a ‖ b) per position, nats
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FloorPrompt:
    tokens: tuple[int, ...]  # the reference's generated tokens
    values: dict[str, np.ndarray]  # field -> float64 [len(tokens)], NaN where no pair computed the position


@dataclasses.dataclass(frozen=True)
class Floor(NoiseFloor):
    """A noise-floor file (version 2): the pairs it was measured on, the
    per-position envelope, and the aggregate ``metrics`` (the worst over the
    pairs) that ``noise_factor`` policy thresholds read. Version 1 files
    load with ``version = 1`` and no per-position figures."""

    pairs: tuple[FloorPair, ...] = ()
    prompts: dict[str, FloorPrompt] = dataclasses.field(default_factory=dict)
    reference: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = _FLOOR_MAJOR  # the file's major version (1: aggregate metrics only)
    # per-module figures (`calibrate --layers`): a layer floor document
    # (docs/layers.md) that logitparity.layers reads from this same file
    layers: dict[str, Any] | None = None

    @property
    def twin_dtype(self) -> str | None:
        """The dtype of the precision twin, when a pair changed the dtype."""
        for p in self.pairs:
            if p.dtype_a != p.dtype_b:
                return p.dtype_b
        return None

    @property
    def n_positions(self) -> int:
        return int(sum(np.isfinite(p.values["kl_ref_cand"]).sum() for p in self.prompts.values()))

    def mean(self, field: str) -> float:
        v = np.concatenate([p.values[field] for p in self.prompts.values()] or [np.zeros(0)])
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else math.nan

    def margin_spread(self, q: float = 99.0) -> float:
        v = np.concatenate([p.values["margin_move"] for p in self.prompts.values()] or [np.zeros(0)])
        v = v[np.isfinite(v)]
        return float(np.percentile(v, q)) if v.size else 0.0

    def describe(self) -> str:
        """One line: the benign changes and the size of the floor."""
        if self.version < 2:
            return f"{self.change or 'benign change not recorded'} (version 1: aggregate metrics only)"
        ch = "; ".join(p.change for p in self.pairs)
        return (f"{len(self.pairs)} benign pair(s): {ch}; {len(self.prompts)} prompts, {self.n_positions} "
                f"positions; mean KL(ref ‖ other) {self.mean('kl_ref_cand'):.3e} nats")

    def lookup(self, prompt_id: str, ref_tokens: Sequence[int], positions: np.ndarray) -> dict[str, np.ndarray]:
        """The floor at these positions of a prompt: NaN where the floor has
        no value, or where the reference's tokens before the position differ
        from the floor's (another prefix, another distribution)."""
        positions = np.asarray(positions, dtype=np.int64)
        out = {f: np.full(positions.size, np.nan) for f in (*FLOOR_FIELDS, *EXTRA_FIELDS)}
        fp = self.prompts.get(str(prompt_id))
        if fp is None or positions.size == 0:
            return out
        common = _common_prefix(fp.tokens, ref_tokens)
        ok = (positions <= common) & (positions < len(fp.tokens))
        for f in out:
            out[f][ok] = fp.values[f][positions[ok]]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": NOISE_FORMAT,
            "version": FLOOR_VERSION,
            "change": self.change,
            "reference": self.reference,
            "twin_dtype": self.twin_dtype,
            "pairs": [p.to_dict() for p in self.pairs],
            "metrics": self.metrics,
            "prompts": {pid: {"tokens": list(p.tokens), **{f: [None if not math.isfinite(x) else float(x)
                                                                for x in p.values[f]] for f in p.values}}
                        for pid, p in self.prompts.items()},
            **({"layers": self.layers} if self.layers is not None else {}),
        }


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    x, y = np.asarray(list(a[:n]), dtype=np.int64), np.asarray(list(b[:n]), dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def build_floor(pairs: Sequence[tuple["Comparison", str]]) -> Floor:
    """A floor from comparisons of benign pairs [(comparison, change)]. The
    first pair's reference tokens index the positions; later pairs add where
    their reference computed the same prefix."""
    if not pairs:
        raise ValueError("build_floor needs at least one (comparison, change) pair")
    prompts: dict[str, dict[str, Any]] = {}
    infos = []
    for comp, change in pairs:
        bad = int((comp.tokens.nonfinite_ref > 0).sum() + (comp.tokens.nonfinite_cand > 0).sum())
        kl = np.asarray(comp.tokens.kl_ref_cand, dtype=np.float64)
        if bad or not np.all(np.isfinite(kl)):
            raise ValueError(
                f"noise-floor pair {change!r} ({comp.ref_path} vs {comp.cand_path}) has non-finite figures "
                f"({bad} rows with NaN/+inf logits, {int((~np.isfinite(kl)).sum())} non-finite KL values): "
                "that is not a benign change; check both runs"
            )
        t = comp.tokens
        per_field = {
            "kl_ref_cand": t.kl_ref_cand, "kl_cand_ref": t.kl_cand_ref, "max_abs_logprob": t.max_abs_logprob,
            "top1_changed": (~np.asarray(t.same_top1, dtype=bool)).astype(np.float64),
            "margin_move": np.abs(np.asarray(t.margin_cand, np.float64) - np.asarray(t.margin_ref, np.float64)),
        }
        for i, p in enumerate(comp.prompts):
            mask = comp.token_prompt == i
            pos = comp.token_position[mask]
            entry = prompts.get(p.id)
            if entry is None:
                entry = prompts[p.id] = {"tokens": tuple(int(x) for x in p.ref_tokens),
                                         "values": {f: np.full(len(p.ref_tokens), np.nan) for f in per_field}}
            common = _common_prefix(entry["tokens"], p.ref_tokens)
            ok = (pos <= common) & (pos < len(entry["tokens"]))
            for f, arr in per_field.items():
                v = np.asarray(arr, dtype=np.float64)[mask][ok]
                cur = entry["values"][f][pos[ok]]
                entry["values"][f][pos[ok]] = np.where(np.isnan(cur), v, np.maximum(cur, v))
        infos.append(FloorPair(
            change=str(change), a=comp.ref_path, b=comp.cand_path, mode=comp.mode,
            dtype_a=str(comp.ref_manifest.get("dtype", "?")), dtype_b=str(comp.cand_manifest.get("dtype", "?")),
            prompts=len(comp.prompts), positions=len(comp.tokens), mean_kl=float(np.mean(kl)) if kl.size else math.nan,
            metrics=comp.metrics(standard_metrics()),
        ))
    from logitparity.report import describe_run

    first = pairs[0][0]
    return Floor(
        metrics=_worst_metrics([p.metrics for p in infos]),
        change="; ".join(p.change for p in infos),
        pairs=tuple(infos),
        prompts={pid: FloorPrompt(e["tokens"], e["values"]) for pid, e in prompts.items()},
        reference=describe_run(first.ref_manifest, first.ref_path),
    )


def _worst_metrics(all_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Per metric the worst over the pairs (max for lower-is-better, min for
    higher-is-better, the first pair's for metrics without a direction)."""
    out: dict[str, float] = {}
    for name in all_metrics[0]:
        vals = [m[name] for m in all_metrics if m.get(name) is not None and not math.isnan(m[name])]
        if not vals:
            out[name] = math.nan
            continue
        better = parse_metric(name).higher_is_better
        out[name] = min(vals) if better is True else max(vals) if better is False else vals[0]
    return out


def write_floor(floor: Floor, path: str | os.PathLike) -> Path:
    from logitparity._fileio import write_text_atomic
    from logitparity.report import jsonable

    return write_text_atomic(Path(path), json.dumps(jsonable(floor.to_dict()), allow_nan=False) + "\n")


def load_floor(path: "str | os.PathLike[str] | Floor | NoiseFloor") -> Floor:
    """Read a noise-floor file written by ``logitparity calibrate`` (version 2,
    or version 1 with aggregate metrics only)."""
    if isinstance(path, Floor):
        return path
    if isinstance(path, NoiseFloor):
        return Floor(dict(path.metrics), path.change, path.source, version=1)
    p = Path(path)
    data = read_tagged_json(p, fmt=NOISE_FORMAT, what="noise-floor file", reads=("1.0", FLOOR_VERSION),
                            fix="write one with `logitparity calibrate`")
    metrics = {str(k): math.nan if v is None else float(v) for k, v in (data.get("metrics") or {}).items()}
    if data["version"].split(".")[0] == "1":
        return Floor(metrics, str(data.get("change", "")), str(p), version=1)
    try:
        pairs = tuple(FloorPair(**{**q, "mean_kl": math.nan if q.get("mean_kl") is None else q["mean_kl"],
                                   "metrics": {k: math.nan if v is None else float(v)
                                               for k, v in (q.get("metrics") or {}).items()}})
                      for q in data["pairs"])
        prompts = {}
        for pid, e in data["prompts"].items():
            toks = tuple(int(t) for t in e["tokens"])
            vals = {}
            for f in (*FLOOR_FIELDS, *EXTRA_FIELDS):
                arr = np.asarray([math.nan if x is None else float(x) for x in e[f]], dtype=np.float64)
                if arr.shape != (len(toks),):
                    raise ValueError(f"prompt {pid!r}: {f} has {arr.size} values for {len(toks)} tokens")
                vals[f] = arr
            prompts[str(pid)] = FloorPrompt(toks, vals)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"noise-floor file {str(p)!r} is malformed ({type(e).__name__}: {e}); "
                         "re-run `logitparity calibrate`") from None
    if not pairs:
        raise ValueError(f"noise-floor file {str(p)!r} lists no benign pairs; re-run `logitparity calibrate`")
    layers = data.get("layers")
    if layers is not None and not isinstance(layers, dict):
        raise ValueError(f"noise-floor file {str(p)!r}: 'layers' must be a layer floor object, got "
                         f"{type(layers).__name__}; re-run `logitparity calibrate --layers`")
    return Floor(metrics, str(data.get("change", "")), str(p), pairs=pairs, prompts=prompts,
                 reference=dict(data.get("reference") or {}), version=_FLOOR_MAJOR, layers=layers)


# --------------------------------------------------------------------------
# the statistical verdict


@dataclasses.dataclass(frozen=True)
class FloorJudgement:
    """What ``judge`` measured: per judged figure the ratio test, the paired
    sizes, and top-1 changes of both sides at the paired positions."""

    tests: dict[str, RatioTest]
    prompts: int
    positions: int
    unpaired: int  # compared positions without a floor value
    alpha_each: float
    top1_cand: Any  # Rate
    top1_floor: Any  # Rate
    nonfinite: int

    def to_dict(self) -> dict[str, Any]:
        return {"tests": {k: v.to_dict() for k, v in self.tests.items()}, "prompts": self.prompts,
                "positions": self.positions, "unpaired_positions": self.unpaired, "alpha_each": self.alpha_each,
                "top1_changed_candidate": self.top1_cand.to_dict(), "top1_changed_floor": self.top1_floor.to_dict(),
                "nonfinite_rows": self.nonfinite}


def check_settings(factor: float, confidence: float, resamples: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
        raise ValueError(f"factor must be a number >= 1 (the candidate may be this many times its floor), "
                         f"got {factor!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), e.g. 0.95, got {confidence!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an int >= 100, got {resamples!r}")


def judge(comp: "Comparison", floor: Floor, *, factor: float = DEFAULT_FACTOR,
          confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
          name: str = "noise-floor") -> tuple[Verdict, FloorJudgement]:
    """The statistical verdict of a comparison against a version-2 floor
    (see the module docstring)."""
    check_settings(factor, confidence, resamples)
    if floor.version < 2:
        raise ValueError(
            f"noise-floor file {floor.source!r} is version 1 (aggregate metrics only, no per-position figures); "
            "the statistical verdict needs version 2: re-run `logitparity calibrate`, or pass --policy with "
            "noise_factor thresholds to use the old file"
        )
    t = comp.tokens
    cand = {f: np.asarray(getattr(t, f), dtype=np.float64) for f in FLOOR_FIELDS}
    changed = ~np.asarray(t.same_top1, dtype=bool)
    sums_x = {f: [] for f in FLOOR_FIELDS}
    sums_f = {f: [] for f in FLOOR_FIELDS}
    n_pos = unpaired = nonfinite = 0
    k_c = k_f = 0
    for i, p in enumerate(comp.prompts):
        mask = comp.token_prompt == i
        fl = floor.lookup(p.id, p.ref_tokens, comp.token_position[mask])
        ok = np.isfinite(fl["kl_ref_cand"])
        unpaired += int((~ok).sum())
        if not ok.any():
            continue
        n_pos += int(ok.sum())
        rows_bad = (t.nonfinite_cand[mask] > 0) | (t.nonfinite_ref[mask] > 0)
        nonfinite += int(rows_bad[ok].sum())
        k_c += int(changed[mask][ok].sum())
        k_f += int(np.nansum(fl["top1_changed"][ok]))
        for f in FLOOR_FIELDS:
            sums_x[f].append(float(np.sum(cand[f][mask][ok])))
            sums_f[f].append(float(np.sum(np.maximum(np.nan_to_num(fl[f][ok], nan=0.0), RESOLUTION[f]))))
    n_prompts = len(sums_x[FLOOR_FIELDS[0]])
    if n_prompts == 0:
        ids = [p.id for p in comp.prompts][:3]
        raise ValueError(
            f"the noise floor {floor.source!r} covers none of the compared positions (prompts {ids}...; the "
            f"floor has {list(floor.prompts)[:3]}...): calibrate it on this reference's prompts and tokens"
        )
    alpha_each = (1.0 - confidence) / len(FLOOR_FIELDS)
    index = np.random.default_rng(seed).integers(0, n_prompts, size=(resamples, n_prompts))
    tests, results = {}, []
    for f in FLOOR_FIELDS:
        x = np.asarray(sums_x[f])
        if not np.all(np.isfinite(x)):
            x = np.where(np.isfinite(x), x, np.inf)
        test = ratio_test(x, np.asarray(sums_f[f]), factor=factor, confidence=confidence, index=index, seed=seed)
        tests[f] = test
        ok = bool(test.p_value >= alpha_each) and math.isfinite(test.ratio) and nonfinite == 0
        note = (f"{100 * confidence:g}% CI [{test.ci_low:.3g}, {test.ci_high:.3g}], p = {test.p_value:.3g} "
                f"(fail below {alpha_each:.3g})")
        if nonfinite:
            note += f"; {nonfinite} paired rows hold NaN or +inf logits"
        results.append(ThresholdResult(
            name=_LABELS[f], metric=f"{f}.mean / floor", comparison="<=", limit=float(factor),
            limit_source=f"{factor:g}x the noise floor at {100 * confidence:g}% confidence",
            measured=test.ratio, passed=ok, note=note,
            ci_low=test.ci_low, ci_high=test.ci_high, p_value=test.p_value,
        ))
    jd = FloorJudgement(tests, n_prompts, n_pos, unpaired, alpha_each, rate(k_c, n_pos), rate(k_f, n_pos), nonfinite)
    desc = (f"candidate against the noise floor ({floor.describe()}), paired by position over {n_prompts} prompts "
            f"and {n_pos} positions; FAIL when worse than {factor:g}x the floor at {100 * confidence:g}% confidence")
    return Verdict(all(r.passed for r in results), name, desc, tuple(results)), jd


def tie_tolerance(floor: Floor | None, prompt_id: str, ref_tokens: Sequence[int], position: int,
                  top1_logit: float, dtype: str) -> float:
    """The margin below which a split at ``position`` is a tie: TIE_FACTOR x
    the largest of the floor's margin movement there, its p99 over all
    positions, and the rounding step of ``dtype`` at the top-1 logit."""
    step = rounding_step(dtype, top1_logit) if dtype in SIGNIFICAND_BITS else 0.0
    move = 0.0
    if floor is not None and floor.version >= 2:
        v = floor.lookup(prompt_id, ref_tokens, np.asarray([position]))["margin_move"][0]
        move = max(0.0 if math.isnan(v) else float(v), floor.margin_spread(99.0))
    return TIE_FACTOR * max(move, step)
