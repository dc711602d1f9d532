"""``logitparity tasks``: multiple-choice accuracy of a reference and a
candidate on the same questions, paired (answer agreement, exact McNemar)."""

from __future__ import annotations

import argparse
import json

from logitparity.cli import MODEL_DTYPES

HELP = "Multiple-choice task accuracy of reference and candidate (log-likelihood scoring), paired McNemar test."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="REF", help="reference: a Hugging Face directory or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--candidate", metavar="CAND", help="candidate model (default: the reference's files)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="fp32", help="reference dtype (default fp32)")
    p.add_argument("--candidate-dtype", choices=MODEL_DTYPES, help="candidate dtype (default: --dtype)")
    p.add_argument("--device", default="cpu", help="device of both models (default cpu)")
    p.add_argument("--tasks", metavar="FILE", help="questions: JSONL in the MMLU layout (question, choices, "
                   "answer, subject) or an MMLU CSV file (default: the bundled generated set, 200 questions)")
    p.add_argument("--subjects", metavar="A,B", help="only these subjects (comma-separated)")
    p.add_argument("--limit", type=int, metavar="N", help="first N questions")
    p.add_argument("--scoring", choices=("text", "letter"), default="text",
                   help="text: log-likelihood of each choice's text (default); letter: lm-eval's MMLU prompt "
                   "with lettered choices, the letter scored")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--alpha", type=float, default=0.05, help="McNemar significance level (default 0.05)")
    p.add_argument("--max-drop", type=float, default=0.0, metavar="X",
                   help="accuracy drop (a fraction) tolerated before a significant drop fails (default 0)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads for the models (default 1)")
    p.add_argument("--threads", type=int, help="threads of the C++ core (default: all cores)")
    p.add_argument("--json", metavar="OUT", help="write every figure (and every answer) as JSON")
    p.add_argument("--report", metavar="OUT", help="write the markdown report")


def run(args: argparse.Namespace) -> int:
    from logitparity._fileio import write_text_atomic
    from logitparity.tasks import compare_tasks, load_questions, run_tasks

    if args.candidate is None and args.candidate_dtype in (None, args.dtype):
        raise ValueError("nothing to compare: the candidate is the reference (same files, same dtype); "
                         "pass --candidate CAND and/or --candidate-dtype bf16|fp16")
    if args.torch_threads < 1:
        raise ValueError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    subjects = [s for s in args.subjects.split(",") if s] if args.subjects else None
    questions = load_questions(args.tasks, limit=args.limit, subjects=subjects)
    import torch

    torch.set_num_threads(args.torch_threads)
    kw = dict(scoring=args.scoring, device=args.device, batch_size=args.batch_size, threads=args.threads)
    ref = run_tasks(args.model, questions, dtype=args.dtype, **kw)
    cand = run_tasks(args.candidate if args.candidate is not None else args.model, questions,
                     dtype=args.candidate_dtype or args.dtype, **kw)
    result = compare_tasks(ref, cand, alpha=args.alpha, max_drop=args.max_drop)
    md = result.to_markdown()
    print(md, end="")
    if args.json:
        write_text_atomic(args.json, json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n")
    if args.report:
        write_text_atomic(args.report, md)
    return 0 if result.passed else 1
