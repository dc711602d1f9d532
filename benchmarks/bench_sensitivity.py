"""The int4 (g = 32) sensitivity map of the default model
(SmolLM2-135M-Instruct, 30 decoder layers) over all layers, in one run:

1. The map, one layer at a time (every Linear of the layer transformed),
   teacher-forced on the bundled corpus' first --max-tokens tokens, plus the
   first-order saliency and a mixed-precision plan at --budget measured for
   real; the wall time of each part (target: the map <= 15 minutes on 2 cores).
2. The saving of the suffix pass (each candidate run from its first
   transformed layer on, fed the reference's cached hidden states) against a
   full forward per cell, on --compare-layers, and that both give the same
   figures.

    python benchmarks/bench_sensitivity.py                      # the table
    python benchmarks/bench_sensitivity.py --max-tokens 2048 --torch-threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memory import peak_rss_mib  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=512, help="corpus tokens scored (default 512)")
    ap.add_argument("--ctx", type=int, default=256, help="window length (default 256)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.1, help="plan budget, mean KL nats (default 0.1)")
    ap.add_argument("--compare-layers", default="0,15,29", help="layers timed both ways (default 0,15,29)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--report", default=None, metavar="MD", help="also write the map's markdown here")
    ap.add_argument("--plot", default=None, metavar="PNG", help="also write the heat map here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.torch_threads)
    from logitparity.capture import load_model
    from logitparity.sensitivity import sensitivity_map

    t0 = time.perf_counter()
    lm = load_model(None)
    load_s = time.perf_counter() - t0
    kw = dict(group_size=args.group_size, max_tokens=args.max_tokens, ctx=args.ctx)
    t0 = time.perf_counter()
    m = sensitivity_map(lm, "int4", budget=args.budget, saliency=True, progress=True, **kw)
    total = time.perf_counter() - t0
    rss = peak_rss_mib()

    layers = [int(x) for x in args.compare_layers.split(",")]
    t0 = time.perf_counter()
    suf = sensitivity_map(lm, "int4", layers=layers, **kw)
    suf_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = sensitivity_map(lm, "int4", layers=layers, suffix=False, **kw)
    full_s = time.perf_counter() - t0
    same = all(a.mean_kl == b.mean_kl for a, b in zip(suf.cells, full.cells))
    cell_suf = sum(c.seconds for c in suf.cells) / len(layers)
    cell_full = sum(c.seconds for c in full.cells) / len(layers)

    t = m.timings
    print(f"\n# bench_sensitivity: int4 g={args.group_size} map of the default model, {len(m.cells)} layers, "
          f"{m.inputs['tokens']} tokens ({m.inputs['windows']} windows of {args.ctx}), "
          f"torch threads {args.torch_threads}, {os.cpu_count()} CPUs\n")
    print("| part | seconds |")
    print("|---|---|")
    print(f"| load the model | {load_s:.1f} |")
    print(f"| reference pass (logits + hidden states cached) | {t['reference_s']:.1f} |")
    print(f"| {len(m.cells)} cells (one suffix pass each) | {t['cells_s']:.1f} |")
    print(f"| plan measured (budget {args.budget:g}) | {t['plan_s']:.1f} |")
    print(f"| saliency (autograd) | {t['saliency_s']:.1f} |")
    print(f"| **map total** | **{total:.1f}** ({total / 60:.2f} min; target <= 15 min) |")
    print(f"\npeak RSS {rss:.0f} MiB; saliency: autograd saved {m.saliency.saved_bytes_peak / 2**20:.0f} MiB "
          f"of activations (peak, one window), weight gradients {m.saliency.grad_bytes / 2**20:.0f} MiB")
    print(f"\nsuffix vs full forward per cell, layers {layers}: {cell_suf:.2f} s vs {cell_full:.2f} s "
          f"({cell_full / cell_suf:.2f}x; maps {suf_s:.1f} s vs {full_s:.1f} s); identical figures: {same}")
    print(f"\nstrip (layers 0…{len(m.cells) - 1}): {m.strip()}")
    print("most fragile: " + ", ".join(f"{c.label} ({c.mean_kl:.3g})" for c in m.ranked()[:5]))
    print(f"saliency Spearman vs measured: weight×grad {m.saliency.spearman_weight_grad:.3f}, "
          f"act×weight {m.saliency.spearman_act_weight:.3f}")
    p = m.plan
    meas = "nothing transformed" if p.measured is None else f"{p.measured.kl.mean:.4g} ± {p.measured.kl.se:.2g}"
    print(f"plan: keep {len(p.kept)} ({', '.join(p.kept)}); predicted mean KL {p.predicted_kl:.4g}, measured {meas}; "
          f"all 30 transformed, predicted {p.predicted_all_kl:.4g}")
    if args.report:
        Path(args.report).write_text(m.to_markdown(), encoding="utf-8")
    if args.plot:
        from logitparity.report.sensitivity import write_sensitivity_plot

        write_sensitivity_plot(m, args.plot)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
