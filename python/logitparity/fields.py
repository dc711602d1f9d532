"""One registry of the per-token fields: name, unit, direction, label and
where it is defined. Metrics, policies, the comparison, the report and a
docs test read it; adding a field is a change in one place.

Units: ``nats`` (natural-log information), ``logits`` (raw logit units),
``probability``, ``share`` (a fraction in [0, 1]), ``cosine`` (in [-1, 1]).
``higher_is_better`` is True, False, or None (a signed shift: neither
direction is better).

- ``ROW_FIELDS``: the float fields of one fused row comparison, as the C++
  core returns them (``compare_logits``; docs/metrics.md).
- ``INT_FIELDS``: its integer fields.
- ``DERIVED_FIELDS``: per-token figures computed from the row fields
  (``values`` below), which policies and the report use beside them.
- ``POLICY_FIELDS``: the per-token fields a policy threshold may summarise.
- ``REPORT_FIELDS``: the rows of the report's per-token table, in order.
- ``DRIFT_FIELDS``: behaviour-drift metrics of whole outputs (lengths, stop
  reasons, repetition, JSON validity, the stop token's rank, two-sample test
  p-values), computed by logitparity.drift; ``DRIFT_STATS`` the statistics a
  policy may ask of the per-prompt ones (``length_ratio.p95``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["DERIVED_FIELDS", "DRIFT_FIELDS", "DRIFT_STATS", "Field", "INT_FIELDS", "POLICY_FIELDS", "REGISTRY", "REPORT_FIELDS", "ROW_FIELDS",
           "values"]

UNITS = ("nats", "logits", "probability", "share", "cosine", "count", "token id", "rank", "ratio", "p-value",
         "tokens")


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    unit: str
    higher_is_better: bool | None
    label: str
    definition: str = "docs/metrics.md"


ROW_FIELDS: tuple[Field, ...] = (
    Field("lse_ref", "nats", None, "log-sum-exp of the reference row"),
    Field("lse_cand", "nats", None, "log-sum-exp of the candidate row"),
    Field("kl_ref_cand", "nats", False, "KL(ref ‖ cand)"),
    Field("kl_cand_ref", "nats", False, "KL(cand ‖ ref)"),
    Field("js", "nats", False, "Jensen–Shannon"),
    Field("cosine", "cosine", True, "cosine of the logits"),
    Field("max_abs_logit", "logits", False, "max |Δ logit|"),
    Field("mean_abs_logit", "logits", False, "mean |Δ logit|"),
    Field("max_abs_logprob", "nats", False, "max |Δ log-prob|"),
    Field("entropy_ref", "nats", None, "entropy of the reference"),
    Field("entropy_cand", "nats", None, "entropy of the candidate"),
    Field("margin_ref", "logits", None, "top-1 margin of the reference"),
    Field("margin_cand", "logits", None, "top-1 margin of the candidate"),
    Field("nll_ref", "nats", None, "NLL of the target under the reference"),
    Field("nll_cand", "nats", False, "NLL of the target under the candidate"),
    Field("delta_p", "probability", None, "Δp of the reference token"),
)
INT_FIELDS: tuple[Field, ...] = (
    Field("argmax_ref", "token id", None, "reference top-1"),
    Field("argmax_cand", "token id", None, "candidate top-1"),
    Field("rank_of_ref_top1_in_cand", "rank", False, "rank of the reference top-1 in the candidate"),
    Field("nonfinite_ref", "count", False, "NaN and +inf entries of the reference row"),
    Field("nonfinite_cand", "count", False, "NaN and +inf entries of the candidate row"),
)
DERIVED_FIELDS: tuple[Field, ...] = (
    Field("abs_delta_p", "probability", False, "|Δp| of the reference token", "docs/report.md"),
    Field("entropy_shift", "nats", None, "entropy shift (cand − ref)", "docs/report.md"),
    Field("margin_shift", "logits", None, "top-1 margin shift (cand − ref)", "docs/report.md"),
    *(Field(f"top{k}_overlap", "share", True, f"top-{k} overlap", "docs/report.md") for k in (1, 5, 10)),
)
_DRIFT = "docs/report.md"
DRIFT_FIELDS: tuple[Field, ...] = (
    Field("length_ratio", "ratio", None, "output length ratio (cand / ref)", _DRIFT),
    Field("length_p", "p-value", True, "p of the paired test of output lengths", _DRIFT),
    Field("length_mw_p", "p-value", True, "p of the Mann–Whitney test of output lengths", _DRIFT),
    Field("stop_reason_tv", "share", False, "stop-reason shift (total variation)", _DRIFT),
    Field("stop_reason_p", "p-value", True, "p of the paired test of stop reasons", _DRIFT),
    Field("repetition_ref", "share", False, "repeated n-grams of the reference", _DRIFT),
    Field("repetition_cand", "share", False, "repeated n-grams of the candidate", _DRIFT),
    Field("repetition_shift", "share", False, "repetition shift (cand − ref)", _DRIFT),
    Field("repetition_p", "p-value", True, "p of the paired test of repetition", _DRIFT),
    Field("json_valid_ref", "share", True, "valid JSON, reference", _DRIFT),
    Field("json_valid_cand", "share", True, "valid JSON, candidate", _DRIFT),
    Field("json_valid_shift", "share", True, "valid-JSON shift (cand − ref)", _DRIFT),
    Field("json_valid_p", "p-value", True, "p of the exact McNemar test of JSON validity", _DRIFT),
    Field("token_frequency_js", "nats", False, "token-frequency divergence (JS of unigram counts)", _DRIFT),
    Field("token_frequency_p", "p-value", True, "p of the paired test of token frequencies", _DRIFT),
    Field("stop_rank", "rank", False, "candidate's rank of the stop token at the end of an answer", _DRIFT),
    Field("stop_rank_ref", "rank", False, "reference's rank of the stop token at the end of an answer", _DRIFT),
    Field("stop_rank_shift", "rank", False, "stop-token rank shift (cand − ref)", _DRIFT),
    Field("entropy_shift_p", "p-value", True, "p of the paired test of the entropy shift", _DRIFT),
    Field("margin_shift_p", "p-value", True, "p of the paired test of the top-1 margin shift", _DRIFT),
)
# statistics over prompts (length_ratio: per-prompt ratios) or end-of-answer
# positions (stop ranks); "total" is the ratio of sums
DRIFT_STATS: dict[str, tuple[str, ...]] = {
    "length_ratio": ("total", "mean", "median", "p95", "min", "max"),
    "stop_rank": ("mean", "median", "p95", "max"),
    "stop_rank_ref": ("mean", "median", "p95", "max"),
    "stop_rank_shift": ("mean", "median", "p95", "max"),
}
REGISTRY: dict[str, Field] = {f.name: f for f in ROW_FIELDS + INT_FIELDS + DERIVED_FIELDS + DRIFT_FIELDS}

POLICY_FIELDS: tuple[str, ...] = (
    "kl_ref_cand", "kl_cand_ref", "js", "cosine", "max_abs_logit", "mean_abs_logit", "max_abs_logprob",
    "delta_p", "abs_delta_p", "entropy_shift", "margin_shift", "top1_overlap", "top5_overlap", "top10_overlap",
)
REPORT_FIELDS: tuple[str, ...] = (
    "kl_ref_cand", "kl_cand_ref", "js", "delta_p", "abs_delta_p", "top5_overlap", "top10_overlap", "cosine",
    "max_abs_logit", "max_abs_logprob", "entropy_shift", "margin_shift",
)


def values(rows: Any, name: str) -> np.ndarray:
    """Per-token float64 values of field ``name`` from a ``RowMetrics``:
    row fields as stored, derived fields computed (a top-k overlap is the
    share of the k tokens, NaN where the reference row is not usable or k
    was not computed)."""
    if name == "abs_delta_p":
        v = np.abs(rows.delta_p)
    elif name == "entropy_shift":
        v = rows.entropy_cand - rows.entropy_ref
    elif name == "margin_shift":
        v = rows.margin_cand - rows.margin_ref
    elif name.startswith("top") and name.endswith("_overlap"):
        k = int(name[3:-len("_overlap")])
        if k not in rows.topk_common:
            v = np.full(len(rows), np.nan)
        else:
            v = np.where(rows.argmax_ref >= 0, rows.topk_common[k] / k, np.nan)
    elif name in REGISTRY:
        v = getattr(rows, name)
    else:
        raise KeyError(f"unknown field {name!r}; fields: {', '.join(REGISTRY)}")
    return np.asarray(v, dtype=np.float64)
