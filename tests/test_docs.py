"""docs/python-api.md states the signatures of the public functions: every
keyword default it writes down is the function's own default."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import logitparity as lp

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
# `name(args) -> ...` at the start of a table cell; only names re-exported at logitparity
SIG = re.compile(r"^\| `([a-z_][a-z0-9_]*)\((.*?)\)(?: -> [^`]*)?`", re.M)


def _split_top_level(args: str) -> list[str]:
    """Split on commas outside brackets: 'a, n=(10, 50)' -> ['a', ' n=(10, 50)']."""
    parts, depth, cur = [], 0, ""
    for ch in args:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _documented() -> list[tuple[str, dict[str, str]]]:
    out = []
    for name, args in SIG.findall(DOC.read_text(encoding="utf-8")):
        if name not in lp.__all__:
            continue
        defaults = {}
        for part in _split_top_level(args):
            key, eq, value = part.strip().partition("=")
            if eq and key.isidentifier() and value != "...":
                defaults[key] = value
        out.append((name, defaults))
    return out


def test_the_doc_lists_signatures():
    names = [n for n, _ in _documented()]
    assert {"compare_logits", "compare_dumps", "perplexity", "compare_layers", "gate"} <= set(names), names


@pytest.mark.parametrize("name,defaults", _documented(), ids=[n for n, _ in _documented()])
def test_documented_defaults_are_the_functions_defaults(name, defaults):
    params = inspect.signature(getattr(lp, name)).parameters
    for key, text in defaults.items():
        assert key in params, f"docs/python-api.md: {name} has no parameter {key!r}"
        want = params[key].default
        got = ast.literal_eval(text)
        assert got == want, f"docs/python-api.md: {name}({key}={text}) but the function's default is {want!r}"


def test_metrics_doc_lists_exactly_the_registry_row_fields():
    """docs/metrics.md's field table names every field of the registry's
    row and integer fields, and nothing else (plus topk_common[k])."""
    from logitparity.fields import INT_FIELDS, ROW_FIELDS

    text = (DOC.parent / "metrics.md").read_text(encoding="utf-8")
    cells = re.findall(r"^\| ((?:`[^`]+`(?:, )?)+) \|", text, re.M)
    listed = {name for cell in cells for name in re.findall(r"`([^`]+)`", cell)}
    want = {f.name for f in ROW_FIELDS + INT_FIELDS} | {"topk_common[k]"}
    assert listed == want, f"only in docs/metrics.md: {sorted(listed - want)}; only in fields.py: {sorted(want - listed)}"


def test_every_registry_field_has_a_known_unit_and_a_label():
    from logitparity.fields import REGISTRY, UNITS

    for f in REGISTRY.values():
        assert f.unit in UNITS and f.label and f.higher_is_better in (True, False, None), f
