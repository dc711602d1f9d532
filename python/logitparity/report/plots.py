"""PNG plots of a Comparison (matplotlib, Agg backend, no display needed).

- ``first_divergence.png``: prompts per first-divergence bin (the same bins as
  the report's text bars), near-tie and real splits stacked.
- ``kl_distribution.png``: histogram of per-token KL(ref ‖ cand) on a log
  axis, with its mean and p99 marked; exact zeros counted in the legend.
- ``kl_by_position.png``: mean KL(ref ‖ cand) ± one standard error at each
  generated-token position, with the number of compared prompts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from logitparity.stats import describe

if TYPE_CHECKING:
    from logitparity.compare import Comparison

__all__ = ["write_plots"]


def _figure():
    """A figure detached from pyplot: no backend switch (Jupyter keeps its
    inline plots) and nothing to close."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.6))
    return fig, fig.subplots()


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _bin_label(b: dict) -> str:
    if b["lo"] is None:
        return "none"
    return str(b["lo"]) if b["lo"] == b["hi"] else f"{b['lo']}–{b['hi']}"


def plot_first_divergence(comp: "Comparison", path: Path) -> None:
    hist = comp.divergence_histogram()
    labels = [_bin_label(b) for b in hist]
    kinds = {k: np.zeros(len(hist)) for k in ("real", "near-tie", "sampled", "length")}
    for p in comp.prompts:
        if p.first_divergence is None:
            continue
        for i, b in enumerate(hist[:-1]):
            if b["lo"] <= p.first_divergence <= b["hi"]:
                kinds[p.split or "real"][i] += 1
                break
    x = np.arange(len(hist))
    fig, ax = _figure()
    bottom = np.zeros(len(hist))
    colors = {"real": "#c0392b", "near-tie": "#f39c12", "sampled": "#2980b9", "length": "#8e44ad"}
    for k, v in kinds.items():
        if v.any():
            label = {"length": "one run stopped", "sampled": "different draw (sampled)"}.get(k, f"{k} divergence")
            ax.bar(x, v, bottom=bottom, color=colors[k], label=label)
            bottom += v
    ax.bar(x[-1:], [hist[-1]["count"]], color="#27ae60", label="no divergence")
    ax.set_xticks(x, labels)
    ax.set_xlabel("first divergence (generated-token position)")
    ax.set_ylabel("prompts")
    ax.set_title(f"First divergence, {len(comp.prompts)} prompts")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path)


def plot_kl_distribution(comp: "Comparison", path: Path) -> None:
    kl = comp.tokens.kl_ref_cand
    kl = kl[np.isfinite(kl)]
    pos = kl[kl > 0]
    fig, ax = _figure()
    if pos.size:
        lo, hi = np.log10(pos.min()), np.log10(pos.max())
        bins = np.logspace(lo - 0.05, hi + 0.05, 40) if hi > lo else 10
        ax.hist(pos, bins=bins, color="#2c7fb8")
        ax.set_xscale("log")
        d = describe(kl)
        for val, name, style in ((d.mean, "mean", "-"), (d.p99, "p99", "--")):
            if val > 0:
                ax.axvline(val, color="k", linestyle=style, linewidth=1, label=f"{name} {val:.2e}")
    ax.plot([], [], " ", label=f"{int((kl == 0).sum())} positions with KL = 0")
    bound = " (lower bound, top-K logits)" if comp.kl_is_bound else ""
    ax.set_xlabel(f"KL(ref ‖ cand) per position, nats{bound}")
    ax.set_ylabel("positions")
    ax.set_title(f"Per-token KL, {kl.size} positions")
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path)


def plot_kl_by_position(comp: "Comparison", path: Path) -> None:
    pos = comp.token_position
    n = int(pos.max()) + 1 if pos.size else 0
    mean, se, count = np.full(n, np.nan), np.zeros(n), np.zeros(n, dtype=int)
    for j in range(n):
        d = describe(comp.tokens.kl_ref_cand[pos == j])
        mean[j], se[j], count[j] = d.mean, 0.0 if np.isnan(d.se) else d.se, d.n
    fig, ax = _figure()
    x = np.arange(n)
    ax.plot(x, mean, color="#2c7fb8", label="mean KL(ref ‖ cand)")
    ax.fill_between(x, mean - se, mean + se, color="#2c7fb8", alpha=0.25, label="± 1 se")
    ax.set_xlabel("generated-token position")
    ax.set_ylabel("KL, nats")
    ax2 = ax.twinx()
    ax2.step(x, count, where="mid", color="#999999", linewidth=1, label="compared prompts")
    ax2.set_ylabel("compared prompts", color="#777777")
    ax2.set_ylim(0, max(1, int(count.max(initial=0))) * 1.08)
    ax2.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title("KL by position" + (" (a prompt drops out after its split)" if comp.mode == "free-running" else " (teacher-forced)"))
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=3)
    _save(fig, path)


def write_plots(comp: "Comparison", out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the PNGs into out_dir; -> {name: path}."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, fn in (("first_divergence", plot_first_divergence), ("kl_distribution", plot_kl_distribution),
                     ("kl_by_position", plot_kl_by_position)):
        if name == "first_divergence" and not comp.free_running_available:
            continue
        if name != "first_divergence" and len(comp.tokens) == 0:
            continue
        p = d / f"{name}.png"
        fn(comp, p)
        out[name] = p
    return out
