"""Which layers are fragile: one transform applied to one decoder layer (or
one module type of one layer) at a time, everything else untouched, scored
against the untouched model; a mixed-precision plan measured for real; and
first-order saliency beside the measured map.

``sensitivity_map(model, "int4", group_size=32)`` runs the reference once
(teacher-forced on prompts or a text), caching its logits and the hidden
states entering every decoder layer; each candidate then runs only from its
first transformed layer on (exact: earlier layers are untouched,
``capture.layerwise``). Per cell, against the reference's rows (C++ core,
``compare_logits``): mean KL(ref ‖ cand) ± se, p99 KL, same top-1 rate with
its binomial error, ΔPPL ± se (delta method over the paired token NLLs, as
``logitparity ppl``: tokens treated as independent).

Risk per cell, by its mean KL (nats): L ``.`` below RISK_CUTOFFS[0], M ``*``
below RISK_CUTOFFS[1], H ``#`` at or above it.

The plan keeps the most fragile cells (highest mean KL first) at reference
precision until the predicted mean KL of the rest is under ``budget``;
predicted = Σ of the transformed cells' mean KLs, which assumes the cells'
effects add (each is small, and KL is to second order a quadratic form of
the logit change, so uncorrelated changes add their KLs). The plan is then
applied all at once and measured; the report prints predicted vs measured.

Definitions and measured numbers: docs/sensitivity.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from logitparity.metrics import compare_logits
from logitparity.ppl import DEFAULT_CORPUS, PairFigures, PplFigures, plan_windows
from logitparity.stats import Describe, Rate, describe

__all__ = ["ALL", "Cell", "Figures", "MixedPrecisionPlan", "RISK_CUTOFFS", "SaliencyResult", "SensitivityMap", "average_ranks",
           "check_budget", "check_cutoffs", "risk_of",
           "sensitivity_map", "spearman"]

# Mean KL (nats) cut-offs of the risk classes: L below 1e-3, M below 1e-2,
# H from 1e-2, the mean KL the fixed 'fp16' policy allows for a whole
# candidate: one H layer alone would spend that.
RISK_CUTOFFS = (1e-3, 1e-2)
RISK_MARKS = {"L": ".", "M": "*", "H": "#"}
DEFAULT_MAX_TOKENS = 512  # text=None and prompts=None: the bundled corpus' first 512 tokens
DEFAULT_CTX = 256  # disjoint windows of this many positions (BOS included when the tokenizer has one)
ALL = "all"  # a cell's module when every selected module of its layer is transformed together


# --------------------------------------------------------------------------
# small numerics


def average_ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks, ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(x.size, dtype=np.float64)
    r[order] = np.arange(x.size, dtype=np.float64)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average
    ranks (NaN for fewer than 2 values or a constant side)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two sequences of the same length, got {a.size} and {b.size}")
    if a.size < 2:
        return math.nan
    ra, rb = average_ranks(a) - (a.size - 1) / 2, average_ranks(b) - (b.size - 1) / 2
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / den if den > 0 else math.nan


def risk_of(mean_kl: float, cutoffs: tuple[float, float] = RISK_CUTOFFS) -> str:
    """'L', 'M' or 'H' for a mean KL (NaN/inf: H)."""
    if not math.isfinite(mean_kl) or mean_kl >= cutoffs[1]:
        return "H"
    return "M" if mean_kl >= cutoffs[0] else "L"


# --------------------------------------------------------------------------
# results


@dataclasses.dataclass(frozen=True)
class Figures:
    """A candidate's figures against the reference over every scored token."""

    kl: Describe  # KL(ref ‖ cand) per token, nats
    same_top1: Rate
    delta_ppl: float
    delta_ppl_se: float
    ppl_ratio: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"kl": self.kl.to_dict(), "same_top1": self.same_top1.to_dict(), "delta_ppl": self.delta_ppl,
                "delta_ppl_se": self.delta_ppl_se, "ppl_ratio": self.ppl_ratio, "tokens": self.tokens}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measured cell: ``modules`` of decoder layer ``layer`` transformed
    (module: a kind such as 'mlp.down_proj', or ALL for every selected one)."""

    layer: int
    module: str
    modules: tuple[str, ...]  # paths transformed
    figures: Figures
    seconds: float
    start_layer: int  # the candidate ran from this layer on

    @property
    def mean_kl(self) -> float:
        return self.figures.kl.mean

    def risk(self, cutoffs: tuple[float, float] = RISK_CUTOFFS) -> str:
        return risk_of(self.mean_kl, cutoffs)

    @property
    def label(self) -> str:
        return f"{self.layer}" if self.module == ALL else f"{self.layer}.{self.module}"

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "module": self.module, "modules": list(self.modules),
                "figures": self.figures.to_dict(), "seconds": self.seconds, "start_layer": self.start_layer}


@dataclasses.dataclass(frozen=True)
class MixedPrecisionPlan:
    """Cells kept at reference precision, the rest transformed, and the
    plan's predicted and measured figures."""

    budget: float  # mean KL, nats
    kept: tuple[str, ...]  # cell labels, most fragile first
    transformed: tuple[str, ...]
    predicted_kl: float  # Σ of the transformed cells' mean KLs (additivity assumed)
    predicted_all_kl: float  # the same with every cell transformed
    measured: Figures | None  # None when nothing is transformed
    seconds: float

    @property
    def within_budget(self) -> bool | None:
        return None if self.measured is None else bool(self.measured.kl.mean <= self.budget)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "kept": list(self.kept), "transformed": list(self.transformed),
                "predicted_kl": self.predicted_kl, "predicted_all_kl": self.predicted_all_kl,
                "measured": None if self.measured is None else self.measured.to_dict(),
                "within_budget": self.within_budget, "seconds": self.seconds}


@dataclasses.dataclass(frozen=True)
class SaliencyResult:
    """First-order saliency per cell (the sum over the cell's modules) and
    its Spearman rank correlation with the measured mean KL."""

    weight_grad: dict[str, float]  # cell label -> Σ |W ⊙ ∂loss/∂W|
    act_weight: dict[str, float]  # cell label -> Σ |W_ij| ‖X_:,j‖₂
    spearman_weight_grad: float
    spearman_act_weight: float
    loss: float  # mean token NLL of the reference, nats
    saved_bytes_peak: int
    grad_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SensitivityMap:
    """Every measured cell (in run order), the inputs, the plan and the
    saliency; ``ranked()`` orders the cells most fragile first."""

    transform: str
    cells: list[Cell]
    kinds: list[str]  # module kinds selected
    layers: list[int]
    by_module: bool
    inputs: dict[str, Any]
    reference_ppl: float
    cutoffs: tuple[float, float]
    plan: MixedPrecisionPlan | None
    saliency: SaliencyResult | None
    timings: dict[str, float]
    dtype: str

    def ranked(self) -> list[Cell]:
        return sorted(self.cells, key=lambda c: (-c.mean_kl if not math.isnan(c.mean_kl) else -math.inf,
                                                 c.layer, c.module))

    def rank_of(self) -> dict[str, int]:
        return {c.label: i + 1 for i, c in enumerate(self.ranked())}

    def cell(self, layer: int, module: str = ALL) -> Cell:
        for c in self.cells:
            if c.layer == layer and c.module == module:
                return c
        raise KeyError(f"no cell for layer {layer}, module {module!r}; measured: "
                       f"{', '.join(c.label for c in self.cells[:6])}…")

    def layer_kl(self) -> dict[int, float]:
        """Mean KL per layer: the layer's cell, or (by module) the sum of its
        module cells (the additivity assumption of the plan)."""
        out: dict[int, float] = {}
        for c in self.cells:
            out[c.layer] = out.get(c.layer, 0.0) + c.mean_kl
        return out

    def strip(self) -> str:
        """One mark per measured layer, in layer order: `.` L, `*` M, `#` H
        by the layer's mean KL (the markdown puts layer numbers above it)."""
        kl = self.layer_kl()
        return "".join(RISK_MARKS[risk_of(kl[i], self.cutoffs)] for i in self.layers)

    @property
    def layers_label(self) -> str:
        """'0…29' for a contiguous run of layers, else '0, 11, 29'."""
        a, b = self.layers[0], self.layers[-1]
        if self.layers == list(range(a, b + 1)):
            return f"{a}…{b}" if b > a else str(a)
        return ", ".join(map(str, self.layers))

    def to_dict(self) -> dict[str, Any]:
        from logitparity.report.sensitivity import sensitivity_dict

        return sensitivity_dict(self)

    def to_markdown(self) -> str:
        from logitparity.report.sensitivity import sensitivity_markdown

        return sensitivity_markdown(self)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        return (f"SensitivityMap(transform={self.transform!r}, cells={len(self.cells)}, "
                f"tokens={self.inputs.get('tokens')}, strip={self.strip()!r})")


# --------------------------------------------------------------------------
# inputs


@dataclasses.dataclass
class _Inputs:
    sequences: list[list[int]]
    rows: list[slice]  # the logits rows of each sequence that are scored
    targets: list[np.ndarray]  # the token each scored row predicts
    description: dict[str, Any]


def _check_int(value: Any, name: str, lo: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}; {fix}")
    return int(value)


def _inputs(lm: Any, prompts: Any, text: Any, max_tokens: int | None, ctx: int | None,
            limit: int | None) -> _Inputs:
    tokenizer = getattr(lm, "tokenizer", None)
    if prompts is not None and text is not None:
        raise ValueError("pass prompts (--prompts) or text (--text-file), not both; the map is teacher-forced on one")
    if prompts is not None:
        if max_tokens is not None or ctx is not None:
            raise ValueError("max_tokens (--max-tokens) and ctx (--ctx) apply to a text only, got them with prompts; "
                             "use limit (--limit) to take fewer prompts")
        return _prompt_inputs(prompts, tokenizer, limit)
    if limit is not None:
        raise ValueError("limit (--limit) applies to prompts only, got it with a text; use max_tokens (--max-tokens)")
    if tokenizer is None:
        raise ValueError("a text needs a tokenizer: pass a LoadedModel (logitparity.capture.load_model), or prompts "
                         "as token-id lists")
    if text is None:
        text, name = DEFAULT_CORPUS.read_text(encoding="utf-8"), DEFAULT_CORPUS.name
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    elif isinstance(text, os.PathLike):
        p = Path(text)
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} (--text-file) does not exist; pass a UTF-8 text file")
        text, name = p.read_text(encoding="utf-8"), p.name
    elif isinstance(text, str):
        name = "<text>"
    else:
        raise ValueError(f"text must be a str (or a pathlib.Path of a text file), got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"text {name} is empty (or only whitespace); pass some prose to score")
    ctx = DEFAULT_CTX if ctx is None else _check_int(ctx, "ctx (--ctx)", 2, "e.g. 256")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if max_tokens is not None:
        ids = ids[:_check_int(max_tokens, "max_tokens (--max-tokens)", 2, "e.g. 512")]
    bos = getattr(tokenizer, "bos_token_id", None)
    span = ctx - 1 if bos is not None else ctx
    windows = plan_windows(len(ids), ctx, span, bos is not None)  # disjoint: every token scored once
    head = [bos] if bos is not None else []
    seqs, rows, targets = [], [], []
    for w in windows:
        seq = head + ids[w.begin:w.end]
        off = len(head) - 1  # token at text index j sits at position j - begin + len(head), predicted one before
        rows.append(slice(w.first - w.begin + off, w.end - w.begin + off))
        targets.append(np.asarray(ids[w.first:w.end], dtype=np.int64))
        seqs.append(seq)
    desc = {"source": "text", "name": name, "windows": len(windows), "ctx": ctx,
            "bos_token_id": bos, "tokens": int(sum(t.size for t in targets))}
    return _Inputs(seqs, rows, targets, desc)


def _prompt_inputs(prompts: Any, tokenizer: Any, limit: int | None) -> _Inputs:
    from logitparity.prompts import Prompt, load_prompts

    if limit is not None:
        limit = _check_int(limit, "limit (--limit)", 1, "e.g. 4")
    if isinstance(prompts, (str, os.PathLike)):
        items: list[Any] = list(load_prompts(prompts))
        name = str(prompts)
    elif isinstance(prompts, (list, tuple)) and prompts:
        items, name = list(prompts), "<list>"
    else:
        raise ValueError(f"prompts must be a prompts file or a non-empty list of Prompt, str or token-id lists, "
                         f"got {prompts!r}")
    items = items[:limit] if limit else items
    seqs = []
    for i, p in enumerate(items):
        if isinstance(p, (list, tuple)) and p and all(isinstance(t, (int, np.integer)) for t in p):
            seqs.append([int(t) for t in p])
        elif isinstance(p, (Prompt, str)) and (p.text if isinstance(p, Prompt) else p):
            if tokenizer is None:
                raise ValueError("prompts are text but the model has no tokenizer: pass a LoadedModel "
                                 "(logitparity.capture.load_model) or token-id lists")
            from logitparity.capture.hooks import tokenize_prompts

            seqs.append(tokenize_prompts(tokenizer, [p])[0])
        else:
            raise ValueError(f"prompts[{i}] must be a Prompt, a non-empty str or a list of token ids, got {p!r}")
    keep = [s for s in seqs if len(s) >= 2]
    if not keep:
        raise ValueError("every prompt has fewer than 2 tokens, so no position predicts a known token; "
                         "give longer prompts")
    rows = [slice(0, len(s) - 1) for s in keep]
    targets = [np.asarray(s[1:], dtype=np.int64) for s in keep]
    return _Inputs(keep, rows, targets, {"source": "prompts", "name": name, "sequences": len(keep),
                                         "tokens": int(sum(t.size for t in targets))})


def _resolve_kinds(all_kinds: list[str], modules: Any) -> list[str]:
    """None -> every Linear kind; else names: exact kinds ('mlp.down_proj'),
    a last component ('down_proj') or a parent ('mlp': its Linears)."""
    if modules is None:
        return list(all_kinds)
    names = [m.strip() for m in modules.split(",")] if isinstance(modules, str) else list(modules)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"modules (--modules) must be module types such as 'mlp.down_proj' or 'down_proj', "
                         f"got {modules!r}")
    out: list[str] = []
    for n in names:
        hit = [k for k in all_kinds if k == n or k.split(".")[-1] == n or k.startswith(n + ".")]
        if not hit:
            import difflib

            close = difflib.get_close_matches(n, all_kinds + [k.split(".")[-1] for k in all_kinds], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"modules (--modules): unknown module type {n!r}; the decoder layers' Linear modules "
                             f"are {', '.join(all_kinds)} (a last part such as 'down_proj' or a parent such as "
                             f"'mlp' also works){hint}")
        out += [k for k in hit if k not in out]
    return [k for k in all_kinds if k in out]


def _resolve_layers(n_layers: int, layers: Any) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, str):
        out: list[int] = []
        try:
            for part in layers.split(","):
                a, _, b = part.strip().partition("-")
                out += list(range(int(a), int(b) + 1)) if b else [int(a)]
        except ValueError:
            raise ValueError(f"layers (--layers) must be layer numbers and ranges such as '0-3,7', got {layers!r}") \
                from None
        layers = out
    if not isinstance(layers, (list, tuple, range)) or not layers or not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"layers (--layers) must be a non-empty list of decoder layer numbers, got {layers!r}")
    bad = [int(i) for i in layers if not 0 <= int(i) < n_layers]
    if bad:
        raise ValueError(f"layers (--layers) must be in [0, {n_layers - 1}] (the model has {n_layers} decoder "
                         f"layers), got {bad[0]}")
    return sorted({int(i) for i in layers})


def check_budget(budget: Any) -> float | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (budget > 0) or \
            not math.isfinite(budget):
        raise ValueError(f"budget (--budget) must be a positive mean KL in nats (e.g. 0.01), got {budget!r}; "
                         "the plan keeps layers at reference precision until the predicted KL is under it")
    return float(budget)


def check_cutoffs(cutoffs: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in cutoffs)
    except (TypeError, ValueError):
        raise ValueError(f"cutoffs (--cutoffs) must be two mean-KL values 'M,H' such as 0.001,0.01, got {cutoffs!r}") \
            from None
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"cutoffs (--cutoffs) must satisfy 0 < M < H (mean KL in nats, e.g. 0.001,0.01), "
                         f"got {lo:g},{hi:g}")
    return lo, hi


# --------------------------------------------------------------------------
# the driver


def _figures(ref_logits: list[np.ndarray], cand: list[np.ndarray], inp: _Inputs) -> Figures:
    kl, klr, dp, same, na, nb = [], [], [], [], [], []
    for a, b, r, t in zip(ref_logits, cand, inp.rows, inp.targets):
        m = compare_logits(a[r], b[r], targets=t, topk=(1,))
        kl.append(m.kl_ref_cand)
        klr.append(m.kl_cand_ref)
        dp.append(m.delta_p)
        same.append(m.same_top1)
        na.append(m.nll_ref)
        nb.append(m.nll_cand)
    cat = np.concatenate
    nll_a, nll_b = cat(na), cat(nb)
    pa, pb = PplFigures.from_nll(nll_a, 0, 0), PplFigures.from_nll(nll_b, 0, 0)
    pair = PairFigures.from_tokens(pa, pb, nll_a, nll_b, cat(kl), cat(klr), cat(dp), cat(same), kl="exact",
                                   bootstrap=0, seed=0)
    return Figures(describe(cat(kl)), pair.same_top1, pair.delta_ppl, pair.delta_ppl_se, pair.ppl_ratio,
                   int(nll_a.size))


def _run_candidate(model: Any, ref: Any, inp: _Inputs, start: int, suffix: bool) -> list[np.ndarray]:
    from logitparity.capture.layerwise import logits_from_layer

    return [logits_from_layer(model, ref, i, start if suffix else 0) for i in range(len(inp.sequences))]


def sensitivity_map(model: Any, transform: Any, *, prompts: Any = None, text: Any = None,
                    modules: Any = None, layers: Any = None, by_module: bool = False,
                    group_size: int | None = None, symmetric: bool = True, sparsity: float | None = None,
                    max_tokens: int | None = None, ctx: int | None = None, limit: int | None = None,
                    budget: float | None = None, cutoffs: Sequence[float] = RISK_CUTOFFS,
                    saliency: bool = False, suffix: bool = True,
                    progress: bool | Callable[[str], None] = False) -> SensitivityMap:
    """Map how fragile each decoder layer is under ``transform``.

    model: a LoadedModel (logitparity.capture.load_model) or an HF causal
    LM (then prompts must be token-id lists). transform: 'int8', 'int4',
    'fp16', 'bf16', 'fp8-e4m3', 'prune', a capture.quantize.Transform, or a
    callable fn(weight) -> weight; group_size (None: per output channel),
    symmetric and sparsity configure it. prompts: a prompts file or a list
    (Prompt, str, token ids); each prompt's positions are scored
    teacher-forced. text: a str or a Path; scored in disjoint windows of
    ``ctx`` positions (default DEFAULT_CTX), its first ``max_tokens``
    tokens. Neither: the bundled corpus' first DEFAULT_MAX_TOKENS tokens.
    modules: the Linear module types to transform (default: all of them);
    layers: which decoder layers (default all); by_module: one cell per
    (layer, module type) instead of one per layer. budget: also plan and
    measure a mixed-precision plan. saliency: also compute first-order
    saliency. suffix=False runs every candidate from layer 0 (for tests).

    The model's weights are changed in place during a cell and restored
    bitwise after it (also on error).
    """
    from logitparity.capture import layerwise
    from logitparity.capture.hooks import decoder_layers, hf_module
    from logitparity.capture.quantize import make_transform

    t_start = time.perf_counter()
    say = progress if callable(progress) else ((lambda s: print(s, file=sys.stderr, flush=True)) if progress
                                               else (lambda s: None))
    tf = make_transform(transform, group_size=group_size, symmetric=symmetric, sparsity=sparsity)
    hf = hf_module(model)
    n_layers = len(decoder_layers(hf))
    kinds = _resolve_kinds(layerwise.linear_kinds(hf), modules)
    layer_list = _resolve_layers(n_layers, layers)
    budget = check_budget(budget)
    cut = check_cutoffs(cutoffs)
    for path, mod in layerwise.target_modules(hf, layer_list, kinds):
        tf.check(path, mod.weight)
    inp = _inputs(model, prompts, text, max_tokens, ctx, limit)
    dtype = str(next(hf.parameters()).dtype).replace("torch.", "")

    say(f"sensitivity: reference pass over {len(inp.sequences)} sequences, {inp.description['tokens']} tokens")
    ref = layerwise.reference_pass(hf, inp.sequences)
    ref_nll = np.concatenate([compare_logits(l[r], l[r], targets=t, topk=(1,)).nll_ref
                              for l, r, t in zip(ref.logits, inp.rows, inp.targets)])
    ref_ppl = PplFigures.from_nll(ref_nll, 0, 0).ppl

    units: list[tuple[int, str, list[str]]] = []
    for i in layer_list:
        if by_module:
            units += [(i, k, [k]) for k in kinds]
        else:
            units.append((i, ALL, kinds))
    cells = []
    for n, (i, label, ks) in enumerate(units):
        t0 = time.perf_counter()
        mods = layerwise.target_modules(hf, [i], ks)
        with layerwise.transformed(mods, tf):
            cand = _run_candidate(hf, ref, inp, i, suffix)
        fig = _figures(ref.logits, cand, inp)
        cells.append(Cell(i, label, tuple(p for p, _ in mods), fig, time.perf_counter() - t0, i if suffix else 0))
        say(f"  [{n + 1}/{len(units)}] layer {i} {label}: mean KL {fig.kl.mean:.4g} ({cells[-1].seconds:.1f} s)")

    plan = None
    if budget is not None:
        plan = _plan(hf, tf, cells, ref, inp, budget, suffix, say)

    sal = None
    if saliency:
        say("sensitivity: saliency (autograd on the reference)")
        sal = _saliency(hf, layerwise, layer_list, kinds, inp, cells)

    timings = {"total_s": time.perf_counter() - t_start, "reference_s": ref.seconds,
               "cells_s": float(sum(c.seconds for c in cells)),
               "plan_s": plan.seconds if plan is not None else 0.0,
               "saliency_s": sal.seconds if sal is not None else 0.0}
    return SensitivityMap(transform=tf.name, cells=cells, kinds=kinds, layers=layer_list, by_module=by_module,
                          inputs=inp.description, reference_ppl=ref_ppl, cutoffs=cut, plan=plan, saliency=sal,
                          timings=timings, dtype=dtype)


def _plan(hf: Any, tf: Any, cells: list[Cell], ref: Any, inp: _Inputs, budget: float, suffix: bool,
          say: Callable[[str], None]) -> MixedPrecisionPlan:
    from logitparity.capture import layerwise

    t0 = time.perf_counter()
    order = sorted(cells, key=lambda c: (-c.mean_kl if math.isfinite(c.mean_kl) else -math.inf, c.layer, c.module))
    total = float(sum(c.mean_kl for c in cells))
    kept: list[Cell] = []
    rest = list(order)
    predicted = total
    while rest and not predicted < budget:
        kept.append(rest.pop(0))
        predicted = float(sum(c.mean_kl for c in rest))
    measured = None
    if rest:
        names = dict(hf.named_modules())
        mods = [(p, names[p]) for c in rest for p in c.modules]
        start = min(c.layer for c in rest)
        with layerwise.transformed(mods, tf):
            cand = _run_candidate(hf, ref, inp, start, suffix)
        measured = _figures(ref.logits, cand, inp)
        say(f"sensitivity: plan keeps {len(kept)} of {len(cells)} at reference precision; predicted mean KL "
            f"{predicted:.4g}, measured {measured.kl.mean:.4g}")
    return MixedPrecisionPlan(budget, tuple(c.label for c in kept), tuple(c.label for c in rest), predicted, total,
                              measured, time.perf_counter() - t0)


def _saliency(hf: Any, layerwise: Any, layer_list: list[int], kinds: list[str], inp: _Inputs,
              cells: list[Cell]) -> SaliencyResult:
    mods = layerwise.target_modules(hf, layer_list, kinds)
    s = layerwise.saliency(hf, inp.sequences, inp.rows, inp.targets, mods)
    wg = {c.label: float(sum(s.weight_grad[p] for p in c.modules)) for c in cells}
    aw = {c.label: float(sum(s.act_weight[p] for p in c.modules)) for c in cells}
    kl = [c.mean_kl for c in cells]
    return SaliencyResult(wg, aw, spearman(kl, [wg[c.label] for c in cells]),
                          spearman(kl, [aw[c.label] for c in cells]), s.loss, s.saved_bytes_peak, s.grad_bytes,
                          s.seconds)
