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


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gate") / "base"
    perplexity(tiny_model_dir, text=TEXT, ctx=64, stride=32, save_baseline=path, progress=False)
    return str(path)


@pytest.fixture(scope="module")
def sharper_dir(tiny_model_dir, tmp_path_factory):
    """A planted bug that surely raises PPL: the output projection scaled by 10."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharper")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True).save_pretrained(out)
    return str(out)


def gate(*args):
    return main(["gate", *args])


def test_identical_model_is_good(cache, tiny_model_dir, capsys):
    assert gate("--baseline-cache", cache, "--model", tiny_model_dir, "--max-ppl-increase", "0.1",
                "--max-mean-kl", "1e-4") == 0
    out = capsys.readouterr().out
    assert out.startswith("logitparity gate: GOOD") and "ΔPPL +0.00000" in out


def test_planted_bug_is_bad_on_ppl(cache, sharper_dir, capsys):
    assert gate("--baseline-cache", cache, "--model", sharper_dir, "--max-ppl-increase", "1%") == 1
    out = capsys.readouterr().out
    assert "BAD ΔPPL" in out and "limit +1%" in out


def test_planted_bug_is_bad_on_kl(cache, sharper_dir, tmp_path, capsys):
    rc = gate("--baseline-cache", cache, "--model", sharper_dir, "--max-mean-kl", "0.01",
              "--json", str(tmp_path / "g.json"))
    assert rc == 1
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["verdict"] == "bad" and doc["exit_code"] == 1
    assert doc["result"]["pair"]["kl_ref_cand"]["mean"] > 0.01


@pytest.mark.parametrize("args,match", [
    (["--model", "M", "--max-ppl-increase", "0.1"], "both required"),
    (["--baseline-cache", "C", "--model", "M"], "at least one limit"),
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
