"""The noise floor (floor.py): rounding steps, the bootstrap ratio test,
building and reading floors, the statistical verdict, tie-aware splits and
the teacher-forced continuation, on constructed dumps checked against float64
numpy; then the done-when of issue 9 pinned on the tiny model with the
planted bugs of logitparity.capture.plants."""

from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import pytest

from logitparity.cli import main
from logitparity.compare import compare_dumps
from logitparity.floor import (
    DEFAULT_FACTOR,
    RESOLUTION,
    build_floor,
    judge,
    load_floor,
    rounding_step,
    tie_tolerance,
    write_floor,
)
from logitparity.policy import load_policy
from logitparity.stats import ratio_test

from test_compare import N_TOKENS, manifest, np_metrics, peaked_row, record, write_dump

V = 40
N_PROMPTS = 8


def test_rounding_step():
    assert rounding_step("bf16", 20.0) == 0.125 and rounding_step("bf16", 16.0) == 0.125
    assert rounding_step("bf16", -31.9) == 0.125 and rounding_step("bf16", 15.99) == 0.0625
    assert rounding_step("fp16", 1.0) == 2.0 ** -10 and rounding_step("fp32", 1.5) == 2.0 ** -23
    assert rounding_step("bf16", 0.0) == 0.0
    with pytest.raises(ValueError, match="rounding_step: dtype must be one of"):
        rounding_step("int8", 1.0)


def test_ratio_test_against_hand_computation():
    x = np.array([1.0, 2.0, 3.0, 10.0])
    f = np.array([1.0, 1.0, 1.0, 1.0])
    idx = np.array([[0, 0, 1, 1], [2, 3, 3, 3], [0, 1, 2, 3], [1, 1, 1, 1], [3, 2, 1, 0]])
    t = ratio_test(x, f, factor=3.0, index=idx)
    assert t.ratio == 4.0
    want = [(1 + 1 + 2 + 2) / 4, (3 + 30) / 4, 16 / 4, 8 / 4, 16 / 4]  # 1.5, 8.25, 4, 2, 4
    assert t.p_value == pytest.approx((1 + sum(w <= 3.0 for w in want)) / 6)
    # inverted-cdf percentiles: order statistics ceil(q n) of the sorted ratios 1.5, 2, 4, 4, 8.25
    assert (t.ci_low, t.ci_high) == (1.5, 8.25)
    a = ratio_test(x, f, factor=3.0, resamples=500, seed=7)
    b = ratio_test(x, f, factor=3.0, resamples=500, seed=7)
    assert a == b  # seeded: deterministic
    with pytest.raises(ValueError, match="every floor sum must be > 0"):
        ratio_test(x, np.zeros(4), factor=2.0)
    with pytest.raises(ValueError, match="paired arrays of equal length"):
        ratio_test(x, f[:3], factor=2.0)
    with pytest.raises(ValueError, match="confidence must be in"):
        ratio_test(x, f, factor=2.0, confidence=1.5)


# --------------------------------------------------------------------------
# constructed runs: a reference, benign twins and candidates = reference + noise


def _runs(tmp_path, sigmas: dict[str, float], *, seed: int = 0, cand_man=None):
    """The reference and one dump per name whose rows are the reference's
    plus Gaussian noise of that sigma (same tokens, teacher-forced-like
    greedy dumps). -> {name: path}, ref rows, {name: rows}."""
    rng = np.random.default_rng(seed)
    toks = [[int(t) for t in rng.integers(2, V, N_TOKENS)] for _ in range(N_PROMPTS)]
    rows = [np.stack([peaked_row(rng, t, 4.0) for t in tt]) for tt in toks]
    out = {"ref": write_dump(tmp_path / "ref", [(record(i, t), r) for i, (t, r) in enumerate(zip(toks, rows))])}
    noisy = {}
    for name, s in sigmas.items():
        nr = [r + rng.normal(0.0, s, r.shape).astype(np.float32) for r in rows]
        noisy[name] = nr
        out[name] = write_dump(tmp_path / name, [(record(i, t), r) for i, (t, r) in enumerate(zip(toks, nr))],
                               man=cand_man)
    return out, rows, noisy, toks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _runs(tmp_path_factory.mktemp("floor"), {"twin_a": 0.01, "twin_b": 0.02, "same": 0.012,
                                                    "worse": 0.06, "clean": 0.0})


@pytest.fixture(scope="module")
def floor_file(runs, tmp_path_factory):
    p, *_ = runs
    path = tmp_path_factory.mktemp("ff") / "floor.json"
    assert main(["calibrate", "--dumps", p["ref"], p["twin_a"], "--dumps", p["ref"], p["twin_b"],
                 "--change", "noise 0.01", "--change", "noise 0.02", "--out", str(path)]) == 0
    return str(path)


def test_floor_is_the_per_position_envelope(runs, floor_file):
    p, rows, noisy, toks = runs
    fl = load_floor(floor_file)
    assert fl.version == 2 and [q.change for q in fl.pairs] == ["noise 0.01", "noise 0.02"]
    assert len(fl.prompts) == N_PROMPTS and fl.n_positions == N_PROMPTS * N_TOKENS
    for i in range(N_PROMPTS):
        t = np.asarray(toks[i])
        a = np_metrics(rows[i], noisy["twin_a"][i], t)
        b = np_metrics(rows[i], noisy["twin_b"][i], t)
        got = fl.prompts[f"p{i}"].values
        for f in ("kl_ref_cand", "kl_cand_ref", "max_abs_logprob"):
            np.testing.assert_allclose(got[f], np.maximum(a[f], b[f]), rtol=2e-3, atol=1e-9)
        np.testing.assert_allclose(got["top1_changed"], np.maximum(~a["same_top1"], ~b["same_top1"]))
    # the aggregate metrics noise_factor thresholds read: the worst pair
    kl_a = compare_dumps(p["ref"], p["twin_a"], decode=None).metric("kl_ref_cand.mean")[0]
    kl_b = compare_dumps(p["ref"], p["twin_b"], decode=None).metric("kl_ref_cand.mean")[0]
    assert fl.get("kl_ref_cand.mean") == pytest.approx(max(kl_a, kl_b))
    # a new file carries today's tag; one written before (tag with a dot, integer version) still loads
    doc = json.loads(Path(floor_file).read_text())
    assert (doc["format"], doc["version"]) == ("logitparity-noise-floor", "2.0")
    legacy = Path(floor_file + ".legacy")
    legacy.write_text(json.dumps({**doc, "format": "logitparity.noise-floor", "version": 2}))
    old = load_floor(legacy)
    assert old.version == 2 and [q.change for q in old.pairs] == ["noise 0.01", "noise 0.02"]
    np.testing.assert_array_equal(old.prompts["p0"].values["kl_ref_cand"], fl.prompts["p0"].values["kl_ref_cand"])
    # a round trip is exact
    again = load_floor(write_floor(fl, floor_file + ".2"))
    for pid, fp in fl.prompts.items():
        for f, v in fp.values.items():
            np.testing.assert_array_equal(again.prompts[pid].values[f], v)


def test_lookup_stops_where_the_prefix_differs(floor_file):
    fl = load_floor(floor_file)
    fp = fl.prompts["p0"]
    other = list(fp.tokens)
    other[5] = (other[5] + 1) % V
    got = fl.lookup("p0", other, np.arange(N_TOKENS))["kl_ref_cand"]
    assert np.all(np.isfinite(got[:6])) and np.all(np.isnan(got[6:]))  # row 5 still saw the same prefix
    assert np.all(np.isnan(fl.lookup("nope", other, np.arange(3))["kl_ref_cand"]))


def test_statistical_verdict_pass_and_fail(runs, floor_file):
    p, rows, noisy, toks = runs
    same = compare_dumps(p["ref"], p["same"], noise_floor=floor_file, decode=None)
    assert same.verdict.passed and same.verdict.policy == "noise-floor"
    worse = compare_dumps(p["ref"], p["worse"], noise_floor=floor_file, decode=None)
    assert not worse.verdict.passed
    # the ratio is sum(candidate) / sum(floor) over the paired positions
    fl = load_floor(floor_file)
    floor_sum = sum(np.maximum(fl.prompts[f"p{i}"].values["kl_ref_cand"], RESOLUTION["kl_ref_cand"]).sum()
                    for i in range(N_PROMPTS))
    cand_sum = sum(np_metrics(rows[i], noisy["worse"][i], np.asarray(toks[i]))["kl_ref_cand"].sum()
                   for i in range(N_PROMPTS))
    r = worse.verdict.results[0]
    assert r.metric == "kl_ref_cand.mean / floor" and r.limit == DEFAULT_FACTOR
    assert r.measured == pytest.approx(cand_sum / floor_sum, rel=2e-3)
    assert r.ci_low <= r.measured <= r.ci_high and r.p_value < 0.05 / 3 and not r.passed
    j = worse.floor_judgement
    assert (j.prompts, j.positions, j.unpaired) == (N_PROMPTS, N_PROMPTS * N_TOKENS, 0)
    # the same seed gives the same verdict; a clean candidate passes at ratio 0
    again = compare_dumps(p["ref"], p["worse"], noise_floor=floor_file, decode=None)
    assert again.verdict.results[0].p_value == r.p_value and again.verdict.results[0].ci_low == r.ci_low
    clean = compare_dumps(p["ref"], p["clean"], noise_floor=floor_file, decode=None)
    assert clean.verdict.passed and clean.verdict.results[0].measured == 0.0
    # a looser factor lets the worse candidate through; built-ins become floor-relative
    assert compare_dumps(p["ref"], p["worse"], noise_floor=floor_file, decode=None, factor=100.0).verdict.passed
    fp16 = compare_dumps(p["ref"], p["same"], noise_floor=floor_file, policy="fp16", decode=None)
    assert fp16.verdict.passed and fp16.verdict.policy == "fp16 (noise-floor relative)"
    md = worse.to_markdown()
    assert "Noise floor from" in md and "| noise 0.02 | free-running | fp32 / fp32 | 8 | 128 |" in md
    d = worse.to_dict()
    assert d["noise_floor"]["judgement"]["positions"] == 128 and len(d["noise_floor"]["pairs"]) == 2


def test_cli_compare_with_floor_exit_codes(runs, floor_file, tmp_path, capsys):
    p, *_ = runs
    assert main(["compare", p["ref"], p["same"], "--noise-floor", floor_file]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PASS: policy 'noise-floor'") and "noise floor " + floor_file in out
    assert "2 benign pair(s): noise 0.01; noise 0.02; 8 prompts, 128 positions" in out
    assert main(["compare", p["ref"], p["worse"], "--noise-floor", floor_file]) == 1
    assert "FAIL kl_ref_cand.mean / floor" in capsys.readouterr().out
    assert main(["compare", p["ref"], p["worse"], "--noise-floor", floor_file, "--factor", "0.5"]) == 2
    assert "factor must be a number >= 1" in capsys.readouterr().err
    assert main(["compare", p["ref"], p["worse"], "--factor", "3"]) == 2
    assert "pass noise_floor=FILE" in capsys.readouterr().err


def test_floor_errors(runs, floor_file, tmp_path):
    p, *_ = runs
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps({"format": "logitparity.noise-floor", "version": 1, "change": "x",
                              "metrics": {"kl_ref_cand.mean": 1e-3}}))
    with pytest.raises(ValueError, match="is version 1 .*re-run `logitparity calibrate`"):
        compare_dumps(p["ref"], p["same"], noise_floor=v1, decode=None)
    # the old file keeps working for noise_factor policies
    pol = tmp_path / "pol.toml"
    pol.write_text('[thresholds.kl]\nmetric = "kl_ref_cand.mean"\ncomparison = "<="\nnoise_factor = 1e6\n')
    assert compare_dumps(p["ref"], p["same"], noise_floor=v1, policy=str(pol), decode=None).verdict.passed
    # a floor of other prompts covers nothing
    other, *_ = _runs(tmp_path / "o", {"x": 0.01}, seed=5)
    rec = json.loads(Path(floor_file).read_text())
    rec["prompts"] = {"q" + k: v for k, v in rec["prompts"].items()}
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="covers none of the compared positions"):
        compare_dumps(p["ref"], p["same"], noise_floor=moved, decode=None)
    bad = tmp_path / "bad.json"
    rec = json.loads(Path(floor_file).read_text())
    rec["prompts"]["p0"]["kl_ref_cand"] = [0.0]
    bad.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="is malformed .*has 1 values for 16 tokens"):
        load_floor(bad)
    with pytest.raises(ValueError, match=r"v7.json: version 7 is newer than this logitparity reads \(1.0, 2.0\)"):
        (tmp_path / "v7.json").write_text('{"format": "logitparity.noise-floor", "version": 7}')
        load_floor(tmp_path / "v7.json")
    comp = compare_dumps(p["ref"], p["same"], decode=None)
    with pytest.raises(ValueError, match="confidence must be in"):
        judge(comp, load_floor(floor_file), confidence=1.0)


def test_calibrate_argument_errors(runs, capsys):
    p, *_ = runs
    assert main(["calibrate", "--dumps", p["ref"], p["twin_a"], "--change", "a", "--change", "b"]) == 2
    assert "--change was given 2 time(s) for 1 --dumps pair(s)" in capsys.readouterr().err
    assert main(["calibrate", "--dumps", p["ref"], p["twin_a"], "--vary", "batch"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["calibrate", "--vary", "batch,colour"]) == 2
    assert "--vary: unknown change 'colour'" in capsys.readouterr().err
    assert main(["calibrate", "--vary", "dtype"]) == 2
    assert "dtype needs a value bf16, fp16 or fp32" in capsys.readouterr().err


def test_contradictory_and_unsatisfiable_thresholds(tmp_path, capsys):
    both = tmp_path / "both.toml"
    both.write_text('[thresholds.lo]\nmetric = "same_top1"\ncomparison = ">="\nlimit = 0.9\n'
                    '[thresholds.hi]\nmetric = "same_top1"\ncomparison = "<="\nlimit = 0.5\n')
    with pytest.raises(ValueError, match=r"thresholds 'lo' \(same_top1 >= 0.9\) and 'hi' \(same_top1 <= 0.5\) "
                                         "contradict each other"):
        load_policy(str(both))
    never = tmp_path / "never.toml"
    never.write_text('[thresholds.g]\nmetric = "greedy_match@10"\ncomparison = ">="\nlimit = 1.5\n')
    with pytest.raises(ValueError, match=r"threshold 'g' \(greedy_match@10 >= 1.5\) can never be met: "
                                         r"greedy_match@10 lies in \[0, 1\]"):
        load_policy(str(never))
    neg = tmp_path / "neg.toml"
    neg.write_text('[thresholds.k]\nmetric = "kl_ref_cand.mean"\ncomparison = "<="\nlimit = -1\n')
    with pytest.raises(ValueError, match="can never be met"):
        load_policy(str(neg))
    rng = np.random.default_rng(0)
    ref = write_dump(tmp_path / "r", [(record(0, [3]), np.stack([peaked_row(rng, 3, 2.0)]))])
    assert main(["compare", ref, ref, "--policy", str(both)]) == 2
    assert "contradict each other" in capsys.readouterr().err


def test_tie_aware_split_and_continuation(tmp_path):
    """A split at a margin of 0.3 logits: a near-tie against a floor whose
    margins move by 0.2 there, real against one that moves by 0.01. Past
    it, the continuation's rows are compared too."""
    rng = np.random.default_rng(3)
    toks = [int(t) for t in rng.integers(2, V, N_TOKENS)]
    rows = np.stack([peaked_row(rng, t, 3.0) for t in toks])
    d = 4
    alt = 2 + (toks[d] - 2 + 1) % (V - 2)
    r = rng.normal(0.0, 1.0, V).astype(np.float32)
    r[toks[d]], r[alt] = 5.3, 5.0
    rows[d] = r
    ref = write_dump(tmp_path / "ref", [(record(0, toks), rows)])
    ct = list(toks)
    ct[d] = alt
    crow = rows.copy()
    crow[d, alt] = 5.6
    cand = write_dump(tmp_path / "cand", [(record(0, ct[:d + 1] + [2] * (N_TOKENS - d - 1)), crow)])
    cont_rows = rows.copy()
    cont_rows[d + 1:] += 0.5 * rng.normal(size=cont_rows[d + 1:].shape).astype(np.float32)
    cont = write_dump(tmp_path / "cont", [(record(0, toks), cont_rows)], man=manifest("score"))

    def floor_with(move: float) -> str:
        twin_rows = rows.copy()
        twin_rows[:, toks[0]] += 0.0
        twin = write_dump(tmp_path / f"twin{move}", [(record(0, toks), twin_rows)])
        fl = build_floor([(compare_dumps(ref, twin, decode=None), "identical")])
        fl.prompts["p0"].values["margin_move"][:] = move
        fl.prompts["p0"].values["kl_ref_cand"][:] = 1e-6
        return str(write_floor(fl, tmp_path / f"floor{move}.json"))

    wide, narrow = floor_with(0.2), floor_with(0.01)
    assert tie_tolerance(load_floor(wide), "p0", toks, d, 5.3, "fp32") == pytest.approx(0.4)
    # bf16 rounding at a top-1 logit of 5.3 is 2^-5: the tolerance is 2 x 0.03125
    assert tie_tolerance(load_floor(narrow), "p0", toks, d, 5.3, "bf16") == pytest.approx(0.0625)
    c = compare_dumps(ref, cand, noise_floor=wide, decode=None)
    assert c.prompts[0].split == "near-tie" and c.tie_aware and len(c.tokens) == d + 1
    c = compare_dumps(ref, cand, noise_floor=narrow, decode=None)
    assert c.prompts[0].split == "real" and c.real_divergence(10).k == 1
    assert c.greedy_match(10).rate == 0.0
    # the continuation: positions past the split, teacher-forced, count
    c = compare_dumps(ref, cand, noise_floor=wide, decode=None, continuation=cont)
    assert len(c.tokens) == N_TOKENS and int(c.token_forced.sum()) == N_TOKENS - d - 1
    want = np_metrics(rows[d + 1:], cont_rows[d + 1:], np.asarray(toks[d + 1:]))["kl_ref_cand"]
    np.testing.assert_allclose(c.tokens.kl_ref_cand[d + 1:], want, rtol=1e-4, atol=1e-9)
    assert not c.verdict.passed  # the bug behind the tie is seen
    with pytest.raises(ValueError, match="must be a score-mode dump"):
        compare_dumps(ref, cand, continuation=cand, decode=None)
    with pytest.raises(ValueError, match="already teacher-forced"):
        compare_dumps(ref, cont, continuation=cont, decode=None)


def test_sampled_runs_are_labelled_sampled(tmp_path):
    rng = np.random.default_rng(0)
    x = np.stack([peaked_row(rng, 3, 2.0)])
    m = manifest("sample", decoding={"temperature": 0.7, "top_p": None, "seed": 1})
    a = write_dump(tmp_path / "a", [(record(0, [3]), x)], man=m)
    c = compare_dumps(a, a, decode=None)
    assert c.sampled and c.match_label == "sampled"
    md = c.to_markdown()
    assert "sampled match at N = 10" in md and "greedy match" not in md


# --------------------------------------------------------------------------
# the done-when of issue 9 on the tiny model (2 layers; plants in layer 0)

torch = pytest.importorskip("torch")

PROMPTS = ["Hello there", "What is 12 times 7?", "Once upon a time", "def add(a, b):", "Bonjour le monde",
           "The quick brown fox", "A lighthouse keeper", "Name three colors"]
# The random tiny model's norm weights are already ones, so norm_weight_missing
# is a no-op here and is left out of this test (it fails on the default model).
TINY_BUGS = ["down_proj_roll", "attn_scale", "head_swap", "rope_offset", "fp16_down_proj_input", "int8_gate_proj",
             "causal_leak"]
LAYER = 0
NEW = 12


@pytest.fixture(scope="module")
def tiny_runs(tiny_model_dir, tmp_path_factory):
    from logitparity.capture import capture, load_model
    from logitparity.capture.plants import planted
    from logitparity.prompts import Prompt

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    w = tmp_path_factory.mktemp("tiny-floor")
    prompts = [Prompt(f"p{i}", "c", t) for i, t in enumerate(PROMPTS)]
    kw = dict(max_new_tokens=NEW, progress=False)
    out = {}
    for dtype in ("fp32", "bf16"):
        lm = load_model(tiny_model_dir, dtype=dtype)
        if dtype == "fp32":
            out["ref"] = capture(lm, prompts, w / "ref", batch_size=1, **kw)
            out["batch"] = capture(lm, prompts, w / "batch", batch_size=8, **kw)
            out["mode"] = capture(lm, None, w / "mode", mode="score", reference_dump=out["ref"], progress=False)
            out["fp32/order"] = capture(lm, prompts[::-1], w / "order", batch_size=3, **kw)
            out["fp32/batch4"] = capture(lm, prompts, w / "b4", batch_size=4, **kw)
        else:
            out["twin"] = capture(lm, None, w / "twin", mode="score", reference_dump=out["ref"], batch_size=1,
                                  progress=False)
            out["bf16/clean"] = capture(lm, prompts, w / "bf16-clean", batch_size=4, **kw)
            out["bf16/clean-tf"] = capture(lm, None, w / "bf16-clean-tf", mode="score", reference_dump=out["ref"],
                                           batch_size=4, progress=False)
        for name in TINY_BUGS + ["weights_cloned", "split_gate_up"]:
            with planted(lm, name, layer=LAYER):
                out[f"{dtype}/{name}"] = capture(lm, prompts, w / f"{dtype}-{name}", batch_size=1, **kw)
                out[f"{dtype}/{name}-tf"] = capture(lm, None, w / f"{dtype}-{name}-tf", mode="score",
                                                    reference_dump=out["ref"], progress=False)
        del lm
    f32 = build_floor([(compare_dumps(out["ref"], out["batch"], decode=None), "batch 1 vs 8"),
                       (compare_dumps(out["ref"], out["mode"], decode=None), "greedy vs score")])
    f16 = build_floor([(compare_dumps(out["ref"], out["twin"], decode=None), "precision twin bf16")])
    out["floor32"] = write_floor(f32, w / "floor32.json")
    out["floor16"] = write_floor(f16, w / "floor16.json")
    torch.set_num_threads(threads)
    return out


def _verdict(runs, cand, floor, **kw):
    return compare_dumps(runs["ref"], runs[cand], noise_floor=runs[floor], decode=None, **kw)


@pytest.mark.parametrize("bug", TINY_BUGS)
def test_fp32_floor_fails_every_planted_bug(tiny_runs, bug):
    for cand, cont in ((f"fp32/{bug}", tiny_runs[f"fp32/{bug}-tf"]), (f"fp32/{bug}-tf", None)):
        c = _verdict(tiny_runs, cand, "floor32", continuation=cont)
        assert not c.verdict.passed, (cand, c.verdict)


@pytest.mark.parametrize("cand", ["fp32/weights_cloned", "fp32/weights_cloned-tf", "fp32/split_gate_up",
                                  "fp32/split_gate_up-tf", "fp32/order", "fp32/batch4"])
def test_fp32_floor_passes_every_lossless_change(tiny_runs, cand):
    c = _verdict(tiny_runs, cand, "floor32")
    assert c.verdict.passed, c.verdict
    assert c.verdict.results[0].measured < 1.5


def test_bf16_floor_passes_clean_and_fails_bugs_5x_over(tiny_runs):
    for cand in ("bf16/clean", "bf16/clean-tf"):
        c = _verdict(tiny_runs, cand, "floor16")
        assert c.verdict.passed, (cand, c.verdict)
    ratios = {}
    for bug in TINY_BUGS:
        for cand in (f"bf16/{bug}", f"bf16/{bug}-tf"):
            c = _verdict(tiny_runs, cand, "floor16")
            r = c.verdict.results[0].measured
            ratios[cand] = r
            if r >= 5.0:
                assert not c.verdict.passed, (cand, r)
            if r <= 1.5:
                assert c.verdict.passed, (cand, r)
    # the bugs that move this model's KL by > 5x its bf16 floor exist and fail
    assert sum(r >= 5.0 for r in ratios.values()) >= 4, ratios


def test_report_names_floor_changes_and_size(tiny_runs):
    c = _verdict(tiny_runs, "fp32/down_proj_roll", "floor32")
    md = c.to_markdown()
    assert f"Noise floor from `{tiny_runs['floor32']}`: 2 benign pair(s), 8 prompts" in md
    assert "| batch 1 vs 8 | free-running | fp32 / fp32 |" in md and "| greedy vs score | teacher-forced |" in md
    assert math.isfinite(c.verdict.results[0].p_value)


def test_real_divergence_is_a_policy_metric(tmp_path):
    from test_compare import planted as planted_dumps

    ref, cand, _, _ = planted_dumps(tmp_path)
    c = compare_dumps(ref, cand, decode=None)
    # SPLITS/NEAR of test_compare: real splits at 3, 9, 12 and 15; near-ties at 0 and 5
    assert c.metric("real_divergence@10")[0] == pytest.approx(2 / 8)
    assert c.metric("real_divergence@100")[0] == pytest.approx(4 / 8)
    pol = tmp_path / "rd.toml"
    pol.write_text('[thresholds.rd]\nmetric = "real_divergence@10"\ncomparison = "<="\nlimit = 0.25\n')
    assert compare_dumps(ref, cand, policy=str(pol), decode=None).verdict.passed
    pol.write_text('[thresholds.rd]\nmetric = "real_divergence@10"\ncomparison = "<="\nlimit = 0.2\n')
    assert not compare_dumps(ref, cand, policy=str(pol), decode=None).verdict.passed
    with pytest.raises(ValueError, match="N in real_divergence@N must be >= 1"):
        from logitparity.policy import parse_metric

        parse_metric("real_divergence@0")


def test_calibrate_vary_captures_the_pairs(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 2+2?\nName a colour.\nWrite a haiku about rain.\n")
    out = tmp_path / "floor.json"
    threads = torch.get_num_threads()
    try:
        rc = main(["calibrate", "--model", tiny_model_dir, "--prompts", str(prompts), "--limit", "3",
                   "--max-new-tokens", "5", "--vary", "batch,mode,dtype=bf16", "--batch-sizes", "1", "3",
                   "--out", str(out), "--keep", str(tmp_path / "k")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = capsys.readouterr().out
    assert "precision twin: the reference model in bf16, scored on the reference's tokens: 3 prompts" in text
    fl = load_floor(out)
    assert [p.mode for p in fl.pairs] == ["free-running", "teacher-forced", "teacher-forced"]
    assert fl.twin_dtype == "bf16" and fl.pairs[2].dtype_b == "bf16"
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["batch", "dtype-bf16", "mode", "reference"]
    # the envelope is at least the twin's figure at every position
    twin = compare_dumps(tmp_path / "k" / "reference", tmp_path / "k" / "dtype-bf16", decode=None)
    for i, p in enumerate(twin.prompts):
        v = twin.tokens.kl_ref_cand[twin.token_prompt == i]
        assert np.all(fl.prompts[p.id].values["kl_ref_cand"][: v.size] >= v)
    assert main(["calibrate", "--model", tiny_model_dir, "--vary", "dtype=fp32", "--prompts", str(prompts),
                 "--limit", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "x.json")]) == 2
    assert "is the reference's own dtype" in capsys.readouterr().err


def test_calibrate_layers_records_a_per_module_floor_that_layers_reads(tiny_model_dir, tmp_path, capsys):
    """`calibrate --vary mode,dtype=bf16 --layers` stores the reference
    against its bf16 twin module by module (on prompts after the first 4) in
    the floor file; compare_layers reads the band from it: a clean bf16
    candidate is named nowhere, one with a planted bug is named at its module,
    and the per-module figures are those of a direct comparison."""
    from logitparity.capture import load_model
    from logitparity.capture.plants import planted
    from logitparity.layers import compare_layers, load_floor as load_layer_floor

    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 2+2?\nName a colour.\nWrite a haiku about rain.\nCount to five.\n"
                       "Say hello in French.\nList three fruits.\n")
    out = tmp_path / "floor.json"
    threads = torch.get_num_threads()
    try:
        rc = main(["calibrate", "--model", tiny_model_dir, "--prompts", str(prompts), "--limit", "2",
                   "--max-new-tokens", "3", "--vary", "mode,dtype=bf16", "--layers", "--layers-prompts", "2",
                   "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert "per-module floor: 10 modules (precision twin fp32 vs bf16, 2 prompts after the first 4)" in \
        capsys.readouterr().out
    assert load_floor(out).layers["cand_dtype"] == "bf16"
    band = load_layer_floor(out)
    ref, twin = load_model(tiny_model_dir), load_model(tiny_model_dir, dtype="bf16")
    direct = compare_layers(ref, twin, [l for l in prompts.read_text().splitlines()[4:6]])
    for m in direct.modules:
        assert band.modules[m.path] == (m.isolated.rel_l2, m.isolated.rel_l2_max), m.path
    firsts = prompts.read_text().splitlines()[:4]
    clean = compare_layers(ref, twin, firsts, noise_floor=str(out))
    assert clean.first_divergent is None and "floor" in clean.band_source
    with planted(twin, "down_proj_roll", layer=1):
        bad = compare_layers(ref, twin, firsts, noise_floor=str(out))
    assert bad.first_divergent == "model.layers.1.mlp"


def test_calibrate_layers_needs_a_dtype_change(tiny_model_dir, tmp_path, capsys):
    assert main(["calibrate", "--model", tiny_model_dir, "--vary", "mode", "--layers",
                 "--out", str(tmp_path / "f.json")]) == 2
    assert "--layers measures the reference against its precision twin: give --vary with a dtype change" in \
        capsys.readouterr().err


def test_a_floor_without_layers_is_a_clear_layer_floor_error(tiny_runs, tmp_path):
    from logitparity.layers import load_floor as load_layer_floor

    with pytest.raises(ValueError, match=r"has no per-module figures; re-run `logitparity calibrate --layers`"):
        load_layer_floor(tiny_runs["floor32"])
