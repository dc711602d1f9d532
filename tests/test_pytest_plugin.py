"""The pytest plugin, through real pytest runs in temporary directories
(pytester): snapshots created, compared, failed, updated; CI=true; the policy
options and marker; snapshots of dumps and of a model's logits."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# Imported here so that pytester's in-process runs find them already loaded
# (it unloads what a run imports; torch and the compiled core cannot be
# imported twice). The plugin itself is not: pytest would warn that it was
# imported before it could be rewritten.
import logitparity.compare  # noqa: F401
import logitparity.dump
import logitparity.testing  # noqa: F401
import safetensors  # noqa: F401
import torch  # noqa: F401

pytest_plugins = ["pytester"]

PLUGIN = "logitparity.pytest_plugin"
FP16 = "half-precision candidate: same greedy tokens almost always, tiny KL"


def _entry_point() -> str | None:
    """Name of an installed pytest11 entry point for the plugin, if any."""
    for ep in importlib.metadata.entry_points(group="pytest11"):
        if ep.value == PLUGIN:
            return ep.name
    return None


@pytest.fixture
def run(pytester, monkeypatch):
    """run(*args) -> RunResult of pytest in pytester's directory with the
    plugin loaded (by its entry point when installed, else with -p)."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    load = [] if _entry_point() else ["-p", PLUGIN]

    def go(*args: str):
        # hypothesis's plugin would import (and rewrite) hypothesis on every run: 1-2 s each
        return pytester.runpytest_inprocess(*load, "-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args)

    return go


# The test module the runs below use: logits [2, 8, 100] from a seed, with
# SHIFT rolling row (1, 5) so that its top-1 moves.
SUITE = """
import os
import numpy as np
import pytest

def logits():
    x = (np.random.default_rng(0).normal(size=(2, 8, 100)) * 3).astype(np.float32)
    x[1, 5] = np.roll(x[1, 5], int(os.environ.get("SHIFT", "0")))
    return x

def test_model(logit_snapshot):
    logit_snapshot(logits())
"""


def snapshot_logits():
    x = (np.random.default_rng(0).normal(size=(2, 8, 100)) * 3).astype(np.float32)
    return x


def test_snapshot_is_created_then_compared(pytester, run):
    pytester.makepyfile(test_suite=SUITE)
    r = run()
    r.assert_outcomes(passed=1)
    snap = pytester.path / "__logit_snapshots__" / "test_suite" / "test_model"
    r.stdout.fnmatch_lines([f"logitparity: 1 logit snapshot written under {snap.parent}"])
    d = logitparity.dump.load_dump(snap)
    assert d.storage == "topk:64" and d.ids == ["0", "1"]
    x = snapshot_logits()
    vals, idx, lse, _ = d.topk("1")
    np.testing.assert_array_equal(idx[:, 0], x[1].argmax(-1))
    np.testing.assert_allclose(lse, np.log(np.exp(x[1].astype(np.float64)).sum(-1)), rtol=1e-12)
    assert d.manifest["snapshot"] == {"test": "test_suite.py::test_model", "shape": [2, 8, 100], "dtype": "fp32"}
    assert sum(f.stat().st_size for f in snap.iterdir()) < 20_000  # compact: 16 positions x 64 entries
    r = run()
    r.assert_outcomes(passed=1)
    assert "logit snapshot" not in r.stdout.str()


def test_changed_logits_fail_with_the_exact_message(pytester, run, monkeypatch):
    pytester.makepyfile(test_suite=SUITE)
    run().assert_outcomes(passed=1)
    monkeypatch.setenv("SHIFT", "1")
    r = run()
    r.assert_outcomes(failed=1)
    snap = pytester.path / "__logit_snapshots__" / "test_suite" / "test_model"
    r.stdout.fnmatch_lines([
        "    def test_model(logit_snapshot):",
        ">       logit_snapshot(logits())",
        f"E       AssertionError: logits differ from the snapshot {snap} under policy 'fp16' ({FP16})",
        "E         FAILED: greedy_match@10 = 0.5, need >= 0.99",
        "E         FAILED: kl_ref_cand.mean@100 = *, need <= 0.01",
        "E         compared 16 positions, shape [[]2, 8, 100[]]",
        "E       worst position (earliest position whose top-1 tokens differ): batch 1, position 5",
        "E         KL(ref ‖ cand) = * nats, KL(cand ‖ ref) = * nats (lower bounds: top-K logits), max |Δ log-prob| = * nats",
        "E         ref  top-5: *",
        "E         cand top-5: *",
        "E       first top-1 difference: batch 1, position 5 (*); 1 of 2 sequences differ",
        "E       if the change is intended, rewrite the snapshot: pytest --logit-snapshot-update",
        "",
        "test_suite.py:11: AssertionError",
    ], consecutive=True)
    assert "logitparity/testing.py" not in r.stdout.str()  # library frames are hidden


def test_update_rewrites_the_snapshot(pytester, run, monkeypatch):
    pytester.makepyfile(test_suite=SUITE)
    run().assert_outcomes(passed=1)
    monkeypatch.setenv("SHIFT", "1")
    r = run("--logit-snapshot-update")
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(["logitparity: 1 logit snapshot updated under *"])
    run().assert_outcomes(passed=1)
    monkeypatch.delenv("SHIFT")
    run().assert_outcomes(failed=1)
    leftovers = [p.name for p in (pytester.path / "__logit_snapshots__" / "test_suite").iterdir()]
    assert leftovers == ["test_model"]


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_missing_snapshot_fails_in_ci(pytester, run, monkeypatch, value):
    pytester.makepyfile(test_suite=SUITE)
    monkeypatch.setenv("CI", value)
    r = run()
    r.assert_outcomes(failed=1)
    snap = pytester.path / "__logit_snapshots__" / "test_suite" / "test_model"
    r.stdout.fnmatch_lines([f"logit snapshot {snap} is missing and CI is set, so it is not created here; run "
                            "`pytest --logit-snapshot-update` locally and commit the directory"])
    assert not snap.exists()
    run("--logit-snapshot-update").assert_outcomes(passed=1)  # explicit: written even in CI
    run().assert_outcomes(passed=1)  # and compared
    monkeypatch.setenv("CI", "false")
    (pytester.path / "test_other.py").write_text(SUITE)
    run("test_other.py").assert_outcomes(passed=1)  # CI=false creates


def test_shape_change_fails(pytester, run):
    pytester.makepyfile(test_suite=SUITE)
    run().assert_outcomes(passed=1)
    pytester.makepyfile(test_suite=SUITE.replace("logit_snapshot(logits())", "logit_snapshot(logits()[:, :7])"))
    r = run()
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["E       AssertionError: logits have shape [[]2, 7, 100[]] ([[]batch, positions, vocab[]] "
                            "[[]2, 7, 100[]]), the snapshot * holds [[]2, 8, 100[]]"])


def test_policy_options_ini_and_marker(pytester, run, monkeypatch):
    pytester.makepyfile(test_suite=SUITE + textwrap.dedent("""
        def test_policy(logit_policy):
            print("POLICY", logit_policy.name, [(t.metric, t.limit) for t in logit_policy.thresholds])

        @pytest.mark.logit_policy("lossless", limits={"max_abs_logprob.max": 1e-3})
        def test_marked(logit_policy):
            print("MARKED", logit_policy.name, [(t.metric, t.limit) for t in logit_policy.thresholds])
    """))
    run().assert_outcomes(passed=3)
    monkeypatch.setenv("SHIFT", "1")
    # loose enough limits let the changed logits pass
    r = run("-s", "--logit-limit", "greedy_match@10=0.5", "--logit-limit", "kl_ref_cand.mean@100=1")
    r.assert_outcomes(passed=3)
    r.stdout.fnmatch_lines(["*POLICY fp16 [[]('greedy_match@10', 0.5), ('kl_ref_cand.mean@100', 1.0)[]]*",
                            "*MARKED lossless [[]('max_abs_logprob.max', 0.001), ('exact_match', 1.0)[]]*"])
    r = run("--logit-policy", "quantized", "--logit-limit", "same_top1=0.99")
    r.assert_outcomes(passed=2, failed=1)
    r.stdout.fnmatch_lines(["E       AssertionError: logits differ from the snapshot * under policy 'quantized' *",
                            "E         FAILED: greedy_match@10 = 0.5, need >= 0.95",
                            "E         FAILED: same_top1 = 0.9375, need >= 0.99"])
    pytester.makeini("[pytest]\nlogit_policy = quantized\nlogit_limits =\n    greedy_match@10 = 0.5\n")
    run().assert_outcomes(passed=3)


@pytest.mark.parametrize("args, message", [
    (["--logit-limit", "kl"], "--logit-limit: expected METRIC=VALUE such as kl_ref_cand.mean@100=0.05, got 'kl'"),
    (["--logit-limit", "kl_ref_cand.mena=1"],
     "logit policy: unknown metric 'kl_ref_cand.mena': no statistic 'mena'; did you mean 'mean'*"),
    (["--logit-policy", "fp61"], "logit policy: unknown policy 'fp61'; did you mean 'fp16'?*"),
    (["--logit-snapshot-storage", "top64"], "--logit-snapshot-storage: logits storage must be 'full' or 'topk:K'*"),
])
def test_bad_options_are_usage_errors(pytester, run, args, message):
    pytester.makepyfile(test_suite=SUITE)
    r = run(*args)
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_full_storage_and_named_snapshots(pytester, run):
    pytester.makepyfile(test_suite=SUITE + textwrap.dedent("""
        def test_two(logit_snapshot):
            logit_snapshot(logits()[0], name="first", storage="full")
            logit_snapshot(logits()[1])
            logit_snapshot(logits()[1].astype(np.float16))
    """))
    run("--logit-snapshot-storage", "topk:8").assert_outcomes(passed=2)
    base = pytester.path / "__logit_snapshots__" / "test_suite"
    assert sorted(p.name for p in base.iterdir()) == ["test_model", "test_two", "test_two.1", "test_two.first"]
    load = logitparity.dump.load_dump
    assert load(base / "test_model").storage == "topk:8"
    first = load(base / "test_two.first")
    assert first.storage == "full" and first.logits_dtype == "fp32"
    np.testing.assert_array_equal(first.logits("0"), snapshot_logits()[0])
    assert load(base / "test_two.1").manifest["snapshot"]["dtype"] == "fp16"
    run().assert_outcomes(passed=2)


def test_snapshot_of_a_dump_and_of_model_logits(pytester, run, tiny_model_dir):
    pytester.makepyfile(test_suite=textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from logitparity.capture import capture
        from logitparity.prompts import Prompt

        MODEL = {tiny_model_dir!r}
        PROMPTS = [Prompt("a", "chat", "The quick brown fox"), Prompt("b", "code", "def add(a, b):")]

        def test_dump(logit_snapshot, tmp_path):
            torch.set_num_threads(1)
            out = capture(MODEL, PROMPTS, tmp_path / "run", max_new_tokens=6, progress=False)
            logit_snapshot.dump(out, storage="topk:16")

        def test_forward(logit_snapshot):
            torch.set_num_threads(1)
            tok = AutoTokenizer.from_pretrained(MODEL, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(MODEL, local_files_only=True).eval()
            ids = tok(["The quick brown fox jumps"], return_tensors="pt").input_ids
            with torch.no_grad():
                logits = model(ids).logits
            logit_snapshot(logits, tokenizer=tok, input_ids=ids)
    """))
    run().assert_outcomes(passed=2)
    base = pytester.path / "__logit_snapshots__" / "test_suite"
    d = logitparity.dump.load_dump(base / "test_dump")
    assert d.storage == "topk:16" and d.ids == ["a", "b"] and d.manifest["engine"]["name"] == "hf-transformers"
    assert logitparity.dump.load_dump(base / "test_forward").storage == "topk:64"
    run().assert_outcomes(passed=2)


def test_double_registration_is_harmless(pytester, tmp_path):
    """The entry point (named like the module) and an explicit -p or
    pytest_plugins line load the plugin once."""
    site = tmp_path / "site"
    dist = site / "lp_entry-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lp-entry\nVersion: 0.0\n")
    if _entry_point() is None:  # simulate the installed entry point
        (dist / "entry_points.txt").write_text(f"[pytest11]\n{PLUGIN} = {PLUGIN}\n")
    pytester.makepyfile(test_suite=SUITE)
    pytester.makeconftest(f"pytest_plugins = [{PLUGIN!r}]")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for extra in ([], ["-p", PLUGIN]):
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra],
                           cwd=pytester.path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (
            "the pytest11 entry point must be named like the module, "
            f"\"{PLUGIN}\" = \"{PLUGIN}\", so that -p and pytest_plugins find it registered\n"
            + p.stdout[-2000:] + p.stderr[-2000:])
    assert json.loads((pytester.path / "__logit_snapshots__" / "test_suite" / "test_model" /
                       "manifest.json").read_text())["logits"]["storage"] == "topk:64"
