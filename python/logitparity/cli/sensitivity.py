"""``logitparity sensitivity``: which decoder layers are fragile under a
transform (int8/int4 fake quantization, fp16/bf16/fp8-e4m3 casts, magnitude
pruning), one layer (or one module type of one layer) at a time, and a
mixed-precision plan measured for real (docs/sensitivity.md).

Exit 0 when the map (and the plan, if asked for) was measured; 1 when
``--budget`` was given and the measured plan's mean KL is over it (the
planned candidate failed its budget); 2 on bad input.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from logitparity.cli import (DEFAULT_MODEL, MODEL_DTYPES, UserError, add_torch_threads_argument,
                             apply_torch_threads, model_arg, write_outputs)

HELP = "map how fragile each layer is under a transform (int4/int8/fp8/fp16/bf16/prune) and plan mixed precision"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from logitparity.sensitivity import DEFAULT_CTX, DEFAULT_MAX_TOKENS, RISK_CUTOFFS

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="HF directory, .gguf, or 'default' (the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--transform", required=True, metavar="NAME",
                   help="int8 | int4 | fp16 | bf16 | fp8-e4m3 | prune")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="int8/int4: one scale per G input columns (must divide in_features); default per output channel")
    p.add_argument("--asymmetric", action="store_true", help="int8/int4: min/max scale with a zero point")
    p.add_argument("--sparsity", type=float, default=None, metavar="S", help="prune: share of entries zeroed, [0, 1)")
    p.add_argument("--modules", default=None, metavar="TYPES",
                   help="comma-separated module types to transform (e.g. down_proj,mlp.up_proj or mlp); default all Linears")
    p.add_argument("--layers", default=None, metavar="LIST", help="decoder layers, e.g. 0-3,7 (default all)")
    p.add_argument("--by-module", action="store_true", help="one cell per (layer, module type) instead of per layer")
    p.add_argument("--prompts", default=None, metavar="FILE", help="score these prompts (teacher-forced)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="with --prompts: the first N")
    p.add_argument("--text-file", default=None, metavar="FILE",
                   help="score this text (default: the bundled corpus' first --max-tokens tokens)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help=f"text tokens scored (default {DEFAULT_MAX_TOKENS} for the bundled corpus, all of a --text-file)")
    p.add_argument("--ctx", type=int, default=None, metavar="N", help=f"window length for a text (default {DEFAULT_CTX})")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="fp32", help="the reference's dtype")
    p.add_argument("--budget", type=float, default=None, metavar="KL",
                   help="also plan and measure mixed precision: keep layers at reference precision until the "
                        "predicted mean KL is under KL nats")
    p.add_argument("--cutoffs", default=",".join(f"{c:g}" for c in RISK_CUTOFFS), metavar="M,H",
                   help="mean-KL cut-offs of the M and H risk classes (default %(default)s)")
    p.add_argument("--saliency", action="store_true",
                   help="also first-order saliency (weight × gradient, activation × weight) beside the map")
    p.add_argument("--report", default=None, metavar="MD", help="write the ranked table and strip (markdown)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every number (JSON)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the heat map (layers × module types)")
    p.add_argument("--quiet", action="store_true", help="no per-layer progress on stderr")
    add_torch_threads_argument(p)


def _cutoffs(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(","))
    except ValueError:
        raise UserError(f"--cutoffs must be two numbers 'M,H' (mean KL in nats) such as 0.001,0.01, got {s!r}") from None


def run(args: argparse.Namespace) -> int:
    from logitparity import sensitivity
    from logitparity.capture.quantize import make_transform
    from logitparity.report.sensitivity import write_sensitivity_json, write_sensitivity_plot

    if args.prompts is not None and args.text_file is not None:
        raise UserError("--prompts and --text-file both given; the map is teacher-forced on one of them")
    cutoffs = _cutoffs(args.cutoffs)
    # the transform's options are checked before the model loads
    make_transform(args.transform, group_size=args.group_size, symmetric=not args.asymmetric,
                   sparsity=args.sparsity)
    sensitivity.check_budget(args.budget)
    sensitivity.check_cutoffs(cutoffs)
    text = None
    if args.text_file is not None:
        text = Path(args.text_file)
        if not text.is_file():
            raise UserError(f"--text-file {text} does not exist; pass a UTF-8 text file")
    from logitparity.capture import load_model

    apply_torch_threads(args)
    lm = load_model(model_arg(args.model), dtype=args.dtype)
    m = sensitivity.sensitivity_map(
        lm, args.transform, prompts=args.prompts, text=text, modules=args.modules, layers=args.layers,
        by_module=args.by_module, group_size=args.group_size, symmetric=not args.asymmetric,
        sparsity=args.sparsity, max_tokens=args.max_tokens, ctx=args.ctx, limit=args.limit, budget=args.budget,
        cutoffs=cutoffs, saliency=args.saliency, progress=not args.quiet)
    md = m.to_markdown()
    write_outputs(args, md, partial(write_sensitivity_json, m), partial(write_sensitivity_plot, m))
    top = m.ranked()[:3]
    print(f"{m.transform}: {len(m.cells)} cells, {m.inputs['tokens']} tokens, {m.timings['total_s']:.1f} s")
    print(f"strip (layers {m.layers_label}; . L  * M  # H): {m.strip()}")
    print("most fragile: " + ", ".join(f"{c.label} (mean KL {c.mean_kl:.3g})" for c in top))
    if m.saliency is not None:
        print(f"saliency vs measured, Spearman: weight×grad {m.saliency.spearman_weight_grad:.3f}, "
              f"act×weight {m.saliency.spearman_act_weight:.3f}")
    if m.plan is not None:
        p = m.plan
        meas = "nothing transformed" if p.measured is None else \
            f"measured {p.measured.kl.mean:.4g} ± {p.measured.kl.se:.2g}"
        print(f"plan (budget {p.budget:g}): keep {len(p.kept)} at reference precision "
              f"({', '.join(p.kept) or 'none'}); predicted mean KL {p.predicted_kl:.4g}, {meas}")
        if p.within_budget is False:
            return 1
    return 0
