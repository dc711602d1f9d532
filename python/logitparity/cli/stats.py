"""``logitparity stats``: weight and activation distributions of one model,
outlier channels and heavy tails, and (``--ablate N``) the top N outlier
channels ranked by the damage their ablation does (docs/stats.md). With
``--against REF`` the channels whose max |x| grew against a reference on the
same prompts, and ``--ablate N`` ablates the top N of those.

Exit 0 when the statistics were written (a diagnostic has no verdict), 2 on
bad input.
"""

from __future__ import annotations

import argparse
from functools import partial

from logitparity.cli import (DEFAULT_MODEL, MODEL_DTYPES, UserError, add_torch_threads_argument,
                             apply_torch_threads, model_arg, write_outputs)

HELP = "distributions of weights and activations: outlier channels, heavy tails, an ablation ranking"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF directory, .gguf, or 'default' (the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="fp32")
    p.add_argument("--prompts", default=None,
                   help="prompts file (default: the first prompt of each category of the embedded set, context_limit left out)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N prompts")
    p.add_argument("--outlier-factor", type=float, default=None, metavar="K",
                   help="outlier channel: max |x| > K x the median channel's max |x| of its tensor (default 10)")
    p.add_argument("--no-weights", action="store_true", help="skip the weight statistics")
    p.add_argument("--no-attention", action="store_true",
                   help="skip the query/key/value and attention-score sites")
    p.add_argument("--ablate", type=int, default=0, metavar="N",
                   help="also ablate the top N outlier channels one at a time and rank them by KL and ΔPPL")
    p.add_argument("--ablate-systematic", action="store_true",
                   help="ablate the top N systematic outliers (over the cut at half of the positions or more) instead")
    p.add_argument("--ablate-mode", choices=("zero", "clamp"), default="zero",
                   help="zero: set the channel to 0 (default); clamp: clamp it to ± the outlier cut")
    p.add_argument("--against", default=None, metavar="REF",
                   help="a reference model (HF directory, .gguf or 'default') measured on the same prompts: list the "
                        "channels whose max |x| grew past --shift-factor, and ablate those with --ablate")
    p.add_argument("--against-dtype", choices=MODEL_DTYPES, default=None,
                   help="the reference's dtype (default: --dtype)")
    p.add_argument("--shift-factor", type=float, default=None, metavar="F",
                   help="a channel grew when its max |x| exceeds F x the reference's (default 4)")
    p.add_argument("--report", default=None, metavar="MD", help="write the markdown report")
    p.add_argument("--json", default=None, metavar="FILE", help="write every number (JSON)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the per-layer kurtosis and max |x| plot")
    add_torch_threads_argument(p)


def _check(args: argparse.Namespace) -> None:
    import math

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be an integer >= 1 (the first N prompts), got {args.limit}; "
                        "omit it to use every prompt")
    if args.ablate < 0:
        raise UserError(f"--ablate must be an integer >= 0 (the number of top outlier channels to ablate), "
                        f"got {args.ablate}; use 0 to skip the ablation")
    f = args.shift_factor
    if f is not None and args.against is None:
        raise UserError(f"--shift-factor {f:g} applies to a comparison with --against REF; add --against or drop it")
    if f is not None and not (math.isfinite(f) and f > 1):
        raise UserError(f"--shift-factor must be a number > 1 (how many times a channel's max |x| must grow against "
                        f"the reference), got {f:g}; the default is 4")
    if args.against is not None and args.ablate_systematic:
        raise UserError("--ablate-systematic picks the candidate's own systematic outliers; with --against, --ablate "
                        "ablates the channels that grew: drop one of the two")
    k = args.outlier_factor
    if k is not None and not (math.isfinite(k) and k > 1):
        raise UserError(f"--outlier-factor must be a number > 1 (a channel's max |x| over the median channel's), "
                        f"got {k:g}; the default is 10")


def run(args: argparse.Namespace) -> int:
    from logitparity import diagnostics
    from logitparity.capture import load_model
    from logitparity.report.stats import (ablation_markdown, shift_markdown, stats_markdown, write_stats_json,
                                          write_stats_plot)

    _check(args)
    apply_torch_threads(args)
    lm = load_model(model_arg(args.model), dtype=args.dtype)
    s = diagnostics.stats_of(lm, args.prompts, limit=args.limit, weights=not args.no_weights,
                             attention=not args.no_attention,
                             outlier_factor=diagnostics.OUTLIER_FACTOR if args.outlier_factor is None
                             else args.outlier_factor)
    shifts = None
    if args.against is not None:
        ref = load_model(model_arg(args.against), dtype=args.against_dtype or args.dtype)
        rs = diagnostics.stats_of(ref, args.prompts, limit=args.limit, weights=False, attention=not args.no_attention,
                                  outlier_factor=s.outlier_factor)
        del ref
        shifts = diagnostics.outlier_shift(rs, s, factor=diagnostics.SHIFT_FACTOR if args.shift_factor is None
                                           else args.shift_factor)
    if shifts is not None:
        from logitparity.capture.sites import site_module

        pool = [(x.key, x.channel) for x in shifts if site_module(x.key)[1] in ("input", "output")][:args.ablate]
        ab = diagnostics.ablate(lm, s, mode=args.ablate_mode, channels=pool) if args.ablate and pool else None
    else:
        pool = s.systematic_outliers if args.ablate_systematic else s.outliers
        ab = (diagnostics.ablate(lm, s, args.ablate, mode=args.ablate_mode, systematic=args.ablate_systematic)
              if args.ablate and pool else None)
    md = stats_markdown(s) + (shift_markdown(shifts, args.against, diagnostics.SHIFT_FACTOR if args.shift_factor
                                             is None else args.shift_factor) if shifts is not None else "") \
        + ("\n" + ablation_markdown(ab) if ab is not None else "")
    write_outputs(args, md, partial(write_stats_json, s, ablation=ab, shifts=shifts), partial(write_stats_plot, s))
    for w in s.warnings:
        print(f"warning: {w}")
    print(f"{len(s.prompts)} prompts, {s.positions} positions, {len(s.activations)} activation sites, "
          f"{len(s.weights)} weights: {len(s.outliers)} outlier channels ({len(s.systematic_outliers)} systematic), "
          f"{len(s.heavy_tailed)} heavy-tailed tensors")
    if s.outliers:
        o = s.outliers[0]
        print(f"top outlier: {o.key} channel {o.channel}: max |x| {o.max_abs:.4g} = {o.score:.1f}x the median "
              f"channel's (token {o.token!r} of prompt {o.prompt_id}, position {o.position})")
    if shifts is not None:
        print(f"against {args.against}: {len(shifts)} channels grew past the factor" + (
            f"; the most: {shifts[0].key} channel {shifts[0].channel}, max |x| {shifts[0].ref_max_abs:.4g} -> "
            f"{shifts[0].cand_max_abs:.4g} ({shifts[0].ratio:.1f}x)" if shifts else ""))
    if args.ablate and not pool:
        print("ablation: no outlier channel to ablate")
    if ab is not None and ab.rows:
        r = ab.rows[0]
        print(f"most damaging ablation ({ab.mode}): {r.key} channel {r.channel}: mean KL {r.kl.mean:.4g} nats, "
              f"ΔPPL {r.delta_ppl:+.4g}")
    return 0
