"""Reports: markdown sections and numbers, JSON with every number, PNG plots."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from logitparity.compare import compare_dumps
from logitparity.report import comparison_dict, histogram_bars, render_markdown, write_report

from test_compare import SPLITS, manifest, peaked_row, planted, record, write_dump


@pytest.fixture(scope="module")
def planted_dumps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    ref, cand, _, _ = planted(tmp, cand_dtype="bf16")
    return ref, cand


def _tables(md: str) -> list[list[str]]:
    """Markdown tables as lists of their lines."""
    tables, cur = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def _cells(line: str) -> int:
    # unescaped pipes delimit cells
    return len(re.findall(r"(?<!\\)\|", line)) - 1


def test_markdown_sections_in_order(planted_dumps):
    c = compare_dumps(*planted_dumps)
    md = c.to_markdown(top_worst=3)
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["## Key figures", "## Speed", "## The two runs", "## Free-running agreement",
                     "## Per-token distributions", "## By category", "## Behaviour drift",
                     "## Worst prompts (up to 3)", "## Every prompt"]
    assert md.splitlines()[2].startswith("**Verdict: ❌ FAIL** under policy `fp16`")
    assert c._repr_markdown_() == c.to_markdown(top_worst=5)


def test_every_table_is_well_formed(planted_dumps):
    md = compare_dumps(*planted_dumps).to_markdown()
    for table in _tables(md):
        width = _cells(table[0])
        assert re.fullmatch(r"\|(---\|)+", table[1]), table[:2]
        for line in table:
            assert _cells(line) == width, line


def test_key_figures_match_the_comparison(planted_dumps):
    c = compare_dumps(*planted_dumps)
    md = c.to_markdown()
    assert "| greedy match at N = 10 (share of prompts) | ↑ | 50.00% ± 17.68% (4/8) |" in md
    assert "| full-sequence exact match | ↑ | 25.00% ± 15.31% (2/8) |" in md
    kl = c.tokens.kl_ref_cand
    assert f"| mean KL(ref ‖ cand) per token, nats | ↓ | {kl.mean():.3e} ± " in md
    assert "Splits: **4 real divergence(s)**, 2 near-tie(s)" in md
    # thresholds with measured values and limits
    assert re.search(r"\| greedy_match \| `greedy_match@10` \| ↑ \| 0\.5 \| >= 0\.99 \| ❌ fail \|", md)


def test_histogram_text_bars():
    hist = [{"lo": 0, "hi": 0, "count": 1}, {"lo": 1, "hi": 1, "count": 0}, {"lo": 2, "hi": 3, "count": 4},
            {"lo": None, "hi": None, "count": 2}]
    lines = histogram_bars(hist, width=8)
    assert lines[0] == "        token 0 │██          1 ( 14.3%)"
    assert lines[1] == "        token 1 │            0 (  0.0%)"
    assert lines[2] == "     tokens 2–3 │████████    4 ( 57.1%)"
    assert lines[3] == "  no divergence │████        2 ( 28.6%)"


def test_speed_is_valid_only_when_the_verdict_passes(tmp_path, planted_dumps):
    ref, cand = planted_dumps
    md = compare_dumps(ref, cand).to_markdown()
    assert "**Not a valid speedup:**" in md
    assert "| wall time (s) | ↓ | 2.0 | 2.0 | 1.00× |" in md
    md = compare_dumps(ref, ref, policy="lossless").to_markdown()
    assert "**Not a speedup:** the candidate passes the verdict but takes 1.00× the reference's wall time" in md


def test_a_faster_passing_candidate_is_a_valid_speedup_and_a_slower_one_is_not(planted_dumps):
    ref, _ = planted_dumps
    c = compare_dumps(ref, ref, policy="lossless")
    assert c.speedup == 1.0 and not c.speedup_valid
    c.cand_speed = {**c.cand_speed, "wall_s": c.ref_speed["wall_s"] / 2}  # the same run, twice as fast
    assert c.speedup == pytest.approx(2.0) and c.speedup_valid
    assert "a valid speedup of 2.00× in wall time" in c.to_markdown()
    c.cand_speed = {**c.cand_speed, "wall_s": c.ref_speed["wall_s"] * 2.6}
    assert not c.speedup_valid and "takes 2.60× the reference's wall time" in c.to_markdown()
    c.cand_speed = {**c.cand_speed, "wall_s": None}
    assert c.speedup is None and "a wall time is missing on one side" in c.to_markdown()


def test_worst_prompts_real_divergences_first(planted_dumps):
    c = compare_dumps(*planted_dumps)
    idx = c.worst_prompts(8)
    # real splits by position (3, 9, 12, 15), then near-ties (0, 5), then by KL
    assert [c.prompts[i].first_divergence for i in idx[:6]] == [3, 9, 12, 15, 0, 5]
    md = c.to_markdown(top_worst=2)
    assert "### 1. `p2` (math) — split at token 3: **real divergence**" in md
    assert "### 3." not in md
    # without a tokenizer the continuations are token ids, split marked
    line = next(x for x in md.splitlines() if x.startswith("| reference | ["))
    assert "⟦[" in line
    assert "| rank | reference token | p | candidate token | p |" in md


def test_decoded_text_and_token_alternatives(tmp_path):
    rng = np.random.default_rng(0)
    words = {i: f"w{i} " for i in range(40)}
    words[5] = "a|b\n"  # a pipe and a newline must not break the table

    def dec(ids):
        return "".join(words[i] for i in ids)

    a, b = [3, 4, 5, 6], [3, 4, 7, 8]
    ra = np.stack([peaked_row(rng, t, 2.0) for t in a])
    rb = ra.copy()
    rb[2:] = np.stack([peaked_row(rng, t, 2.0) for t in b[2:]])
    ref = write_dump(tmp_path / "r", [(record(0, a), ra)])
    cand = write_dump(tmp_path / "c", [(record(0, b), rb)])
    md = compare_dumps(ref, cand, decode=dec).to_markdown()
    assert "| reference | w3 w4 ⟦a\\|b↵w6  |" in md
    assert "| candidate | w3 w4 ⟦w7 w8  |" in md
    assert "| 1 | `a\\|b\\n` (5) |" in md  # renders as a|b\n
    for table in _tables(md):
        assert all(_cells(line) == _cells(table[0]) for line in table)


def test_json_has_every_number(tmp_path, planted_dumps):
    c = compare_dumps(*planted_dumps)
    out = write_report(c, json_path=tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    assert out["json"] == str(tmp_path / "r.json")
    assert d["format"] == "logitparity-comparison" and d["version"] == "1.0" and d["verdict"]["passed"] is False
    assert d["free_running"]["greedy_match"]["10"] == {"k": 4, "n": 8, "rate": 0.5, "se": pytest.approx(0.1767767)}
    assert [b["count"] for b in d["free_running"]["first_divergence_histogram"]] == [1, 0, 1, 1, 3, 2]
    assert d["tokens"]["kl_ref_cand"]["mean"] == pytest.approx(float(np.mean(c.tokens.kl_ref_cand)))
    assert [p["first_divergence"] for p in d["per_prompt"]] == SPLITS
    assert d["per_prompt"][1]["split"] == "near-tie"
    assert len(d["per_prompt"][1]["split_top_ref"]) == 5
    assert {r["category"] for r in d["categories"]} == {"math", "code"}
    assert d["drift"]["length_ratio"] == 1.0
    assert d["speed"][0]["key"] == "prefill_tokens_per_s" and d["speedup_valid"] is False
    assert d == comparison_dict(c)  # the writer adds nothing


def test_json_encodes_nan_and_inf(tmp_path):
    rng = np.random.default_rng(0)
    x = np.stack([peaked_row(rng, t, 2.0) for t in (3, 4)])
    y = x.copy()
    y[0, 9] = -np.inf
    ref = write_dump(tmp_path / "r", [(record(0, [3, 4]), x)])
    cand = write_dump(tmp_path / "c", [(record(0, [3, 4]), y)])
    d = compare_dumps(ref, cand).to_dict()
    text = json.dumps(d, allow_nan=False)
    assert d["tokens"]["kl_ref_cand"]["max"] == "inf"
    assert d["per_prompt"][0]["margin_ref_at_split"] is None
    assert "NaN" not in text


def test_plots_are_written_and_linked(tmp_path, planted_dumps):
    c = compare_dumps(*planted_dumps)
    out = write_report(c, tmp_path / "report.md", plots_dir=tmp_path / "plots")
    names = sorted(p.rsplit("/", 1)[-1] for p in out["plots"])
    assert names == ["first_divergence.png", "kl_by_position.png", "kl_distribution.png"]
    for p in out["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "![first divergence histogram](plots/first_divergence.png)" in md
    assert not list(tmp_path.glob("**/.*tmp*"))  # atomic writes leave no temporaries


def test_teacher_forced_report(tmp_path):
    rng = np.random.default_rng(1)
    a = [3, 4, 5]
    x = np.stack([peaked_row(rng, t, 2.0) for t in a])
    ref = write_dump(tmp_path / "r", [(record(0, a), x)])
    cand = write_dump(tmp_path / "c", [(record(0, a), x + 0.01)], man=manifest("score"))
    md = compare_dumps(ref, cand).to_markdown()
    assert "Derived from the teacher-forced top-1" in md
    assert "need a free-running candidate" in md
    assert "generated tokens per prompt" not in md


def test_render_markdown_without_divergence_or_tokens(tmp_path):
    ref, _, _, _ = planted(tmp_path)
    c = compare_dumps(ref, ref)
    md = render_markdown(c)
    assert "**Verdict: ✅ PASS**" in md
    assert "No divergence and zero KL on every prompt." in md
