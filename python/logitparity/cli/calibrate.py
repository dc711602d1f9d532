"""``logitparity calibrate``: measure the noise floor, the spread between two
reference runs that differ only by a benign change (by default batch size 1
vs 8: the same model, dtype and prompts, other padding and matmul shapes), and
write it for policies with ``noise_factor`` thresholds."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from logitparity._fileio import write_text_atomic
from logitparity.cli import add_torch_threads_argument, apply_torch_threads

HELP = "Measure the noise floor between two benign reference runs (e.g. batch size 1 vs 8) for noise-relative policies."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="noise-floor.json", help="noise-floor file to write (default noise-floor.json)")
    p.add_argument("--dumps", nargs=2, metavar=("A", "B"), default=None,
                   help="use two existing dumps of the reference instead of capturing (any benign change)")
    p.add_argument("--change", default=None,
                   help="with --dumps: what differs between them, recorded in the file (e.g. 'threads 1 vs 16')")
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", default=None, help="prompts file (default: the embedded prompt set)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="reference dtype (default fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", nargs=2, type=int, default=(1, 8), metavar=("A", "B"),
                   help="the two batch sizes of the captures (default 1 8)")
    p.add_argument("--limit", type=int, default=16, metavar="N", help="first N prompts (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="M", help="default 32")
    p.add_argument("--threads", type=int, default=None, help="threads of the C++ core (default: all cores)")
    add_torch_threads_argument(p)
    p.add_argument("--keep", metavar="DIR", default=None, help="keep the two captured dumps in DIR")


def run(args: argparse.Namespace) -> int:
    from logitparity.compare import compare_dumps
    from logitparity.policy import NoiseFloor
    from logitparity.report import describe_run, jsonable

    if args.dumps:
        a, b = args.dumps
        change = args.change or "two reference dumps given with --dumps"
        comp = compare_dumps(a, b, decode=None, threads=args.threads)
    else:
        from logitparity.capture import capture, load_model

        ba, bb = args.batch_sizes
        if ba == bb:
            raise ValueError(f"--batch-sizes must differ to be a change, got {ba} and {bb}")
        change = f"batch size {ba} vs {bb}"
        apply_torch_threads(args)  # the captures run here; both with the same thread count
        work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="logitparity-calibrate-"))
        lm = load_model(args.model, dtype=args.dtype, device=args.device)
        dumps = []
        for bs in (ba, bb):
            out = work / f"reference-batch{bs}"
            print(f"capturing the reference with batch size {bs} -> {out}", file=sys.stderr)
            capture(lm, args.prompts, out, batch_size=bs, max_new_tokens=args.max_new_tokens, limit=args.limit)
            dumps.append(out)
        comp = compare_dumps(dumps[0], dumps[1], decode=None, threads=args.threads)
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    noise = NoiseFloor(comp.metrics(), change)
    data = jsonable({**noise.to_dict(), "reference": describe_run(comp.ref_manifest, comp.ref_path),
                      "prompts": len(comp.prompts), "positions": len(comp.tokens)})
    out = write_text_atomic(args.out, json.dumps(data, indent=1, allow_nan=False) + "\n")
    m = noise.metrics
    print(f"noise floor ({change}, {len(comp.prompts)} prompts, {len(comp.tokens)} positions): "
          f"greedy match at 10 {m['greedy_match@10']:.4f}, mean KL {m['kl_ref_cand.mean']:.3e} nats, "
          f"p99 KL {m['kl_ref_cand.p99']:.3e} nats -> {out}")
    return 0
