"""Policies: named threshold sets that turn a comparison into a verdict.

A policy is a name, a description and named thresholds; each threshold says
which metric (see ``parse_metric`` and docs/report.md), which comparison
(``>=`` or ``<=``) and which limit. Built-ins: ``fp16`` (the default),
``bf16``, ``quantized`` and ``lossless`` (with a version-2 noise floor they
judge the candidate against it instead, see floor.judge and FLOOR_FACTORS); users write the same thing as a TOML file::

    name = "my-port"
    description = "what this policy guards"

    [thresholds.greedy]
    metric = "greedy_match@10"     # share of prompts, in [0, 1]
    comparison = ">="
    limit = 0.99

    [thresholds.kl]
    metric = "kl_ref_cand.mean@100"  # nats, mean over positions < 100
    comparison = "<="
    limit = 0.01
    noise_factor = 10               # or 10x the noise floor, if looser

A threshold with ``noise_factor`` is relative to a noise floor: the same
metric measured between two benign reference runs (``logitparity
calibrate``). For ``<=`` the effective limit is ``noise_factor * floor``; for
``>=`` (rates, overlaps and cosines, whose ideal value is 1) it is
``1 - noise_factor * (1 - floor)``. With both ``limit`` and ``noise_factor``
the looser of the two applies, so a floor of exactly 0 (bitwise identical
benign runs) does not demand bitwise identity.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping

from logitparity.fields import DRIFT_FIELDS, DRIFT_STATS, POLICY_FIELDS, REGISTRY

__all__ = [
    "MetricSpec",
    "NoiseFloor",
    "Policy",
    "Threshold",
    "Verdict",
    "ThresholdResult",
    "BUILTIN_POLICIES",
    "load_noise_floor",
    "load_policy",
    "parse_metric",
    "standard_metrics",
]

# Per-token fields a policy may summarise, with higher_is_better.
# Per-token fields a policy may summarise, with higher_is_better (logitparity.fields).
TOKEN_FIELDS: dict[str, bool | None] = {n: REGISTRY[n].higher_is_better for n in POLICY_FIELDS}
STATS = ("mean", "median", "p90", "p95", "p99", "p999", "min", "max")
# Whole-run metrics with higher_is_better.
RUN_METRICS: dict[str, bool | None] = {
    "greedy_match@N": True,
    "real_divergence@N": False,
    "exact_match": True,
    "same_top1": True,
    "length_ratio": None,
}

# Behaviour-drift metrics (logitparity.drift) with higher_is_better; a
# statistic where DRIFT_STATS allows one, and an optional [category].
DRIFT_METRICS: dict[str, bool | None] = {f.name: f.higher_is_better for f in DRIFT_FIELDS}
_DRIFT_NAMES = "|".join(sorted(DRIFT_METRICS, key=len, reverse=True))

_METRIC_RE = re.compile(
    r"^(?:(?P<greedy>greedy_match|real_divergence)@(?P<n>\d+)"
    r"|(?P<lr>length_ratio)"
    r"|(?P<drift>" + _DRIFT_NAMES + r")(?:\.(?P<dstat>[a-z0-9]+))?(?:\[(?P<cat>[^\]]+)\])?"
    r"|(?P<run>exact_match)"
    r"|(?P<rate>same_top1)(?:@(?P<rp>\d+))?"
    r"|(?P<field>[a-z0-9_]+)\.(?P<stat>[a-z0-9]+)(?:@(?P<fp>\d+))?)$"
)


def standard_metrics() -> list[str]:
    """The metric names a comparison reports in its JSON and a noise-floor
    file records: greedy_match@N (N = 1, 5, 10, 20, 50, 100), exact_match,
    length_ratio, and same_top1 and every FIELD.STAT over all positions and
    over positions < 10, 50, 100."""
    names = [f"greedy_match@{n}" for n in (1, 5, 10, 20, 50, 100)] + ["exact_match", "length_ratio"]
    for p in ("", "@10", "@50", "@100"):
        names.append(f"same_top1{p}")
        names += [f"{f}.{s}{p}" for f in TOKEN_FIELDS for s in STATS]
    return names


def _examples() -> list[str]:
    names = ["greedy_match@10", "greedy_match@50", "real_divergence@10", "exact_match", "same_top1", "length_ratio"]
    names += [f"{d}.{s}" if s else d for d in DRIFT_METRICS for s in DRIFT_STATS.get(d, ("",))]
    names += [f"{f}.{s}" for f in TOKEN_FIELDS for s in STATS]
    return names


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if not close and name:
        close = [c for c in choices if c.startswith(name)][:3]
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """A parsed metric name.

    kind: "greedy_match" (n = N), "real_divergence" (n = N), "exact_match", "length_ratio",
    "same_top1", "field" (field, stat) or "drift" (field, stat, category: a
    behaviour-drift metric of logitparity.drift, over one category when
    category is set). positions: only positions < this (None = all compared
    positions).
    """

    name: str
    kind: str
    field: str | None = None
    stat: str | None = None
    n: int | None = None
    positions: int | None = None
    category: str | None = None

    @property
    def higher_is_better(self) -> bool | None:
        if self.kind == "field":
            return TOKEN_FIELDS[self.field]
        if self.kind == "drift":
            return DRIFT_METRICS[self.field]
        if self.kind == "greedy_match":
            return True
        if self.kind == "real_divergence":
            return False
        return RUN_METRICS[self.kind]


def parse_metric(name: str) -> MetricSpec:
    """Parse a metric name (``greedy_match@10``, ``kl_ref_cand.p99@100``, ...).

    Raises ValueError naming the metric with close suggestions.
    """
    if not isinstance(name, str):
        raise TypeError(f"metric must be a string such as 'greedy_match@10', got {name!r}")
    m = _METRIC_RE.match(name.strip())
    hint = (
        "; metrics are greedy_match@N, real_divergence@N, exact_match, same_top1[@P], length_ratio, "
        "FIELD.STAT[@P] or a drift metric such as length_ratio.p95[json] (see docs/report.md)"
    )
    if m is None:
        raise ValueError(f"unknown metric {name!r}{_suggest(name, _examples()) or hint}")
    if m["greedy"]:
        n = int(m["n"])
        if n < 1:
            raise ValueError(f"metric {name!r}: N in {m['greedy']}@N must be >= 1, got {n}")
        return MetricSpec(name, m["greedy"], n=n)
    if m["lr"]:
        return MetricSpec(name, "length_ratio")
    if m["drift"]:
        field, stat, cat = m["drift"], m["dstat"], m["cat"]
        allowed = DRIFT_STATS.get(field, ())
        if stat is not None and stat not in allowed:
            takes = f"the statistics {', '.join(allowed)}" if allowed else f"no statistic (write {field})"
            raise ValueError(f"unknown metric {name!r}: {field} takes {takes}, got {stat!r}")
        if stat is None and allowed:
            stat = allowed[0]
        return MetricSpec(name, "drift", field=field, stat=stat, category=cat)
    if m["run"]:
        return MetricSpec(name, m["run"])
    if m["rate"]:
        return MetricSpec(name, "same_top1", positions=_positions(name, m["rp"]))
    field, stat = m["field"], m["stat"]
    if field not in TOKEN_FIELDS:
        raise ValueError(
            f"unknown metric {name!r}: no per-token field {field!r}"
            f"{_suggest(field, list(TOKEN_FIELDS)) or '; fields: ' + ', '.join(TOKEN_FIELDS)}"
        )
    if stat not in STATS:
        raise ValueError(
            f"unknown metric {name!r}: no statistic {stat!r}"
            f"{_suggest(stat, list(STATS)) or '; statistics: ' + ', '.join(STATS)}"
        )
    return MetricSpec(name, "field", field=field, stat=stat, positions=_positions(name, m["fp"]))


def _positions(name: str, text: str | None) -> int | None:
    if text is None:
        return None
    p = int(text)
    if p < 1:
        raise ValueError(f"metric {name!r}: @P (positions < P) must be >= 1, got {p}")
    return p


@dataclasses.dataclass(frozen=True)
class Threshold:
    """metric ``comparison`` limit, e.g. greedy_match@10 >= 0.99."""

    name: str
    metric: str
    comparison: str  # ">=" or "<="
    limit: float | None = None
    noise_factor: float | None = None

    @property
    def spec(self) -> MetricSpec:
        return parse_metric(self.metric)

    def effective_limit(self, floor: float | None) -> tuple[float, str]:
        """-> (limit, how it was obtained). floor: the noise floor of this
        metric, or None when no calibration was given."""
        if self.noise_factor is None:
            return float(self.limit), "absolute"
        if floor is None or math.isnan(floor):
            if self.limit is None:
                raise ValueError(
                    f"threshold {self.name!r} ({self.metric}) is relative to the noise floor "
                    "and has no absolute limit: pass a noise-floor file (--noise-floor FILE, "
                    "written by `logitparity calibrate`)"
                    + ("" if floor is None else f"; the noise-floor file has no finite {self.metric}")
                )
            return float(self.limit), "absolute (no noise floor given)"
        f = self.noise_factor
        rel = f * floor if self.comparison == "<=" else 1.0 - f * (1.0 - floor)
        how = f"{f:g}x noise floor ({floor:.4g})"
        if self.limit is None:
            return rel, how
        looser = max(rel, self.limit) if self.comparison == "<=" else min(rel, self.limit)
        return looser, how if looser == rel else "absolute (looser than the noise floor)"


@dataclasses.dataclass(frozen=True)
class ThresholdResult:
    name: str
    metric: str
    comparison: str
    limit: float
    limit_source: str
    measured: float
    passed: bool
    note: str = ""
    # statistical thresholds (noise-floor verdict, two-sided gate): the
    # interval of ``measured`` and the p-value of the test; NaN otherwise
    ci_low: float = math.nan
    ci_high: float = math.nan
    p_value: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """passed is True only when every threshold was measured and met."""

    passed: bool
    policy: str
    description: str
    results: tuple[ThresholdResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "policy": self.policy,
            "description": self.description,
            "thresholds": [r.to_dict() for r in self.results],
        }

    def __str__(self) -> str:
        word = "PASS" if self.passed else "FAIL"
        parts = []
        for r in self.results:
            mark = "ok" if r.passed else "FAILED"
            parts.append(f"{r.metric} = {_num(r.measured)} (need {r.comparison} {_num(r.limit)}: {mark})")
        return f"{word} under policy {self.policy!r}: " + "; ".join(parts)

    __repr__ = __str__

    def lines(self) -> list[str]:
        """The verdict for a terminal: a PASS/FAIL line, then one line per
        threshold with its measured value, limit and note."""
        out = [f"{'PASS' if self.passed else 'FAIL'}: {self.policy}" + (f" ({self.description})" if self.description else "")]
        for r in self.results:
            meas = "not measured" if math.isnan(r.measured) else f"{r.measured:.4g}"
            out.append(f"  {'ok  ' if r.passed else 'FAIL'} {r.metric} = {meas} (limit {r.comparison} {r.limit:.4g})"
                       + (f" [{r.note}]" if r.note else ""))
        return out


def _num(x: float) -> str:
    return "not measured" if math.isnan(x) else f"{x:.4g}"


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    description: str
    thresholds: tuple[Threshold, ...]

    def metrics(self) -> list[str]:
        return [t.metric for t in self.thresholds]

    def evaluate(
        self,
        measure: Callable[[str], tuple[float, str]],
        noise: "NoiseFloor | None" = None,
    ) -> Verdict:
        """measure(metric) -> (value, note); a NaN value (not measurable with
        these dumps, note says why) fails its threshold."""
        results = []
        for t in self.thresholds:
            floor = noise.get(t.metric) if noise is not None else None
            limit, source = t.effective_limit(floor)
            value, note = measure(t.metric)
            if math.isnan(value):
                ok = False
                note = note or "not measured"
            else:
                ok = value >= limit if t.comparison == ">=" else value <= limit
            results.append(ThresholdResult(t.name, t.metric, t.comparison, limit, source, value, ok, note))
        return Verdict(all(r.passed for r in results), self.name, self.description, tuple(results))


# fp16 and bf16 candidates are held to one bar (docs/report.md, the policy table)
_HALF_PRECISION_THRESHOLDS = """[thresholds.greedy_match]
metric = "greedy_match@10"
comparison = ">="
limit = 0.99
[thresholds.mean_kl]
metric = "kl_ref_cand.mean@100"
comparison = "<="
limit = 0.01
"""

BUILTIN_POLICIES: dict[str, str] = {
    "fp16": f"""
name = "fp16"
description = "half-precision candidate: same greedy tokens almost always, tiny KL"
{_HALF_PRECISION_THRESHOLDS}""",
    "bf16": f"""
name = "bf16"
description = "bfloat16 candidate: same greedy tokens almost always, tiny KL"
{_HALF_PRECISION_THRESHOLDS}""",
    "quantized": """
name = "quantized"
description = "quantized candidate: same first 10 greedy tokens on 95% of prompts"
[thresholds.greedy_match]
metric = "greedy_match@10"
comparison = ">="
limit = 0.95
""",
    "sampled": """
name = "sampled"
description = "sampled candidate: the sampled-from distributions agree, and outputs drawn from them keep their lengths, tokens and stop reasons"
[thresholds.sampled_js]
metric = "js.mean"
comparison = "<="
limit = 0.005
[thresholds.length]
metric = "length_p"
comparison = ">="
limit = 0.01
[thresholds.token_frequency]
metric = "token_frequency_p"
comparison = ">="
limit = 0.01
[thresholds.stop_reasons]
metric = "stop_reason_p"
comparison = ">="
limit = 0.01
""",
    "lossless": """
name = "lossless"
description = "bit-for-bit port: identical tokens, log-probs within 1e-5 nats"
[thresholds.max_abs_logprob]
metric = "max_abs_logprob.max"
comparison = "<="
limit = 1e-5
[thresholds.identical_tokens]
metric = "exact_match"
comparison = ">="
limit = 1.0
""",
}


# With a version-2 noise floor the built-ins judge the candidate against it
# (floor.judge): FAIL when worse than this many times the floor.
FLOOR_FACTORS: dict[str, float] = {"lossless": 2.0, "fp16": 2.0, "bf16": 2.0, "quantized": 4.0}

# Ranges of metric values: a limit outside them can never be met.
def _value_range(spec: "MetricSpec") -> tuple[float, float]:
    if spec.kind in ("greedy_match", "real_divergence", "exact_match", "same_top1"):
        return 0.0, 1.0
    if spec.kind == "length_ratio":
        return 0.0, math.inf
    f = spec.field
    if spec.kind == "drift":
        unit = REGISTRY[f].unit
        if unit in ("p-value", "share"):
            return (-1.0, 1.0) if f.endswith("_shift") else (0.0, 1.0)
        if f == "stop_rank_shift":
            return -math.inf, math.inf
        return 0.0, math.inf
    if f == "cosine":
        return -1.0, 1.0
    if f.endswith("_overlap"):
        return 0.0, 1.0
    if f == "delta_p":
        return -1.0, 1.0
    if f == "abs_delta_p":
        return 0.0, 1.0
    if f in ("entropy_shift", "margin_shift"):
        return -math.inf, math.inf
    return 0.0, math.inf  # KL, JS, |Δ| figures


def _check_satisfiable(thresholds: list["Threshold"], source: str) -> None:
    """A limit no value can meet, or two thresholds on one metric that no
    value meets together, is an error naming them."""
    for t in thresholds:
        if t.limit is None:
            continue
        lo, hi = _value_range(t.spec)
        if (t.comparison == ">=" and t.limit > hi) or (t.comparison == "<=" and t.limit < lo):
            raise ValueError(
                f"{source}: threshold {t.name!r} ({t.metric} {t.comparison} {t.limit:g}) can never be met: "
                f"{t.metric} lies in [{lo:g}, {hi:g}]; fix the limit"
            )
    for a in thresholds:
        for b in thresholds:
            if a is b or a.metric != b.metric or a.limit is None or b.limit is None:
                continue
            if a.comparison == ">=" and b.comparison == "<=" and a.limit > b.limit and not (a.noise_factor or b.noise_factor):
                raise ValueError(
                    f"{source}: thresholds {a.name!r} ({a.metric} >= {a.limit:g}) and {b.name!r} "
                    f"({b.metric} <= {b.limit:g}) contradict each other: no value meets both; fix one of them"
                )


def _policy_from_toml(data: Mapping[str, Any], source: str) -> Policy:
    allowed = {"name", "description", "thresholds"}
    extra = sorted(set(data) - allowed)
    if extra:
        raise ValueError(f"{source}: unknown key(s) {extra}; a policy has {sorted(allowed)}")
    th = data.get("thresholds")
    if not isinstance(th, dict) or not th:
        raise ValueError(
            f"{source}: a policy needs at least one [thresholds.NAME] table with metric, "
            "comparison and limit"
        )
    out = []
    for tname, t in th.items():
        where = f"{source}: thresholds.{tname}"
        if not isinstance(t, dict):
            raise ValueError(f"{where} must be a table, got {type(t).__name__}")
        extra = sorted(set(t) - {"metric", "comparison", "limit", "noise_factor"})
        if extra:
            raise ValueError(
                f"{where}: unknown key(s) {extra}; expected metric, comparison, limit, noise_factor"
            )
        if "metric" not in t:
            raise ValueError(f"{where} has no metric, e.g. metric = \"greedy_match@10\"")
        try:
            spec = parse_metric(t["metric"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
        comp = t.get("comparison")
        if comp not in (">=", "<="):
            raise ValueError(f"{where}: comparison must be \">=\" or \"<=\", got {comp!r}")
        limit, factor = t.get("limit"), t.get("noise_factor")
        for key, v in (("limit", limit), ("noise_factor", factor)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)):
                raise ValueError(f"{where}: {key} must be a number, got {v!r}")
        if limit is None and factor is None:
            raise ValueError(f"{where} needs a limit (or a noise_factor)")
        if factor is not None and factor <= 0:
            raise ValueError(f"{where}: noise_factor must be > 0, got {factor}")
        if factor is not None and comp == ">=" and spec.higher_is_better is not True:
            raise ValueError(
                f"{where}: a noise_factor with \">=\" needs a metric whose ideal value is 1 "
                f"(a rate, overlap or cosine), got {spec.name}"
            )
        out.append(Threshold(
            str(tname), spec.name, comp,
            None if limit is None else float(limit),
            None if factor is None else float(factor),
        ))
    _check_satisfiable(out, source)
    name = data.get("name", Path(source).stem)
    return Policy(str(name), str(data.get("description", "")), tuple(out))


def load_policy(name_or_path: "str | os.PathLike[str] | Policy") -> Policy:
    """A built-in policy by name (fp16, quantized, lossless) or a TOML file."""
    if isinstance(name_or_path, Policy):
        return name_or_path
    text = os.fspath(name_or_path)
    if text in BUILTIN_POLICIES:
        return _policy_from_toml(tomllib.loads(BUILTIN_POLICIES[text]), f"built-in policy {text!r}")
    path = Path(text)
    if path.suffix == ".toml" or path.exists() or os.sep in text:
        if not path.is_file():
            raise FileNotFoundError(f"policy file {text!r} does not exist; built-ins: {', '.join(BUILTIN_POLICIES)}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"policy file {text!r} is not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"policy file {text!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                             f"{e.start}); save it as UTF-8") from None
        return _policy_from_toml(data, text)
    raise ValueError(
        f"unknown policy {text!r}{_suggest(text, list(BUILTIN_POLICIES))} "
        f"(built-ins: {', '.join(BUILTIN_POLICIES)}; or pass a .toml file)"
    )


NOISE_FORMAT = "logitparity-noise-floor"  # "logitparity.noise-floor" before (_fileio.LEGACY_TAGS)
NOISE_VERSION = "1.0"  # the aggregate-metrics file; floor.FLOOR_VERSION is the per-position one


@dataclasses.dataclass(frozen=True)
class NoiseFloor:
    """Metric values measured between two benign reference runs."""

    metrics: dict[str, float]
    change: str = ""
    source: str = ""

    def get(self, metric: str) -> float | None:
        v = self.metrics.get(metric)
        return None if v is None else float(v)

    def to_dict(self) -> dict[str, Any]:
        return {"format": NOISE_FORMAT, "version": NOISE_VERSION, "change": self.change,
                "metrics": self.metrics}


def load_noise_floor(path: "str | os.PathLike[str]") -> NoiseFloor:
    """Read a noise-floor file written by ``logitparity calibrate`` (version
    1, or version 2 whose per-position figures floor.load_floor reads; both
    give the aggregate metrics that noise_factor thresholds use)."""
    from logitparity.floor import load_floor

    f = load_floor(path)
    return NoiseFloor(dict(f.metrics), f.change, f.source)

