"""logitparity.validate and `logitparity validate`: every class of violation
is named (file, record, field, expected, found), readers refuse what is an
error, real dumps (HF capture, the example engine) are clean, the hash
serialisation matches its documented test vector, and the compatibility
pre-flight (--against) names the whole difference."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from logitparity.cli import main as cli_main
from logitparity.dump import DumpWriter, load_dump, tokens_hash
from logitparity.validate import DumpError, Violation, set_difference, validate_dump

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
V = 50
H = "sha256:" + "0" * 64
MANIFEST = {
    "engine": {"name": "test", "version": "0"},
    "model": {"path": "none", "name": "m", "config_hash": H, "weights_hash": H},
    "tokenizer": {"vocab_size": V, "tokens_hash": H, "special_tokens": {"eos_token": {"token": "</s>", "id": 2}},
                  "eos_token_ids": [2]},
    "dtype": "fp32", "device": "cpu",
    "decoding": {"mode": "greedy", "temperature": None, "top_p": None, "seed": None, "max_new_tokens": 8,
                 "stop_token_ids": [], "eos_token_ids": [2], "repetition_penalty": 1.0, "logit_processors": [],
                 "chat_template": "auto"},
    "libraries": {"numpy": np.__version__},
}


def record(i: int, n: int, **over) -> dict:
    r = {"id": f"p{i}", "category": "c", "prompt": f"prompt {i}", "chat_template": False,
         "prompt_token_ids": [5, 6, 7], "generated_token_ids": [10 + j for j in range(n)],
         "stop_reason": "max_new_tokens", "timing": {"ttft_s": 0.1, "decode_tokens_per_s": None, "batch_size": 1}}
    r.update(over)
    return r


def rows(i: int, n: int) -> np.ndarray:
    return (np.random.default_rng(i).standard_normal((n, V)) * 4).astype(np.float32)


def make(path, storage="full", sizes=(3, 2), man=MANIFEST) -> Path:
    with DumpWriter(path, man, storage=storage) as w:
        for i, n in enumerate(sizes):
            w.add(record(i, n), rows(i, n))
    return Path(path)


def edit_json(path: Path, fn) -> None:
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def edit_record(d: Path, i: int, fn) -> None:
    lines = (d / "records.jsonl").read_text().splitlines()
    r = json.loads(lines[i])
    fn(r)
    lines[i] = json.dumps(r)
    (d / "records.jsonl").write_text("\n".join(lines) + "\n")


def rewrite_tensor(d: Path, shard: str, key: str, fn) -> None:
    """Replace one tensor of a shard (same dtype and shape) by fn(array)."""
    from safetensors.numpy import load_file, save_file

    t = load_file(os.fspath(d / shard))
    t[key] = np.ascontiguousarray(fn(t[key].copy()))
    save_file(t, os.fspath(d / shard), metadata={"format": "logitparity-dump", "version": "1.0"})


def only(found: list[Violation], level: str = "error") -> Violation:
    got = [v for v in found if v.level == level]
    assert len(got) == 1, "\n".join(map(str, found))
    return got[0]


def test_a_writer_dump_is_valid(tmp_path):
    assert validate_dump(make(tmp_path / "f")) == []
    assert validate_dump(make(tmp_path / "t", "topk:8")) == []


# ---- one test per class of error: the reader refuses, the validator names it

def test_logits_dtype_other_than_the_manifest(tmp_path):
    d = make(tmp_path / "d", sizes=(3,))
    edit_json(d / "manifest.json", lambda m: m["logits"].update(dtype="fp16"))
    v = only(validate_dump(d))
    assert (v.record, v.field, v.expected, v.found) == ("p0", "000000/logits dtype",
                                                        "F16 (logits, logits.dtype 'fp16')", "F32")
    with pytest.raises(DumpError, match=r"000000/logits dtype: expected F16 .*found F32"):
        load_dump(d)


def test_rows_wider_than_the_manifest_are_never_cut(tmp_path):
    d = make(tmp_path / "d")
    edit_json(d / "manifest.json", lambda m: m["logits"].update(vocab_size=V - 2))
    found = [v for v in validate_dump(d) if v.field.endswith("shape")]
    assert [v.record for v in found] == ["p0", "p1"]
    assert found[0].expected == "[3, 48] = [n_positions, logits.vocab_size] (rows wider than the manifest says are never cut)"
    assert found[0].found == "[3, 50]"
    with pytest.raises(DumpError, match="never cut"):
        load_dump(d)


@pytest.mark.parametrize("mutate, field, expected", [
    (lambda t: t.__setitem__(("i", 0, 1), 99), "topk_indices", "token ids in [0, 50)"),
    (lambda t: t.__setitem__(("i", 1, 3), t["i"][1, 2]), "topk_indices", "distinct token ids in each row"),
    (lambda t: t["v"].__setitem__((0, slice(0, 2)), t["v"][0, 1::-1].copy()), "topk_values",
     "descending values, ties in ascending token id"),
    (lambda t: t.__setitem__(("l", 0), t["v"][0, 0] - 1.0), "lse", "lse >= log-sum-exp of the kept values (kept mass <= 1)"),
    (lambda t: t.__setitem__(("t", 2), 1.5), "tail_mass", "a number in [0, 1]"),
    (lambda t: t.__setitem__(("t", 2), t["t"][2] + 0.01), "tail_mass",
     "max(0, 1 - sum(exp(value - lse))) within 1e-05"),
])
def test_topk_invariants(tmp_path, mutate, field, expected):
    d = make(tmp_path / "d", "topk:8", sizes=(3,))
    from safetensors.numpy import load_file, save_file

    shard = d / "shard-00000.safetensors"
    raw = load_file(os.fspath(shard))
    t = {"v": raw["000000/topk_values"].copy(), "i": raw["000000/topk_indices"].copy(),
         "l": raw["000000/lse"].copy(), "t": raw["000000/tail_mass"].copy()}

    class Setter(dict):
        def __setitem__(self, key, value):
            name, *idx = key
            self[name][tuple(idx)] = value

    box = Setter(t)
    dict.update(box, t)
    mutate(box)
    save_file({"000000/topk_values": t["v"], "000000/topk_indices": t["i"], "000000/lse": t["l"],
               "000000/tail_mass": t["t"]}, os.fspath(shard), metadata={"format": "logitparity-dump", "version": "1.0"})
    v = only(validate_dump(d))
    assert (v.record, v.field, v.expected) == ("p0", field, expected)
    assert v.found.startswith("1 of 3 rows, first row")
    with pytest.raises(DumpError, match=field):
        load_dump(d)


@pytest.mark.parametrize("change, field, expected, found", [
    (lambda r: r.update(generated_token_ids=[10, 60, 12]), "generated_token_ids",
     "token ids in [0, 50) (logits.vocab_size)", "1 outside, e.g. [60]"),
    (lambda r: r.update(prompt_token_ids=[-1, 6]), "prompt_token_ids", "token ids in [0, 50) (logits.vocab_size)",
     "1 outside, e.g. [-1]"),
    (lambda r: r.update(n_positions=2), "n_positions", "len(generated_token_ids) = 3", "2"),
    (lambda r: r.update(stop_reason="length"), "stop_reason", "one of ['eos', 'max_new_tokens', 'stop_token']",
     '"length"'),
    (lambda r: r.update(chat_template="yes"), "chat_template", "true or false", 'string "yes"'),
    (lambda r: r.update(generated_token_ids=[10, True, 12]), "generated_token_ids", "an array of integers", "array of 3"),
    (lambda r: r["timing"].update(ttft_s="fast"), "timing.ttft_s", "a number or null", 'string "fast"'),
    (lambda r: r.update(id=""), "id", "a non-empty string", 'string ""'),
    (lambda r: r.update(shard="../../etc/passwd"), "shard", '"shard-NNNNN.safetensors" (5 digits)',
     '"../../etc/passwd"'),
])
def test_record_invariants_and_types(tmp_path, change, field, expected, found):
    d = make(tmp_path / "d")
    edit_record(d, 0, change)
    v = only(validate_dump(d))
    assert (v.field, v.expected, v.found) == (field, expected, found)
    assert v.file == str(d / "records.jsonl")
    with pytest.raises(DumpError, match=field):
        load_dump(d)


def test_no_tensor_is_shared_by_two_records(tmp_path):
    d = make(tmp_path / "d", sizes=(3, 3))
    edit_record(d, 1, lambda r: r["tensors"].update(logits="000000/logits"))
    v = only(validate_dump(d))
    assert v.field == "tensors.logits" and "also used by record 'p0'" in v.found


@pytest.mark.parametrize("change, field, found", [
    (lambda m: m["tokenizer"].update(vocab_size="50"), "tokenizer.vocab_size", 'string "50"'),
    (lambda m: m["decoding"].update(repetition_penalty=1.1), "decoding.repetition_penalty", "1.1"),
    (lambda m: m["decoding"].update(logit_processors=["top_k"]), "decoding.logit_processors", '["top_k"]'),
    (lambda m: m["decoding"].update(mode="beam"), "decoding.mode", '"beam"'),
    (lambda m: m.update(run={"wall_s": "fast"}), "run.wall_s", 'string "fast"'),
    (lambda m: m.update(complete="yes"), "complete", 'string "yes"'),
    (lambda m: m["tokenizer"].update(special_tokens={"eos_token": "</s>"}), "tokenizer.special_tokens.eos_token",
     '"</s>"'),
])
def test_manifest_json_types(tmp_path, change, field, found):
    d = make(tmp_path / "d")
    edit_json(d / "manifest.json", change)
    v = only(validate_dump(d))
    assert (v.file, v.field, v.found) == (str(d / "manifest.json"), field, found)
    with pytest.raises(DumpError, match=field.replace(".", r"\.")):
        load_dump(d)


def test_a_symlinked_shard_is_refused(tmp_path):
    d = make(tmp_path / "d", sizes=(2,))
    outside = tmp_path / "outside.safetensors"
    os.replace(d / "shard-00000.safetensors", outside)
    os.symlink(outside, d / "shard-00000.safetensors")
    v = only(validate_dump(d))
    assert (v.field, v.found) == ("shard", "a symbolic link")


def test_overlapping_tensors_in_a_shard_are_refused(tmp_path):
    d = make(tmp_path / "d", sizes=(2, 2))
    p = d / "shard-00000.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["000001/logits"]["data_offsets"] = header["000000/logits"]["data_offsets"]
    body = raw[8 + n:8 + n + 2 * V * 4]
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    p.write_bytes(struct.pack("<Q", len(h)) + h + body)
    v = only(validate_dump(d))
    assert v.field == "header entry '000001/logits'" and "do not overlap" in v.expected


def test_spec_findings_are_listed_but_readers_accept(tmp_path):
    d = make(tmp_path / "d")
    edit_json(d / "manifest.json", lambda m: (m["engine"].pop("version"), m["model"].update(config_hash="abc")))
    edit_record(d, 0, lambda r: r.update(stop_reason="eos"))  # the last token (12) is not an EOS id
    found = validate_dump(d)
    assert sorted((v.level, v.field) for v in found) == [
        ("spec", "engine.version"), ("spec", "model.config_hash"), ("spec", "stop_reason")]
    assert 'after token 12' in next(v for v in found if v.field == "stop_reason").found
    assert len(load_dump(d)) == 2


def test_every_violation_is_listed_and_the_error_says_how_many(tmp_path):
    d = make(tmp_path / "d", sizes=(3, 2))
    edit_record(d, 0, lambda r: r.update(stop_reason="x", chat_template=1))
    edit_record(d, 1, lambda r: r.update(generated_token_ids=[99, 98]))
    assert len([v for v in validate_dump(d) if v.level == "error"]) == 3
    with pytest.raises(DumpError, match=r"(?s)3 errors in the dump:.*`logitparity validate .*` lists every violation") as e:
        load_dump(d)
    assert len(e.value.violations) == 3


# ---- hashes: the documented serialisation and its test vector

TEST_VECTOR = ["<|endoftext|>", "Ġthe", "é", "\n", '"q"', "\\", "\x01", None, "日本", "\x7f"]
TEST_VECTOR_BYTES = ('["<|endoftext|>", "\\u0120the", "\\u00e9", "\\n", "\\"q\\"", "\\\\", "\\u0001", null, '
                     '"\\u65e5\\u672c", "\x7f"]')


def test_tokens_hash_matches_the_documented_test_vector():
    # docs/dump-format.md: the bytes are written by hand from the rules, not by json.dumps
    want = ('["<|endoftext|>", "\u0120the", "\u00e9", "\\n", "\\"q\\"", "\\\\", "\\u0001", null, "\u65e5\u672c", '
            '"\x7f"]').encode("utf-8")
    assert want.hex().startswith("5b223c7c656e646f66746578747c3e222c2022c4a0746865")
    digest = "231a918ed958b7d6fc3cdd37ae69f5187e9416e9f022d489714f1e90ceb99180"
    assert hashlib.sha256(want).hexdigest() == digest
    assert tokens_hash(TEST_VECTOR) == f"sha256:{digest}"
    doc = (Path(__file__).resolve().parents[1] / "docs" / "dump-format.md").read_text(encoding="utf-8")
    assert digest in doc and want.hex() in doc


def test_hf_and_example_engine_hash_the_same_way(tiny_model_dir):
    from logitparity.capture.hf import tokenizer_identity
    from transformers import AutoTokenizer

    sys.path.insert(0, str(QUALITY))
    try:
        import example_engine
    finally:
        sys.path.remove(str(QUALITY))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    hf = tokenizer_identity(tok, [2])
    ours = example_engine.tokenizer_identity(Path(tiny_model_dir))
    assert hf["tokens_hash"] == ours["tokens_hash"] == tokens_hash(tok.convert_ids_to_tokens(list(range(len(tok)))))
    assert hf["special_tokens"] == ours["special_tokens"]


# ---- whole differences, stop rules, compatibility pre-flight

def test_set_difference_shows_the_whole_difference():
    a = list(range(300))
    b = list(range(1, 300)) + [400]
    s = set_difference(a, b)
    assert s == "only in the reference: [0]; only in the candidate: [400]"
    assert set_difference({"bos_token": 1, "eos_token": 2}, {"eos_token": 3}) == (
        "bos_token only in the reference (1); eos_token: 2 vs 3")


def test_against_names_tokenizer_stop_rule_and_prompt_differences(tmp_path, capsys):
    ref = make(tmp_path / "ref")
    other = {**MANIFEST, "tokenizer": {**MANIFEST["tokenizer"], "tokens_hash": "sha256:" + "1" * 64},
             "decoding": {**MANIFEST["decoding"], "eos_token_ids": [0, 2, 4]}}
    w = DumpWriter(tmp_path / "cand", other)  # pre-flight: only the manifest exists yet
    found = validate_dump(tmp_path / "cand", against=ref)
    assert [v.field for v in found if v.level == "error"] == ["tokenizer.tokens_hash", "decoding.eos_token_ids"]
    stop = next(v for v in found if v.field == "decoding.eos_token_ids")
    assert "only in the candidate: [0, 4]" in stop.found and "same tokenizer, different stop rule" in stop.fix
    w.add(record(0, 3, prompt="other text"), rows(0, 3))
    w.close()
    assert cli_main(["validate", str(tmp_path / "cand"), "--against", str(ref)]) == 2
    out = capsys.readouterr().out
    assert "prompt: expected \"prompt 0\", found \"other text\"" in out and "violations" in out


def test_cli_validate_exit_codes_and_json(tmp_path, capsys):
    d = make(tmp_path / "d")
    assert cli_main(["validate", str(d)]) == 0
    assert capsys.readouterr().out.strip() == f"{d}: valid"
    edit_record(d, 1, lambda r: r.update(stop_reason="length"))
    assert cli_main(["validate", str(d), "--json", str(tmp_path / "v.json")]) == 2
    out = capsys.readouterr().out
    assert f"error: {d / 'records.jsonl'} [record 'p1' (line 2)]: stop_reason: expected one of" in out
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["valid"] is False and data["violations"][0]["field"] == "stop_reason"
    assert cli_main(["validate", str(tmp_path / "nope")]) == 2
    assert "no such dump directory" in capsys.readouterr().out


def test_padded_columns_must_be_provably_negligible(tmp_path):
    from logitparity.compare import IncompatibleRuns, compare_dumps

    ref = make(tmp_path / "ref")
    man = {**MANIFEST, "tokenizer": {**MANIFEST["tokenizer"]}}
    for name, pad_value, ok in (("neg", -np.inf, True), ("tiny", -40.0, True), ("big", 0.0, False)):
        with DumpWriter(tmp_path / name, man) as w:
            for i, n in enumerate((3, 2)):
                w.add(record(i, n), np.concatenate([rows(i, n), np.full((n, 6), pad_value, np.float32)], 1))
        if ok:
            c = compare_dumps(ref, tmp_path / name)
            assert c.tokens.kl_ref_cand.max() < 1e-9
            assert any("beyond column 50" in n for n in c.notes)
        else:
            with pytest.raises(IncompatibleRuns, match=r"candidate's rows are wider \(56 vs 50\) and its columns from "
                                                       r"50 on hold up to 0\.\d+ of the probability"):
                compare_dumps(ref, tmp_path / name)


# ---- real writers pass

def test_hf_capture_and_the_example_engine_pass_validate(tiny_model_dir, tmp_path):
    import torch

    from logitparity.capture import capture

    torch.set_num_threads(1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "category": "math", "text": "What is 2+2?"}) + "\n")
    ref = capture(tiny_model_dir, prompts, tmp_path / "ref", max_new_tokens=4, progress=False)
    top = capture(tiny_model_dir, prompts, tmp_path / "top", max_new_tokens=4, progress=False, storage="topk:16")
    score = capture(tiny_model_dir, None, tmp_path / "score", mode="score", reference_dump=ref, progress=False)
    for d in (ref, top, score):
        assert validate_dump(d) == [], d
    r = load_dump(ref).records[0]
    (tmp_path / "eng.jsonl").write_text(json.dumps({k: r[k] for k in ("id", "category", "chat_template",
                                                                      "prompt_token_ids")} | {"text": r["prompt"]}) + "\n")
    env = {**os.environ, "EXAMPLE_ENGINE_THREADS": "1"}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"engine-{dtype}"
        p = subprocess.run([sys.executable, str(QUALITY / "example_engine.py"), "--model", tiny_model_dir,
                            "--prompts", str(tmp_path / "eng.jsonl"), "--out", str(out), "--dtype", dtype,
                            "--max-new-tokens", "4"], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
        assert validate_dump(out) == [], dtype
        assert validate_dump(out, against=ref) == [], dtype


def test_an_unhashable_dtype_is_a_violation_not_a_crash(tmp_path):
    """Found by benchmarks/fuzz_dumps.py: logits.dtype = [] raised TypeError."""
    d = make(tmp_path / "d")
    edit_json(d / "manifest.json", lambda m: m["logits"].update(dtype=[]))
    v = only(validate_dump(d))
    assert (v.field, v.found) == ("logits.dtype", "[]")


def test_one_bad_field_does_not_hide_the_others(tmp_path):
    d = make(tmp_path / "d")
    edit_record(d, 0, lambda r: r.update(stop_reason="length", generated_token_ids=[10, 99, 12]))
    assert sorted(v.field for v in validate_dump(d)) == ["generated_token_ids", "stop_reason"]


def test_integers_beyond_64_bits_are_violations(tmp_path):
    """JSON allows any integer; readers in other languages (and float()) do not."""
    d = make(tmp_path / "d")
    edit_record(d, 0, lambda r: r["timing"].update(ttft_s=2**1100))
    v = only(validate_dump(d))
    assert v.field == "timing.ttft_s" and v.expected == "a number or null"


def test_an_integer_too_long_to_parse_is_a_malformed_line(tmp_path):
    d = make(tmp_path / "d")
    lines = (d / "records.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace('"n_positions": 3', '"n_positions": ' + "9" * 5000)
    (d / "records.jsonl").write_text("\n".join(lines) + "\n")
    v = only(validate_dump(d))
    assert (v.record, v.field) == ("line 1", "JSON")


def test_llama_cpp_engine_dumps_pass_validate(tmp_path, capsys):
    """Every mode and storage of the llama.cpp engine writes a dump that
    passes `validate` (spec findings included), and its score-mode dump on
    an HF reference passes `validate --against` it."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup.sh installs it)")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Name three colours.\nWhat is 2 + 2?\n", encoding="utf-8")
    common = ["--prompts", str(prompts), "--max-new-tokens", "4", "--no-progress", "--torch-threads", "1"]
    llama = ["--engine", "llama.cpp", "--engine-opt", "n_ctx=256"]
    assert cli_main(["dump", *common, "--out", str(tmp_path / "hf")]) == 0
    assert cli_main(["dump", *common, *llama, "--out", str(tmp_path / "greedy")]) == 0
    assert cli_main(["dump", *common, *llama, "--storage", "topk:8", "--out", str(tmp_path / "topk")]) == 0
    assert cli_main(["dump", *llama, "--mode", "score", "--reference-dump", str(tmp_path / "hf"), "--no-progress",
                     "--out", str(tmp_path / "score")]) == 0
    for name in ("greedy", "topk", "score"):
        capsys.readouterr()
        assert cli_main(["validate", str(tmp_path / name)]) == 0, capsys.readouterr().out
    assert cli_main(["validate", str(tmp_path / "score"), "--against", str(tmp_path / "hf")]) == 0, \
        capsys.readouterr().out
