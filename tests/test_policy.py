"""Policies: built-ins, TOML files, metric names, noise-floor limits, verdicts."""

from __future__ import annotations

import json
import math

import pytest

from logitparity.policy import (
    BUILTIN_POLICIES,
    NoiseFloor,
    Threshold,
    load_noise_floor,
    load_policy,
    parse_metric,
)


def test_builtins_have_the_documented_thresholds():
    fp16 = load_policy("fp16")
    assert [(t.metric, t.comparison, t.limit) for t in fp16.thresholds] == [
        ("greedy_match@10", ">=", 0.99),
        ("kl_ref_cand.mean@100", "<=", 0.01),
    ]
    q = load_policy("quantized")
    assert [(t.metric, t.comparison, t.limit) for t in q.thresholds] == [("greedy_match@10", ">=", 0.95)]
    ll = load_policy("lossless")
    assert [(t.metric, t.comparison, t.limit) for t in ll.thresholds] == [
        ("max_abs_logprob.max", "<=", 1e-5),
        ("exact_match", ">=", 1.0),
    ]
    assert set(BUILTIN_POLICIES) == {"fp16", "bf16", "quantized", "lossless", "sampled"}
    assert load_policy("bf16").thresholds == load_policy("fp16").thresholds


@pytest.mark.parametrize(
    "name, kind, field, stat, n, positions",
    [
        ("greedy_match@10", "greedy_match", None, None, 10, None),
        ("exact_match", "exact_match", None, None, None, None),
        ("same_top1", "same_top1", None, None, None, None),
        ("same_top1@32", "same_top1", None, None, None, 32),
        ("kl_ref_cand.p99", "field", "kl_ref_cand", "p99", None, None),
        ("js.mean@100", "field", "js", "mean", None, 100),
        ("length_ratio", "length_ratio", None, None, None, None),
    ],
)
def test_parse_metric(name, kind, field, stat, n, positions):
    s = parse_metric(name)
    assert (s.kind, s.field, s.stat, s.n, s.positions) == (kind, field, stat, n, positions)


@pytest.mark.parametrize(
    "name, match",
    [
        ("kl", r"unknown metric 'kl'.*did you mean"),
        ("kl_ref_can.mean", r"no per-token field 'kl_ref_can'; did you mean 'kl_ref_cand'"),
        ("js.avg", r"no statistic 'avg'"),
        ("greedy_match@0", r"N in greedy_match@N must be >= 1"),
        ("js.mean@0", r"positions < P\) must be >= 1"),
    ],
)
def test_parse_metric_errors(name, match):
    with pytest.raises(ValueError, match=match):
        parse_metric(name)


def test_unknown_policy_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown policy 'fp61'; did you mean 'fp16'"):
        load_policy("fp61")


def test_missing_policy_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"policy file .*nope.toml.* does not exist"):
        load_policy(tmp_path / "nope.toml")


def _write(tmp_path, text):
    p = tmp_path / "p.toml"
    p.write_text(text)
    return p


def test_user_toml_policy(tmp_path):
    p = _write(tmp_path, """
name = "port"
description = "my port"
[thresholds.top1]
metric = "same_top1"
comparison = ">="
limit = 0.999
[thresholds.kl99]
metric = "kl_ref_cand.p99"
comparison = "<="
limit = 0.05
noise_factor = 10
""")
    pol = load_policy(p)
    assert pol.name == "port" and pol.description == "my port"
    assert [t.name for t in pol.thresholds] == ["top1", "kl99"]
    assert pol.thresholds[1].noise_factor == 10.0


@pytest.mark.parametrize(
    "body, match",
    [
        ("x = 1\n[thresholds.a]\nmetric='exact_match'\ncomparison='>='\nlimit=1", r"unknown key\(s\) \['x'\]"),
        ("name='a'", r"needs at least one \[thresholds.NAME\]"),
        ("[thresholds.a]\ncomparison='>='\nlimit=1", r"thresholds.a has no metric"),
        ("[thresholds.a]\nmetric='kl'\ncomparison='>='\nlimit=1", r"thresholds.a: unknown metric 'kl'"),
        ("[thresholds.a]\nmetric='exact_match'\ncomparison='>'\nlimit=1", r"comparison must be \">=\" or \"<=\""),
        ("[thresholds.a]\nmetric='exact_match'\ncomparison='>='", r"needs a limit"),
        ("[thresholds.a]\nmetric='exact_match'\ncomparison='>='\nlimit='high'", r"limit must be a number"),
        ("[thresholds.a]\nmetric='exact_match'\ncomparison='>='\nnoise_factor=0", r"noise_factor must be > 0"),
        ("[thresholds.a]\nmetric='kl_ref_cand.mean'\ncomparison='>='\nnoise_factor=2", r"ideal value is 1"),
        ("[thresholds.a]\nmetric='exact_match'\ncomparison='>='\nlimit=1\nwhat=2", r"unknown key\(s\) \['what'\]"),
        ("[thresholds", r"not valid TOML"),
    ],
)
def test_policy_file_errors(tmp_path, body, match):
    with pytest.raises(ValueError, match=match):
        load_policy(_write(tmp_path, body))


def _measure(values):
    return lambda m: (values.get(m, math.nan), "" if m in values else "not measurable here")


def test_verdict_pass_and_fail():
    pol = load_policy("fp16")
    v = pol.evaluate(_measure({"greedy_match@10": 1.0, "kl_ref_cand.mean@100": 0.002}))
    assert v.passed and v.policy == "fp16"
    assert [r.passed for r in v.results] == [True, True]
    v = pol.evaluate(_measure({"greedy_match@10": 0.98, "kl_ref_cand.mean@100": 0.002}))
    assert not v.passed and [r.passed for r in v.results] == [False, True]
    assert "FAIL under policy 'fp16'" in str(v)
    # a limit is inclusive
    v = pol.evaluate(_measure({"greedy_match@10": 0.99, "kl_ref_cand.mean@100": 0.01}))
    assert v.passed


def test_unmeasured_threshold_fails_with_its_reason():
    v = load_policy("fp16").evaluate(_measure({"kl_ref_cand.mean@100": 0.0}))
    assert not v.passed
    assert v.results[0].note == "not measurable here" and math.isnan(v.results[0].measured)
    assert "not measured" in str(v)


def test_noise_relative_limits():
    le = Threshold("kl", "kl_ref_cand.mean", "<=", None, 10.0)
    assert le.effective_limit(0.003) == pytest.approx((0.03, "10x noise floor (0.003)"))
    ge = Threshold("g", "greedy_match@10", ">=", None, 10.0)
    lim, _ = ge.effective_limit(0.999)
    assert lim == pytest.approx(1 - 10 * 0.001)
    # both given: the looser applies
    both = Threshold("kl", "kl_ref_cand.mean", "<=", 0.01, 10.0)
    assert both.effective_limit(0.0) == (0.01, "absolute (looser than the noise floor)")
    assert both.effective_limit(0.005)[0] == pytest.approx(0.05)
    assert both.effective_limit(None) == (0.01, "absolute (no noise floor given)")
    with pytest.raises(ValueError, match=r"relative to the noise floor.*--noise-floor FILE"):
        le.effective_limit(None)


def test_noise_floor_file_round_trip(tmp_path):
    p = tmp_path / "noise.json"
    p.write_text(json.dumps(NoiseFloor({"kl_ref_cand.mean": 0.001}, "batch 1 vs 8").to_dict()))
    nf = load_noise_floor(p)
    assert nf.get("kl_ref_cand.mean") == 0.001 and nf.get("js.mean") is None
    assert nf.change == "batch 1 vs 8"
    pol = load_policy(_write(tmp_path, "[thresholds.kl]\nmetric='kl_ref_cand.mean'\ncomparison='<='\nnoise_factor=10"))
    v = pol.evaluate(_measure({"kl_ref_cand.mean": 0.009}), nf)
    assert v.passed and v.results[0].limit == pytest.approx(0.01)
    v = pol.evaluate(_measure({"kl_ref_cand.mean": 0.011}), nf)
    assert not v.passed


@pytest.mark.parametrize(
    "content, match",
    [
        ("{", r"not valid JSON"),
        ('{"format": "other"}', r"n.json: expected format 'logitparity-noise-floor', found format 'other'; write one"),
        ('{"format": "logitparity-dump"}', r"found format 'logitparity-dump', which is a dump manifest"),
        ('{"format": "logitparity.noise-floor", "version": 9}',
         r"version 9 is newer than this logitparity reads \(1.0, 2.0\); upgrade logitparity"),
        ('{"format": "logitparity-noise-floor", "version": "0.3"}',
         r"version 0.3 is older than this logitparity reads \(1.0, 2.0\); write one with `logitparity calibrate`"),
    ],
)
def test_noise_floor_file_errors(tmp_path, content, match):
    p = tmp_path / "n.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_noise_floor(p)


def test_noise_floor_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"logitparity calibrate"):
        load_noise_floor(tmp_path / "none.json")
