"""logitparity gate: exit 0 (good), 1 (bad), 125 (could not run), as
``git bisect run`` expects."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from conftest import build_tiny_model  # noqa: E402
from logitparity.cli import main  # noqa: E402
from logitparity.cli.gate import parse_limit  # noqa: E402
from logitparity.ppl import DEFAULT_CORPUS, perplexity  # noqa: E402

TEXT = DEFAULT_CORPUS.read_text(encoding="utf-8")[:1200]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _lm_head_scaled(model_dir, out, factor: float) -> str:
    """Save the model at ``model_dir`` to ``out`` with its output projection
    (so every logit) multiplied by ``factor``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir, local_files_only=True).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gate") / "base"
    perplexity(tiny_model_dir, text=TEXT, ctx=64, stride=32, save_baseline=path, progress=False)
    return str(path)


@pytest.fixture(scope="module")
def sharper_dir(tiny_model_dir, tmp_path_factory):
    """A planted bug that surely raises PPL: the output projection scaled by 10."""
    return _lm_head_scaled(tiny_model_dir, tmp_path_factory.mktemp("sharper"), 10.0)


def gate(*args):
    return main(["gate", *args])


def test_identical_model_is_good(cache, tiny_model_dir, capsys):
    assert gate("--baseline-cache", cache, "--model", tiny_model_dir, "--max-ppl-increase", "0.1",
                "--max-mean-kl", "1e-4") == 0
    out = capsys.readouterr().out
    assert out.startswith("logitparity gate: PASS") and "ΔPPL +0.00000" in out and "includes 0" in out


def test_planted_bug_is_bad_on_ppl(cache, sharper_dir, capsys):
    assert gate("--baseline-cache", cache, "--model", sharper_dir, "--max-ppl-increase", "1%") == 1
    out = capsys.readouterr().out
    assert "FAIL ΔPPL / PPL_ref = 2.896 (limit <= 0.01)" in out and "excludes 0" in out


def test_planted_bug_is_bad_on_kl(cache, sharper_dir, tmp_path, capsys):
    rc = gate("--baseline-cache", cache, "--model", sharper_dir, "--max-mean-kl", "0.01",
              "--json", str(tmp_path / "g.json"))
    assert rc == 1
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["verdict"] == "FAIL" and doc["exit_code"] == 1
    assert doc["result"]["pair"]["kl_ref_cand"]["mean"] > 0.01


@pytest.mark.parametrize("args,match", [
    (["--model", "M", "--max-ppl-increase", "0.1"], "both required"),
    (["--baseline-cache", "C", "--model", "M"], "at least one limit"),
    (["--baseline-cache", "C", "--model", "M", "--max-ppl-change", "1", "--max-ppl-increase", "1"], "give one"),
    (["--baseline-cache", "C", "--model", "M", "--max-ppl-increase", "1", "--direction", "both"],
     "contradicts --direction both"),
    (["--baseline-cache", "C", "--model", "M", "--max-ppl-change", "1", "--direction", "down"],
     "--direction must be both or increase"),
    (["--baseline-cache", "C", "--model", "M", "--max-mean-kl", "1", "--direction", "both"],
     "give that limit too"),
    (["--baseline-cache", "C", "--model", "M", "--max-ppl-increase", "ten"], "non-negative number"),
    (["--baseline-cache", "C", "--model", "M", "--max-mean-kl", "-1"], "non-negative number"),
])
def test_bad_arguments_exit_125(args, match, capsys):
    assert gate(*args) == 125
    assert match in capsys.readouterr().err


def test_missing_cache_exits_125(tiny_model_dir, tmp_path, capsys):
    assert gate("--baseline-cache", str(tmp_path / "none"), "--model", tiny_model_dir,
                "--max-ppl-increase", "0.1") == 125
    assert "could not run (FileNotFoundError)" in capsys.readouterr().err


def test_missing_model_exits_125(cache, tmp_path, capsys):
    assert gate("--baseline-cache", cache, "--model", str(tmp_path / "no-model"), "--max-ppl-increase", "0.1") == 125
    assert "does not exist locally" in capsys.readouterr().err


def test_incompatible_tokenizer_exits_125(cache, tmp_path, capsys):
    other = build_tiny_model(tmp_path / "v320", vocab_size=320)
    assert gate("--baseline-cache", cache, "--model", other, "--max-ppl-increase", "0.1") == 125
    assert "another tokenizer" in capsys.readouterr().err


def test_parse_limit():
    assert parse_limit("0.1", "x") == (0.1, False)
    assert parse_limit("2.5%", "x") == (0.025, True)
    assert parse_limit("1e-3", "x") == (1e-3, False)
    with pytest.raises(ValueError, match="x must be a non-negative number"):
        parse_limit("1%%", "x")


@pytest.fixture(scope="module")
def flatter_dir(tiny_model_dir, tmp_path_factory):
    """A change that lowers PPL on the random tiny model: logits scaled by 0.1
    bring its distribution towards uniform (PPL of the reference > vocab)."""
    return _lm_head_scaled(tiny_model_dir, tmp_path_factory.mktemp("flatter"), 0.1)


def test_lower_ppl_is_flagged_two_sided_only(cache, flatter_dir, capsys):
    assert gate("--baseline-cache", cache, "--model", flatter_dir, "--max-ppl-change", "0.5") == 1
    out = capsys.readouterr().out
    assert "FAIL |ΔPPL|" in out and "excludes 0" in out
    # the one-sided spellings let a drop through
    assert gate("--baseline-cache", cache, "--model", flatter_dir, "--max-ppl-change", "0.5",
                "--direction", "increase") == 0
    assert gate("--baseline-cache", cache, "--model", flatter_dir, "--max-ppl-increase", "0.5") == 0


def test_python_gate_returns_the_compare_verdict(cache, flatter_dir):
    from logitparity import gate as lp_gate
    from logitparity.policy import Verdict

    r = perplexity(candidate=flatter_dir, baseline_cache=cache, progress=False)
    lo, hi = r.pair.delta_ppl_ci95
    assert r.pair.delta_ppl < 0 and hi < 0  # the drop is significant
    v = lp_gate(r, max_ppl_change=0.5, direction="both")
    assert isinstance(v, Verdict) and not v.passed
    res = v.results[0]
    assert res.measured == pytest.approx(abs(r.pair.delta_ppl)) and (res.ci_low, res.ci_high) == (lo, hi)
    assert v.lines()[0].startswith("FAIL: perplexity gate")
    assert lp_gate(r, max_ppl_change=0.5, direction="increase").passed
    big = abs(r.pair.delta_ppl) * 2
    assert lp_gate(r, max_ppl_change=big).passed  # significant but within the limit
    rel = lp_gate(r, max_ppl_change="1%")
    assert rel.results[0].measured == pytest.approx(abs(r.pair.delta_ppl) / r.ref.ppl)
    kl = lp_gate(r, max_mean_kl=1e-9)
    assert not kl.passed and kl.results[0].measured == pytest.approx(r.pair.kl_ref_cand.mean)
    with pytest.raises(ValueError, match="direction must be one of"):
        lp_gate(r, max_ppl_change=1, direction="down")
    with pytest.raises(ValueError, match="at least one limit"):
        lp_gate(r)
    with pytest.raises(ValueError, match="max_ppl_change must be a non-negative number"):
        lp_gate(r, max_ppl_change=-1)
    with pytest.raises(TypeError, match="gate needs a PerplexityResult"):
        lp_gate("r", max_ppl_change=1)


# --------------------------------------------------------------------------
# the dump gate: an engine's dump (given, or written by a command) vs a reference dump


@pytest.fixture(scope="module")
def engine_dumps(tiny_model_dir, tmp_path_factory):
    """A reference, a benign candidate (batch 1 vs 3), a bugged one, and an
    fp32 noise floor (the reference greedy vs scored)."""
    from logitparity.capture import capture, load_model
    from logitparity.capture.plants import planted
    from logitparity.compare import compare_dumps
    from logitparity.floor import build_floor, write_floor

    w = tmp_path_factory.mktemp("engine-gate")
    lm = load_model(tiny_model_dir)
    kw = dict(limit=4, max_new_tokens=6, progress=False)
    capture(lm, None, w / "ref", batch_size=3, **kw)
    capture(lm, None, w / "ref-scored", mode="score", reference_dump=w / "ref", progress=False)
    capture(lm, None, w / "benign", batch_size=1, **kw)
    with planted(lm, "down_proj_roll", layer=1):
        capture(lm, None, w / "bug", batch_size=3, **kw)
    write_floor(build_floor([(compare_dumps(w / "ref", w / "ref-scored", decode=None), "greedy vs score")]),
                w / "floor.json")
    return w


def test_dump_gate_good_and_bad(engine_dumps, capsys, tmp_path):
    w = engine_dumps
    base = ["gate", "--reference-dump", str(w / "ref"), "--noise-floor", str(w / "floor.json")]
    assert main(base + ["--candidate-dump", str(w / "benign"), "--json", str(tmp_path / "g.json")]) == 0
    assert "logitparity gate: PASS (4 prompts" in capsys.readouterr().out
    doc = json.loads((tmp_path / "g.json").read_text())  # the word the line prints, as tasks' JSON says it
    assert doc["verdict"] == "PASS" and doc["exit_code"] == 0 and doc["comparison"]["verdict"]["passed"] is True
    assert main(base + ["--candidate-dump", str(w / "bug")]) == 1
    assert "logitparity gate: FAIL (4 prompts" in capsys.readouterr().out


def test_dump_gate_runs_the_candidate_command(engine_dumps, tmp_path, capsys):
    """{prompts} and {out} are substituted (and exported); the prompts file
    holds the reference's prompts with their token ids; a failing command is
    'could not run'."""
    import shlex
    import sys

    w = engine_dumps
    script = tmp_path / "engine.py"
    script.write_text(
        "import json, os, shutil, sys\n"
        "prompts, out, src = sys.argv[1], sys.argv[2], sys.argv[3]\n"
        "assert prompts == os.environ['LP_PROMPTS'] and out == os.environ['LP_OUT']\n"
        "rows = [json.loads(l) for l in open(prompts, encoding='utf-8')]\n"
        "assert all(set(r) == {'id', 'category', 'text', 'chat_template', 'prompt_token_ids'} for r in rows)\n"
        "shutil.copytree(src, out)\n", encoding="utf-8")
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{prompts}} {{out}}"
    base = ["gate", "--reference-dump", str(w / "ref"), "--noise-floor", str(w / "floor.json"), "--work",
            str(tmp_path / "work")]
    assert main(base + ["--candidate-command", f"{cmd} {shlex.quote(str(w / 'bug'))}"]) == 1
    rows = [json.loads(l) for l in (tmp_path / "work" / "prompts.jsonl").read_text().splitlines()]
    from logitparity.dump import load_dump

    ref = load_dump(w / "ref")
    assert [r["prompt_token_ids"] for r in rows] == [r["prompt_token_ids"] for r in ref.records]
    capsys.readouterr()
    assert main(["gate", "--reference-dump", str(w / "ref"), "--policy", "fp16", "--candidate-command", "exit 3"]) == 125
    assert "could not run (RuntimeError): the candidate command exited 3" in capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    ([], "give exactly one of --candidate-dump DIR or --candidate-command CMD"),
    (["--candidate-dump", "x", "--candidate-command", "y"], "give exactly one of"),
    (["--candidate-dump", "x", "--max-mean-kl", "0.1"], "--max-mean-kl belong to the perplexity gate"),
])
def test_dump_gate_argument_errors_exit_125(engine_dumps, capsys, extra, match):
    assert main(["gate", "--reference-dump", str(engine_dumps / "ref"), "--policy", "fp16", *extra]) == 125
    assert match in capsys.readouterr().err


def test_dump_gate_needs_a_yardstick_and_dump_options_need_a_reference(engine_dumps, capsys):
    assert main(["gate", "--reference-dump", str(engine_dumps / "ref"), "--candidate-dump",
                 str(engine_dumps / "benign")]) == 125
    assert "give --noise-floor FILE (preferred) or --policy P" in capsys.readouterr().err
    assert main(["gate", "--candidate-dump", str(engine_dumps / "benign"), "--policy", "fp16"]) == 125
    assert "give --reference-dump REF with them" in capsys.readouterr().err
