"""Capture with the Hugging Face driver: decode loops against an independent
full forward pass, determinism, batch invariance, score mode, sampling, stop
conditions, resume after a killed process, the CLI, and the default model."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import logitparity
from logitparity import load_dump
from logitparity.capture import load_model
from logitparity.capture import capture as run_capture
from logitparity.cli import main as cli_main
from logitparity.dump import DumpWriter
from logitparity.prompts import Prompt, load_prompts

PROMPTS = [
    Prompt("a", "x", "Hello there, how are you today?"),
    Prompt("b", "y", "def add(a, b):"),
    Prompt("c", "x", "12 * 7 ="),
    Prompt("d", "json", '{"name": "Ada", "age":'),
    Prompt("e", "y", "Once upon a time, in a quiet village by the sea, there lived a lighthouse keeper who"),
    Prompt("f", "x", "Bonjour"),
]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="session")
def lm(tiny_model_dir):
    torch.set_num_threads(1)
    return load_model(tiny_model_dir)


def capture(lm, out, prompts=PROMPTS, **kw):
    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("progress", False)
    return load_dump(run_capture(lm, prompts, out, **kw))


@pytest.fixture(scope="module")
def greedy(lm, tmp_path_factory):
    torch.set_num_threads(1)
    return capture(lm, tmp_path_factory.mktemp("greedy") / "d", batch_size=4)


def reference_rows(lm, record) -> np.ndarray:
    """Independent reference: one full forward pass, no cache, no padding."""
    ids = record["prompt_token_ids"] + record["generated_token_ids"]
    with torch.no_grad():
        out = lm.model(torch.tensor([ids])).logits[0].double().numpy()
    p = len(record["prompt_token_ids"])
    return out[p - 1: p - 1 + record["n_positions"]]


# --- greedy ------------------------------------------------------------------------------

def test_greedy_matches_a_full_forward_pass(greedy, lm):
    assert greedy.ids and set(greedy.ids) == {p.id for p in PROMPTS}
    for r in greedy.records:
        got = greedy.logits(r["id"])
        want = reference_rows(lm, r)
        assert got.dtype == np.float32 and got.shape == (r["n_positions"], lm.model.config.vocab_size)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        # The stored row is the one the token was chosen from (argmax, lower index on ties).
        assert r["generated_token_ids"] == np.argmax(got, axis=1).tolist()
        eos = r["generated_token_ids"][-1] in lm.identity["tokenizer"]["eos_token_ids"]
        assert r["stop_reason"] == ("eos" if eos else "max_new_tokens")
        assert r["n_positions"] == len(r["generated_token_ids"]) and (eos or r["n_positions"] == 12)


def test_greedy_records_every_field(greedy, lm):
    tok = lm.tokenizer
    for p in PROMPTS:
        r = greedy.record(p.id)
        assert (r["category"], r["prompt"], r["chat_template"]) == (p.category, p.text, True)
        text = tok.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False, add_generation_prompt=True)
        assert r["prompt_token_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert r["timing"]["ttft_s"] > 0 and r["timing"]["batch_size"] >= 1
        assert r["timing"]["decode_tokens_per_s"] > 0


def test_manifest_identity_and_settings(greedy, tiny_model_dir, lm):
    m = greedy.manifest
    d = Path(tiny_model_dir)
    config = json.loads((d / "config.json").read_text())
    want_config = "sha256:" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    weights = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    want_weights = "sha256:" + hashlib.sha256(f"model.safetensors\0sha256:{weights}\n".encode()).hexdigest()
    assert m["model"]["config_hash"] == want_config and m["model"]["weights_hash"] == want_weights
    assert m["model"]["architecture"] == "LlamaForCausalLM" and m["model"]["format"] == "hf"
    vocab = lm.tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert m["tokenizer"]["vocab_size"] == len(tokens) == 384
    assert m["tokenizer"]["tokens_hash"] == "sha256:" + hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode()).hexdigest()
    eos = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert m["tokenizer"]["special_tokens"]["eos_token"] == {"token": "<|im_end|>", "id": eos}
    assert m["tokenizer"]["eos_token_ids"] == [eos]
    assert m["engine"]["name"] == "hf-transformers" and (m["dtype"], m["device"]) == ("fp32", "cpu")
    assert m["decoding"] == {"mode": "greedy", "temperature": None, "top_p": None, "seed": None, "max_new_tokens": 12,
                             "stop_token_ids": [], "eos_token_ids": [eos], "repetition_penalty": 1.0,
                             "logit_processors": [], "chat_template": "auto"}
    assert m["libraries"]["torch"] == torch.__version__ and m["libraries"]["logitparity"] == logitparity.__version__
    run = m["run"]
    assert run["prompts"] == len(PROMPTS) and run["tokens"] == sum(r["n_positions"] for r in greedy.records)
    assert run["wall_s"] > 0 and run["tokens_per_s"] > 0 and run["peak_host_rss_bytes"] > 1 << 20
    assert run["peak_gpu_bytes"] is None and run["resumed"] is False and m["complete"] is True


def test_determinism(greedy, lm, tmp_path):
    again = capture(lm, tmp_path / "d", batch_size=4)
    for pid in greedy.ids:
        assert again.record(pid)["generated_token_ids"] == greedy.record(pid)["generated_token_ids"]
        np.testing.assert_array_equal(again.logits(pid), greedy.logits(pid))


def test_batch_size_invariance(greedy, lm, tmp_path):
    one = capture(lm, tmp_path / "d", batch_size=1)
    for pid in greedy.ids:
        assert one.record(pid)["generated_token_ids"] == greedy.record(pid)["generated_token_ids"]
        np.testing.assert_allclose(one.logits(pid), greedy.logits(pid), atol=1e-4, rtol=0)
        assert one.record(pid)["timing"]["batch_size"] == 1


def test_score_reproduces_greedy_logits(greedy, lm, tmp_path):
    scored = capture(lm, tmp_path / "s", mode="score", reference_dump=greedy.path, prompts=None, batch_size=3)
    assert scored.manifest["decoding"]["mode"] == "score"
    assert scored.manifest["decoding"]["max_new_tokens"] == 12
    assert scored.manifest["reference"]["path"] == str(greedy.path.resolve())
    assert set(scored.ids) == set(greedy.ids)
    for pid in greedy.ids:
        r, g = scored.record(pid), greedy.record(pid)
        for key in ("prompt", "category", "prompt_token_ids", "generated_token_ids", "stop_reason", "chat_template"):
            assert r[key] == g[key], key
        np.testing.assert_allclose(scored.logits(pid), greedy.logits(pid), atol=1e-4, rtol=0)


def test_score_subset_and_mismatches(greedy, lm, tmp_path):
    sub = capture(lm, tmp_path / "s", mode="score", reference_dump=greedy, prompts=PROMPTS[:2])
    assert sorted(sub.ids) == ["a", "b"]
    with pytest.raises(ValueError, match="prompt 'zz' is not in the reference dump"):
        capture(lm, tmp_path / "t", mode="score", reference_dump=greedy, prompts=[Prompt("zz", "x", "hi")])
    with pytest.raises(ValueError, match="prompt 'a' differs from the reference dump's text"):
        capture(lm, tmp_path / "u", mode="score", reference_dump=greedy, prompts=[Prompt("a", "x", "other")])


def test_score_against_a_reference_with_another_tokenizer_is_refused(greedy, lm, tmp_path):
    import shutil

    from logitparity.capture.engine import TokenizerMismatch

    bad = tmp_path / "ref"
    shutil.copytree(greedy.path, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["tokenizer"]["vocab_size"] += 1
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TokenizerMismatch, match=r"tokenizer\.vocab_size: this engine \(hf-transformers\) 384, "
                                                r"the reference dump .* 385"):
        run_capture(lm, None, tmp_path / "s", mode="score", reference_dump=bad, progress=False)
    assert not (tmp_path / "s").exists()


def test_score_rejects_tokens_outside_the_vocabulary(lm, tmp_path):
    with DumpWriter(tmp_path / "ref", {"decoding": {"mode": "greedy", "max_new_tokens": 2}}) as w:
        w.add({"id": "a", "category": "x", "prompt": "hi", "chat_template": False, "prompt_token_ids": [5, 6],
               "generated_token_ids": [7, 999], "stop_reason": "max_new_tokens"}, np.zeros((2, 1000), np.float32))
    with pytest.raises(ValueError, match=r"token id 999 outside this model's vocabulary \[0, 384\)"):
        capture(lm, tmp_path / "s", mode="score", reference_dump=tmp_path / "ref", prompts=None)
    assert not (tmp_path / "s").exists()  # checked before the output directory is made


# --- sampling ------------------------------------------------------------------------------

def test_sampling_is_seeded_and_independent_of_batching(lm, tmp_path):
    a = capture(lm, tmp_path / "a", mode="sample", temperature=1.0, seed=3, batch_size=4)
    b = capture(lm, tmp_path / "b", mode="sample", temperature=1.0, seed=3, batch_size=1)
    c = capture(lm, tmp_path / "c", mode="sample", temperature=1.0, seed=4, batch_size=4)
    for pid in a.ids:
        assert a.record(pid)["generated_token_ids"] == b.record(pid)["generated_token_ids"]
    assert any(a.record(p)["generated_token_ids"] != c.record(p)["generated_token_ids"] for p in a.ids)
    d = a.manifest["decoding"]
    assert (d["mode"], d["temperature"], d["top_p"], d["seed"]) == ("sample", 1.0, None, 3)
    for r in a.records:  # raw logits are stored, not the tempered ones
        np.testing.assert_allclose(a.logits(r["id"]), reference_rows(lm, r), atol=1e-4, rtol=0)


def test_tiny_top_p_is_greedy(greedy, lm, tmp_path):
    s = capture(lm, tmp_path / "s", mode="sample", temperature=0.7, top_p=1e-9, batch_size=4)
    for pid in greedy.ids:
        assert s.record(pid)["generated_token_ids"] == greedy.record(pid)["generated_token_ids"]


# --- stop conditions ---------------------------------------------------------------------

def test_stop_token(greedy, lm, tmp_path):
    gen = greedy.record("a")["generated_token_ids"]
    k = next(i for i in range(1, len(gen)) if gen[i] not in gen[:i])
    s = capture(lm, tmp_path / "s", prompts=PROMPTS[:1], stop_token_ids=[gen[k]])
    r = s.record("a")
    assert r["generated_token_ids"] == gen[: k + 1] and r["stop_reason"] == "stop_token"
    assert r["n_positions"] == k + 1 and s.manifest["decoding"]["stop_token_ids"] == [gen[k]]


def test_eos_stops_and_is_kept(greedy, lm, tmp_path):
    # A model whose EOS logit is twice the logit of the token it would pick
    # first for prompt "a": EOS wins at step 0 there.
    model = copy.deepcopy(lm.model)
    first = greedy.record("a")["generated_token_ids"][0]
    eos = lm.identity["tokenizer"]["eos_token_ids"][0]
    assert greedy.logits("a")[0, first] > 0
    with torch.no_grad():
        model.lm_head.weight[eos] = 2 * model.lm_head.weight[first]
    eos_lm = dataclasses.replace(lm, model=model)
    s = capture(eos_lm, tmp_path / "s", prompts=PROMPTS[:1])
    r = s.record("a")
    assert r["generated_token_ids"] == [eos] and r["stop_reason"] == "eos" and r["n_positions"] == 1
    assert r["timing"]["decode_tokens_per_s"] is None


# --- options -----------------------------------------------------------------------------

def test_without_chat_template(lm, tmp_path):
    d = capture(lm, tmp_path / "d", prompts=PROMPTS[:2], chat_template=False, max_new_tokens=2)
    for p in PROMPTS[:2]:
        r = d.record(p.id)
        assert r["chat_template"] is False and r["prompt_token_ids"] == lm.tokenizer(p.text)["input_ids"]
    assert d.manifest["decoding"]["chat_template"] is False


def test_chat_template_required_but_missing(lm, tmp_path):
    tok = copy.deepcopy(lm.tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template=True but the tokenizer has no chat template"):
        capture(dataclasses.replace(lm, tokenizer=tok), tmp_path / "d", chat_template=True)


def test_topk_storage(greedy, lm, tmp_path):
    t = capture(lm, tmp_path / "t", batch_size=4, storage="topk:5")
    assert t.storage == "topk:5"
    for pid in greedy.ids:
        values, indices, lse, tail = t.topk(pid)
        full = greedy.logits(pid).astype(np.float64)
        np.testing.assert_array_equal(indices[:, 0], greedy.record(pid)["generated_token_ids"])
        m = full.max(axis=1)
        np.testing.assert_allclose(lse, m + np.log(np.exp(full - m[:, None]).sum(axis=1)), atol=1e-5)
        kept = np.exp(values.astype(np.float64) - lse[:, None]).sum(axis=1)
        np.testing.assert_allclose(tail, 1 - kept, atol=1e-12)


@pytest.mark.parametrize("logits_dtype", ["fp16", "bf16"])
def test_reduced_logits_dtype(greedy, lm, tmp_path, logits_dtype):
    d = capture(lm, tmp_path / "d", batch_size=4, logits_dtype=logits_dtype)
    cast = {"fp16": torch.float16, "bf16": torch.bfloat16}[logits_dtype]
    for pid in greedy.ids:
        want = torch.from_numpy(np.array(greedy.logits(pid))).to(cast).float().numpy()
        np.testing.assert_array_equal(d.logits(pid, as_float32=True), want)


def test_bf16_model_stores_its_raw_logits(tiny_model_dir, tmp_path):
    lm16 = load_model(tiny_model_dir, dtype="bf16")
    d = capture(lm16, tmp_path / "d", prompts=PROMPTS[:2], max_new_tokens=3)
    assert d.manifest["dtype"] == "bf16"
    x = d.logits("a")
    np.testing.assert_array_equal(torch.from_numpy(np.array(x)).bfloat16().float().numpy(), x)


def test_duplicate_prompt_ids(lm, tmp_path):
    with pytest.raises(ValueError, match="prompt id 'a' appears twice"):
        capture(lm, tmp_path / "d", prompts=[PROMPTS[0], PROMPTS[0]])


def test_resume_with_other_prompt_text(lm, tmp_path):
    capture(lm, tmp_path / "d", prompts=PROMPTS[:1], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 'a' has a different text than in the dump"):
        capture(lm, tmp_path / "d", prompts=[Prompt("a", "x", "changed")], max_new_tokens=2, resume=True)


def test_padded_vocabulary(tmp_path):
    from conftest import build_tiny_model

    lm_pad = load_model(build_tiny_model(tmp_path / "m", model_vocab_size=448))
    d = capture(lm_pad, tmp_path / "d", prompts=PROMPTS[:1], max_new_tokens=2)
    assert d.vocab_size == 448 and d.manifest["tokenizer"]["vocab_size"] == 384


def test_limit(lm, tmp_path):
    d = capture(lm, tmp_path / "d", limit=2, max_new_tokens=2)
    assert sorted(d.ids) == ["a", "b"]


# --- argument and loading errors ---------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "beam"}, "mode must be one of"),
        ({"mode": "score"}, "mode 'score' needs reference_dump"),
        ({"reference_dump": "x"}, "reference_dump is only used with mode 'score'"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"limit": 0}, "limit must be a positive int or None"),
        ({"mode": "sample", "temperature": 0.0}, "temperature must be > 0 for sampling"),
        ({"mode": "sample", "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"storage": "top5"}, "logits storage must be 'full' or 'topk:K'"),
    ],
    ids=["mode", "score-no-ref", "ref-no-score", "tokens", "batch", "limit", "temperature", "top-p", "storage"],
)
def test_bad_arguments(lm, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        capture(lm, tmp_path / "d", **kwargs)


def test_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist locally.*never downloaded"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist locally"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path)


def test_directory_without_weights(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text(Path(tiny_model_dir, "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"holds no weights \(\*.safetensors"):
        load_model(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file but not a .gguf"):
        load_model(tmp_path / "model.bin")


def test_bad_dtype_and_device(tiny_model_dir):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(tiny_model_dir, dtype="int8")
    with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N or auto"):
        load_model(tiny_model_dir, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(tiny_model_dir):
    with pytest.raises(ValueError, match="torch sees no CUDA device; use --device cpu"):
        load_model(tiny_model_dir, device="cuda")


# --- resume after a killed process, and the CLI ------------------------------------------

def _prompts_file(path: Path, n: int) -> Path:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    path.write_text("".join(json.dumps({"id": f"q{i:02d}", "category": "x", "text": " ".join(words[: 1 + i % 6]) + f" {i}"}) + "\n"
                            for i in range(n)))
    return path


def test_resume_after_kill(tiny_model_dir, tmp_path):
    prompts = _prompts_file(tmp_path / "p.jsonl", 30)
    out = tmp_path / "killed"
    # default shard bound (256 MiB): each batch must still reach disk as soon as it is done
    args = ["dump", "--model", tiny_model_dir, "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "40",
            "--batch-size", "3", "--no-progress", "--torch-threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(logitparity.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "logitparity.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = out / "records.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and records.read_text().count("\n") >= 3:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the capture ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    partial = load_dump(out)  # a valid dump of what finished: whole batches
    assert 3 <= len(partial) < 30 and partial.manifest["complete"] is False
    assert len(partial) % 3 == 0
    done_before = set(partial.ids)

    assert cli_main([*args, "--resume"]) == 0
    resumed = load_dump(out)
    assert len(resumed) == 30 and resumed.manifest["complete"] is True
    assert resumed.manifest["run"]["resumed"] is True
    assert resumed.manifest["run"]["prompts"] == 30 - len(done_before)
    assert resumed.ids[: len(done_before)] == partial.ids
    fresh = capture(load_model(tiny_model_dir), tmp_path / "fresh", prompts=load_prompts(prompts), max_new_tokens=40,
                    batch_size=3)
    for pid in fresh.ids:
        assert resumed.record(pid)["timing"]["batch_size"] == fresh.record(pid)["timing"]["batch_size"]
        assert resumed.record(pid)["generated_token_ids"] == fresh.record(pid)["generated_token_ids"]
        np.testing.assert_array_equal(resumed.logits(pid), fresh.logits(pid))


def test_cli_dump_and_summary(tiny_model_dir, tmp_path, capsys):
    prompts = _prompts_file(tmp_path / "p.jsonl", 3)
    out = tmp_path / "d"
    assert cli_main(["dump", "--model", tiny_model_dir, "--prompts", str(prompts), "--out", str(out),
                     "--max-new-tokens", "3", "--logits-dtype", "bf16", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"dump {out}: 3 prompts, 9 tokens, full bf16") and "tok/s" in line
    assert load_dump(out).logits_dtype == "bf16"
    assert cli_main(["dump", "--model", tiny_model_dir, "--prompts", str(prompts), "--out", str(out)]) == 2
    for flag, name in (("--storage", "s"), ("--logits", "l")):  # --logits: the old name of --storage
        assert cli_main(["dump", "--model", tiny_model_dir, "--prompts", str(prompts), "--out", str(tmp_path / name),
                         "--max-new-tokens", "2", flag, "topk:5", "--no-progress"]) == 0
        assert load_dump(tmp_path / name).storage == "topk:5"
    err = capsys.readouterr().err
    assert "already holds a dump; pass resume=True (--resume)" in err
    assert err.count("logitparity dump: note: --logits is the old spelling of --storage; use --storage "
                     "(the old one goes in the next release)") == 1


def test_cli_missing_model(tmp_path, capsys):
    assert cli_main(["dump", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "d")]) == 2
    assert "does not exist locally" in capsys.readouterr().err


# --- the embedded default model ----------------------------------------------------------

@pytest.mark.slow
def test_default_model_end_to_end(tmp_path):
    from logitparity.models import default_gguf_path, default_model_dir, file_sha256

    gguf = default_gguf_path()
    path = default_model_dir()  # converts on first use
    t = time.perf_counter()
    assert default_model_dir() == path and time.perf_counter() - t < 2.0  # cached
    lm = load_model()
    ident = lm.identity
    assert ident["model"]["format"] == "gguf" and ident["model"]["weights_hash"] == file_sha256(gguf)
    assert ident["tokenizer"]["vocab_size"] == 49152 and ident["tokenizer"]["chat_template_hash"]
    (long,) = [p for p in load_prompts() if p.category == "long_context"]
    assert len(lm.tokenizer(long.text)["input_ids"]) >= 1000
    by_id = {p.id: p for p in load_prompts()}
    prompts = [by_id["factual-capital-france"], by_id["math-algebra"], by_id["edge-short-hi"]]
    d = capture(lm, tmp_path / "d", prompts=prompts, max_new_tokens=8, batch_size=2)
    r = d.record("factual-capital-france")
    assert r["chat_template"] is True
    assert "Paris" in lm.tokenizer.decode(r["generated_token_ids"])
    assert d.vocab_size == 49152
    s = capture(lm, tmp_path / "s", mode="score", reference_dump=d, prompts=None, batch_size=3)
    for pid in d.ids:
        np.testing.assert_allclose(s.logits(pid), d.logits(pid), atol=2e-3, rtol=0)


# --- durability, context, code from data ------------------------------------------------

def _varied_prompts(n: int) -> list[Prompt]:
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    return [Prompt(f"v{i}", "x", " ".join(words[: 1 + (7 * i) % 12])) for i in range(n)]


def test_resume_mid_batch_is_bitwise_identical(lm, tmp_path, monkeypatch):
    """Interrupted after the first prompt of the second batch: the resumed
    run recomputes that batch whole, so every row is bitwise the uninterrupted
    run's and every prompt kept its batch (before: batches were cut from what
    was left, so the resumed prompts shared other batches)."""
    prompts = _varied_prompts(9)
    fresh = capture(lm, tmp_path / "fresh", prompts, batch_size=3)
    real_add = DumpWriter.add
    calls = {"n": 0}

    def add_then_die(self, record, logits):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_add(self, record, logits)
        self.flush()  # as if each prompt reached disk on its own

    monkeypatch.setattr(DumpWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        capture(lm, tmp_path / "d", prompts, batch_size=3)
    monkeypatch.setattr(DumpWriter, "add", real_add)
    assert len(load_dump(tmp_path / "d")) == 4  # one batch and one prompt of the next
    resumed = capture(lm, tmp_path / "d", prompts, batch_size=3, resume=True)
    assert sorted(resumed.ids) == sorted(fresh.ids)
    for pid in fresh.ids:
        a, b = resumed.record(pid), fresh.record(pid)
        assert a["generated_token_ids"] == b["generated_token_ids"]
        assert a["timing"]["batch_size"] == b["timing"]["batch_size"], pid
        np.testing.assert_array_equal(resumed.logits(pid), fresh.logits(pid))


def test_resume_recaptures_a_truncated_shard(lm, tmp_path, capsys):
    prompts = _varied_prompts(6)
    fresh = capture(lm, tmp_path / "fresh", prompts, batch_size=2)
    out = tmp_path / "d"
    capture(lm, out, prompts, batch_size=2)
    shards = sorted(out.glob("shard-*.safetensors"))
    assert len(shards) == 3  # one per batch
    lost = {r["id"] for r in load_dump(out).records if r["shard"] == shards[1].name}
    shards[1].write_bytes(shards[1].read_bytes()[:-100])  # a torn copy or a disk error
    with pytest.raises(ValueError, match=r"size: expected .* bytes .*truncated or corrupt shard"):
        load_dump(out)
    resumed = capture(lm, out, prompts, batch_size=2, resume=True)
    assert "its prompts are recaptured" in capsys.readouterr().err
    assert sorted(resumed.ids) == sorted(fresh.ids) and len(lost) == 2
    assert resumed.manifest["run"]["prompts"] == 2 and resumed.manifest["run"]["resumed"] is True
    for pid in fresh.ids:
        np.testing.assert_array_equal(resumed.logits(pid), fresh.logits(pid))


def test_prompt_longer_than_the_context_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    import logitparity.capture.hf as hf

    long = Prompt("long", "x", "alpha beta gamma delta " * 700)
    short = Prompt("short", "x", "hello")
    loads = []
    real = hf.load_model
    monkeypatch.setattr(hf, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    with pytest.raises(ValueError, match=r"1 prompt\(s\) exceed the model's context of 2048 positions: 'long' "
                                         r"\(\d+ prompt tokens, \d+ positions\); lower --max-new-tokens.*--truncate-prompts"):
        run_capture(tiny_model_dir, [short, long], tmp_path / "d", max_new_tokens=4, progress=False)
    assert loads == [] and not (tmp_path / "d").exists()
    d = load_dump(run_capture(tiny_model_dir, [short, long], tmp_path / "t", max_new_tokens=4, progress=False,
                              truncate_prompts=True))
    r = d.record("long")
    assert len(r["prompt_token_ids"]) == 2048 - 4 + 1 and r["truncated_from"] > 2048
    assert "truncated_from" not in d.record("short") and loads == [1]


def test_model_directory_code_never_runs(tiny_model_dir, tmp_path):
    """A model directory asking for custom code (auto_map) cannot make the
    package import it: trust_remote_code is off everywhere."""
    import shutil

    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir, evil)
    marker = tmp_path / "pwned"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                  "from transformers import LlamaForCausalLM as EvilModel\n")
    cfg = json.loads((evil / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    (evil / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((evil / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["evil.EvilTok", None]}
    (evil / "tokenizer_config.json").write_text(json.dumps(tc))
    try:
        run_capture(str(evil), PROMPTS[:1], tmp_path / "d", max_new_tokens=2, progress=False)
    except ValueError as e:  # refusing is fine; running the code is not
        assert "could not load" in str(e)
    assert not marker.exists()
