"""The compare, calibrate and demo commands, the seed harness scripts, and
one end-to-end run on the real default model (fp32 vs bf16)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from logitparity.cli import main
from logitparity.cli.demo import spread
from logitparity.policy import load_noise_floor
from logitparity.prompts import Prompt

from test_compare import manifest, peaked_row, planted, record, write_dump

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "benchmarks" / "quality"


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    ref, cand, _, _ = planted(tmp_path_factory.mktemp("cli"))
    return ref, cand


def test_exit_codes_pass_fail_error(dumps, capsys, tmp_path):
    ref, cand = dumps
    assert main(["compare", ref, ref, "--policy", "lossless"]) == 0
    assert "PASS: policy 'lossless'" in capsys.readouterr().out
    assert main(["compare", ref, cand]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL: policy 'fp16', 8 prompts")
    assert "FAIL greedy_match@10 = 0.5 (limit >= 0.99)" in out
    assert main(["compare", ref, str(tmp_path / "missing")]) == 2
    assert "no such dump directory" in capsys.readouterr().err


def test_incompatible_runs_exit_2_naming_the_difference(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = np.stack([peaked_row(rng, 3, 2.0)])
    ref = write_dump(tmp_path / "r", [(record(0, [3]), x)])
    cand = write_dump(tmp_path / "c", [(record(0, [3]), x)], man=manifest(decoding={"max_new_tokens": 99}))
    assert main(["compare", ref, cand]) == 2
    assert "decoding setting max_new_tokens differs: reference 16, candidate 99" in capsys.readouterr().err


def test_reports_written(dumps, tmp_path, capsys):
    ref, cand = dumps
    rc = main(["compare", ref, cand, "--report", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json"),
               "--plots", str(tmp_path / "plots"), "--top-worst", "2", "--near-tie-margin", "0.1"])
    assert rc == 1
    md = (tmp_path / "r.md").read_text()
    assert "## Worst prompts (up to 2)" in md and "![first divergence histogram](plots/first_divergence.png)" in md
    assert "0 near-tie(s) (reference top-1 − top-2 margin < 0.1 logits" in md
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["near_tie_margin"] == 0.1 and d["metrics"]["greedy_match@10"] == 0.5
    assert len(list((tmp_path / "plots").glob("*.png"))) == 3


def test_report_to_stdout(dumps, capsys):
    ref, _ = dumps
    assert main(["compare", ref, ref, "--report", "-"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("# logitparity: candidate vs reference")
    assert "PASS: policy 'fp16'" in cap.err


def test_policy_file_and_noise_floor(dumps, tmp_path, capsys):
    ref, cand = dumps
    pol = tmp_path / "p.toml"
    pol.write_text('[thresholds.kl]\nmetric = "kl_ref_cand.mean"\ncomparison = "<="\nnoise_factor = 10\n')
    assert main(["compare", ref, cand, "--policy", str(pol)]) == 2
    assert "--noise-floor FILE" in capsys.readouterr().err
    # the noise floor of this pair is the pair itself: within 10x of it
    noise = tmp_path / "noise.json"
    assert main(["calibrate", "--dumps", ref, cand, "--change", "synthetic", "--out", str(noise)]) == 0
    nf = load_noise_floor(noise)
    assert nf.change == "synthetic" and nf.get("greedy_match@10") == 0.5
    assert main(["compare", ref, cand, "--policy", str(pol), "--noise-floor", str(noise), "--report", "-"]) == 0
    md = capsys.readouterr().out
    assert re.search(r"\| kl \| `kl_ref_cand.mean` \| ↓ \| [0-9.e-]+ \| <= [0-9.e-]+ \(10x noise floor", md)


def test_calibrate_captures_twice(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 2+2?\nName a colour.\nWrite a haiku about rain.\n")
    noise = tmp_path / "noise.json"
    rc = main(["calibrate", "--model", tiny_model_dir, "--prompts", str(prompts), "--limit", "3",
               "--max-new-tokens", "4", "--batch-sizes", "1", "3", "--out", str(noise), "--keep", str(tmp_path / "k")])
    assert rc == 0
    assert "noise floor (batch size 1 vs 3; 3 prompts" in capsys.readouterr().out
    nf = load_noise_floor(noise)
    assert nf.change == "batch size 1 vs 3"
    assert 0 <= nf.get("kl_ref_cand.mean") < 1e-6  # benign: padding and matmul shapes only
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["batch", "reference"]
    assert main(["calibrate", "--batch-sizes", "2", "2"]) == 2
    assert "--batch-sizes must differ" in capsys.readouterr().err


def test_cli_argument_errors(dumps, capsys):
    ref, _ = dumps
    assert main(["compare", ref, ref, "--top-worst", "-1"]) == 2
    assert "--top-worst must be >= 0" in capsys.readouterr().err
    assert main(["compare", ref, ref, "--policy", "fp61"]) == 2
    assert "did you mean 'fp16'" in capsys.readouterr().err


def test_demo_spread_is_round_robin_over_categories():
    ps = [Prompt(f"{c}{i}", c, "t") for c in "abc" for i in range(3)]
    assert [p.id for p in spread(ps, 5)] == ["a0", "b0", "c0", "a1", "b1"]
    assert len(spread(ps, 100)) == 9
    # the near-context-limit category is left out (its prefill takes minutes on a CPU)
    heavy = ps + [Prompt("z0", "context_limit", "t")]
    assert "z0" not in [p.id for p in spread(heavy, 100)] and "z0" in [p.id for p in spread(heavy, 100, skip=())]


def test_demo_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "reference-fp32").mkdir()
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "reference-fp32 already exists; pass --resume to continue or reuse it, another --out" in \
        capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "x"), "--limit", "0"]) == 2
    assert "--limit must be >= 1, got 0" in capsys.readouterr().err


def test_demo_resume_refuses_a_dump_of_other_settings(dumps, tmp_path, capsys):
    # --resume continues the demo's own dumps; a dump made otherwise (here the
    # tiny model's) is refused before anything is captured, naming what differs.
    import shutil

    ref, _ = dumps
    shutil.copytree(ref, tmp_path / "reference-fp32")
    before = sorted(p.name for p in (tmp_path / "reference-fp32").iterdir())
    assert main(["demo", "--out", str(tmp_path), "--resume", "--limit", "2", "--max-new-tokens", "2",
                 "--tasks", "0"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"cannot resume .*reference-fp32: its manifest's '\w+' differs from this run's", err)
    assert sorted(p.name for p in (tmp_path / "reference-fp32").iterdir()) == before


def test_quality_compare_script(dumps, tmp_path):
    ref, cand = dumps
    r = subprocess.run([sys.executable, str(QUALITY / "quality_compare.py"), ref, cand, "--report",
                        str(tmp_path / "q.md")], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "FAIL under policy 'fp16'" in r.stdout and (tmp_path / "q.md").is_file()


def test_external_engine_end_to_end(tiny_model_dir, tmp_path):
    """HF capture as the reference, then the example engine (another process,
    safetensors + json only) through the harness script, then compare."""
    import torch

    from logitparity.capture import capture

    torch.set_num_threads(1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [
        {"id": "a", "category": "math", "text": "What is 2+2?"},
        {"id": "b", "category": "json", "text": "Give JSON for a cat."},
    ]) + "\n")
    ref = capture(tiny_model_dir, prompts, tmp_path / "ref", max_new_tokens=6, batch_size=2, progress=False)
    env = {**os.environ, "PYTHON": sys.executable, "EXAMPLE_ENGINE_THREADS": "1"}
    r = subprocess.run(
        ["bash", str(QUALITY / "quality_candidate_compare.sh"), str(ref), str(tmp_path / "work"),
         sys.executable, str(QUALITY / "example_engine.py"), "--model", tiny_model_dir, "--prompts", "{prompts}",
         "--out", "{out}", "--max-new-tokens", "6"],
        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads((tmp_path / "work" / "report.json").read_text())
    assert d["candidate"]["engine"] == "example-engine 0.1"
    assert d["free_running"]["exact_match"]["rate"] == 1.0
    assert d["tokens"]["kl_ref_cand"]["max"] < 1e-9  # same fp32 math, other op order
    assert d["notes"] == []  # same tokenizer identity, computed with json alone
    # a bf16 engine run is a different, comparable candidate
    r = subprocess.run([sys.executable, str(QUALITY / "example_engine.py"), "--model", tiny_model_dir, "--prompts",
                        str(tmp_path / "work" / "prompts.jsonl"), "--out", str(tmp_path / "bf16"), "--dtype", "bf16",
                        "--max-new-tokens", "6"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    from logitparity.compare import compare_dumps

    c = compare_dumps(ref, tmp_path / "bf16")
    assert c.tokens.kl_ref_cand.max() > 1e-9 and c.cand_manifest["logits"]["dtype"] == "bf16"


def test_harness_usage_and_bad_reference(tmp_path):
    r = subprocess.run(["bash", str(QUALITY / "quality_candidate_compare.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: quality_candidate_compare.sh" in r.stdout
    r = subprocess.run(["bash", str(QUALITY / "quality_candidate_compare.sh"), str(tmp_path), str(tmp_path / "w"),
                        "true"], capture_output=True, text=True)
    assert r.returncode == 2 and "is not a dump directory" in r.stderr


@pytest.mark.slow
def test_default_model_fp32_vs_bf16_end_to_end(tmp_path, capsys):
    """The README's main command on the real default model, kept small."""
    import torch

    torch.set_num_threads(1)
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--limit", "3", "--max-new-tokens", "8",
               "--batch-size", "3", "--tasks", "6"])
    assert rc in (0, 1)
    out = capsys.readouterr().out
    assert re.search(r"^  (PASS|FAIL): policy 'fp16', 3 prompts", out, re.M)  # the raw verdict
    assert re.search(r"^  (PASS|FAIL): policy 'noise-floor', 3 prompts", out, re.M)  # the calibrated one
    assert (rc == 0) == ("  PASS: policy 'noise-floor'" in out)
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "precision twin: the reference model in bf16" in md and "benign pair(s)" in md
    assert (tmp_path / "demo" / "report-raw.md").is_file() and (tmp_path / "demo" / "noise-floor.json").is_file()
    for head in ("## Key figures", "## Speed", "## The two runs", "## Free-running agreement",
                 "## Per-token distributions", "## By category", "## Behaviour drift", "## Every prompt"):
        assert head in md
    d = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert d["reference"]["dtype / device"] == "fp32 / cpu" and d["candidate"]["dtype / device"] == "bf16 / cpu"
    kl = d["tokens"]["kl_ref_cand"]
    # bf16 vs fp32 of a 135M model: small but non-zero KL, mostly the same top-1
    assert 1e-6 < kl["mean"] < 0.5 and kl["n"] > 0
    assert d["tokens"]["same_top1"]["rate"] > 0.7
    assert d["reference"]["engine"].startswith("hf-transformers")
    # decoded text in the report (the tokenizer comes from the model directory)
    assert d["per_prompt"][0]["ref_text"]
    assert len(list((tmp_path / "demo" / "plots").glob("*.png"))) == 3
    # the task-accuracy section: both models on 6 questions, round-robin over subjects
    assert "## Task accuracy (multiple choice)" in md and "Task accuracy (6 questions" in out
    t = json.loads((tmp_path / "demo" / "tasks.json").read_text())
    assert t["questions"] == 6 and len({s["subject"] for s in t["by_subject"]}) == 5
