"""Prompt sets: the embedded default (data/prompts.jsonl) or a user file.

A prompt file is either JSONL, one object per line with ``id``, ``category``
and ``text`` (``category`` optional, default "default"; ``id`` optional,
default "line-N"; ``text`` may be empty: an empty user turn, which has
tokens only with a chat template), or plain text with one prompt per line (ids "line-N",
category "default"; a literal "\\n" in a line is a newline). The format is
JSONL when the first non-blank line starts with "{". Blank lines are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["CATEGORY_BUDGETS", "DEFAULT_PROMPTS", "EDGE_CATEGORIES", "HEAVY_CATEGORIES", "Prompt", "coverage_warning",
           "default_categories", "load_prompts", "missing_categories"]

DEFAULT_PROMPTS = "data/prompts.jsonl"  # inside the package
# New-token budgets of the default set's categories that need more than a
# run's default (capture category_budgets; the demo uses these). SmolLM2-135M
# fp32 needed 16-33 tokens to close its JSON on 6 of the 8 json prompts (the
# other two ran past 128); 96 leaves room for a code fence and an EOS.
CATEGORY_BUDGETS: dict[str, int] = {"json": 96}
# Categories of the default set, beyond the everyday ones (instruction, code,
# math, factual, creative, json, multilingual, long_context), that probe edge
# cases; each is reported as its own row of the report's category table:
# edge (short, repeated, emoji, unicode, whitespace), minimal (an empty
# prompt and one-token prompts: only the chat template around them), rare_tokens
# (rare scripts, long numbers, repeated punctuation, characters that byte-level
# BPE splits into single-byte tokens), shapes (templated lengths 47, 63, 65,
# 127, 129 and 257 tokens: not multiples of a SIMD width, around powers of
# two), context_limit (7124 templated tokens of SmolLM2's 8192: at most 1069
# new tokens fit).
EDGE_CATEGORIES = ("edge", "minimal", "rare_tokens", "shapes", "context_limit")
# Categories whose prefill is too slow for a quick run on a CPU (the demo
# leaves them out; dump runs the whole set).
HEAVY_CATEGORIES = ("context_limit",)


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str


def load_prompts(path: str | os.PathLike | None = None) -> list[Prompt]:
    """Prompts from ``path`` (None = the embedded default set), in file order.
    Malformed lines and duplicate ids are ValueErrors naming the line."""
    if path is None:
        text = resources.files("logitparity").joinpath(DEFAULT_PROMPTS).read_text(encoding="utf-8")
        where = f"<logitparity>/{DEFAULT_PROMPTS}"
    else:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"prompts file {p} does not exist (pass a JSONL or plain-text file, or omit it for the default set)") from None
        except IsADirectoryError:
            raise ValueError(f"prompts file {p} is a directory; pass a JSONL or plain-text file") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"prompts file {p} is not UTF-8 text ({e})") from None
        where = str(p)
    # lines end at "\n" (and "\r\n") only: str.splitlines would also cut at
    # U+2028, U+0085 and other characters that JSON strings may hold raw
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    first = next((line for line in lines if line.strip()), "")
    parse = _parse_json if first.lstrip().startswith("{") else _parse_text
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        prompt = parse(line, lineno, where)
        if prompt.id in seen:
            raise ValueError(f"{where}:{lineno}: duplicate prompt id {prompt.id!r} (first on line {seen[prompt.id]}); ids must be unique")
        seen[prompt.id] = lineno
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{where}: no prompts (the file is empty)")
    return prompts


def _parse_json(line: str, lineno: int, where: str) -> Prompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}:{lineno}: expected a JSON object with id, category, text, got {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str):
        raise ValueError(f"{where}:{lineno}: 'text' must be a string, got {text!r}")
    pid = obj.get("id", f"line-{lineno}")
    category = obj.get("category", "default")
    for name, value in (("id", pid), ("category", category)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}:{lineno}: {name!r} must be a non-empty string, got {value!r}")
    unknown = set(obj) - {"id", "category", "text"}
    if unknown:
        raise ValueError(f"{where}:{lineno}: unknown keys {sorted(unknown)}; a prompt has id, category and text")
    return Prompt(pid, category, text)


def _parse_text(line: str, lineno: int, where: str) -> Prompt:
    return Prompt(f"line-{lineno}", "default", line.replace("\\n", "\n"))


def default_categories() -> list[str]:
    """The categories of the embedded default prompt set, sorted."""
    return sorted({p.category for p in load_prompts()})


def missing_categories(categories: Any) -> list[str]:
    """Categories of the default prompt set that ``categories`` (the
    categories of the prompts used) lacks, sorted."""
    have = set(categories)
    return [c for c in default_categories() if c not in have]


def coverage_warning(categories: Any) -> str | None:
    """One line warning that the prompts used miss categories the default
    set has (calibration coverage), or None when every one is present."""
    missing = missing_categories(categories)
    if not missing:
        return None
    return (f"calibration coverage: the prompts used have no {', '.join(missing)} prompts "
            f"({len(missing)} of the default set's {len(default_categories())} categories); figures may not "
            "hold for such inputs: add prompts of those categories (the default set has them)")
