"""logitparity.testing: assert_logits_match and assert_dumps_match against
hand-made logits, with every figure in the failure message checked against a
float64 NumPy reference."""

from __future__ import annotations

import re

import numpy as np
import pytest

from logitparity.dump import DumpWriter
from logitparity.policy import load_policy
from logitparity.testing import apply_limits, assert_dumps_match, assert_logits_match, logits_comparison

FP16 = "half-precision candidate: same greedy tokens almost always, tiny KL"


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl64(a: np.ndarray, b: np.ndarray) -> float:
    la, lb = log_softmax64(a), log_softmax64(b)
    return float((np.exp(la) * (la - lb)).sum())


def top5(x: np.ndarray) -> list[tuple[int, float]]:
    lp = log_softmax64(x)
    order = np.lexsort((np.arange(x.size), -np.asarray(x, np.float64)))[:5]
    return [(int(i), float(np.exp(lp[i]))) for i in order]


def fmt_top(pairs, names=None) -> str:
    if names is None:
        return ", ".join(f"{i} {p:.3f}" for i, p in pairs)
    return ", ".join(f"{names(i)} ({i}) {p:.3f}" for i, p in pairs)


def noisy(shape, scale=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    ref = (rng.normal(size=shape) * 3).astype(np.float32)
    return ref, (ref + rng.normal(size=shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------
# passing


@pytest.mark.parametrize("shape", [(50,), (12, 50), (3, 12, 50)], ids=["vocab", "positions", "batch"])
def test_small_noise_passes_fp16(shape):
    ref, cand = noisy(shape)
    comp = assert_logits_match(ref, cand)
    assert comp.verdict.passed and comp.mode == "teacher-forced"
    rows = int(np.prod(shape[:-1]))
    assert len(comp.tokens) == rows
    want = np.mean([kl64(a, b) for a, b in zip(ref.reshape(rows, -1), cand.reshape(rows, -1))])
    assert comp.metric("kl_ref_cand.mean@100")[0] == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_identical_passes_lossless():
    ref, _ = noisy((2, 5, 40))
    comp = assert_logits_match(ref, ref.copy(), "lossless")
    assert comp.metric("max_abs_logprob.max")[0] == 0.0
    assert comp.metric("exact_match")[0] == 1.0


def test_torch_bf16_candidate_passes_fp16():
    torch = pytest.importorskip("torch")
    ref = torch.randn(2, 8, 300, generator=torch.Generator().manual_seed(0)) * 3
    comp = assert_logits_match(ref, ref.to(torch.bfloat16))
    assert comp.verdict.passed
    assert 0 < comp.metric("kl_ref_cand.mean@100")[0] < 1e-3


# --------------------------------------------------------------------------
# the failure message


def planted():
    """ref [3, 6] small integers (exact in float32); cand = ref except row 1,
    whose top-1 moves from token 5 to token 2."""
    ref = np.array([[0, 1, 2, 3, 4, 6], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]], np.float32)
    cand = ref.copy()
    cand[1] = [0, 1, 6, 3, 4, 5]
    return ref, cand


def test_exact_message_for_a_planted_divergence():
    ref, cand = planted()
    with pytest.raises(AssertionError) as e:
        assert_logits_match(ref, cand)
    kls = [kl64(a, b) for a, b in zip(ref, cand)]
    kl_rev = kl64(cand[1], ref[1])
    dlp = np.abs(log_softmax64(ref[1]) - log_softmax64(cand[1])).max()
    want = "\n".join([
        f"logits do not match under policy 'fp16' ({FP16})",
        "  FAILED: greedy_match@10 = 0, need >= 0.99",
        f"  FAILED: kl_ref_cand.mean@100 = {np.mean(kls):.4g}, need <= 0.01",
        "  compared 3 positions, shape [3, 6]",
        "worst position (earliest position whose top-1 tokens differ): row 1",
        f"  KL(ref ‖ cand) = {kls[1]:.4g} nats, KL(cand ‖ ref) = {kl_rev:.4g} nats, max |Δ log-prob| = {dlp:.4g} nats",
        f"  ref  top-5: {fmt_top(top5(ref[1]))}",
        f"  cand top-5: {fmt_top(top5(cand[1]))}",
        "first top-1 difference: row 1 (real divergence, reference top-1 margin 1 logits); 1 of 1 sequences differ",
    ])
    assert str(e.value) == want


def test_message_names_batch_position_tokens_and_context():
    ref, cand = noisy((2, 16, 50))
    cand[1, 7] = np.roll(cand[1, 7], 1)  # a bad repack of one row
    names = {i: chr(97 + i % 26) for i in range(50)}

    class Tok:
        def decode(self, ids):
            return "".join(names[i] for i in ids)

    inputs = np.arange(32).reshape(2, 16) % 50
    with pytest.raises(AssertionError) as e:
        assert_logits_match(ref, cand, tokenizer=Tok(), input_ids=inputs, prompt_ids=["p0", "p1"])
    msg = str(e.value)
    assert "worst position (earliest position whose top-1 tokens differ): sequence 'p1' (batch 1), position 7" in msg
    assert "after 'qrstuvwx'" in msg  # the last 8 inputs up to position 7 of sequence 1 (ids 16..23)
    assert f"  ref  top-5: {fmt_top(top5(ref[1, 7]), lambda i: repr(names[i]))}" in msg
    assert f"  cand top-5: {fmt_top(top5(cand[1, 7]), lambda i: repr(names[i]))}" in msg
    assert f"KL(ref ‖ cand) = {kl64(ref[1, 7], cand[1, 7]):.4g} nats" in msg
    assert "1 of 2 sequences differ" in msg
    assert len(msg) < 2000 and msg.count("\n") < 15


def test_message_for_a_lossless_failure_points_at_the_largest_logprob_error():
    ref, _ = noisy((4, 30), seed=1)
    cand = ref.copy()
    cand[2, 3] += 1e-3  # below any top-1 change
    with pytest.raises(AssertionError) as e:
        assert_logits_match(ref, cand, "lossless")
    msg = str(e.value)
    dlp = np.abs(log_softmax64(ref[2]) - log_softmax64(cand[2])).max()
    assert msg.splitlines()[1] == f"  FAILED: max_abs_logprob.max = {dlp:.4g}, need <= 1e-05"
    assert msg.splitlines()[2] == "  passed: exact_match = 1, need >= 1"
    assert "worst position (largest max_abs_logprob): row 2" in msg
    assert "first top-1 difference" not in msg


def test_nan_row_is_the_worst_position():
    ref, cand = noisy((6, 20))
    cand[4, 0] = np.nan
    with pytest.raises(AssertionError) as e:
        assert_logits_match(ref, cand)
    msg = str(e.value)
    assert "FAILED: kl_ref_cand.mean@100 = not measured, need <= 0.01 [1 compared rows hold NaN or +inf logits]" in msg
    assert "worst position (first row holding NaN or +inf logits): row 4" in msg
    assert "NaN/+inf entries: ref 0, cand 1" in msg


# --------------------------------------------------------------------------
# policies and limits


def test_limits_override_and_add_thresholds():
    ref, cand = planted()
    comp = assert_logits_match(ref, cand, limits={"greedy_match@10": 0.0, "mean_kl": 10.0})
    assert [r.limit for r in comp.verdict.results] == [0.0, 10.0]
    with pytest.raises(AssertionError, match=r"FAILED: same_top1 = 0\.6667, need >= 0\.9"):
        assert_logits_match(ref, cand, limits={"greedy_match@10": 0.0, "mean_kl": 10.0, "same_top1": 0.9})


def test_apply_limits_keeps_the_policy_name_and_drops_noise_factors():
    pol = apply_limits("fp16", {"kl_ref_cand.mean@100": 0.5, "kl_ref_cand.max": 2})
    assert pol.name == "fp16"
    assert [(t.metric, t.comparison, t.limit, t.noise_factor) for t in pol.thresholds] == [
        ("greedy_match@10", ">=", 0.99, None), ("kl_ref_cand.mean@100", "<=", 0.5, None),
        ("kl_ref_cand.max", "<=", 2.0, None)]
    assert apply_limits("fp16", None) == load_policy("fp16")


@pytest.mark.parametrize("limits, match", [
    ({"kl_ref_cand.mena": 1.0}, r"unknown metric 'kl_ref_cand.mena': no statistic 'mena'; did you mean 'mean'"),
    ({"delta_p.mean": 0.1}, r"limit for 'delta_p.mean': this metric has no better direction"),
    ({"kl_ref_cand.max": "small"}, r"limit for 'kl_ref_cand.max' must be a number, got 'small'"),
])
def test_bad_limits(limits, match):
    ref, cand = noisy((3, 10))
    with pytest.raises(ValueError, match=match):
        assert_logits_match(ref, cand, limits=limits)


def test_policy_with_length_ratio_is_rejected(tmp_path):
    p = tmp_path / "lengths.toml"
    p.write_text('[thresholds.len]\nmetric = "length_ratio"\ncomparison = "<="\nlimit = 1.1\n')
    ref, cand = noisy((3, 10))
    with pytest.raises(ValueError, match=r"policy 'lengths' has threshold 'len' on length_ratio, which needs "
                                         r"generated sequences; bare logits have none: use assert_dumps_match"):
        assert_logits_match(ref, cand, p)


# --------------------------------------------------------------------------
# input errors


@pytest.mark.parametrize("a, b, exc, match", [
    (np.zeros((2, 5, 10), np.float32), np.zeros((2, 6, 10), np.float32), ValueError,
     r"ref and cand must have the same shape, got \(2, 5, 10\) and \(2, 6, 10\)$"),
    (np.zeros((4, 10), np.float32), np.zeros((4, 12), np.float32), ValueError,
     r"got \(4, 10\) and \(4, 12\); one side may use a padded vocabulary"),
    (np.zeros((2, 2, 2, 10), np.float32), np.zeros((2, 2, 2, 10), np.float32), ValueError,
     r"ref must be \[vocab\], \[positions, vocab\] or \[batch, positions, vocab\], got shape \(2, 2, 2, 10\)"),
    (np.zeros((3, 10), np.float64), np.zeros((3, 10), np.float32), TypeError,
     r"ref must be float32, float16 or bfloat16 .*got float64"),
    (np.zeros((3, 10), np.float32), np.zeros((3, 10), np.uint16), TypeError,
     r"cand is uint16: pass bfloat16 logits as a torch.bfloat16 tensor"),
])
def test_input_errors(a, b, exc, match):
    with pytest.raises(exc, match=match):
        assert_logits_match(a, b)


def test_input_ids_and_prompt_ids_errors():
    ref, cand = noisy((2, 4, 10))
    with pytest.raises(ValueError, match=re.escape("input_ids must be [batch, positions] = [2, 4]")):
        assert_logits_match(ref, cand, input_ids=np.zeros((2, 5), np.int64))
    with pytest.raises(TypeError, match="input_ids must hold integer token ids, got dtype float32"):
        assert_logits_match(ref, cand, input_ids=np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="prompt_ids must name each of the 2 sequences, got 3 names"):
        assert_logits_match(ref, cand, prompt_ids=["a", "b", "c"])
    with pytest.raises(TypeError, match="tokenizer must have .decode"):
        assert_logits_match(ref, cand, tokenizer=42)


def test_logits_comparison_reports_without_asserting():
    ref, cand = planted()
    comp = logits_comparison(ref, cand)
    assert not comp.verdict.passed
    assert "# logitparity: candidate vs reference" in comp.to_markdown()
    assert comp.prompts[0].first_divergence == 1


# --------------------------------------------------------------------------
# dumps


def write_dump(path, logits, *, storage="full", ids=("greet", "sum")):
    """Greedy-mode dump of logits [prompts, positions, vocab] with each
    position's argmax as the generated token."""
    manifest = {"engine": {"name": "test"}, "decoding": {"mode": "greedy", "max_new_tokens": logits.shape[1]}}
    with DumpWriter(path, manifest, storage=storage) as w:
        for rid, rows in zip(ids, logits):
            w.add({"id": rid, "category": "chat", "prompt": rid, "chat_template": False, "prompt_token_ids": [1],
                   "generated_token_ids": [int(t) for t in rows.argmax(-1)], "stop_reason": "max_new_tokens"}, rows)
    return path


def test_dumps_match_and_mismatch(tmp_path):
    ref, cand = noisy((2, 12, 80))
    a = write_dump(tmp_path / "ref", ref)
    assert assert_dumps_match(a, write_dump(tmp_path / "ok", cand)).verdict.passed
    bad = cand.copy()
    bad[1, 4:] = np.roll(bad[1, 4:], 1, axis=-1)  # the candidate diverges at token 4 of 'sum'
    b = write_dump(tmp_path / "bad", bad)
    with pytest.raises(AssertionError) as e:
        assert_dumps_match(a, b)
    lines = str(e.value).splitlines()
    assert lines[0] == f"dumps do not match under policy 'fp16' ({FP16})"
    assert lines[1] == "  FAILED: greedy_match@10 = 0.5, need >= 0.99"
    assert lines[3] == f"  compared 17 positions of 2 prompts (free-running): {a} vs {b}"
    assert lines[4] == "worst position (earliest position whose top-1 tokens differ): prompt 'sum' (chat), generated token 4"
    assert lines[6] == f"  ref  top-5: {fmt_top(top5(ref[1, 4]))}"
    assert lines[7] == f"  cand top-5: {fmt_top(top5(bad[1, 4]))}"
    assert lines[8].startswith("first top-1 difference: prompt 'sum' (chat), generated token 4 (")


def test_topk_dump_message_says_kl_is_a_bound(tmp_path):
    ref, cand = noisy((2, 6, 200))
    cand[0, 2] = np.roll(cand[0, 2], 3)
    a = write_dump(tmp_path / "ref", ref, storage="topk:16")
    b = write_dump(tmp_path / "cand", cand)
    with pytest.raises(AssertionError) as e:
        assert_dumps_match(a, b)
    msg = str(e.value)
    assert "(lower bounds: top-K logits)" in msg
    assert msg.endswith("note: KL is a lower bound (top-K logits stored)")
    assert f"  ref  top-5: {fmt_top(top5(ref[0, 2]))}" in msg


def test_dumps_limits_and_errors(tmp_path):
    ref, cand = noisy((2, 5, 40))
    a, b = write_dump(tmp_path / "ref", ref), write_dump(tmp_path / "cand", cand)
    with pytest.raises(AssertionError, match=r"(?m)FAILED: kl_ref_cand.max = .*, need <= 0$"):
        assert_dumps_match(a, b, limits={"kl_ref_cand.max": 0.0})
    with pytest.raises(FileNotFoundError, match="no such dump directory"):
        assert_dumps_match(tmp_path / "missing", b)
