"""logitparity dump: capture a model on a prompt set into a dump directory."""

from __future__ import annotations

import argparse
import signal
import threading

from logitparity.cli import MODEL_DTYPES, OldSpelling, UserError, add_torch_threads_argument, apply_torch_threads

HELP = "capture a model's raw logits on a prompt set into a dump directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face directory or .gguf file (default: embedded SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--prompts", help="JSONL (id, category, text) or plain-text prompts file (default: embedded set)")
    parser.add_argument("--out", required=True, help="dump directory to write")
    parser.add_argument("--mode", choices=("greedy", "sample", "score"), default="greedy")
    parser.add_argument("--reference-dump", help="score mode: the dump whose generated tokens are scored")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default="fp32", help="model dtype")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (accelerate device_map)")
    parser.add_argument("--device-map", default=None, metavar="SPEC",
                        help="accelerate placement for a model larger than one device: auto | balanced | "
                             "balanced_low_0 | sequential | a JSON file {module: device} (device: a GPU index, "
                             "cpu or disk); docs/distributed.md")
    parser.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                        help="with --device-map STRATEGY: the most it places per device, e.g. 0=20GiB,cpu=64GiB")
    parser.add_argument("--offload-folder", default=None, metavar="DIR",
                        help="where the weights of modules placed on 'disk' live")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--category-budget", action="append", default=[], metavar="CATEGORY=N",
                        help="new-token budget of one prompt category instead of --max-new-tokens (repeatable), "
                             "e.g. json=96 so JSON answers can close")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--storage", "--logits", dest="storage", default="full", metavar="full|topk:K",
                        action=OldSpelling,
                        help="what the dump keeps of each logit row: full rows, or the top K with the exact "
                             "log-sum-exp and tail mass (default full; --logits is the old name)")
    parser.add_argument("--logits-dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="dtype of full logit rows")
    parser.add_argument("--temperature", type=float, default=0.7, help="sample mode temperature")
    parser.add_argument("--top-p", type=float, default=None, help="sample mode nucleus (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="sample mode seed")
    parser.add_argument("--seeds", default=None, metavar="LIST",
                        help="sample mode: one dump per seed (0,1,2 or 0-3) under --out, with a samples.json index "
                             "(a sample set for compare; docs/report.md)")
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
    parser.add_argument("--rank", type=int, default=None, metavar="R",
                        help="data-parallel capture without torchrun: capture rank R's share (resume one killed "
                             "rank alone; docs/distributed.md); under torchrun the rank comes from it")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --rank: the number of ranks of the data-parallel capture")
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


def parse_budgets(items: list[str]) -> dict[str, int]:
    """['json=96', ...] -> {'json': 96}."""
    out: dict[str, int] = {}
    for item in items:
        cat, sep, n = item.partition("=")
        try:
            value = int(n)
        except ValueError:
            value = 0
        if not sep or not cat.strip() or value < 1:
            raise ValueError(f"--category-budget must be CATEGORY=N with N >= 1 new tokens, got {item!r}")
        out[cat.strip()] = value
    return out


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


def _is_sample_set(path) -> bool:
    from logitparity.sampling import is_sample_set

    return path is not None and is_sample_set(path)


def _sample_set(args: argparse.Namespace, model, kw: dict) -> int:
    """--seeds (one sampled dump per seed) or score mode on a sample set."""
    from logitparity.capture.seeds import capture_samples, parse_seeds, score_samples

    if args.engine != "hf" or args.activations:
        raise ValueError("--seeds and scoring a sample set run on --engine hf without --activations")
    if args.seeds is not None:
        if args.mode != "sample":
            raise ValueError(f"--seeds needs --mode sample (one sampled dump per seed), got --mode {args.mode}")
        kw = {k: v for k, v in kw.items() if k not in ("mode", "seed", "reference_dump")}
        out = capture_samples(model, args.prompts, args.out, seeds=parse_seeds(args.seeds), **kw)
        what = "sampled"
    else:
        if args.mode != "score":
            raise ValueError(f"--reference-dump {args.reference_dump} is a sample set: score it with --mode score")
        kw = {k: v for k, v in kw.items() if k not in ("mode", "reference_dump", "temperature", "top_p", "seed",
                                                       "max_new_tokens", "category_budgets")}
        out = score_samples(model, args.reference_dump, args.out, **kw)
        what = "scored"
    print(f"sample set {out}: {what}, one dump per seed (samples.json)")
    return 0


def run(args: argparse.Namespace) -> int:
    from logitparity.capture import capture

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
    from logitparity.distributed import launched

    env = launched()
    distributed = env is not None or args.rank is not None or args.world_size is not None
    placed = args.device_map is not None or args.max_memory is not None or args.offload_folder is not None
    if placed and (distributed or args.engine != "hf"):
        raise ValueError("--device-map/--max-memory/--offload-folder place one model across devices with "
                         "--engine hf in a one-process run (not under torchrun or --rank)")
    if placed:
        from logitparity.capture import load_model
        from logitparity.capture.hf import parse_device_map, parse_max_memory

        model = load_model(args.model, dtype=args.dtype, device=args.device,
                           device_map=None if args.device_map is None else parse_device_map(args.device_map),
                           max_memory=None if args.max_memory is None else parse_max_memory(args.max_memory),
                           offload_folder=args.offload_folder)
    elif args.activations and args.engine == "hf" and not distributed:
        from logitparity.capture import load_model

        model = load_model(args.model, dtype=args.dtype, device=args.device)
    kw = dict(mode=args.mode, reference_dump=args.reference_dump, dtype=args.dtype, device=args.device,
              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
              category_budgets=parse_budgets(args.category_budget) or None, storage=args.storage,
              logits_dtype=args.logits_dtype, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
              stop_token_ids=args.stop_token_id, chat_template=False if args.no_chat_template else None,
              resume=args.resume, progress=not args.no_progress, limit=args.limit,
              shard_bytes=max(1, int(args.shard_mb * (1 << 20))), truncate_prompts=args.truncate_prompts)
    if distributed:
        if args.seeds is not None or _is_sample_set(args.reference_dump):
            raise UserError("a sample set (--seeds, or scoring one) is not captured under torchrun; run one "
                            "process (each seed is one dump), or one torchrun per seed with --seed S")
        try:
            return _run_ranks(args, kw, env)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
    if args.seeds is not None or _is_sample_set(args.reference_dump):
        return _sample_set(args, model, kw)
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
    _summary(out)
    return 0


def _run_ranks(args: argparse.Namespace, kw: dict, env) -> int:
    """A data-parallel capture (torchrun, or one rank by --rank/--world-size)."""
    from logitparity.distributed import capture_ranks, say

    if env is None and (args.rank is None or args.world_size is None):
        raise ValueError("--rank and --world-size go together (one rank of a data-parallel capture, "
                         f"docs/distributed.md), got --rank {args.rank} --world-size {args.world_size}")
    if args.activations:
        raise ValueError("--activations is not supported in a data-parallel capture; record activations with "
                         "a one-process run (logitparity dump --activations on the same prompts)")
    device = args.device
    if device == "auto":
        raise ValueError("--device auto spreads one model over every GPU, which a data-parallel rank must not do; "
                         "use --device cuda (rank r runs on cuda:LOCAL_RANK) or cpu")
    if device == "cuda" and env is not None:
        device = f"cuda:{env[2]}"
    kw = {**kw, "device": device}
    where = dict(rank=args.rank, world_size=args.world_size)
    if args.engine == "hf":
        outcome = capture_ranks(args.model, args.prompts, args.out, **where, **kw)
    else:
        from logitparity.capture.engine import load_engine, parse_engine_options

        with load_engine(args.engine, args.model, dtype=args.dtype, device=device,
                         options=parse_engine_options(args.engine_opt)) as engine:
            outcome = capture_ranks(engine, args.prompts, args.out, **where, **kw)
    if outcome.merged is not None:
        say(f"merged the {outcome.world_size} ranks' parts into {outcome.merged}")
        _summary(outcome.merged)
    elif outcome.pending:
        say(f"part {outcome.part} is complete; the merge into {args.out} waits for rank(s) {outcome.pending} "
            f"(run each with --resume --rank R --world-size {outcome.world_size})")
    return 0


def _summary(out) -> None:
    from logitparity.dump import load_dump

    dump = load_dump(out)
    r = dump.manifest.get("run", {})
    tokens = sum(len(rec["generated_token_ids"]) for rec in dump.records)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(
        f"dump {out}: {len(dump)} prompts, {tokens} tokens, {dump.storage} {dump.logits_dtype}, "
        f"{size / 1e6:.1f} MB; this run {r.get('prompts', 0)} prompts in {r.get('wall_s', 0):.1f} s "
        f"({r.get('tokens_per_s') or 0:.1f} tok/s), peak RSS {(r.get('peak_host_rss_bytes') or 0) / 2**20:.0f} MiB"
    )
