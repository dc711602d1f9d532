"""The dump format: writer/reader round trip, streaming, resume, and every
reader and writer error. References: numpy float64 and torch dtype casts."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest
import torch

from logitparity.dump import (
    FORMAT,
    VERSION,
    DumpWriter,
    bf16_to_float32,
    load_dump,
    parse_storage,
    text_sha256,
)

VOCAB = 50
MANIFEST = {"engine": {"name": "test", "version": "0"}, "model": {"name": "m"}, "tokenizer": {"vocab_size": VOCAB},
            "dtype": "fp32", "device": "cpu", "decoding": {"mode": "greedy"}}


def record(i: int, n: int) -> dict:
    return {"id": f"p{i}", "category": "cat" if i % 2 else "json", "prompt": f"prompt {i} ✓",
            "chat_template": bool(i % 2), "prompt_token_ids": [1, 2, i], "generated_token_ids": list(range(n)),
            "stop_reason": ("eos", "max_new_tokens", "stop_token")[i % 3], "timing": {"ttft_s": 0.5 * i, "decode_tokens_per_s": None}}


def logits(i: int, n: int) -> np.ndarray:
    return (np.random.default_rng(i).standard_normal((n, VOCAB)) * 8).astype(np.float32)


def test_text_sha256_hashes_the_utf8_bytes():
    # the empty string's SHA-256 (FIPS 180-2), and "é日本" spelled as its UTF-8 bytes
    assert text_sha256("") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    want = hashlib.sha256(bytes.fromhex("c3a9e697a5e69cac")).hexdigest()
    assert text_sha256("\u00e9\u65e5\u672c") == f"sha256:{want}"


def write(path, sizes=(3, 0, 5, 1), **kw):
    with DumpWriter(path, MANIFEST, **kw) as w:
        for i, n in enumerate(sizes):
            w.add(record(i, n), logits(i, n))
    return path


TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_round_trip_every_field(tmp_path, dtype):
    sizes = (3, 0, 5, 1)
    d = load_dump(write(tmp_path / "d", sizes, logits_dtype=dtype))
    assert d.manifest["format"] == FORMAT and d.manifest["version"] == VERSION
    assert d.manifest["complete"] is True
    for key, value in MANIFEST.items():
        assert d.manifest[key] == value
    assert d.manifest["logits"] == {"storage": "full", "dtype": dtype, "vocab_size": VOCAB, "lse_dtype": None}
    assert (d.storage, d.logits_dtype, d.vocab_size, len(d)) == ("full", dtype, VOCAB, 4)
    assert d.ids == ["p0", "p1", "p2", "p3"]
    for i, n in enumerate(sizes):
        r = d.record(f"p{i}")
        for key, value in record(i, n).items():
            assert r[key] == value, key
        assert r["n_positions"] == n and r["shard"] == "shard-00000.safetensors"
        want = torch.from_numpy(logits(i, n)).to(TORCH[dtype])
        got = d.logits(f"p{i}")
        assert got.shape == (n, VOCAB)
        if dtype == "bf16":
            assert got.dtype == np.uint16
            np.testing.assert_array_equal(got, want.view(torch.int16).numpy().view(np.uint16))
        else:
            np.testing.assert_array_equal(got, want.numpy())
        np.testing.assert_array_equal(d.logits(f"p{i}", as_float32=True), want.float().numpy())


def test_logits_are_memory_mapped_read_only(tmp_path):
    d = load_dump(write(tmp_path / "d"))
    x = d.logits("p0")
    assert isinstance(x.base, np.memmap) or isinstance(x, np.memmap)
    with pytest.raises(ValueError, match="read-only"):
        x[0, 0] = 1.0


def test_torch_input_any_float_dtype(tmp_path):
    src = torch.from_numpy(logits(0, 4)).to(torch.bfloat16)
    with DumpWriter(tmp_path / "d", MANIFEST, logits_dtype="fp32") as w:
        w.add(record(0, 4), src)
    np.testing.assert_array_equal(load_dump(tmp_path / "d").logits("p0"), src.float().numpy())


def test_bf16_rounding_matches_torch_on_special_values(tmp_path):
    special = np.array([[0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -3.4e38, np.inf, -np.inf, np.nan,
                         1e-40, -7.5, 65504.0, 2.0**-133, 0.1]], dtype=np.float32)
    with DumpWriter(tmp_path / "d", MANIFEST, logits_dtype="bf16") as w:
        w.add(record(0, 1), special)
    got = load_dump(tmp_path / "d").logits("p0", as_float32=True)
    want = torch.from_numpy(special).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(got, want)  # NaN == NaN under assert_array_equal
    np.testing.assert_array_equal(bf16_to_float32(np.array([0x3F80, 0xC000], np.uint16)), [1.0, -2.0])


def test_shards_roll_over_at_the_byte_bound(tmp_path):
    sizes = (4, 4, 4, 4, 4)
    one = 4 * VOCAB * 4
    d = load_dump(write(tmp_path / "d", sizes, shard_bytes=2 * one))
    shards = sorted(p.name for p in (tmp_path / "d").glob("shard-*"))
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert [r["shard"] for r in d.records] == [shards[0]] * 2 + [shards[1]] * 2 + [shards[2]]
    for i in range(5):
        np.testing.assert_array_equal(d.logits(f"p{i}"), logits(i, 4))
    assert not list((tmp_path / "d").glob("*.tmp"))


def test_pending_prompts_are_written_at_the_time_bound(tmp_path):
    w = DumpWriter(tmp_path / "d", MANIFEST, flush_seconds=0.0)
    w.add(record(0, 2), logits(0, 2))  # written at once: nothing waits
    assert len(load_dump(tmp_path / "d")) == 1
    w.close()


def test_an_exception_keeps_finished_prompts_and_marks_incomplete(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with DumpWriter(tmp_path / "d", MANIFEST) as w:
            w.add(record(0, 2), logits(0, 2))
            raise KeyboardInterrupt
    d = load_dump(tmp_path / "d")
    assert d.ids == ["p0"] and d.manifest["complete"] is False


def test_empty_dump_is_valid_before_any_shard(tmp_path):
    w = DumpWriter(tmp_path / "d", MANIFEST)
    d = load_dump(tmp_path / "d")
    assert len(d) == 0 and d.vocab_size is None and d.manifest["complete"] is False
    w.close()


def test_resume_cleans_up_and_continues(tmp_path):
    path = write(tmp_path / "d", (2, 2), shard_bytes=1)  # one shard per prompt
    # Simulate a kill: the manifest says incomplete, a half-written shard,
    # a renamed shard whose records never made it, a half-written line.
    m = json.loads((path / "manifest.json").read_text())
    m["complete"] = False
    (path / "manifest.json").write_text(json.dumps(m))
    (path / "shard-00002.safetensors.tmp").write_bytes(b"partial")
    (path / "shard-00002.safetensors").write_bytes((path / "shard-00001.safetensors").read_bytes())
    with open(path / "records.jsonl", "a") as f:
        f.write('{"id": "p2", "categ')
    with pytest.raises(ValueError, match=r"records.jsonl \[record line 3\]: line end: .*without .*--resume"):
        load_dump(path)
    with DumpWriter(path, MANIFEST, shard_bytes=1, resume=True) as w:
        assert w.done_ids == {"p0", "p1"}
        assert not (path / "shard-00002.safetensors").exists()
        assert not list(path.glob("*.tmp"))
        w.add(record(2, 3), logits(2, 3))
    d = load_dump(path)
    assert d.ids == ["p0", "p1", "p2"] and d.manifest["complete"] is True
    assert d.record("p2")["shard"] == "shard-00002.safetensors"
    assert d.record("p2")["tensors"] == {"logits": "000002/logits"}
    np.testing.assert_array_equal(d.logits("p2"), logits(2, 3))
    np.testing.assert_array_equal(d.logits("p0"), logits(0, 2))


def test_resume_with_other_settings_is_an_error(tmp_path):
    path = write(tmp_path / "d")
    other = {**MANIFEST, "decoding": {"mode": "sample"}}
    with pytest.raises(ValueError, match="cannot resume .*'decoding' differs"):
        DumpWriter(path, other, resume=True)
    with pytest.raises(ValueError, match="cannot resume .*'logits' differs"):
        DumpWriter(path, MANIFEST, logits_dtype="fp16", resume=True)


def test_existing_dump_without_resume_is_an_error(tmp_path):
    path = write(tmp_path / "d")
    with pytest.raises(ValueError, match="already holds a dump; pass resume=True"):
        DumpWriter(path, MANIFEST)


def test_non_empty_directory_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is not empty and holds no dump"):
        DumpWriter(tmp_path, MANIFEST)


# --- top-K storage -----------------------------------------------------------------------

def test_topk_round_trip_against_float64_reference(tmp_path):
    x = logits(7, 6)
    x[0, :] = 1.0  # all tied: indices 0..K-1
    x[1, 5] = -np.inf  # a masked token
    x[2, :4] = 30.0  # a tie at the top
    rec = record(7, 6)
    k = 8
    with DumpWriter(tmp_path / "d", MANIFEST, storage=f"topk:{k}") as w:
        w.add(rec, x)
        w.add(record(8, 0), logits(8, 0))
    d = load_dump(tmp_path / "d")
    assert d.storage == "topk:8" and d.k == 8 and d.manifest["logits"]["lse_dtype"] == "float64"
    values, indices, lse, tail = d.topk("p7")
    assert values.dtype == np.float32 and indices.dtype == np.int32
    assert lse.dtype == np.float64 and tail.dtype == np.float64
    x64 = x.astype(np.float64)
    order = np.argsort(-x64, axis=1, kind="stable")[:, :k]  # descending, ties to the lower index
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_array_equal(values, np.take_along_axis(x, order, 1))
    m = x64.max(axis=1, keepdims=True)
    want_lse = (m + np.log(np.exp(x64 - m).sum(axis=1, keepdims=True)))[:, 0]
    np.testing.assert_allclose(lse, want_lse, rtol=1e-14)
    p = np.exp(x64 - want_lse[:, None])
    mask = np.ones_like(p, dtype=bool)
    np.put_along_axis(mask, order, False, 1)
    np.testing.assert_allclose(tail, (p * mask).sum(axis=1), atol=1e-12)
    assert [t.shape for t in d.topk("p8")] == [(0, 8), (0, 8), (0,), (0,)]


def test_topk_nonfinite_rows(tmp_path):
    x = logits(9, 3)
    x[0, :] = -np.inf  # every token masked
    x[1, 3] = np.nan
    x[2, 7] = np.inf
    with DumpWriter(tmp_path / "d", MANIFEST, storage="topk:4") as w:
        w.add(record(9, 3), x)
    _, _, lse, tail = load_dump(tmp_path / "d").topk("p9")
    assert lse[0] == -np.inf and np.isnan(lse[1]) and np.isnan(lse[2])
    assert np.isnan(tail).all()


def test_topk_k_above_vocab_is_an_error(tmp_path):
    with DumpWriter(tmp_path / "d", MANIFEST, storage=f"topk:{VOCAB + 1}") as w:
        with pytest.raises(ValueError, match="topk:51 exceeds the vocab size 50"):
            w.add(record(0, 1), logits(0, 1))


def test_topk_dump_has_no_full_rows_and_full_dump_no_topk(tmp_path):
    with DumpWriter(tmp_path / "t", MANIFEST, storage="topk:4") as w:
        w.add(record(0, 1), logits(0, 1))
    with pytest.raises(ValueError, match=r"stores topk:4 logits, not full rows; use .topk\('p0'\)"):
        load_dump(tmp_path / "t").logits("p0")
    with pytest.raises(ValueError, match=r"stores full logits; use .logits\('p0'\)"):
        load_dump(write(tmp_path / "f")).topk("p0")


# --- writer errors -----------------------------------------------------------------------

@pytest.mark.parametrize("storage", ["top5", "topk:0", "topk:", "fp32"])
def test_bad_storage(tmp_path, storage):
    with pytest.raises(ValueError, match="logits storage must be 'full' or 'topk:K'"):
        DumpWriter(tmp_path / "d", MANIFEST, storage=storage)
    assert parse_storage("topk:64") == 64 and parse_storage("full") is None


def test_bad_logits_dtype(tmp_path):
    with pytest.raises(ValueError, match="logits_dtype must be one of"):
        DumpWriter(tmp_path / "d", MANIFEST, logits_dtype="fp8")
    with pytest.raises(ValueError, match="applies to full storage only"):
        DumpWriter(tmp_path / "e", MANIFEST, storage="topk:4", logits_dtype="bf16")


def test_bad_shard_bytes(tmp_path):
    with pytest.raises(ValueError, match="shard_bytes must be a positive int"):
        DumpWriter(tmp_path / "d", MANIFEST, shard_bytes=0)


def test_reserved_manifest_keys(tmp_path):
    with pytest.raises(ValueError, match=r"manifest keys \['format'\] are set by the writer"):
        DumpWriter(tmp_path / "d", {**MANIFEST, "format": "x"})


@pytest.fixture
def writer(tmp_path):
    w = DumpWriter(tmp_path / "d", MANIFEST)
    yield w
    w.close()


def test_rows_must_match_generated_tokens(writer):
    with pytest.raises(ValueError, match=r"must be \[n_positions, vocab\] with n_positions = len\(generated_token_ids\) = 3, got shape \(2, 50\)"):
        writer.add(record(0, 3), logits(0, 2))


def test_vocab_must_not_change(writer):
    writer.add(record(0, 1), logits(0, 1))
    with pytest.raises(ValueError, match="have vocab 49, the dump's rows have 50"):
        writer.add(record(1, 1), logits(1, 1)[:, :49])


def test_duplicate_id(writer):
    writer.add(record(0, 1), logits(0, 1))
    with pytest.raises(ValueError, match="prompt id 'p0' is already in"):
        writer.add(record(0, 1), logits(0, 1))


def test_missing_record_field(writer):
    r = record(0, 1)
    del r["stop_reason"], r["category"]
    with pytest.raises(ValueError, match="record lacks category, stop_reason"):
        writer.add(r, logits(0, 1))


def test_bad_stop_reason(writer):
    with pytest.raises(ValueError, match="stop_reason must be one of"):
        writer.add({**record(0, 1), "stop_reason": "length"}, logits(0, 1))


def test_bad_id(writer):
    with pytest.raises(ValueError, match="record id must be a non-empty string"):
        writer.add({**record(0, 1), "id": 3}, logits(0, 1))


def test_integer_logits(writer):
    with pytest.raises(TypeError, match="logits must be float32/float16/float64"):
        writer.add(record(0, 1), np.zeros((1, VOCAB), np.int32))


def test_fp16_overflow_is_an_error(tmp_path):
    with DumpWriter(tmp_path / "d", MANIFEST, logits_dtype="fp16") as w:
        with pytest.raises(ValueError, match="exceed the fp16 range.*logits_dtype='fp32' or 'bf16'"):
            w.add(record(0, 1), np.full((1, VOCAB), 1e5, np.float32))


def test_closed_writer(tmp_path):
    w = DumpWriter(tmp_path / "d", MANIFEST)
    w.close()
    with pytest.raises(ValueError, match="DumpWriter is closed"):
        w.add(record(0, 1), logits(0, 1))


# --- reader errors -----------------------------------------------------------------------

@pytest.fixture
def dump(tmp_path):
    return write(tmp_path / "d", (2, 3), shard_bytes=1)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dump directory"):
        load_dump(tmp_path / "nope")


def test_missing_manifest(dump):
    (dump / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"dump manifest .*manifest.json does not exist; is .* a dump directory written by `logitparity dump`"):
        load_dump(dump)


def test_manifest_not_json(dump):
    (dump / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"dump manifest .*manifest.json is not valid JSON \(Expecting"):
        load_dump(dump)


def _edit_manifest(dump, **changes):
    m = json.loads((dump / "manifest.json").read_text())
    m.update(changes)
    (dump / "manifest.json").write_text(json.dumps(m))


def test_unknown_format_tag(dump):
    _edit_manifest(dump, format="llama-logits")
    with pytest.raises(ValueError, match="manifest.json: expected format 'logitparity-dump', found format 'llama-logits'; is"):
        load_dump(dump)


def test_newer_major_version(dump):
    _edit_manifest(dump, version="2.0")
    with pytest.raises(ValueError, match="version 2.0 is newer than this logitparity reads.*upgrade"):
        load_dump(dump)


def test_newer_minor_version_is_read(dump):
    _edit_manifest(dump, version="1.7")
    assert len(load_dump(dump)) == 2


def test_bad_version_string(dump):
    _edit_manifest(dump, version="one")
    with pytest.raises(ValueError, match="'version' must look like '1.0'"):
        load_dump(dump)


def test_missing_logits_section(dump):
    m = json.loads((dump / "manifest.json").read_text())
    del m["logits"]
    (dump / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest.json: logits: expected an object with storage, dtype, vocab_size, found nothing"):
        load_dump(dump)


def test_missing_records(dump):
    (dump / "records.jsonl").unlink()
    with pytest.raises(ValueError, match=r"records.jsonl: file: expected records.jsonl .*found no file; the dump is incomplete"):
        load_dump(dump)


def test_record_lacking_fields(dump):
    lines = (dump / "records.jsonl").read_text().splitlines()
    r = json.loads(lines[1])
    del r["shard"]
    (dump / "records.jsonl").write_text(lines[0] + "\n" + json.dumps(r) + "\n")
    with pytest.raises(ValueError, match=r"records.jsonl \[record 'p1' \(line 2\)\]: shard: .*found nothing \(the record lacks it\)"):
        load_dump(dump)


def test_duplicate_record_id(dump):
    first = (dump / "records.jsonl").read_text().splitlines()[0]
    (dump / "records.jsonl").write_text(first + "\n" + first + "\n")
    with pytest.raises(ValueError, match=r"line 2\)\]: id: expected unique ids, found duplicate prompt id 'p0' \(first on line 1\)"):
        load_dump(dump)


def test_missing_shard(dump):
    (dump / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match=r"shard-00001.safetensors \[record p1\]: file: expected a shard named by records.jsonl, found no file; re-run the capture with --resume"):
        load_dump(dump)


def test_truncated_shard(dump):
    p = dump / "shard-00001.safetensors"
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"shard-00001.safetensors \[record p1\]: size: expected 744 bytes .*found 737 bytes \(truncated or corrupt shard\); re-run the capture with --resume"):
        load_dump(dump)


def test_shard_shorter_than_its_header(dump):
    p = dump / "shard-00001.safetensors"
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"shard-00001.safetensors \[record p1\]: header: expected a header length within the file"):
        load_dump(dump)


def test_empty_shard_file(dump):
    (dump / "shard-00000.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"shard-00000.safetensors \[record p0\]: header: expected an 8-byte header length, found a truncated shard \(0 bytes\)"):
        load_dump(dump)


def test_corrupt_shard_header(dump):
    p = dump / "shard-00000.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    p.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n:])
    with pytest.raises(ValueError, match=r"shard-00000.safetensors \[record p0\]: header: expected a JSON object, found unparsable bytes"):
        load_dump(dump)


def test_record_points_at_missing_tensor(dump):
    lines = (dump / "records.jsonl").read_text().splitlines()
    r = json.loads(lines[0])
    r["tensors"]["logits"] = "000009/logits"
    (dump / "records.jsonl").write_text(json.dumps(r) + "\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"shard-00000.safetensors \[record p0\]: tensors.logits: expected tensor '000009/logits' in shard-00000.safetensors, found no such tensor"):
        load_dump(dump)


def test_record_names_a_bad_shard(dump):
    lines = (dump / "records.jsonl").read_text().splitlines()
    r = json.loads(lines[0])
    r["shard"] = "../elsewhere.bin"
    (dump / "records.jsonl").write_text(json.dumps(r) + "\n")
    with pytest.raises(ValueError, match=r"shard: expected \"shard-NNNNN.safetensors\" \(5 digits\), found \"../elsewhere.bin\""):
        load_dump(dump)


def test_record_positions_disagree_with_tensor(dump):
    lines = (dump / "records.jsonl").read_text().splitlines()
    r = json.loads(lines[0])
    r["n_positions"] = 5
    r["generated_token_ids"] = [0, 1, 2, 3, 4]
    (dump / "records.jsonl").write_text(json.dumps(r) + "\n")
    with pytest.raises(ValueError, match=r"\[record p0\]: 000000/logits shape: expected \[5, 50\] = \[n_positions, logits.vocab_size\], found \[2, 50\]"):
        load_dump(dump)


def test_unknown_prompt_id(dump):
    with pytest.raises(KeyError, match="no prompt 'zz' in dump"):
        load_dump(dump).record("zz")


def test_readable_without_this_package(dump):
    """The format is plain JSON + safetensors: read it with safetensors alone."""
    from safetensors.numpy import load_file

    m = json.loads((dump / "manifest.json").read_text())
    recs = [json.loads(line) for line in (dump / "records.jsonl").read_text().splitlines()]
    t = load_file(os.fspath(dump / recs[1]["shard"]))
    np.testing.assert_array_equal(t[recs[1]["tensors"]["logits"]], logits(1, 3))
    assert m["logits"]["vocab_size"] == VOCAB


def test_header_numbers_of_the_wrong_kind_are_clean_errors(dump):
    """Found by benchmarks/fuzz_dumps.py: a shape of 1e999 raised OverflowError."""
    p = dump / "shard-00000.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].replace(b'"shape":[2,50]', b'"shape":[2,1e999]')
    assert header != raw[8:8 + n]
    header += b" " * (n - len(header)) if len(header) < n else b""
    p.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    with pytest.raises(ValueError, match=r"header entry '000000/logits': expected dtype, shape and data_offsets"):
        load_dump(dump)
