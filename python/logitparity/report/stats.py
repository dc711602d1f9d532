"""Renderers for ``logitparity.diagnostics``: the stats report (markdown),
JSON with every number, the per-layer kurtosis and max |x| plot (PNG), and
the ablation ranking. Nothing here computes a figure; everything comes from
``ModelStats`` and ``Ablation``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from logitparity.report._format import general

if TYPE_CHECKING:
    from logitparity.diagnostics import Ablation, ModelStats

__all__ = ["ablation_markdown", "stats_markdown", "write_stats_json", "write_stats_plot"]

# The sites shown per layer in the layer table and the plot: (label, site key suffix).
LAYER_SITES = (("attention input", ".self_attn:input"), ("MLP input", ".mlp:input"),
               ("down_proj input", ".mlp.down_proj:input"), ("layer output (residual)", ""))


def _g(x: Any, digits: int = 4) -> str:
    return general(x, digits)


def _cell(text: Any, width: int = 40) -> str:
    s = "" if text is None else str(text)
    s = s.replace("\n", "⏎").replace("|", "\\|").replace("`", "'")
    return s if len(s) <= width else s[: width - 1] + "…"


def _mean_se(d: Any) -> str:
    return "—" if d.n == 0 else f"{d.mean:.4g} ± {d.se:.2g}"


def _outlier_table(outliers: list) -> list[str]:
    L = ["", "| # | site | layer | channel | max \\|x\\| | score ↓ | max/σ | peak: token (prompt, position) | "
         "positions over the cut | tokens most often over it | categories over the cut |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, o in enumerate(outliers, 1):
        where = f"`{_cell(o.token, 16)}` in “{_cell(o.context, 40)}” ({_cell(o.prompt_id, 30)}, {o.position})"
        toks = ", ".join(f"`{_cell(t, 12)}` ×{n}" for t, n in o.top_tokens)
        L.append(f"| {i} | `{o.key}` | {o.layer} | {o.channel} | {_g(o.max_abs)} | {o.score:.1f} | "
                 f"{_g(o.sigma_score, 3)} | {where} | {o.positions_over} ({100 * o.fraction_over:.1f}%) | {toks} | "
                 f"{', '.join(o.categories)} |")
    return L


def stats_markdown(s: "ModelStats", *, max_outliers: int = 20) -> str:
    """The stats report: header and warnings, outlier channels, heavy tails,
    the per-layer table, attention-score range, logits, per category, weights."""
    from logitparity.diagnostics import HEAVY_TAIL_EXCESS_KURTOSIS, SYSTEMATIC_FRACTION

    cats = sorted({p["category"] for p in s.prompts})
    L = ["# logitparity stats: weight and activation distributions", ""]
    L.append(f"- model `{_cell(s.model, 80)}` ({s.dtype}); {len(s.prompts)} prompts ({', '.join(cats)}), "
             f"{s.positions} positions (prefill, one prompt at a time); {s.seconds:.1f} s")
    L.append(f"- outlier channel: max |x| > {s.outlier_factor:g} × the median channel's max |x| in its tensor "
             f"(score = that ratio); heavy tail: excess kurtosis (Pearson − 3) > {HEAVY_TAIL_EXCESS_KURTOSIS:g}")
    L.append("- |x| quantiles: exact for weights; activations from a histogram, relative error ≤ 2⁻⁸")
    for w in s.warnings:
        L.append(f"- **Warning:** {w}")
    L.append("")
    L += ["## Outlier channels (activations)", ""]
    if not s.outliers:
        L.append(f"None: no channel exceeds {s.outlier_factor:g}× its tensor's median channel max.")
    else:
        L.append(f"{len(s.outliers)} outlier channels; the top {min(max_outliers, len(s.outliers))}:")
        L += _outlier_table(s.outliers[:max_outliers])
        sysl = s.systematic_outliers
        L += ["", f"Systematic outliers (over the cut at ≥ {100 * SYSTEMATIC_FRACTION:g}% of the positions: a channel "
              f"outlier of every token, what per-channel scales address): {len(sysl)}"
              + (f"; the top {min(max_outliers, len(sysl))}:" if sysl else ".")]
        if sysl:
            L += _outlier_table(sysl[:max_outliers])
    L.append("")
    heavy = s.heavy_tailed
    L += ["## Heavy-tailed tensors", ""]
    if not heavy:
        L.append("None.")
    else:
        L.append(f"{len(heavy)} tensors: " + ", ".join(f"`{t.key}` ({t.excess_kurtosis:.3g})" for t in heavy[:30])
                 + (" …" if len(heavy) > 30 else ""))
    L.append("")
    L += ["## Per layer", "",
          "Excess kurtosis and max |x| of the main activation sites; attention-score range over the heads "
          "(pre-softmax q·k·scaling, causal mask applied).", ""]
    head = "| layer |" + "".join(f" {lab} kurt−3 | {lab} max \\|x\\| |" for lab, _ in LAYER_SITES)
    head += " score min | score max |"
    L += [head, "|" + "---|" * (1 + 2 * len(LAYER_SITES) + 2)]
    by_key = {t.key: t for t in s.activations}
    att = {a["layer"]: a for a in s.attention}
    layers = sorted({t.layer for t in s.activations if t.layer is not None})
    for li in layers:
        row = f"| {li} |"
        for _, suffix in LAYER_SITES:
            t = by_key.get(f"model.layers.{li}{suffix}")
            row += " — | — |" if t is None else f" {_g(t.excess_kurtosis, 3)} | {_g(t.max_abs, 4)} |"
        a = att.get(li)
        row += " — | — |" if a is None else f" {_g(a['range'][0], 4)} | {_g(a['range'][1], 4)} |"
        L.append(row)
    L.append("")
    L += ["## Logits", "", "| figure | mean ± se | median | p99 | max |", "|---|---|---|---|---|"]
    for name, unit in (("norm", "L2 of the logit vector"), ("entropy", "nats")):
        d = s.logits[name]
        L.append(f"| {name} ({unit}) | {_mean_se(d)} | {_g(d.median)} | {_g(d.p99)} | {_g(d.max)} |")
    L.append("")
    L += ["## By category", ""]
    tops = list(s.categories[0]["top_outliers_max_abs"]) if s.categories else []
    head = "| category | prompts | positions | logit entropy ± se (nats) | logit norm ± se |"
    head += "".join(f" `{_cell(k, 40)}` max \\|x\\| |" for k in tops)
    L += [head, "|" + "---|" * (5 + len(tops))]
    for c in s.categories:
        e, n = c["entropy"], c["logit_norm"]
        row = (f"| {_cell(c['category'])} | {c['prompts']} | {c['positions']} | {e['mean']:.4g} ± {e['se']:.2g} | "
               f"{n['mean']:.4g} ± {n['se']:.2g} |")
        row += "".join(f" {_g(c['top_outliers_max_abs'].get(k))} |" for k in tops)
        L.append(row)
    if s.missing_categories:
        L += ["", f"Absent from the prompts: {', '.join(s.missing_categories)} (the default set has them)."]
    L.append("")
    if s.weights:
        L += ["## Weights", ""]
        if s.weight_outliers:
            L += [f"{len(s.weight_outliers)} outlier output channels; the top {min(10, len(s.weight_outliers))}:", "",
                  "| weight | channel | max \\|w\\| | score ↓ | max/σ |", "|---|---|---|---|---|"]
            for o in s.weight_outliers[:10]:
                L.append(f"| `{o.key}` | {o.channel} | {_g(o.max_abs)} | {o.score:.1f} | {_g(o.sigma_score, 3)} |")
        else:
            L.append("No outlier output channel.")
        worst = sorted(s.weights, key=lambda t: -(t.kurtosis if t.kurtosis == t.kurtosis else -math.inf))[:10]
        L += ["", "Largest excess kurtosis:", "", "| weight | shape | mean | std | kurt−3 | max \\|w\\| | "
              "\\|w\\| p99.99 | zeros |", "|---|---|---|---|---|---|---|---|"]
        for t in worst:
            L.append(f"| `{t.key}` | {'×'.join(map(str, t.shape))} | {_g(t.mean, 3)} | {_g(t.std, 3)} | "
                     f"{_g(t.excess_kurtosis, 3)} | {_g(t.max_abs)} | {_g(t.abs_p9999)} | "
                     f"{100 * t.zero_fraction:.2f}% |")
        L.append("")
    L.append("Every tensor's figures (moments, quantiles, fractions, per-channel max, position norms) are in the JSON.")
    return "\n".join(L) + "\n"


def ablation_markdown(a: "Ablation") -> str:
    """The ablation ranking, most damaging first."""
    L = [f"## Ablation: outlier channels ranked by damage ({a.mode})", "",
         f"Each channel {'set to 0' if a.mode == 'zero' else 'clamped to ± its cut'} in every pass, alone; "
         f"KL(untouched ‖ ablated) over {a.positions} positions of {a.prompts} prompts, ΔPPL on the prompts' own "
         f"next tokens (± delta-method se); {a.seconds:.1f} s.", "",
         "| rank | site | layer | channel | outlier score | mean KL ± se (nats) ↓ | p99 KL | same top-1 ↑ | "
         "PPL → ablated | ΔPPL ± se |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(a.rows, 1):
        L.append(f"| {i} | `{r.key}` | {r.layer} | {r.channel} | {r.outlier_score:.1f} | "
                 f"{_mean_se(r.kl)} | {_g(r.kl.p99, 3)} | {100 * r.same_top1:.1f}% | "
                 f"{_g(r.ppl, 5)} → {_g(r.ppl_ablated, 5)} | {_g(r.delta_ppl, 4)} ± {_g(r.delta_ppl_se, 2)} |")
    if not a.rows:
        L.append("| — | no outlier channel to ablate | | | | | | | | |")
    return "\n".join(L) + "\n"


def shift_markdown(shifts: list, ref: str, factor: float, *, max_rows: int = 20) -> str:
    """The channels whose max |x| grew more than ``factor``x against the reference (outlier_shift)."""
    L = [f"## Channels that grew against the reference (> {factor:g}× its max |x|)", "",
         f"Reference `{_cell(ref, 80)}`, the same prompts and tokens; in forward order (the first row is "
         "where the change enters, later sites carry its consequences), the highest ratio first within a site. "
         "A channel the reference already has as an outlier cancels here.", "",
         "| rank | site | layer | channel | reference max \\|x\\| | candidate max \\|x\\| | ratio |",
         "|---|---|---|---|---|---|---|"]
    for i, x in enumerate(shifts[:max_rows], 1):
        L.append(f"| {i} | `{x.key}` | {x.layer} | {x.channel} | {_g(x.ref_max_abs)} | {_g(x.cand_max_abs)} | "
                 f"{_g(x.ratio, 3)} |")
    if not shifts:
        L.append("| — | no channel grew past the factor | | | | | |")
    elif len(shifts) > max_rows:
        L.append(f"\n{len(shifts) - max_rows} more in the JSON.")
    return "\n".join(L) + "\n"


def write_stats_json(s: "ModelStats", path: str | os.PathLike, ablation: "Ablation | None" = None,
                     shifts: "list | None" = None) -> Path:
    """Every number of ``s`` (and the ablation ranking and the channel shifts
    against a reference when given) as JSON."""
    from logitparity._fileio import write_text_atomic

    from logitparity.report import jsonable  # NaN -> null, ±inf -> "inf"/"-inf"

    d = s.to_dict()
    if ablation is not None:
        d["ablation"] = ablation.to_dict()
    if shifts is not None:
        d["shifts"] = [x.to_dict() for x in shifts]
    d = jsonable(d)
    p = Path(path)
    write_text_atomic(p, json.dumps(d, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return p


def write_stats_plot(s: "ModelStats", path: str | os.PathLike) -> Path:
    """Two panels over decoder layers: excess kurtosis (symlog axis) and max
    |x| (log axis) of the main activation sites, outlier layers marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.6))
    ax_k, ax_m = fig.subplots(2, 1, sharex=True)
    by_key = {t.key: t for t in s.activations}
    layers = sorted({t.layer for t in s.activations if t.layer is not None})
    lowest = 0.0
    for (label, suffix), color in zip(LAYER_SITES, ("#2980b9", "#27ae60", "#c0392b", "#7f8c8d")):
        ts = [by_key.get(f"model.layers.{i}{suffix}") for i in layers]
        xs = [i for i, t in zip(layers, ts) if t is not None]
        ts = [t for t in ts if t is not None]
        if not ts:
            continue
        ks = [t.excess_kurtosis for t in ts]
        lowest = min([lowest] + [k for k in ks if k == k])
        ax_k.plot(xs, ks, marker="o", ms=3, lw=1.4, color=color, label=label)
        ax_m.plot(xs, [max(t.max_abs, 1e-12) for t in ts], marker="o", ms=3, lw=1.4, color=color, label=label)
    from logitparity.diagnostics import HEAVY_TAIL_EXCESS_KURTOSIS

    ax_k.axhline(HEAVY_TAIL_EXCESS_KURTOSIS, color="#f39c12", ls="--", lw=1, label="heavy-tail cut")
    ax_k.set_yscale("symlog", linthresh=1.0)
    ax_k.set_ylim(bottom=min(-1.0, 2 * lowest))  # excess kurtosis >= -2: no empty negative decades
    ax_k.set_ylabel("excess kurtosis")
    ax_m.set_yscale("log")
    ax_m.set_ylabel("max |x|")
    ax_m.set_xlabel("decoder layer")
    if s.outliers:
        o = s.outliers[0]
        if o.layer is not None:
            ax_m.annotate(f"top outlier: {o.key.split('.', 2)[-1]} ch {o.channel}", xy=(o.layer, o.max_abs),
                          xytext=(6, 4), textcoords="offset points", fontsize=8, color="#8e44ad")
            ax_m.scatter([o.layer], [o.max_abs], marker="*", s=60, color="#8e44ad", zorder=4)
    ax_k.legend(fontsize=7, loc="upper left")
    ax_k.set_title(f"{_cell(s.model, 50)} ({s.dtype}), {len(s.prompts)} prompts, {s.positions} positions", fontsize=9)
    p = Path(path)
    tmp = p.with_name(f".{p.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, p)
    return p
