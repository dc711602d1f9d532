"""``logitparity ppl``: perplexity of a reference on a text and, with
--candidate, the candidate's PPL ratio, ΔPPL and corpus-level KL."""

from __future__ import annotations

import argparse
import sys

from logitparity.cli import (DEFAULT_MODEL, MODEL_DTYPES, OldSpelling, UserError,
                             add_torch_threads_argument, apply_torch_threads, model_arg)

HELP = "Perplexity on a text (sliding windows); with --candidate also PPL ratio, ΔPPL and KL in both directions."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="REF", help="reference: a Hugging Face directory or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct); leave out with --baseline-cache")
    p.add_argument("--candidate", metavar="CAND", help="candidate model (directory or .gguf)")
    p.add_argument("--text-file", "--text", dest="text_file", metavar="FILE", action=OldSpelling,
                   help="UTF-8 text to score (default: the bundled public-domain corpus, Pride and Prejudice "
                   "chapters 1-10); as `sensitivity --text-file` and perplexity(text_file=...); --text is the old name")
    p.add_argument("--ctx", type=int, help="input positions per window, BOS included (default 512, "
                   "or the baseline cache's)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default ctx//2, or the cache's)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="fp32", help="reference dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="reference device: cpu | cuda | cuda:N | auto")
    p.add_argument("--candidate-dtype", choices=MODEL_DTYPES, help="candidate dtype (default: --dtype)")
    p.add_argument("--candidate-device", help="candidate device (default: --device)")
    p.add_argument("--baseline-cache", metavar="DIR", help="read the reference from this baseline cache")
    p.add_argument("--save-baseline", metavar="DIR", help="save the reference's rows as a baseline cache")
    p.add_argument("--storage", metavar="full|topk:K", help="what --save-baseline keeps of each row: full "
                   "log-probs (default) or the top K logits + tail mass (KL then becomes a lower bound); the "
                   "same values as `dump --storage`")
    p.add_argument("--cache-topk", type=int, metavar="K", help="the old spelling of --storage topk:K")
    p.add_argument("--cache-dtype", choices=("fp32", "bf16", "fp16"), default="fp16",
                   help="dtype of cached full log-probs")
    p.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens of the text")
    p.add_argument("--no-bos", action="store_true", help="do not start windows with the tokenizer's BOS token")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples for ΔPPL (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--threads", type=int, help="threads of the C++ core (default: all cores)")
    add_torch_threads_argument(p)
    p.add_argument("--json", metavar="OUT", help="write every figure as JSON")
    p.add_argument("--report", metavar="OUT", help="write the markdown report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--windows", choices=("hf", "llama.cpp"), default="hf",
                   help="hf: sliding windows (default); llama.cpp: llama-perplexity's disjoint chunks, "
                        "second half scored")
    p.add_argument("--score-from", type=int, metavar="K", help="--windows llama.cpp: first scored chunk "
                   "position (default ctx/2)")
    p.add_argument("--engine", choices=("hf", "llama.cpp"), default="hf",
                   help="engine of the reference (hf default; llama.cpp runs the .gguf natively)")
    p.add_argument("--candidate-engine", choices=("hf", "llama.cpp"), help="engine of the candidate "
                   "(default: --engine)")
    p.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="llama.cpp engine setting (repeatable): n_threads, n_ctx, n_batch, flash_attn=on|off")


def run(args: argparse.Namespace) -> int:
    from logitparity.ppl import perplexity

    storage = _storage(args)
    if args.text_file is not None:  # fail before any model loads, naming the file
        _check_text_file(args.text_file)
    apply_torch_threads(args)
    model, candidate = _engines(args)
    result = perplexity(
        model, text_file=args.text_file, candidate=candidate, ctx=args.ctx, stride=args.stride,
        batch_size=args.batch_size, dtype=args.dtype, device=args.device,
        candidate_dtype=args.candidate_dtype, candidate_device=args.candidate_device,
        baseline_cache=args.baseline_cache, save_baseline=args.save_baseline, storage=storage,
        cache_dtype=args.cache_dtype, max_tokens=args.max_tokens,
        add_bos=False if args.no_bos else None, bootstrap=args.bootstrap, seed=args.seed,
        threads=args.threads, progress=not args.no_progress and sys.stderr.isatty(),
        windows=args.windows, score_from=args.score_from,
    )
    md = result.to_markdown()
    print(md, end="")
    if args.json:
        result.write_json(args.json)
    if args.report:
        result.write_markdown(args.report)
    return 0


def _engines(args: argparse.Namespace):
    """--model / --candidate as paths (hf) or loaded llama.cpp engines. With
    --candidate-engine and no --candidate, the candidate is the reference's
    model file run by the other engine (the default model when neither is
    given: its GGUF for llama.cpp, its fp32 conversion for hf)."""
    from logitparity.capture.engine import load_engine, parse_engine_options

    cand_engine = args.candidate_engine or args.engine
    if "llama.cpp" not in (args.engine, cand_engine):
        if args.engine_opt:
            raise ValueError("--engine-opt applies to --engine llama.cpp / --candidate-engine llama.cpp")
        return args.model, args.candidate
    if args.baseline_cache and args.engine == "llama.cpp":
        raise ValueError("--engine llama.cpp runs the reference live; leave out --baseline-cache")
    opts = parse_engine_options(args.engine_opt)
    opts.setdefault("n_ctx", max(args.ctx or 512, 512))

    def side(engine: str, path, candidate: bool = False):
        if engine == "llama.cpp":
            return load_engine("llama.cpp", path, options=opts)
        if path is None and candidate:  # for the reference, None already means the default model
            from logitparity.models import default_model_dir

            return str(default_model_dir())
        return path

    model = side(args.engine, args.model) if not args.baseline_cache else None
    candidate = args.candidate
    if candidate is None and args.candidate_engine is not None:
        candidate = args.model if args.model is not None else DEFAULT_MODEL
    if candidate is not None:
        candidate = side(cand_engine, model_arg(candidate), candidate=True)
    return model, candidate
def _check_text_file(path: str) -> None:
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--text-file {p} is a directory; pass a UTF-8 text file")
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"--text-file {p} does not exist; pass a UTF-8 text file (or leave it out for the bundled corpus)") from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text-file {p} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                         "convert it, e.g. iconv -f latin1 -t utf-8") from None


def _storage(args) -> str:
    """--storage full|topk:K (or the old --cache-topk K) -> the storage
    string of ``perplexity(storage=...)``, checked here so the message names
    the option."""
    from logitparity.dump import parse_storage

    if args.storage is not None and args.cache_topk is not None:
        raise UserError(f"--storage {args.storage} and --cache-topk {args.cache_topk} both set the cache's storage; "
                        "pass only --storage")
    storage = args.storage if args.storage is not None else (
        "full" if args.cache_topk is None else f"topk:{args.cache_topk}")
    try:
        parse_storage(storage)
    except ValueError as e:
        raise UserError(f"--storage: {e}" if args.storage is not None else
                        f"--cache-topk must be >= 1, got {args.cache_topk}; use --storage topk:K") from None
    if args.cache_topk is not None:
        print(f"logitparity ppl: note: --cache-topk {args.cache_topk} is the old spelling of --storage {storage}; "
              f"use --storage {storage} (the old one goes in the next release)", file=sys.stderr)
    return storage

