"""The perplexity baseline cache: the reference side of ``logitparity ppl``
saved once, so later candidates are scored without re-running the reference.

Layout of a cache directory (readable without this package: JSON +
safetensors)::

    manifest.json             format tag and version (checked first), the
                              text's sha256, window settings, tokenizer and
                              model identity, storage, shard list, sizes
    tokens.safetensors        token_ids int64 [n_tokens]: the scored text
    shard-NNNNN.safetensors   per scored position, in scoring order:
                              position int64 (index into token_ids, = the
                              target's index), target int64, nll float64,
                              lse float64 (exact log-sum-exp of the logit row),
                              argmax int64, and either
                              full:   logprobs [n, V] fp32 | fp16 | bf16
                                      (bf16 as uint16 bit patterns)
                              topk:K: topk_values float32 [n, K] (raw logits,
                                      descending, ties to the lower id),
                                      topk_indices int32 [n, K], tail float64
                                      (mass outside the K tokens, 1 - sum of
                                      their probabilities) — as in a topk dump

NLL, Δp of the true token and same-top-1 are exact with either storage (nll
and argmax are stored in float64/int64). With ``topk:K`` storage KL is
computed on the partition {K stored tokens} + {rest}: a lower bound on the
full-vocabulary KL (data-processing inequality).

The whole directory is written under a temporary sibling name and renamed
when complete, so a cache either exists whole or not at all.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from logitparity._fileio import read_tagged_json, write_text_atomic
from logitparity._shards import ShardReader, write_shard
from logitparity.dump import TOKENIZER_IDENTITY, float32_to_bf16_bits, parse_storage, text_sha256
from logitparity.metrics import log_softmax, topk as _topk
from logitparity.topk_rows import exact_lse, tail_mass

__all__ = ["FORMAT", "VERSION", "BaselineCache", "BaselineCacheWriter", "CacheRows", "load_baseline_cache"]

FORMAT = "logitparity-ppl-baseline"
VERSION = "1.0"  # written as the integer 1 before 1.0 (read as "1.0": _fileio.LEGACY_INT_VERSIONS)
MANIFEST = "manifest.json"
TOKENS = "tokens.safetensors"
SHARD_ROWS_BYTES = 256 << 20  # a shard is written once its rows reach this size
CACHE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}
# what every damaged-cache message ends with
_RECREATE = "recreate the cache with `logitparity ppl --model REF --save-baseline DIR`"
# the safetensors dtype of every shard tensor; full rows (logprobs) by storage dtype, bf16 as U16 bits
_SHARD_DTYPES = {"position": "I64", "target": "I64", "nll": "F64", "lse": "F64", "argmax": "I64",
                 "topk_values": "F32", "topk_indices": "I32", "tail": "F64"}
_ROWS_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "U16"}
# Window settings that must match for a cache to be reused.
SETTING_KEYS = ("ctx", "stride", "bos_token_id", "max_tokens")

def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


@dataclasses.dataclass
class CacheRows:
    """Reference data for a run of scored positions (row i = one token).

    ``logprobs`` [n, V] (full storage; ``bf16`` says uint16 bit patterns), or
    ``topk_values``/``topk_indices`` [n, K] and ``tail`` [n] (topk storage)."""

    position: np.ndarray
    target: np.ndarray
    nll: np.ndarray
    lse: np.ndarray
    argmax: np.ndarray
    logprobs: np.ndarray | None = None
    bf16: bool = False
    topk_values: np.ndarray | None = None
    topk_indices: np.ndarray | None = None
    tail: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.target.shape[0])


class BaselineCacheWriter:
    """Streams the reference's scored rows into a new cache directory.

    ``storage``: 'full' or 'topk:K'; ``dtype`` (full only): fp32 | fp16 |
    bf16. Call ``add`` per batch of rows, then ``close(manifest)``; on an
    exception call ``abort()`` (the context manager does both).
    """

    def __init__(self, path: str | os.PathLike, *, storage: str = "full", dtype: str = "fp16",
                 threads: int | None = None):
        self.path = Path(path)
        self.k = parse_storage(storage)
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
        self.storage, self.dtype, self.threads = storage, dtype, threads
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"save_baseline {self.path} exists and is not a directory; pass a directory path")
        if self.path.is_dir() and any(self.path.iterdir()) and not is_baseline_cache(self.path):
            raise ValueError(
                f"save_baseline {self.path} is a non-empty directory that is not a baseline cache; "
                "refusing to overwrite it: pass a new or empty directory"
            )
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_bytes = 0
        self._shards: list[dict[str, Any]] = []
        self.vocab: int | None = None
        self.rows = 0

    def add(self, logits: Any, *, position: np.ndarray, target: np.ndarray, nll: np.ndarray,
            lse: np.ndarray, argmax: np.ndarray) -> None:
        """Rows [n, V] of raw logits (numpy or torch, fp32/fp16/bf16) with their
        per-row figures (nll, lse in nats; argmax, target, position ids)."""
        rows = {
            "position": np.asarray(position, np.int64), "target": np.asarray(target, np.int64),
            "nll": np.asarray(nll, np.float64), "lse": np.asarray(lse, np.float64),
            "argmax": np.asarray(argmax, np.int64),
        }
        vocab = int(logits.shape[-1])
        if self.vocab is None:
            self.vocab = vocab
        elif vocab != self.vocab:
            raise ValueError(f"logit rows changed width from {self.vocab} to {vocab} within one run")
        if self.k is None:
            lp = log_softmax(logits, threads=self.threads)
            if not isinstance(lp, np.ndarray):  # computed on the GPU: the stored rows cross here
                lp = lp.cpu().numpy()
            if self.dtype == "bf16":
                rows["logprobs"] = float32_to_bf16_bits(lp)
            else:
                rows["logprobs"] = lp.astype(CACHE_DTYPES[self.dtype], copy=False)
        else:
            k = min(self.k, vocab)
            v, i = _topk(logits, k, threads=self.threads)
            rows["topk_values"] = v.astype(np.float32, copy=False)
            rows["topk_indices"] = i.astype(np.int32)
            # The tail from a float64 log-sum-exp (exp included), as in dumps:
            # the given lse sums float32 exps and would floor the tail at ~1e-7.
            rows["lse"] = exact_lse(logits)  # in place on a GPU
            rows["tail"] = tail_mass(v, rows["lse"])
        self._pending.append(rows)
        self._pending_bytes += sum(a.nbytes for a in rows.values())
        self.rows += len(rows["target"])
        if self._pending_bytes >= SHARD_ROWS_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        tensors = {k: np.concatenate([p[k] for p in self._pending]) for k in self._pending[0]}
        name = _shard_name(len(self._shards))
        write_shard(self._tmp / name, tensors, format=FORMAT, version=VERSION)
        self._shards.append({"file": name, "rows": int(tensors["target"].shape[0])})
        self._pending, self._pending_bytes = [], 0

    def close(self, manifest: dict[str, Any], token_ids: np.ndarray) -> dict[str, Any]:
        """Write the tokens and the manifest, then move the cache into place.
        ``manifest`` holds the caller's sections (text, settings, tokenizer,
        model, counts). Returns the full manifest."""
        self._flush()
        write_shard(self._tmp / TOKENS, {"token_ids": np.asarray(token_ids, dtype=np.int64)}, format=FORMAT,
                    version=VERSION)
        shard_bytes = sum((self._tmp / s["file"]).stat().st_size for s in self._shards)
        full = {
            "format": FORMAT,
            "version": VERSION,
            **manifest,
            "storage": {"logits": self.storage, "dtype": self.dtype if self.k is None else None,
                        "vocab": self.vocab},
            "rows": self.rows,
            "shards": self._shards,
            "bytes_per_token": shard_bytes / self.rows if self.rows else float("nan"),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_text_atomic(self._tmp / MANIFEST, json.dumps(full, indent=2) + "\n", sync=True)
        if self.path.is_dir():  # an older cache (checked in __init__) or an empty directory
            shutil.rmtree(self.path)
        os.replace(self._tmp, self.path)
        return full

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "BaselineCacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class BaselineCache:
    """A baseline cache opened for reading (see the module docstring).

    ``manifest`` is the parsed manifest.json; ``token_ids`` the scored text's
    tokens; ``rows(start, stop)`` reads scored rows [start, stop) as
    ``CacheRows``, across shards.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"baseline cache {self.path} does not exist; create one with "
                "`logitparity ppl --model REF --save-baseline DIR`"
            )
        if not mpath.is_file():
            raise FileNotFoundError(
                f"{mpath} not found: {self.path} is not a baseline cache (or it was not written "
                "completely); recreate it with `logitparity ppl --model REF --save-baseline DIR`"
            )
        m = read_tagged_json(mpath, fmt=FORMAT, what="baseline-cache manifest", reads=VERSION, fix=_RECREATE)
        for key in ("text", "settings", "tokenizer", "storage", "rows", "shards"):
            if key not in m:
                raise ValueError(f"{mpath}: missing {key!r}; the cache is damaged, recreate it")
        _check_manifest_types(m, mpath)
        self.manifest = m
        self.k = parse_storage(m["storage"]["logits"])
        self.vocab = int(m["storage"]["vocab"])
        self._starts = np.cumsum([0] + [int(s["rows"]) for s in m["shards"]])
        root = self.path.resolve()
        for s in m["shards"]:
            p = self.path / s["file"]
            if p.is_symlink() or not p.is_file() or p.resolve().parent != root:
                what = "a symbolic link" if p.is_symlink() else "missing" if not p.exists() else "not a file in the cache"
                raise FileNotFoundError(f"baseline cache shard {p} is {what}; recreate the cache")
        if int(self._starts[-1]) != int(m["rows"]):
            raise ValueError(f"{mpath}: shards hold {int(self._starts[-1])} rows, manifest says {m['rows']}")
        tpath = self.path / TOKENS
        if tpath.is_symlink() or not tpath.is_file():
            raise FileNotFoundError(f"baseline cache tokens {tpath} are missing; recreate the cache")
        # a damaged file is a ShardError (a ValueError) naming it, the tensor, expected and found
        self.token_ids = np.array(ShardReader(tpath, fix=_RECREATE, what="the cache's tokens").tensor(
            "token_ids", dtype="I64", shape=(None,)))
        self._readers = self._check_shards()
        if self.token_ids.size and not (0 <= int(self.token_ids.min()) and int(self.token_ids.max()) < self.vocab):
            raise ValueError(f"baseline cache {tpath}: token ids outside [0, {self.vocab}); recreate the cache")

    def _check_shards(self) -> list[ShardReader]:
        """Every shard holds the documented tensors with the manifest's row
        count and width (header only; raises ShardError)."""
        width = {"logprobs": self.vocab} if self.k is None else {"topk_values": self.k, "topk_indices": self.k}
        need = ("position", "target", "nll", "lse", "argmax", *width, *(() if self.k is None else ("tail",)))
        readers = []
        for s in self.manifest["shards"]:
            f = ShardReader(self.path / s["file"], fix=_RECREATE, what="a shard the cache manifest lists")
            for key in need:
                f.entry(key, dtype=_ROWS_DTYPES[self.manifest["storage"]["dtype"]] if key == "logprobs"
                        else _SHARD_DTYPES[key],
                        shape=(int(s["rows"]), width[key]) if key in width else (int(s["rows"]),))
            readers.append(f)
        return readers

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def bytes_per_token(self) -> float:
        return float(self.manifest["bytes_per_token"])

    def check_compatible(self, *, tokenizer: dict[str, Any] | None = None, text: str | None = None,
                         settings: dict[str, Any] | None = None, vocab: int | None = None) -> None:
        """Raise ValueError naming the first difference between this cache and
        a candidate's tokenizer identity, text, window settings or vocab."""
        m = self.manifest
        if tokenizer is not None:
            for key in TOKENIZER_IDENTITY:
                a, b = m["tokenizer"].get(key), tokenizer.get(key)
                if a != b:
                    from logitparity.validate import set_difference

                    raise ValueError(
                        f"baseline cache {self.path} was made with another tokenizer ({key} differs: "
                        f"{set_difference(a, b, 'cache', 'candidate')}); a cache can only score a candidate "
                        "that tokenizes the text identically: recreate it with the candidate's tokenizer"
                    )
        if text is not None and text_sha256(text) != m["text"]["sha256"]:
            raise ValueError(
                f"baseline cache {self.path} was made from another text (sha256 {m['text']['sha256']}, "
                f"name {m['text'].get('name')!r}); pass the same text, or none to use the cache's tokens"
            )
        for key, value in (settings or {}).items():
            if value is not None and m["settings"].get(key) != value:
                raise ValueError(
                    f"baseline cache {self.path} was made with {key}={m['settings'].get(key)!r}, "
                    f"got {key}={value!r}; leave it unset to use the cache's value, or recreate the cache"
                )
        if vocab is not None and vocab != self.vocab:
            raise ValueError(
                f"baseline cache {self.path} holds logit rows of width {self.vocab}, the candidate's "
                f"are {vocab}; were both made with the same model family (padded vocabulary?)"
            )

    def rows(self, start: int, stop: int) -> CacheRows:
        """Scored rows [start, stop) (0 <= start <= stop <= len(self))."""
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"rows must satisfy 0 <= start <= stop <= {len(self)}, got [{start}, {stop})")
        parts: list[dict[str, np.ndarray]] = []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for i in range(max(first, 0), len(self.manifest["shards"])):
            lo, hi = int(self._starts[i]), int(self._starts[i + 1])
            if lo >= stop:
                break
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            f = self._readers[i]
            parts.append({key: f.tensor(key)[a:b] for key in f.keys()})
        keys = parts[0].keys() if parts else ()
        cat = {key: np.concatenate([p[key] for p in parts]) for key in keys}
        return CacheRows(
            position=cat["position"], target=cat["target"], nll=cat["nll"], lse=cat["lse"],
            argmax=cat["argmax"], logprobs=cat.get("logprobs"),
            bf16=self.manifest["storage"].get("dtype") == "bf16",
            topk_values=cat.get("topk_values"), topk_indices=cat.get("topk_indices"), tail=cat.get("tail"),
        )

    def __repr__(self) -> str:
        m = self.manifest
        return (f"BaselineCache({str(self.path)!r}, rows={len(self)}, storage={m['storage']['logits']}, "
                f"{self.bytes_per_token:.0f} bytes/token)")


_SHARD_FILE = re.compile(r"^shard-\d{5}\.safetensors$")


def _check_manifest_types(m: dict[str, Any], mpath: Path) -> None:
    """JSON types of what the reader uses; shard names that stay inside the
    cache directory (a file name, never a path)."""
    def bad(field: str, expected: str, found: Any) -> ValueError:
        return ValueError(f"{mpath}: {field} must be {expected}, got {json.dumps(found, default=str)[:80]}; "
                          "the cache is damaged or not written by logitparity: recreate it")

    for key in ("text", "settings", "tokenizer", "storage"):
        if not isinstance(m[key], dict):
            raise bad(key, "an object", m[key])
    st = m["storage"]
    try:
        parse_storage(st.get("logits"))
    except ValueError:
        raise bad("storage.logits", "'full' or 'topk:K'", st.get("logits")) from None
    if not (isinstance(st.get("vocab"), int) and not isinstance(st.get("vocab"), bool) and st["vocab"] >= 1):
        raise bad("storage.vocab", "an integer >= 1", st.get("vocab"))
    if st.get("logits") == "full" and not (isinstance(st.get("dtype"), str) and st["dtype"] in CACHE_DTYPES):
        raise bad("storage.dtype", f"one of {sorted(CACHE_DTYPES)}", st.get("dtype"))
    if not isinstance(m["text"].get("sha256"), str):
        raise bad("text.sha256", "a string", m["text"].get("sha256"))
    if not (isinstance(m["rows"], int) and not isinstance(m["rows"], bool) and m["rows"] >= 0):
        raise bad("rows", "an integer >= 0", m["rows"])
    if not isinstance(m["shards"], list):
        raise bad("shards", "an array", m["shards"])
    for s in m["shards"]:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and _SHARD_FILE.match(s["file"])
                and isinstance(s.get("rows"), int) and not isinstance(s.get("rows"), bool) and s["rows"] >= 0):
            raise bad("shards[]", '{"file": "shard-NNNNN.safetensors", "rows": integer >= 0}', s)
    if not _is_number(m.get("bytes_per_token", 0.0)):
        raise bad("bytes_per_token", "a number", m.get("bytes_per_token"))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def load_baseline_cache(path: str | os.PathLike) -> BaselineCache:
    """Open a baseline cache directory; the format tag and version are checked first."""
    return BaselineCache(path)


def is_baseline_cache(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory whose manifest carries this format's tag."""
    m = Path(path) / MANIFEST
    if not m.is_file():
        return False
    try:
        return json.loads(m.read_text(encoding="utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False

