"""The one safetensors shard writer and reader, shared by every file kind
that holds tensors: dump shards (dump.py, validate.py), baseline-cache
shards and tokens (baseline_cache.py), activation shards (activations.py).

The files are plain safetensors (an 8-byte little-endian header length, a
JSON header, the tensor bytes), so the safetensors library and any other
reader open them; the format tag lives in the header's ``__metadata__``.

``write_shard`` writes a shard atomically and durably: a temporary sibling
created exclusively (never through a symbolic link) with mode 0o666 less the
umask, fsynced, renamed over the target, the directory fsynced. Tensors are
laid out by element size, largest first, then by name (as the safetensors
library does), so every tensor is aligned to its element size.

``read_header`` checks a shard's header against its file: the size, the
header length, the JSON, every entry's dtype, shape and data offsets
(inside the file, matching the shape, not overlapping), and that the file
ends where the last tensor does. ``ShardReader`` adds read-only
memory-mapped tensor views, checked against the key, dtype and shape the
caller expects. Every failure is one ``ShardError`` naming the file, the
field or tensor, what was expected, what was found, and the fix the caller
gives (recapture, re-run with --resume, recreate the cache). BF16 tensors
are read as their uint16 bit patterns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np

from logitparity._fileio import write_bytes_atomic

__all__ = ["MAX_HEADER_BYTES", "RECAPTURE", "ShardError", "ShardHeader", "ShardReader", "TensorEntry",
           "read_header", "tensor_from", "write_shard"]

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
RECAPTURE = "re-run the capture with --resume (it recaptures the prompts of a damaged shard)"

# safetensors header dtype -> the numpy dtype it is read as (BF16 as its uint16 bits)
READ_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
               "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
               "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
# bytes per element of every safetensors dtype (those not read still have their offsets checked)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
            "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# numpy dtype name -> the safetensors dtype it is written as
WRITE_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8",
                "bool": "BOOL"}


class ShardError(ValueError):
    """A shard that is missing, truncated, corrupt, or not holding what its
    reader expects: ``field``, ``expected``, ``found`` and ``fix`` say how
    (the validator lists them)."""

    def __init__(self, path: Path, field: str, expected: str, found: str, fix: str):
        self.path, self.field, self.expected, self.found, self.fix = path, field, expected, found, fix
        super().__init__(f"{path}: {field}: expected {expected}, found {found}; {fix}")


class TensorEntry(NamedTuple):
    """One tensor of a header: the numpy dtype it is read as (None for a
    dtype this package does not read), its shape, its absolute byte range in
    the file, and its safetensors dtype."""

    dtype: Any
    shape: tuple[int, ...]
    start: int
    end: int
    st_dtype: str


@dataclasses.dataclass
class ShardHeader(Mapping[str, TensorEntry]):
    """A checked header: a mapping key -> TensorEntry, with the
    ``__metadata__`` strings beside it."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, Any]

    def __getitem__(self, key: str) -> TensorEntry:
        return self.tensors[key]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def _short_json(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


def read_header(path: str | os.PathLike, *, fix: str = RECAPTURE,
                what: str = "a shard named by records.jsonl") -> ShardHeader:
    """Parse and check a safetensors header (module docstring); ``what`` is
    what the missing file should have been, ``fix`` ends every message.
    Raises ShardError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except FileNotFoundError:
        raise ShardError(path, "file", what, "no file", fix) from None
    except IsADirectoryError:
        raise ShardError(path, "file", "a safetensors file", "a directory", fix) from None
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise ShardError(path, "header", "an 8-byte header length", f"a truncated shard ({size} bytes)", fix)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise ShardError(path, "header", f"a header length within the file ({size - 8} bytes at most)",
                             f"{n} bytes (corrupt or truncated shard)", fix)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, or an integer past 4300 digits
        raise ShardError(path, "header", "a JSON object", f"unparsable bytes (corrupt shard header: {e})", fix) from None
    if not isinstance(header, dict):
        raise ShardError(path, "header", "a JSON object", type(header).__name__, fix)
    base = 8 + n
    out: dict[str, TensorEntry] = {}
    spans = []
    metadata = header.get("__metadata__")
    metadata = metadata if isinstance(metadata, dict) else {}
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        try:
            st, dims, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
            if not (isinstance(st, str) and isinstance(dims, list) and isinstance(offsets, list) and len(offsets) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*dims, *offsets])):
                raise TypeError
            shape = tuple(dims)
            start, end = offsets
        except (KeyError, TypeError, ValueError):
            raise ShardError(path, f"header entry {key!r}", "dtype, shape and data_offsets", _short_json(spec),
                             fix) from None
        itemsize = ITEMSIZE.get(st)
        if start < 0 or end < start or (itemsize is not None and end - start != math.prod(shape) * itemsize):
            raise ShardError(path, f"header entry {key!r}", f"data_offsets spanning shape {list(shape)} of {st}",
                             f"{start}..{end}", fix)
        out[key] = TensorEntry(READ_DTYPES.get(st), shape, base + start, base + end, st)
        spans.append((start, end, key))
    spans.sort()
    end_max = 0
    for start, end, key in spans:
        if start < end_max:
            raise ShardError(path, f"header entry {key!r}", "byte ranges that do not overlap another tensor's",
                             f"{start}..{end}", fix)
        end_max = max(end_max, end)
    if base + end_max != size:
        raise ShardError(path, "size", f"{base + end_max} bytes (as its header says)",
                         f"{size} bytes (truncated or corrupt shard)", fix)
    return ShardHeader(path, out, metadata)


def tensor_from(buffer: np.ndarray, entry: TensorEntry) -> np.ndarray:
    """The tensor a header entry describes, as a view of ``buffer`` (a uint8
    memmap of the whole shard)."""
    return buffer[entry.start:entry.end].view(entry.dtype).reshape(entry.shape)


class ShardReader:
    """One shard opened for reading: its header checked (read_header), its
    tensors read-only memory-mapped views. ``fix`` ends every message."""

    def __init__(self, path: str | os.PathLike, *, fix: str = RECAPTURE, what: str = "a shard named by records.jsonl",
                 header: ShardHeader | None = None):
        self.path = Path(path)
        self.fix = fix
        self.header = header if header is not None else read_header(self.path, fix=fix, what=what)
        self._map: np.memmap | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        return self.header.metadata

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, key: object) -> bool:
        return key in self.header

    def entry(self, key: str, *, dtype: "str | tuple[str, ...] | None" = None,
              shape: "tuple[int | None, ...] | None" = None) -> TensorEntry:
        """The header entry of ``key``, checked: present, of safetensors dtype
        ``dtype`` (one name or a tuple of accepted names) and of ``shape``
        (None in a dimension: any size)."""
        e = self.header.tensors.get(key)
        if e is None:
            held = sorted(self.header)
            some = ", ".join(repr(k) for k in held[:4]) + (", ..." if len(held) > 4 else "")
            raise ShardError(self.path, f"tensor {key!r}", "a tensor of that name",
                             f"no such tensor in the shard (it holds {some or 'none'})", self.fix)
        if dtype is not None:
            accepted = (dtype,) if isinstance(dtype, str) else tuple(dtype)
            if e.st_dtype not in accepted:
                raise ShardError(self.path, f"tensor {key!r} dtype", " or ".join(accepted), e.st_dtype, self.fix)
        if shape is not None and (len(shape) != len(e.shape)
                                  or any(w is not None and w != g for w, g in zip(shape, e.shape))):
            want = "[" + ", ".join("any" if w is None else str(w) for w in shape) + "]"
            raise ShardError(self.path, f"tensor {key!r} shape", want, str(list(e.shape)), self.fix)
        if e.dtype is None:
            raise ShardError(self.path, f"tensor {key!r} dtype", "a dtype this logitparity reads", e.st_dtype, self.fix)
        return e

    def tensor(self, key: str, *, dtype: "str | tuple[str, ...] | None" = None,
               shape: "tuple[int | None, ...] | None" = None) -> np.ndarray:
        """Tensor ``key`` (checked as ``entry`` does) as a read-only view of
        the memory-mapped file; BF16 comes back as uint16 bits."""
        e = self.entry(key, dtype=dtype, shape=shape)
        if e.start == e.end:  # nothing to map (and an empty file part cannot be mapped)
            empty = np.zeros(e.shape, e.dtype)
            empty.setflags(write=False)
            return empty
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return tensor_from(self._map, e)


def write_shard(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], *, format: str, version: str,
                metadata: Mapping[str, str] | None = None, dtypes: Mapping[str, str] | None = None) -> int:
    """Write ``tensors`` (key -> array, written bitwise, little-endian) as one
    safetensors shard at ``path``, atomically and durably (module
    docstring). The header's ``__metadata__`` holds ``format``, ``version``
    and ``metadata`` (strings). ``dtypes``: a safetensors dtype for a key
    other than its array's (``"BF16"`` for uint16 bfloat16 bits). Returns the
    file's size in bytes."""
    arrays = {}
    for key, a in tensors.items():
        a = np.asarray(a)
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        st = (dtypes or {}).get(key) or WRITE_DTYPES.get(a.dtype.name)
        if st is None or ITEMSIZE.get(st) != a.dtype.itemsize:
            raise ValueError(f"tensor {key!r}: dtype {a.dtype} cannot be written as safetensors dtype "
                             f"{st or '(none)'}; pass one of {sorted(WRITE_DTYPES)}")
        arrays[key] = (st, a)
    meta = {**(metadata or {}), "format": format, "version": version}
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"shard metadata values must be strings (safetensors), got {bad[0]!r}: {meta[bad[0]]!r}")
    header: dict[str, Any] = {"__metadata__": meta}
    order = sorted(arrays, key=lambda k: (-arrays[k][1].dtype.itemsize, k))
    offset = 0
    for key in order:
        st, a = arrays[key]
        header[key] = {"dtype": st, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned
    chunks = [struct.pack("<Q", len(raw)), raw, *(arrays[k][1] for k in order if arrays[k][1].nbytes)]
    write_bytes_atomic(path, chunks, sync=True, sync_dir=True)
    return 8 + len(raw) + offset
