"""``logitparity calibrate``: measure the noise floor, the reference against
itself under named benign changes, per prompt and per position, and write it
as a versioned file (docs/noise-floor.md) for ``compare --noise-floor``.

Pairs come from existing dumps (``--dumps A B``, repeatable; mixing dtypes is
how a precision twin is given: ``--dumps REF_FP32 TWIN_BF16``) or are
captured here (``--vary batch,threads,mode,dtype=bf16``). Without either,
the reference is captured with batch sizes 1 and 8 (the old default).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from logitparity.cli import MODEL_DTYPES, add_torch_threads_argument, apply_torch_threads

HELP = ("Measure the noise floor: the reference against itself under benign changes (batch, threads, greedy vs "
        "score, the precision twin), per position, for `compare --noise-floor`.")
VARY = ("batch", "threads", "mode", "dtype")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="noise-floor.json", help="noise-floor file to write (default noise-floor.json)")
    p.add_argument("--dumps", nargs=2, metavar=("A", "B"), action="append", default=None,
                   help="a benign pair of existing dumps, A the reference (repeatable: --dumps A B --dumps C D; "
                        "different dtypes make B a precision twin, e.g. --dumps REF_FP32 TWIN_BF16)")
    p.add_argument("--change", action="append", default=None,
                   help="with --dumps: what differs in each pair, in order (e.g. 'threads 1 vs 16'), recorded")
    p.add_argument("--vary", default=None, metavar="LIST",
                   help="capture the pairs here: a comma list of batch, threads, mode, dtype=bf16|fp16 "
                        "(e.g. batch,threads,mode,dtype=bf16)")
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", default=None, help="prompts file (default: the embedded prompt set)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="fp32", help="reference dtype (default fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", nargs=2, type=int, default=(1, 8), metavar=("A", "B"),
                   help="the reference's batch size and the other one of the batch change (default 1 8)")
    p.add_argument("--limit", type=int, default=16, metavar="N", help="first N prompts (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="M", help="default 32")
    p.add_argument("--threads", type=int, default=None, help="threads of the C++ core (default: all cores)")
    add_torch_threads_argument(p)  # the reference's; the threads change uses this + 1
    p.add_argument("--reference", metavar="DIR", default=None,
                   help="with --vary: an existing reference dump to vary instead of capturing one")
    p.add_argument("--keep", metavar="DIR", default=None, help="keep the captured dumps in DIR")
    p.add_argument("--layers", action="store_true",
                   help="with --vary ...,dtype=X: also record per-module figures (the reference against its "
                        "precision twin, module by module) in the floor file, for `logitparity layers --noise-floor` "
                        "and compare_layers(noise_floor=FILE)")
    p.add_argument("--layers-prompts", type=int, default=4, metavar="N",
                   help="prompts for --layers, taken after the first 4 of the prompt set so that `layers`' "
                        "default prompts stay unseen (default 4)")


def parse_vary(text: str) -> list[tuple[str, str | None]]:
    """'batch,threads,mode,dtype=bf16' -> [("batch", None), ..., ("dtype", "bf16")]."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        if name not in VARY:
            raise ValueError(f"--vary: unknown change {name!r}; choose from {', '.join(VARY)} "
                             "(dtype takes a value: dtype=bf16)")
        if name == "dtype":
            if value not in ("bf16", "fp16", "fp32"):
                raise ValueError(f"--vary: dtype needs a value bf16, fp16 or fp32 (dtype=bf16), got {value!r}")
        elif value:
            raise ValueError(f"--vary: {name} takes no value, got {item!r}")
        if any(n == name for n, _ in out):
            raise ValueError(f"--vary: {name} given twice")
        out.append((name, value or None))
    if not out:
        raise ValueError(f"--vary needs at least one change, got {text!r}")
    return out


def layer_floor(args: argparse.Namespace, lm, twin, dtype: str) -> dict:
    """--layers: the reference against its precision twin module by module,
    on prompts the layer comparison does not use by default."""
    from logitparity.layers import DEFAULT_PROMPT_COUNT, compare_layers, floor_document
    from logitparity.prompts import load_prompts

    prompts = load_prompts(args.prompts)[DEFAULT_PROMPT_COUNT:DEFAULT_PROMPT_COUNT + args.layers_prompts]
    if not prompts:
        raise ValueError(f"--layers needs prompts after the first {DEFAULT_PROMPT_COUNT} of the prompt set; "
                         f"it has {len(load_prompts(args.prompts))}")
    c = compare_layers(lm, twin, prompts)
    return floor_document(c, description=f"precision twin {args.dtype} vs {dtype}, {len(prompts)} prompts "
                                         f"after the first {DEFAULT_PROMPT_COUNT}")


def capture_pairs(args: argparse.Namespace, work: Path) -> list[tuple[str, str, str]]:
    """Capture the reference and its --vary variants; -> [(a, b, change)].
    With --layers, ``args.layer_floor`` receives the per-module floor."""
    import torch

    from logitparity.capture import capture, load_model

    vary = parse_vary(args.vary)
    ba, bb = args.batch_sizes
    for name, value in vary:  # check everything before the first capture
        if name == "dtype" and value == args.dtype:
            raise ValueError(f"--vary dtype={value} is the reference's own dtype; name another")
        if name == "batch" and ba == bb:
            raise ValueError(f"--batch-sizes must differ to be a change, got {ba} and {bb}")
    threads = apply_torch_threads(args)
    kw = dict(max_new_tokens=args.max_new_tokens, limit=args.limit, progress=False)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    ref = Path(args.reference) if args.reference else work / "reference"
    if not args.reference:
        print(f"[calibrate] reference ({args.dtype}, batch {ba}, {threads} thread(s)) -> {ref}", file=sys.stderr)
        capture(lm, args.prompts, ref, batch_size=ba, **kw)
    pairs = []
    for name, value in vary:
        out = work / (f"dtype-{value}" if name == "dtype" else name)
        t0 = time.perf_counter()
        if name == "batch":
            capture(lm, args.prompts, out, batch_size=bb, **kw)
            change = f"batch size {ba} vs {bb}"
        elif name == "threads":
            torch.set_num_threads(threads + 1)
            try:
                capture(lm, args.prompts, out, batch_size=ba, **kw)
            finally:
                torch.set_num_threads(threads)
            change = f"torch threads {threads} vs {threads + 1}"
        elif name == "mode":
            capture(lm, None, out, mode="score", reference_dump=ref, batch_size=ba, progress=False)
            change = "greedy (KV cache) vs score (one forward pass on the reference's tokens)"
        else:
            twin = load_model(args.model, dtype=value, device=args.device)
            capture(twin, None, out, mode="score", reference_dump=ref, batch_size=ba, progress=False)
            if args.layers:
                args.layer_floor = layer_floor(args, lm, twin, value)
            del twin
            change = f"precision twin: the reference model in {value}, scored on the reference's tokens"
        print(f"[calibrate] {change} -> {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        pairs.append((str(ref), str(out), change))
    return pairs


def _dtype(path: str) -> str:
    from logitparity.dump import load_dump

    return str(load_dump(path).manifest.get("dtype", "?"))


def run(args: argparse.Namespace) -> int:
    from logitparity.compare import compare_dumps
    from logitparity.floor import build_floor, write_floor

    if args.dumps and args.vary:
        raise ValueError("give either --dumps A B (existing pairs) or --vary LIST (capture them here), not both")
    if args.change and not args.dumps:
        raise ValueError("--change names the change of each --dumps pair; with --vary the changes are named for you")
    if args.layers and not (args.vary and any(n == "dtype" for n, _ in parse_vary(args.vary))):
        raise ValueError("--layers measures the reference against its precision twin: give --vary with a dtype "
                         "change, e.g. --vary mode,dtype=bf16 --layers")
    if args.layers_prompts < 1:
        raise ValueError(f"--layers-prompts must be >= 1, got {args.layers_prompts}")
    args.layer_floor = None
    if args.reference and not args.vary:
        raise ValueError("--reference is the dump that --vary varies; pass --vary LIST too")
    work = None
    if args.dumps:
        if args.change and len(args.change) != len(args.dumps):
            raise ValueError(f"--change was given {len(args.change)} time(s) for {len(args.dumps)} --dumps pair(s); "
                             "name each pair's change once, in order, or leave --change out")
        pairs = []
        for i, (a, b) in enumerate(args.dumps):
            if args.change:
                change = args.change[i]
            else:
                da, db = _dtype(a), _dtype(b)
                change = (f"precision twin: {da} vs {db}" if da != db else "two reference dumps given with --dumps")
            pairs.append((a, b, change))
    else:
        if not args.vary:  # the old default: batch size A vs B
            args.vary = "batch"
        work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="logitparity-calibrate-"))
        pairs = capture_pairs(args, work)
    try:
        comps = [(compare_dumps(a, b, decode=None, threads=args.threads), change) for a, b, change in pairs]
        floor = dataclasses.replace(build_floor(comps), layers=args.layer_floor)
    finally:
        if work is not None and not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    out = write_floor(floor, args.out)
    m = floor.metrics
    print(f"noise floor ({floor.change}; {len(floor.prompts)} prompts, {floor.n_positions} positions): "
          f"greedy match at 10 {m['greedy_match@10']:.4f}, mean KL {m['kl_ref_cand.mean']:.3e} nats, "
          f"p99 KL {m['kl_ref_cand.p99']:.3e} nats -> {out}")
    for p in floor.pairs:
        print(f"  {p.change}: {p.prompts} prompts, {p.positions} positions ({p.mode}), mean KL {p.mean_kl:.3e} nats")
    if floor.layers is not None:
        print(f"  per-module floor: {len(floor.layers['modules'])} modules ({floor.layers['description']})")
    return 0
