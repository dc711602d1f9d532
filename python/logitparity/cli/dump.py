"""logitparity dump: capture a model on a prompt set into a dump directory."""

from __future__ import annotations

import argparse
import signal
import threading

from logitparity.cli import add_torch_threads_argument, apply_torch_threads

HELP = "capture a model's raw logits on a prompt set into a dump directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face directory or .gguf file (default: embedded SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--prompts", help="JSONL (id, category, text) or plain-text prompts file (default: embedded set)")
    parser.add_argument("--out", required=True, help="dump directory to write")
    parser.add_argument("--mode", choices=("greedy", "sample", "score"), default="greedy")
    parser.add_argument("--reference-dump", help="score mode: the dump whose generated tokens are scored")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="model dtype")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (accelerate device_map)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--logits", default="full", help="storage: full | topk:K (default full)")
    parser.add_argument("--logits-dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="dtype of full logit rows")
    parser.add_argument("--temperature", type=float, default=0.7, help="sample mode temperature")
    parser.add_argument("--top-p", type=float, default=None, help="sample mode nucleus (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="sample mode seed")
    parser.add_argument("--stop-token-id", type=int, action="append", default=[], metavar="ID",
                        help="extra stop token id (repeatable); EOS always stops")
    parser.add_argument("--no-chat-template", action="store_true", help="tokenize the raw prompt text")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="shard size bound in MiB (default 256)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted dump in --out")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N prompts")
    parser.add_argument("--truncate-prompts", action="store_true",
                        help="keep the last tokens of a prompt longer than the model's context (minus "
                             "--max-new-tokens) instead of refusing it; the record says so (truncated_from)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--engine", choices=("hf", "llama.cpp"), default="hf",
                        help="hf (transformers, default) or llama.cpp (llama-cpp-python on a .gguf; docs/engines.md)")
    parser.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="llama.cpp engine setting (repeatable): n_threads, n_ctx, n_batch, n_ubatch, "
                             "flash_attn=on|off, stop_rule=tokenizer|llama.cpp")
    add_torch_threads_argument(parser)
    parser.add_argument("--activations", choices=("stats", "rows"), default=None,
                        help="also record module activations (docs/layers.md): statistics only, or rows too")
    parser.add_argument("--activations-modules", default="layers",
                        help="layers (every decoder layer's output, default) | default | all | attention (query/key after "
                             "RoPE, value, score range) | comma-separated paths and set names (layers,attention)")
    parser.add_argument("--activations-budget", type=float, default=256.0, metavar="MB",
                        help="most MB of activation rows kept (rows mode; statistics continue past it)")
    parser.add_argument("--activations-prompts", type=int, default=None, metavar="N",
                        help="record activations of the first N prompts (default: all)")
    parser.add_argument("--activations-generated", type=int, default=0, metavar="M",
                        help="include the first M generated tokens after the prefill (default 0)")


def _terminate(signum, frame):  # SIGTERM flushes finished prompts like Ctrl-C
    raise KeyboardInterrupt


def _activations(args: argparse.Namespace, model, out) -> None:
    from logitparity.capture.hooks import capture_activations

    mods = args.activations_modules
    mods = mods if mods in ("layers", "default", "all") else [m.strip() for m in mods.split(",") if m.strip()]
    act = capture_activations(model, out, modules=mods, limit=args.activations_prompts,
                              generated=args.activations_generated, storage=args.activations,
                              budget_mb=args.activations_budget)
    print(f"activations: {act}")


def run(args: argparse.Namespace) -> int:
    from logitparity.capture import capture
    from logitparity.dump import load_dump

    if not args.shard_mb > 0:
        raise ValueError(f"--shard-mb must be > 0, got {args.shard_mb}")
    apply_torch_threads(args)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    model = args.model
    if args.activations and args.engine != "hf" and args.activations_modules != "layers":
        raise ValueError(f"--engine {args.engine} records decoder layer outputs only (its eval callback): "
                         f"--activations-modules layers, got {args.activations_modules!r}")
    if args.engine_opt and args.engine == "hf":
        raise ValueError("--engine-opt applies to --engine llama.cpp")
    if args.activations and args.engine == "hf":
        from logitparity.capture import load_model

        model = load_model(args.model, dtype=args.dtype, device=args.device)
    kw = dict(mode=args.mode, reference_dump=args.reference_dump, dtype=args.dtype, device=args.device,
              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, logits=args.logits,
              logits_dtype=args.logits_dtype, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
              stop_token_ids=args.stop_token_id, chat_template=False if args.no_chat_template else None,
              resume=args.resume, progress=not args.no_progress, limit=args.limit,
              shard_bytes=max(1, int(args.shard_mb * (1 << 20))), truncate_prompts=args.truncate_prompts)
    try:
        if args.engine == "hf":
            out = capture(model, args.prompts, args.out, **kw)
        else:  # the same driver, on the engine's own calls (capture/engine.py)
            from logitparity.capture.engine import load_engine, parse_engine_options

            with load_engine(args.engine, args.model, dtype=args.dtype, device=args.device,
                             options=parse_engine_options(args.engine_opt)) as engine:
                out = capture(engine, args.prompts, args.out, **kw)
                if args.activations:  # from the engine's own graph, while it is loaded
                    _activations(args, engine, out)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if args.activations and args.engine == "hf":
        _activations(args, model, out)
    dump = load_dump(out)
    r = dump.manifest.get("run", {})
    tokens = sum(len(rec["generated_token_ids"]) for rec in dump.records)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(
        f"dump {out}: {len(dump)} prompts, {tokens} tokens, {dump.storage} {dump.logits_dtype}, "
        f"{size / 1e6:.1f} MB; this run {r.get('prompts', 0)} prompts in {r.get('wall_s', 0):.1f} s "
        f"({r.get('tokens_per_s') or 0:.1f} tok/s), peak RSS {r.get('peak_host_rss_bytes', 0) / 2**20:.0f} MiB"
    )
    return 0
