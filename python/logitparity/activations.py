"""The activations part of a dump: per-module activation rows and
distribution statistics, written by any engine (docs/dump-format.md,
"Activations").

Layout, inside the dump directory::

    activations/activations.json     tag, version, modules, aliases, records, statistics
    activations/act-NNNNN.safetensors  rows [positions, width] per (prompt, module)

Names are canonical module paths (``model.layers.10.mlp``); ``aliases`` maps
an engine's own names onto them (a fused or split module is written under
the canonical path of what it computes). Statistics (C++
DistributionAccumulator, merged over every recorded prompt) are always
written; rows only with ``storage="rows"``, and only while they fit the
budget: past it, rows are dropped (``rows_dropped``) and statistics go on.
Memory is bounded by one shard (``shard_bytes``) plus the accumulators.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from logitparity._cuda_arrays import kernel_tensor
from logitparity._fileio import read_tagged_json, write_text_atomic
from logitparity._shards import ShardReader, write_shard
from logitparity._native import core as _core

__all__ = ["ACTIVATIONS_DIR", "FORMAT", "VERSION", "Activations", "ActivationWriter", "load_activations"]

FORMAT = "logitparity-activations"
VERSION = "1.0"
ACTIVATIONS_DIR = "activations"
MANIFEST = "activations.json"
STORAGES = ("stats", "rows")
QUANTILES = {"abs_p99": 0.99, "abs_p999": 0.999, "abs_p9999": 0.9999}
DEFAULT_BUDGET_MB = 256.0
DEFAULT_SHARD_BYTES = 64 << 20
_RECAPTURE = "recapture the activations with `logitparity dump --activations rows`"


def _key(prompt_id: str, path: str) -> str:
    return f"{prompt_id}/{path}"


def _stats_dict(acc: Any) -> dict[str, Any]:
    n = acc.count
    out = {"count": int(n), "finite": int(acc.finite), "mean": acc.mean, "variance": acc.variance,
           "skewness": acc.skewness, "kurtosis": acc.kurtosis, "min": acc.min, "max": acc.max,
           "zero_fraction": acc.zeros / n if n else float("nan"),
           "nan_fraction": acc.nans / n if n else float("nan"),
           "inf_fraction": acc.infs / n if n else float("nan")}
    for name, q in QUANTILES.items():
        out[name] = acc.abs_quantile(q)
    out["abs_quantile_rel_error_bound"] = 2.0 ** -(_core().ABS_HIST_MANTISSA_BITS + 1)
    out["channel_max_abs"] = acc.channel_max_abs.astype(float).tolist()
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in out.items()}


def _nbytes(value: Any) -> int:
    """The host bytes of one module's rows (a tensor as to_numpy_rows stores
    it: 16-bit dtypes as they are, everything else as float32)."""
    if isinstance(value, tuple):
        return int(value[0].nbytes)
    return int(value.numel()) * (2 if str(value.dtype) in ("torch.float16", "torch.bfloat16") else 4)


def _host_rows(t: Any) -> tuple[np.ndarray, bool]:
    from logitparity.capture.hooks import to_numpy_rows

    return to_numpy_rows(t)


class ActivationWriter:
    """Streams activations of one dump into its ``activations/`` part.

    modules: canonical paths in execution order. storage: 'stats' or
    'rows'. budget_mb: the most row bytes kept (rows mode). aliases: engine
    name -> canonical path. positions: a free-form description written to the
    manifest (which positions each record holds)."""

    def __init__(self, dump_dir: str | os.PathLike, modules: Sequence[str], *, storage: str = "stats",
                 budget_mb: float = DEFAULT_BUDGET_MB, aliases: dict[str, str] | None = None,
                 positions: dict[str, Any] | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES):
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES} (statistics only, or rows too), got {storage!r}")
        if not (isinstance(budget_mb, (int, float)) and not isinstance(budget_mb, bool) and budget_mb > 0):
            raise ValueError(f"activations budget must be a positive number of MB, got {budget_mb!r}")
        if not modules:
            raise ValueError("modules must name at least one module path")
        root = Path(dump_dir)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(f"{root} is not a dump directory (no manifest.json); capture the dump first")
        self.dir = root / ACTIVATIONS_DIR
        self.dir.mkdir(exist_ok=True)
        for old in self.dir.glob("act-*.safetensors"):
            old.unlink()
        self.modules = list(modules)
        self.storage = storage
        self.budget = int(budget_mb * (1 << 20))
        self.aliases = dict(aliases or {})
        for a, target in self.aliases.items():
            if target not in self.modules:
                raise ValueError(f"alias {a!r} points at {target!r}, which is not a recorded module")
        self.positions = positions or {}
        self.shard_bytes = shard_bytes
        self.widths: dict[str, int] = {}
        self.dtypes: dict[str, str] = {}
        self.acc: dict[str, Any] = {}
        self.records: list[dict[str, Any]] = []
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.kept_bytes = 0
        self.rows_dropped = False
        self.shards = 0

    def add(self, prompt_id: str, rows: dict[str, Any]) -> None:
        """One prompt: module path -> (rows [positions, width] float32/float16
        or uint16 bfloat16 bits, is_bf16), or a torch tensor [positions,
        width]. A CUDA tensor whose rows are not kept (storage 'stats', or
        past the budget) adds to the statistics where it is
        (DistributionAccumulator.add_cuda); every other one is copied to the
        host first."""
        n_pos = None
        keep = self.storage == "rows"
        size = sum(_nbytes(v) for v in rows.values())
        if keep and self.kept_bytes + size > self.budget:
            keep = False
            self.rows_dropped = True
        for path, value in rows.items():
            if not keep and kernel_tensor(value):
                self._add_cuda(path, value)
                n_pos = int(value.shape[0]) if n_pos is None else n_pos
                continue
            arr, bf16 = value if isinstance(value, tuple) else _host_rows(value)
            kind = "bf16" if bf16 else "fp16" if arr.dtype == np.float16 else "fp32"
            self._accumulator(path, int(arr.shape[1]), kind).add(arr, bf16)
            n_pos = int(arr.shape[0]) if n_pos is None else n_pos
            if keep:
                self.pending[_key(prompt_id, path)] = (arr, bf16)
        shard = None
        if keep:
            self.kept_bytes += size
            self.pending_bytes += size
            shard = f"act-{self.shards:05d}.safetensors"
        self.records.append({"id": prompt_id, "positions": n_pos, "shard": shard})
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def _accumulator(self, path: str, width: int, kind: str) -> Any:
        """The module's statistics, once the module is known to be declared
        and to keep its first record's width (and dtype name, for the
        manifest)."""
        if path not in self.modules:
            raise ValueError(f"module {path!r} was not declared to the writer")
        if self.widths.setdefault(path, width) != width:
            raise ValueError(f"module {path}: width {width} differs from the first record's {self.widths[path]}")
        self.dtypes.setdefault(path, kind)
        acc = self.acc.get(path)
        if acc is None:
            acc = self.acc[path] = _core().DistributionAccumulator(width)
        return acc

    def _add_cuda(self, path: str, t: Any) -> None:
        from logitparity._cuda_arrays import cuda_rows

        kind = {"bfloat16": "bf16", "float16": "fp16"}.get(str(t.dtype).split(".")[-1], "fp32")
        acc = self._accumulator(path, int(t.shape[1]), kind)
        v = cuda_rows(t, path, False)
        acc.add_cuda(v.ptr, v.dtype, v.stride, v.rows, v.vocab, v.stream)

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"act-{self.shards:05d}.safetensors"
        tensors, meta = {}, {}
        for k, (arr, bf16) in self.pending.items():
            tensors[k] = arr
            if bf16:
                meta[k] = "bf16"  # uint16 bit patterns of bfloat16
        write_shard(self.dir / name, tensors, format=FORMAT, version=VERSION, metadata=meta)
        self.pending, self.pending_bytes = {}, 0
        self.shards += 1

    def close(self) -> Path:
        self.flush()
        doc = {"format": FORMAT, "version": VERSION, "complete": True, "storage": self.storage,
               "budget_mb": self.budget / (1 << 20), "rows_bytes": self.kept_bytes, "rows_dropped": self.rows_dropped,
               "positions": self.positions,
               "modules": [{"path": p, "width": self.widths.get(p), "dtype": self.dtypes.get(p)} for p in self.modules],
               "aliases": self.aliases, "records": self.records,
               "stats": {p: _stats_dict(a) for p, a in self.acc.items()}}
        path = self.dir / MANIFEST
        write_text_atomic(path, json.dumps(doc, indent=1) + "\n")
        return path


class Activations:
    """The activations part of one dump, read."""

    def __init__(self, dump_dir: str | os.PathLike):
        self.root = Path(dump_dir)
        self.dir = self.root / ACTIVATIONS_DIR
        mpath = self.dir / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(
                f"dump {self.root} has no activations part ({ACTIVATIONS_DIR}/{MANIFEST}); dumps of format 1.0 and "
                "dumps captured without activations have none: recapture with `logitparity dump --activations`")
        doc = read_tagged_json(mpath, fmt=FORMAT, what="activations manifest", reads=VERSION,
                               fix="the activations part is damaged or foreign: recapture it with "
                                   "`logitparity dump --activations`")
        if not doc.get("complete"):
            raise ValueError(f"{mpath}: the activations capture did not finish (complete is false); recapture it")
        self.manifest = doc
        self.modules = [m["path"] for m in doc["modules"]]
        self.aliases = dict(doc.get("aliases", {}))
        self.records = {r["id"]: r for r in doc["records"]}
        self.widths = {m["path"]: m.get("width") for m in doc["modules"]}
        self._readers: dict[str, ShardReader] = {}

    @property
    def storage(self) -> str:
        return self.manifest["storage"]

    def canonical(self, name: str) -> str:
        """A module name or an alias -> the canonical path (KeyError names the choices)."""
        if name in self.modules:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise KeyError(f"module {name!r} is not in {self.dir} (modules: {self.modules[0]} … {self.modules[-1]}; "
                       f"aliases: {sorted(self.aliases)[:5]})")

    def stats(self, module: str) -> dict[str, Any]:
        return self.manifest["stats"][self.canonical(module)]

    def has_rows(self, prompt_id: str) -> bool:
        r = self.records.get(prompt_id)
        return bool(r and r.get("shard"))

    def rows(self, prompt_id: str, module: str) -> tuple[np.ndarray, bool]:
        """(rows [positions, width], is_bf16) of one prompt and module."""
        path = self.canonical(module)
        r = self.records.get(prompt_id)
        if r is None:
            raise KeyError(f"prompt {prompt_id!r} has no activations in {self.dir}")
        if not r.get("shard"):
            why = "statistics only were stored" if self.storage == "stats" else "the activations budget ran out"
            raise ValueError(f"prompt {prompt_id!r} has no activation rows in {self.dir} ({why}); recapture with "
                             "--activations rows and a larger --activations-budget")
        f = self._readers.get(r["shard"])
        if f is None:
            f = self._readers[r["shard"]] = ShardReader(self.dir / r["shard"], fix=_RECAPTURE,
                                                        what=f"a shard {MANIFEST} names")
        key = _key(prompt_id, path)
        bf16 = f.metadata.get(key) == "bf16"
        arr = f.tensor(key, dtype="U16" if bf16 else ("F32", "F16"), shape=(None, self.widths.get(path)))
        return np.array(arr), bf16  # a copy, as before: callers may keep it past the shard


def load_activations(dump_dir: str | os.PathLike) -> Activations:
    """Open the activations part of dump ``dump_dir`` (tag and version checked)."""
    return Activations(dump_dir)
