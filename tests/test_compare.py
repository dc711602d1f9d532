"""compare_dumps on constructed dumps: every figure against float64 numpy
references or hand-counted values, every compatibility error.

The helpers at the top (manifest, write_dump, planted) are shared with
test_report.py and test_cli_compare.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from logitparity.compare import IncompatibleRuns, IncompleteRuns, compare_dumps, is_valid_json, repeated_ngrams, run_speed
from logitparity.dump import DumpWriter, bf16_to_float32, load_dump

V = 40  # vocabulary of the constructed dumps
N_TOKENS = 16


def manifest(mode: str = "greedy", *, vocab: int = V, **over) -> dict:
    m = {
        "engine": {"name": "synthetic", "version": "0"},
        "model": {"path": "none", "config_hash": "c0ffee", "weights_hash": "beef"},
        "tokenizer": {"vocab_size": vocab, "tokens_hash": "sha256:tok-1", "eos_token_ids": [1],
                      "special_tokens": {"eos_token": {"token": "</s>", "id": 1}}},
        "dtype": "fp32",
        "device": "cpu",
        "decoding": {"mode": mode, "max_new_tokens": N_TOKENS},
        "libraries": {"numpy": np.__version__},
        "run": {"wall_s": 2.0, "tokens_per_s": 64.0, "peak_host_rss_bytes": 2**30, "peak_gpu_bytes": None},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(m.get(k), dict):
            m[k] = {**m[k], **v}
        else:
            m[k] = v
    return m


def record(i: int, tokens, *, category: str | None = None, stop: str = "max_new_tokens",
           prompt: str | None = None, prompt_ids=None, timing=None) -> dict:
    return {
        "id": f"p{i}", "category": category or ("math" if i % 2 == 0 else "code"),
        "prompt": prompt if prompt is not None else f"prompt number {i}", "chat_template": False,
        "prompt_token_ids": prompt_ids if prompt_ids is not None else [5, 6, 7 + i],
        "generated_token_ids": [int(t) for t in tokens], "stop_reason": stop,
        "timing": timing or {"ttft_s": 0.003, "decode_tokens_per_s": 40.0, "batch_size": 1},
    }


def write_dump(path, items, *, man=None, storage="full", logits_dtype="fp32") -> str:
    """items: [(record, logits [n, vocab] float32)]."""
    with DumpWriter(path, man or manifest(), storage=storage, logits_dtype=logits_dtype) as w:
        for rec, x in items:
            w.add(rec, np.asarray(x, dtype=np.float32).reshape(len(rec["generated_token_ids"]), -1))
    return str(path)


def peaked_row(rng, tok: int, margin: float, vocab: int = V) -> np.ndarray:
    """Random logits whose argmax is tok, ahead of the runner-up by margin."""
    r = rng.normal(0.0, 1.0, vocab).astype(np.float32)
    r[tok] = -10.0
    r[tok] = r.max() + margin
    return r


SPLITS = [None, 0, 3, 5, 9, 12, None, 15]  # planted first divergences
NEAR = [False, True, False, True, False, False, False, False]  # near-tie at the split?


def planted(tmp_path, *, cand_dtype="fp32", noise=0.01, seed=0, storage="full", cand_storage=None,
            splits=SPLITS, near=NEAR):
    """A reference and a candidate with divergences at known positions.

    Before its split the candidate's rows are the reference's plus small
    noise; at the split the reference's top-1 beats the runner-up by 0.2
    logits (near-tie) or 3.0 (real), and the candidate swaps the two.
    -> (ref_path, cand_path, ref_rows, cand_rows) with rows as float32 lists.
    """
    rng = np.random.default_rng(seed)
    ref_items, cand_items, ref_rows, cand_rows = [], [], [], []
    for i, (d, nt) in enumerate(zip(splits, near)):
        rt = [int(t) for t in rng.integers(2, V, N_TOKENS)]
        rows = np.stack([peaked_row(rng, t, 2.0) for t in rt])
        ct = list(rt)
        crow = rows + rng.normal(0.0, noise, rows.shape).astype(np.float32)
        if d is not None:
            alt = 2 + (rt[d] - 2 + 1) % (V - 2)
            m = 0.2 if nt else 3.0
            r = rng.normal(0.0, 1.0, V).astype(np.float32)
            r[rt[d]], r[alt] = 6.0 + m, 6.0
            rows[d] = r
            c = r.copy()
            c[alt] = 6.0 + m + 0.5
            crow[d] = c
            ct[d] = alt
            for j in range(d + 1, N_TOKENS):
                ct[j] = int(rng.integers(2, V))
                crow[j] = peaked_row(rng, ct[j], 2.0)
        ref_items.append((record(i, rt), rows))
        cand_items.append((record(i, ct), crow))
        ref_rows.append(rows)
        cand_rows.append(crow)
    ref = write_dump(tmp_path / "ref", ref_items, storage=storage)
    cm = manifest(dtype=cand_dtype)
    cand = write_dump(tmp_path / "cand", cand_items, man=cm, storage=cand_storage or storage,
                      logits_dtype=cand_dtype if (cand_storage or storage) == "full" else "fp32")
    return ref, cand, ref_rows, cand_rows


def np_metrics(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
    """Independent float64 reference of the row metrics used here."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    la = a - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)) - a.max(-1, keepdims=True)
    lb = b - np.log(np.exp(b - b.max(-1, keepdims=True)).sum(-1, keepdims=True)) - b.max(-1, keepdims=True)
    pa, pb = np.exp(la), np.exp(lb)
    idx = np.arange(len(t))
    srt_a = np.sort(a, -1)
    return {
        "kl_ref_cand": (pa * (la - lb)).sum(-1),
        "kl_cand_ref": (pb * (lb - la)).sum(-1),
        "delta_p": pb[idx, t] - pa[idx, t],
        "same_top1": a.argmax(-1) == b.argmax(-1),
        "max_abs_logprob": np.abs(la - lb).max(-1),
        "margin_ref": srt_a[:, -1] - srt_a[:, -2],
    }


def _compared_rows(ref_rows, cand_rows, ref_tokens, splits):
    """Concatenate the rows both runs computed from the same prefix."""
    A, B, T = [], [], []
    for ra, cb, rt, d in zip(ref_rows, cand_rows, ref_tokens, splits):
        n = N_TOKENS if d is None else d + 1
        A.append(ra[:n])
        B.append(cb[:n])
        T.append(rt[:n])
    return np.concatenate(A), np.concatenate(B), np.concatenate(T)


# --------------------------------------------------------------------------


def test_identical_dumps_match_everywhere(tmp_path):
    ref, _, _, _ = planted(tmp_path)
    c = compare_dumps(ref, ref, policy="lossless")
    assert c.verdict.passed
    assert all(p.first_divergence is None and p.split is None for p in c.prompts)
    for n in (1, 10, 50):
        assert c.greedy_match(n).rate == 1.0
    assert c.exact_match().k == len(SPLITS)
    assert len(c.tokens) == len(SPLITS) * N_TOKENS
    assert np.all(c.tokens.kl_ref_cand == 0) and np.all(np.abs(c.tokens.js) < 1e-12)
    assert c.metric("max_abs_logprob.max") == (0.0, "")
    hist = c.divergence_histogram()
    assert hist[-1] == {"lo": None, "hi": None, "count": len(SPLITS)}
    assert sum(b["count"] for b in hist[:-1]) == 0
    assert c.length_ratio() == 1.0


def test_planted_divergences(tmp_path):
    ref, cand, rr, cr = planted(tmp_path)
    c = compare_dumps(ref, cand, n_values=(5, 10, 50))
    assert [p.first_divergence for p in c.prompts] == SPLITS
    # greedy match at N: prompts whose split is None or >= N
    assert c.greedy_match(5).k == 6 and c.greedy_match(10).k == 4 and c.greedy_match(50).k == 2
    assert c.greedy_match(1).k == 7
    assert c.exact_match().k == 2
    assert c.metric("greedy_match@10")[0] == pytest.approx(0.5)
    hist = {(b["lo"], b["hi"]): b["count"] for b in c.divergence_histogram()}
    assert hist == {(0, 0): 1, (1, 1): 0, (2, 3): 1, (4, 7): 1, (8, 15): 3, (None, None): 2}
    assert [p.split for p in c.prompts] == [None, "near-tie", "real", "near-tie", "real", "real", None, "real"]
    assert c.splits() == {"near-tie": 2, "real": 4, "length": 0}
    ref_tokens = [load_dump(ref).records[i]["generated_token_ids"] for i in range(len(SPLITS))]
    for p, ra, cb, d in zip(c.prompts, rr, cr, SPLITS):
        if d is None:
            assert p.n_compared == N_TOKENS and math.isnan(p.margin_ref_at_split)
            continue
        assert p.n_compared == d + 1
        s = np.sort(ra[d].astype(np.float64))
        assert p.margin_ref_at_split == pytest.approx(s[-1] - s[-2], abs=1e-5)
        s = np.sort(cb[d].astype(np.float64))
        assert p.margin_cand_at_split == pytest.approx(s[-1] - s[-2], abs=1e-5)
        # top alternatives at the split, with probabilities
        pa = np.exp(ra[d] - np.log(np.exp(ra[d].astype(np.float64)).sum()))
        assert [t for t, _ in p.split_top_ref][:2] == [p.ref_tokens[d], p.cand_tokens[d]]
        assert p.split_top_ref[0][1] == pytest.approx(pa.max(), rel=1e-5)
        assert p.split_top_cand[0][0] == p.cand_tokens[d]
    # per-token metrics over the positions both saw with the same prefix
    A, B, T = _compared_rows(rr, cr, ref_tokens, SPLITS)
    want = np_metrics(A, B, T)
    assert len(c.tokens) == len(T)
    np.testing.assert_allclose(c.tokens.kl_ref_cand, want["kl_ref_cand"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(c.tokens.kl_cand_ref, want["kl_cand_ref"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(c.tokens.delta_p, want["delta_p"], rtol=1e-4, atol=1e-7)
    assert c.metric("kl_ref_cand.mean")[0] == pytest.approx(want["kl_ref_cand"].mean(), rel=1e-4)
    assert c.metric("same_top1")[0] == pytest.approx(want["same_top1"].mean())
    assert c.same_top1().k == int(want["same_top1"].sum())
    summary = c.token_summary(c.token_prompt == 0)
    assert summary.rows == N_TOKENS and summary.fields["kl_ref_cand"].mean == pytest.approx(
        want["kl_ref_cand"][:N_TOKENS].mean(), rel=1e-4)
    assert c.metric("max_abs_logprob.max")[0] == pytest.approx(want["max_abs_logprob"].max(), rel=1e-4)
    # positions < P only
    pos = np.concatenate([np.arange(N_TOKENS if d is None else d + 1) for d in SPLITS])
    assert c.metric("kl_ref_cand.mean@4")[0] == pytest.approx(want["kl_ref_cand"][pos < 4].mean(), rel=1e-4)
    assert not c.verdict.passed


def test_near_tie_margin_is_configurable(tmp_path):
    ref, cand, _, _ = planted(tmp_path)
    c = compare_dumps(ref, cand, near_tie_margin=0.1)
    assert c.splits() == {"near-tie": 0, "real": 6, "length": 0}
    c = compare_dumps(ref, cand, near_tie_margin=5.0)
    assert c.splits() == {"near-tie": 6, "real": 0, "length": 0}


def test_bf16_candidate_is_read_as_bfloat16(tmp_path):
    ref, cand, rr, cr = planted(tmp_path, cand_dtype="bf16")
    c = compare_dumps(ref, cand)
    bits = load_dump(cand).logits("p0")
    assert bits.dtype == np.uint16
    want = np_metrics(rr[0], bf16_to_float32(bits), np.asarray(load_dump(ref).records[0]["generated_token_ids"]))
    np.testing.assert_allclose(c.tokens.kl_ref_cand[c.token_prompt == 0], want["kl_ref_cand"], rtol=1e-4, atol=1e-7)


def test_max_positions_caps_each_prompt(tmp_path):
    ref, cand, _, _ = planted(tmp_path)
    c = compare_dumps(ref, cand, max_positions=4)
    assert [p.n_compared for p in c.prompts] == [4, 1, 4, 4, 4, 4, 4, 4]
    # the divergence is still found from the tokens, and classified from its own row
    assert [p.first_divergence for p in c.prompts] == SPLITS
    full = compare_dumps(ref, cand)
    assert [p.split for p in c.prompts] == [p.split for p in full.prompts]
    assert [p.margin_ref_at_split for p in c.prompts] == pytest.approx(
        [p.margin_ref_at_split for p in full.prompts], nan_ok=True)
    assert [p.split_top_cand for p in c.prompts] == [p.split_top_cand for p in full.prompts]


def test_early_stop_counts_only_when_both_stopped_identically(tmp_path):
    rng = np.random.default_rng(1)

    def rows(toks):
        return np.stack([peaked_row(rng, t, 2.0) for t in toks])

    a = [3, 4, 1]  # stops on eos (token 1) after 3 tokens
    b = [3, 4, 5, 6, 7]
    ref = write_dump(tmp_path / "r", [(record(0, a, stop="eos"), rows(a)), (record(1, a, stop="eos"), rows(a)),
                                       (record(2, [3, 4], stop="stop_token"), rows([3, 4]))])
    cand = write_dump(tmp_path / "c", [(record(0, a, stop="eos"), rows(a)), (record(1, b), rows(b)),
                                        (record(2, [3, 4, 9]), rows([3, 4, 9]))])
    c = compare_dumps(ref, cand, n_values=(2, 10))
    p0, p1, p2 = c.prompts
    assert p0.identical and p0.matches_at(10)  # both stopped identically
    assert p1.first_divergence == 2 and p1.split == "real" and not p1.matches_at(10) and p1.matches_at(2)
    assert p2.first_divergence == 2 and p2.split == "length" and not p2.matches_at(10)
    assert c.greedy_match(10).k == 1 and c.greedy_match(2).k == 3
    assert c.length_ratio() == pytest.approx((3 + 5 + 3) / (3 + 3 + 2))
    assert c.stop_reasons() == {"eos": {"reference": 2, "candidate": 1},
                                "max_new_tokens": {"reference": 0, "candidate": 2},
                                "stop_token": {"reference": 1, "candidate": 0}}


def test_score_mode_candidate_is_teacher_forced(tmp_path):
    rng = np.random.default_rng(2)
    items_r, items_c, R, C, toks = [], [], [], [], []
    split_at = [None, 4, 0]
    for i, d in enumerate(split_at):
        rt = [int(t) for t in rng.integers(2, V, 8)]
        r = np.stack([peaked_row(rng, t, 2.0) for t in rt])
        cnd = r + rng.normal(0, 0.05, r.shape).astype(np.float32)
        if d is not None:
            cnd[d, rt[d]] = cnd[d].max() - 1.0 - cnd[d, rt[d]] + cnd[d, rt[d]]  # the candidate prefers another token
            cnd[d, rt[d]] = np.sort(cnd[d])[-2] - 0.5
        items_r.append((record(i, rt), r))
        items_c.append((record(i, rt), cnd))  # scored on the reference's tokens
        R.append(r), C.append(cnd), toks.append(rt)
    ref = write_dump(tmp_path / "r", items_r)
    cand = write_dump(tmp_path / "c", items_c, man=manifest("score"))
    c = compare_dumps(ref, cand)
    assert c.mode == "teacher-forced"
    assert len(c.tokens) == 3 * 8  # every position, also after a split
    assert [p.first_divergence for p in c.prompts] == split_at
    assert c.prompts[1].cand_tokens[:4] == toks[1][:4] and c.prompts[1].cand_tokens[4] == int(C[1][4].argmax())
    want = np_metrics(np.concatenate(R), np.concatenate(C), np.concatenate(toks))
    np.testing.assert_allclose(c.tokens.kl_ref_cand, want["kl_ref_cand"], rtol=1e-4, atol=1e-7)
    assert c.greedy_match(4).k == 2 and c.greedy_match(5).k == 1
    assert math.isnan(c.metric("length_ratio")[0])
    assert any("teacher-forced" in n for n in c.notes)


def test_padded_vocabulary_is_compared_over_the_common_part(tmp_path):
    rng = np.random.default_rng(3)
    rt = [int(t) for t in rng.integers(2, V, 6)]
    r = np.stack([peaked_row(rng, t, 2.0) for t in rt])
    pad = np.full((6, 8), -np.inf, dtype=np.float32)
    cnd = np.concatenate([r + rng.normal(0, 0.05, r.shape).astype(np.float32), pad], axis=1)
    ref = write_dump(tmp_path / "r", [(record(0, rt), r)])
    cand = write_dump(tmp_path / "c", [(record(0, rt), cnd)])
    c = compare_dumps(ref, cand)
    want = np_metrics(r, cnd[:, :V], np.asarray(rt))
    np.testing.assert_allclose(c.tokens.kl_ref_cand, want["kl_ref_cand"], rtol=1e-4, atol=1e-7)
    assert any("padded vocabulary" in n and f"common first {V}" in n for n in c.notes)


def test_padded_vocabulary_narrower_than_tokenizer_is_an_error(tmp_path):
    rng = np.random.default_rng(3)
    r = np.stack([peaked_row(rng, 3, 2.0, vocab=V + 8)])
    ref = write_dump(tmp_path / "r", [(record(0, [3]), r)], man=manifest(vocab=V + 8))
    cand = write_dump(tmp_path / "c", [(record(0, [3]), r[:, :V])], man=manifest(vocab=V + 8))
    with pytest.raises(IncompatibleRuns, match=r"narrower is below the tokenizer's 48 tokens"):
        compare_dumps(ref, cand)


def _np_bucket_kl(ra, ia, lse_a, rb, ib, lse_b):
    """Reference of the top-K bound for one row: buckets = tokens stored by
    both, plus one tail (plain Python sets)."""
    pa = {int(t): math.exp(float(v) - lse_a) for v, t in zip(ra, ia)}
    pb = {int(t): math.exp(float(v) - lse_b) for v, t in zip(rb, ib)}
    both = sorted(set(pa) & set(pb))
    P = [pa[t] for t in both] + [max(0.0, 1 - sum(pa[t] for t in both))]
    Q = [pb[t] for t in both] + [max(0.0, 1 - sum(pb[t] for t in both))]
    return sum(p * math.log(p / q) for p, q in zip(P, Q) if p > 0)


@pytest.mark.parametrize("cand_storage", ["topk:8", "full"])
def test_topk_dumps_give_a_kl_lower_bound(tmp_path, cand_storage):
    ref, cand, rr, cr = planted(tmp_path, storage="topk:8", cand_storage=cand_storage, noise=0.3)
    c = compare_dumps(ref, cand)
    assert c.kl_is_bound and c.storage == "topk:8"
    assert any("lower bound" in n for n in c.notes)
    assert any("top-10 overlap not computed" in n for n in c.notes)
    assert [p.first_divergence for p in c.prompts] == SPLITS
    rd, cdump = load_dump(ref), load_dump(cand)
    ref_tokens = [r["generated_token_ids"] for r in rd.records]
    A, B, T = _compared_rows(rr, cr, ref_tokens, SPLITS)
    full = np_metrics(A, B, T)["kl_ref_cand"]
    got = c.tokens.kl_ref_cand
    assert np.all(got <= full + 1e-6)  # a bound
    # and exactly the bucket KL, row by row
    want = []
    for i, d in enumerate(SPLITS):
        n = N_TOKENS if d is None else d + 1
        va, ia, la, _ = rd.topk(f"p{i}")
        if cand_storage == "full":
            x = cdump.logits(f"p{i}").astype(np.float64)
            lb = np.log(np.exp(x).sum(-1))
            ib = np.tile(np.arange(V), (x.shape[0], 1))
            vb = x
        else:
            vb, ib, lb, _ = cdump.topk(f"p{i}")
        want += [_np_bucket_kl(va[j], ia[j], la[j], vb[j], ib[j], lb[j]) for j in range(n)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert np.isnan(c.tokens.cosine).all() and np.isnan(c.tokens.entropy_ref).all()
    assert c.tokens.topk_common.keys() == {1, 5}
    np.testing.assert_array_equal(c.tokens.same_top1, A.argmax(-1) == B.argmax(-1))


# ---- compatibility errors -------------------------------------------------


def _one(tmp_path, name, man=None, rec=None, toks=(3, 4), logits=None):
    rng = np.random.default_rng(0)
    toks = list(toks)
    x = logits if logits is not None else np.stack([peaked_row(rng, t, 2.0) for t in toks])
    return write_dump(tmp_path / name, [(rec or record(0, toks), x)], man=man)


@pytest.mark.parametrize(
    "cand_manifest, match",
    [
        (manifest(tokenizer={"tokens_hash": "sha256:x"}),
         r'different tokenizers: tokenizer.tokens_hash differs \(reference "sha256:tok-1", candidate "sha256:x"\)'),
        (manifest(tokenizer={"eos_token_ids": [2]}),
         r"stop differently \(same tokenizer, other stop rule\): decoding.eos_token_ids differs \(reference \[1\]; "
         r"candidate \[2\]; only in the reference: \[1\]; only in the candidate: \[2\]\)"),
        (manifest(tokenizer={"vocab_size": 41}), r"tokenizer.vocab_size differs \(reference 40, candidate 41\)"),
        (manifest(tokenizer={"special_tokens": {}}), r"tokenizer.special_tokens"),
        (manifest(decoding={"stop_token_ids": [9]}), r"stop rule\): decoding.stop_token_ids differs \(reference null, candidate \[9\]\)"),
        (manifest("sample"), r"decoding mode differs: reference 'greedy', candidate 'sample'"),
        (manifest(decoding={"max_new_tokens": 32}), r"decoding setting max_new_tokens differs: reference 16, candidate 32"),
    ],
)
def test_manifest_mismatches_are_named(tmp_path, cand_manifest, match):
    ref = _one(tmp_path, "r")
    cand = _one(tmp_path, "c", man=cand_manifest)
    with pytest.raises(IncompatibleRuns, match=match):
        compare_dumps(ref, cand)


def test_sampling_settings_must_match(tmp_path):
    ref = _one(tmp_path, "r", man=manifest("sample", decoding={"temperature": 0.7, "seed": 1}))
    cand = _one(tmp_path, "c", man=manifest("sample", decoding={"temperature": 0.7, "seed": 2}))
    with pytest.raises(IncompatibleRuns, match=r"decoding setting seed differs: reference 1, candidate 2"):
        compare_dumps(ref, cand)


def test_score_reference_needs_score_candidate(tmp_path):
    ref = _one(tmp_path, "r", man=manifest("score"))
    cand = _one(tmp_path, "c")
    with pytest.raises(IncompatibleRuns, match=r"reference is a score-mode dump and the candidate is 'greedy'"):
        compare_dumps(ref, cand)


def test_score_candidate_on_other_tokens(tmp_path):
    ref = _one(tmp_path, "r")
    cand = _one(tmp_path, "c", man=manifest("score"), toks=(3, 5))
    with pytest.raises(IncompatibleRuns, match=r"'p0': the candidate was scored on other tokens.*position 1.*--reference-dump"):
        compare_dumps(ref, cand)


def test_prompt_text_mismatch(tmp_path):
    ref = _one(tmp_path, "r")
    cand = _one(tmp_path, "c", rec=record(0, [3, 4], prompt="something else"))
    with pytest.raises(IncompatibleRuns, match=r"prompt 'p0' has different text"):
        compare_dumps(ref, cand)


def test_prompt_token_ids_mismatch(tmp_path):
    ref = _one(tmp_path, "r")
    cand = _one(tmp_path, "c", rec=record(0, [3, 4], prompt_ids=[5, 6, 9, 9]))
    with pytest.raises(IncompatibleRuns, match=r"tokenized differently: prompt_token_ids differ at index 2 \(lengths 3 and 4\)"):
        compare_dumps(ref, cand)


def test_no_common_prompts(tmp_path):
    ref = _one(tmp_path, "r")
    cand = _one(tmp_path, "c", rec={**record(0, [3, 4]), "id": "other"})
    with pytest.raises(IncompatibleRuns, match=r"no prompt id in common"):
        compare_dumps(ref, cand)


def test_prompts_on_one_side_are_listed(tmp_path):
    rng = np.random.default_rng(0)
    x = np.stack([peaked_row(rng, t, 2.0) for t in (3, 4)])
    ref = write_dump(tmp_path / "r", [(record(i, [3, 4]), x) for i in range(3)])
    cand = write_dump(tmp_path / "c", [(record(i, [3, 4]), x) for i in (1, 2, 7)])
    with pytest.raises(IncompleteRuns, match=r"incomplete input: the candidate lacks 1 of the reference's 3 prompts "
                                            r"\('p0'\); the reference lacks 1 of the candidate's 3 prompts \('p7'\)"):
        compare_dumps(ref, cand)
    c = compare_dumps(ref, cand, allow_partial=True)
    assert c.only_ref == ["p0"] and c.only_cand == ["p7"]
    assert [p.id for p in c.prompts] == ["p1", "p2"]
    assert c.incomplete == ["the candidate lacks 1 of the reference's 3 prompts ('p0')",
                            "the reference lacks 1 of the candidate's 3 prompts ('p7')"]
    md = c.to_markdown().splitlines()
    assert md[2].startswith("**INCOMPLETE INPUT") and "candidate lacks 1" in md[4]
    assert c.to_dict()["incomplete"] == c.incomplete


def test_a_run_marked_incomplete_never_passes(tmp_path):
    rng = np.random.default_rng(0)
    x = np.stack([peaked_row(rng, t, 2.0) for t in (3, 4)])
    ref = write_dump(tmp_path / "r", [(record(0, [3, 4]), x)])
    cand = write_dump(tmp_path / "c", [(record(0, [3, 4]), x)])
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["complete"] = False
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IncompleteRuns, match=r"the candidate run is incomplete \(.*manifest complete is false"):
        compare_dumps(ref, cand)
    assert compare_dumps(ref, cand, allow_partial=True).verdict.passed  # identical rows: judged, and flagged


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"near_tie_margin": -1}, ValueError, r"near_tie_margin must be a number >= 0"),
        ({"n_values": (0,)}, ValueError, r"n_values must be positive"),
        ({"max_positions": 0}, ValueError, r"max_positions must be a positive int"),
        ({"decode": 3}, TypeError, r"decode must be 'auto', None or a function"),
        ({"policy": "nope"}, ValueError, r"unknown policy 'nope'"),
    ],
)
def test_argument_errors(tmp_path, kw, exc, match):
    ref = _one(tmp_path, "r")
    with pytest.raises(exc, match=match):
        compare_dumps(ref, ref, **kw)


def test_bad_dump_argument_type():
    with pytest.raises(TypeError, match=r"ref must be a dump directory path or a Dump"):
        compare_dumps(3, 4)


# ---- policy metrics and non-finite rows ------------------------------------


def test_nan_logits_fail_the_verdict_with_a_reason(tmp_path):
    rng = np.random.default_rng(0)
    x = np.stack([peaked_row(rng, t, 2.0) for t in (3, 4)])
    y = x.copy()
    y[1, 7] = np.nan
    ref = write_dump(tmp_path / "r", [(record(0, [3, 4]), x)])
    cand = write_dump(tmp_path / "c", [(record(0, [3, 4]), y)])
    c = compare_dumps(ref, cand)
    assert not c.verdict.passed
    kl = c.verdict.results[1]
    assert math.isnan(kl.measured) and "NaN or +inf" in kl.note


def test_infinite_kl_is_reported_not_averaged_away(tmp_path):
    rng = np.random.default_rng(0)
    x = np.stack([peaked_row(rng, t, 2.0) for t in (3, 4)])
    y = x.copy()
    y[0, 9] = -np.inf  # the candidate masks a token the reference can produce
    ref = write_dump(tmp_path / "r", [(record(0, [3, 4]), x)])
    cand = write_dump(tmp_path / "c", [(record(0, [3, 4]), y)])
    c = compare_dumps(ref, cand)
    assert c.tokens.kl_ref_cand[0] == np.inf
    value, note = c.metric("kl_ref_cand.mean")
    assert value == np.inf and "+inf" in note
    assert not c.verdict.passed


def test_teacher_forced_pair_judged_on_its_top1(tmp_path):
    # two score-mode dumps: greedy match at N is what greedy decoding of each
    # would do, read from both top-1s at every position < N
    ref = _one(tmp_path, "r", man=manifest("score"))
    c = compare_dumps(ref, ref)
    value, note = c.metric("greedy_match@10")
    assert value == 1.0 and "teacher-forced pair" in note
    assert c.verdict.passed  # fp16 no longer fails for "greedy_match@10 not measured"
    assert math.isnan(c.metric("length_ratio")[0])
    rng = np.random.default_rng(1)
    x = np.stack([peaked_row(rng, 3, 2.0), peaked_row(rng, 4, 2.0)])
    y = x.copy()
    y[1] = peaked_row(rng, 7, 2.0)  # the top-1 changes at position 1
    a = write_dump(tmp_path / "a", [(record(0, [3, 4]), x)], man=manifest("score"))
    b = write_dump(tmp_path / "b", [(record(0, [3, 4]), y)], man=manifest("score"))
    c = compare_dumps(a, b)
    assert c.metric("greedy_match@1")[0] == 1.0 and c.metric("greedy_match@2")[0] == 0.0
    assert c.metric("exact_match")[0] == 0.0 and not c.verdict.passed


def test_run_speed_from_records_and_run(tmp_path):
    rng = np.random.default_rng(0)
    x = np.stack([peaked_row(rng, t, 2.0) for t in (3, 4)])
    t1 = {"ttft_s": 0.01, "decode_tokens_per_s": 40.0, "batch_size": 2}
    t2 = {"ttft_s": 0.01, "decode_tokens_per_s": 60.0, "batch_size": 2}
    path = write_dump(tmp_path / "r", [(record(0, [3, 4], timing=t1), x), (record(1, [3, 4], timing=t2), x)])
    s = run_speed(load_dump(path))
    # 6 prompt tokens in one batch whose first token took 0.01 s
    assert s["prefill_tokens_per_s"] == pytest.approx(600.0)
    assert s["decode_tokens_per_s"] == pytest.approx(50.0)
    assert s["wall_s"] == 2.0 and s["tokens_per_s"] == 64.0 and s["peak_host_bytes"] == 2**30
    assert s["peak_gpu_bytes"] is None


# ---- drift helpers ---------------------------------------------------------


def test_repeated_ngrams():
    assert repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4, 1], n=4) == (2, 6)
    assert repeated_ngrams([1, 2, 3], n=4) == (0, 0)
    assert repeated_ngrams([7] * 6, n=2) == (4, 5)


@pytest.mark.parametrize(
    "text, ok",
    [('{"a": 1}', True), ('  [1, 2]\n', True), ('```json\n{"a": [1]}\n```', True), ('{"a": 1', False),
     ("Sure! {\"a\": 1}", False), ("", False)],
)
def test_is_valid_json(text, ok):
    assert is_valid_json(text) is ok


def test_json_validity_and_repetition_use_decoded_text(tmp_path):
    rng = np.random.default_rng(0)
    texts = {3: '{"a": 1}', 4: "oops", 5: "[1]"}

    def dec(ids):
        return "".join(texts.get(i, "") for i in ids)

    toks = [(3,), (3,), (5,)]
    ctoks = [(3,), (4,), (5,)]
    x = lambda ts: np.stack([peaked_row(rng, t, 2.0) for t in ts])
    ref = write_dump(tmp_path / "r", [(record(i, t, category="json"), x(t)) for i, t in enumerate(toks)])
    cand = write_dump(tmp_path / "c", [(record(i, t, category="json"), x(t)) for i, t in enumerate(ctoks)])
    c = compare_dumps(ref, cand, decode=dec)
    jr, jc = c.json_validity()
    assert (jr.k, jr.n, jc.k, jc.n) == (3, 3, 2, 3)
    assert c.prompts[1].cand_text == "oops"


def test_decode_auto_without_tokenizer_shows_ids(tmp_path):
    ref = _one(tmp_path, "r")
    c = compare_dumps(ref, ref)
    assert c.decode is None and c.prompts[0].ref_text is None
    assert c.json_validity() is None


def test_repr_and_dict_are_consistent(tmp_path):
    ref, cand, _, _ = planted(tmp_path)
    c = compare_dumps(ref, cand)
    assert "FAIL under policy 'fp16'" in repr(c)
    d = c.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["free_running"]["greedy_match"]["10"]["k"] == 4
