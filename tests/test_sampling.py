"""Sampling done right (logitparity.sampling): the sampled-from distribution
against hand-computed values, the capture's draws replayed from the stored
rows, and compare_sampled on the tiny random model against float64 numpy."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from logitparity.sampling import compare_sampled, draw, load_sample_set, sampling_logits, sampling_probs

E = math.e


def test_sampled_from_distribution_by_hand():
    # softmax(2, 1, 1, 0): cum 0.534 < 0.6, then 0.731 >= 0.6 -> keep token 0 and the lower of the
    # tied pair (token 1); renormalized: softmax(2, 1) = (e, 1) / (e + 1)
    p = sampling_probs([2.0, 1.0, 1.0, 0.0], 1.0, 0.6)
    np.testing.assert_allclose(p, [E / (E + 1), 1 / (E + 1), 0.0, 0.0], rtol=1e-15, atol=0)
    # the cumulative sum reaching top_p exactly stops there: (1/2, 1/2) at 0.5 keeps token 0 only
    np.testing.assert_array_equal(sampling_probs([0.0, 0.0], 1.0, 0.5), [1.0, 0.0])
    # temperature 0.5: softmax(2, 0)
    np.testing.assert_allclose(sampling_probs([1.0, 0.0], 0.5), [E**2 / (1 + E**2), 1 / (1 + E**2)], rtol=1e-15)
    # masked tokens stay masked; top_p = 1 keeps everything
    np.testing.assert_array_equal(sampling_probs([0.0, -np.inf], 0.7, 1.0), [1.0, 0.0])
    z = sampling_logits([[2.0, 1.0, 1.0, 0.0]], 2.0, 0.6)
    np.testing.assert_array_equal(z, [[1.0, 0.5, -np.inf, -np.inf]])
    # draws: inverse CDF in token-id order
    assert [draw(np.array([0.25, 0.5, 0.25]), u) for u in (0.0, 0.2499, 0.25, 0.74, 0.75, 0.9999)] == [0, 0, 1, 1, 2, 2]


def test_sampling_argument_errors():
    with pytest.raises(ValueError, match=r"temperature must be a number > 0, got 0"):
        sampling_probs([1.0], 0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\] or None, got 1.5"):
        sampling_logits([1.0], 1.0, 1.5)


# --------------------------------------------------------------------------
# on the tiny random model

torch = pytest.importorskip("torch")
SEEDS = [0, 1, 2, 3]
NEW = 10
T, TOP_P = 0.7, 0.9


@pytest.fixture(scope="module")
def sampled_runs(tiny_model_dir, tmp_path_factory):
    from logitparity.capture import load_model
    from logitparity.capture.plants import planted
    from logitparity.capture.seeds import capture_samples, score_samples
    from logitparity.prompts import Prompt

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    w = tmp_path_factory.mktemp("sampled")
    prompts = [Prompt(f"p{i}", "json" if i < 2 else "chat", t) for i, t in enumerate(
        ["Hello there", "What is 12 times 7?", "Once upon a time", "def add(a, b):", "Bonjour le monde"])]
    kw = dict(max_new_tokens=NEW, progress=False, temperature=T, top_p=TOP_P, batch_size=2)
    lm = load_model(tiny_model_dir)
    out = {"ref": capture_samples(lm, prompts, w / "ref", seeds=SEEDS, **kw)}
    out["same"] = capture_samples(lm, prompts, w / "same", seeds=SEEDS, **{**kw, "batch_size": 5})
    with planted(lm, "down_proj_roll", layer=0):
        out["bug"] = capture_samples(lm, prompts, w / "bug", seeds=SEEDS, **kw)
        out["bug_on_ref"] = score_samples(lm, out["ref"], w / "bug-on-ref", progress=False)
    out["ref_on_bug"] = score_samples(lm, out["bug"], w / "ref-on-bug", progress=False)
    out["lm"] = lm
    torch.set_num_threads(threads)
    return out


def test_draws_replay_from_the_stored_rows(sampled_runs):
    from logitparity.capture.decode import Sampler

    for s, d in zip(*[load_sample_set(sampled_runs["ref"]).seeds, load_sample_set(sampled_runs["ref"]).dumps]):
        assert d.manifest["decoding"]["seed"] == s and d.manifest["decoding"]["top_p"] == TOP_P
        sampler = Sampler(T, TOP_P, s)
        for r in d.records:
            gen = sampler.generator(r["id"])
            rows = d.logits(r["id"])
            got = [sampler.choose(torch.from_numpy(np.array(rows[j])), gen) for j in range(rows.shape[0])]
            assert got == r["generated_token_ids"], (s, r["id"])


def test_an_identical_candidate_passes_with_identical_draws(sampled_runs):
    sc = compare_sampled(sampled_runs["ref"], sampled_runs["same"], decode=None)
    assert sc.verdict.passed, sc.verdict
    assert sc.sampled_match(None).rate == 1.0 and len(sc.units) == 5 * len(SEEDS)
    assert sc.metric("length_p")[0] == 1.0 and sc.metric("token_frequency_js")[0] == 0.0
    assert np.nanmax(sc.tokens.kl_ref_cand) < 1e-6
    md = sc.to_markdown()
    assert "sampled match at N" in md and "greedy" not in md.lower()


def test_a_planted_bug_fails_and_every_figure_matches_float64(sampled_runs):
    sc = compare_sampled(sampled_runs["ref"], sampled_runs["bug"], cand_on_ref=sampled_runs["bug_on_ref"],
                         ref_on_cand=sampled_runs["ref_on_bug"], decode=None)
    assert not sc.verdict.passed
    assert {r.name: r.passed for r in sc.verdict.results}["sampled_js"] is False
    assert sc.paths == {"reference": True, "candidate": True}
    ref, bug = load_sample_set(sampled_runs["ref"]), load_sample_set(sampled_runs["bug"])
    cor, roc = load_sample_set(sampled_runs["bug_on_ref"]), load_sample_set(sampled_runs["ref_on_bug"])
    n_ref = sum(len(r["generated_token_ids"]) for d in ref.dumps for r in d.records)
    n_cand = sum(len(r["generated_token_ids"]) for d in bug.dumps for r in d.records)
    assert int((sc.token_path == 0).sum()) == n_ref and int((sc.token_path == 1).sum()) == n_cand
    # float64 numpy reference of the sampled-from KL along both paths of seed 2's first prompt
    ui = next(i for i, u in enumerate(sc.units) if u.id == "p0@seed=2")
    for path, (a_set, b_set), tok_set in ((0, (ref, cor), ref), (1, (roc, bug), bug)):
        k = SEEDS.index(2)
        A = np.asarray(a_set.dumps[k].logits("p0"), np.float64)
        B = np.asarray(b_set.dumps[k].logits("p0"), np.float64)
        toks = tok_set.dumps[k].record("p0")["generated_token_ids"]
        P, Q = sampling_probs(A, T, TOP_P), sampling_probs(B, T, TOP_P)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(P > 0, P * (np.log(P) - np.log(Q)), 0.0).sum(axis=1)
            nll_other = -np.log(Q[np.arange(len(toks)), toks] if path == 0 else P[np.arange(len(toks)), toks])
        m = (sc.token_unit == ui) & (sc.token_path == path)
        got = sc.tokens.kl_ref_cand[m]
        fin = np.isfinite(kl)
        np.testing.assert_array_equal(np.isfinite(got), fin)
        np.testing.assert_allclose(got[fin], kl[fin], rtol=1e-4, atol=1e-7)
        other = sc.tokens.nll_cand[m] if path == 0 else sc.tokens.nll_ref[m]
        np.testing.assert_allclose(other, nll_other, rtol=1e-4, atol=1e-6)
    # impossible draws: the drawn token outside the other side's nucleus (counted from the float64 reference)
    assert sc.impossible_draws("reference").n == n_ref
    d = sc.to_dict()
    assert d["paths"]["reference"]["positions"] == n_ref and d["match_label"] == "sampled"
    assert (d["format"], d["version"]) == ("logitparity-sampled-comparison", "1.0")


def test_sample_set_tags_new_and_legacy(sampled_runs, tmp_path):
    """A new index carries today's tag; one written before (tag with a dot,
    integer version; written here by hand) still loads."""
    from logitparity.sampling import SAMPLE_SET_FORMAT

    ref = Path(sampled_runs["ref"])
    idx = json.loads((ref / "samples.json").read_text())
    assert (idx["format"], idx["version"]) == (SAMPLE_SET_FORMAT, "1.0") == ("logitparity-sample-set", "1.0")
    legacy = tmp_path / "legacy"
    shutil.copytree(ref, legacy)
    (legacy / "samples.json").write_text(json.dumps({**idx, "format": "logitparity.sample-set", "version": 1}))
    got = load_sample_set(legacy)
    assert got.seeds == load_sample_set(ref).seeds == [0, 1, 2, 3] and got.mode == "sample"


def test_without_cross_scores_only_the_shared_prefix_is_compared(sampled_runs):
    sc = compare_sampled(sampled_runs["ref"], sampled_runs["bug"], decode=None)
    assert sc.paths == {"reference": False, "candidate": False} and not (sc.token_path == 1).any()
    want = 0
    for u, dv in zip(sc.units, sc.first_divergence):
        want += min(len(u.ref_tokens), len(u.cand_tokens)) if dv is None else min(dv + 1, len(u.ref_tokens),
                                                                                    len(u.cand_tokens))
    assert len(sc.token_path) == want
    assert any("not scored on the reference's samples" in n for n in sc.notes)


def test_sampled_compare_errors(sampled_runs, tmp_path):
    from logitparity.compare import IncompatibleRuns
    from logitparity.sampling import SAMPLE_SET_FORMAT

    one = load_sample_set(sampled_runs["ref"]).dumps[0]
    with pytest.raises(IncompatibleRuns, match=r"hold different seeds: .* has \[0, 1, 2, 3\], .* has \[0\]"):
        compare_sampled(sampled_runs["ref"], one.path, decode=None)
    with pytest.raises(IncompatibleRuns, match=r"is a 'score' dump; compare_sampled needs sample-mode dumps"):
        compare_sampled(sampled_runs["bug_on_ref"], sampled_runs["bug"], decode=None)
    with pytest.raises(ValueError, match=r"cand_on_ref .* must be a score-mode dump"):
        compare_sampled(sampled_runs["ref"], sampled_runs["bug"], cand_on_ref=sampled_runs["bug"], decode=None)
    with pytest.raises(IncompatibleRuns, match=r"was scored on other tokens than the sampled run drew"):
        compare_sampled(sampled_runs["ref"], sampled_runs["bug"], cand_on_ref=sampled_runs["ref_on_bug"], decode=None)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "samples.json").write_text('{"format": "x"}')
    with pytest.raises(ValueError, match=rf"samples.json: expected format '{SAMPLE_SET_FORMAT}', found format 'x'; "
                                         r"not a sample set: re-run `logitparity dump --seeds`"):
        load_sample_set(bad)
    (bad / "samples.json").write_text(f'{{"format": "{SAMPLE_SET_FORMAT}", "version": 9}}')
    with pytest.raises(ValueError, match=r"samples.json: version 9 is newer than this logitparity reads \(1.0\); upgrade"):
        load_sample_set(bad)
    (bad / "samples.json").write_text(f'{{"format": "{SAMPLE_SET_FORMAT}", "version": 1, "seeds": [0], '
                                      '"dumps": {"0": "../x"}}')
    with pytest.raises(ValueError, match=r"must be a directory name inside"):
        load_sample_set(bad)


def test_cli_dump_seeds_and_compare_sampled(sampled_runs, tiny_model_dir, tmp_path, capsys):
    from logitparity.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "category": "x", "text": "Hello there"}\n'
                       '{"id": "b", "category": "x", "text": "Once upon a time"}\n')
    base = ["dump", "--model", tiny_model_dir, "--prompts", str(prompts), "--max-new-tokens", "6", "--no-progress",
            "--torch-threads", "1"]
    assert main(base + ["--out", str(tmp_path / "r"), "--mode", "sample", "--seeds", "0-2", "--temperature", "0.8",
                        "--top-p", "0.95"]) == 0
    assert load_sample_set(tmp_path / "r").seeds == [0, 1, 2]
    assert main(base[:3] + ["--out", str(tmp_path / "r-on-r"), "--mode", "score", "--reference-dump",
                            str(tmp_path / "r"), "--no-progress", "--torch-threads", "1"]) == 0
    capsys.readouterr()
    rc = main(["compare", str(tmp_path / "r"), str(tmp_path / "r"), "--candidate-on-reference", str(tmp_path / "r-on-r"),
               "--report", str(tmp_path / "s.md"), "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "PASS: policy 'sampled'" in out and "sampled match at 10" in out
    assert "greedy" not in (tmp_path / "s.md").read_text().lower()
    assert main(["dump", "--model", tiny_model_dir, "--out", str(tmp_path / "g"), "--seeds", "0,1"]) == 2
    err = capsys.readouterr().err
    assert "--seeds needs --mode sample" in err


def test_compare_dumps_labels_sampled_splits_sampled(sampled_runs):
    """Two sample dumps through compare_dumps: a split is a different draw,
    never classified near-tie or real by the greedy margins."""
    from logitparity.compare import compare_dumps

    a, b = load_sample_set(sampled_runs["ref"]).dumps[0], load_sample_set(sampled_runs["bug"]).dumps[0]
    c = compare_dumps(a, b, decode=None)
    kinds = {p.split for p in c.prompts if p.split is not None}
    assert kinds and kinds <= {"sampled", "length"}
    assert c.splits()["sampled"] == sum(p.split == "sampled" for p in c.prompts) and c.splits()["real"] == 0
    v, note = c.metric("real_divergence@10")
    assert math.isnan(v) and "a split is a different draw" in note
    md = c.to_markdown()
    assert "sampled match at N" in md and "greedy match" not in md and "both runs were sampled" in md


def test_the_fast_nucleus_is_the_full_sort_bitwise():
    from logitparity import sampling

    rng = np.random.default_rng(5)
    rows = [rng.normal(0, 3, 5000), np.round(rng.normal(0, 1, 5000), 1), np.zeros(300), rng.normal(0, 0.01, 3000)]
    rows.append(np.r_[[5.0] * 3, rng.normal(-2, 0.5, 997)])  # a tie at the top
    for x in rows:
        for T in (0.5, 1.0, 2.0):
            p = sampling_probs(x, T)[None, :]
            for top_p in (0.05, 0.5, 0.9, 0.999, 1 - 1e-12):
                np.testing.assert_array_equal(sampling._nucleus(p, top_p), sampling._nucleus_full(p, top_p))
