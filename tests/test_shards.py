"""logitparity._shards: the one safetensors shard writer and reader behind
dumps, baseline caches and activations. One test per reader message; the
same corruption through each of the three users; the safetensors library
itself as the independent reference for the format."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from logitparity._shards import RECAPTURE, ShardError, ShardReader, read_header, write_shard

FMT = dict(format="logitparity-test", version="1.0")
FIX = "write it again"


def _shard(tmp_path, name="s.safetensors", **extra):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int64),
               "c": np.array([1, 2], np.uint16), **extra}
    p = tmp_path / name
    write_shard(p, tensors, **FMT)
    return p


def _parts(p):
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def _rewrite(p, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _read(p):
    return ShardReader(p, fix=FIX, what="a test shard")


# ------------------------------------------------------------------ the reader, one test per message


def test_reads_back_what_was_written(tmp_path):
    f = _read(_shard(tmp_path))
    np.testing.assert_array_equal(f.tensor("a", dtype="F32", shape=(2, 3)), np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(f.tensor("b", dtype=("I32", "I64"), shape=(None,)), np.arange(4))
    assert f.tensor("c").dtype == np.uint16 and sorted(f.keys()) == ["a", "b", "c"]
    assert f.metadata == {"format": "logitparity-test", "version": "1.0"}
    view = f.tensor("a")
    assert not view.flags.writeable  # a read-only view of the mapped file
    with pytest.raises(ValueError):
        view[0, 0] = 1.0


def test_missing_file(tmp_path):
    with pytest.raises(ShardError, match=r"nope.safetensors: file: expected a test shard, found no file; write it again$"):
        _read(tmp_path / "nope.safetensors")


def test_directory(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(ShardError, match=r"d.safetensors: file: expected a safetensors file, found a directory; write"):
        _read(tmp_path / "d.safetensors")


def test_truncated_below_the_header_length(tmp_path):
    p = tmp_path / "s.safetensors"
    p.write_bytes(b"\x10\x00\x00")
    with pytest.raises(ShardError, match=r"header: expected an 8-byte header length, found a truncated shard \(3 bytes\); write"):
        _read(p)


def test_header_length_past_the_end(tmp_path):
    p = _shard(tmp_path)
    size = p.stat().st_size
    p.write_bytes(struct.pack("<Q", size) + p.read_bytes()[8:])
    with pytest.raises(ShardError, match=rf"header: expected a header length within the file \({size - 8} bytes at most\), "
                                         rf"found {size} bytes \(corrupt or truncated shard\); write it again$"):
        _read(p)


def test_header_not_json(tmp_path):
    p = _shard(tmp_path)
    raw = bytearray(p.read_bytes())
    raw[8] = ord("#")
    p.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"header: expected a JSON object, found unparsable bytes \(corrupt shard header: "):
        _read(p)


def test_header_not_an_object(tmp_path):
    p = tmp_path / "s.safetensors"
    _rewrite(p, [1, 2], b"")
    with pytest.raises(ShardError, match=r"header: expected a JSON object, found list; write it again$"):
        _read(p)


def test_entry_without_its_fields(tmp_path):
    p = _shard(tmp_path)
    _, header, data = _parts(p)
    del header["b"]["data_offsets"]
    _rewrite(p, header, data)
    with pytest.raises(ShardError, match=r"header entry 'b': expected dtype, shape and data_offsets, found "
                                         r"\{\"dtype\": \"I64\", \"shape\": \[4\]\}; write"):
        _read(p)


def test_offsets_not_spanning_the_shape(tmp_path):
    p = _shard(tmp_path)
    _, header, data = _parts(p)
    start = header["a"]["data_offsets"][0]
    header["a"]["data_offsets"] = [start, start + 20]  # [2, 3] F32 is 24 bytes
    _rewrite(p, header, data)
    with pytest.raises(ShardError, match=rf"header entry 'a': expected data_offsets spanning shape \[2, 3\] of F32, "
                                         rf"found {start}..{start + 20}; write"):
        _read(p)


def test_offsets_out_of_range(tmp_path):
    p = _shard(tmp_path)
    n, header, data = _parts(p)
    start, end = header["b"]["data_offsets"]
    header["b"]["data_offsets"] = [len(data) + 64, len(data) + 64 + end - start]  # past the end of the file
    _rewrite(p, header, data)
    with pytest.raises(ShardError, match=r"size: expected \d+ bytes \(as its header says\), found \d+ bytes "
                                         r"\(truncated or corrupt shard\); write it again$"):
        _read(p)


def test_overlapping_tensors(tmp_path):
    p = _shard(tmp_path)
    _, header, data = _parts(p)
    header["c"]["data_offsets"] = [header["a"]["data_offsets"][0], header["a"]["data_offsets"][0] + 4]
    _rewrite(p, header, data)
    with pytest.raises(ShardError, match=r"header entry '(a|c)': expected byte ranges that do not overlap another "
                                         r"tensor's, found \d+..\d+; write"):
        _read(p)


def test_truncated_data(tmp_path):
    p = _shard(tmp_path)
    size = p.stat().st_size
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(ShardError, match=rf"size: expected {size} bytes \(as its header says\), found {size - 3} bytes "
                                         r"\(truncated or corrupt shard\); write it again$"):
        _read(p)


def test_missing_key(tmp_path):
    with pytest.raises(ShardError, match=r"tensor 'z': expected a tensor of that name, found no such tensor in the "
                                         r"shard \(it holds 'a', 'b', 'c'\); write it again$"):
        _read(_shard(tmp_path)).tensor("z")


def test_wrong_dtype(tmp_path):
    with pytest.raises(ShardError, match=r"tensor 'b' dtype: expected F64 or F32, found I64; write it again$"):
        _read(_shard(tmp_path)).tensor("b", dtype=("F64", "F32"))


def test_wrong_shape(tmp_path):
    with pytest.raises(ShardError, match=r"tensor 'a' shape: expected \[3, any\], found \[2, 3\]; write it again$"):
        _read(_shard(tmp_path)).tensor("a", shape=(3, None))
    with pytest.raises(ShardError, match=r"tensor 'a' shape: expected \[6\], found \[2, 3\]"):
        _read(_shard(tmp_path)).tensor("a", shape=(6,))


def test_a_dtype_this_package_does_not_read(tmp_path):
    p = _shard(tmp_path)
    _, header, data = _parts(p)
    header["c"]["dtype"] = "F8_E4M3"
    header["c"]["shape"] = [4]  # 4 one-byte elements: the offsets still match
    _rewrite(p, header, data)
    assert read_header(p)["c"].dtype is None  # listed, its offsets checked
    with pytest.raises(ShardError, match=r"tensor 'c' dtype: expected a dtype this logitparity reads, found F8_E4M3"):
        _read(p).tensor("c")


def test_empty_tensors_and_no_tensors(tmp_path):
    p = tmp_path / "e.safetensors"
    write_shard(p, {"z": np.zeros((0, 7), np.float32)}, **FMT)
    z = _read(p).tensor("z", shape=(0, 7))
    assert z.shape == (0, 7) and z.dtype == np.float32 and not z.flags.writeable
    write_shard(p, {}, **FMT)
    assert _read(p).keys() == []


# ------------------------------------------------------------------ the writer


def test_write_is_atomic_aligned_and_honours_the_umask(tmp_path):
    p = _shard(tmp_path, d=np.zeros(3, np.int8), e=np.zeros(1, np.float64))
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]  # no temporary left behind
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask
    h = read_header(p)
    base = 8 + struct.unpack("<Q", p.read_bytes()[:8])[0]
    assert base % 8 == 0
    for key, e in h.items():  # largest elements first: every tensor aligned to its element size
        assert (e.start - base) % np.dtype(e.dtype).itemsize == 0, key


def test_write_replaces_a_link_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    d = tmp_path / "d"
    d.mkdir()
    os.symlink(outside, d / "s.safetensors")
    write_shard(d / "s.safetensors", {"x": np.ones(2, np.float32)}, **FMT)
    assert outside.read_bytes() == b"keep" and not (d / "s.safetensors").is_symlink()


def test_write_errors(tmp_path):
    with pytest.raises(ValueError, match=r"tensor 'x': dtype complex64 cannot be written as safetensors dtype \(none\); "
                                         r"pass one of \["):
        write_shard(tmp_path / "s", {"x": np.zeros(2, np.complex64)}, **FMT)
    with pytest.raises(ValueError, match=r"tensor 'x': dtype float32 cannot be written as safetensors dtype BF16"):
        write_shard(tmp_path / "s", {"x": np.zeros(2, np.float32)}, dtypes={"x": "BF16"}, **FMT)
    with pytest.raises(ValueError, match=r"shard metadata values must be strings \(safetensors\), got 'n': 1"):
        write_shard(tmp_path / "s", {}, metadata={"n": 1}, **FMT)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ the safetensors library as the reference


ALL_DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8,
              np.uint64, np.uint32, np.uint16, np.uint8, np.bool_]


def _sample_tensors():
    """Every dtype both sides know, from arbitrary bit patterns (NaNs and
    infinities included), 1-D and 2-D; an empty tensor; a non-ASCII key."""
    rng = np.random.default_rng(0)
    out = {}
    for i, dt in enumerate(ALL_DTYPES):
        if dt is np.bool_:
            a = rng.integers(0, 2, size=(3, 5)).astype(bool)
        else:
            a = rng.integers(0, 256, size=16 * np.dtype(dt).itemsize, dtype=np.uint8).view(dt)
            a = a.reshape(4, 4) if i % 2 else a
        out[f"{i:02d}/{np.dtype(dt).name}"] = a
    out["empty"] = np.zeros((0, 3), np.float32)
    out["prompt ✓/model.layers.0"] = np.arange(4, dtype=np.float32)
    return out


def test_ours_read_by_the_safetensors_library_bitwise(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    tensors = _sample_tensors()
    p = tmp_path / "ours.safetensors"
    write_shard(p, tensors, metadata={"prompt ✓/model.layers.0": "bf16"}, **FMT)
    got = load_file(str(p))
    assert got.keys() == tensors.keys()
    for k, a in tensors.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape, k
        assert got[k].tobytes() == a.tobytes(), k
    with safe_open(str(p), framework="numpy") as f:
        assert f.metadata() == {"format": "logitparity-test", "version": "1.0", "prompt ✓/model.layers.0": "bf16"}


def test_the_safetensors_library_read_by_ours_bitwise(tmp_path):
    from safetensors.numpy import save_file

    tensors = _sample_tensors()
    p = tmp_path / "theirs.safetensors"
    save_file(tensors, str(p), metadata={"format": "x", "version": "2"})
    f = ShardReader(p)
    assert sorted(f.keys()) == sorted(tensors) and f.metadata == {"format": "x", "version": "2"}
    for k, a in tensors.items():
        b = f.tensor(k)
        assert b.dtype == a.dtype and b.shape == a.shape and b.tobytes() == a.tobytes(), k


def test_bf16_both_ways_as_uint16_bits(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    bits = np.array([0x3F80, 0x7FC1, 0xFF80, 0x0001, 0x8000], np.uint16)  # 1, NaN, -inf, subnormal, -0
    p = tmp_path / "ours.safetensors"
    write_shard(p, {"x": bits}, dtypes={"x": "BF16"}, **FMT)
    t = load_file(str(p))["x"]
    assert t.dtype == torch.bfloat16 and (t.view(torch.int16).numpy().view(np.uint16) == bits).all()
    q = tmp_path / "theirs.safetensors"
    save_file({"x": torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)}, str(q))
    got = ShardReader(q).tensor("x", dtype="BF16")
    assert got.dtype == np.uint16 and (got == bits).all()


# ------------------------------------------------------------------ one reader behind three users


def _dump_user(tmp_path):
    from logitparity.dump import DumpWriter, load_dump

    d = tmp_path / "dump"
    manifest = {"engine": {"name": "test", "version": "0"}, "model": {"name": "m"}, "tokenizer": {"vocab_size": 8},
                "dtype": "fp32", "device": "cpu", "decoding": {"mode": "greedy"}}
    with DumpWriter(d, manifest) as w:
        w.add({"id": "p0", "category": "c", "prompt": "x", "chat_template": False, "prompt_token_ids": [1],
               "generated_token_ids": [1, 2], "stop_reason": "eos"}, np.arange(16, dtype=np.float32).reshape(2, 8))
    return d / "shard-00000.safetensors", lambda: load_dump(d).logits("p0"), RECAPTURE


def _baseline_user(tmp_path):
    from logitparity.baseline_cache import BaselineCache, BaselineCacheWriter
    from logitparity.dump import text_sha256

    d = tmp_path / "cache"
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    with BaselineCacheWriter(d, storage="topk:4") as w:
        w.add(x, position=np.array([1, 2]), target=np.array([3, 4]), nll=np.array([0.5, 0.25]),
              lse=np.array([8.0, 16.0]), argmax=np.array([7, 7]))
        w.close({"text": {"sha256": text_sha256("t"), "name": "t"}, "settings": {}, "tokenizer": {}, "model": {}},
                np.arange(3))
    return d / "shard-00000.safetensors", lambda: BaselineCache(d).rows(0, 2), "recreate the cache with `logitparity ppl"


def _activations_user(tmp_path):
    from logitparity.activations import ActivationWriter, load_activations

    d = tmp_path / "dump"
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    w = ActivationWriter(d, ["model.layers.0"], storage="rows")
    w.add("p0", {"model.layers.0": (np.arange(12, dtype=np.float32).reshape(3, 4), False)})
    w.close()
    return (d / "activations" / "act-00000.safetensors", lambda: load_activations(d).rows("p0", "model.layers.0"),
            "recapture the activations with `logitparity dump --activations rows`")


def _truncate(p):
    size = p.stat().st_size
    p.write_bytes(p.read_bytes()[:-4])
    return rf"size: expected {size} bytes \(as its header says\), found {size - 4} bytes \(truncated or corrupt shard\)"


def _garble(p):
    raw = bytearray(p.read_bytes())
    raw[8] = ord("#")
    p.write_bytes(bytes(raw))
    return r"header: expected a JSON object, found unparsable bytes \(corrupt shard header: "


def _length(p):
    size = p.stat().st_size
    p.write_bytes(struct.pack("<Q", 10 * size) + p.read_bytes()[8:])
    return (rf"header: expected a header length within the file \({size - 8} bytes at most\), found {10 * size} "
            r"bytes \(corrupt or truncated shard\)")


def _entry(p):
    n, header, data = _parts(p)
    key = max(k for k in header if k != "__metadata__")
    del header[key]["data_offsets"]
    _rewrite(p, header, data)
    return rf"header entry '{key}': expected dtype, shape and data_offsets, found \{{"


@pytest.mark.parametrize("corrupt", [_truncate, _garble, _length, _entry], ids=["truncated", "not-json", "length",
                                                                                 "entry"])
@pytest.mark.parametrize("user", [_dump_user, _baseline_user, _activations_user], ids=["dump", "baseline-cache",
                                                                                      "activations"])
def test_the_same_corruption_reads_the_same_through_every_user(tmp_path, user, corrupt):
    """Dumps, baseline caches and activations share the reader: the same
    damage gives the same message (file, field, expected, found), each ending
    with its own fix. (A dump's tensor dtypes and shapes are checked by
    logitparity.validate, whose messages also say which manifest field
    decides them; the cache's and activations' by ShardReader, above.)"""
    shard, read, fix = user(tmp_path)
    read()  # sound before the damage
    match = corrupt(shard)
    with pytest.raises(ValueError, match=rf"{shard.name}( \[record p0\])?: (.*)?({match})") as e:
        read()
    assert fix in str(e.value)


def test_the_baseline_cache_checks_each_tensor_dtype(tmp_path):
    shard, read, _ = _baseline_user(tmp_path)
    n, header, data = _parts(shard)
    header["nll"]["dtype"] = "I64"  # same size: only the dtype is wrong
    _rewrite(shard, header, data)
    with pytest.raises(ShardError, match=r"shard-00000.safetensors: tensor 'nll' dtype: expected F64, found I64; "
                                         r"recreate the cache with `logitparity ppl"):
        read()


def test_activation_rows_are_checked_against_the_module_width(tmp_path):
    shard, read, _ = _activations_user(tmp_path)
    m = shard.parent / "activations.json"
    doc = json.loads(m.read_text())
    doc["modules"][0]["width"] = 5
    m.write_text(json.dumps(doc))
    with pytest.raises(ShardError, match=r"act-00000.safetensors: tensor 'p0/model.layers.0' shape: expected "
                                         r"\[any, 5\], found \[3, 4\]; recapture the activations"):
        read()
