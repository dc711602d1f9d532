"""Where in the model: module-by-module comparison of a reference and a
candidate model, and the first module whose own error leaves the noise band.

``compare_layers(reference, candidate, prompts)`` runs both models on the
same prompts (prefill, one prompt at a time) and compares, per module
(default: every decoder layer's input norm, attention, post-attention norm,
MLP and output), the module's output rows ``[positions, width]``:

- ``propagated``: each model on its own inputs (what dumps hold); an error
  here is the module's own plus everything it inherited.
- ``isolated``: the candidate's module called on the reference module's
  inputs (captured with forward hooks), so only its own error shows.

Figures per module (C++ core, float64 sums over entries finite on both
sides): cosine, relative L2 ‖ĥ − h‖/‖h‖, max |ĥ − h|, SQNR in dB, non-finite
counts, merged over every position of every prompt, plus the per-position
relative L2 (mean and max) and the per-position minimum cosine.

``first_divergent`` is the first module in execution order (a submodule
before the layer that holds it) whose error leaves the noise band: its
relative L2 above the band, its per-position maximum above the per-position
band, or more non-finite entries than the reference. The band comes from a
floor file (``save_floor`` of a benign pair, docs/layers.md) or from the
documented dtype default (``default_band``). ``bisect_layers`` finds the
first bad decoder layer from the final logits alone in O(log L) passes.

Definitions and measured numbers: docs/layers.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from logitparity._fileio import check_version, read_tagged_json
from logitparity._native import core as _core
from logitparity.policy import NOISE_FORMAT

__all__ = [
    "Band",
    "Bisection",
    "FLOOR_FORMAT",
    "LayerComparison",
    "LayerFloor",
    "ModuleComparison",
    "ModuleError",
    "ReferenceTrace",
    "bisect_layers",
    "compare_activation_dumps",
    "compare_layers",
    "default_band",
    "load_floor",
    "module_kind",
    "save_floor",
    "trace_reference",
]

MODES = ("isolated", "propagated", "both")
DEFAULT_PROMPT_COUNT = 4  # prompts=None: the first 4 of the embedded default set
FLOOR_FORMAT = "logitparity-layer-floor"
FLOOR_VERSION = "1.0"
# Unit roundoff of each storage dtype.
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
# The default band, in units of the coarser dtype's unit roundoff u, for the
# relative L2 over all positions. fp32 pairs: benign changes reorder sums of
# up to a few thousand terms (error up to ~n u); measured on the default
# model, the worst benign fp32 module was 1.1e-6 (docs/layers.md), 55x under
# 1024 u = 6.1e-5, while the weakest planted bug sat at 4e-4. Half-precision
# candidates: one rounding of each operand dominates; the worst clean bf16
# module measured 0.012 = 3.1 u, 5x under 16 u.
DEFAULT_BAND_ULPS = {"fp32": 1024.0, "bf16": 16.0, "fp16": 16.0}
# A single position may be worse than the average of all: its band is this
# factor wider.
PER_POSITION_FACTOR = 4.0
# A floor file's figures times this margin is the band (and never tighter
# than the fp32 default: a bitwise-equal benign pair must not make every
# rounding difference a divergence).
FLOOR_MARGIN = 3.0


_LAYER_RE = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<idx>\d+)(?:\.(?P<rest>.+))?$")


def module_kind(path: str) -> tuple[int | None, str]:
    """'model.layers.10.mlp' -> (10, 'mlp'); 'model.layers.3' -> (3, 'layer');
    anything outside the decoder layers -> (None, path)."""
    m = _LAYER_RE.match(path)
    if not m:
        return None, path
    return int(m.group("idx")), m.group("rest") or "layer"


# --------------------------------------------------------------------------
# Figures


@dataclasses.dataclass(frozen=True)
class ModuleError:
    """Difference figures of one module over every compared position."""

    cosine: float
    rel_l2: float
    max_abs: float
    sqnr_db: float
    nonfinite_ref: int
    nonfinite_cand: int
    positions: int
    rel_l2_mean: float  # per-position relative L2: mean over positions
    rel_l2_max: float  # and max
    cosine_min: float  # per-position cosine: min over positions

    @classmethod
    def from_parts(cls, merged: Sequence[np.ndarray], per_row: Sequence[np.ndarray]) -> "ModuleError":
        core = _core()
        names = list(core.DIFF_FIELDS)
        total = core.merge_diff(np.stack(merged))
        rows = np.concatenate(per_row, axis=0)
        rel = rows[:, names.index("rel_l2")]
        cos = rows[:, names.index("cosine")]
        f = dict(zip(names, total.tolist()))
        return cls(cosine=f["cosine"], rel_l2=f["rel_l2"], max_abs=f["max_abs"], sqnr_db=f["sqnr_db"],
                   nonfinite_ref=int(f["nonfinite_ref"]), nonfinite_cand=int(f["nonfinite_cand"]),
                   positions=int(rows.shape[0]), rel_l2_mean=float(np.mean(rel)),
                   rel_l2_max=float(np.max(rel)), cosine_min=float(np.min(cos)))

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_float(v) for k, v in dataclasses.asdict(self).items()}


def _json_float(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "-inf" if v < 0 else "nan"
    return v


def _from_json_float(v: Any) -> Any:
    return float(v) if isinstance(v, str) else v


@dataclasses.dataclass(frozen=True)
class Band:
    """The noise band of one module: relative L2 over all positions, and
    per position."""

    rel_l2: float
    rel_l2_max: float
    source: str

    def leaves(self, e: ModuleError) -> bool:
        return e.rel_l2 > self.rel_l2 or e.rel_l2_max > self.rel_l2_max or e.nonfinite_cand > e.nonfinite_ref


def default_band(ref_dtype: str, cand_dtype: str) -> Band:
    """The documented default band for a dtype pair: DEFAULT_BAND_ULPS of the
    coarser dtype's unit roundoff (relative L2 over all positions), and
    PER_POSITION_FACTOR times that per position."""
    for name, d in (("ref_dtype", ref_dtype), ("cand_dtype", cand_dtype)):
        if d not in UNIT_ROUNDOFF:
            raise ValueError(f"{name} must be one of {sorted(UNIT_ROUNDOFF)}, got {d!r}")
    coarse = max((ref_dtype, cand_dtype), key=lambda d: UNIT_ROUNDOFF[d])
    rel = DEFAULT_BAND_ULPS[coarse] * UNIT_ROUNDOFF[coarse]
    return Band(rel, PER_POSITION_FACTOR * rel, f"default for {ref_dtype} vs {cand_dtype} "
                f"({DEFAULT_BAND_ULPS[coarse]:g} u of {coarse})")


@dataclasses.dataclass
class ModuleComparison:
    """One module: where it sits, its figures in each mode computed, its band."""

    path: str
    layer: int | None
    kind: str  # 'layer', 'self_attn', 'mlp', 'input_layernorm', ..., or a Linear's path below the layer
    band: Band
    propagated: ModuleError | None = None
    isolated: ModuleError | None = None

    def error(self, mode: str) -> ModuleError | None:
        return self.isolated if mode == "isolated" else self.propagated

    def out_of_band(self, mode: str) -> bool | None:
        e = self.error(mode)
        return None if e is None else self.band.leaves(e)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "layer": self.layer, "kind": self.kind,
                "band": {"rel_l2": self.band.rel_l2, "rel_l2_max": self.band.rel_l2_max, "source": self.band.source},
                "propagated": None if self.propagated is None else self.propagated.to_dict(),
                "isolated": None if self.isolated is None else self.isolated.to_dict(),
                "out_of_band": {m: self.out_of_band(m) for m in ("propagated", "isolated")}}


@dataclasses.dataclass
class LayerComparison:
    """Every compared module in execution order, and the verdict on where
    the candidate first leaves the noise band."""

    mode: str
    judged_by: str  # the mode whose errors decide first_divergent
    modules: list[ModuleComparison]
    first_divergent: str | None
    evidence: dict[str, Any] | None
    prompts: list[str]
    positions: int
    ref_dtype: str
    cand_dtype: str
    band_source: str

    def module(self, path: str) -> ModuleComparison:
        for m in self.modules:
            if m.path == path:
                return m
        raise KeyError(f"module {path!r} was not compared; compared: {self.modules[0].path} … {self.modules[-1].path}")

    @property
    def first_divergent_layer(self) -> int | None:
        return None if self.first_divergent is None else self.module(self.first_divergent).layer

    def to_dict(self) -> dict[str, Any]:
        return {"format": "logitparity-layers", "version": "1.0", "mode": self.mode, "judged_by": self.judged_by,
                "first_divergent": self.first_divergent, "first_divergent_layer": self.first_divergent_layer,
                "evidence": self.evidence, "prompts": self.prompts, "positions": self.positions,
                "ref_dtype": self.ref_dtype, "cand_dtype": self.cand_dtype, "band_source": self.band_source,
                "modules": [m.to_dict() for m in self.modules]}

    def to_markdown(self) -> str:
        from logitparity.report.layers import layers_markdown

        return layers_markdown(self)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        where = self.first_divergent or "none"
        return (f"LayerComparison(mode={self.mode!r}, modules={len(self.modules)}, first_divergent={where}, "
                f"prompts={len(self.prompts)}, positions={self.positions})")


# --------------------------------------------------------------------------
# The noise floor file


@dataclasses.dataclass(frozen=True)
class LayerFloor:
    """Per-module figures of a benign pair (docs/layers.md, 'The floor file')."""

    modules: dict[str, tuple[float, float]]  # path -> (rel_l2, rel_l2_max)
    margin: float
    mode: str
    ref_dtype: str
    cand_dtype: str
    description: str
    path: str | None = None

    def band(self, module: str) -> Band | None:
        if module not in self.modules:
            return None
        rel, rel_max = self.modules[module]
        floor = default_band("fp32", "fp32")
        where = self.path or "a floor"
        return Band(max(self.margin * rel, floor.rel_l2), max(self.margin * rel_max, floor.rel_l2_max),
                    f"floor {where} ({self.description}) x {self.margin:g}")


def save_floor(comparison: LayerComparison, path: str | os.PathLike, *, description: str = "",
               margin: float = FLOOR_MARGIN) -> Path:
    """Write the per-module figures of a benign comparison (judged mode:
    isolated where computed) as a floor file."""
    from logitparity._fileio import write_text_atomic

    doc = floor_document(comparison, description=description, margin=margin)
    return write_text_atomic(Path(path), json.dumps(doc, indent=1) + "\n")


def floor_document(comparison: LayerComparison, *, description: str = "", margin: float = FLOOR_MARGIN) -> dict:
    """The layer floor of a benign comparison as a JSON object (the file
    save_floor writes; `logitparity calibrate --layers` stores it in the
    noise-floor file under "layers")."""
    if not isinstance(comparison, LayerComparison):
        raise TypeError(f"comparison must be a LayerComparison (from compare_layers), got {type(comparison).__name__}")
    if not (isinstance(margin, (int, float)) and margin >= 1):
        raise ValueError(f"margin must be a number >= 1 (the band is margin x the floor), got {margin!r}")
    mode = comparison.judged_by
    modules = {}
    for m in comparison.modules:
        e = m.error(mode)
        if e is not None and not (math.isnan(e.rel_l2) or math.isnan(e.rel_l2_max)):  # NaN: default band
            modules[m.path] = {"rel_l2": e.rel_l2, "rel_l2_max": e.rel_l2_max, "nonfinite_cand": e.nonfinite_cand}
    doc = {"format": FLOOR_FORMAT, "version": FLOOR_VERSION,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "description": description, "mode": mode, "margin": float(margin),
           "ref_dtype": comparison.ref_dtype, "cand_dtype": comparison.cand_dtype,
           "prompts": comparison.prompts, "positions": comparison.positions, "modules": modules}
    return json.loads(json.dumps(doc))  # JSON types only (what a reader gets back)


def load_floor(path: str | os.PathLike) -> LayerFloor:
    """Read a floor file written by save_floor (tag and version checked)."""
    p = Path(path)
    fix = "write one with logitparity.layers.save_floor(compare_layers(ref, benign_twin), path)"
    doc = read_tagged_json(p, fmt=FLOOR_FORMAT, what="layer floor file", reads=FLOOR_VERSION, fix=fix,
                           accept=(NOISE_FORMAT,))
    if doc.get("format") == NOISE_FORMAT:
        # a noise-floor file from `logitparity calibrate --layers` carries one
        if not isinstance(doc.get("layers"), dict):
            raise ValueError(f"noise-floor file {p} has no per-module figures; re-run "
                             "`logitparity calibrate --layers` (with a dtype change in --vary)")
        doc = doc["layers"]
        if doc.get("format") != FLOOR_FORMAT:
            raise ValueError(f"noise-floor file {p}: its 'layers' part has format {doc.get('format')!r}, expected "
                             f"{FLOOR_FORMAT!r}; re-run `logitparity calibrate --layers`")
        check_version(doc.get("version"), FLOOR_VERSION, f"layer floor in {p}", "re-run `logitparity calibrate --layers`")
    mods = doc.get("modules")
    if not isinstance(mods, dict) or not mods:
        raise ValueError(f"{p}: 'modules' must map module paths to their figures, got {type(mods).__name__}")
    out = {}
    for k, v in mods.items():
        try:
            out[k] = (float(_from_json_float(v["rel_l2"])), float(_from_json_float(v["rel_l2_max"])))
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{p}: module {k!r} needs numeric 'rel_l2' and 'rel_l2_max', got {v!r}") from None
    return LayerFloor(out, float(doc.get("margin", FLOOR_MARGIN)), str(doc.get("mode")), str(doc.get("ref_dtype")),
                      str(doc.get("cand_dtype")), str(doc.get("description", "")), str(p))


def _resolve_floor(noise_floor: Any) -> LayerFloor | None:
    if noise_floor is None or isinstance(noise_floor, LayerFloor):
        return noise_floor
    if isinstance(noise_floor, (str, os.PathLike)):
        return load_floor(noise_floor)
    raise TypeError(f"noise_floor must be None, a floor file path or a LayerFloor, got {type(noise_floor).__name__}")


# --------------------------------------------------------------------------
# Running the models


@dataclasses.dataclass
class ReferenceTrace:
    """The reference's module outputs and inputs on a prompt set, captured
    once (trace_reference) and compared against any number of candidates:
    the way to compare a model against itself with a plant applied."""

    paths: list[str]
    prompt_ids: list[str]
    token_ids: list[list[int]]
    traces: list[Any]  # capture.hooks.Trace per prompt, inputs kept
    dtype: str


def dtype_name(hf: Any) -> str:
    import torch

    dt = next(p.dtype for p in hf.parameters() if p.is_floating_point())
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, "fp32")


def _prompts(prompts: Any, tokenizer: Any, limit: int | None) -> tuple[list[str], list[list[int]]]:
    from logitparity.prompts import Prompt, load_prompts

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if prompts is None:
        items: list[Any] = load_prompts()[: limit or DEFAULT_PROMPT_COUNT]
    elif isinstance(prompts, (str, os.PathLike)):
        items = load_prompts(prompts)
    elif isinstance(prompts, (list, tuple)) and prompts:
        items = list(prompts)
    else:
        raise ValueError(f"prompts must be None (the default set), a prompts file, or a non-empty list of "
                         f"Prompt, str or token-id lists, got {prompts!r}")
    items = items[:limit] if limit else items
    ids, tokens, texts, text_ids = [], [], [], []
    for i, p in enumerate(items):
        if isinstance(p, (list, tuple)) and p and all(isinstance(t, int) for t in p):
            ids.append(f"tokens-{i}")
            tokens.append(list(p))
        elif isinstance(p, (Prompt, str)) and (p.text if isinstance(p, Prompt) else p):
            ids.append(p.id if isinstance(p, Prompt) else f"prompt-{i}")
            tokens.append(None)
            texts.append(p)
            text_ids.append(len(tokens) - 1)
        else:
            raise ValueError(f"prompts[{i}] must be a Prompt, a non-empty str or a list of token ids, got {p!r}")
    if texts:
        if tokenizer is None:
            raise ValueError("prompts are text but no tokenizer is known: pass LoadedModel objects "
                             "(logitparity.capture.load_model) or tokenizer=, or give token-id lists")
        from logitparity.capture.hooks import tokenize_prompts

        for j, t in zip(text_ids, tokenize_prompts(tokenizer, texts)):
            tokens[j] = t
    return ids, tokens


def _tokenizer(*models: Any, tokenizer: Any = None) -> Any:
    if tokenizer is not None:
        return tokenizer
    for m in models:
        t = getattr(m, "tokenizer", None)
        if t is not None and hasattr(m, "identity"):
            return t
    return None


def trace_reference(reference: Any, prompts: Any = None, *, modules: str | Sequence[str] | None = None,
                    limit: int | None = None, tokenizer: Any = None) -> ReferenceTrace:
    """Run the reference once on ``prompts`` and keep every selected module's
    output and inputs (for compare_layers against any number of candidates)."""
    from logitparity.capture import hooks

    hf = hooks.hf_module(reference, "reference")
    paths = hooks.select_modules(hf, modules)
    ids, tokens = _prompts(prompts, _tokenizer(reference, tokenizer=tokenizer), limit)
    traces = [hooks.trace(hf, t, paths, keep_inputs=True) for t in tokens]
    return ReferenceTrace(paths, ids, tokens, traces, dtype_name(hf))


def _diff(core: Any, ref_rows: Any, cand_rows: Any, path: str) -> tuple[np.ndarray, np.ndarray]:
    from logitparity.capture.hooks import to_numpy_rows

    if tuple(ref_rows.shape) != tuple(cand_rows.shape):
        raise ValueError(f"module {path}: reference output is {tuple(ref_rows.shape)}, candidate's "
                         f"{tuple(cand_rows.shape)}; do both models have the same architecture and widths?")
    if _cuda_pair(ref_rows, cand_rows):
        return _diff_cuda(core, ref_rows, cand_rows)
    a, abf = to_numpy_rows(ref_rows)
    b, bbf = to_numpy_rows(cand_rows)
    return core.activation_diff(a, abf, b, bbf, 1)


def _cuda_pair(a: Any, b: Any) -> bool:
    """Both module outputs 2-D torch tensors on one CUDA device that the
    core's CUDA kernels read: then they are compared where they are."""
    from logitparity._cuda_arrays import kernel_tensor

    return kernel_tensor(a) and kernel_tensor(b) and a.device == b.device


def _diff_cuda(core: Any, ref_rows: Any, cand_rows: Any) -> tuple[np.ndarray, np.ndarray]:
    """activation_diff on the GPU: the same figures (sums to float64 rounding,
    counts and max |diff| exact), with no copy of either tensor to the host."""
    from logitparity._cuda_arrays import cuda_rows, wait_for_producer

    a = cuda_rows(ref_rows, "reference", False)
    b = cuda_rows(cand_rows, "candidate", False)
    wait_for_producer(a, b)  # the kernel runs on the reference's stream
    return core.activation_diff_cuda(a.ptr, a.dtype, a.stride, b.ptr, b.dtype, b.stride, a.rows,
                                     a.vocab, a.stream)


def compare_layers(reference: Any, candidate: Any, prompts: Any = None, *, mode: str = "isolated",
                   noise_floor: Any = None, modules: str | Sequence[str] | None = None, limit: int | None = None,
                   tokenizer: Any = None) -> LayerComparison:
    """Compare ``candidate`` with ``reference`` module by module.

    reference: a LoadedModel, an HF causal LM, or a ReferenceTrace (then
    ``prompts`` and ``modules`` come from it). candidate: a LoadedModel or an
    HF causal LM of the same architecture (any dtype). prompts: None (the
    first DEFAULT_PROMPT_COUNT default prompts), a prompts file, or a list of
    Prompt, str or token-id lists. mode: 'isolated' (the candidate's modules
    on the reference's inputs), 'propagated' (each on its own inputs), or
    'both' (judged by isolated). noise_floor: None (the dtype default band),
    a floor file path or a LayerFloor. modules: None/'default', 'all', or a
    list of paths.
    """
    from logitparity.capture import hooks

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    floor = _resolve_floor(noise_floor)
    cand = hooks.hf_module(candidate, "candidate")
    if isinstance(reference, ReferenceTrace):
        if prompts is not None or modules is not None:
            raise ValueError("reference is a ReferenceTrace: its prompts and modules are fixed; "
                             "pass prompts=None and modules=None")
        rt = reference
        ref_hf = None
    else:
        ref_hf = hooks.hf_module(reference, "reference")
        if ref_hf is cand:
            raise ValueError("reference and candidate are the same model object, so any change applies to both; "
                             "trace the reference first: ref = logitparity.layers.trace_reference(model, prompts), "
                             "then compare_layers(ref, model) with the change applied")
        paths = hooks.select_modules(ref_hf, modules)
        ids, tokens = _prompts(prompts, _tokenizer(reference, candidate, tokenizer=tokenizer), limit)
        rt = ReferenceTrace(paths, ids, tokens, [], dtype_name(ref_hf))
    cand_names = dict(cand.named_modules())
    missing = [p for p in rt.paths if not hooks.has_module(cand, p, cand_names)]
    if missing:
        raise ValueError(f"candidate has no module {missing[0]!r} (of {len(missing)} missing); "
                         "layer comparison needs the same module paths on both sides")
    core = _core()
    order: list[str] = []
    parts: dict[str, dict[str, list]] = {}
    n_positions = 0
    for i, tokens in enumerate(rt.token_ids):
        tr = rt.traces[i] if rt.traces else hooks.trace(ref_hf, tokens, rt.paths, keep_inputs=mode != "propagated")
        n_positions += len(tokens)
        seen: dict[str, int] = {}
        keys = []
        for rec in tr.modules:
            k = seen.get(rec.path, 0)
            seen[rec.path] = k + 1
            key = rec.path if k == 0 else f"{rec.path}#{k}"
            keys.append(key)
            if i == 0:
                order.append(key)
        if mode in ("propagated", "both"):
            ct = hooks.trace(cand, tokens, rt.paths)
            cand_by = {}
            cseen: dict[str, int] = {}
            for rec in ct.modules:
                k = cseen.get(rec.path, 0)
                cseen[rec.path] = k + 1
                cand_by[rec.path if k == 0 else f"{rec.path}#{k}"] = rec.output
            for key, rec in zip(keys, tr.modules):
                if key in cand_by:
                    per_row, merged = _diff(core, rec.output, cand_by[key], key)
                    d = parts.setdefault(key, {}).setdefault("propagated", [[], []])
                    d[0].append(merged)
                    d[1].append(per_row)
        if mode in ("isolated", "both"):
            for key, rec in zip(keys, tr.modules):
                out = hooks.run_isolated(cand, rec)
                per_row, merged = _diff(core, rec.output, out, key)
                d = parts.setdefault(key, {}).setdefault("isolated", [[], []])
                d[0].append(merged)
                d[1].append(per_row)
    cand_dtype = dtype_name(cand)
    default = default_band(rt.dtype, cand_dtype)
    comps = []
    for key in order:
        path = key.split("#")[0]
        layer, kind = module_kind(path)
        band = (floor.band(path) if floor is not None else None) or default
        c = ModuleComparison(path=key, layer=layer, kind=kind, band=band)
        for m in ("propagated", "isolated"):
            if m in parts.get(key, {}):
                setattr(c, m, ModuleError.from_parts(*parts[key][m]))
        comps.append(c)
    judged = "propagated" if mode == "propagated" else "isolated"
    first, evidence = _first_divergent(comps, judged)
    return LayerComparison(mode=mode, judged_by=judged, modules=comps, first_divergent=first, evidence=evidence,
                           prompts=list(rt.prompt_ids), positions=n_positions, ref_dtype=rt.dtype,
                           cand_dtype=cand_dtype,
                           band_source=default.source if floor is None else f"floor {floor.path}")


def _first_divergent(comps: list[ModuleComparison], mode: str) -> tuple[str | None, dict[str, Any] | None]:
    for i, c in enumerate(comps):
        e = c.error(mode)
        if e is not None and c.band.leaves(e):
            why = []
            if e.rel_l2 > c.band.rel_l2:
                why.append(f"relative L2 {e.rel_l2:.3g} > band {c.band.rel_l2:.3g}")
            if e.rel_l2_max > c.band.rel_l2_max:
                why.append(f"per-position max relative L2 {e.rel_l2_max:.3g} > band {c.band.rel_l2_max:.3g}")
            if e.nonfinite_cand > e.nonfinite_ref:
                why.append(f"{e.nonfinite_cand} non-finite entries in the candidate vs {e.nonfinite_ref}")
            nxt = [{"path": n.path, "error": None if n.error(mode) is None else n.error(mode).to_dict(),
                    "out_of_band": n.out_of_band(mode)} for n in comps[i + 1:i + 4]]
            return c.path, {"path": c.path, "layer": c.layer, "kind": c.kind, "mode": mode, "why": "; ".join(why),
                            "error": e.to_dict(),
                            "band": {"rel_l2": c.band.rel_l2, "rel_l2_max": c.band.rel_l2_max,
                                     "source": c.band.source},
                            "next": nxt}
    return None, None


# --------------------------------------------------------------------------
# Bisect over decoder layers from the outputs alone


@dataclasses.dataclass(frozen=True)
class Bisection:
    """first_bad_layer: the first decoder layer whose candidate version makes
    the final logits leave the threshold (None: none does, or the difference
    sits outside the decoder layers: outside_layers). steps: (k, relative L2
    of the logits) for each pass, k = number of leading candidate layers."""

    first_bad_layer: int | None
    outside_layers: bool
    passes: int
    threshold: float
    steps: list[tuple[int, float]]


def bisect_layers(reference: Any, candidate: Any, prompts: Any = None, *, threshold: float | None = None,
                  limit: int | None = None, tokenizer: Any = None) -> Bisection:
    """Find the first bad decoder layer from the final logits alone: the
    candidate runs with its layers [0, k) and the reference's layers [k, L)
    swapped in (copied to the candidate's dtype); bad(k) is the logits'
    relative L2 against the reference above ``threshold``. bad(k) is false
    at k = 0 up to noise and true from the first bad layer + 1 on, so a
    binary search takes 2 + ceil(log2 L) passes.

    threshold: None = max(FLOOR_MARGIN x the k = 0 error, the dtype default
    band of the logits), so a bf16 candidate's own rounding is not a bug.
    """
    from logitparity.capture import hooks

    ref = hooks.hf_module(reference, "reference")
    cand = hooks.hf_module(candidate, "candidate")
    if ref is cand:
        raise ValueError("bisect needs two distinct model objects (the candidate's layers are swapped for the "
                         "reference's); load the reference twice")
    n_layers = len(hooks.decoder_layers(cand, "candidate"))
    if len(hooks.decoder_layers(ref, "reference")) != n_layers:
        raise ValueError(f"reference has {len(ref.model.layers)} decoder layers, candidate {n_layers}; "
                         "bisect needs the same architecture")
    _, tokens = _prompts(prompts, _tokenizer(reference, candidate, tokenizer=tokenizer), limit)
    core = _core()
    ref_logits = [hooks.logits_rows(ref, t) for t in tokens]
    steps: list[tuple[int, float]] = []

    def err(k: int) -> float:
        with hooks.swapped_layers(cand, ref, range(k, n_layers)):
            merged = [_diff(core, r, hooks.logits_rows(cand, t), "logits")[1] for r, t in zip(ref_logits, tokens)]
        e = float(core.merge_diff(np.stack(merged))[list(core.DIFF_FIELDS).index("rel_l2")])
        steps.append((k, e))
        return e

    e0 = err(0)
    if threshold is None:
        threshold = max(FLOOR_MARGIN * e0, default_band(dtype_name(ref), dtype_name(cand)).rel_l2)
    elif not (isinstance(threshold, (int, float)) and threshold > 0):
        raise ValueError(f"threshold must be a positive number (relative L2 of the logits), got {threshold!r}")
    if e0 > threshold:
        return Bisection(None, True, len(steps), float(threshold), steps)
    if err(n_layers) <= threshold:
        return Bisection(None, False, len(steps), float(threshold), steps)
    lo, hi = 0, n_layers  # bad(lo) false, bad(hi) true
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if err(mid) > threshold:
            hi = mid
        else:
            lo = mid
    return Bisection(hi - 1, False, len(steps), float(threshold), steps)


# --------------------------------------------------------------------------
# Two dumps with activations (any engine): propagated only


def compare_activation_dumps(reference: Any, candidate: Any, *, noise_floor: Any = None) -> LayerComparison:
    """Compare the activation rows of two dumps (docs/dump-format.md,
    'Activations'), module by module, matched by canonical path (aliases
    resolved) and prompt id. Dumps hold each run on its own inputs, so the
    comparison is propagated; the band is the floor's, or the dtype default
    of the recorded dtypes."""
    from logitparity.activations import Activations, load_activations

    ref = reference if isinstance(reference, Activations) else load_activations(reference)
    cand = candidate if isinstance(candidate, Activations) else load_activations(candidate)
    floor = _resolve_floor(noise_floor)
    common = [p for p in ref.records if p in cand.records and ref.has_rows(p) and cand.has_rows(p)]
    if not common:
        raise ValueError(f"no prompt has activation rows in both {ref.root} and {cand.root}; capture both with "
                         "--activations rows on the same prompts")
    cand_modules = {cand.canonical(m) for m in cand.modules} | set(cand.aliases.values())
    paths = [m for m in ref.modules if m in cand_modules]
    if not paths:
        raise ValueError(f"the dumps share no module path (reference: {ref.modules[:3]}…, candidate: "
                         f"{cand.modules[:3]}…); add an alias map to the candidate's activations part")
    core = _core()
    dtypes = {}
    for side, acts in (("ref", ref), ("cand", cand)):
        ds = {m["dtype"] for m in acts.manifest["modules"] if m.get("dtype")}
        dtypes[side] = max(ds, key=lambda d: UNIT_ROUNDOFF.get(d, 0)) if ds else "fp32"
    default = default_band(dtypes["ref"], dtypes["cand"])
    comps, n_positions = [], 0
    for pid in common:
        n_positions += int(ref.records[pid]["positions"] or 0)
    for path in paths:
        merged, per_rows = [], []
        for pid in common:
            a, abf = ref.rows(pid, path)
            b, bbf = cand.rows(pid, path)
            if a.shape != b.shape:
                raise ValueError(f"module {path}, prompt {pid!r}: reference rows {a.shape}, candidate {b.shape}; "
                                 "were both captured at the same positions?")
            per_row, m = core.activation_diff(a, abf, b, bbf, 1)
            merged.append(m)
            per_rows.append(per_row)
        layer, kind = module_kind(path)
        band = (floor.band(path) if floor is not None else None) or default
        comps.append(ModuleComparison(path=path, layer=layer, kind=kind, band=band,
                                      propagated=ModuleError.from_parts(merged, per_rows)))
    first, evidence = _first_divergent(comps, "propagated")
    return LayerComparison(mode="propagated", judged_by="propagated", modules=comps, first_divergent=first,
                           evidence=evidence, prompts=common, positions=n_positions, ref_dtype=dtypes["ref"],
                           cand_dtype=dtypes["cand"],
                           band_source=default.source if floor is None else f"floor {floor.path}")
