"""``logitparity demo``: the whole job on the embedded default model.

Captures a reference (fp32) and a candidate (bf16) of SmolLM2-135M-Instruct
on a spread of the default prompts (round-robin over categories), calibrates
a noise floor first (the reference's greedy-vs-score difference and its
bf16 precision twin, both scored on the reference's tokens), compares them,
writes report.md (calibrated, with a task-accuracy section: both models on a
spread of the bundled multiple-choice questions), report-raw.md, report.json,
tasks.json and plots, and prints both the raw verdict (fixed thresholds) and
the calibrated one. JSON prompts get their category's token budget
(prompts.CATEGORY_BUDGETS) so their answers can close.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from logitparity.cli import add_torch_threads_argument, apply_torch_threads
from logitparity.cli.compare import summary_lines

HELP = ("Capture the default model in fp32 (reference) and bf16 (candidate), compare them, and write the "
        "report: the product in one command.")
DEFAULT_LIMIT = 18
DEFAULT_NEW_TOKENS = 32
DEFAULT_TASKS = 60  # questions, round-robin over subjects: about 10 s for both models on 2 cores


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        f"{HELP} The defaults ({DEFAULT_LIMIT} prompts, one or two per category, {DEFAULT_NEW_TOKENS} new tokens, "
        "batches of 4, one torch thread) took 63 s on a busy 2-core machine, model loading and calibration included. "
        "It calibrates a noise floor first (greedy vs score, the bf16 precision twin) and prints the raw verdict "
        "(--policy) and the calibrated one. Exit 0 when the candidate passes the calibrated verdict, 1 when it "
        "fails, 2 on errors."
    )
    p.add_argument("--out", default="logitparity-demo", help="output directory (default ./logitparity-demo)")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                   help=f"prompts, taken round-robin over the categories (default {DEFAULT_LIMIT}; the set has 85, "
                        "of which the context_limit prompt, 7124 tokens, is left out here)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS, metavar="M",
                   help=f"tokens generated per prompt (default {DEFAULT_NEW_TOKENS})")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per batch (default 4)")
    p.add_argument("--threads", type=int, default=None, help="threads of the C++ core for the comparison "
                   "(default: all cores)")
    add_torch_threads_argument(p)
    p.add_argument("--policy", default="fp16", help="the raw verdict's policy: fp16 (default), bf16, quantized, "
                   "lossless or a TOML file (the calibrated verdict judges against the noise floor)")
    p.add_argument("--top-worst", type=int, default=5, metavar="N", help="worst prompts in the report (default 5)")
    p.add_argument("--tasks", type=int, default=DEFAULT_TASKS, metavar="N",
                   help=f"multiple-choice questions for the report's task-accuracy section, round-robin over "
                        f"subjects (default {DEFAULT_TASKS}; 0 leaves it out; hf candidates only)")
    p.add_argument("--resume", action="store_true",
                   help="continue the dumps of an earlier (or interrupted) demo in --out instead of refusing "
                        "them: complete ones are reused as they are, interrupted ones captured to the end; "
                        "its settings (--limit, --max-new-tokens, --engine, ...) must be the same")
    p.add_argument("--engine", choices=("hf", "llama.cpp"), default="hf",
                   help="candidate engine: hf (bf16, default) or llama.cpp (the GGUF run natively, Q4_1)")


def spread(prompts: list, limit: int, skip: tuple[str, ...] | None = None) -> list:
    """Up to ``limit`` prompts, round-robin over categories in file order, so
    every category appears before any appears twice; categories in ``skip``
    (default prompts.HEAVY_CATEGORIES: a near-context-limit prefill takes
    minutes on a CPU) are left out."""
    from logitparity.prompts import HEAVY_CATEGORIES

    skip = HEAVY_CATEGORIES if skip is None else skip
    return _round_robin([p for p in prompts if p.category not in skip], lambda p: p.category, limit)


def _questions(n: int) -> list:
    """The first n bundled questions, round-robin over subjects."""
    from logitparity.tasks import load_questions

    return _round_robin(load_questions(None), lambda q: q.subject, n)


def _round_robin(items: list, key, limit: int) -> list:
    """Up to ``limit`` items, one of each group (by ``key``, groups in order of
    first appearance) in turn: the first of every group, then the second..."""
    by: dict[str, list] = {}
    for x in items:
        by.setdefault(key(x), []).append(x)
    out: list = []
    i = 0
    while len(out) < limit and any(i < len(v) for v in by.values()):
        out += [v[i] for v in by.values() if i < len(v)][: limit - len(out)]
        i += 1
    return out


def run(args: argparse.Namespace) -> int:
    from logitparity.capture import capture, load_model
    from logitparity.compare import compare_dumps
    from logitparity.policy import load_policy
    from logitparity.prompts import CATEGORY_BUDGETS, load_prompts
    from logitparity.report import write_report

    for name in ("limit", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tasks < 0:
        raise ValueError(f"--tasks must be >= 0 (0: no task section), got {args.tasks}")
    policy = load_policy(args.policy)  # fail early on a typo
    out = Path(args.out)
    ref_dir, cand_dir = out / "reference-fp32", out / ("candidate-bf16" if args.engine == "hf" else "candidate-llama.cpp")
    twin_dir, mode_dir, floor_path = out / "twin-bf16-scored", out / "reference-fp32-scored", out / "noise-floor.json"
    for d in (ref_dir, cand_dir, twin_dir, mode_dir):
        if d.exists() and not args.resume:
            raise ValueError(f"{d} already exists; pass --resume to continue or reuse it, another --out, "
                             "or delete it")
    prompts = spread(load_prompts(), args.limit)
    torch_threads = apply_torch_threads(args)  # the captures run here
    from logitparity.floor import build_floor, write_floor

    t0 = time.perf_counter()
    # progress bars only on a terminal, not in a log
    budgets = {c: n for c, n in CATEGORY_BUDGETS.items() if n > args.max_new_tokens} or None
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=sys.stderr.isatty(),
              category_budgets=budgets)
    questions = _questions(args.tasks) if args.tasks and args.engine == "hf" else None
    task_runs = {}
    for dtype, path in (("fp32", ref_dir), ("bf16", cand_dir)):
        if path.name == "candidate-llama.cpp":  # the same GGUF, run by llama.cpp (capture/llamacpp.py)
            from logitparity.capture.engine import load_engine

            print(f"[demo] capturing the default GGUF with llama.cpp -> {path}", file=sys.stderr)
            with load_engine("llama.cpp", None, options={"n_threads": torch_threads}) as engine:
                capture(engine, prompts, path, max_new_tokens=args.max_new_tokens, batch_size=1, progress=False,
                        category_budgets=budgets, resume=args.resume and path.exists())
            continue
        print(f"[demo] capturing the default model in {dtype} on {len(prompts)} prompts x "
              f"{args.max_new_tokens} tokens -> {path}", file=sys.stderr)
        lm = load_model(None, dtype=dtype)
        capture(lm, prompts, path, logits_dtype=dtype, resume=args.resume and path.exists(), **kw)
        # calibration: the reference engine scores the reference's tokens in
        # this dtype (fp32: greedy vs score; bf16: the precision twin)
        scored = mode_dir if dtype == "fp32" else twin_dir
        print(f"[demo] calibrating: the {dtype} model scored on the reference's tokens -> {scored}", file=sys.stderr)
        capture(lm, None, scored, mode="score", reference_dump=ref_dir, batch_size=args.batch_size,
                progress=kw["progress"], resume=args.resume and scored.exists())
        if questions is not None:
            from logitparity.tasks import run_tasks

            print(f"[demo] task accuracy: the {dtype} model on {len(questions)} multiple-choice questions",
                  file=sys.stderr)
            task_runs[dtype] = run_tasks(lm, questions, batch_size=args.batch_size, threads=args.threads)
        del lm
    # The floor: greedy vs score in fp32 and, for the bf16 candidate, the precision
    # twin. A llama.cpp (Q4_1) candidate has no twin on the reference engine:
    # its floor is fp32 alone, so the calibrated verdict asks whether it is the
    # same as fp32, which quantization is not.
    pairs = [(compare_dumps(ref_dir, mode_dir, decode=None, threads=args.threads),
              "greedy (KV cache) vs score (one forward pass), fp32")]
    if twin_dir.exists():
        pairs.append((compare_dumps(ref_dir, twin_dir, decode=None, threads=args.threads),
                      "precision twin: the reference model in bf16, scored on the reference's tokens"))
    floor = build_floor(pairs)
    write_floor(floor, floor_path)
    raw = compare_dumps(ref_dir, cand_dir, policy=policy, threads=args.threads)
    comp = compare_dumps(ref_dir, cand_dir, noise_floor=floor_path, decode=raw.decode, threads=args.threads)
    write_report(raw, out / "report-raw.md", out / "report-raw.json", None, top_worst=args.top_worst)
    written = write_report(comp, out / "report.md", out / "report.json", out / "plots", top_worst=args.top_worst)
    tasks = None
    if len(task_runs) == 2:
        import json

        from logitparity._fileio import write_text_atomic
        from logitparity.tasks import compare_tasks

        tasks = compare_tasks(task_runs["fp32"], task_runs["bf16"])
        report = Path(written["markdown"])
        write_text_atomic(report, report.read_text(encoding="utf-8") + "\n" + tasks.to_markdown())
        write_text_atomic(out / "tasks.json", json.dumps(tasks.to_dict(), indent=1, allow_nan=False) + "\n")
    print(f"Raw verdict (policy {policy.name!r}, fixed thresholds, no noise floor):")
    print("\n".join("  " + line for line in summary_lines(raw)))
    print(f"Calibrated verdict (against the noise floor {floor_path}: {floor.describe()}):")
    print("\n".join("  " + line for line in summary_lines(comp)))
    if tasks is not None:
        print(f"Task accuracy ({len(tasks.reference.questions)} questions, report section; not part of the exit code): "
              f"{tasks.verdict}: fp32 {tasks.reference.accuracy}, bf16 {tasks.candidate.accuracy}, agreement "
              f"{tasks.agreement}, McNemar b/c = {tasks.b}/{tasks.c}, p = {tasks.p_value:.3g}")
    print(f"report: {written['markdown']} (JSON {written['json']}, plots in {out / 'plots'}; raw verdict in "
          f"{out / 'report-raw.md'}); {time.perf_counter() - t0:.0f} s")
    print("The calibrated verdict decides the exit code: it judges the candidate against the reference's own "
          "noise in the candidate's dtype; the raw one applies fixed thresholds (see docs/noise-floor.md).")
    return 0 if comp.verdict.passed else 1
