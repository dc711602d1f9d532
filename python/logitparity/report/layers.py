"""Renderers for a LayerComparison: the layer table (markdown), JSON with
every number, and the per-layer error plot (PNG). Nothing here computes a
figure; everything comes from ``logitparity.layers``.

The plot puts the propagated and the isolated relative L2 of each decoder
layer's output (and, as markers, of its attention and MLP) on one log axis,
shades the noise band, and marks the first divergent module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from logitparity.report._format import general

if TYPE_CHECKING:
    from logitparity.layers import LayerComparison

__all__ = ["layers_markdown", "write_layers_json", "write_layers_plot"]

# Plotted values at exactly zero (bitwise-equal outputs) sit on this floor of
# the log axis, labelled as such.
_ZERO_FLOOR = 1e-12


def _g(x: Any, digits: int = 3) -> str:
    return general(x, digits)


def layers_markdown(c: "LayerComparison", *, only_out_of_band: bool = False, max_rows: int | None = None) -> str:
    """The layer table: a header block (runs, prompts, band, verdict), then
    one row per module in execution order. ↓ marks lower-is-better columns."""
    lines = ["# logitparity layers: candidate vs reference, module by module", ""]
    lines.append(f"- reference {c.ref_dtype}, candidate {c.cand_dtype}; mode {c.mode} (judged by {c.judged_by})")
    lines.append(f"- {len(c.prompts)} prompts, {c.positions} positions (prefill); band: {c.band_source}")
    if c.first_divergent is None:
        lines.append(f"- **first divergent module: none** — every module's {c.judged_by} error is inside the band")
    else:
        ev = c.evidence or {}
        lines.append(f"- **first divergent module: `{c.first_divergent}`** (layer {ev.get('layer')}, "
                     f"{ev.get('kind')}): {ev.get('why')}")
    lines.append("")
    cols = []
    for mode in ("isolated", "propagated"):
        if any(m.error(mode) is not None for m in c.modules):
            cols.append(mode)
    head = "| module |"
    sep = "|---|"
    for mode in cols:
        head += f" {mode} rel L2 ↓ | {mode} max/pos ↓ | {mode} cosine ↑ | {mode} SQNR dB ↑ | {mode} max abs ↓ |"
        sep += "---|---|---|---|---|"
    head += " non-finite ref/cand | band rel L2 | out of band |"
    sep += "---|---|---|"
    lines += [head, sep]
    rows = 0
    for m in c.modules:
        oob = m.out_of_band(c.judged_by)
        if only_out_of_band and not oob:
            continue
        mark = "**yes**" if oob else "no"
        name = f"**`{m.path}`**" if m.path == c.first_divergent else f"`{m.path}`"
        row = f"| {name} |"
        nf = "—"
        for mode in cols:
            e = m.error(mode)
            if e is None:
                row += " — | — | — | — | — |"
                continue
            row += (f" {_g(e.rel_l2)} | {_g(e.rel_l2_max)} | {e.cosine:.6f} | {_g(e.sqnr_db, 4)} | "
                    f"{_g(e.max_abs)} |")
            if mode == c.judged_by:
                nf = f"{e.nonfinite_ref}/{e.nonfinite_cand}"
        row += f" {nf} | {_g(m.band.rel_l2)} | {mark} |"
        lines.append(row)
        rows += 1
        if max_rows is not None and rows >= max_rows:
            lines.append(f"| … {len(c.modules) - rows} more modules (JSON has all) | |")
            break
    return "\n".join(lines) + "\n"


def write_layers_json(c: "LayerComparison", path: str | os.PathLike) -> Path:
    """Every number of the comparison as JSON (``LayerComparison.to_dict``)."""
    from logitparity._fileio import write_text_atomic

    p = Path(path)
    write_text_atomic(p, json.dumps(c.to_dict(), indent=1) + "\n")
    return p


def write_layers_plot(c: "LayerComparison", path: str | os.PathLike) -> Path:
    """Per-layer relative L2 (log axis): propagated and isolated error of
    each decoder layer's output as lines, attention and MLP isolated error as
    markers, the noise band shaded, the first divergent module marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 3.8))
    ax = fig.subplots()
    layer_rows = [m for m in c.modules if m.kind == "layer"]
    xs = [m.layer for m in layer_rows]

    def series(mods, mode):
        return [max(m.error(mode).rel_l2, _ZERO_FLOOR) if m.error(mode) is not None else float("nan") for m in mods]

    for mode, style in (("propagated", dict(color="#7f8c8d", lw=1.6, marker="o", ms=3)),
                        ("isolated", dict(color="#c0392b", lw=1.6, marker="s", ms=3))):
        if any(m.error(mode) is not None for m in layer_rows):
            ax.plot(xs, series(layer_rows, mode), label=f"layer output, {mode}", **style)
    for kind, marker, color in (("self_attn", "^", "#2980b9"), ("mlp", "v", "#27ae60")):
        mods = [m for m in c.modules if m.kind == kind and m.error(c.judged_by) is not None]
        if mods:
            ax.scatter([m.layer for m in mods], series(mods, c.judged_by), marker=marker, s=18, color=color,
                       label=f"{kind}, {c.judged_by}", zorder=3)
    if layer_rows:
        band = [m.band.rel_l2 for m in layer_rows]
        ax.fill_between(xs, [_ZERO_FLOOR] * len(xs), band, color="#f1c40f", alpha=0.25, step="mid",
                        label=f"noise band ({c.band_source[:40]})")
    if c.first_divergent is not None:
        m = c.module(c.first_divergent)
        e = m.error(c.judged_by)
        ax.axvline(m.layer if m.layer is not None else 0, color="#8e44ad", ls="--", lw=1)
        ax.annotate(f"first divergent:\n{c.first_divergent}", xy=(m.layer or 0, max(e.rel_l2, _ZERO_FLOOR)),
                    xytext=(8, -4), textcoords="offset points", fontsize=8, color="#8e44ad")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative L2 error  ‖ĥ − h‖ / ‖h‖")
    ax.set_title(f"{c.cand_dtype} candidate vs {c.ref_dtype} reference ({len(c.prompts)} prompts; "
                 f"0 plotted at {_ZERO_FLOOR:g})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    p = Path(path)
    tmp = p.with_name(f".{p.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, p)
    return p
