"""Assertions for test suites: logits or dumps, judged by a policy.

``assert_logits_match(ref, cand)`` compares two logit tensors the way
``compare_dumps`` compares a reference dump with a candidate scored on the
reference's tokens (teacher-forced): every row is a position where both sides
saw the same input, and the reference's top-1 token plays the part of the
generated token. A policy's thresholds then read as follows:

- per-token fields (``kl_ref_cand.mean@100``, ``max_abs_logprob.max``, ...):
  over every row; ``@P`` keeps positions < P of each sequence;
- ``same_top1[@P]``: share of rows whose top-1 tokens agree;
- ``greedy_match@N``: share of sequences whose top-1 tokens agree at each of
  their first N positions (what greedy decoding over this prefix would keep);
- ``exact_match``: share of sequences whose top-1 tokens agree everywhere;
- ``length_ratio`` needs generated sequences: a policy using it is rejected
  here (use ``assert_dumps_match``).

So the built-ins mean: ``fp16``: top-1 agrees at the first 10 positions of
at least 99% of sequences and the mean KL(ref ‖ cand) over positions < 100
is at most 0.01 nats; ``quantized``: the same top-1 rule at 95%; ``lossless``:
every top-1 agrees and no log-probability differs by more than 1e-5 nats.

Shapes: ``[vocab]`` (one row), ``[positions, vocab]`` (one sequence) or
``[batch, positions, vocab]``; fp32, fp16 or bf16, numpy or torch.

On failure both functions raise AssertionError with a short message: the
thresholds crossed, the policy, the worst position (sequence, position, the
text before it when a tokenizer is known), its KL both ways and both top-5
with probabilities. Nothing in it grows with the vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from logitparity.compare import Comparison, compare_dumps
from logitparity.dump import Dump, load_dump
from logitparity.metrics import as_rows, logsumexp, topk as _topk
from logitparity.policy import Policy, Threshold, load_policy, parse_metric

__all__ = ["apply_limits", "assert_dumps_match", "assert_logits_match", "logits_comparison"]

TOP_SHOWN = 5  # alternatives listed for each side at the worst position
CONTEXT_TOKENS = 8  # input tokens shown before the worst position


# --------------------------------------------------------------------------
# Policies


def apply_limits(policy: "str | os.PathLike[str] | Policy", limits: Mapping[str, float] | None) -> Policy:
    """``policy`` with limits overridden or added.

    limits: {threshold name or metric name: limit}. A key naming one of the
    policy's thresholds (or its metric) replaces that threshold's limit (an
    absolute limit: any noise factor is dropped); any other key must be a
    metric name (see policy.parse_metric) and adds a threshold whose
    comparison follows the metric's direction (``<=`` for KL, ``>=`` for
    rates). Returns the policy unchanged when limits is empty.
    """
    pol = load_policy(policy)
    if not limits:
        return pol
    if not isinstance(limits, Mapping):
        raise TypeError(f"limits must be a mapping {{metric: limit}}, got {type(limits).__name__}")
    thresholds = list(pol.thresholds)
    for key, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"limit for {key!r} must be a number, got {value!r}")
        hit = [i for i, t in enumerate(thresholds) if key in (t.name, t.metric)]
        if hit:
            for i in hit:
                thresholds[i] = dataclasses.replace(thresholds[i], limit=float(value), noise_factor=None)
            continue
        spec = parse_metric(key)  # ValueError with suggestions
        if spec.higher_is_better is None:
            raise ValueError(
                f"limit for {key!r}: this metric has no better direction, so a bare limit is ambiguous; "
                "write a policy TOML file with an explicit comparison"
            )
        comparison = ">=" if spec.higher_is_better else "<="
        thresholds.append(Threshold(spec.name, spec.name, comparison, float(value)))
    shown = ", ".join(f"{k} = {v:g}" for k, v in limits.items())
    desc = f"{pol.description}; limits set: {shown}" if pol.description else f"limits set: {shown}"
    return Policy(pol.name, desc, tuple(thresholds))


def _check_no_generation(pol: Policy) -> None:
    for t in pol.thresholds:
        if t.spec.kind in ("length_ratio", "drift"):
            raise ValueError(
                f"policy {pol.name!r} has threshold {t.name!r} on {t.metric}, which needs generated sequences; "
                "bare logits have none: use assert_dumps_match, or a policy without it"
            )



def as_sequences(x: Any, name: str) -> tuple[np.ndarray, bool, tuple[int, ...]]:
    """-> ([batch, positions, vocab] array, is_bf16, the input's shape)."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint16:
        raise TypeError(
            f"{name} is uint16: pass bfloat16 logits as a torch.bfloat16 tensor or an ml_dtypes bfloat16 array, "
            "or convert bit patterns with logitparity.dump.bf16_to_float32"
        )
    arr, bf16, lead = as_rows(x, name)
    shape = (*lead, arr.shape[1])
    if len(lead) > 2:
        raise ValueError(
            f"{name} must be [vocab], [positions, vocab] or [batch, positions, vocab], got shape {shape}; "
            f"flatten extra leading dimensions into the batch first"
        )
    b, s = (1, 1) if not lead else (1, lead[0]) if len(lead) == 1 else lead
    return arr.reshape(b, s, arr.shape[1]), bf16, shape


def prompt_ids_for(prompt_ids: Sequence[str] | None, batch: int) -> list[str]:
    if prompt_ids is None:
        return [str(i) for i in range(batch)]
    ids = [str(p) for p in prompt_ids]
    if len(ids) != batch:
        raise ValueError(f"prompt_ids must name each of the {batch} sequences, got {len(ids)} names")
    if len(set(ids)) != len(ids):
        raise ValueError(f"prompt_ids must be unique, got {ids}")
    return ids


def _decoder(tokenizer: Any) -> Callable[[Sequence[int]], str] | None:
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "decode"):
        return lambda ids: tokenizer.decode([int(i) for i in ids])
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"tokenizer must have .decode(ids) or be a function ids -> text, got {type(tokenizer).__name__}")


def _input_ids(input_ids: Any, batch: int, positions: int) -> np.ndarray | None:
    if input_ids is None:
        return None
    if type(input_ids).__module__.startswith("torch"):
        input_ids = input_ids.detach().cpu().numpy()
    ids = np.asarray(input_ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.shape != (batch, positions):
        raise ValueError(
            f"input_ids must be [batch, positions] = [{batch}, {positions}] (the inputs whose logits these are), "
            f"got shape {tuple(np.shape(input_ids))}"
        )
    return ids


def _compare_arrays(ref: Any, cand: Any, pol: Policy, topk: Sequence[int], prompt_ids: Sequence[str] | None,
                    tokenizer: Any, threads: int | None) -> tuple[Comparison, Dump, Dump, tuple[int, ...]]:
    _check_no_generation(pol)
    a, a16, sa = as_sequences(ref, "ref")
    b, b16, sb = as_sequences(cand, "cand")
    if sa != sb:
        hint = "; one side may use a padded vocabulary: slice both to the real one" if sa[:-1] == sb[:-1] else ""
        raise ValueError(f"ref and cand must have the same shape, got {sa} and {sb}{hint}")
    ids = prompt_ids_for(prompt_ids, a.shape[0])
    topk = [k for k in topk if k <= a.shape[2]]  # a k above the vocabulary is no overlap to measure
    _, top1 = _topk(a.reshape(-1, a.shape[2]), 1, threads=threads, bf16=a16)
    tokens = top1.reshape(a.shape[0], a.shape[1])
    ref_d = Dump.from_arrays(list(a), ids, tokens, bf16=a16, mode="greedy", label="<ref>")
    cand_d = Dump.from_arrays(list(b), ids, tokens, bf16=b16, mode="score", label="<cand>")
    comp = compare_dumps(ref_d, cand_d, policy=pol, topk=topk, threads=threads, decode=_decoder(tokenizer))
    return comp, ref_d, cand_d, sa


def logits_comparison(ref: Any, cand: Any, policy: "str | os.PathLike[str] | Policy" = "fp16", *,
                      topk: Sequence[int] = (1, 5, 10), prompt_ids: Sequence[str] | None = None,
                      tokenizer: Any = None, limits: Mapping[str, float] | None = None,
                      threads: int | None = None) -> Comparison:
    """The Comparison (verdict, report, plots) of two logit tensors, read as
    in the module docstring; ``assert_logits_match`` without the assert."""
    return _compare_arrays(ref, cand, apply_limits(policy, limits), topk, prompt_ids, tokenizer, threads)[0]


# --------------------------------------------------------------------------
# Assertions


def assert_logits_match(ref: Any, cand: Any, policy: "str | os.PathLike[str] | Policy" = "fp16", *,
                        topk: Sequence[int] = (1, 5, 10), tokenizer: Any = None, input_ids: Any = None,
                        prompt_ids: Sequence[str] | None = None, limits: Mapping[str, float] | None = None,
                        threads: int | None = None) -> Comparison:
    """Assert that candidate logits match reference logits under a policy.

    ref, cand: logits of the same shape, [vocab], [positions, vocab] or
    [batch, positions, vocab] (see the module docstring for how the policy
    applies). policy: built-in name (fp16, quantized, lossless), TOML path or
    Policy; limits: {metric or threshold name: limit} overrides (see
    ``apply_limits``). topk: k values of the top-k overlap. tokenizer: an
    object with ``.decode(ids)`` or a function ids -> text, to show tokens as
    text; input_ids: [batch, positions] inputs, to show the text before the
    worst position; prompt_ids: a name per sequence. Returns the Comparison
    when it passes; raises AssertionError with a short report when not.
    """
    __tracebackhide__ = True
    comp, ref_d, cand_d, shape = _compare_arrays(ref, cand, apply_limits(policy, limits), topk, prompt_ids,
                                                 tokenizer, threads)
    batch, positions = (1, 1) if len(shape) == 1 else (1, shape[0]) if len(shape) == 2 else shape[:2]
    ctx = _input_ids(input_ids, batch, positions)
    if not comp.verdict.passed:
        side = _Sides(comp, "logits", (ref_d, cand_d), context=ctx, shape=shape)
        raise AssertionError(failure_message(comp, side))
    return comp


def assert_against_dump(ref: Dump, cand: Any, pol: Policy, *, topk: Sequence[int] = (1, 5, 10),
                         tokenizer: Any = None, input_ids: Any = None, hint: str = "") -> Comparison:
    """Assert that logits ``cand`` match a dump ``ref`` of the same shape
    written from logits (a golden-logit snapshot: one record per sequence,
    the reference's top-1 tokens as its generated tokens)."""
    __tracebackhide__ = True
    _check_no_generation(pol)
    b, b16, shape = as_sequences(cand, "logits")
    want = (len(ref.records), *sorted({int(r["n_positions"]) for r in ref.records}), ref.vocab_size)
    if want != tuple(b.shape):
        raise AssertionError(
            f"logits have shape {list(shape)} ([batch, positions, vocab] {list(b.shape)}), the snapshot {ref.path} "
            f"holds {list(want)}\n{hint}"
        )
    ids = [r["id"] for r in ref.records]
    topk = [k for k in topk if k <= b.shape[2]]
    cand_d = Dump.from_arrays(list(b), ids, [r["generated_token_ids"] for r in ref.records], bf16=b16, mode="score",
                       label="<logits>")
    comp = compare_dumps(ref, cand_d, policy=pol, topk=topk, decode=_decoder(tokenizer))
    ctx = _input_ids(input_ids, b.shape[0], b.shape[1])
    if not comp.verdict.passed:
        side = _Sides(comp, "logits", (ref, cand_d), context=ctx, shape=shape)
        raise AssertionError(failure_message(comp, side, title=f"logits differ from the snapshot {ref.path}")
                             + (f"\n{hint}" if hint else ""))
    return comp


def assert_dumps_match(ref_dir: Any, cand_dir: Any, policy: "str | os.PathLike[str] | Policy" = "fp16", *,
                       limits: Mapping[str, float] | None = None, **kwargs: Any) -> Comparison:
    """Assert that a candidate dump matches a reference dump under a policy.

    ref_dir, cand_dir: dump directories (or Dumps from load_dump). policy,
    limits: as in ``assert_logits_match``. kwargs go to ``compare_dumps``
    (noise_floor, near_tie_margin, topk, max_positions, decode, ...).
    Returns the Comparison when it passes; raises AssertionError with a short
    report when not.
    """
    __tracebackhide__ = True
    ref_d = load_dump(ref_dir) if isinstance(ref_dir, (str, os.PathLike)) else ref_dir
    cand_d = load_dump(cand_dir) if isinstance(cand_dir, (str, os.PathLike)) else cand_dir
    comp = compare_dumps(ref_d, cand_d, policy=apply_limits(policy, limits), **kwargs)
    if not comp.verdict.passed:
        raise AssertionError(failure_message(comp, _Sides(comp, "dumps", (ref_d, cand_d))))
    return comp


# --------------------------------------------------------------------------
# The failure message


@dataclasses.dataclass
class _Sides:
    """What the message needs beyond the Comparison: the two sides' rows
    (for the top-5), how to name a position, the inputs before it."""

    comp: Comparison
    kind: str  # "logits" | "dumps"
    dumps: tuple[Any, Any]  # (reference, candidate): on disk or Dump.from_arrays
    context: np.ndarray | None = None  # [batch, positions] input ids (logits)
    shape: tuple[int, ...] = ()  # the input's shape (logits)

    def where(self, prompt: int, pos: int) -> str:
        p = self.comp.prompts[prompt]
        if self.kind == "dumps":
            cat = f" ({p.category})" if p.category else ""
            return f"prompt {p.id!r}{cat}, generated token {pos}"
        if len(self.shape) == 3:
            named = p.id != str(prompt)
            return (f"sequence {p.id!r} (batch {prompt})" if named else f"batch {prompt}") + f", position {pos}"
        return f"row {pos}"

    def before(self, prompt: int, pos: int) -> str | None:
        """Text before the position: the inputs up to it (logits) or the
        reference's generated tokens before it (dumps)."""
        dec = self.comp.decode
        if dec is None:
            return None
        if self.kind == "logits":
            if self.context is None:
                return None
            ids = self.context[prompt, max(0, pos + 1 - CONTEXT_TOKENS):pos + 1]
        else:
            ids = self.comp.prompts[prompt].ref_tokens[max(0, pos - CONTEXT_TOKENS):pos]
        return _text(dec(list(ids)), 60, keep="end") if len(ids) else None

    def top(self, side: int, prompt: int, pos: int) -> list[tuple[int, float]]:
        """(token id, probability) of the TOP_SHOWN most likely tokens."""
        rid = self.comp.prompts[prompt].id
        dump = self.dumps[side]
        if dump.k is not None:
            vals, idx, lse, _ = dump.topk(rid)
            v, i = np.asarray(vals[pos], np.float64), np.asarray(idx[pos], np.int64)
            order = np.lexsort((i, -v))[:TOP_SHOWN]
            return [(int(i[j]), math.exp(float(v[j]) - float(lse[pos]))) for j in order]
        bf16 = dump.logits_dtype == "bf16"
        row = dump.logits(rid)[pos:pos + 1]
        vals, idx = _topk(row, min(TOP_SHOWN, row.shape[1]), bf16=bf16)
        lse = float(logsumexp(row, bf16=bf16)[0])
        return [(int(t), math.exp(float(x) - lse)) for x, t in zip(vals[0], idx[0])]


def _text(s: str, limit: int, keep: str = "start") -> str:
    s = repr(s)
    if len(s) <= limit:
        return s
    return s[:limit - 1] + "…" if keep == "start" else "…" + s[-(limit - 1):]


def _num(x: float) -> str:
    return "not measured" if math.isnan(x) else f"{x:.4g}"


def _worst_row(comp: Comparison) -> tuple[int, str] | None:
    """-> (row of comp.tokens, why it was chosen), None without rows."""
    t = comp.tokens
    n = len(t)
    if n == 0:
        return None
    pos = comp.token_position
    bad = (t.nonfinite_ref > 0) | (t.nonfinite_cand > 0)
    kl = t.kl_ref_cand
    for r in comp.verdict.results:
        if r.passed:
            continue
        s = parse_metric(r.metric)
        mask = np.ones(n, bool) if s.positions is None else pos < s.positions
        if (bad & mask).any():
            return int(np.argmax(bad & mask)), "first row holding NaN or +inf logits"
        if s.kind == "field":
            v = comp.token_values(s.field)
            v = -v if s.higher_is_better else (np.abs(v) if s.higher_is_better is None else v)
            v = np.where(mask & ~np.isnan(v), v, -np.inf)
            if np.isfinite(v).any() or np.isposinf(v).any():
                return int(np.argmax(v)), f"largest {s.field}" if s.higher_is_better is not True else f"smallest {s.field}"
        elif s.kind in ("greedy_match", "exact_match", "same_top1"):
            diff = mask & ~t.same_top1 & (t.argmax_ref >= 0)
            if s.kind == "greedy_match":
                diff &= pos < s.n
            if diff.any():
                # earliest position, then the largest KL there
                key = np.where(diff, pos, np.iinfo(np.int64).max)
                first = diff & (key == key.min())
                return int(np.argmax(np.where(first, np.nan_to_num(kl, nan=-1.0), -np.inf))), \
                    "earliest position whose top-1 tokens differ"
    if bad.any():
        return int(np.argmax(bad)), "first row holding NaN or +inf logits"
    k = np.where(np.isnan(kl), -np.inf, kl)
    return int(np.argmax(k)), "largest KL(ref ‖ cand)"


def _tops(side: _Sides, which: int, prompt: int, pos: int) -> str:
    dec = side.comp.decode
    parts = []
    for tok, p in side.top(which, prompt, pos):
        label = f"{_text(dec([tok]), 24)} ({tok})" if dec is not None else str(tok)
        parts.append(f"{label} {p:.3f}")
    return ", ".join(parts) if parts else "(no finite logits)"


def failure_message(comp: Comparison, side: _Sides, title: str | None = None) -> str:
    """A few lines: what failed under which policy, the worst position."""
    v = comp.verdict
    title = title or ("logits do not match" if side.kind == "logits" else "dumps do not match")
    desc = f" ({v.description})" if v.description else ""
    lines = [f"{title} under policy {v.policy!r}{desc}"]
    for r in v.results:
        mark = "FAILED" if not r.passed else "passed"
        note = f" [{r.note}]" if r.note else ""
        lines.append(f"  {mark}: {r.metric} = {_num(r.measured)}, need {r.comparison} {_num(r.limit)}{note}")
    n_seq, n_rows = len(comp.prompts), len(comp.tokens)
    if side.kind == "logits":
        lines.append(f"  compared {n_rows} positions, shape {list(side.shape)}")
    else:
        lines.append(f"  compared {n_rows} positions of {n_seq} prompts ({comp.mode}): "
                     f"{comp.ref_path} vs {comp.cand_path}")
    worst = _worst_row(comp)
    if worst is not None:
        row, why = worst
        pi, pos = int(comp.token_prompt[row]), int(comp.token_position[row])
        t = comp.tokens
        ctx = side.before(pi, pos)
        lines.append(f"worst position ({why}): {side.where(pi, pos)}" + (f", after {ctx}" if ctx else ""))
        bound = " (lower bounds: top-K logits)" if comp.kl_is_bound else ""
        lines.append(f"  KL(ref ‖ cand) = {_num(t.kl_ref_cand[row])} nats, KL(cand ‖ ref) = "
                     f"{_num(t.kl_cand_ref[row])} nats{bound}, max |Δ log-prob| = {_num(t.max_abs_logprob[row])} nats")
        if t.nonfinite_ref[row] or t.nonfinite_cand[row]:
            lines.append(f"  NaN/+inf entries: ref {int(t.nonfinite_ref[row])}, cand {int(t.nonfinite_cand[row])}")
        lines.append(f"  ref  top-{TOP_SHOWN}: {_tops(side, 0, pi, pos)}")
        lines.append(f"  cand top-{TOP_SHOWN}: {_tops(side, 1, pi, pos)}")
    split = [(p.first_divergence, i) for i, p in enumerate(comp.prompts) if p.first_divergence is not None]
    if split:
        d, i = min(split)
        p = comp.prompts[i]
        kind = {"real": "real divergence", "near-tie": "near-tie", "length": "one run stopped"}.get(p.split, "")
        margin = f", reference top-1 margin {p.margin_ref_at_split:.3g} logits" if p.split in ("real", "near-tie") else ""
        lines.append(f"first top-1 difference: {side.where(i, d)} ({kind}{margin}); "
                     f"{len(split)} of {n_seq} sequences differ")
    if comp.kl_is_bound and side.kind == "dumps":
        lines.append("note: KL is a lower bound (top-K logits stored)")
    return "\n".join(lines)
