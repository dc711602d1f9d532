#!/usr/bin/env python3
"""Fuzz the readers: mutate manifests, records, shard headers, top-K tensors
and policy files of small dumps, and check that every mutation ends in a
clean error or a correct result, never a traceback or a wrong verdict.

    python benchmarks/fuzz_dumps.py --examples 10000 [--seed 0]

Each example copies a small reference/candidate pair (full fp32 or top-K
storage, 3 prompts x 4 positions, vocabulary 24) and a policy file, applies
one to three mutations drawn by hypothesis, then runs ``validate_dump`` on
both dumps and ``compare_dumps`` (and renders the report). The oracle:

- ``validate_dump`` never raises (it lists violations);
- ``compare_dumps`` either raises a clean error (ValueError, including
  DumpError / IncompatibleRuns / IncompleteRuns, FileNotFoundError or
  another OSError) whose message is non-empty, or returns a comparison whose
  markdown and JSON render;
- when it returns, neither dump has an error-level violation (the reader and
  the validator agree);
- when every mutation was *neutral* (engine, library, host, model identity or
  creation-time fields, or an added unknown key), the verdict, every policy
  metric and every first-divergence position equal the unmutated pair's.

Anything else is a failure, printed with the mutation that caused it
(hypothesis shrinks it). tests/test_fuzz.py runs a few hundred examples in
the test command; this script runs as many as asked and prints the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from logitparity.compare import compare_dumps
from logitparity.dump import DumpWriter
from logitparity.validate import validate_dump

V = 24
N_PROMPTS, N_POS = 3, 4
POLICY = """name = "fuzz"
description = "fuzzed policy"

[thresholds.greedy]
metric = "greedy_match@2"
comparison = ">="
limit = 0.5

[thresholds.kl]
metric = "kl_ref_cand.mean"
comparison = "<="
limit = 0.05
"""
MANIFEST = {
    "engine": {"name": "fuzz", "version": "0"},
    "model": {"path": "none", "name": "m", "config_hash": "sha256:" + "a" * 64, "weights_hash": "sha256:" + "b" * 64},
    "tokenizer": {"vocab_size": V, "tokens_hash": "sha256:" + "c" * 64,
                  "special_tokens": {"eos_token": {"token": "</s>", "id": 1}}, "eos_token_ids": [1]},
    "dtype": "fp32", "device": "cpu",
    "decoding": {"mode": "greedy", "temperature": None, "top_p": None, "seed": None, "max_new_tokens": N_POS,
                 "stop_token_ids": [], "eos_token_ids": [1], "repetition_penalty": 1.0, "logit_processors": [],
                 "chat_template": "auto"},
    "libraries": {"numpy": "1"},
    "host": {"cpu_count": 2},
}
NEUTRAL_MANIFEST = ("created", "engine", "libraries", "host", "model")
CLEAN = (ValueError, FileNotFoundError, OSError)


def build(root: Path) -> dict[str, Path]:
    """The unmutated inputs: full and top-K pairs and a policy file."""
    rng = np.random.default_rng(7)
    out = {}
    for storage in ("full", "topk:6"):
        tag = "full" if storage == "full" else "topk"
        for side, noise in (("ref", 0.0), ("cand", 0.05)):
            path = root / f"{tag}-{side}"
            with DumpWriter(path, MANIFEST, storage=storage) as w:
                for i in range(N_PROMPTS):
                    base = np.random.default_rng(i).standard_normal((N_POS, V)).astype(np.float32) * 3
                    x = base + noise * rng.standard_normal(base.shape).astype(np.float32)
                    if side == "cand" and i == 2:
                        x[1, 7] = x[1].max() + 2  # a real split at position 1
                    toks = [int(t) for t in np.argmax(x, 1)]
                    w.add({"id": f"p{i}", "category": "math" if i % 2 else "code", "prompt": f"prompt {i}",
                           "chat_template": False, "prompt_token_ids": [3, 4, 5 + i],
                           "generated_token_ids": toks, "stop_reason": "max_new_tokens",
                           "timing": {"ttft_s": 0.01, "decode_tokens_per_s": 50.0, "batch_size": 1}}, x)
            out[f"{tag}-{side}"] = path
    (root / "policy.toml").write_text(POLICY)
    out["policy"] = root / "policy.toml"
    return out


def summary(comp) -> tuple:
    """What must not move under a neutral mutation (record order is not
    meaning: readers match prompts by id)."""
    m = comp.metrics()
    return (comp.verdict.passed, tuple(sorted((k, None if v != v else v) for k, v in m.items())),
            tuple(sorted((p.id, p.first_divergence) for p in comp.prompts)))


def same(a: tuple, b: tuple) -> bool:
    """Equal verdicts and divergences; metrics equal to 1e-9 relative (a
    reordered sum may move the last bits)."""
    if a[0] != b[0] or a[2] != b[2] or [k for k, _ in a[1]] != [k for k, _ in b[1]]:
        return False
    return all((x is None and y is None) or (x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9,
                                                                                               abs_tol=1e-15))
               for (_, x), (_, y) in zip(a[1], b[1]))


# ------------------------------------------------------------------ mutations

JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, 1, -1, V, V - 1, V + 1, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "full", "topk:6", "topk:0", "fp32", "bf16", "fp8", "eos", "greedy", "score", "sample",
                     "1.0", "2.0", "shard-00000.safetensors", "../x", "/etc/passwd", "000000/logits",
                     "000001/topk_values", "sha256:" + "0" * 64]),
)
JSON_VALUE = st.recursive(JSON_LEAF, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), kids, max_size=3)),
                          max_leaves=8)


def _paths(obj, prefix=()):
    """Every (path) to a value inside a JSON object."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def mutate_json(data, obj):
    """One edit of a JSON document: set, delete or add at a drawn path.
    -> (new object, description, path, operation)."""
    paths = [p for p in _paths(obj) if p]
    op = data.draw(st.sampled_from(["set", "delete", "add", "type"]))
    obj = copy.deepcopy(obj)
    if op == "add" or not paths:
        holders = [p for p in _paths(obj) if isinstance(_get(obj, p), dict)]
        where = data.draw(st.sampled_from(holders))
        key = data.draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in _get(obj, where)))
        _get(obj, where)[key] = data.draw(JSON_VALUE)
        return obj, f"add {'/'.join(map(str, where))}/{key}", where + (key,), "add"
    path = data.draw(st.sampled_from(paths))
    parent, key = _get(obj, path[:-1]), path[-1]
    if op == "delete":
        del parent[key]
        desc = f"delete {'/'.join(map(str, path))}"
    else:
        old = parent[key]
        if op == "type" and isinstance(old, (int, float)) and not isinstance(old, bool):
            new = data.draw(st.sampled_from([str(old), float(old) if isinstance(old, int) else int(old)
                                             if math.isfinite(old) else 0, [old], None, True]))
        else:
            new = data.draw(JSON_VALUE)
        parent[key] = new
        desc = f"set {'/'.join(map(str, path))} = {json.dumps(new, default=str)[:60]}"
    return obj, desc, path, op


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def mutate_manifest(data, d: Path) -> tuple[str, bool]:
    p = d / "manifest.json"
    try:
        m = json.loads(p.read_bytes().decode("utf-8"))
        assert isinstance(m, dict)
    except (ValueError, AssertionError):  # already broken by an earlier mutation: bytes only
        m = None
    if m is None or data.draw(st.integers(0, 9)) == 0:  # raw bytes
        raw = bytearray(p.read_bytes()) or bytearray(b"{")
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
        p.write_bytes(bytes(raw))
        return f"manifest byte {i}", False
    new, desc, path, op = mutate_json(data, m)
    p.write_text(json.dumps(new, allow_nan=True))
    return f"manifest: {desc}", op == "add" or path[0] in NEUTRAL_MANIFEST


def mutate_records(data, d: Path) -> tuple[str, bool]:
    p = d / "records.jsonl"
    lines = p.read_bytes().decode("utf-8", "replace").splitlines()
    op = data.draw(st.sampled_from(["json", "json", "json", "truncate", "duplicate", "drop", "swap", "garbage",
                                    "tokens"]))
    i = data.draw(st.integers(0, max(len(lines) - 1, 0)))
    try:
        rec = json.loads(lines[i])
        assert isinstance(rec, dict)
    except (ValueError, AssertionError, IndexError):
        rec = None
        op = "garbage" if op in ("json", "tokens") else op
    if not lines:
        p.write_text(data.draw(st.text(max_size=20)))
        return "records: garbage in an empty file", False
    if op == "json":
        new, desc, _, op = mutate_json(data, rec)
        lines[i] = json.dumps(new, allow_nan=True)
        p.write_text("\n".join(lines) + "\n")
        return f"record {i}: {desc}", op == "add"
    if op == "tokens":  # an in-range token changed: valid data, another result
        r = rec
        if isinstance(r.get("generated_token_ids"), list) and r["generated_token_ids"]:
            j = data.draw(st.integers(0, len(r["generated_token_ids"]) - 1))
            r["generated_token_ids"][j] = data.draw(st.integers(0, V - 1))
        lines[i] = json.dumps(r)
    elif op == "truncate":
        lines[i] = lines[i][: data.draw(st.integers(0, max(len(lines[i]) - 1, 0)))]
    elif op == "duplicate":
        lines.insert(i, lines[i])
    elif op == "drop":
        del lines[i]
    elif op == "swap":
        j = data.draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
        p.write_text("\n".join(lines) + "\n")
        return f"records: swap lines {i} and {j}", True  # readers match by id
    else:
        lines.insert(i, data.draw(st.text(max_size=20)))
    p.write_text("\n".join(lines) + ("\n" if data.draw(st.booleans()) else ""))
    return f"records: {op} line {i}", False


def mutate_shard_header(data, d: Path) -> tuple[str, bool]:
    shards = sorted(d.glob("shard-*.safetensors"))
    p = data.draw(st.sampled_from(shards))
    raw = p.read_bytes()
    if len(raw) < 9:
        p.write_bytes(raw + b"\0" * data.draw(st.integers(0, 16)))
        return f"{p.name}: padded a stub", False
    (n,) = struct.unpack("<Q", raw[:8])
    op = data.draw(st.sampled_from(["byte", "length", "truncate", "json", "extend"]))
    try:
        header = json.loads(raw[8:8 + n]) if n <= len(raw) - 8 else None
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        header = None
        op = "truncate" if op == "json" else op
    n = min(n, len(raw) - 8)
    if op == "byte":
        i = data.draw(st.integers(0, 8 + max(n, 1) - 1))
        b = bytearray(raw)
        b[i] = data.draw(st.integers(0, 255))
        p.write_bytes(bytes(b))
        return f"{p.name}: header byte {i}", False
    if op == "length":
        length = data.draw(st.sampled_from([0, 1, n - 1, n + 8, len(raw), 2**63, 2**64 - 1]))
        p.write_bytes(struct.pack("<Q", min(max(length, 0), 2**64 - 1)) + raw[8:])
        return f"{p.name}: header length", False
    if op == "truncate":
        p.write_bytes(raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))])
        return f"{p.name}: truncated", False
    if op == "extend":
        p.write_bytes(raw + b"\0" * data.draw(st.integers(1, 64)))
        return f"{p.name}: extended", False
    new, desc, _, _ = mutate_json(data, header)
    h = json.dumps(new, allow_nan=True).encode()
    h += b" " * (-len(h) % 8)
    p.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    return f"{p.name} header: {desc}", False


def mutate_topk(data, d: Path) -> tuple[str, bool]:
    """Overwrite top-K entries in place (header intact)."""
    from logitparity._shards import ShardError, read_header

    shards = sorted(d.glob("shard-*.safetensors"))
    p = data.draw(st.sampled_from(shards))
    try:
        header = read_header(p)
    except ShardError:
        return f"{p.name}: already broken", False
    keys = sorted(k for k in header if not k.endswith("logits") and header[k][0] is not None)
    if not keys:
        return "no top-K tensor", True
    key = data.draw(st.sampled_from(keys))
    dtype, shape, start, end, _ = header[key]
    arr = np.frombuffer(bytearray(p.read_bytes()), dtype=np.uint8)
    view = arr[start:end].view(dtype).reshape(shape)
    flat = view.reshape(-1)
    if flat.size == 0:
        return "empty tensor", True
    j = data.draw(st.integers(0, flat.size - 1))
    if np.issubdtype(dtype, np.integer):
        flat[j] = data.draw(st.sampled_from([-1, 0, V - 1, V, 2**31 - 1, int(flat[(j + 1) % flat.size])]))
    else:
        flat[j] = data.draw(st.one_of(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 2.0, 1e30, -1e30]),
                                      st.floats(-50, 50), st.just(float(flat[(j + 1) % flat.size]))))
    p.write_bytes(arr.tobytes())
    return f"{p.name}: {key}[{j}]", False


def mutate_policy(data, path: Path) -> tuple[str, bool]:
    lines = path.read_text().splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    op = data.draw(st.sampled_from(["value", "drop", "dup", "text"]))
    if op == "value" and "=" in lines[i]:
        key = lines[i].split("=")[0]
        val = data.draw(st.sampled_from(['-1', '0', '1e309', 'nan', 'inf', '"x"', '[1]', 'true', '"<="', '">="',
                                         '"=="', '"kl"', '"greedy_match@0"', '"kl_ref_cand.p101"', '1e-300']))
        lines[i] = f"{key}= {val}"
    elif op == "drop":
        del lines[i]
    elif op == "dup":
        lines.insert(i, lines[i])
    else:
        lines[i] = data.draw(st.text(max_size=20))
    path.write_text("\n".join(lines) + "\n")
    return f"policy line {i}: {op}", False


TARGETS = ("manifest", "records", "header", "topk", "policy")


def run_one(data, base: dict[str, Path], baselines: dict[str, tuple], counts: dict[str, int]) -> None:
    tag = data.draw(st.sampled_from(["full", "topk"]))
    work = Path(tempfile.mkdtemp(prefix="lp-fuzz-"))
    try:
        ref, cand = work / "ref", work / "cand"
        shutil.copytree(base[f"{tag}-ref"], ref)
        shutil.copytree(base[f"{tag}-cand"], cand)
        policy = work / "policy.toml"
        shutil.copy(base["policy"], policy)
        done = []
        neutral = True
        for _ in range(data.draw(st.integers(1, 3))):
            target = data.draw(st.sampled_from(TARGETS if tag == "topk" else TARGETS[:3] + TARGETS[4:]))
            side = data.draw(st.sampled_from([ref, cand]))
            fn = {"manifest": mutate_manifest, "records": mutate_records, "header": mutate_shard_header,
                  "topk": mutate_topk, "policy": lambda dd, _d: mutate_policy(dd, policy)}[target]
            desc, is_neutral = fn(data, side)
            done.append(f"{side.name}: {desc}")
            neutral &= is_neutral
        note = " | ".join(done)
        found = {d.name: validate_dump(d) for d in (ref, cand)}  # must never raise
        for v in (x for f in found.values() for x in f):
            assert v.field and v.expected is not None and v.found is not None, note
        try:
            comp = compare_dumps(ref, cand, policy=policy, decode=None)
        except CLEAN as e:
            assert str(e).strip(), f"an error without a message: {type(e).__name__} after {note}"
            counts["clean error"] += 1
            return
        errors = [v for f in found.values() for v in f if v.level == "error"]
        assert not errors, f"compare accepted what validate calls an error: {errors[0]} after {note}"
        comp.to_markdown()
        json.dumps(comp.to_dict(), allow_nan=False)
        if neutral:
            assert same(summary(comp), baselines[tag]), f"a neutral mutation changed the result: {note}"
            counts["same result"] += 1
        else:
            counts["accepted (valid data)"] += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_test(base: dict[str, Path], counts: dict[str, int], examples: int, seed: int | None, derandomize: bool):
    baselines = {}
    for tag in ("full", "topk"):
        baselines[tag] = summary(compare_dumps(base[f"{tag}-ref"], base[f"{tag}-cand"], policy=base["policy"],
                                               decode=None))

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.data())
    def fuzz(data):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            run_one(data, base, baselines, counts)

    if seed is not None:
        from hypothesis import seed as hseed

        fuzz = hseed(seed)(fuzz)
    return fuzz


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=10000, help="mutated inputs to try (default 10000)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="lp-fuzz-base-"))
    counts = {"clean error": 0, "same result": 0, "accepted (valid data)": 0}
    t0 = time.perf_counter()
    try:
        base = build(root)
        make_test(base, counts, args.examples, args.seed, derandomize=False)()
    except Exception:  # noqa: BLE001 - a failure: print it, exit 1
        traceback.print_exc()
        print(f"FAILED after {sum(counts.values())} clean examples: {counts}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = sum(counts.values())
    print(f"{total} mutated inputs in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()) + "; no traceback, no wrong result")
    return 0


if __name__ == "__main__":
    sys.exit(main())
