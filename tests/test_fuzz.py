"""The fuzz test: a few hundred hypothesis-drawn mutations of manifests,
records, shard headers, top-K tensors and policy files of small dumps; each
must end in a clean error or a correct result (benchmarks/fuzz_dumps.py
states the oracle; it runs 10^4 and more)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_dumps.py"


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_dumps", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mutated_dumps_end_in_a_clean_error_or_the_right_result(tmp_path):
    fz = _fuzz_module()
    base = fz.build(tmp_path)
    counts = {"clean error": 0, "same result": 0, "accepted (valid data)": 0}
    fz.make_test(base, counts, examples=300, seed=None, derandomize=True)()
    assert sum(counts.values()) >= 300
    # the oracle was exercised on all three outcomes, not only on errors
    assert all(v > 0 for v in counts.values()), counts


def test_the_unmutated_pairs_compare_as_built(tmp_path):
    """The fuzz baselines are real comparisons: the planted split is found."""
    from logitparity.compare import compare_dumps

    fz = _fuzz_module()
    base = fz.build(tmp_path)
    kl = {}
    for tag in ("full", "topk"):
        c = compare_dumps(base[f"{tag}-ref"], base[f"{tag}-cand"], policy=base["policy"], decode=None)
        assert [p.first_divergence for p in c.prompts] == [None, None, 1]
        greedy, mean_kl = c.verdict.results
        assert (greedy.measured, greedy.passed) == (2 / 3, True)  # 2 of 3 prompts match at 2 tokens
        assert mean_kl.passed is False and mean_kl.measured > 0.05  # the planted split row dominates
        kl[tag] = mean_kl.measured
    assert kl["topk"] <= kl["full"]  # top-K KL is a lower bound of the full one
