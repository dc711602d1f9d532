"""Behaviour drift that can gate (logitparity.drift through compare_dumps):
every figure against a hand-computed value on constructed dumps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from logitparity.compare import compare_dumps
from logitparity.drift import json_complete_at, token_rank
from logitparity.policy import load_policy

from test_compare import V, manifest, peaked_row, record, write_dump

TEXT = {3: '{"a":', 5: " 1}", 7: " extra", 1: "", 2: "x", 6: "y", 8: "z"}


def dec(ids):
    return "".join(TEXT.get(int(i), "?") for i in ids)


def rank_row(rng, order: list[int]) -> np.ndarray:
    """Logits whose top tokens are ``order`` (rank 0 first), the rest below."""
    r = rng.normal(0.0, 0.1, V).astype(np.float32)
    for k, t in enumerate(order):
        r[t] = 5.0 - k
    return r


@pytest.fixture()
def runs(tmp_path):
    rng = np.random.default_rng(0)
    rows = lambda ts: np.stack([peaked_row(rng, t, 3.0) for t in ts])
    # p0 (json): the reference closes its JSON and stops; the candidate ranks EOS third there and goes on
    r0, c0 = [3, 5, 1], [3, 5, 7, 1]
    a0 = rows(r0)
    b0 = np.concatenate([a0[:2], rank_row(rng, [7, 9, 1])[None], rows([1])])
    # p1 (code): a repeated token, the candidate runs longer
    r1, c1 = [2] * 6, [2] * 9
    # p2 (code): identical
    r2 = [6, 8, 1]
    a2 = rows(r2)
    ref = write_dump(tmp_path / "r", [
        (record(0, r0, category="json", stop="eos"), a0),
        (record(1, r1, category="code"), rows(r1)),
        (record(2, r2, category="code", stop="eos"), a2),
    ])
    cand = write_dump(tmp_path / "c", [
        (record(0, c0, category="json", stop="eos"), b0),
        (record(1, c1, category="code"), rows(c1)),
        (record(2, r2, category="code", stop="eos"), a2 + 0.01),
    ])
    return ref, cand


def test_drift_figures_by_hand(runs):
    c = compare_dumps(*runs, decode=dec)
    m = lambda name: c.metric(name)[0]
    # lengths ref 3, 6, 3 and cand 4, 9, 3
    assert m("length_ratio") == pytest.approx(16 / 12)
    assert m("length_ratio.total") == pytest.approx(16 / 12)
    assert m("length_ratio.mean") == pytest.approx((4 / 3 + 1.5 + 1.0) / 3)
    # numpy's linear p95 of [1, 4/3, 1.5]: 4/3 + 0.9 * (1.5 - 4/3)
    assert m("length_ratio.p95") == pytest.approx(4 / 3 + 0.9 * (1.5 - 4 / 3))
    assert m("length_ratio.mean[code]") == pytest.approx(1.25)
    assert m("length_ratio.max[json]") == pytest.approx(4 / 3)
    # differences 1, 3, 0: |±1 ±3| >= 4 in 2 of 4 sign patterns (the 0 doubles both)
    assert m("length_p") == pytest.approx(0.5)
    # stop reasons: eos, max, eos on both sides
    assert m("stop_reason_tv") == 0.0 and m("stop_reason_p") == 1.0
    # 4-grams: ref 2 of 3 repeated, cand 5 of 6 (p1 only; p0 cand has 1 4-gram, p2 none)
    assert m("repetition_ref") == pytest.approx(2 / 3)
    assert m("repetition_cand") == pytest.approx(5 / 7)
    assert m("repetition_shift") == pytest.approx(5 / 7 - 2 / 3)
    # JSON: the reference's '{"a": 1}' parses, the candidate's '{"a": 1} extra' does not;
    # McNemar b = 1, c = 0: p = 2 * 0.5 = 1
    assert (m("json_valid_ref"), m("json_valid_cand"), m("json_valid_shift"), m("json_valid_p")) == (1.0, 0.0, -1.0, 1.0)
    # stop ranks: p0 position 2 (EOS emitted by the reference; complete JSON there too): ref 0, cand 2;
    # p2 position 2: 0 and 0
    assert [(s.unit, s.position, s.rank_ref, s.rank_cand, s.where) for s in c.stop_ranks] == [
        (0, 2, 0, 2, "eos"), (2, 2, 0, 0, "eos")]
    assert (m("stop_rank.max"), m("stop_rank.mean"), m("stop_rank_ref.max"), m("stop_rank_shift.mean")) == (2, 1, 0, 1)
    assert m("stop_rank.max[code]") == 0
    # token frequencies, by hand
    ref_counts = {1: 2, 2: 6, 3: 1, 5: 1, 6: 1, 8: 1}
    cand_counts = {1: 2, 2: 9, 3: 1, 5: 1, 7: 1, 6: 1, 8: 1}
    js = 0.0
    for t in set(ref_counts) | set(cand_counts):
        p, q = ref_counts.get(t, 0) / 12, cand_counts.get(t, 0) / 16
        mm = (p + q) / 2
        js += 0.5 * (p * math.log(p / mm) if p else 0.0) + 0.5 * (q * math.log(q / mm) if q else 0.0)
    assert m("token_frequency_js") == pytest.approx(js, rel=1e-12)
    assert 0 < m("token_frequency_p") <= 1
    assert math.isnan(m("length_ratio[creative]")) and "no prompt of category 'creative'" in c.metric(
        "length_ratio[creative]")[1]


def test_drift_gates_through_a_policy(runs, tmp_path):
    p = tmp_path / "drift.toml"
    p.write_text('name = "drift"\n'
                 '[thresholds.len]\nmetric = "length_ratio.p95"\ncomparison = "<="\nlimit = 1.2\n'
                 '[thresholds.len_json]\nmetric = "length_ratio.p95[json]"\ncomparison = "<="\nlimit = 1.5\n'
                 '[thresholds.stop]\nmetric = "stop_rank.max"\ncomparison = "<="\nlimit = 1\n'
                 '[thresholds.json]\nmetric = "json_valid_shift"\ncomparison = ">="\nlimit = 0\n'
                 '[thresholds.lenp]\nmetric = "length_p"\ncomparison = ">="\nlimit = 0.01\n')
    c = compare_dumps(*runs, decode=dec, policy=load_policy(p))
    got = {r.name: r.passed for r in c.verdict.results}
    assert got == {"len": False, "len_json": True, "stop": False, "json": False, "lenp": True}
    assert not c.verdict.passed
    d = c.to_dict()
    assert d["drift"]["stop_rank"]["n"] == 2 and d["drift"]["tests"]["length"]["p_value"] == pytest.approx(0.5)
    md = c.to_markdown()
    assert "stop token rank at the end of an answer" in md and "p = 0.5" in md


def test_teacher_forced_drift_is_not_measured(runs, tmp_path):
    ref, _ = runs
    c = compare_dumps(ref, ref, decode=dec)
    assert c.metric("length_p")[0] == 1.0
    man = manifest("score")
    rng = np.random.default_rng(1)
    tf = write_dump(tmp_path / "tf", [(record(0, [3, 5, 1], category="json", stop="eos"),
                                       np.stack([peaked_row(rng, t, 3.0) for t in [3, 5, 1]]))], man=man)
    from logitparity.dump import load_dump

    one = write_dump(tmp_path / "one", [(load_dump(ref).record("p0"), load_dump(ref).logits("p0"))])
    c = compare_dumps(one, tf, decode=dec)
    v, note = c.metric("length_ratio.mean")
    assert math.isnan(v) and "teacher-forced" in note
    assert c.metric("stop_rank.max")[0] == 0  # ranks are measured on teacher-forced rows


def test_helpers():
    assert json_complete_at([3, 5, 7], dec) == 2 and json_complete_at([3, 7], dec) is None
    row = np.array([1.0, 3.0, 3.0, 2.0])
    assert [token_rank(row, t) for t in range(4)] == [3, 0, 1, 2]  # ties by lower index


def test_stop_ranks_of_bf16_rows_are_ranks_of_their_values(runs, tmp_path):
    # bf16 dumps store uint16 bit patterns: negative logits sort above positive ones as integers
    from logitparity.dump import load_dump

    ref, cand = runs
    c16 = load_dump(cand)
    items = [(c16.record(pid), c16.logits(pid)) for pid in c16.ids]
    bf = write_dump(tmp_path / "bf16", items, logits_dtype="bf16")
    c = compare_dumps(ref, bf, decode=dec)
    assert [(s.rank_ref, s.rank_cand) for s in c.stop_ranks] == [(0, 2), (0, 0)]
