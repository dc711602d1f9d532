"""``logitparity layers``: where in the model a candidate first leaves the
noise band, module by module (docs/layers.md).

REF and CAND are each a model (Hugging Face directory, .gguf, or 'default'
for the embedded SmolLM2-135M-Instruct) or a dump with an activations part.
Two models: isolated (default), propagated or both, optionally a bisect over
decoder layers from the logits alone. Two dumps: propagated. Exit 0 when no
module leaves the band, 1 when one does, 2 on bad input.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from logitparity.cli import (MODEL_DTYPES, OldSpelling, add_torch_threads_argument, apply_torch_threads,
                             model_arg, write_outputs)

HELP = "localize a regression: compare two models (or two dumps with activations) module by module"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", help="reference: HF directory, .gguf, 'default', or a dump with activations")
    p.add_argument("candidate", help="candidate: HF directory, .gguf, 'default', or a dump with activations")
    p.add_argument("--mode", choices=("isolated", "propagated", "both"), default="isolated",
                   help="isolated: candidate modules on the reference's inputs (default); two dumps: propagated")
    p.add_argument("--reference-dtype", choices=MODEL_DTYPES, default="fp32", help="reference dtype")
    p.add_argument("--candidate-dtype", "--dtype", dest="candidate_dtype", choices=MODEL_DTYPES,
                   action=OldSpelling, default="fp32",
                   help="candidate dtype (as ppl and tasks --candidate-dtype; --dtype is the old name)")
    p.add_argument("--prompts", default=None, help="prompts file (default: the embedded set's first --limit)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N prompts (default 4)")
    p.add_argument("--modules", default="default",
                   help="default (norms, attention, MLP, layer output) | all (plus every Linear) | comma-separated paths "
                        "and set names, e.g. default,attention (query/key after RoPE, value, score range)")
    p.add_argument("--noise-floor", "--floor", dest="noise_floor", default=None, metavar="FILE", action=OldSpelling,
                   help="the noise band: a noise-floor file with per-module figures (calibrate --layers) or a layer "
                        "floor file (--save-floor), as compare --noise-floor takes; default: the dtype's band "
                        "(--floor is the old name)")
    p.add_argument("--save-floor", default=None, metavar="FILE",
                   help="write this (benign) comparison as a floor file for later runs")
    p.add_argument("--bisect", action="store_true", help="also bisect over decoder layers from the logits alone")
    p.add_argument("--report", default=None, metavar="MD", help="write the layer table (markdown)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every number (JSON)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the per-layer error plot")
    add_torch_threads_argument(p)


def _is_dump(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def run(args: argparse.Namespace) -> int:
    from logitparity import layers
    from logitparity.report.layers import layers_markdown, write_layers_json, write_layers_plot

    dumps = [_is_dump(args.reference), _is_dump(args.candidate)]
    if any(dumps) and not all(dumps):
        raise ValueError("reference and candidate must both be models or both be dumps with activations, "
                         f"got {'a dump' if dumps[0] else 'a model'} and {'a dump' if dumps[1] else 'a model'}")
    bisection = None
    if all(dumps):
        if args.bisect:
            raise ValueError("--bisect needs two models (it swaps layers); dumps hold only outputs")
        c = layers.compare_activation_dumps(args.reference, args.candidate, noise_floor=args.noise_floor)
    else:
        from logitparity.capture import load_model

        apply_torch_threads(args)
        ref = load_model(model_arg(args.reference), dtype=args.reference_dtype)
        cand = load_model(model_arg(args.candidate), dtype=args.candidate_dtype)
        mods = args.modules if args.modules in ("default", "all") else [m.strip() for m in args.modules.split(",")]
        c = layers.compare_layers(ref, cand, args.prompts, mode=args.mode, noise_floor=args.noise_floor, modules=mods,
                                  limit=args.limit)
        if args.bisect:
            bisection = layers.bisect_layers(ref, cand, args.prompts, limit=args.limit)
    if args.save_floor:
        layers.save_floor(c, args.save_floor, description=f"{args.reference} vs {args.candidate}")
    md = layers_markdown(c, only_out_of_band=False, max_rows=None)
    write_outputs(args, md, partial(write_layers_json, c), partial(write_layers_plot, c))
    if c.first_divergent is None:
        print(f"no module leaves the noise band ({c.judged_by}; {len(c.modules)} modules, {len(c.prompts)} prompts; "
              f"band: {c.band_source})")
    else:
        ev = c.evidence
        print(f"first divergent module: {c.first_divergent} (layer {ev['layer']}, {ev['kind']}, {c.judged_by}): "
              f"{ev['why']}")
    if bisection is not None:
        where = ("outside the decoder layers" if bisection.outside_layers else
                 f"layer {bisection.first_bad_layer}" if bisection.first_bad_layer is not None else "none")
        print(f"bisect over decoder layers: first bad {where} in {bisection.passes} passes "
              f"(threshold {bisection.threshold:.3g} relative L2 of the logits)")
    return 0 if c.first_divergent is None else 1
