"""The dump: an engine-neutral directory holding one captured run.

Layout (the full spec, with a worked example, is docs/dump-format.md)::

    manifest.json               format tag, version, engine, model, tokenizer,
                                decoding settings, logits storage, run timing
    records.jsonl               one JSON object per prompt, in capture order
    shard-NNNNN.safetensors     the tensors, written with the safetensors library

Row j of a record's logits is the raw logit vector (before any sampling
transform) from which generated token j was chosen, or, in score mode, the
logits predicting token j of the scored continuation given prompt +
tokens[:j]. So a record always has ``n_positions == len(generated_token_ids)``.

Storage modes: ``full`` keeps every row in fp32, fp16 or bf16; ``topk:K``
keeps the K largest logits (float32, descending, ties to the lower index),
their int32 token ids, the exact log-sum-exp of the whole row (computed in
float64, exp included) and the tail mass 1 - sum(softmax over the K kept
entries) (float64).

The writer streams: tensors wait in memory until ``shard_bytes`` is reached,
then the shard is written to a temporary name and renamed, and only then are
its records appended to records.jsonl. A killed run therefore leaves a valid
dump of the prompts whose shards were completed; ``resume=True`` continues it.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from logitparity._fileio import write_text_atomic

__all__ = ["FORMAT", "VERSION", "Dump", "DumpWriter", "load_dump"]

FORMAT = "logitparity-dump"
VERSION = "1.1"  # 1.1: the optional activations part (logitparity.activations)
MANIFEST = "manifest.json"
RECORDS = "records.jsonl"
SHARD_RE = re.compile(r"^shard-(\d{5})\.safetensors$")
DEFAULT_SHARD_BYTES = 256 << 20
DEFAULT_FLUSH_SECONDS = 60.0  # a killed run loses at most about this much work

LOGITS_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}
# safetensors header dtype -> numpy dtype (BF16 is read as its uint16 bits)
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16,
              "I32": np.int32, "F64": np.float64, "I64": np.int64}
_ST_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Fields every record must carry (the writer adds shard, tensors, n_positions).
RECORD_FIELDS = ("id", "category", "prompt", "chat_template", "prompt_token_ids",
                 "generated_token_ids", "stop_reason")
STOP_REASONS = ("eos", "max_new_tokens", "stop_token")
# Manifest sections that must match when a run is resumed.
_RESUME_KEYS = ("engine", "model", "tokenizer", "dtype", "device", "decoding", "logits")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def parse_storage(logits: str) -> int | None:
    """'full' -> None, 'topk:K' -> K (K >= 1); anything else is a ValueError."""
    if logits == "full":
        return None
    m = re.fullmatch(r"topk:(\d+)", str(logits))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"logits storage must be 'full' or 'topk:K' with K >= 1 (e.g. 'topk:64'), got {logits!r}")
    return int(m.group(1))


def _check_version(version: Any, where: Path) -> None:
    m = re.fullmatch(r"(\d+)\.(\d+)", str(version))
    if not m:
        raise ValueError(f"{where}: 'version' must look like '1.0', got {version!r}")
    if int(m.group(1)) > int(VERSION.split(".")[0]):
        raise ValueError(
            f"{where}: dump format version {version} is newer than this logitparity reads "
            f"({VERSION}); upgrade logitparity (pip install -U logitparity)"
        )
    if int(m.group(1)) < 1:
        raise ValueError(f"{where}: dump format version {version} predates 1.0 and is not supported")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exact."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _to_numpy(logits: Any, dtype: str) -> np.ndarray:
    """Raw logits [n, vocab] (torch or numpy) -> contiguous array in the storage dtype."""
    if type(logits).__module__.startswith("torch"):
        import torch  # only when a tensor was passed

        t = logits.detach().to("cpu")
        if not t.is_floating_point():
            raise TypeError(f"logits must be a floating-point tensor, got {t.dtype}")
        target = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        out = t.to(target).contiguous()
        if dtype == "bf16":
            return out.view(torch.int16).numpy().view(np.uint16)
        arr = out.numpy()
        src = t.float().numpy() if dtype == "fp16" else None
    else:
        a = np.asarray(logits)
        if a.dtype.name == "bfloat16":  # ml_dtypes
            a = bf16_to_float32(a.view(np.uint16))
        if a.dtype.kind != "f":
            raise TypeError(
                f"logits must be float32/float16/float64 (or a torch tensor), got {a.dtype}; "
                "bf16 bit patterns must be converted with logitparity.dump.bf16_to_float32 first"
            )
        if dtype == "bf16":
            return float32_to_bf16_bits(a.astype(np.float32, copy=False))
        with np.errstate(over="ignore"):  # fp16 overflow is reported below
            arr = np.ascontiguousarray(a, dtype=LOGITS_DTYPES[dtype])
        src = a if dtype == "fp16" else None
    if src is not None:
        over = np.isinf(arr) & np.isfinite(src)
        if over.any():
            raise ValueError(
                f"logits exceed the fp16 range (|x| > 65504, e.g. {float(src[over][0]):.6g}); "
                "store them with logits_dtype='fp32' or 'bf16'"
            )
    return arr


def _exact_lse(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp [n] in float64 throughout (exp included), so
    that the tail mass 1 - sum(exp(v - lse)) keeps its small values: -inf for
    an all -inf row, NaN for a row holding NaN or +inf."""
    out = np.empty(x.shape[0], np.float64)
    for start in range(0, x.shape[0], 64):  # bounded float64 temporaries
        c = x[start:start + 64].astype(np.float64)
        m = c.max(axis=1)
        bad = ~np.isfinite(m)
        m_safe = np.where(bad, 0.0, m)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            s = np.exp(c - m_safe[:, None]).sum(axis=1)
            lse = m_safe + np.log(s)
        out[start:start + 64] = np.where(bad, np.where(m == -np.inf, -np.inf, np.nan), lse)
    return out


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header: {key: (numpy dtype, shape, start, end)}
    with absolute byte offsets into the file."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: shard file is missing; the dump is incomplete (re-run the capture with --resume)") from None
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated shard ({size} bytes, no safetensors header); re-run the capture with --resume")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise ValueError(f"{path}: corrupt or truncated shard (header length {n} bytes, file {size} bytes); re-run the capture")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt shard header ({e}); re-run the capture") from None
    base = 8 + n
    out: dict[str, Any] = {}
    end_max = 0
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[spec["dtype"]]
            shape = tuple(int(s) for s in spec["shape"])
            start, end = (int(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt shard header entry {key!r}: {spec!r}") from None
        if end - start != math.prod(shape) * np.dtype(dtype).itemsize or start < 0:
            raise ValueError(f"{path}: corrupt shard header: tensor {key!r} offsets {start}..{end} do not match shape {shape}")
        out[key] = (dtype, shape, base + start, base + end)
        end_max = max(end_max, end)
    if base + end_max != size:
        raise ValueError(
            f"{path}: truncated or corrupt shard (header says {base + end_max} bytes, file has {size}); "
            "re-run the capture with --resume"
        )
    return out


class Dump:
    """A dump opened for reading. Tensors are memory-mapped on access.

    ``manifest``: dict; ``records``: list of record dicts in capture order;
    ``storage``: 'full' or 'topk:K'; ``logits_dtype``: 'fp32' | 'fp16' | 'bf16';
    ``vocab_size``: width of the logit rows (None for an empty dump).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such dump directory (expected {MANIFEST}, {RECORDS} and shards)")
        self.manifest = read_manifest(self.path)
        logits = self.manifest.get("logits")
        if not isinstance(logits, dict) or "storage" not in logits or "dtype" not in logits:
            raise ValueError(f"{self.path / MANIFEST}: missing the 'logits' section (storage, dtype, vocab_size)")
        self.storage: str = logits["storage"]
        self.k = parse_storage(self.storage)
        self.logits_dtype: str = logits["dtype"]
        if self.logits_dtype not in LOGITS_DTYPES:
            raise ValueError(f"{self.path / MANIFEST}: logits dtype must be one of {sorted(LOGITS_DTYPES)}, got {self.logits_dtype!r}")
        self.vocab_size: int | None = logits.get("vocab_size")
        self.records = read_records(self.path / RECORDS)
        self._by_id = {r["id"]: r for r in self.records}
        self._headers: dict[str, dict[str, Any]] = {}
        self._maps: dict[str, np.memmap] = {}
        self._check_tensors()

    def _check_tensors(self) -> None:
        names = ("logits",) if self.k is None else ("topk_values", "topk_indices", "lse", "tail_mass")
        for r in self.records:
            shard = r["shard"]
            if shard not in self._headers:
                if not SHARD_RE.match(str(shard)):
                    raise ValueError(f"{self.path / RECORDS}: record {r['id']!r} names shard {shard!r}, expected shard-NNNNN.safetensors")
                self._headers[shard] = _read_header(self.path / shard)
            header = self._headers[shard]
            for name in names:
                key = r["tensors"].get(name) if isinstance(r["tensors"], dict) else None
                if key not in header:
                    raise ValueError(
                        f"{self.path / shard}: record {r['id']!r} points at tensor {key!r} ({name}) "
                        f"which the shard does not hold; the dump is corrupt (re-run the capture)"
                    )
                shape = header[key][1]
                if shape[:1] != (r["n_positions"],):
                    raise ValueError(f"{self.path / shard}: tensor {key!r} has shape {shape}, record {r['id']!r} says {r['n_positions']} positions")

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"Dump({str(self.path)!r}, records={len(self)}, storage={self.storage!r}, logits_dtype={self.logits_dtype!r})"

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]

    def record(self, prompt_id: str) -> dict[str, Any]:
        try:
            return self._by_id[prompt_id]
        except KeyError:
            some = ", ".join(repr(i) for i in self.ids[:3])
            raise KeyError(f"no prompt {prompt_id!r} in dump {self.path} (ids look like {some})") from None

    def _tensor(self, shard: str, key: str) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.path / shard, dtype=np.uint8, mode="r")
        dtype, shape, start, end = self._headers[shard][key]
        return self._maps[shard][start:end].view(dtype).reshape(shape)

    def logits(self, prompt_id: str, *, as_float32: bool = False) -> np.ndarray:
        """[n_positions, vocab] raw logits, memory-mapped read-only: float32,
        float16, or uint16 bfloat16 bit patterns (bf16 dumps; pass
        ``ref_bf16=True`` to compare_logits). ``as_float32`` converts (a copy)."""
        if self.k is not None:
            raise ValueError(f"{self.path} stores {self.storage} logits, not full rows; use .topk({prompt_id!r})")
        r = self.record(prompt_id)
        x = self._tensor(r["shard"], r["tensors"]["logits"])
        if as_float32:
            return bf16_to_float32(x) if self.logits_dtype == "bf16" else np.asarray(x, dtype=np.float32)
        return x

    def topk(self, prompt_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(values float32 [n, K], indices int32 [n, K], lse float64 [n],
        tail_mass float64 [n]) for a topk:K dump."""
        if self.k is None:
            raise ValueError(f"{self.path} stores full logits; use .logits({prompt_id!r}) (and logitparity.topk for the top-K)")
        r = self.record(prompt_id)
        t = r["tensors"]
        return tuple(self._tensor(r["shard"], t[n]) for n in ("topk_values", "topk_indices", "lse", "tail_mass"))  # type: ignore[return-value]


def read_manifest(path: Path) -> dict[str, Any]:
    """manifest.json of dump directory ``path``, with its tag and version checked."""
    mpath = Path(path) / MANIFEST
    try:
        text = mpath.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{mpath}: missing; is {path} a logitparity dump directory?") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        tag = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{mpath}: unknown format tag {tag!r}, expected {FORMAT!r}; this is not a logitparity dump")
    _check_version(manifest.get("version"), mpath)
    return manifest


def read_records(path: Path) -> list[dict[str, Any]]:
    """records.jsonl -> list of dicts; malformed lines are errors naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; the dump is incomplete (re-run the capture with --resume)") from None
    records = []
    seen = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed record ({e}); an interrupted write? re-run the capture with --resume") from None
        missing = [f for f in (*RECORD_FIELDS, "shard", "tensors", "n_positions") if not isinstance(r, dict) or f not in r]
        if missing:
            raise ValueError(f"{path}:{lineno}: record lacks {', '.join(missing)}")
        if r["id"] in seen:
            raise ValueError(f"{path}:{lineno}: duplicate prompt id {r['id']!r}")
        seen.add(r["id"])
        records.append(r)
    return records


def load_dump(path: str | os.PathLike) -> Dump:
    """Open a dump directory for reading (checks tag, version, records and
    every shard header; tensors are memory-mapped lazily)."""
    return Dump(path)


class DumpWriter:
    """Streams records and their logits into a dump directory.

    ``manifest``: engine, model, tokenizer, dtype, device, decoding, libraries,
    run (see docs/dump-format.md); the writer adds format, version, created,
    logits and complete. ``logits``: 'full' or 'topk:K'. ``logits_dtype``:
    storage dtype of full rows. ``shard_bytes``: roll over to a new shard once
    this many tensor bytes wait in memory (the bound on the writer's memory).
    ``flush_seconds``: also roll over once the oldest waiting prompt is this
    old (None: size only), bounding the work a killed run loses.
    ``resume``: continue an existing dump made with the same settings.
    Use as a context manager; on an exception the finished prompts are still
    written, and the manifest keeps ``complete: false``.
    """

    def __init__(self, out_dir: str | os.PathLike, manifest: dict[str, Any], *, logits: str = "full",
                 logits_dtype: str = "fp32", shard_bytes: int = DEFAULT_SHARD_BYTES,
                 flush_seconds: float | None = DEFAULT_FLUSH_SECONDS, resume: bool = False):
        self.path = Path(out_dir)
        self.k = parse_storage(logits)
        if logits_dtype not in LOGITS_DTYPES:
            raise ValueError(f"logits_dtype must be one of {sorted(LOGITS_DTYPES)}, got {logits_dtype!r}")
        if self.k is not None and logits_dtype != "fp32":
            raise ValueError(f"logits_dtype {logits_dtype!r} applies to full storage only; topk:K values are always float32")
        if not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ValueError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
        self.shard_bytes = shard_bytes
        self.flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        reserved = {"format", "version", "created", "complete", "logits"} & set(manifest)
        if reserved:
            raise ValueError(f"manifest keys {sorted(reserved)} are set by the writer; leave them out")
        self.manifest = {"format": FORMAT, "version": VERSION, "created": _now(), "complete": False, **manifest,
                         "logits": {"storage": "full" if self.k is None else f"topk:{self.k}",
                                    "dtype": logits_dtype, "vocab_size": None,
                                    "lse_dtype": None if self.k is None else "float64"}}
        self._pending: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = []
        self._pending_bytes = 0
        self._closed = False
        self.records: list[dict[str, Any]] = []
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / MANIFEST).exists():
            if not resume:
                raise ValueError(f"{self.path} already holds a dump; pass resume=True (--resume) to continue it, or choose another directory")
            self._open_existing()
        elif any(self.path.iterdir()):
            raise ValueError(f"{self.path} is not empty and holds no dump; choose an empty or new directory")
        else:
            (self.path / RECORDS).write_text("", encoding="utf-8")
            self._shard_index = 0
            self._write_manifest()

    def _open_existing(self) -> None:
        old = read_manifest(self.path)
        for key in _RESUME_KEYS:
            a, b = old.get(key), self.manifest.get(key)
            if key == "logits":
                a = {k: v for k, v in (a or {}).items() if k != "vocab_size"}
                b = {k: v for k, v in b.items() if k != "vocab_size"}
            if a != b:
                raise ValueError(
                    f"cannot resume {self.path}: its manifest's {key!r} differs from this run's "
                    f"({json.dumps(a, sort_keys=True)[:200]} vs {json.dumps(b, sort_keys=True)[:200]}); "
                    "use the same settings or a new directory"
                )
        self.manifest["created"] = old.get("created", self.manifest["created"])
        self.manifest["logits"]["vocab_size"] = old["logits"].get("vocab_size")
        rpath = self.path / RECORDS
        if rpath.exists():  # drop a partly written last line, then keep what parses
            text = rpath.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):
                text = text[: text.rfind("\n") + 1]
                write_text_atomic(rpath, text)
        else:
            rpath.write_text("", encoding="utf-8")
        self.records = read_records(rpath)
        used = {r["shard"] for r in self.records}
        for p in self.path.iterdir():  # temporaries and shards no record points at
            if p.name.endswith(".tmp") or (SHARD_RE.match(p.name) and p.name not in used):
                p.unlink()
        for shard in used:
            _read_header(self.path / shard)
        self._shard_index = 1 + max((int(SHARD_RE.match(s).group(1)) for s in used), default=-1)

    @property
    def done_ids(self) -> set[str]:
        """Ids of the prompts already in the dump or waiting for the next shard."""
        return {r["id"] for r in self.records} | {r["id"] for r, _ in self._pending}

    def add(self, record: dict[str, Any], logits: Any) -> None:
        """Add one prompt: ``record`` with id, category, prompt, chat_template,
        prompt_token_ids, generated_token_ids, stop_reason (and optionally
        timing); ``logits`` the raw logits [len(generated_token_ids), vocab]
        (torch tensor or numpy array)."""
        if self._closed:
            raise ValueError("DumpWriter is closed")
        missing = [f for f in RECORD_FIELDS if f not in record]
        if missing:
            raise ValueError(f"record lacks {', '.join(missing)} (id {record.get('id')!r})")
        pid = record["id"]
        if not isinstance(pid, str) or not pid:
            raise ValueError(f"record id must be a non-empty string, got {pid!r}")
        if pid in self.done_ids:
            raise ValueError(f"prompt id {pid!r} is already in {self.path}; ids must be unique")
        if record["stop_reason"] not in STOP_REASONS:
            raise ValueError(f"stop_reason must be one of {STOP_REASONS}, got {record['stop_reason']!r} (id {pid!r})")
        shape = tuple(logits.shape)
        n = len(record["generated_token_ids"])
        if len(shape) != 2 or shape[0] != n:
            raise ValueError(
                f"logits for {pid!r} must be [n_positions, vocab] with n_positions = "
                f"len(generated_token_ids) = {n}, got shape {shape}"
            )
        vocab = self.manifest["logits"]["vocab_size"]
        if vocab is None:
            self.manifest["logits"]["vocab_size"] = vocab = int(shape[1])
        elif shape[1] != vocab:
            raise ValueError(f"logits for {pid!r} have vocab {shape[1]}, the dump's rows have {vocab}")
        if self.k is not None and self.k > vocab:
            raise ValueError(f"topk:{self.k} exceeds the vocab size {vocab}")
        tensors = self._storage_tensors(logits)
        rec = {k: v for k, v in record.items() if k not in ("shard", "tensors", "n_positions")}
        rec["n_positions"] = n
        self._pending.append((rec, tensors))
        self._pending_bytes += sum(t.nbytes for t in tensors.values())
        if self._pending_bytes >= self.shard_bytes or (
                self.flush_seconds is not None and time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def _storage_tensors(self, logits: Any) -> dict[str, np.ndarray]:
        if self.k is None:
            return {"logits": _to_numpy(logits, self.manifest["logits"]["dtype"])}
        from logitparity.metrics import topk

        x = _to_numpy(logits, "fp32")
        n = x.shape[0]
        if n == 0:
            return {"topk_values": np.zeros((0, self.k), np.float32), "topk_indices": np.zeros((0, self.k), np.int32),
                    "lse": np.zeros(0, np.float64), "tail_mass": np.zeros(0, np.float64)}
        values, indices = topk(x, self.k)
        lse = _exact_lse(x)
        with np.errstate(invalid="ignore"):
            kept = np.exp(values.astype(np.float64) - lse[:, None]).sum(axis=1)
        tail = np.maximum(1.0 - kept, 0.0)  # NaN stays NaN
        return {"topk_values": np.ascontiguousarray(values, np.float32),
                "topk_indices": np.ascontiguousarray(indices, np.int32), "lse": lse, "tail_mass": tail}

    def flush(self) -> None:
        """Write the waiting prompts as one shard (temp name, rename), then
        append their records. A no-op when nothing waits."""
        if not self._pending:
            return
        from safetensors import TensorSpec, serialize_file

        name = shard_name(self._shard_index)
        specs = {}
        lines = []
        for rec, tensors in self._pending:
            seq = len(self.records) + len(lines)
            rec["shard"] = name
            rec["tensors"] = {}
            for tname, arr in tensors.items():
                key = f"{seq:06d}/{tname}"
                rec["tensors"][tname] = key
                st_dtype = _ST_NAMES[self.manifest["logits"]["dtype"]] if tname == "logits" else arr.dtype.name
                specs[key] = TensorSpec(dtype=st_dtype, shape=arr.shape, data_ptr=arr.ctypes.data, data_len=arr.nbytes)
            lines.append(json.dumps(rec, ensure_ascii=False))
        tmp = self.path / f"{name}.tmp"
        serialize_file(specs, str(tmp), metadata={"format": FORMAT, "version": VERSION})
        os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors creates 0600 files
        os.replace(tmp, self.path / name)
        with open(self.path / RECORDS, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        self.records.extend(rec for rec, _ in self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        self._last_flush = time.monotonic()
        self._shard_index += 1
        self._write_manifest()

    def _write_manifest(self) -> None:
        write_text_atomic(self.path / MANIFEST, json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n")

    def close(self, *, complete: bool = True) -> None:
        """Flush what waits and write the final manifest (``complete`` records
        whether the run finished)."""
        if self._closed:
            return
        self.flush()
        self.manifest["complete"] = bool(complete)
        self._write_manifest()
        self._closed = True

    def __enter__(self) -> "DumpWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)
