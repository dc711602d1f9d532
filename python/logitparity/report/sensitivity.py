"""Renderers for a SensitivityMap: the ranked table and the `. * #` strip
(markdown), JSON with every number, and the heat map (PNG, layers × module
types). Nothing here computes a figure; everything comes from
``logitparity.sensitivity``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from logitparity.report._format import general

if TYPE_CHECKING:
    from logitparity.sensitivity import Figures, SensitivityMap

__all__ = ["sensitivity_dict", "sensitivity_markdown", "write_sensitivity_json", "write_sensitivity_plot"]

FORMAT = "logitparity-sensitivity"
VERSION = "1.0"


def _g(x: Any, digits: int = 3) -> str:
    return general(x, digits)


def _pm(mean: float, se: float) -> str:
    return _g(mean, 4) if se is None or math.isnan(se) else f"{_g(mean, 4)} ± {_g(se, 2)}"


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def sensitivity_dict(m: "SensitivityMap") -> dict[str, Any]:
    rank = m.rank_of()
    cells = []
    for c in m.cells:
        d = c.to_dict()
        d["rank"] = rank[c.label]
        d["risk"] = c.risk(m.cutoffs)
        if m.saliency is not None:
            d["weight_grad"] = m.saliency.weight_grad[c.label]
            d["act_weight"] = m.saliency.act_weight[c.label]
        cells.append(d)
    doc = {"format": FORMAT, "version": VERSION, "transform": m.transform, "dtype": m.dtype,
           "kinds": m.kinds, "layers": m.layers, "by_module": m.by_module, "inputs": m.inputs,
           "reference_ppl": m.reference_ppl, "cutoffs": list(m.cutoffs), "strip": m.strip(),
           "cells": cells, "plan": None if m.plan is None else m.plan.to_dict(),
           "saliency": None if m.saliency is None else m.saliency.to_dict(), "timings": m.timings}
    return _json_safe(doc)


def _fig_row(f: "Figures") -> str:
    return (f"{_pm(f.kl.mean, f.kl.se)} | {_g(f.kl.p99)} | {100 * f.same_top1.rate:.2f}% ± "
            f"{100 * f.same_top1.se:.2f}% | {_pm(f.delta_ppl, f.delta_ppl_se)}")


def sensitivity_markdown(m: "SensitivityMap", *, max_rows: int | None = None) -> str:
    """Header (transform, inputs, cut-offs), the strip, the ranked table
    (most fragile first), the plan (predicted vs measured) and the saliency
    agreement."""
    inp = m.inputs
    lines = [f"# logitparity sensitivity: {m.transform}, one {'module type of one layer' if m.by_module else 'layer'} "
             "at a time", ""]
    if inp.get("source") == "text":
        where = f"text {inp['name']}: {inp['tokens']} tokens in {inp['windows']} windows of ctx {inp['ctx']}"
    else:
        where = f"prompts {inp['name']}: {inp.get('sequences')} prompts, {inp['tokens']} positions"
    lines.append(f"- teacher-forced on {where}; reference ({m.dtype}) PPL {_g(m.reference_ppl, 5)}")
    lines.append(f"- modules transformed per cell: {', '.join(m.kinds) if not m.by_module else 'one of ' + ', '.join(m.kinds)}")
    lo, hi = m.cutoffs
    lines.append(f"- risk by mean KL(ref ‖ cand): L `.` < {lo:g} ≤ M `*` < {hi:g} ≤ H `#` (nats)")
    lines.append(f"- ΔPPL ± se: paired over tokens (delta method, tokens treated as independent)")
    lines.append(f"- time: {m.timings['total_s']:.1f} s (reference pass {m.timings['reference_s']:.1f} s, "
                 f"{len(m.cells)} cells {m.timings['cells_s']:.1f} s)")
    lines.append("")
    lines.append(f"Strip, layers {m.layers_label}:")
    lines.append("")
    lines.append("```")
    lines.append(_ruler(m.layers))
    lines.append(m.strip())
    lines.append("```")
    lines.append("")
    sal = m.saliency
    head = "| rank | layer | module | risk | mean KL ± se ↓ | p99 KL ↓ | same top-1 ↑ | ΔPPL ± se |"
    sep = "|---|---|---|---|---|---|---|---|"
    if sal is not None:
        head += " \\|W⊙∇\\| (rank) | act·\\|W\\| (rank) |"
        sep += "---|---|"
        wg_rank = _rank_desc(sal.weight_grad)
        aw_rank = _rank_desc(sal.act_weight)
    lines += [head, sep]
    ranked = m.ranked()
    for n, c in enumerate(ranked):
        if max_rows is not None and n >= max_rows:
            lines.append(f"| … {len(ranked) - n} more cells (JSON has all) | | | | | | | |")
            break
        row = f"| {n + 1} | {c.layer} | {c.module} | {c.risk(m.cutoffs)} | {_fig_row(c.figures)} |"
        if sal is not None:
            row += (f" {_g(sal.weight_grad[c.label])} ({wg_rank[c.label]}) | {_g(sal.act_weight[c.label])} "
                    f"({aw_rank[c.label]}) |")
        lines.append(row)
    lines.append("")
    if sal is not None:
        lines.append("## Saliency (first order, on the reference) vs the measured map")
        lines.append("")
        lines.append(f"- Spearman rank correlation with the measured mean KL: weight × gradient "
                     f"{_g(sal.spearman_weight_grad)}, activation × weight {_g(sal.spearman_act_weight)} "
                     f"({len(m.cells)} cells)")
        lines.append(f"- autograd held {sal.saved_bytes_peak / 2**20:.1f} MiB of saved activations (peak, one "
                     f"sequence) and {sal.grad_bytes / 2**20:.1f} MiB of weight gradients; {sal.seconds:.1f} s; "
                     f"reference loss {sal.loss:.4f} nats/token")
        lines.append("")
    if m.plan is not None:
        p = m.plan
        lines.append("## Mixed-precision plan")
        lines.append("")
        lines.append(f"- budget: mean KL ≤ {p.budget:g} nats; predicted = Σ of the transformed cells' mean KLs "
                     "(assumes their effects add)")
        lines.append(f"- kept at reference precision ({len(p.kept)}): {', '.join(p.kept) or 'none'}")
        lines.append(f"- transformed ({len(p.transformed)}): {', '.join(p.transformed) or 'none'}")
        lines.append(f"- everything transformed, predicted: {_g(p.predicted_all_kl, 4)}")
        lines.append("")
        lines.append("| plan | mean KL ± se ↓ | p99 KL ↓ | same top-1 ↑ | ΔPPL ± se |")
        lines.append("|---|---|---|---|---|")
        lines.append(f"| predicted | {_g(p.predicted_kl, 4)} | | | |")
        if p.measured is not None:
            verdict = "within budget" if p.within_budget else "**over budget**"
            lines.append(f"| measured ({verdict}) | {_fig_row(p.measured)} |")
        else:
            lines.append("| measured | nothing transformed | | | |")
        lines.append("")
    return "\n".join(lines)


def _ruler(layers: list[int]) -> str:
    """A line with the layer number above every tenth mark."""
    out = [" "] * len(layers)
    for i, layer in enumerate(layers):
        if layer % 10 == 0:
            s = str(layer)
            for j, ch in enumerate(s):
                if i + j < len(out):
                    out[i + j] = ch
    return "".join(out).rstrip()


def _rank_desc(values: dict[str, float]) -> dict[str, int]:
    order = sorted(values, key=lambda k: -values[k])
    return {k: i + 1 for i, k in enumerate(order)}


def write_sensitivity_json(m: "SensitivityMap", path: str | os.PathLike) -> Path:
    from logitparity._fileio import write_text_atomic

    p = Path(path)
    write_text_atomic(p, json.dumps(sensitivity_dict(m), indent=1) + "\n")
    return p


def write_sensitivity_plot(m: "SensitivityMap", path: str | os.PathLike) -> Path:
    """Heat map of log10 mean KL: layers down, module types across (one
    'all' column when each cell transformed a whole layer), the risk mark in
    each cell; with saliency, a second panel with the per-layer ranks."""
    import numpy as np
    from matplotlib.figure import Figure

    from logitparity.sensitivity import RISK_MARKS, average_ranks, risk_of

    cols = m.kinds if m.by_module else ["all"]
    grid = np.full((len(m.layers), len(cols)), np.nan)
    row_of = {layer: i for i, layer in enumerate(m.layers)}
    for c in m.cells:
        j = cols.index(c.module) if m.by_module else 0
        grid[row_of[c.layer], j] = c.mean_kl
    with np.errstate(divide="ignore", invalid="ignore"):
        logk = np.log10(np.where(grid > 0, grid, np.nan))
    fig = Figure(figsize=(1.2 + 0.9 * len(cols) + (2.6 if m.saliency is not None else 0),
                          1.4 + 0.22 * len(m.layers)), layout="constrained")
    axes = fig.subplots(1, 2 if m.saliency is not None else 1, squeeze=False,
                        gridspec_kw={"width_ratios": [len(cols), 2.2]} if m.saliency is not None else None)[0]
    ax = axes[0]
    im = ax.imshow(logk, aspect="auto", cmap="magma_r", interpolation="nearest")
    ax.set_yticks(range(len(m.layers)), [str(x) for x in m.layers], fontsize=7)
    ax.set_xticks(range(len(cols)), [c.replace("self_attn.", "attn.") for c in cols], rotation=45, ha="right",
                  fontsize=7)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, RISK_MARKS[risk_of(float(grid[i, j]), m.cutoffs)], ha="center", va="center",
                        fontsize=7, color="#2ecc71")
    ax.set_ylabel("decoder layer")
    ax.set_title(f"{m.transform}: log10 mean KL (nats)", fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.02)
    cb.ax.tick_params(labelsize=7)
    if m.saliency is not None:
        ax2 = axes[1]
        lk = m.layer_kl()
        sal = m.saliency

        def per_layer(d: dict[str, float]) -> list[float]:
            acc: dict[int, float] = {}
            for c in m.cells:
                acc[c.layer] = acc.get(c.layer, 0.0) + d[c.label]
            return [acc[x] for x in m.layers]

        y = np.arange(len(m.layers))
        ax2.plot(average_ranks(-np.array([lk[x] for x in m.layers])) + 1, y, "o-", ms=3, lw=1, label="measured KL")
        ax2.plot(average_ranks(-np.array(per_layer(sal.weight_grad))) + 1, y, "s--", ms=3, lw=1,
                 label=f"|W⊙∇| (ρ {sal.spearman_weight_grad:.2f})")
        ax2.plot(average_ranks(-np.array(per_layer(sal.act_weight))) + 1, y, "^:", ms=3, lw=1,
                 label=f"act·|W| (ρ {sal.spearman_act_weight:.2f})")
        ax2.set_ylim(len(m.layers) - 0.5, -0.5)
        ax2.set_yticks([])
        ax2.set_xlabel("rank (1 = most fragile)", fontsize=8)
        ax2.legend(fontsize=6, loc="lower right")
        ax2.set_title("saliency vs measured", fontsize=9)
    p = Path(path)
    tmp = p.with_name(f".{p.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, p)
    return p
