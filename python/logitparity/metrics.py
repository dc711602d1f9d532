"""Row metrics on logit tensors: the thin Python side of the fused C++ kernel.

``compare_logits(ref, cand)`` compares row i of ``ref`` with row i of
``cand`` and returns one value per row for every field of the DESIGN table.
Inputs are numpy arrays or torch tensors of float32, float16 or bfloat16
(torch bf16, or numpy uint16 bit patterns with ``bf16=True``), shaped [vocab],
[rows, vocab] or [..., vocab]; CPU tensors cross without a copy where their
last dimension is contiguous. CUDA arrays (torch tensors, anything with
``__cuda_array_interface__`` such as CuPy, or with ``__dlpack__`` such as
JAX) are read in place on the GPU by the core's CUDA kernels, on the
producer's stream; only the small per-row results come to the host
(docs/gpu.md), and log_softmax returns device memory. Where the core was
built without CUDA or no GPU is usable, CUDA torch tensors are copied to the
host.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np

from logitparity import fields as _fields
from logitparity._cuda_arrays import (
    CudaRows,
    check_same_device,
    cuda_rows,
    cuda_usable,
    dlpack_device,
    on_cuda,
    wait_for_producer,
)
from logitparity._native import core as _core

from logitparity.stats import Describe, Rate, describe, rate

__all__ = [
    "FIELDS",
    "RowMetrics",
    "RowMetricsSummary",
    "compare_logits",
    "log_softmax",
    "logsumexp",
    "nll",
    "topk",
]

MAX_TOPK = 64
DEFAULT_TOPK = (1, 5, 10)

# name -> (unit, higher_is_better or None when neither direction is better)
# Per-row fields of compare_logits with (unit, higher_is_better), from the one
# registry (logitparity.fields).
FIELDS: dict[str, tuple[str, bool | None]] = {f.name: (f.unit, f.higher_is_better) for f in _fields.ROW_FIELDS}
INT_FIELDS = tuple(f.name for f in _fields.INT_FIELDS)


def _threads(threads: int | None) -> int:
    if threads is None:
        return 0  # the core's default: all cores
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive int or None (all cores), got {threads!r}")
    hi = int(_core().max_threads())
    if threads > hi:
        raise ValueError(
            f"threads must be in [1, {hi}] (at most 4x the {os.cpu_count()} cores here, or 64), "
            f"got {threads}; pass None for all cores"
        )
    return int(threads)


def as_rows(x: Any, name: str, bf16: bool = False) -> tuple[np.ndarray, bool, tuple[int, ...]]:
    """-> (2-D array of float32/float16/uint16 with a contiguous last dim,
    is_bf16, leading shape)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch  # only when a tensor was passed

        if x.is_cuda or x.device.type != "cpu":
            x = x.detach().to("cpu")
        x = x.detach()
        if x.dtype == torch.bfloat16:
            arr = x.view(torch.int16).numpy().view(np.uint16)
            bf16 = True
        elif x.dtype in (torch.float32, torch.float16):
            arr = x.numpy()
        else:
            raise TypeError(
                f"{name} must be float32, float16 or bfloat16, got torch.{str(x.dtype).split('.')[-1]}; "
                f"convert with {name}.float()"
            )
    elif isinstance(x, (np.ndarray, np.generic)):
        arr = np.asarray(x)
    elif isinstance(x, (list, tuple)):
        raise TypeError(
            f"{name} must be a numpy array or torch tensor of logits, got a {type(x).__name__}; "
            f"wrap it with np.asarray({name}, dtype=np.float32)"
        )
    elif dlpack_device(x) is not None:  # a host array of another framework
        try:
            arr = np.from_dlpack(x)
        except (TypeError, BufferError, RuntimeError) as e:
            raise TypeError(
                f"{name}: numpy cannot read this {type(x).__name__} through DLPack ({e}); "
                f"pass a numpy array or torch tensor"
            ) from e
    else:
        raise TypeError(
            f"{name} must be a numpy array or torch tensor of logits, got {type(x).__name__}"
        )
    if arr.dtype == np.uint16:
        if not bf16:
            raise TypeError(
                f"{name} is uint16: pass bf16=True if it holds bfloat16 bit patterns"
            )
    elif arr.dtype == np.float16 or arr.dtype == np.float32:
        if bf16 and arr.dtype != np.uint16:
            raise TypeError(f"{name}: bf16=True needs uint16 bit patterns, got {arr.dtype}")
    elif arr.dtype.name == "bfloat16":  # ml_dtypes
        arr = arr.view(np.uint16)
        bf16 = True
    else:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16 (uint16 bits with bf16=True), "
            f"got {arr.dtype}; convert with {name}.astype(np.float32)"
        )
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a scalar")
    lead = tuple(arr.shape[:-1])
    vocab = arr.shape[-1]
    if vocab == 0 or arr.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)}); expected [rows, vocab] with rows, vocab >= 1")
    if arr.ndim == 1:
        arr = arr.reshape(1, vocab)
    elif arr.ndim > 2:
        try:
            arr = arr.reshape(-1, vocab)  # a view when strides allow, else a copy
        except ValueError:
            arr = np.ascontiguousarray(arr).reshape(-1, vocab)
    # Broadcast (stride-0) or overlapping rows are copied: the core reads
    # rows that do not overlap, with a contiguous last dimension.
    overlapping = arr.shape[0] > 1 and arr.strides[0] < vocab * arr.itemsize
    if (arr.strides[1] != arr.itemsize or arr.strides[0] < 0 or arr.strides[0] % arr.itemsize
            or overlapping):
        arr = np.ascontiguousarray(arr)
    return arr, bf16, lead


def _check_lead(lead_a: tuple[int, ...], lead_b: tuple[int, ...], an: str, bn: str) -> None:
    """Rows are compared by position: the leading shapes must agree (up to
    leading 1s), not only their products."""

    def squeeze(lead: tuple[int, ...]) -> tuple[int, ...]:
        while lead and lead[0] == 1:
            lead = lead[1:]
        return lead

    if squeeze(lead_a) != squeeze(lead_b):
        raise ValueError(
            f"{an} and {bn} must have the same leading shape (every dim but the vocabulary), "
            f"got {lead_a} and {lead_b}; rows are compared by position, so reshape one side "
            f"(e.g. {bn}.reshape({an}.shape)) only if its rows really correspond"
        )


def _check_vocab(a: np.ndarray, b: np.ndarray, an: str, bn: str) -> None:
    if a.shape[1] != b.shape[1]:
        hint = ""
        lo, hi = sorted((a.shape[1], b.shape[1]))
        if hi % 64 == 0 or hi % 128 == 0:
            hint = (f"; one side may use a padded vocabulary ({hi}): slice both to the real "
                    f"vocabulary, e.g. {an}[..., :{lo}]")
        raise ValueError(
            f"{an} and {bn} must have the same vocab size (last dim), got {a.shape[1]} and "
            f"{b.shape[1]}; were both runs made with the same tokenizer?{hint}"
        )
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{an} and {bn} must have the same number of rows, got {a.shape[0]} and "
            f"{b.shape[0]} (after flattening leading dims)"
        )


def _targets(targets: Any, rows: int, vocab: int, lead: tuple[int, ...]) -> np.ndarray:
    mod = type(targets).__module__
    if mod.startswith("torch"):
        targets = targets.detach().cpu().numpy()
    elif hasattr(targets, "__cuda_array_interface__") and hasattr(targets, "get"):
        targets = targets.get()  # CuPy: a few ids per row, copied to the host
    t = np.asarray(targets)
    if t.dtype.kind not in "iu":
        raise TypeError(f"targets must hold integer token ids, got dtype {t.dtype}")
    if t.size != rows:
        raise ValueError(
            f"targets must have one token id per row ({rows} rows, leading shape {lead}), "
            f"got shape {t.shape}"
        )
    t = t.reshape(-1)
    if t.dtype.kind == "u" and t.size and int(t.max()) >= vocab:
        # Checked before the cast: uint64 ids >= 2^63 would wrap to negative
        # int64 and 2^64 - 1 would silently mean "no target".
        i = int(np.argmax(t >= vocab))
        raise ValueError(
            f"targets must be in [0, {vocab}) (the vocab size), got {int(t[i])} at row {i} "
            f"(unsigned {t.dtype}: -1 for none needs a signed dtype)"
        )
    t = np.ascontiguousarray(t, dtype=np.int64)
    bad = (t < -1) | (t >= vocab)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"targets must be in [0, {vocab}) (the vocab size) or -1 for none, "
            f"got {int(t[i])} at row {i}"
        )
    return t


_TOPK_CACHE: dict[tuple[Any, int], list[int]] = {}


def _topk_cached(topk: Any, vocab: int) -> list[int]:
    """_topk_list (None: DEFAULT_TOPK up to the vocab size), remembered for
    None, a plain int or a tuple of plain ints (only those: True == 1 and
    5.0 == 5 as keys, and they must still be rejected): a GPU call's host
    time counts. The list is the core's argument and is not changed."""
    plain = topk is None or type(topk) is int or (
        type(topk) is tuple and all(type(k) is int for k in topk))
    if plain:
        ks = _TOPK_CACHE.get((topk, vocab))
        if ks is not None:
            return ks
    ks = _topk_list([k for k in DEFAULT_TOPK if k <= vocab] if topk is None else topk, vocab)
    if plain and len(_TOPK_CACHE) < 256:
        _TOPK_CACHE[(topk, vocab)] = ks
    return ks


def _topk_list(ks: Iterable[int] | int, vocab: int) -> list[int]:
    if isinstance(ks, (int, np.integer)) and not isinstance(ks, bool):
        ks = (int(ks),)
    elif isinstance(ks, (bool, np.bool_, str, bytes)) or not hasattr(ks, "__iter__"):
        raise TypeError(f"topk must hold ints (an int or a sequence of ints, e.g. (1, 5, 10)), "
                        f"got {ks!r}")
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"topk must hold ints, got {k!r}")
        hi = min(MAX_TOPK, vocab)
        if not 1 <= k <= hi:
            raise ValueError(
                f"topk must be in [1, {hi}] (min of {MAX_TOPK} and the vocab size {vocab}), got {k}"
            )
        out.append(int(k))
    return sorted(set(out))


@dataclasses.dataclass
class RowMetrics:
    """One value per compared row (see FIELDS and docs/metrics.md).

    Float fields are float64 numpy arrays; NaN marks a row with a NaN or +inf
    logit on either side (``nonfinite_ref``/``nonfinite_cand`` say which) or
    a field that needs a target when none was given. Integer fields are int64
    (-1 where undefined). ``topk_common[k]`` is |top-k(ref) ∩ top-k(cand)|.
    ``shape`` is the leading shape of the inputs (rows flattened in C order).
    """

    lse_ref: np.ndarray
    lse_cand: np.ndarray
    kl_ref_cand: np.ndarray
    kl_cand_ref: np.ndarray
    js: np.ndarray
    cosine: np.ndarray
    max_abs_logit: np.ndarray
    mean_abs_logit: np.ndarray
    max_abs_logprob: np.ndarray
    entropy_ref: np.ndarray
    entropy_cand: np.ndarray
    margin_ref: np.ndarray
    margin_cand: np.ndarray
    nll_ref: np.ndarray
    nll_cand: np.ndarray
    delta_p: np.ndarray
    argmax_ref: np.ndarray
    argmax_cand: np.ndarray
    rank_of_ref_top1_in_cand: np.ndarray
    nonfinite_ref: np.ndarray
    nonfinite_cand: np.ndarray
    topk_common: dict[int, np.ndarray]
    shape: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.lse_ref.shape[0])

    @property
    def same_top1(self) -> np.ndarray:
        """Bool per row: the candidate's top-1 token is the reference's."""
        return (self.argmax_ref == self.argmax_cand) & (self.argmax_ref >= 0)

    def summary(self) -> "RowMetricsSummary":
        fields = {name: describe(getattr(self, name)) for name in FIELDS}
        valid = self.argmax_ref >= 0
        n = int(valid.sum())
        rates = {"same_top1": rate(int(self.same_top1.sum()), n)}
        for k, ov in self.topk_common.items():
            # share of the reference's top-k found in the candidate's top-k
            fields[f"top{k}_overlap"] = describe(np.where(valid, ov / k, np.nan))
        return RowMetricsSummary(rows=len(self), fields=fields, rates=rates)

    def __repr__(self) -> str:
        return f"RowMetrics(rows={len(self)}, shape={self.shape})\n{self.summary().to_markdown()}"

    def _repr_markdown_(self) -> str:
        return f"**RowMetrics**: {len(self)} rows\n\n{self.summary().to_markdown()}"


@dataclasses.dataclass
class RowMetricsSummary:
    rows: int
    fields: dict[str, Describe]
    rates: dict[str, Rate]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "fields": {k: v.to_dict() for k, v in self.fields.items()},
            "rates": {k: v.to_dict() for k, v in self.rates.items()},
        }

    def to_markdown(self) -> str:
        lines = [
            "| metric | | mean ± se | median | p99 | max |",
            "|---|---|---|---|---|---|",
        ]
        for name, d in self.fields.items():
            _, better = FIELDS.get(name, ("", True))
            arrow = {True: "↑", False: "↓", None: ""}[better]
            mean = "nan" if math.isnan(d.mean) else f"{d.mean:.4g} ± {d.se:.2g}"
            lines.append(
                f"| {name} | {arrow} | {mean} | {d.median:.4g} | {d.p99:.4g} | {d.max:.4g} |"
            )
        for name, r in self.rates.items():
            lines.append(f"| {name} | ↑ | {r} | | | |")
        return "\n".join(lines)

    _repr_markdown_ = to_markdown

    def __repr__(self) -> str:
        return self.to_markdown()


def compare_logits(
    ref: Any,
    cand: Any,
    *,
    targets: Any = None,
    topk: Sequence[int] | int | None = None,
    threads: int | None = None,
    js: bool = False,
    ref_bf16: bool = False,
    cand_bf16: bool = False,
) -> RowMetrics:
    """Compare row i of ``ref`` with row i of ``cand`` (logits, same shape).

    targets: optional token id per row (-1 for none) for nll_ref, nll_cand
    and delta_p. topk: the k values for topk_common (each 1..64); None
    means (1, 5, 10), leaving out those above the vocab size. threads:
    worker threads (None = all cores); results are bitwise identical for any
    value. js: True adds Jensen-Shannon, which takes a second sweep with two
    exps and up to two logs per element (about 1.6x the time of the rest,
    benchmarks/bench_metrics.py); off by default, leaving NaN.
    """
    nthreads = _threads(threads)
    if on_cuda(ref) or on_cuda(cand):
        check_same_device(ref, cand)
        if cuda_usable():
            return _compare_cuda(ref, cand, targets, topk, js, ref_bf16, cand_bf16)
        # No CUDA kernels or no GPU: torch tensors are copied to the host below.
    a, a_bf16, lead = as_rows(ref, "ref", ref_bf16)
    b, b_bf16, lead_b = as_rows(cand, "cand", cand_bf16)
    _check_vocab(a, b, "ref", "cand")
    _check_lead(lead, lead_b, "ref", "cand")
    if len(lead_b) > len(lead):
        lead = lead_b
    ks = _topk_cached(topk, a.shape[1])
    t = None if targets is None else _targets(targets, a.shape[0], a.shape[1], lead)
    fields, names, overlap = _core().compare_rows(a, a_bf16, b, b_bf16, t, ks, bool(js), nthreads)
    return _row_metrics(fields, names, overlap, ks, lead)


_INT_COLUMNS: dict[tuple[str, ...], Any] = {}  # the core's field names -> INT_FIELDS' columns


def _int_columns(names: tuple[str, ...]) -> Any:
    """The columns of INT_FIELDS among the core's fields: a slice where they
    are a run (the core's layout; a fancy index costs 3x the copy itself)."""
    cols = _INT_COLUMNS.get(names)
    if cols is None:
        if set(names) != set(FIELDS) | set(INT_FIELDS):
            raise RuntimeError(f"the core's fields {names} are not logitparity.fields' "
                               f"{tuple(FIELDS) + INT_FIELDS}: rebuild the core")
        idx = [names.index(n) for n in INT_FIELDS]
        run = idx == list(range(idx[0], idx[0] + len(idx)))
        cols = _INT_COLUMNS.setdefault(names, slice(idx[0], idx[0] + len(idx)) if run else idx)
    return cols


def _row_metrics(fields: np.ndarray, names: Sequence[str], overlap: np.ndarray, ks: list[int],
                 lead: tuple[int, ...]) -> RowMetrics:
    """RowMetrics over the core's [rows, F] fields: float fields are column
    views, integer fields one int64 copy (contiguous per field)."""
    names = tuple(names)
    ints = np.ascontiguousarray(fields[:, _int_columns(names)].T, dtype=np.int64)
    return _row_metrics_views(fields, names, overlap, ks, lead, ints)


def _row_metrics_views(fields: np.ndarray, names: tuple[str, ...], overlap: np.ndarray,
                       ks: list[int], lead: tuple[int, ...], ints: np.ndarray) -> RowMetrics:
    """RowMetrics of views of fields, overlap and ints (INT_FIELDS as int64,
    one row per field in INT_FIELDS' order), which need not hold the results
    yet: the GPU path builds it while the kernel runs."""
    kw = dict(zip(names, fields.T))
    kw.update(zip(INT_FIELDS, ints))
    return RowMetrics(**kw, topk_common=dict(zip(ks, overlap.T)), shape=lead)


def _compare_cuda(ref: Any, cand: Any, targets: Any, topk: Any, js: bool, ref_bf16: bool,
                  cand_bf16: bool) -> RowMetrics:
    a = cuda_rows(ref, "ref", ref_bf16)
    b = cuda_rows(cand, "cand", cand_bf16)
    if a.vocab != b.vocab or a.rows != b.rows:
        _check_vocab(_ShapeOnly(a.rows, a.vocab), _ShapeOnly(b.rows, b.vocab), "ref", "cand")
    if a.lead != b.lead:
        _check_lead(a.lead, b.lead, "ref", "cand")
    lead = b.lead if len(b.lead) > len(a.lead) else a.lead
    ks = _topk_cached(topk, a.vocab)
    t, t_dev = None, _device_targets(targets, a)
    if t_dev is None and targets is not None:
        t = _targets(targets, a.rows, a.vocab, lead)
    wait_for_producer(a, b)  # the kernel runs on ref's stream
    job, fields, names, overlap, ints = _core().compare_rows_cuda_start(
        a.ptr, a.dtype, a.stride, b.ptr, b.dtype, b.stride, a.rows, a.vocab, t, ks, bool(js),
        a.stream, 0 if t_dev is None else t_dev.data_ptr())
    # The result object is built while the kernel runs (a call's host time is
    # part of its time); finish() waits and fills the arrays it views (the
    # integer fields converted to int64 there too: the core's last fields).
    try:
        if names[len(names) - len(ints):] != INT_FIELDS:
            raise RuntimeError(f"the core's last {len(ints)} fields {names} are not "
                               f"logitparity.fields' INT_FIELDS {INT_FIELDS}: rebuild the core")
        m = _row_metrics_views(fields, names, overlap, ks, lead, ints)
    finally:
        job.finish()
    return m


def _device_targets(targets: Any, rows: CudaRows) -> Any:
    """Torch CUDA targets on the rows' device as a contiguous int64 tensor,
    read in place by the kernel, which checks the range there (same message
    as _targets); None for every other kind of targets (checked on the host).
    Copying them to the host cost a synchronization and two copies per call
    (about 100 us of an 830 us call at 512 x 151936 on the H200)."""
    if not type(targets).__module__.startswith("torch") or targets.device.type != "cuda":
        return None
    import torch

    owner_device = getattr(rows.owner, "device", None)
    if (targets.dtype == torch.int64 and targets.ndim == 1 and targets.shape[0] == rows.rows
            and targets.is_contiguous() and targets.device == owner_device):
        return targets  # as the kernel reads them (the common case: no torch op)
    if targets.dtype in (torch.bool, torch.uint64) or targets.is_floating_point() or targets.is_complex():
        return None  # the host path names the dtype (uint64: see _targets)
    if targets.numel() != rows.rows:
        return None  # the host path says what shape was expected
    if owner_device is not None and targets.device != owner_device:
        return None
    return targets.detach().reshape(-1).to(torch.int64).contiguous()


@dataclasses.dataclass
class _ShapeOnly:
    """Stands in for an array in _check_vocab (it reads .shape only)."""

    rows: int
    vocab: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.vocab)


def _reshape(out: np.ndarray, lead: tuple[int, ...]) -> np.ndarray:
    return out.reshape(*lead, *out.shape[1:]) if lead else out.reshape(out.shape[1:])


def on_gpu(x: Any) -> bool:
    """True when x is a CUDA array that the core's CUDA kernels read in place
    (a CUDA build with a usable GPU); callers then keep x where it is."""
    return on_cuda(x) and cuda_usable()



def _empty_like_rows(x: Any, shape: tuple[int, ...]) -> Any:
    """Float32 device memory for a CUDA result, of x's framework."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        return torch.empty(shape, dtype=torch.float32, device=x.device)
    if mod.startswith("cupy"):
        import cupy

        with cupy.cuda.Device(x.device.id):
            return cupy.empty(shape, dtype=cupy.float32)
    raise TypeError(
        f"log_softmax of a CUDA {type(x).__name__} needs a torch tensor or CuPy array to allocate "
        "its output; wrap it first (torch.from_dlpack(x) or cupy.from_dlpack(x))"
    )


def _out_ptr(out: Any) -> int:
    return int(out.data_ptr()) if hasattr(out, "data_ptr") else int(out.data.ptr)


def _log_softmax_cuda(x: Any, bf16: bool, inplace: bool) -> Any:
    r = cuda_rows(x, "x", bf16)
    if inplace:
        same = type(x).__module__.startswith("torch") and r.owner.data_ptr() == x.data_ptr()
        if not (same or hasattr(x, "__cuda_array_interface__")) or r.dtype != 0 or r.stride != r.vocab:
            raise TypeError(
                "inplace=True needs a non-empty, contiguous float32 array (on the GPU: a torch "
                "tensor or CuPy array); use inplace=False (the default) for other inputs"
            )
        _core().log_softmax_cuda(r.ptr, r.dtype, r.stride, r.rows, r.vocab, r.ptr, r.stream)
        return x
    out = _empty_like_rows(x, (*r.lead, r.vocab))
    _core().log_softmax_cuda(r.ptr, r.dtype, r.stride, r.rows, r.vocab, _out_ptr(out), r.stream)
    return out


def log_softmax(
    x: Any, *, threads: int | None = None, bf16: bool = False, inplace: bool = False
) -> Any:
    """Row-wise log-softmax (natural log) as float32, same shape as x: a
    numpy array for host input, device memory of x's framework (torch or
    CuPy) for CUDA input, computed there on x's stream.

    inplace=True overwrites x (a writeable, C-contiguous float32 numpy array,
    torch tensor, or CuPy array) and returns it."""
    if on_gpu(x):
        _threads(threads)
        return _log_softmax_cuda(x, bf16, inplace)
    if inplace:
        arr = x.detach().numpy() if type(x).__module__.startswith("torch") else x
        if not (isinstance(arr, np.ndarray) and arr.dtype == np.float32
                and arr.flags.c_contiguous and arr.flags.writeable and arr.size):
            raise TypeError(
                "inplace=True needs a non-empty, writeable, C-contiguous float32 array; "
                "use inplace=False (the default) for other inputs"
            )
        _core().log_softmax_(arr.reshape(-1, arr.shape[-1]), _threads(threads))
        return x
    a, is_bf16, lead = as_rows(x, "x", bf16)
    return _reshape(_core().log_softmax(a, is_bf16, _threads(threads)), lead)


def topk(x: Any, k: int, *, threads: int | None = None, bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (values as float32, indices as int64) per row, by value descending,
    ties broken by the lower index. CUDA input is read in place (k up to
    MAX_TOPK_CUDA; larger k copies torch tensors to the host)."""
    on_host = (type(x).__module__.startswith("torch") and isinstance(k, (int, np.integer))
               and not isinstance(k, bool) and k > _core().MAX_TOPK_CUDA)  # copied below
    if on_gpu(x) and not on_host:
        _threads(threads)
        r = cuda_rows(x, "x", bf16)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {k!r}")
        hi = min(r.vocab, int(_core().MAX_TOPK_CUDA))
        if not 1 <= k <= hi:
            raise ValueError(
                f"k must be in [1, {hi}] on the GPU (min of the vocab size {r.vocab} and "
                f"{_core().MAX_TOPK_CUDA}), got {k}; pass a torch tensor (larger k is computed on "
                "the host) or a host array"
            )
        v, i, _ = _core().topk_cuda(r.ptr, r.dtype, r.stride, r.rows, r.vocab, int(k), r.stream)
        return _reshape(v, r.lead), _reshape(i, r.lead)
    a, is_bf16, lead = as_rows(x, "x", bf16)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {k!r}")
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"k must be in [1, {a.shape[1]}] (the vocab size), got {k}")
    v, i = _core().topk(a, is_bf16, int(k), _threads(threads))
    return _reshape(v, lead), _reshape(i, lead)


def nll(x: Any, targets: Any, *, threads: int | None = None, bf16: bool = False) -> np.ndarray:
    """Negative log-likelihood (nats) of targets[r] under softmax(x[r]), float64."""
    if on_gpu(x):
        _threads(threads)
        r = cuda_rows(x, "x", bf16)
        t = _targets(targets, r.rows, r.vocab, r.lead)
        if (t < 0).any():
            raise ValueError(f"targets must be in [0, {r.vocab}) for nll, got -1 at row {int(np.argmax(t < 0))}")
        out = _core().nll_cuda(r.ptr, r.dtype, r.stride, r.rows, r.vocab, t, r.stream)
        return out.reshape(r.lead) if r.lead else out.reshape(())
    a, is_bf16, lead = as_rows(x, "x", bf16)
    t = _targets(targets, a.shape[0], a.shape[1], lead)
    if (t < 0).any():
        raise ValueError(f"targets must be in [0, {a.shape[1]}) for nll, got -1 at row {int(np.argmax(t < 0))}")
    out = _core().nll(a, is_bf16, t, _threads(threads))
    return out.reshape(lead) if lead else out.reshape(())


def logsumexp(x: Any, *, threads: int | None = None, bf16: bool = False) -> np.ndarray:
    """Row-wise log-sum-exp (natural log), float64 (on the GPU for CUDA input,
    float64 exps included)."""
    if on_gpu(x):
        _threads(threads)
        r = cuda_rows(x, "x", bf16)
        out = _core().logsumexp_cuda(r.ptr, r.dtype, r.stride, r.rows, r.vocab, r.stream)
        return out.reshape(r.lead) if r.lead else out.reshape(())
    a, is_bf16, lead = as_rows(x, "x", bf16)
    out = _core().logsumexp(a, is_bf16, _threads(threads))
    return out.reshape(lead) if lead else out.reshape(())
