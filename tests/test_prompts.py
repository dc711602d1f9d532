"""Prompt sets: the embedded default and user files (JSONL or plain text)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from logitparity.prompts import Prompt, load_prompts

REQUIRED_CATEGORIES = {"instruction", "code", "math", "factual", "creative", "json", "long_context",
                       "multilingual", "edge", "minimal", "rare_tokens", "shapes", "context_limit"}


def test_default_set_covers_every_category():
    prompts = load_prompts()
    assert len(prompts) >= 64
    counts = Counter(p.category for p in prompts)
    assert REQUIRED_CATEGORIES <= set(counts)
    assert counts["json"] >= 4 and counts["multilingual"] >= 4 and counts["edge"] >= 4
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(isinstance(p, Prompt) and (p.text or p.category == "minimal") for p in prompts)


def test_default_set_edge_cases():
    prompts = load_prompts()
    edge = [p.text for p in prompts if p.category == "edge"]
    assert any(len(t) <= 2 for t in edge)  # very short
    assert any(max(Counter(t.split()).values(), default=0) >= 30 or len(set(t)) == 1 for t in edge)  # repeated tokens
    assert any(any(ord(c) > 0xFFFF for c in t) for t in edge)  # astral-plane unicode (emoji, math letters)
    assert any("\u200b" in t or any(0x300 <= ord(c) < 0x370 for c in t) for t in edge)  # zero-width / combining
    json_prompts = [p.text for p in prompts if p.category == "json"]
    assert all("JSON" in t for t in json_prompts)
    multilingual = "".join(p.text for p in prompts if p.category == "multilingual")
    assert any("\u4e00" <= c <= "\u9fff" for c in multilingual) and any("\u0400" <= c <= "\u04ff" for c in multilingual)


def test_default_long_context_prompt_is_long():
    # >= 1000 tokens with the default tokenizer (checked exactly in
    # test_capture's slow test); ~4 characters per token for English.
    (long,) = [p for p in load_prompts() if p.category == "long_context"]
    assert len(long.text) >= 5000


@pytest.mark.slow
def test_default_set_edge_categories_with_the_default_tokenizer():
    """Token counts of the edge categories, exactly, with the default model's
    tokenizer and chat template (what capture feeds the model)."""
    from logitparity.capture.engine import hf_encode
    from logitparity.capture.hf import load_tokenizer
    from logitparity.prompts import EDGE_CATEGORIES, HEAVY_CATEGORIES

    tok, n_ctx = load_tokenizer(None)
    by_cat: dict[str, list] = {}
    for p in load_prompts():
        by_cat.setdefault(p.category, []).append(p)
    assert set(EDGE_CATEGORIES) <= set(by_cat) and set(HEAVY_CATEGORIES) <= set(EDGE_CATEGORIES)
    n = lambda p, chat=None: len(hf_encode(tok, p.text, chat)[0])
    minimal = {p.id: p for p in by_cat["minimal"]}
    assert minimal["minimal-empty"].text == "" and n(minimal["minimal-empty"], False) == 0
    assert n(minimal["minimal-empty"]) > 0  # the chat template alone
    assert [n(p, False) for p in by_cat["minimal"] if p.text] == [1, 1]
    shapes = sorted(n(p) for p in by_cat["shapes"])
    assert shapes == [47, 63, 65, 127, 129, 257] and all(k % 8 for k in shapes)
    # rare scripts and byte-fallback characters: byte-level BPE splits them into many tokens
    rare = {p.id: p for p in by_cat["rare_tokens"]}
    assert n(rare["rare-byte-fallback"], False) > len(rare["rare-byte-fallback"].text) // 2
    (limit,) = by_cat["context_limit"]
    assert n_ctx == 8192 and 7000 <= n(limit) <= 7168  # near the limit, room for 1024 new tokens


def test_jsonl_file(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"id": "a", "category": "x", "text": "first\nline"}, {"text": "no id"}, {"id": "c", "text": "ünï"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert load_prompts(path) == [Prompt("a", "x", "first\nline"), Prompt("line-2", "default", "no id"),
                                  Prompt("c", "default", "ünï")]


def test_plain_text_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("What is 2+2?\n\n  Say hi\\nthen bye\n", encoding="utf-8")
    assert load_prompts(str(path)) == [Prompt("line-1", "default", "What is 2+2?"),
                                       Prompt("line-3", "default", "  Say hi\nthen bye")]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts file .*nope.jsonl does not exist"):
        load_prompts(tmp_path / "nope.jsonl")


def test_not_utf8(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_prompts(tmp_path / "p.txt")


def test_empty_file(tmp_path):
    (tmp_path / "p.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "p.txt")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "b", "text": "x"', r"p.jsonl:3: malformed JSON"),
        ('["a", "b"]', r"p.jsonl:3: expected a JSON object with id, category, text, got list"),
        ('{"id": "b"}', r"p.jsonl:3: 'text' must be a string, got None"),
        ('{"id": 7, "text": "x"}', r"p.jsonl:3: 'id' must be a non-empty string, got 7"),
        ('{"id": "b", "category": null, "text": "x"}', r"p.jsonl:3: 'category' must be a non-empty string"),
        ('{"id": "b", "txt": "x", "text": "y"}', r"p.jsonl:3: unknown keys \['txt'\]"),
        ('{"id": "a", "text": "again"}', r"p.jsonl:3: duplicate prompt id 'a' \(first on line 1\)"),
    ],
    ids=["truncated", "array", "no-text", "int-id", "null-category", "unknown-key", "duplicate"],
)
def test_malformed_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "text": "ok"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_prompts(path)


def test_lines_end_only_at_newlines(tmp_path):
    # U+2028 and U+0085 are line breaks to str.splitlines, not to JSONL
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "text": "x\u2028y\u0085z"}\r\n{"id": "b", "text": "w"}\n', encoding="utf-8")
    assert load_prompts(path) == [Prompt("a", "default", "x\u2028y\u0085z"), Prompt("b", "default", "w")]


def test_an_empty_prompt_is_allowed(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "e", "category": "minimal", "text": ""}\n')
    assert load_prompts(path) == [Prompt("e", "minimal", "")]


def test_a_directory_is_not_a_prompts_file(tmp_path):
    with pytest.raises(ValueError, match=r"prompts file .* is a directory; pass a JSONL or plain-text file"):
        load_prompts(tmp_path)


def test_a_prompt_with_unicode_line_separators_survives_a_dump(tmp_path):
    import numpy as np

    from logitparity.dump import DumpWriter, load_dump
    from test_compare import manifest, record

    text = "a\u2028b\u2029c\u0085d\x1ce"
    with DumpWriter(tmp_path / "d", manifest()) as w:
        w.add(record(0, [3], prompt=text), np.zeros((1, 40), np.float32))
    assert load_dump(tmp_path / "d").record("p0")["prompt"] == text
