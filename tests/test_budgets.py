"""Per-category token budgets (capture category_budgets, dump
--category-budget): JSON prompts get room to close their answer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from logitparity.prompts import Prompt  # noqa: E402

PROMPTS = [Prompt("a", "json", "Hello there"), Prompt("b", "chat", "Once upon a time"),
           Prompt("c", "json", "def add(a, b):")]
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_category_budgets(tiny_model_dir, tmp_path):
    from logitparity.capture import capture, load_model
    from logitparity.compare import IncompatibleRuns, compare_dumps
    from logitparity.dump import load_dump
    from logitparity.validate import validate_dump

    lm = load_model(tiny_model_dir)
    plain = load_dump(capture(lm, PROMPTS, tmp_path / "plain", max_new_tokens=9, progress=False, batch_size=1))
    d = load_dump(capture(lm, PROMPTS, tmp_path / "b", max_new_tokens=4, category_budgets={"json": 9},
                          progress=False, batch_size=3))
    assert d.manifest["decoding"]["category_budgets"] == {"json": 9} and d.manifest["decoding"]["max_new_tokens"] == 4
    for pid, n in (("a", 9), ("b", 4), ("c", 9)):
        r = d.record(pid)
        want = plain.record(pid)["generated_token_ids"][:n]
        assert r["generated_token_ids"] == want[:len(r["generated_token_ids"])]
        assert len(r["generated_token_ids"]) <= n and r.get("max_new_tokens") == (9 if n == 9 else None)
    assert validate_dump(d.path) == []
    other = capture(lm, PROMPTS, tmp_path / "o", max_new_tokens=4, progress=False)
    with pytest.raises(IncompatibleRuns, match=r"decoding setting category_budgets differs: reference "
                                               r"\{\"json\": 9\}, candidate not set"):
        compare_dumps(d.path, other, decode=None)
    with pytest.raises(ValueError, match=r"category_budgets must map a category name to a positive int, got 'json': 0"):
        capture(lm, PROMPTS, tmp_path / "x", category_budgets={"json": 0})


def test_cli_category_budget_errors(tiny_model_dir, tmp_path, capsys):
    from logitparity.cli import main

    assert main(["dump", "--model", tiny_model_dir, "--out", str(tmp_path / "x"), "--category-budget", "json"]) == 2
    assert "--category-budget must be CATEGORY=N with N >= 1 new tokens, got 'json'" in capsys.readouterr().err
