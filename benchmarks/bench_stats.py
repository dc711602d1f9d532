"""Distribution diagnostics on the default model (SmolLM2-135M-Instruct, 30
decoder layers), one torch thread, in one run:

1. ``stats_of`` on the default prompts (one per category: 9 prompts) with
   weights: time, sites, the top outlier channels, heavy-tailed tensors.
2. The ``mlp_input_outlier`` plant (channel 3 of the MLP input x50) in
   --layer: its rank among every outlier channel, among the MLP-input
   channels and among the systematic outliers (over the cut at >= 50% of the
   positions), and the ablation ranking of the top --ablate systematic
   outliers (zero mode), with its time.
3. The same plant against the untouched model (``outlier_shift``): the
   channels whose max |x| grew past SHIFT_FACTOR, the plant's rank among
   them, and the ablation ranking of the top --ablate of them.

    python benchmarks/bench_stats.py
    python benchmarks/bench_stats.py --layer 10 --ablate 5 --limit 4
"""

from __future__ import annotations

import argparse
import time


def _print_ranking(ablation, site: str, channel: int) -> None:
    """An ablation ranking as a markdown table, the planted channel marked."""
    print("| rank | site | channel | mean KL (nats) | ΔPPL |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(ablation.rows, 1):
        mark = " (planted)" if (r.key, r.channel) == (site, channel) else ""
        print(f"| {i} | `{r.key}`{mark} | {r.channel} | {r.kl.mean:.4g} ± {r.kl.se:.2g} | {r.delta_ppl:+.4g} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--ablate", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None, help="first N of the default per-category prompts")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from logitparity import diagnostics as D
    from logitparity.capture import load_model
    from logitparity.capture.plants import OUTLIER_CHANNEL, planted

    lm = load_model(None)
    t0 = time.perf_counter()
    s = D.stats_of(lm, limit=args.limit)
    t_stats = time.perf_counter() - t0
    print(f"stats_of: {len(s.prompts)} prompts, {s.positions} positions, {len(s.activations)} sites, "
          f"{len(s.weights)} weights in {t_stats:.1f} s; {len(s.outliers)} outlier channels, "
          f"{len(s.heavy_tailed)} heavy-tailed tensors, {len(s.weight_outliers)} weight outliers")
    print("| # | site | channel | max abs | score | max/sigma | token |")
    print("|---|---|---|---|---|---|---|")
    for i, o in enumerate(s.outliers[:8], 1):
        print(f"| {i} | `{o.key}` | {o.channel} | {o.max_abs:.4g} | {o.score:.1f} | {o.sigma_score:.1f} | "
              f"{o.token!r} ({o.prompt_id}, {o.position}) |")
    site = f"model.layers.{args.layer}.mlp:input"
    with planted(lm, "mlp_input_outlier", layer=args.layer):
        t0 = time.perf_counter()
        p = D.stats_of(lm, limit=args.limit, weights=False)
        t_p = time.perf_counter() - t0
        rank = next((i for i, o in enumerate(p.outliers, 1) if o.key == site and o.channel == OUTLIER_CHANNEL), None)
        mlp_in = [o for o in p.outliers if o.key.endswith(".mlp:input")]
        rank_kind = next((i for i, o in enumerate(mlp_in, 1) if o.key == site and o.channel == OUTLIER_CHANNEL), None)
        po = p.outliers[rank - 1] if rank else None
        print(f"planted {site} channel {OUTLIER_CHANNEL}: rank {rank} of {len(p.outliers)} outliers, rank "
              f"{rank_kind} of {len(mlp_in)} MLP-input outliers; score {po.score if po else float('nan'):.1f} "
              f"(stats {t_p:.1f} s)")
        for i, o in enumerate(mlp_in[:3], 1):
            print(f"  MLP-input outlier {i}: {o.key} channel {o.channel} score {o.score:.1f}")
        sysl = p.systematic_outliers
        rank_sys = next((i for i, o in enumerate(sysl, 1) if o.key == site and o.channel == OUTLIER_CHANNEL), None)
        print(f"planted: {po.positions_over} positions over the cut ({100 * po.fraction_over:.1f}%); rank "
              f"{rank_sys} of {len(sysl)} systematic outliers (over the cut at >= "
              f"{100 * D.SYSTEMATIC_FRACTION:g}% of the positions)")
        for i, o in enumerate(sysl[:5], 1):
            print(f"  systematic {i}: {o.key} channel {o.channel} score {o.score:.1f} over {100 * o.fraction_over:.1f}%")
        t0 = time.perf_counter()
        a = D.ablate(lm, p, args.ablate, systematic=True)
        t_a = time.perf_counter() - t0
        from logitparity.capture.sites import site_module

        shifts = D.outlier_shift(s, p)  # s: the untouched model on the same prompts
        rank_shift = next((i for i, x in enumerate(shifts, 1) if (x.key, x.channel) == (site, OUTLIER_CHANNEL)), None)
        chans = [(x.key, x.channel) for x in shifts if site_module(x.key)[1] in ("input", "output")][:args.ablate]
        t0 = time.perf_counter()
        b = D.ablate(lm, p, channels=chans) if chans else None
        t_b = time.perf_counter() - t0
    print(f"ablation of the top {len(a.rows)} systematic outliers (zero) in {t_a:.1f} s ({a.positions} positions):")
    _print_ranking(a, site, OUTLIER_CHANNEL)
    print(f"against the untouched model: {len(shifts)} channels grew past {D.SHIFT_FACTOR:g}x; the plant ranks "
          f"{rank_shift}")
    for i, x in enumerate(shifts[:5], 1):
        mark = " (planted)" if (x.key, x.channel) == (site, OUTLIER_CHANNEL) else ""
        print(f"  {i}: {x.key}{mark} channel {x.channel}: {x.ref_max_abs:.4g} -> {x.cand_max_abs:.4g} ({x.ratio:.2f}x)")
    if b is not None:
        print(f"ablation of the top {len(b.rows)} grown channels (zero) in {t_b:.1f} s:")
        _print_ranking(b, site, OUTLIER_CHANNEL)


if __name__ == "__main__":
    main()
