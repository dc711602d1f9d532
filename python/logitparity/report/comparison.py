"""Reports of a Comparison: markdown for people, JSON with every number.

``render_markdown(comparison)`` puts the verdict and key figures first, then
the speed of the candidate, the two runs, the free-running agreement, the
per-token table, the per-category table, behaviour drift, the worst prompts
with token-level diffs, and every prompt. ``comparison_dict`` is the same
content as plain JSON types; ``write_report`` writes the files (atomically).
Every figure is defined in docs/report.md.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from logitparity._dicts import dig as _get
from logitparity._fileio import write_text_atomic

from logitparity.drift import REPETITION_N
from logitparity.fields import REGISTRY, REPORT_FIELDS
from logitparity.stats import Describe, Rate, describe, rate

if TYPE_CHECKING:
    from logitparity.compare import Comparison, PromptResult

__all__ = ["comparison_dict", "describe_run", "jsonable", "render_markdown", "render_sampled_markdown", "sampled_dict",
           "write_json", "write_report"]

HIST_WIDTH = 30  # characters of the longest text bar
SHOW_TOKENS = 24  # tokens shown after a split

# Per-token rows of the distribution table: (field, label, unit, higher_is_better),
# from the one registry (logitparity.fields).
TOKEN_ROWS: tuple[tuple[str, str, str, bool | None], ...] = tuple(
    (n, REGISTRY[n].label, REGISTRY[n].unit, REGISTRY[n].higher_is_better) for n in REPORT_FIELDS)
_ARROW = {True: "↑", False: "↓", None: ""}


# --------------------------------------------------------------------------
# number formatting: fixed decimals per kind of figure


def _isnan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _sci(x: float) -> str:
    """Heavy-tailed figures (nats, logits): 3 decimals in scientific form."""
    if _isnan(x):
        return "—"
    if math.isinf(x):
        return "+inf" if x > 0 else "−inf"
    return "0" if x == 0 else f"{x:.3e}"


def _fixed_for(unit: str):
    """The number format of a unit: shares with 4 decimals, cosines with 6,
    everything heavy-tailed (nats, logits, probabilities) scientific."""
    if unit == "share":
        return lambda x: _fix(x, 4)
    if unit == "cosine":
        return lambda x: _fix(x, 6)
    return _sci


def _mean_se(d: Describe, fmt=None) -> str:
    fmt = fmt or _sci
    if d.n == 0:
        return "—" if not d.n_inf else "+inf"
    s = fmt(d.mean) if math.isnan(d.se) else f"{fmt(d.mean)} ± {fmt(d.se)}"
    return s + (f" (+{d.n_inf} inf)" if d.n_inf else "")


def _pct(r: Rate) -> str:
    if r.n == 0:
        return "—"
    return f"{100 * r.rate:.2f}% ± {100 * r.se:.2f}% ({r.k}/{r.n})"


def _ratio(x: float) -> str:
    return "—" if _isnan(x) else f"{x:.3f}"


def _fix(x: float, digits: int = 3) -> str:
    return "—" if _isnan(x) else f"{x:.{digits}f}"


def _cell(text: str, limit: int = 160) -> str:
    """Text made safe for one markdown table cell."""
    s = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "↵").replace("\r", "")
    s = s.replace("`", "ˋ")
    return s if len(s) <= limit else s[: limit - 1] + "…"


# --------------------------------------------------------------------------
# run descriptions and speed


def describe_run(m: dict, path: str) -> dict[str, str]:
    eng = _get(m, "engine") or {}
    model = _get(m, "model") or {}
    dec = _get(m, "decoding") or {}
    logits = _get(m, "logits") or {}
    libs = _get(m, "libraries") or {}
    mode = dec.get("mode", "?")
    decoding = str(mode)
    if mode == "sample":
        decoding += f", T={dec.get('temperature')}, top-p={dec.get('top_p')}, seed={dec.get('seed')}"
    if dec.get("max_new_tokens") is not None and mode != "score":
        decoding += f", ≤ {dec.get('max_new_tokens')} new tokens"
    hashes = ", ".join(f"{k.replace('_hash', '')} {str(v).split(':')[-1][:12]}" for k, v in model.items()
                       if k.endswith("hash") and v)
    return {
        "dump": path,
        "engine": " ".join(str(x) for x in (eng.get("name"), eng.get("version")) if x) or "?",
        "model": str(model.get("name") or model.get("path") or "?") + (f" ({hashes})" if hashes else ""),
        "dtype / device": f"{_get(m, 'dtype') or '?'} / {_get(m, 'device') or '?'}",
        "decoding": decoding,
        "logits stored": f"{logits.get('storage', '?')} {logits.get('dtype', '')}".strip()
                         + (f", {logits.get('vocab_size')} per row" if logits.get("vocab_size") else ""),
        "libraries": ", ".join(f"{k} {v}" for k, v in sorted(libs.items())) or "?",
        "created": str(_get(m, "created") or "?"),
    }


# --------------------------------------------------------------------------
# the JSON form


def jsonable(x: Any) -> Any:
    """NaN -> None, ±inf -> "inf"/"-inf", numpy -> Python."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    return x


def _prompt_dict(comp: "Comparison", i: int, p: "PromptResult") -> dict[str, Any]:
    mask = comp.token_prompt == i
    return {
        "id": p.id,
        "category": p.category,
        "first_divergence": p.first_divergence,
        "split": p.split,
        "margin_ref_at_split": p.margin_ref_at_split,
        "margin_cand_at_split": p.margin_cand_at_split,
        "split_top_ref": [{"token": t, "p": q} for t, q in p.split_top_ref],
        "split_top_cand": [{"token": t, "p": q} for t, q in p.split_top_cand],
        "n_ref": len(p.ref_tokens),
        "n_cand": len(p.cand_tokens),
        "stop_ref": p.stop_ref,
        "stop_cand": p.stop_cand,
        "n_compared": p.n_compared,
        "tokens": comp.token_summaries(mask),
        "ref_tokens": p.ref_tokens,
        "cand_tokens": p.cand_tokens,
        "ref_text": p.ref_text,
        "cand_text": p.cand_text,
    }


def comparison_dict(comp: "Comparison") -> dict[str, Any]:
    """Every number of the report as JSON types (NaN -> null, inf -> "inf")."""
    free = comp.free_running_available
    d = {
        "format": "logitparity-comparison",  # "logitparity.comparison", version 1, before (_fileio.LEGACY_TAGS)
        "version": "1.0",
        "verdict": comp.verdict.to_dict(),
        "incomplete": list(getattr(comp, "incomplete", [])),
        "noise_floor": None if comp.noise is None else {
            "source": comp.noise.source, "change": comp.noise.change, "version": f"{getattr(comp.noise, 'version', 1)}.0",
            "pairs": [p.to_dict() for p in getattr(comp.noise, "pairs", ())],
            "prompts": len(getattr(comp.noise, "prompts", {})),
            "positions": comp.noise.n_positions if hasattr(comp.noise, "n_positions") else None,
            "judgement": None if comp.floor_judgement is None else comp.floor_judgement.to_dict(),
        },
        "tie_aware": comp.tie_aware,
        "match_label": comp.match_label,
        "forced_positions": int(comp.token_forced.sum()),
        "reference": describe_run(comp.ref_manifest, comp.ref_path),
        "candidate": describe_run(comp.cand_manifest, comp.cand_path),
        "mode": comp.mode,
        "storage": comp.storage,
        "kl_is_bound": comp.kl_is_bound,
        "notes": comp.notes,
        "prompts": len(comp.prompts),
        "positions": len(comp.tokens),
        "only_reference": comp.only_ref,
        "only_candidate": comp.only_cand,
        "near_tie_margin": comp.near_tie_margin,
        "speed": comp.speed_figures(),
        "speedup": comp.speedup,
        "speedup_valid": comp.speedup_valid,
        "free_running": None if not free else {
            "greedy_match": {str(n): comp.greedy_match(n).to_dict() for n in comp.n_values},
            "exact_match": comp.exact_match().to_dict(),
            "first_divergence_histogram": comp.divergence_histogram(),
            "splits": comp.splits(),
            "real_divergence": {str(n): comp.real_divergence(n).to_dict() for n in comp.n_values},
        },
        "tokens": comp.token_summaries(),
        "categories": comp.category_figures(),
        "missing_categories": _missing_categories(comp),
        "drift": comp.drift_figures(),
        "metrics": comp.metrics(),
        "per_prompt": [_prompt_dict(comp, i, p) for i, p in enumerate(comp.prompts)],
    }
    return jsonable(d)


def write_json(comp: "Comparison", path: str | os.PathLike) -> Path:
    p = Path(path)
    write_text_atomic(p, json.dumps(comparison_dict(comp), indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return p


def write_report(
    comp: "Comparison",
    markdown: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    plots_dir: str | os.PathLike | None = None,
    *,
    top_worst: int = 5,
) -> dict[str, Any]:
    """Write any of report.md, report.json and the PNG plots; -> the paths
    written {"markdown", "json", "plots": [...]}."""
    out: dict[str, Any] = {"markdown": None, "json": None, "plots": []}
    images: dict[str, str] = {}
    if plots_dir is not None:
        from logitparity.report.plots import write_plots

        paths = write_plots(comp, plots_dir)
        out["plots"] = [str(p) for p in paths.values()]
        base = Path(markdown).parent if markdown is not None else Path(".")
        images = {k: os.path.relpath(p, base) for k, p in paths.items()}
    if markdown is not None:
        p = Path(markdown)
        write_text_atomic(p, render_markdown(comp, top_worst=top_worst, images=images))
        out["markdown"] = str(p)
    if json_path is not None:
        out["json"] = str(write_json(comp, json_path))
    return out


# --------------------------------------------------------------------------
# markdown


def _tokens_text(comp: "Comparison", ids: Sequence[int]) -> str:
    if not ids:
        return ""
    if comp.decode is None:
        return "[" + ", ".join(str(i) for i in ids) + "]"
    return comp.decode(list(ids))


def _token_label(comp: "Comparison", t: int) -> str:
    if comp.decode is None:
        return f"`{t}`"
    # repr shows whitespace as \n, \t; inside a code span backslashes stay
    # literal, only pipes (table cells) and backticks need care
    s = repr(comp.decode([t]))[1:-1].replace("|", "\\|").replace("`", "ˋ")
    return f"`{s[:40]}` ({t})"


def _verdict_section(comp: "Comparison") -> list[str]:
    v = comp.verdict
    mark = "✅ PASS" if v.passed else "❌ FAIL"
    lines = [f"**Verdict: {mark}** under policy `{v.policy}`" + (f" — {v.description}" if v.description else ""), ""]
    if comp.noise is not None:
        lines += _floor_lines(comp) + [""]
    lines += ["| threshold | metric | | measured | limit | result |", "|---|---|---|---|---|---|"]
    from logitparity.policy import parse_metric

    for r in v.results:
        try:
            arrow = _ARROW[parse_metric(r.metric).higher_is_better]
        except ValueError:  # a ratio to the noise floor: lower is better
            arrow = _ARROW[False]
        meas = "not measured" if _isnan(r.measured) else f"{r.measured:.6g}"
        note = f" — {r.note}" if r.note else ""
        src = "" if r.limit_source == "absolute" else f" ({r.limit_source})"
        res = "✅ pass" if r.passed else "❌ fail"
        lines.append(f"| {_cell(r.name)} | `{r.metric}` | {arrow} | {meas} | {r.comparison} {r.limit:.6g}{src} | "
                     f"{res}{_cell(note, 400)} |")
    return lines


def _floor_lines(comp: "Comparison") -> list[str]:
    """The floor used: its file, benign changes and size; with the
    statistical verdict, what was paired."""
    f = comp.noise
    if getattr(f, "version", 1) < 2:
        return [f"Noise floor from `{f.source}`" + (f" ({f.change})" if f.change else "") + "."]
    lines = [f"Noise floor from `{f.source}`: {len(f.pairs)} benign pair(s), {len(f.prompts)} prompts, "
             f"{f.n_positions} positions.", "",
             "| benign change | mode | dtypes | prompts | positions | mean KL (nats) |", "|---|---|---|---|---|---|"]
    for p in f.pairs:
        lines.append(f"| {_cell(p.change, 120)} | {p.mode} | {p.dtype_a} / {p.dtype_b} | {p.prompts} | "
                     f"{p.positions} | {_sci(p.mean_kl)} |")
    j = comp.floor_judgement
    if j is not None:
        lines += ["", f"Paired by position: {j.positions} positions over {j.prompts} prompts "
                  f"({j.unpaired} compared positions have no floor value and are not judged). Each figure is "
                  f"the ratio Σ candidate / Σ floor over the paired positions; its interval is a bootstrap over "
                  f"prompts; FAIL when p < {j.alpha_each:.3g}. Top-1 changed: candidate {_pct(j.top1_cand)}, "
                  f"floor {_pct(j.top1_floor)}."]
    return lines


def _key_figures(comp: "Comparison") -> list[str]:
    lines = ["| figure | | value |", "|---|---|---|"]
    if comp.free_running_available:
        for n in comp.n_values:
            lines.append(f"| {comp.match_label} match at N = {n} (share of prompts) | ↑ | {_pct(comp.greedy_match(n))} |")
            if not comp.sampled:
                lines.append(f"| real divergence before N = {n} (share of prompts) | ↓ | {_pct(comp.real_divergence(n))} |")
        lines.append(f"| full-sequence exact match | ↑ | {_pct(comp.exact_match())} |")
        sp = comp.splits()
        if "sampled" in sp:
            lines.append(f"| splits: different draws / one run stopped | | {sp['sampled']} / {sp['length']} |")
        else:
            lines.append(f"| splits: real divergences / near-ties / one run stopped | ↓ | "
                         f"{sp['real']} / {sp['near-tie']} / {sp['length']} |")
    kl = describe(comp.tokens.kl_ref_cand)
    bound = " (lower bound)" if comp.kl_is_bound else ""
    lines.append(f"| mean KL(ref ‖ cand) per token{bound}, nats | ↓ | {_mean_se(kl)} |")
    lines.append(f"| p99 / max KL(ref ‖ cand), nats | ↓ | {_sci(kl.p99)} / {_sci(kl.max)} |")
    lines.append(f"| same top-1 token | ↑ | {_pct(comp.same_top1())} |")
    lines.append(f"| compared | | {len(comp.tokens)} positions over {len(comp.prompts)} prompts ({comp.mode}) |")
    return lines


def _speed_section(comp: "Comparison") -> list[str]:
    rows = comp.speed_figures()
    if not rows:
        return ["No timing recorded in the dumps."]
    lines = ["| figure | | reference | candidate | candidate / reference |", "|---|---|---|---|---|"]
    for r in rows:
        f = (lambda x: "—" if x is None else f"{x:,.1f}")
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        lines.append(f"| {r['figure']} ({r['unit']}) | {_ARROW[r['higher_is_better']]} | {f(r['reference'])} | "
                     f"{f(r['candidate'])} | {ratio} |")
    lines.append("")
    s = comp.speedup
    if not comp.verdict.passed:
        lines.append("**Not a valid speedup:** the candidate fails the quality verdict, so its speed does not count.")
    elif s is None:
        lines.append("The verdict passes, but a wall time is missing on one side, so no speedup is stated.")
    elif comp.speedup_valid:
        lines.append(f"The verdict passes and the candidate is faster: a valid speedup of {s:.2f}× in wall time for "
                     "the same prompts, at equal quality (length drift included: more generated tokens cost more "
                     "time).")
    else:
        lines.append(f"**Not a speedup:** the candidate passes the verdict but takes {1 / s:.2f}× the reference's wall "
                     "time for the same prompts.")
    return lines


def _runs_section(comp: "Comparison") -> list[str]:
    a = describe_run(comp.ref_manifest, comp.ref_path)
    b = describe_run(comp.cand_manifest, comp.cand_path)
    lines = ["| | reference | candidate |", "|---|---|---|"]
    for k in a:
        lines.append(f"| {k} | {_cell(a[k], 120)} | {_cell(b[k], 120)} |")
    return lines


def histogram_bars(hist: list[dict[str, Any]], width: int = HIST_WIDTH) -> list[str]:
    """Text bars of the first-divergence histogram, one line per bin."""
    top = max([b["count"] for b in hist] + [1])
    total = sum(b["count"] for b in hist) or 1
    out = []
    for b in hist:
        if b["lo"] is None:
            label = "no divergence"
        elif b["lo"] == b["hi"]:
            label = f"token {b['lo']}"
        else:
            label = f"tokens {b['lo']}–{b['hi']}"
        bar = "█" * round(width * b["count"] / top)
        out.append(f"{label:>15} │{bar:<{width}} {b['count']:>4} ({100 * b['count'] / total:5.1f}%)")
    return out


def _free_running_section(comp: "Comparison", images: dict[str, str]) -> list[str]:
    if not comp.free_running_available:
        return ["Not available: the reference is a score-mode dump (no generated tokens of its own)."]
    lines = []
    if comp.mode == "teacher-forced":
        lines += ["Derived from the teacher-forced top-1: the candidate diverges where its top-1 on the "
                  "reference's prefix differs from the reference token.", ""]
    if comp.splits().get("sampled") is not None:  # both sampled: a split is a draw, never a divergence
        lines += [f"| N | {comp.match_label} match at N ↑ |", "|---|---|"]
        for n in comp.n_values:
            lines.append(f"| {n} | {_pct(comp.greedy_match(n))} |")
    else:
        lines += [f"| N | {comp.match_label} match at N ↑ | real divergence before N ↓ |", "|---|---|---|"]
        for n in comp.n_values:
            lines.append(f"| {n} | {_pct(comp.greedy_match(n))} | {_pct(comp.real_divergence(n))} |")
    budget = _get(comp.ref_manifest, "decoding", "max_new_tokens")
    over = [n for n in comp.n_values if budget is not None and n > int(budget)]
    if over:
        lines += ["", f"N = {', '.join(map(str, over))} exceeds the {budget}-token budget: these count the prompts "
                  "identical over their whole output."]
    sp = comp.splits()
    tie_rule = ("reference top-1 − top-2 margin within the noise floor's margin movement or the dtype's rounding "
                "step at the split" if comp.tie_aware else
                f"reference top-1 − top-2 margin < {comp.near_tie_margin:g} logits at the split")
    if "sampled" in sp:
        lines += ["", f"Splits: {sp['sampled']} different draw(s) (both runs sampled: a split is where the two "
                  "draws part, not a divergence; the sampled comparison judges the distributions)"
                  + (f", {sp['length']} where one run stopped and the other went on" if sp["length"] else "") + ".", ""]
    else:
        lines += ["", f"Splits: **{sp['real']} real divergence(s)**, {sp['near-tie']} near-tie(s) "
                  f"({tie_rule})"
                  + (f", {sp['length']} where one run stopped and the other went on" if sp["length"] else "") + ".", ""]
    lines += ["First divergence (position of the first differing generated token):", "", "```text"]
    lines += histogram_bars(comp.divergence_histogram())
    lines += ["```"]
    if "first_divergence" in images:
        lines += ["", f"![first divergence histogram]({images['first_divergence']})"]
    return lines


def _token_section(comp: "Comparison", images: dict[str, str]) -> list[str]:
    lines = []
    if comp.kl_is_bound:
        lines += [f"Logits stored as {comp.storage}: KL and JS are **lower bounds** (tokens both sides store + "
                  "one tail bucket); max |Δ| figures are over the tokens both sides store; cosine and entropy are "
                  "not available.", ""]
    lines += ["| metric | | unit | mean ± se | median | p90 | p99 | p99.9 | max |",
              "|---|---|---|---|---|---|---|---|---|"]
    for field, label, unit, better in TOKEN_ROWS:
        d = describe(comp.token_values(field))
        if d.n == 0 and d.n_inf == 0:
            continue
        f = _fixed_for(unit)
        lines.append(f"| {_cell(label)} | {_ARROW[better]} | {'' if unit == 'cosine' else unit} | {_mean_se(d, f)} | "
                     f"{f(d.median)} | {f(d.p90)} | {f(d.p99)} | {f(d.p999)} | {f(d.max)} |")
    lines.append(f"| same top-1 token | ↑ | share | {_pct(comp.same_top1())} | | | | | |")
    bad_r = int((comp.tokens.nonfinite_ref > 0).sum())
    bad_c = int((comp.tokens.nonfinite_cand > 0).sum())
    if bad_r or bad_c:
        lines += ["", f"**Non-finite logits:** {bad_r} reference and {bad_c} candidate positions hold NaN or +inf "
                  "(their metrics are NaN and excluded above)."]
    for key, alt in (("kl_distribution", "per-token KL distribution"), ("kl_by_position", "KL by position")):
        if key in images:
            lines += ["", f"![{alt}]({images[key]})"]
    return lines


def _missing_categories(comp: "Comparison") -> list[str]:
    """Categories of the default prompt set absent from the compared prompts (calibration coverage)."""
    from logitparity.prompts import missing_categories

    return missing_categories(p.category for p in comp.prompts)


def _category_section(comp: "Comparison") -> list[str]:
    ns = comp.n_values
    head = "| category | prompts | positions | " + " | ".join(f"greedy@{n} ↑" for n in ns)
    head += " | exact ↑ | mean KL ± se (nats) ↓ | p99 KL ↓ | same top-1 ↑ | length ratio |"
    lines = [head, "|" + "---|" * (8 + len(ns))]
    free = comp.free_running_available
    for row in comp.category_figures():
        g = " | ".join(_share(row["greedy_match"][str(n)], 1) if free else "—" for n in ns)
        kl = describe_from(row["tokens"]["kl_ref_cand"])
        exact = _share(row["exact_match"], 1) if free else "—"
        lr = row["length_ratio"]
        lines.append(
            f"| {_cell(row['category'], 40)} | {row['prompts']} | {row['positions']} | {g} | {exact} | "
            f"{_mean_se(kl)} | {_sci(kl.p99)} | {_share(row['tokens']['same_top1'], 2)} | "
            f"{_ratio(float('nan') if lr is None else lr)} |"
        )
    from logitparity.prompts import coverage_warning

    warn = coverage_warning(p.category for p in comp.prompts)
    return lines + (["", f"**Warning:** {warn}."] if warn else [])


def _share(r: dict[str, Any], digits: int) -> str:
    """A rate dict as a percentage with fixed decimals (— when n = 0)."""
    return "—" if r["n"] == 0 else f"{100 * r['rate']:.{digits}f}%"


def describe_from(d: dict[str, Any]) -> Describe:
    return Describe(**d)


def _p(t: dict[str, Any] | None) -> str:
    """A test result as 'p = …' (— when the test was not run)."""
    if t is None:
        return "—"
    return f"p = {t['p_value']:.3g}"


def _drift_section(comp: "Comparison") -> list[str]:
    dr = comp.drift_figures()
    tests = dr["tests"]
    lines = ["| figure | reference | candidate | shift (cand − ref) | two-sample test |", "|---|---|---|---|---|"]
    e_r, e_c = describe_from(dr["entropy_ref"]), describe_from(dr["entropy_cand"])
    m_r, m_c = describe_from(dr["margin_ref"]), describe_from(dr["margin_cand"])
    if comp.mode == "free-running":
        l_r, l_c = describe_from(dr["length_ref"]), describe_from(dr["length_cand"])
        st = dr["length_ratio_stats"]
        lines.append(f"| generated tokens per prompt (mean ± se) | {l_r.mean:.2f} ± {_fix(l_r.se, 2)} | "
                     f"{l_c.mean:.2f} ± {_fix(l_c.se, 2)} | length ratio {_ratio(dr['length_ratio'])} (per prompt: "
                     f"mean {_ratio(st['mean'])}, p95 {_ratio(st['p95'])}) | paired {_p(tests['length'])}; "
                     f"Mann–Whitney {_p(tests['length_mw'])} |")
        first = True
        for reason, c in dr["stop_reasons"].items():
            t = tests["stop_reason"]
            test = (f"TV {t['statistic']:.3f}, {_p(t)}" if t else "—") if first else ""
            lines.append(f"| stop reason `{reason}` | {c['reference']} | {c['candidate']} | "
                         f"{c['candidate'] - c['reference']:+d} | {test} |")
            first = False
        rr, rc = Rate(**dr["repetition_ref"]), Rate(**dr["repetition_cand"])
        lines.append(f"| repeated {dr['repetition_n']}-grams ↓ | {_pct(rr)} | {_pct(rc)} | "
                     f"{_fix(100 * (rc.rate - rr.rate), 2) + ' pts' if rr.n and rc.n else '—'} | "
                     f"{_p(tests['repetition'])} |")
        if dr["json_valid_ref"] is not None:
            jr, jc = Rate(**dr["json_valid_ref"]), Rate(**dr["json_valid_cand"])
            lines.append(f"| valid JSON (category `json`) ↑ | {_pct(jr)} | {_pct(jc)} | "
                         f"{_fix(100 * (jc.rate - jr.rate), 2)} pts | McNemar {_p(tests['json_valid'])} |")
        elif any(p.category == "json" for p in comp.prompts):
            lines.append("| valid JSON (category `json`) | — | — | no tokenizer to decode the text | |")
        t = tests["token_frequency"]
        if t is not None:
            lines.append(f"| token-frequency divergence (JS of unigram counts, nats) ↓ | | | {_sci(t['statistic'])} | "
                         f"{_p(t)} |")
    sr = dr["stop_rank"]
    if sr["n"]:
        a, b = describe_from(sr["ref"]), describe_from(sr["cand"])
        lines.append(f"| stop token rank at the end of an answer ({sr['n']} positions; mean / max) ↓ | "
                     f"{_fix(a.mean, 2)} / {a.max:.0f} | {_fix(b.mean, 2)} / {b.max:.0f} | "
                     f"{b.mean - a.mean:+.2f} | |")
    sh_e, sh_m = describe_from(dr["entropy_shift"]), describe_from(dr["margin_shift"])
    if e_r.n:
        lines.append(f"| entropy per position (nats) | {_fix(e_r.mean, 4)} | {_fix(e_c.mean, 4)} | {_mean_se(sh_e)} | "
                     f"{_p(tests['entropy_shift'])} |")
    lines.append(f"| top-1 margin per position (logits) | {_fix(m_r.mean, 4)} | {_fix(m_c.mean, 4)} | {_mean_se(sh_m)} | "
                 f"{_p(tests['margin_shift'])} |")
    if comp.mode != "free-running":
        lines += ["", "Output lengths, stop reasons, repetition and JSON validity need a free-running candidate "
                  "(this one was teacher-forced)."]
    else:
        lines += ["", "Tests: paired permutation over prompts (the two outputs of a prompt swapped; exact up to "
                  "12 prompts), Mann–Whitney on the two length samples, exact McNemar for JSON validity. Each "
                  "figure can gate as a policy metric (docs/report.md), per category with `[category]`.", ""]
        lines += ["| category | prompts | length ratio (total / mean / p95) | length test | stop-reason TV | "
                  "repetition shift | valid JSON ref / cand |", "|---|---|---|---|---|---|---|"]
        for cat, d in dr["by_category"].items():
            lr = d["length_ratio"]
            tv = d["tests"]["stop_reason"]
            rr, rc = Rate(**d["repetition_ref"]), Rate(**d["repetition_cand"])
            rep = f"{100 * (rc.rate - rr.rate):+.2f} pts" if rr.n and rc.n else "—"
            js = ("—" if d["json_valid_ref"] is None else
                  f"{Rate(**d['json_valid_ref']).k}/{Rate(**d['json_valid_ref']).n} / "
                  f"{Rate(**d['json_valid_cand']).k}/{Rate(**d['json_valid_cand']).n}")
            tv_s = "—" if tv is None else f"{tv['statistic']:.3f} ({_p(tv)})"
            lines.append(f"| {_cell(cat, 40)} | {d['units']} | {_ratio(lr['total'])} / {_ratio(lr['mean'])} / "
                         f"{_ratio(lr['p95'])} | {_p(d['tests']['length'])} | {tv_s} | {rep} | {js} |")
    return lines


def _worst_section(comp: "Comparison", n: int) -> list[str]:
    idx = comp.worst_prompts(n)
    if not idx:
        return ["No divergence and zero KL on every prompt."]
    lines = []
    for rank, i in enumerate(idx, 1):
        p = comp.prompts[i]
        kl = comp.tokens.kl_ref_cand[comp.token_prompt == i]
        kl_s = _mean_se(describe(kl))
        d = p.first_divergence
        if d is None:
            lines += [f"### {rank}. `{_cell(p.id, 60)}` ({_cell(p.category, 30)}) — no divergence, mean KL {kl_s} nats", ""]
            continue
        what = {"real": "**real divergence**", "near-tie": "near-tie", "length": "one run stopped",
                "sampled": "a different draw (sampled)"}[p.split]
        lines += [f"### {rank}. `{_cell(p.id, 60)}` ({_cell(p.category, 30)}) — split at token {d}: {what}", ""]
        if p.split in ("real", "near-tie", "sampled"):
            lines += [f"Top-1 margin at the split: reference {_fix(p.margin_ref_at_split)} logits, candidate "
                      f"{_fix(p.margin_cand_at_split)} logits; mean KL over its {p.n_compared} compared positions {kl_s} nats.", ""]
        prefix = _tokens_text(comp, p.ref_tokens[:d])
        ra = _tokens_text(comp, p.ref_tokens[d:d + SHOW_TOKENS]) + ("…" if len(p.ref_tokens) > d + SHOW_TOKENS else "")
        ca = _tokens_text(comp, p.cand_tokens[d:d + SHOW_TOKENS]) + ("…" if len(p.cand_tokens) > d + SHOW_TOKENS else "")
        keep = prefix if len(prefix) <= 80 else "…" + prefix[-79:]
        cand_label = "candidate" if comp.mode == "free-running" else "candidate (its top-1 at the split)"
        lines += ["| | generated text (⟦ marks the split) |", "|---|---|",
                  f"| reference | {_cell(keep, 200)}⟦{_cell(ra, 200)} |",
                  f"| {cand_label} | {_cell(keep, 200)}⟦{_cell(ca, 200)} |", ""]
        if p.split_top_ref:
            lines += ["| rank | reference token | p | candidate token | p |", "|---|---|---|---|---|"]
            for j in range(max(len(p.split_top_ref), len(p.split_top_cand))):
                a = p.split_top_ref[j] if j < len(p.split_top_ref) else None
                b = p.split_top_cand[j] if j < len(p.split_top_cand) else None
                fa = (_token_label(comp, a[0]), f"{a[1]:.4f}") if a else ("", "")
                fb = (_token_label(comp, b[0]), f"{b[1]:.4f}") if b else ("", "")
                lines.append(f"| {j + 1} | {fa[0]} | {fa[1]} | {fb[0]} | {fb[1]} |")
            lines.append("")
    return lines


def _prompts_section(comp: "Comparison") -> list[str]:
    lines = ["| prompt | category | first divergence | split | compared | mean KL (nats) | max KL | same top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(comp.prompts):
        mask = comp.token_prompt == i
        kl = describe(comp.tokens.kl_ref_cand[mask])
        st = comp.same_top1(mask)
        lines.append(f"| `{_cell(p.id, 50)}` | {_cell(p.category, 30)} | "
                     f"{'—' if p.first_divergence is None else p.first_divergence} | {p.split or ''} | "
                     f"{p.n_compared} | {_sci(kl.mean)} | {_sci(kl.max)} | "
                     f"{_share(st.to_dict(), 1)} |")
    return lines


def render_markdown(comp: "Comparison", *, top_worst: int = 5, images: dict[str, str] | None = None) -> str:
    """The report as markdown (see the module docstring for its order)."""
    images = images or {}
    L: list[str] = ["# logitparity: candidate vs reference", ""]
    if getattr(comp, "incomplete", None):
        L += ["**INCOMPLETE INPUT (compared with --allow-partial): the verdict covers only what both runs hold.**", ""]
        L += [f"- {why}" for why in comp.incomplete] + [""]
    L += _verdict_section(comp) + [""]
    L += ["## Key figures", ""] + _key_figures(comp) + [""]
    if comp.notes:
        L += ["Notes:", ""] + [f"- {n}" for n in comp.notes] + [""]
    L += ["## Speed", ""] + _speed_section(comp) + [""]
    L += ["## The two runs", ""] + _runs_section(comp) + [""]
    if comp.only_ref or comp.only_cand:
        L += ["Prompts on one side only (not compared): "
              + (f"reference {', '.join(f'`{i}`' for i in comp.only_ref)}" if comp.only_ref else "")
              + ("; " if comp.only_ref and comp.only_cand else "")
              + (f"candidate {', '.join(f'`{i}`' for i in comp.only_cand)}" if comp.only_cand else ""), ""]
    L += ["## Free-running agreement", ""] + _free_running_section(comp, images) + [""]
    L += ["## Per-token distributions", "",
          f"Over every position where both runs saw the same prefix ({len(comp.tokens)} positions).", ""]
    L += _token_section(comp, images) + [""]
    L += ["## By category", ""] + _category_section(comp) + [""]
    L += ["## Behaviour drift", ""] + _drift_section(comp) + [""]
    if top_worst > 0:
        L += [f"## Worst prompts (up to {top_worst})", ""] + _worst_section(comp, top_worst) + [""]
    L += ["## Every prompt", ""] + _prompts_section(comp) + [""]
    L += ["Definitions of every figure: docs/report.md in the logitparity repository. ↑ higher is better, "
          "↓ lower is better; ± is one standard error.", ""]
    return "\n".join(L)


# --------------------------------------------------------------------------
# sampled runs (logitparity.sampling.SampledComparison)

_PATHS = (("reference", "the reference's sampled path (candidate scored on its draws)"),
          ("candidate", "the candidate's sampled path (reference scored on its draws)"))


def _sampled_paths(sc: Any) -> dict[str, Any]:
    out = {}
    for path, _ in _PATHS:
        m = sc.path_mask(path)
        if not m.any():
            out[path] = None
            continue
        out[path] = {
            "positions": int(m.sum()),
            "scored_whole_path": sc.paths[path],
            "sampled": {f: describe(sc.token_values(f, m)).to_dict() for f in ("kl_ref_cand", "kl_cand_ref", "js")},
            "raw": {f: describe(sc.token_values(f, m, raw=True)).to_dict() for f in ("kl_ref_cand", "kl_cand_ref")},
            "same_top1": rate(int(sc.tokens.same_top1[m].sum()), int(m.sum())).to_dict(),
            "impossible_draws": sc.impossible_draws(path).to_dict(),
        }
    return out


def sampled_dict(sc: Any) -> dict[str, Any]:
    """Every number of a sampled comparison as JSON types."""
    dr = sc.drift
    d = {
        "format": "logitparity-sampled-comparison",  # "logitparity.sampled-comparison", version 1, before
        "version": "1.0",
        "verdict": sc.verdict.to_dict(),
        "incomplete": list(sc.incomplete),
        "match_label": sc.match_label,
        "reference": describe_run(sc.ref_manifest, sc.ref_path),
        "candidate": describe_run(sc.cand_manifest, sc.cand_path),
        "temperature": sc.temperature,
        "top_p": sc.top_p,
        "seeds": sc.seeds,
        "pairs": len(sc.units),
        "positions": len(sc.token_path),
        "notes": sc.notes,
        "sampled_match": {str(n): sc.sampled_match(n).to_dict() for n in sc.n_values},
        "sampled_exact_match": sc.sampled_match(None).to_dict(),
        "paths": _sampled_paths(sc),
        "drift": dr.to_dict(),
        "by_category": {cat: dr.to_dict(cat) for cat in dr.categories()},
        "metrics": {t.metric: sc.metric(t.metric)[0] for t in sc.policy.thresholds},
    }
    return jsonable(d)


def render_sampled_markdown(sc: Any) -> str:
    """The report of a sampled comparison: verdict, the sampled-from
    distributions along each path, the distribution-level tests, by category."""
    v = sc.verdict
    mark = "✅ PASS" if v.passed else "❌ FAIL"
    L = ["# logitparity: sampled candidate vs sampled reference", ""]
    if sc.incomplete:
        L += ["**INCOMPLETE INPUT (compared with --allow-partial): the verdict covers only what both runs hold.**", ""]
        L += [f"- {why}" for why in sc.incomplete] + [""]
    L += [f"**Verdict: {mark}** under policy `{v.policy}`" + (f" — {v.description}" if v.description else ""), ""]
    L += ["| threshold | metric | measured | limit | result |", "|---|---|---|---|---|"]
    for r in v.results:
        meas = "not measured" if _isnan(r.measured) else f"{r.measured:.6g}"
        L.append(f"| {_cell(r.name)} | `{r.metric}` | {meas} | {r.comparison} {r.limit:.6g} | "
                 f"{'✅ pass' if r.passed else '❌ fail'}{(' — ' + _cell(r.note, 300)) if r.note else ''} |")
    top_p = "off" if sc.top_p in (None, 1, 1.0) else f"{sc.top_p:g}"
    L += ["", f"Sampled at temperature {sc.temperature:g}, top-p {top_p}, seeds {', '.join(map(str, sc.seeds))}: "
          f"{len(sc.units)} (prompt, seed) pairs, {len(sc.token_path)} compared positions. Both sides draw with "
          "the same seeded u's, so identical distributions give identical draws.", ""]
    if sc.notes:
        L += ["Notes:", ""] + [f"- {n}" for n in sc.notes] + [""]
    L += ["## The two runs", ""] + _runs_section(sc) + [""]
    L += ["## Sampled agreement", "", "| N | sampled match at N ↑ |", "|---|---|"]
    for n in sc.n_values:
        L.append(f"| {n} | {_pct(sc.sampled_match(n))} |")
    L += [f"| whole output | {_pct(sc.sampled_match(None))} |", ""]
    L += ["## The sampled-from distributions", "",
          "Per position, softmax(logits / T) restricted to the top-p nucleus and renormalized, on both sides "
          "(docs/report.md); raw-logit KL beside it.", "",
          "| path | positions | KL(ref ‖ cand) ↓ | KL(cand ‖ ref) ↓ | JS ↓ | raw KL(ref ‖ cand) ↓ | same top-1 ↑ | "
          "impossible draws ↓ |", "|---|---|---|---|---|---|---|---|"]
    for path, label in _PATHS:
        m = sc.path_mask(path)
        if not m.any():
            L.append(f"| {label} | 0 | — | — | — | — | — | not scored |")
            continue
        f = lambda name, raw=False: _mean_se(describe(sc.token_values(name, m, raw=raw)))
        st = rate(int(sc.tokens.same_top1[m].sum()), int(m.sum()))
        whole = "" if sc.paths[path] else " (before the first differing draw)"
        L.append(f"| {label}{whole} | {int(m.sum())} | {f('kl_ref_cand')} | {f('kl_cand_ref')} | {f('js')} | "
                 f"{f('kl_ref_cand', True)} | {_pct(st)} | {_pct(sc.impossible_draws(path))} |")
    dr = sc.drift
    t = dr.tests()
    r_len, c_len = dr.lengths()
    L += ["", "## Output distributions over seeds", "",
          "| figure | reference | candidate | shift | two-sample test |", "|---|---|---|---|---|"]
    dl, dc = describe(r_len), describe(c_len)
    L.append(f"| output length (mean ± se) | {dl.mean:.2f} ± {_fix(dl.se, 2)} | {dc.mean:.2f} ± {_fix(dc.se, 2)} | "
             f"ratio {_ratio(dr.length_ratio('total'))} | paired {_p(_td(t['length']))}; Mann–Whitney "
             f"{_p(_td(t['length_mw']))} |")
    first = True
    for reason, c in dr.stop_reasons().items():
        tv = t["stop_reason"]
        L.append(f"| stop reason `{reason}` | {c['reference']} | {c['candidate']} | {c['candidate'] - c['reference']:+d} | "
                 + (f"TV {tv.statistic:.3f}, p = {tv.p_value:.3g}" if first and tv else "") + " |")
        first = False
    tf = t["token_frequency"]
    if tf is not None:
        L.append(f"| token-frequency divergence (JS, nats) | | | {_sci(tf.statistic)} | p = {tf.p_value:.3g} |")
    rr, rc = dr.repetition()
    L.append(f"| repeated {REPETITION_N}-grams | {_pct(rr)} | {_pct(rc)} | | {_p(_td(t['repetition']))} |")
    jv = dr.json_validity()
    if jv is not None:
        L.append(f"| valid JSON (category `json`) | {_pct(jv[0])} | {_pct(jv[1])} | | McNemar {_p(_td(t['json_valid']))} |")
    L += ["", "Paired permutation tests swap the two outputs of a (prompt, seed) pair (exact up to 12 pairs).", ""]
    L += ["## By category", "", "| category | pairs | length ratio | length test | stop-reason TV | token-frequency JS |",
          "|---|---|---|---|---|---|"]
    for cat in dr.categories():
        tt = dr.tests(cat)
        tv, tk = tt["stop_reason"], tt["token_frequency"]
        L.append(f"| {_cell(cat, 40)} | {len(dr._idx(cat))} | {_ratio(dr.length_ratio('total', cat))} | "
                 f"{_p(_td(tt['length']))} | {'—' if tv is None else f'{tv.statistic:.3f} (p = {tv.p_value:.3g})'} | "
                 f"{'—' if tk is None else f'{_sci(tk.statistic)} (p = {tk.p_value:.3g})'} |")
    L += ["", "Definitions of every figure: docs/report.md. ↑ higher is better, ↓ lower is better; ± is one standard "
          "error. Labels say sampled: these runs were drawn, not decoded greedily.", ""]
    return "\n".join(L)


def _td(t: Any) -> dict[str, Any] | None:
    return None if t is None else t.to_dict()
