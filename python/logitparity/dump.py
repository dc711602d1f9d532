"""The dump: an engine-neutral directory holding one captured run.

Layout (the full spec, with a worked example, is docs/dump-format.md)::

    manifest.json               format tag, version, engine, model, tokenizer,
                                decoding settings, logits storage, run timing
    records.jsonl               one JSON object per prompt, in capture order
    shard-NNNNN.safetensors     the tensors (plain safetensors; logitparity._shards)

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
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from logitparity._fileio import append_text, read_tagged_json, write_text_atomic
from logitparity._renamed import renamed_keyword
from logitparity._shards import tensor_from, write_shard

__all__ = ["FORMAT", "VERSION", "Dump", "DumpWriter", "load_dump"]

FORMAT = "logitparity-dump"
VERSION = "1.1"  # 1.1: the optional activations part (logitparity.activations)
MANIFEST = "manifest.json"
RECORDS = "records.jsonl"
SHARD_RE = re.compile(r"^shard-(\d{5})\.safetensors$")
DEFAULT_SHARD_BYTES = 256 << 20
PARTS_DIR = "ranks"  # a data-parallel capture's per-rank dumps (logitparity.distributed), inside the merged one
DEFAULT_FLUSH_SECONDS = 60.0  # a killed run loses at most about this much work
# Rows of different widths (a padded vocabulary) are compared over the common
# first columns only when the wider rows' mass beyond them is at most this in
# every row: the renormalised rows then differ from the stored ones by at most
# this in total variation and every log-probability by at most
# -log(1 - 1e-6) = 1.0000005e-6 nats, below float32's rounding of a
# log-probability of magnitude 10 (1.2e-6).
PAD_MASS_BOUND = 1e-6

LOGITS_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}
# the safetensors dtype of full rows in each storage dtype (bf16: uint16 bits written as BF16)
_ST_NAMES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}

# Fields every record must carry (the writer adds shard, tensors, n_positions).
RECORD_FIELDS = ("id", "category", "prompt", "chat_template", "prompt_token_ids",
                 "generated_token_ids", "stop_reason")
STOP_REASONS = ("eos", "max_new_tokens", "stop_token")
# tokenizer.special_tokens lists exactly these names, each the tokenizer defines
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
# tokenizer fields that say two runs tokenize identically (the stop rule is
# decoding.eos_token_ids / stop_token_ids, compared on its own)
TOKENIZER_IDENTITY = ("vocab_size", "tokens_hash", "special_tokens")
# Manifest sections that must match when a run is resumed.
RESUME_KEYS = ("engine", "model", "tokenizer", "dtype", "device", "decoding", "logits")


class TokenizerMismatch(ValueError):
    """Two tokenizer identities differ (a ValueError: exit 2 in the CLI)."""


def check_tokenizer(ours: dict[str, Any], theirs: dict[str, Any], *, ours_name: str, theirs_name: str) -> None:
    """Raise TokenizerMismatch naming every tokenizer key (vocab_size,
    tokens_hash, special_tokens) whose values differ, with both values in
    full: an engine against a reference dump (capture, score mode) and a
    reference model against a candidate (perplexity)."""
    diffs = []
    for key in TOKENIZER_IDENTITY:
        a, b = ours.get(key), theirs.get(key)
        if a != b:
            diffs.append(f"tokenizer.{key}: {ours_name} {json.dumps(a, sort_keys=True, ensure_ascii=False)}, "
                         f"{theirs_name} {json.dumps(b, sort_keys=True, ensure_ascii=False)}")
    if diffs:
        raise TokenizerMismatch(
            f"{ours_name} and {theirs_name} use different tokenizers ({'; '.join(diffs)}); token ids would not "
            "mean the same text on both sides: use the same model file (or its exact conversion) for both"
        )


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def parse_storage(storage: str) -> int | None:
    """The storage mode of logit rows, one spelling everywhere (``storage=``
    of DumpWriter, capture, perplexity and BaselineCacheWriter, the CLI's
    ``--storage``, the manifests' ``storage`` entries): 'full' -> None,
    'topk:K' -> K (K >= 1); anything else is a ValueError."""
    if storage == "full":
        return None
    m = re.fullmatch(r"topk:(\d+)", str(storage))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"logits storage must be 'full' or 'topk:K' with K >= 1 (e.g. 'topk:64'), got {storage!r}")
    return int(m.group(1))


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


def logits_as_array(logits: Any, dtype: str) -> np.ndarray:
    """Raw logits [n, vocab] (torch or numpy) -> contiguous array in the storage dtype."""
    if type(logits).__module__.startswith("torch"):
        import torch  # only when a tensor was passed

        t = logits.detach()
        if not t.is_floating_point():
            raise TypeError(f"logits must be a floating-point tensor, got {t.dtype}")
        target = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        # Rounded where the rows are (a GPU's rows cross to the host already in
        # the storage dtype); torch rounds to nearest even on both devices.
        out = t.to(target).contiguous()
        if dtype == "fp16":
            over = torch.isinf(out) & torch.isfinite(t)
            if bool(over.any()):
                raise ValueError(
                    f"logits exceed the fp16 range (|x| > 65504, e.g. {float(t[over][0]):.6g}); "
                    "store them with logits_dtype='fp32' or 'bf16'"
                )
        out = out.to("cpu")
        if dtype == "bf16":
            return out.view(torch.int16).numpy().view(np.uint16)
        return out.numpy()
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


def text_sha256(text: str) -> str:
    """'sha256:<hex>' of a text's UTF-8 bytes (docs/dump-format.md, "Hashes"):
    the manifest's tokenizer.chat_template_hash and model.config_hash (HF and
    llama.cpp capture) and a perplexity text's hash (baseline caches)."""
    return f"sha256:{hashlib.sha256(text.encode('utf-8')).hexdigest()}"


def tokens_hash(tokens: "list[str | None]") -> str:
    """tokenizer.tokens_hash: 'sha256:<hex>' of the UTF-8 bytes of the token
    strings in id order serialised as docs/dump-format.md ("Hashes") defines:
    a JSON array, elements separated by ", ", JSON escapes only for '"', '\\'
    and control characters, everything else as raw UTF-8, null for an id
    without a token. Unlike text_sha256, a lone surrogate in a token string
    is hashed as its surrogatepass bytes rather than refused."""
    text = json.dumps(list(tokens), ensure_ascii=False)
    return f"sha256:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}"


class Dump:
    """A dump opened for reading. Tensors are memory-mapped on access.

    ``manifest``: dict; ``records``: list of record dicts in capture order;
    ``storage``: 'full' or 'topk:K'; ``logits_dtype``: 'fp32' | 'fp16' | 'bf16';
    ``vocab_size``: width of the logit rows (None for an empty dump);
    ``lse_known``: False for a topk:K dump whose engine did not know each
    row's log-sum-exp (manifest ``logits.lse = "unknown"``).
    Opening checks everything logitparity.validate calls an error (types,
    dtypes, widths, top-K invariants, record invariants, shard integrity) and
    raises DumpError (a ValueError) listing them.
    """

    _arrays: dict[str, np.ndarray] | None = None  # rows of an in-memory dump (from_arrays)

    def __init__(self, path: str | os.PathLike):
        from logitparity.validate import DumpError, inspect_dump

        self.path = Path(path)
        ins = inspect_dump(self.path)
        if ins.errors:
            raise DumpError(ins.errors, self.path)
        self.manifest = ins.manifest
        logits = self.manifest["logits"]
        self.storage: str = logits["storage"]
        self.k = parse_storage(self.storage)
        self.logits_dtype: str = logits["dtype"]
        self.vocab_size: int | None = logits.get("vocab_size")
        # top-K engines that do not know a row's log-sum-exp say logits.lse = "unknown"
        # and write only topk_values and topk_indices (compare then bounds KL)
        self.lse_known: bool = not (self.k is not None and logits.get("lse") == "unknown")
        self.records = ins.records
        self._by_id = {r["id"]: r for r in self.records}
        self._headers: dict[str, dict[str, Any]] = ins.headers
        self._maps: dict[str, np.memmap] = {}

    @classmethod
    def from_arrays(cls, rows: Sequence[np.ndarray], ids: Sequence[str], tokens: Sequence[Sequence[int]], *,
                    bf16: bool = False, mode: str = "greedy", label: str = "<arrays>") -> "Dump":
        """Logits held in memory as a full-storage dump that is never written
        to disk (``compare_dumps`` reads it like any other). One record per
        sequence: ``rows[i]`` its [positions, vocab] logits (float32, float16,
        or uint16 bfloat16 bits with ``bf16=True``), ``tokens[i]`` the token
        ids recorded as generated (one per position); ``mode`` greedy (a
        reference) or score (a candidate scored on the reference's tokens)."""
        if not (len(rows) == len(ids) == len(tokens)) or not rows:
            raise ValueError(f"from_arrays needs one id and one token list per row array and at least one row "
                             f"array, got {len(rows)} arrays, {len(ids)} ids, {len(tokens)} token lists")
        self = cls.__new__(cls)
        self.path = Path(label)
        self.storage, self.k, self.lse_known = "full", None, True
        self.vocab_size = int(rows[0].shape[1])
        self.logits_dtype = "bf16" if bf16 else ("fp16" if rows[0].dtype == np.float16 else "fp32")
        self.manifest = {
            "engine": {"name": "arrays"},
            "decoding": {"mode": mode},
            "logits": {"storage": "full", "dtype": self.logits_dtype, "vocab_size": self.vocab_size},
        }
        self.records = [
            {"id": i, "category": "", "prompt": "", "chat_template": False, "prompt_token_ids": [],
             "generated_token_ids": [int(t) for t in tok], "stop_reason": "max_new_tokens",
             "n_positions": len(tok)}
            for i, tok in zip(ids, tokens)
        ]
        self._by_id = {r["id"]: r for r in self.records}
        self._headers, self._maps = {}, {}
        self._arrays = dict(zip(ids, rows))
        return self

    @property
    def complete(self) -> bool:
        """Whether the manifest says the run finished."""
        return self.manifest.get("complete") is True

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
        return tensor_from(self._maps[shard], self._headers[shard][key])

    def logits(self, prompt_id: str, *, as_float32: bool = False) -> np.ndarray:
        """[n_positions, vocab] raw logits, memory-mapped read-only: float32,
        float16, or uint16 bfloat16 bit patterns (bf16 dumps; pass
        ``ref_bf16=True`` to compare_logits). ``as_float32`` converts (a copy)."""
        if self.k is not None:
            raise ValueError(f"{self.path} stores {self.storage} logits, not full rows; use .topk({prompt_id!r})")
        r = self.record(prompt_id)
        x = self._arrays[r["id"]] if self._arrays is not None else self._tensor(r["shard"], r["tensors"]["logits"])
        if as_float32:
            return bf16_to_float32(x) if self.logits_dtype == "bf16" else np.asarray(x, dtype=np.float32)
        return x

    def mass_beyond(self, prompt_id: str, v: int) -> np.ndarray:
        """Per row, the probability of token ids >= v (float64 [n]): exact for
        full rows; for top-K rows an upper bound (the stored entries >= v plus
        the whole tail, whose tokens are unknown). Used to accept a padded
        vocabulary only when its pad columns are provably negligible
        (PAD_MASS_BOUND)."""
        if not 0 < v <= int(self.vocab_size or 0):
            raise ValueError(f"v must be in [1, {self.vocab_size}] (the row width), got {v}")
        if self.k is None:
            from logitparity.metrics import logsumexp

            x = self.logits(prompt_id)
            if x.shape[0] == 0 or v == x.shape[1]:
                return np.zeros(x.shape[0], np.float64)
            lse = np.asarray(logsumexp(x, bf16=self.logits_dtype == "bf16"), np.float64)
            pad = bf16_to_float32(x[:, v:]) if self.logits_dtype == "bf16" else x[:, v:]
            with np.errstate(invalid="ignore", over="ignore"):
                return np.exp(pad.astype(np.float64) - lse[:, None]).sum(axis=1)
        values, idx, lse, tail = self.topk(prompt_id)
        with np.errstate(invalid="ignore", over="ignore"):
            stored = np.where(idx >= v, np.exp(values.astype(np.float64) - lse[:, None]), 0.0).sum(axis=1)
            return stored + tail

    def topk(self, prompt_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(values float32 [n, K], indices int32 [n, K], lse float64 [n],
        tail_mass float64 [n]) for a topk:K dump."""
        if self.k is None:
            raise ValueError(f"{self.path} stores full logits; use .logits({prompt_id!r}) (and logitparity.topk for the top-K)")
        r = self.record(prompt_id)
        t = r["tensors"]
        if not self.lse_known:  # NaN: unknown (with finite values; docs/dump-format.md)
            unknown = np.full(r["n_positions"], np.nan)
            return (self._tensor(r["shard"], t["topk_values"]), self._tensor(r["shard"], t["topk_indices"]),
                    unknown, unknown.copy())
        return tuple(self._tensor(r["shard"], t[n]) for n in ("topk_values", "topk_indices", "lse", "tail_mass"))  # type: ignore[return-value]


def read_manifest(path: Path) -> dict[str, Any]:
    """manifest.json of dump directory ``path``, with its tag and version checked."""
    return read_tagged_json(Path(path) / MANIFEST, fmt=FORMAT, what="dump manifest", reads=VERSION,
                            fix=f"is {path} a dump directory written by `logitparity dump`? capture it again")


def read_records(path: Path) -> list[dict[str, Any]]:
    """records.jsonl of a dump directory's file ``path`` -> list of dicts,
    every record checked (logitparity.validate); raises DumpError."""
    return Dump(Path(path).parent).records


def load_dump(path: str | os.PathLike) -> Dump:
    """Open a dump directory for reading (checks tag, version, records and
    every shard header; tensors are memory-mapped lazily)."""
    return Dump(path)


class DumpWriter:
    """Streams records and their logits into a dump directory.

    ``manifest``: engine, model, tokenizer, dtype, device, decoding, libraries,
    run (see docs/dump-format.md); the writer adds format, version, created,
    logits and complete. ``storage``: 'full' or 'topk:K' (``parse_storage``;
    ``logits=`` is its old name, deprecated). ``logits_dtype``:
    storage dtype of full rows. ``shard_bytes``: roll over to a new shard once
    this many tensor bytes wait in memory (the bound on the writer's memory).
    ``flush_seconds``: also roll over once the oldest waiting prompt is this
    old (None: size only), bounding the work a killed run loses.
    ``resume``: continue an existing dump made with the same settings.
    Use as a context manager; on an exception the finished prompts are still
    written, and the manifest keeps ``complete: false``.
    """

    @renamed_keyword("logits", "storage", where="DumpWriter")
    def __init__(self, out_dir: str | os.PathLike, manifest: dict[str, Any], *, storage: str = "full",
                 logits_dtype: str = "fp32", shard_bytes: int = DEFAULT_SHARD_BYTES,
                 flush_seconds: float | None = DEFAULT_FLUSH_SECONDS, resume: bool = False):
        self.path = Path(out_dir)
        self.k = parse_storage(storage)
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
        self.recaptured: list[str] = []  # resume: prompts of damaged shards, captured again
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"output {self.path} is a file; a dump is a directory: choose a new directory path")
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / MANIFEST).exists():
            if not resume:
                raise ValueError(f"{self.path} already holds a dump; pass resume=True (--resume) to continue it, or choose another directory")
            self._open_existing()
        elif any(p.name != PARTS_DIR for p in self.path.iterdir()):
            raise ValueError(f"{self.path} is not empty and holds no dump; choose an empty or new directory")
        else:
            write_text_atomic(self.path / RECORDS, "")
            self._shard_index = 0
            self._write_manifest()

    def _open_existing(self) -> None:
        from logitparity.validate import DumpError, inspect_dump, set_difference

        old = read_manifest(self.path)
        for key in RESUME_KEYS:
            a, b = old.get(key), self.manifest.get(key)
            if key == "logits":
                a = {k: v for k, v in (a if isinstance(a, dict) else {}).items() if k != "vocab_size"}
                b = {k: v for k, v in b.items() if k != "vocab_size"}
            if a != b:
                raise ValueError(
                    f"cannot resume {self.path}: its manifest's {key!r} differs from this run's "
                    f"({set_difference(a, b, 'dump', 'run')}); use the same settings or a new directory"
                )
        self.manifest["created"] = old.get("created", self.manifest["created"])
        self.manifest["logits"]["vocab_size"] = old["logits"].get("vocab_size")
        rpath = self.path / RECORDS
        if rpath.is_symlink():
            raise ValueError(f"cannot resume {self.path}: {rpath} is a symbolic link; a dump's files are its own")
        if rpath.exists():  # drop a partly written last line (a kill during the append)
            raw = rpath.read_bytes()
            if raw and not raw.endswith(b"\n"):
                write_text_atomic(rpath, raw[: raw.rfind(b"\n") + 1].decode("utf-8", "replace"))
        else:
            write_text_atomic(rpath, "")
        ins = inspect_dump(self.path)
        bad_files = {str(self.path / s) for s in ins.bad_shards}
        others = [v for v in ins.errors if v.file not in bad_files]
        if others:
            raise DumpError(others, self.path)
        self.recaptured = [r["id"] for r in ins.records if r["shard"] in ins.bad_shards]
        self.records = [r for r in ins.records if r["shard"] not in ins.bad_shards]
        if ins.bad_shards:  # recapture the prompts of damaged shards rather than refuse to resume
            write_text_atomic(rpath, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records))
            for shard, why in sorted(ins.bad_shards.items()):
                print(f"logitparity: resume: {why}; its prompts are recaptured", file=sys.stderr)
        used = {r["shard"] for r in self.records}
        for p in self.path.iterdir():  # temporaries and shards no record points at
            if p.name.endswith(".tmp") or (SHARD_RE.match(p.name) and p.name not in used):
                p.unlink()
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
            return {"logits": logits_as_array(logits, self.manifest["logits"]["dtype"])}
        from logitparity.metrics import on_gpu, topk
        from logitparity.topk_rows import exact_lse, tail_mass

        gpu = on_gpu(logits)
        x = logits_as_array(logits, "fp32") if not gpu else logits
        if gpu and type(x).__module__.startswith("torch"):
            import torch

            x = x.detach()
            if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                x = x.float()  # e.g. float64 logits: the kernels read fp32 / fp16 / bf16
        n = x.shape[0]
        if n == 0:
            return {"topk_values": np.zeros((0, self.k), np.float32), "topk_indices": np.zeros((0, self.k), np.int32),
                    "lse": np.zeros(0, np.float64), "tail_mass": np.zeros(0, np.float64)}
        # On the GPU (rows of a model that runs there) the kernels read the
        # rows in place and only the top-K and the log-sum-exps (float64,
        # exps included) cross to the host.
        values, indices = topk(x, self.k)
        lse = exact_lse(x)
        tail = tail_mass(values, lse)
        return {"topk_values": np.ascontiguousarray(values, np.float32),
                "topk_indices": np.ascontiguousarray(indices, np.int32), "lse": lse, "tail_mass": tail}

    def flush(self) -> None:
        """Write the waiting prompts as one shard (temp name, rename), then
        append their records. A no-op when nothing waits."""
        if not self._pending:
            return
        name = shard_name(self._shard_index)
        arrays, dtypes = {}, {}
        lines = []
        for rec, tensors in self._pending:
            seq = len(self.records) + len(lines)
            rec["shard"] = name
            rec["tensors"] = {}
            for tname, arr in tensors.items():
                key = f"{seq:06d}/{tname}"
                rec["tensors"][tname] = key
                arrays[key] = arr
                if tname == "logits":
                    dtypes[key] = _ST_NAMES[self.manifest["logits"]["dtype"]]
            lines.append(json.dumps(rec, ensure_ascii=False))
        # synced and renamed: the shard is on disk before any record names it
        write_shard(self.path / name, arrays, format=FORMAT, version=VERSION, dtypes=dtypes)
        # The manifest (logits.vocab_size) is on disk before the records that
        # need it: a kill between the two steps leaves a valid dump.
        self._write_manifest()
        append_text(self.path / RECORDS, "".join(line + "\n" for line in lines))
        self.records.extend(rec for rec, _ in self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        self._last_flush = time.monotonic()
        self._shard_index += 1

    def adopt(self, items: "list[tuple[dict[str, Any], Path]]", vocab_size: int | None) -> None:
        """Add records whose tensors already lie in complete shards written
        by other writers (the ranks of a data-parallel capture), without
        copying: ``items`` is (record as read, with its ``tensors`` keys and
        ``n_positions``; the source shard file) in the order the records are
        to appear. Each source shard is hard-linked (copied where the file
        system cannot link) under this dump's next shard name through a
        temporary name and a rename; then the manifest (``vocab_size``, the
        sources' row width) is written, then the records in one append: the
        order ``flush`` keeps, so a kill at any point leaves a valid dump."""
        import shutil

        if self._closed:
            raise ValueError("DumpWriter is closed")
        self.flush()
        done = self.done_ids
        names: dict[Path, str] = {}
        lines, recs = [], []
        for rec, src in items:
            if rec["id"] in done:
                raise ValueError(f"prompt id {rec['id']!r} is already in {self.path}; ids must be unique")
            done.add(rec["id"])
            if src not in names:
                name = shard_name(self._shard_index)
                tmp = self.path / f"{name}.tmp"
                if os.path.lexists(tmp):
                    os.unlink(tmp)
                try:
                    os.link(src, tmp, follow_symlinks=False)
                except OSError:  # no hard links here (another file system, FAT, some network mounts): copy
                    shutil.copyfile(src, tmp, follow_symlinks=False)
                    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                os.replace(tmp, self.path / name)
                names[src] = name
                self._shard_index += 1
            rec = {**rec, "shard": names[src]}
            recs.append(rec)
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        if vocab_size is not None:
            have = self.manifest["logits"]["vocab_size"]
            if have is not None and have != vocab_size:
                raise ValueError(f"the adopted rows have vocab {vocab_size}, the dump's rows have {have}")
            self.manifest["logits"]["vocab_size"] = int(vocab_size)
        self._write_manifest()
        if lines:
            append_text(self.path / RECORDS, "".join(lines))
        self.records.extend(recs)

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
