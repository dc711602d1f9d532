"""Weight transforms for the sensitivity map: fake quantization, emulated
casts, magnitude pruning, or a user function, applied to one weight matrix.

Every transform maps a weight ``W`` [out_features, in_features] to a tensor
of the same shape and dtype (a *fake*-quantized weight: the dequantized
values, so the model runs unchanged). Arithmetic is float64, cast back to the
weight's dtype once at the end, so the result equals a float64 NumPy
evaluation of the same formula bit for bit (tests/test_sensitivity.py).

Definitions (docs/sensitivity.md):

- ``int8`` / ``int4``, symmetric: per group of ``g`` consecutive input
  columns of one output row (per output channel: the whole row),
  s = max|w| / qmax with qmax = 2^(b−1) − 1 (127, 7); q = clamp(round(w/s),
  −qmax, qmax); w' = q·s. A group of zeros stays zero. round = half to even.
- asymmetric: s = (max − min) / (2^b − 1); z = clamp(round(−min/s), 0,
  2^b − 1); q = clamp(round(w/s) + z, 0, 2^b − 1); w' = (q − z)·s. A
  constant group (max = min) is kept as it is.
- ``fp16`` / ``bf16``: round to nearest even in that format and back
  (fp16 overflows to ±inf past 65504, as a real cast does).
- ``fp8-e4m3`` (OCP E4M3FN: 4 exponent bits, bias 7, 3 mantissa bits,
  normals from 2^−6, subnormals in steps of 2^−9): round to nearest even on
  that grid, saturating at ±448 (also ±inf); NaN stays NaN. No scale is
  applied: this is the cast, not a scaled fp8 recipe.
- ``prune``: unstructured magnitude pruning of the matrix: the
  floor(sparsity · numel) entries of smallest |w| are set to zero (ties: the
  lower flat index goes first, a stable sort).
- a callable: ``fn(weight) -> tensor`` of the same shape, given a detached
  copy.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable

import torch

__all__ = ["FP8_E4M3_MAX", "TRANSFORMS", "Transform", "cast_bf16", "cast_fp16", "cast_fp8_e4m3", "fake_quant",
           "make_transform", "prune_magnitude"]

# name -> what it is (the CLI's --transform choices, in this order)
TRANSFORMS = {
    "int8": "8-bit integer fake quantization (symmetric or asymmetric, per output channel or per group)",
    "int4": "4-bit integer fake quantization (symmetric or asymmetric, per output channel or per group)",
    "fp16": "cast to float16 and back (round to nearest even)",
    "bf16": "cast to bfloat16 and back (round to nearest even)",
    "fp8-e4m3": "cast to fp8 E4M3 and back (round to nearest even, saturating at ±448)",
    "prune": "unstructured magnitude pruning at a sparsity",
}
_ALIASES = {"fp8": "fp8-e4m3", "fp8_e4m3": "fp8-e4m3", "e4m3": "fp8-e4m3", "float16": "fp16",
            "bfloat16": "bf16"}
FP8_E4M3_MAX = 448.0  # S.1111.110 × 2^(15−7): the largest finite E4M3FN value
_FP8_MIN_NORMAL_EXP = -6  # 2^−6, the smallest normal E4M3 value
_FP8_MANTISSA_BITS = 3


def _round_half_even(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # torch.round rounds half to even, as numpy.round does


def fake_quant(w: torch.Tensor, bits: int, *, group_size: int | None = None, symmetric: bool = True) -> torch.Tensor:
    """Integer fake quantization of a 2-D weight (module docstring);
    group_size None = per output channel (one group per row)."""
    if w.dim() != 2:
        raise ValueError(f"fake_quant needs a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    g = in_f if group_size is None else int(group_size)
    if g < 1 or in_f % g:
        raise ValueError(f"group_size must divide in_features {in_f}, got {group_size}")
    x = w.detach().to(torch.float64).reshape(out_f, in_f // g, g)
    if symmetric:
        qmax = float(2 ** (bits - 1) - 1)
        amax = x.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        q = torch.clamp(_round_half_even(x / scale), -qmax, qmax)
        y = q * scale
    else:
        levels = float(2 ** bits - 1)
        lo = x.amin(dim=-1, keepdim=True)
        hi = x.amax(dim=-1, keepdim=True)
        const = hi == lo
        scale = torch.where(const, torch.ones_like(hi), (hi - lo) / levels)
        zero = torch.clamp(_round_half_even(-lo / scale), 0.0, levels)
        q = torch.clamp(_round_half_even(x / scale) + zero, 0.0, levels)
        y = torch.where(const, x, (q - zero) * scale)
    return y.reshape(out_f, in_f).to(w.dtype)


def cast_fp16(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(torch.float16).to(w.dtype)


def cast_bf16(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(torch.bfloat16).to(w.dtype)


def cast_fp8_e4m3(w: torch.Tensor) -> torch.Tensor:
    """Round to the fp8 E4M3FN grid (nearest, ties to even), saturating at
    ±448; written out in float64 so it does not depend on torch's float8
    dtype or its overflow rule."""
    x = w.detach().to(torch.float64)
    a = x.abs()
    _, e = torch.frexp(a)  # a = m · 2^e, m in [0.5, 1): floor(log2 a) = e − 1
    exp = torch.clamp(e - 1, min=_FP8_MIN_NORMAL_EXP)  # subnormals share the smallest normal's step
    step = torch.ldexp(torch.ones_like(a), exp - _FP8_MANTISSA_BITS)
    q = _round_half_even(a / step) * step  # a carry into the next binade lands on its first value
    q = torch.where(torch.isinf(a), torch.full_like(a, FP8_E4M3_MAX), q)
    q = torch.clamp(q, max=FP8_E4M3_MAX)
    y = torch.where(torch.isnan(x), x, torch.copysign(q, x))
    return y.to(w.dtype)


def prune_magnitude(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the floor(sparsity · numel) entries of smallest magnitude
    (stable: among equal magnitudes the lower flat index goes first)."""
    flat = w.detach().reshape(-1)
    k = int(math.floor(float(sparsity) * flat.numel()))
    out = flat.clone()
    if k > 0:
        order = torch.argsort(flat.abs(), stable=True)
        out[order[:k]] = 0
    return out.reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class Transform:
    """One weight transform, applied matrix by matrix (``apply``).
    ``name`` is what reports print (e.g. 'int4 g=32 sym')."""

    kind: str  # a TRANSFORMS key or 'callable'
    group_size: int | None = None
    symmetric: bool = True
    sparsity: float | None = None
    fn: Callable[[torch.Tensor], Any] | None = None

    @property
    def name(self) -> str:
        if self.kind in ("int8", "int4"):
            where = "per-channel" if self.group_size is None else f"g={self.group_size}"
            return f"{self.kind} {where} {'sym' if self.symmetric else 'asym'}"
        if self.kind == "prune":
            return f"prune {self.sparsity:g}"
        if self.kind == "callable":
            return f"callable {getattr(self.fn, '__name__', type(self.fn).__name__)}"
        return self.kind

    def check(self, path: str, weight: torch.Tensor) -> None:
        """Raise ValueError when this transform cannot apply to ``weight``."""
        if self.kind in ("int8", "int4") and self.group_size is not None:
            in_f = int(weight.shape[-1])
            if in_f % self.group_size:
                divisors = [d for d in (16, 32, 64, 128) if in_f % d == 0]
                raise ValueError(
                    f"group_size (--group-size) must divide in_features of every selected module, got "
                    f"{self.group_size}, which does not divide {in_f} ({path}); choose a divisor such as "
                    f"{', '.join(map(str, divisors)) or '1'}, or leave it out for per-output-channel scales")

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """-> the transformed weight (same shape and dtype as ``weight``)."""
        if self.kind in ("int8", "int4"):
            return fake_quant(weight, 8 if self.kind == "int8" else 4, group_size=self.group_size,
                              symmetric=self.symmetric)
        if self.kind == "fp16":
            return cast_fp16(weight)
        if self.kind == "bf16":
            return cast_bf16(weight)
        if self.kind == "fp8-e4m3":
            return cast_fp8_e4m3(weight)
        if self.kind == "prune":
            return prune_magnitude(weight, float(self.sparsity))
        out = self.fn(weight.detach().clone())
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(weight.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"transform {self.name} must return a tensor of the weight's shape "
                             f"{tuple(weight.shape)}, got {got}; return the transformed weight itself")
        return out.detach().to(dtype=weight.dtype, device=weight.device)


def make_transform(transform: Any, *, group_size: int | None = None, symmetric: bool = True,
                   sparsity: float | None = None) -> Transform:
    """A Transform from a name (TRANSFORMS, or an alias such as 'fp8'), a
    Transform (returned as it is) or a callable ``fn(weight) -> weight``.
    Options that do not apply to the transform are an error, so a typo does
    not silently measure something else."""
    if isinstance(transform, Transform):
        return transform
    if callable(transform) and not isinstance(transform, str):
        kind = "callable"
    elif isinstance(transform, str):
        kind = _ALIASES.get(transform.lower(), transform.lower())
        if kind not in TRANSFORMS:
            close = difflib.get_close_matches(transform.lower(), list(TRANSFORMS) + list(_ALIASES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"transform (--transform) must be one of {', '.join(TRANSFORMS)} (or a callable "
                             f"in Python), got {transform!r}{hint}")
    else:
        raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)} or a callable fn(weight) -> weight, "
                         f"got {type(transform).__name__}")
    if kind in ("int8", "int4"):
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise ValueError(f"group_size (--group-size) must be a positive int (input columns per scale) or "
                             f"None for per-output-channel scales, got {group_size!r}")
    elif group_size is not None or not symmetric:
        what = "group_size (--group-size)" if group_size is not None else "symmetric=False (--asymmetric)"
        raise ValueError(f"{what} applies to int8/int4 only, got it with transform {kind!r}; leave it out")
    if kind == "prune":
        if sparsity is None:
            raise ValueError("transform 'prune' needs sparsity (--sparsity) in [0, 1), the share of entries "
                             "set to zero, got none; e.g. --sparsity 0.5")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity (--sparsity) must be a number in [0, 1) (the share of entries set to "
                             f"zero), got {sparsity!r}; e.g. 0.5")
        sparsity = float(sparsity)
    elif sparsity is not None:
        raise ValueError(f"sparsity (--sparsity) applies to transform 'prune' only, got it with {kind!r}; "
                         "leave it out")
    return Transform(kind=kind, group_size=group_size if kind in ("int8", "int4") else None,
                     symmetric=bool(symmetric), sparsity=sparsity,
                     fn=transform if kind == "callable" else None)
