"""Checks a dump against docs/dump-format.md: one set of checks shared by
``load_dump`` (which refuses a dump with any *error*) and ``logitparity
validate`` (which lists every violation, errors and *spec* findings alike).

Two levels:

- ``error``: the data cannot be read correctly as the manifest describes it
  (wrong JSON types, a tensor of the wrong dtype or width, top-K rows that
  break their invariants, token ids outside the vocabulary, a truncated
  shard, a path leaving the directory). Readers refuse the dump: every figure
  computed from it could be wrong.
- ``spec``: the document requires it but a reader can cope without it (a
  missing ``engine.version``, a ``stop_reason`` that does not match the last
  token). ``validate`` fails on these too, so engine authors see them.

Every violation names the file, the record (its id, or its line), the field,
what was expected and what was found. Nothing here imports torch or an
engine; top-K tensors are checked with numpy over K entries per row.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from logitparity._dicts import dig
from logitparity import dump as _dump
from logitparity._shards import ShardError, read_header, tensor_from

__all__ = ["DumpError", "Inspection", "Violation", "check_compatible", "inspect_dump", "validate_dump"]

LEVELS = ("error", "spec")
MODES = ("greedy", "sample", "score")
# |tail_mass - max(0, 1 - sum_kept exp(value - lse))| allowed (an engine that
# sums K float32 probabilities is off by about K * 6e-8; this package writes 0).
TAIL_TOLERANCE = 1e-5
# lse may fall below the log-sum-exp of the kept values by this much, relative
# to max(1, |lse|): the kept values are float32 and the lse float64.
LSE_TOLERANCE = 1e-6
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_TOPK_ROLES = ("topk_values", "topk_indices", "lse", "tail_mass")
# role -> (safetensors dtype, number of dimensions)
_TOPK_SPECS = {"topk_values": ("F32", 2), "topk_indices": ("I32", 2), "lse": ("F64", 1), "tail_mass": ("F64", 1)}
_FULL_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


@dataclasses.dataclass(frozen=True)
class Violation:
    """One way a dump departs from docs/dump-format.md."""

    file: str
    record: str | None
    field: str
    expected: str
    found: str
    level: str = "error"
    fix: str = ""

    def __str__(self) -> str:
        where = self.file + (f" [record {self.record}]" if self.record is not None else "")
        s = f"{where}: {self.field}: expected {self.expected}, found {self.found}"
        return s + (f"; {self.fix}" if self.fix else "")


class DumpError(ValueError):
    """A dump that cannot be read as its manifest says (a ValueError: exit 2).
    ``violations`` lists every error found."""

    def __init__(self, violations: list[Violation], path: Path | str):
        self.violations = list(violations)
        shown = "\n  ".join(str(v) for v in self.violations[:5])
        more = len(self.violations) - 5
        tail = f"\n  ... and {more} more" if more > 0 else ""
        n = len(self.violations)
        super().__init__(
            f"{path}: {n} error{'s' if n != 1 else ''} in the dump:\n  {shown}{tail}\n"
            f"(`logitparity validate {path}` lists every violation; docs/dump-format.md states each rule)"
        )


def _show(v: Any, limit: int = 120) -> str:
    """A value for a message: JSON, cut with a count when long."""
    try:
        s = json.dumps(v, ensure_ascii=False, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= limit else f"{s[:limit - 20]}... ({len(s)} characters)"


def _type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"integer {v}"
    if isinstance(v, float):
        return f"number {v!r}"
    if isinstance(v, str):
        return f"string {_show(v, 60)}"
    if isinstance(v, list):
        return f"array of {len(v)}"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


_INT64 = 2**63  # JSON integers must fit a signed 64-bit integer (what other languages read)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -_INT64 <= v < _INT64


def _is_num(v: Any) -> bool:
    return isinstance(v, float) or _is_int(v)


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


@dataclasses.dataclass
class Inspection:
    """What ``inspect_dump`` read: the manifest, the records that parsed,
    shard headers ({shard: {key: (dtype, shape, start, end)}}), and every
    violation found. ``fatal`` is True when the dump could not be read far
    enough to check its tensors."""

    path: Path
    manifest: dict[str, Any]
    records: list[dict[str, Any]]
    headers: dict[str, dict[str, Any]]
    violations: list[Violation]
    fatal: bool = False
    bad_shards: dict[str, Violation] = dataclasses.field(default_factory=dict)

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.level == "error"]


class _Checker:
    def __init__(self, path: Path):
        self.path = path
        self.out: list[Violation] = []

    def add(self, file: str, record: str | None, field: str, expected: str, found: str, level: str = "error",
            fix: str = "") -> None:
        self.out.append(Violation(str(file), record, field, expected, found, level, fix))


def inspect_dump(path: str | Path, *, content: bool = True) -> Inspection:
    """Read and check a dump directory. Raises FileNotFoundError when it is
    not a directory or has no manifest.json, and ValueError (naming the file)
    when the manifest's format tag or version is unreadable; every other
    problem is a Violation in the result. ``content``: also read top-K tensors
    to check their invariants."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a dump directory" if path.exists() else "no such dump directory"
        raise FileNotFoundError(f"{path}: {what} (expected {_dump.MANIFEST}, {_dump.RECORDS} and shards)")
    manifest = _dump.read_manifest(path)
    c = _Checker(path)
    mfile = str(path / _dump.MANIFEST)
    storage_ok = _check_manifest(c, manifest, mfile)
    records = _check_records(c, manifest, path)
    ins = Inspection(path, manifest, records, {}, c.out, fatal=not storage_ok)
    if storage_ok:
        ins.headers = _check_tensors(c, manifest, records, path, content, ins.bad_shards)
    return ins


def validate_dump(path: str | Path, *, against: str | Path | None = None) -> list[Violation]:
    """Every violation of docs/dump-format.md in the dump at ``path`` (an
    empty list: the dump is valid). ``against``: a reference dump; adds the
    compatibility checks ``compare`` would make (pre-flight before a long
    capture: the candidate may hold only its manifest)."""
    try:
        ins = inspect_dump(path)
    except (FileNotFoundError, ValueError) as e:
        return [Violation(str(path), None, "manifest", "a readable logitparity dump", str(e))]
    out = list(ins.violations)
    if against is not None:
        try:
            ref = inspect_dump(against)
        except (FileNotFoundError, ValueError) as e:
            return out + [Violation(str(against), None, "manifest", "a readable reference dump", str(e))]
        ref_errors = ref.errors
        if ref_errors:
            out += [dataclasses.replace(v, fix=(v.fix + "; " if v.fix else "") + "(in the reference)") for v in ref_errors]
        out += check_compatible(ref.manifest, ref.records, ins.manifest, ins.records, str(against), str(path))
    return out


# --------------------------------------------------------------------------- manifest


def _check_manifest(c: _Checker, m: dict[str, Any], f: str) -> bool:
    """Checks the manifest; returns False when the logits section is unusable."""
    if "created" not in m:
        c.add(f, None, "created", "an ISO 8601 UTC time string", "nothing", "spec")
    elif not isinstance(m["created"], str):
        c.add(f, None, "created", "an ISO 8601 UTC time string", _type(m["created"]))
    if "complete" not in m:
        c.add(f, None, "complete", "true or false", "nothing", "spec",
              "write false when the run starts and true when it ends")
    elif not isinstance(m["complete"], bool):
        c.add(f, None, "complete", "true or false", _type(m["complete"]))
    for key in ("engine", "model", "tokenizer", "decoding"):
        if key not in m:
            c.add(f, None, key, "an object", "nothing", "spec")
        elif not isinstance(m[key], dict):
            c.add(f, None, key, "an object", _type(m[key]))
    for key in ("dtype", "device"):
        if key not in m:
            c.add(f, None, key, "a string", "nothing", "spec")
        elif not isinstance(m[key], str):
            c.add(f, None, key, "a string", _type(m[key]))
    for key in ("libraries", "run", "host", "reference"):
        if key in m and not isinstance(m[key], dict):
            c.add(f, None, key, "an object", _type(m[key]))
    eng = m.get("engine")
    if isinstance(eng, dict):
        if not isinstance(eng.get("name"), str) or not eng.get("name"):
            c.add(f, None, "engine.name", "a non-empty string", _type(eng.get("name")),
                  "error" if "name" in eng else "spec")
        if "version" not in eng:
            c.add(f, None, "engine.version", "a string (the engine's version or build)", "nothing", "spec")
        elif not isinstance(eng["version"], (str, type(None))):
            c.add(f, None, "engine.version", "a string or null", _type(eng["version"]))
    model = m.get("model")
    if isinstance(model, dict):
        for key in ("path", "name", "architecture", "format", "hf_dir", "tokenizer_path"):
            if key in model and not isinstance(model[key], (str, type(None))):
                c.add(f, None, f"model.{key}", "a string or null", _type(model[key]))
        for key in ("config_hash", "weights_hash"):
            v = model.get(key)
            if key not in model:
                c.add(f, None, f"model.{key}", '"sha256:<64 lowercase hex digits>"', "nothing", "spec")
            elif v is not None and not isinstance(v, str):
                c.add(f, None, f"model.{key}", '"sha256:<64 lowercase hex digits>" or null', _type(v))
            elif v is not None and not _HASH_RE.match(v):
                c.add(f, None, f"model.{key}", '"sha256:<64 lowercase hex digits>" or null', _type(v), "spec")
        if "n_parameters" in model and not (model["n_parameters"] is None or _is_int(model["n_parameters"])):
            c.add(f, None, "model.n_parameters", "an integer or null", _type(model["n_parameters"]))
    tok = m.get("tokenizer")
    if isinstance(tok, dict):
        _check_tokenizer(c, tok, f)
    dec = m.get("decoding")
    if isinstance(dec, dict):
        _check_decoding(c, dec, f, m)
    if isinstance(m.get("run"), dict):
        for key, v in m["run"].items():
            if key in ("started",):
                if not isinstance(v, (str, type(None))):
                    c.add(f, None, f"run.{key}", "a string or null", _type(v))
            elif key == "resumed":
                if not isinstance(v, (bool, type(None))):
                    c.add(f, None, "run.resumed", "true, false or null", _type(v))
            elif not (v is None or _is_num(v)):
                c.add(f, None, f"run.{key}", "a number or null", _type(v))
    if isinstance(m.get("libraries"), dict):
        for key, v in m["libraries"].items():
            if not isinstance(v, (str, type(None))):
                c.add(f, None, f"libraries.{key}", "a version string or null", _type(v))
    return _check_logits_section(c, m, f)


def _check_tokenizer(c: _Checker, tok: dict[str, Any], f: str) -> None:
    v = tok.get("vocab_size")
    if "vocab_size" not in tok:
        c.add(f, None, "tokenizer.vocab_size", "an integer >= 1", "nothing", "spec")
    elif not (_is_int(v) and v >= 1):
        c.add(f, None, "tokenizer.vocab_size", "an integer >= 1", _type(v))
    h = tok.get("tokens_hash")
    if "tokens_hash" not in tok:
        c.add(f, None, "tokenizer.tokens_hash", '"sha256:<hex>" of the token strings (docs/dump-format.md, Hashes)',
              "nothing", "spec")
    elif not isinstance(h, str):
        c.add(f, None, "tokenizer.tokens_hash", '"sha256:<64 lowercase hex digits>"', _type(h))
    elif not _HASH_RE.match(h):
        c.add(f, None, "tokenizer.tokens_hash", '"sha256:<64 lowercase hex digits>"', _type(h), "spec")
    st = tok.get("special_tokens")
    if "special_tokens" not in tok:
        c.add(f, None, "tokenizer.special_tokens", "an object (bos/eos/pad/unk_token the tokenizer defines)",
              "nothing", "spec")
    elif not isinstance(st, dict):
        c.add(f, None, "tokenizer.special_tokens", "an object", _type(st))
    else:
        for name, spec in st.items():
            if name not in _dump.SPECIAL_TOKEN_NAMES:
                c.add(f, None, f"tokenizer.special_tokens.{name}", f"one of {list(_dump.SPECIAL_TOKEN_NAMES)}",
                      _show(name), "spec", "list only those four names; other tokens belong in the vocabulary hash")
            if not (isinstance(spec, dict) and isinstance(spec.get("token"), str)
                    and (spec.get("id") is None or _is_int(spec.get("id")))):
                c.add(f, None, f"tokenizer.special_tokens.{name}", '{"token": string, "id": integer or null}',
                      _show(spec))
    if "eos_token_ids" in tok and not _int_list(tok["eos_token_ids"]):
        c.add(f, None, "tokenizer.eos_token_ids", "an array of integers", _type(tok["eos_token_ids"]))
    cth = tok.get("chat_template_hash")
    if cth is not None and not (isinstance(cth, str) and _HASH_RE.match(cth)):
        c.add(f, None, "tokenizer.chat_template_hash", '"sha256:<hex>" or null', _type(cth),
              "spec" if isinstance(cth, str) else "error")


def _check_decoding(c: _Checker, d: dict[str, Any], f: str, m: dict[str, Any]) -> None:
    mode = d.get("mode")
    if "mode" not in d:
        c.add(f, None, "decoding.mode", f"one of {list(MODES)}", "nothing", "spec")
    elif mode not in MODES:
        c.add(f, None, "decoding.mode", f"one of {list(MODES)}", _show(mode))
    for key in ("temperature", "top_p"):
        if key in d and not (d[key] is None or (_is_num(d[key]) and math.isfinite(d[key]) and d[key] > 0)):
            c.add(f, None, f"decoding.{key}", "a number > 0 or null", _type(d[key]))
    if mode == "sample":
        for key in ("temperature", "seed"):
            if d.get(key) is None:
                c.add(f, None, f"decoding.{key}", "set in sample mode", "null or nothing", "spec")
    if "seed" in d and not (d["seed"] is None or _is_int(d["seed"])):
        c.add(f, None, "decoding.seed", "an integer or null", _type(d["seed"]))
    mnt = d.get("max_new_tokens")
    if "max_new_tokens" not in d:
        c.add(f, None, "decoding.max_new_tokens", "an integer >= 1", "nothing", "spec")
    elif not (mnt is None or (_is_int(mnt) and mnt >= 1)):
        c.add(f, None, "decoding.max_new_tokens", "an integer >= 1 or null", _type(mnt))
    for key in ("stop_token_ids", "eos_token_ids"):
        if key not in d:
            c.add(f, None, f"decoding.{key}", "an array of integers (the engine's stop rule)", "nothing", "spec")
        elif not _int_list(d[key]):
            c.add(f, None, f"decoding.{key}", "an array of integers", _type(d[key]))
    rp = d.get("repetition_penalty", 1.0)
    if not (_is_num(rp) and rp == 1.0):
        c.add(f, None, "decoding.repetition_penalty", "1.0 (stored logits are raw)", _show(rp),
              fix="capture without a repetition penalty")
    lp = d.get("logit_processors", [])
    if lp != []:
        c.add(f, None, "decoding.logit_processors", "[] (stored logits are raw)", _show(lp),
              fix="capture without logit processors")
    ct = d.get("chat_template", "auto")
    if not (ct == "auto" or isinstance(ct, bool)):
        c.add(f, None, "decoding.chat_template", '"auto", true or false', _show(ct))
    if mode == "score" and "reference" not in m:
        c.add(f, None, "reference", "an object naming the scored reference dump (score mode)", "nothing", "spec")


def _check_logits_section(c: _Checker, m: dict[str, Any], f: str) -> bool:
    lg = m.get("logits")
    if not isinstance(lg, dict):
        c.add(f, None, "logits", "an object with storage, dtype, vocab_size", _type(lg) if "logits" in m else "nothing")
        return False
    ok = True
    storage = lg.get("storage")
    try:
        k = _dump.parse_storage(storage) if isinstance(storage, str) else _dump.parse_storage(None)
    except ValueError:
        c.add(f, None, "logits.storage", '"full" or "topk:K" with K >= 1', _show(storage))
        ok, k = False, None
    dtype = lg.get("dtype")
    if not isinstance(dtype, str) or dtype not in _dump.LOGITS_DTYPES:
        c.add(f, None, "logits.dtype", f"one of {sorted(_dump.LOGITS_DTYPES)}", _show(dtype))
        ok = False
    elif k is not None and dtype != "fp32":
        c.add(f, None, "logits.dtype", '"fp32" (top-K values are float32)', _show(dtype))
        ok = False
    v = lg.get("vocab_size")
    if not (v is None or (_is_int(v) and v >= 1)):
        c.add(f, None, "logits.vocab_size", "an integer >= 1 (or null while no record is written)", _type(v))
        ok = False
    elif ok and k is not None and v is not None and k > v:
        c.add(f, None, "logits.storage", f"topk:K with K <= vocab_size {v}", _show(storage))
        ok = False
    lse_mode = lg.get("lse", "exact")
    if lse_mode not in ("exact", "unknown") or (lse_mode == "unknown" and k is None):
        c.add(f, None, "logits.lse", '"exact" (default) or "unknown" (topk:K storage only: an engine that '
              'returns top-K log-probs without the row\'s log-sum-exp)', _show(lse_mode))
        ok = False
    want_lse = None if k is None or lse_mode == "unknown" else "float64"
    if "lse_dtype" not in lg:
        c.add(f, None, "logits.lse_dtype", _show(want_lse), "nothing", "spec")
    elif ok and lg["lse_dtype"] != want_lse:
        c.add(f, None, "logits.lse_dtype", _show(want_lse), _show(lg["lse_dtype"]))
    tv = (m.get("tokenizer") or {}).get("vocab_size") if isinstance(m.get("tokenizer"), dict) else None
    if ok and _is_int(v) and _is_int(tv) and v < tv:
        c.add(f, None, "logits.vocab_size", f">= tokenizer.vocab_size ({tv}): rows cover every token", str(v), "spec")
    return ok


# --------------------------------------------------------------------------- records


_RECORD_TYPES = {
    "id": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "category": (lambda v: isinstance(v, str), "a string"),
    "prompt": (lambda v: isinstance(v, str), "a string"),
    "chat_template": (lambda v: isinstance(v, bool), "true or false"),
    "prompt_token_ids": (_int_list, "an array of integers"),
    "generated_token_ids": (_int_list, "an array of integers"),
    "stop_reason": (lambda v: v in _dump.STOP_REASONS, f"one of {list(_dump.STOP_REASONS)}"),
    "n_positions": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "shard": (lambda v: isinstance(v, str) and bool(_dump.SHARD_RE.match(v)), '"shard-NNNNN.safetensors" (5 digits)'),
    "tensors": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                "an object: role -> tensor key (string)"),
}


def _check_records(c: _Checker, m: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """Parses records.jsonl; returns the records whose fields all have their
    types (those the tensor checks can use)."""
    rpath = path / _dump.RECORDS
    f = str(rpath)
    try:
        raw = rpath.read_bytes()
    except FileNotFoundError:
        c.add(f, None, "file", "records.jsonl (one JSON object per line; empty when no prompt is done)", "no file",
              fix="the dump is incomplete: re-run the capture with --resume")
        return []
    except OSError as e:
        c.add(f, None, "file", "a readable file", f"{type(e).__name__}: {e.strerror or e}")
        return []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        c.add(f, None, "encoding", "UTF-8 text", f"byte {raw[e.start]:#04x} at offset {e.start} is not UTF-8")
        return []
    torn = bool(text) and not text.endswith("\n")
    n_lines = text.count("\n") + 1
    if torn:
        c.add(f, f"line {n_lines}", "line end", "every line ending in \\n",
              "a last line without \\n (an interrupted write)", fix="re-run the capture with --resume")
    lg = m.get("logits") if isinstance(m.get("logits"), dict) else {}
    vocab = lg.get("vocab_size") if _is_int(lg.get("vocab_size")) else None
    tok = m.get("tokenizer") if isinstance(m.get("tokenizer"), dict) else {}
    tvocab = tok.get("vocab_size") if _is_int(tok.get("vocab_size")) else None
    dec = m.get("decoding") if isinstance(m.get("decoding"), dict) else {}
    mode = dec.get("mode", "greedy")
    eos = set(dec["eos_token_ids"]) if _int_list(dec.get("eos_token_ids")) else None
    stop = set(dec["stop_token_ids"]) if _int_list(dec.get("stop_token_ids")) else None
    mnt = dec.get("max_new_tokens") if _is_int(dec.get("max_new_tokens")) else None
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    used: dict[tuple[str, str], str] = {}
    # records end at "\n" only (str.splitlines also cuts at U+2028 and U+0085,
    # which a prompt's text holds raw: the writer does not escape non-ASCII)
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            r = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSON, or an integer past 4300 digits
            if torn and lineno == n_lines:
                continue
            c.add(f, where, "JSON", "one JSON object per line", f"malformed ({getattr(e, 'msg', type(e).__name__)})",
                  fix="an interrupted write? re-run the capture with --resume")
            continue
        if not isinstance(r, dict):
            c.add(f, where, "record", "a JSON object", _type(r))
            continue
        rid = r.get("id")
        if isinstance(rid, str) and rid:
            where = f"{rid!r} (line {lineno})"
        good = True
        typed = set()  # fields with their documented type: their own invariants are checked too
        for key, (ok, expected) in _RECORD_TYPES.items():
            if key not in r:
                c.add(f, where, key, expected, "nothing (the record lacks it)")
                good = False
            elif not ok(r[key]):
                c.add(f, where, key, expected, _show(r[key]) if key in ("stop_reason", "shard") else _type(r[key]))
                good = False
            else:
                typed.add(key)
        if "timing" in r:
            t = r["timing"]
            if not isinstance(t, dict):
                c.add(f, where, "timing", "an object", _type(t))
                good = False
            else:
                for key, v in t.items():
                    if not (v is None or _is_num(v)):
                        c.add(f, where, f"timing.{key}", "a number or null", _type(v))
                        good = False
        if isinstance(rid, str) and rid:
            if rid in seen:
                c.add(f, where, "id", "unique ids", f"duplicate prompt id {rid!r} (first on line {seen[rid]})")
                good = False
            else:
                seen[rid] = lineno
        gen = r["generated_token_ids"] if "generated_token_ids" in typed else None
        if gen is not None and "n_positions" in typed and r["n_positions"] != len(gen):
            c.add(f, where, "n_positions", f"len(generated_token_ids) = {len(gen)}", str(r["n_positions"]))
            good = False
        for key in ("prompt_token_ids", "generated_token_ids"):
            if key not in typed:
                continue
            ids = r[key]
            for limit, name in ((vocab, "logits.vocab_size"), (tvocab, "tokenizer.vocab_size")):
                if limit is None or not ids:
                    continue
                bad = [t for t in ids if not 0 <= t < limit]
                if bad:
                    c.add(f, where, key, f"token ids in [0, {limit}) ({name})",
                          f"{len(bad)} outside, e.g. {_show(bad[:5])}")
                    good = False
                    break
        if "prompt_token_ids" in typed and not r["prompt_token_ids"]:
            c.add(f, where, "prompt_token_ids", "at least one token", "[]", "spec")
        if mode != "score" and gen and "stop_reason" in typed:
            last, reason = gen[-1], r["stop_reason"]
            if reason == "eos" and eos is not None and last not in eos:
                c.add(f, where, "stop_reason", f'"eos" only when the last token is in decoding.eos_token_ids {sorted(eos)}',
                      f'"eos" after token {last}', "spec")
            if reason == "stop_token" and stop is not None and last not in stop:
                c.add(f, where, "stop_reason",
                      f'"stop_token" only when the last token is in decoding.stop_token_ids {sorted(stop)}',
                      f'"stop_token" after token {last}', "spec")
        lim = r.get("max_new_tokens") if _is_int(r.get("max_new_tokens")) else mnt  # a category's own budget
        if mode != "score" and lim is not None and gen is not None and len(gen) > lim:
            c.add(f, where, "generated_token_ids", f"at most decoding.max_new_tokens = {lim} tokens", str(len(gen)), "spec")
        if {"tensors", "shard"} <= typed:
            for role, key in r["tensors"].items():
                owner = used.get((r["shard"], key))
                if owner is not None:
                    c.add(f, where, f"tensors.{role}", "a tensor of its own",
                          f"{key!r} in {r['shard']}, also used by record {owner!r}")
                    good = False
                used[(r["shard"], key)] = rid
        if good:
            out.append(r)
    return out


# --------------------------------------------------------------------------- tensors


def _check_tensors(c: _Checker, m: dict[str, Any], records: list[dict[str, Any]], path: Path,
                   content: bool, bad_shards: dict[str, Violation]) -> dict[str, dict[str, Any]]:
    lg = m["logits"]
    k = _dump.parse_storage(lg["storage"])
    vocab = lg.get("vocab_size")
    if records and vocab is None:
        c.add(str(path / _dump.MANIFEST), None, "logits.vocab_size", "the row width (an integer)",
              "null although records exist")
        return {}
    headers: dict[str, dict[str, Any]] = {}
    root = path.resolve()
    maps: dict[str, np.memmap] = {}
    for r in records:
        shard, rid = r["shard"], r["id"]
        sfile = str(path / shard)
        if shard in bad_shards:
            continue
        if shard not in headers:
            p = path / shard
            if p.is_symlink() or (p.exists() and p.resolve().parent != root):
                c.add(sfile, rid, "shard", "a regular file inside the dump directory", "a symbolic link",
                      fix="copy the shard into the dump instead of linking it")
                bad_shards[shard] = c.out[-1]
                continue
            try:
                headers[shard] = read_header(p)
            except ShardError as e:
                c.add(sfile, rid, e.field, e.expected, e.found, fix=e.fix)
                bad_shards[shard] = c.out[-1]
                continue
        header = headers[shard]
        # an engine that does not know the log-sum-exp writes values and indices only
        roles = ("logits",) if k is None else _TOPK_ROLES[:2] if lg.get("lse") == "unknown" else _TOPK_ROLES
        shapes: dict[str, tuple[int, ...]] = {}
        ok = True
        for role in roles:
            key = r["tensors"].get(role)
            if key is None:
                c.add(str(path / _dump.RECORDS), rid, f"tensors.{role}",
                      f"a tensor key ({lg['storage']} storage needs {', '.join(roles)})", "nothing")
                ok = False
                continue
            if key not in header:
                c.add(sfile, rid, f"tensors.{role}", f"tensor {key!r} in {shard}", "no such tensor in the shard",
                      fix="the dump is corrupt: re-run the capture")
                ok = False
                continue
            st_dtype, shape = header[key][4], header[key][1]
            want_dtype, ndim = (_FULL_DTYPES[lg["dtype"]], 2) if k is None else _TOPK_SPECS[role]
            width = vocab if k is None else k
            want_shape = (r["n_positions"], width) if ndim == 2 else (r["n_positions"],)
            if st_dtype != want_dtype:
                c.add(sfile, rid, f"{key} dtype", f"{want_dtype} ({role}, logits.dtype {lg['dtype']!r})"
                      if k is None else f"{want_dtype} ({role})", str(st_dtype))
                ok = False
            if tuple(shape) != want_shape:
                why = ("[n_positions, logits.vocab_size]" if k is None else
                       "[n_positions, K]" if ndim == 2 else "[n_positions]")
                extra = (" (rows wider than the manifest says are never cut)"
                         if k is None and len(shape) == 2 and shape[1] > vocab else "")
                c.add(sfile, rid, f"{key} shape", f"{list(want_shape)} = {why}{extra}", str(list(shape)))
                ok = False
            shapes[role] = shape
        if ok and content and k is not None and r["n_positions"]:
            if shard not in maps:
                maps[shard] = np.memmap(path / shard, dtype=np.uint8, mode="r")
            t = {role: tensor_from(maps[shard], header[r["tensors"][role]]) for role in roles}
            _check_topk_rows(c, sfile, rid, t["topk_values"], t["topk_indices"], t.get("lse"), t.get("tail_mass"),
                             vocab)
    return headers


def _check_topk_rows(c: _Checker, f: str, rid: str, values: np.ndarray, idx: np.ndarray, lse: np.ndarray,
                     tail: np.ndarray, vocab: int) -> None:
    """Top-K invariants of one record (docs/dump-format.md, Top-K rows)."""
    def bad(field: str, expected: str, mask: np.ndarray, found) -> None:
        rows = np.flatnonzero(mask)
        c.add(f, rid, field, expected, f"{len(rows)} of {len(mask)} rows, first row {int(rows[0])}: {found(int(rows[0]))}")

    v = np.asarray(values, np.float64)
    i = np.asarray(idx, np.int64)
    known = lse is not None  # logits.lse = "unknown": values and indices only
    if known:
        lse = np.asarray(lse, np.float64)
        tail = np.asarray(tail, np.float64)
        usable = ~np.isnan(lse)  # a row holding NaN is NaN in every figure; its entries are not read
    else:
        usable = ~np.isnan(v).any(-1)
    out_of_range = ((i < 0) | (i >= vocab)).any(-1) & usable
    if out_of_range.any():
        bad("topk_indices", f"token ids in [0, {vocab})", out_of_range, lambda j: _show(i[j].tolist(), 80))
    s = np.sort(i, axis=-1)
    dup = ((s[:, 1:] == s[:, :-1]).any(-1) if i.shape[1] > 1 else np.zeros(len(i), bool)) & usable
    if dup.any():
        bad("topk_indices", "distinct token ids in each row", dup, lambda j: _show(i[j].tolist(), 80))
    nan_v = np.isnan(v).any(-1) | np.isposinf(v).any(-1)
    with np.errstate(invalid="ignore"):
        order_bad = (v[:, 1:] > v[:, :-1]) | ((v[:, 1:] == v[:, :-1]) & (i[:, 1:] < i[:, :-1]))
    unsorted = order_bad.any(-1) & ~nan_v
    if unsorted.any():
        bad("topk_values", "descending values, ties in ascending token id", unsorted,
            lambda j: _show(v[j].tolist(), 80))
    if not known:
        return
    finite_lse = np.isfinite(lse)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        top = v[:, 0]
        m = np.where(np.isfinite(top), top, 0.0)
        kept_lse = m + np.log(np.exp(v - m[:, None]).sum(-1))
        tol = LSE_TOLERANCE * np.maximum(1.0, np.abs(lse))
        low = finite_lse & ~nan_v & np.isfinite(kept_lse) & (lse < kept_lse - tol)
    if low.any():
        bad("lse", "lse >= log-sum-exp of the kept values (kept mass <= 1)", low,
            lambda j: f"lse {float(lse[j])!r}, log-sum-exp of the kept values {float(kept_lse[j])!r}")
    if (finite_lse & nan_v).any():
        bad("lse", "NaN for a row holding NaN or +inf", finite_lse & nan_v, lambda j: repr(float(lse[j])))
    posinf = np.isposinf(lse)
    if posinf.any():
        bad("lse", "a finite number, -inf (every logit -inf) or NaN", posinf, lambda j: repr(float(lse[j])))
    neginf = np.isneginf(lse) & ~np.isneginf(v).all(-1)
    if neginf.any():
        bad("lse", "-inf only when every logit is -inf", neginf, lambda j: f"-inf with values {_show(v[j].tolist(), 60)}")
    out01 = finite_lse & ~((tail >= 0) & (tail <= 1))
    if out01.any():
        bad("tail_mass", "a number in [0, 1]", out01, lambda j: repr(float(tail[j])))
    with np.errstate(invalid="ignore", over="ignore"):
        want = np.maximum(1.0 - np.exp(v - lse[:, None]).sum(-1), 0.0)
        off = finite_lse & ~out01 & ~low & (np.abs(tail - want) > TAIL_TOLERANCE)
    if off.any():
        bad("tail_mass", f"max(0, 1 - sum(exp(value - lse))) within {TAIL_TOLERANCE:g}", off,
            lambda j: f"{float(tail[j])!r}, the kept values give {float(want[j])!r}")
    nan_tail = ~finite_lse & ~np.isnan(tail)
    if nan_tail.any():
        bad("tail_mass", "NaN when lse is not finite", nan_tail, lambda j: repr(float(tail[j])))


# --------------------------------------------------------------------------- compatibility


def set_difference(a: Any, b: Any, name_a: str = "reference", name_b: str = "candidate") -> str:
    """The whole difference between two values, not two long prints cut at
    the same point: for lists of ids or dicts, what is only on each side."""
    if isinstance(a, list) and isinstance(b, list) and all(_is_int(x) for x in a + b):
        sa, sb = set(a), set(b)
        parts = [f"{name_a} {sorted(sa)}", f"{name_b} {sorted(sb)}"] if len(sa | sb) <= 16 else []
        if sa - sb:
            parts.append(f"only in the {name_a}: {sorted(sa - sb)}")
        if sb - sa:
            parts.append(f"only in the {name_b}: {sorted(sb - sa)}")
        if sa == sb:
            parts.append(f"same ids, other order or repeats: {a} vs {b}")
        return "; ".join(parts)
    if isinstance(a, dict) and isinstance(b, dict):
        parts = []
        for key in sorted(set(a) | set(b), key=str):
            if key not in b:
                parts.append(f"{key} only in the {name_a} ({_show(a[key], 80)})")
            elif key not in a:
                parts.append(f"{key} only in the {name_b} ({_show(b[key], 80)})")
            elif a[key] != b[key]:
                parts.append(f"{key}: {_show(a[key], 80)} vs {_show(b[key], 80)}")
        return "; ".join(parts)
    return f"{name_a} {_show(a)}, {name_b} {_show(b)}"


def check_compatible(ref_m: dict[str, Any], ref_records: list[dict[str, Any]], cand_m: dict[str, Any],
                     cand_records: list[dict[str, Any]], ref_name: str, cand_name: str) -> list[Violation]:
    """Would ``compare REF CAND`` accept these two runs? Every difference in
    tokenizer identity, stop rule, decoding settings, row width and prompts."""
    out: list[Violation] = []
    f = str(Path(cand_name) / _dump.MANIFEST)

    def add(field: str, expected: str, found: str, fix: str) -> None:
        out.append(Violation(f, None, field, expected, found, "error", fix))

    get = dig

    for key in _dump.TOKENIZER_IDENTITY:
        a, b = get(ref_m, "tokenizer", key), get(cand_m, "tokenizer", key)
        if a is not None and b is not None and a != b:
            add(f"tokenizer.{key}", f"the reference's ({ref_name})", set_difference(a, b),
                "the runs use different tokenizers: capture both with the same tokenizer files")
    mr, mc = get(ref_m, "decoding", "mode") or "greedy", get(cand_m, "decoding", "mode") or "greedy"
    if mc != "score":
        if mr != mc:
            add("decoding.mode", f"{mr!r} like the reference", repr(mc),
                "capture in the same mode, or score on the reference's tokens (--mode score --reference-dump REF)")
        for key in ("eos_token_ids", "stop_token_ids"):
            a, b = get(ref_m, "decoding", key), get(cand_m, "decoding", key)
            if a is not None and b is not None and sorted(set(a)) != sorted(set(b)):
                add(f"decoding.{key}", "the reference's stop rule", set_difference(a, b),
                    "same tokenizer, different stop rule: make the engine stop on the same ids "
                    "(or score it on the reference's tokens, where stopping does not matter)")
        keys = ["max_new_tokens"] + (["temperature", "top_p", "seed"] if mr == "sample" else [])
        for key in keys:
            a, b = get(ref_m, "decoding", key), get(cand_m, "decoding", key)
            if a != b:
                add(f"decoding.{key}", f"{_show(a)} like the reference", _show(b), "use the same decoding settings")
    elif mr == "score":
        pass
    va, vb = get(ref_m, "logits", "vocab_size"), get(cand_m, "logits", "vocab_size")
    tv = get(ref_m, "tokenizer", "vocab_size")
    if _is_int(va) and _is_int(vb) and va != vb and _is_int(tv) and min(va, vb) < tv:
        add("logits.vocab_size", f"{va} like the reference (or a padding of at least the tokenizer's {tv})", str(vb),
            "one run dropped real tokens: capture both with the same model")
    refs = {r["id"]: r for r in ref_records}
    for r in cand_records:
        a = refs.get(r["id"])
        where = f"{r['id']!r}"
        if a is None:
            out.append(Violation(str(Path(cand_name) / _dump.RECORDS), where, "id", "a prompt id of the reference",
                                 "an id the reference does not have", "error", "capture from the reference's prompts"))
            continue
        if a["prompt"] != r["prompt"]:
            out.append(Violation(str(Path(cand_name) / _dump.RECORDS), where, "prompt", _show(a["prompt"]),
                                 _show(r["prompt"]), "error", "use the same prompts file"))
        elif a["prompt_token_ids"] != r["prompt_token_ids"]:
            pa, pc = a["prompt_token_ids"], r["prompt_token_ids"]
            j = next((j for j, (x, y) in enumerate(zip(pa, pc)) if x != y), min(len(pa), len(pc)))
            out.append(Violation(str(Path(cand_name) / _dump.RECORDS), where, "prompt_token_ids",
                                 f"the reference's {len(pa)} tokens", f"{len(pc)} tokens, first difference at index {j}",
                                 "error", "check the tokenizer and the chat template"))
        if mc == "score" and r["generated_token_ids"] != a["generated_token_ids"]:
            out.append(Violation(str(Path(cand_name) / _dump.RECORDS), where, "generated_token_ids",
                                 "the reference's tokens (score mode)", "other tokens", "error",
                                 "score on this reference: --mode score --reference-dump REF"))
    return out
