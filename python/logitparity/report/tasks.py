"""Markdown for a task comparison (``logitparity.tasks``): renders the
figures ``TaskComparison`` holds, computes nothing."""

from __future__ import annotations

from typing import Any

__all__ = ["render_markdown"]


def _pct(r: Any) -> str:
    return f"{100 * r.rate:.1f}% ± {100 * r.se:.1f}% ({r.k}/{r.n})"


def _side(run: Any) -> str:
    m = run.model
    return f"{m.get('path') or 'model'} ({m.get('dtype')}, {m.get('device')})"


def render_markdown(c: Any) -> str:
    ref, cand = c.reference, c.candidate
    lines = [
        "## Task accuracy (multiple choice)",
        "",
        f"**{c.verdict}** (the rule: FAIL when the candidate is less accurate by more than "
        f"{100 * c.max_drop:.1f} points and the exact McNemar test gives p < {c.alpha:g})",
        "",
        f"- reference: {_side(ref)}",
        f"- candidate: {_side(cand)}",
        f"- {len(ref.questions)} questions, scoring `{ref.scoring}` (log-likelihood of each choice, "
        "highest wins)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| reference accuracy ↑ | {_pct(ref.accuracy)} |",
        f"| candidate accuracy ↑ | {_pct(cand.accuracy)} |",
        f"| Δ accuracy (candidate − reference, paired) | {100 * c.delta:+.1f} ± {100 * c.delta_se:.1f} points |",
        f"| answer agreement ↑ | {_pct(c.agreement)} |",
        f"| McNemar b (ref right, cand wrong) / c (ref wrong, cand right) | {c.b} / {c.c} |",
        f"| McNemar exact p (two-sided) | {c.p_value:.4g} |",
        "",
        "| subject | n | reference ↑ | candidate ↑ | agreement ↑ |",
        "|---|---|---|---|---|",
    ]
    for s in c.by_subject:
        lines.append(f"| {s.subject} | {s.n} | {_pct(s.reference)} | {_pct(s.candidate)} | {_pct(s.agreement)} |")
    return "\n".join(lines) + "\n"
