"""CUDA arrays as the core's CUDA kernels take them: a [rows, vocab] view of
device memory (pointer, dtype code, row stride in elements, the producer's
stream) from a torch tensor, anything with ``__cuda_array_interface__``
(CuPy), or a DLPack producer, with the checks and messages of the host path.
Shared by metrics (compare_logits, log_softmax, topk, nll, logsumexp),
layers (compare_layers on CUDA module outputs) and activations (the
writer's statistics on the GPU).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from logitparity._native import core as _core

# DLPack device types (dlpack.h): CUDA memory, and managed memory.
_DL_CUDA, _DL_CUDA_MANAGED = 2, 13


def dlpack_device(x: Any) -> tuple[int, int] | None:
    """(device_type, device_id) of an object with __dlpack__, else None."""
    if isinstance(x, (np.ndarray, np.generic)) or not hasattr(x, "__dlpack__"):
        return None
    try:
        dev = x.__dlpack_device__()
        return int(dev[0]), int(dev[1])
    except Exception:  # noqa: BLE001 - a foreign object that does not say
        return None


def on_cuda(x: Any) -> bool:
    if type(x).__module__.startswith("torch"):
        return x.device.type == "cuda"
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dev = dlpack_device(x)
    return dev is not None and dev[0] in (_DL_CUDA, _DL_CUDA_MANAGED)


_CUDA_USABLE: list[bool] = []  # once known: the count of GPUs does not change in a process


def cuda_usable() -> bool:
    if not _CUDA_USABLE:
        core = _core()
        _CUDA_USABLE.append(bool(core.cuda_built() and core.cuda_device_count() > 0))
    return _CUDA_USABLE[0]


_KERNEL_DTYPES = ("torch.float32", "torch.float16", "torch.bfloat16")


def kernel_tensor(x: Any) -> bool:
    """x is a 2-D torch CUDA tensor in a dtype the core's CUDA kernels read
    (float32, float16, bfloat16), and the core has CUDA kernels and a usable
    GPU: the activation statistics then compute on it where it is."""
    if not type(x).__module__.startswith("torch") or x.device.type != "cuda" or x.ndim != 2:
        return False
    return str(x.dtype) in _KERNEL_DTYPES and cuda_usable()


def wait_for_producer(a: CudaRows, b: CudaRows) -> None:
    """Kernels on two arrays run on a's stream: when b is a torch tensor
    produced on another stream, wait for that stream first."""
    if b.stream != a.stream and type(b.owner).__module__.startswith("torch"):
        import torch

        torch.cuda.current_stream(b.owner.device).synchronize()


def device_name(x: Any) -> str:
    if type(x).__module__.startswith("torch"):
        return str(x.device)
    if hasattr(x, "__cuda_array_interface__"):
        return "a CUDA device"
    dev = dlpack_device(x)
    return f"cuda:{dev[1]}" if dev is not None and dev[0] in (_DL_CUDA, _DL_CUDA_MANAGED) else "the CPU"


def check_same_device(ref: Any, cand: Any) -> None:
    torch_pair = type(ref).__module__.startswith("torch") and type(cand).__module__.startswith("torch")
    if torch_pair and ref.device == cand.device:
        return  # the common case, in two attribute reads
    if on_cuda(ref) != on_cuda(cand):
        gpu, cpu = ("ref", "cand") if on_cuda(ref) else ("cand", "ref")
        raise ValueError(
            f"ref is on {device_name(ref)} and cand on {device_name(cand)}; compare rows on one "
            f"device: move {cpu} to the GPU (e.g. {cpu}.to({gpu}.device)) or {gpu} to the host"
        )
    if torch_pair:
        if ref.device != cand.device:
            raise ValueError(
                f"ref is on {ref.device} and cand on {cand.device}; move one with "
                f"cand.to(ref.device)"
            )


@dataclasses.dataclass
class CudaRows:
    """A [rows, vocab] view of CUDA memory for the core (element strides)."""

    ptr: int
    dtype: int
    rows: int
    vocab: int
    stride: int
    stream: int
    lead: tuple[int, ...]
    owner: Any  # keeps the memory (or a copy) alive during the call


_RAW_STREAM: list[Any] = []  # torch._C._cuda_getCurrentRawStream (None where absent), once looked up


def torch_stream(device: Any) -> int:
    """The handle of torch's current stream on `device` (a torch.device of
    type cuda). torch._C._cuda_getCurrentRawStream returns it without
    building a Stream object (torch.cuda.current_stream took about 10 us of
    a call's host time on the H200's host); the public call where torch
    lacks it."""
    import torch

    if not _RAW_STREAM:
        _RAW_STREAM.append(getattr(torch._C, "_cuda_getCurrentRawStream", None))
    raw = _RAW_STREAM[0]
    if raw is None:
        return torch.cuda.current_stream(device).cuda_stream
    index = device.index
    return int(raw(index if index is not None else torch.cuda.current_device()))


def dtype_error(name: str, got: str) -> TypeError:
    return TypeError(
        f"{name} must be float32, float16 or bfloat16, got {got}; convert with {name}.float()"
    )


_TORCH_CODES: dict[Any, int] = {}  # torch dtype -> the core's dtype code, filled on first use


def cuda_rows(x: Any, name: str, bf16: bool) -> CudaRows:
    if type(x).__module__.startswith("torch"):
        if not _TORCH_CODES:
            import torch  # a CUDA tensor was passed, so torch is there

            _TORCH_CODES.update({torch.float32: 0, torch.float16: 1, torch.bfloat16: 2})
        code = _TORCH_CODES.get(x.dtype)
        if code is None:
            raise dtype_error(name, f"torch.{str(x.dtype).split('.')[-1]}")
        shape = x.shape
        if len(shape) == 2:
            # A [rows, vocab] tensor with contiguous rows is read as it is
            # (the common case: no view, few attribute reads; a call's host
            # time is part of its time on a GPU).
            rows, vocab = shape
            srow, scol = x.stride()
            if rows and vocab and scol == 1 and (rows == 1 or srow >= vocab):
                return CudaRows(x.data_ptr(), code, rows, vocab, srow if rows > 1 else vocab,
                                torch_stream(x.device), (rows,), x)
        if not shape:
            raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a scalar")
        lead, vocab = tuple(shape[:-1]), int(shape[-1])
        if x.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(shape)}); expected [rows, vocab] "
                             "with rows, vocab >= 1")
        # Anything else is viewed as rows where the strides allow, else
        # copied on the device.
        rows2 = x.detach().reshape(-1, vocab)
        if rows2.stride(1) != 1 or (rows2.shape[0] > 1 and rows2.stride(0) < vocab):
            rows2 = rows2.contiguous()  # broadcast / overlapping rows: copied on the device
        rows = rows2.shape[0]
        stride = rows2.stride(0) if rows > 1 else vocab
        stream = torch_stream(rows2.device)
        return CudaRows(rows2.data_ptr(), code, rows, vocab, stride, stream, lead, rows2)
    if hasattr(x, "__cuda_array_interface__"):
        cai = x.__cuda_array_interface__
        typestr, shape = cai["typestr"], tuple(int(v) for v in cai["shape"])
        kind = {"<f4": 0, "<f2": 1, "<u2": 2 if bf16 else -1}.get(typestr)
        if kind is None or kind < 0:
            hint = " (pass bf16=True for bfloat16 bit patterns)" if typestr == "<u2" else ""
            raise dtype_error(name, f"typestr {typestr!r}{hint}")
        item = 4 if kind == 0 else 2
        strides = cai.get("strides")
        stream = cai.get("stream") or 0  # None: the legacy default stream
        return _strided_rows(name, int(cai["data"][0]), kind, item, shape, strides, int(stream), x,
                             "cupy.ascontiguousarray")
    return _dlpack_rows(x, name)


def _dlpack_rows(x: Any, name: str) -> CudaRows:
    """A CUDA array known only through DLPack. The consumer names the stream
    (here the legacy default stream, DLPack's 1): the producer makes its
    pending work on the array visible there before handing it over, and the
    kernel runs on it. The capsule is read, not consumed: it stays with the
    array and frees nothing until both are gone."""
    try:
        cap = x.__dlpack__(stream=1, max_version=(1, 0))
    except TypeError:  # a producer older than DLPack 1.0
        cap = x.__dlpack__(stream=1)
    ptr, _, _, (code, bits, lanes), shape, strides = _core().dlpack_info(cap)
    kind = {(2, 32): 0, (2, 16): 1, (4, 16): 2}.get((int(code), int(bits)))
    if kind is None or lanes != 1:
        raise dtype_error(name, f"DLPack dtype (code {code}, {bits} bits, {lanes} lanes)")
    item = 4 if kind == 0 else 2
    byte_strides = None if strides is None else tuple(int(v) * item for v in strides)
    return _strided_rows(name, int(ptr), kind, item, tuple(int(v) for v in shape), byte_strides, 0,
                         (x, cap), "a contiguous copy")


def _strided_rows(name: str, ptr: int, kind: int, item: int, shape: tuple[int, ...],
                  strides: Any, stream: int, owner: Any, fix: str) -> CudaRows:
    """Rows of a CUDA array given by pointer, shape and byte strides (None:
    C-contiguous): the leading dims must fold into one row stride."""
    if not shape:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a scalar")
    vocab = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if vocab == 0 or rows == 0:
        raise ValueError(f"{name} is empty (shape {shape}); expected [rows, vocab] with rows, vocab >= 1")
    if strides is None:
        strides = tuple(int(np.prod(shape[i + 1:])) * item for i in range(len(shape)))
    ok = strides[-1] == item or vocab == 1
    for i in range(len(shape) - 2):  # leading dims must fold into one row stride
        ok = ok and (shape[i] == 1 or strides[i] == strides[i + 1] * shape[i + 1])
    row_stride = strides[-2] // item if len(shape) > 1 else vocab
    if rows > 1 and (row_stride < vocab or strides[-2] % item):
        ok = False
    if not ok:
        raise ValueError(
            f"{name}: this CUDA array's strides {tuple(strides)} do not give rows of contiguous "
            f"logits; pass a contiguous copy (e.g. {fix}({name}))"
        )
    return CudaRows(ptr, kind, rows, vocab, row_stride if rows > 1 else vocab, stream,
                     tuple(shape[:-1]), owner)
