"""``logitparity gate``: a ``git bisect run`` / CI oracle. Scores a candidate
model against a baseline cache and exits 0 (good: within the limits), 1
(bad), or 125 (could not run: bad arguments, a missing or incompatible cache,
a model that does not load), which ``git bisect run`` treats as "skip".

    logitparity ppl --model REF --save-baseline base/ --max-tokens 4096
    git bisect run logitparity gate --baseline-cache base/ --model CAND --max-ppl-change 0.1 --max-mean-kl 0.01
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HELP = "Bisect/CI oracle: candidate vs a baseline cache; exit 0 good, 1 bad, 125 could not run."

GOOD, BAD, SKIP = 0, 1, 125
ERROR_EXIT = SKIP  # every error, usage errors included, is "could not run" for git bisect


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Values are parsed in run(), not by argparse, so that a bad value exits 125, not 2.
    p.add_argument("--baseline-cache", metavar="DIR", help="the reference (logitparity ppl --save-baseline)")
    p.add_argument("--model", metavar="CAND", help="candidate: a Hugging Face directory or .gguf file")
    p.add_argument("--max-ppl-change", metavar="X", help="largest allowed |PPL_cand − PPL_ref| (with "
                   "--direction both, the default) in PPL units (0.1), or relative with a %% sign (1%%); flagged "
                   "only when the 95%% interval of ΔPPL excludes 0")
    p.add_argument("--direction", default=None, help="both (default: a PPL that drops is flagged too) | increase")
    p.add_argument("--max-ppl-increase", metavar="X", help="the one-sided spelling: --max-ppl-change X "
                   "--direction increase")
    p.add_argument("--max-mean-kl", metavar="X", help="largest allowed mean KL(ref ‖ cand), nats")
    p.add_argument("--dtype", default="fp32", help="candidate dtype: fp32 | bf16 | fp16")
    p.add_argument("--device", default="cpu", help="candidate device: cpu | cuda | cuda:N | auto")
    p.add_argument("--batch-size", default="1", help="windows per forward pass")
    p.add_argument("--threads", help="threads of the C++ core (default: all cores)")
    p.add_argument("--torch-threads", metavar="N", help="threads torch uses to run the candidate (default: the CPUs "
                   "this process may use, idle threads sleeping); distinct from --threads")
    p.add_argument("--json", metavar="OUT", help="write the verdict and every figure as JSON")


def parse_limit(value: str, name: str) -> tuple[float, bool]:
    """'0.1' -> (0.1, False); '1%' -> (0.01, True). Raises ValueError."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*", value)
    if not m:
        raise ValueError(f"{name} must be a non-negative number, optionally with a % sign, got {value!r}")
    x = float(m.group(1))
    return (x / 100.0, True) if m.group(2) else (x, False)


def _int(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    try:
        if not args.baseline_cache or not args.model:
            raise ValueError("--baseline-cache DIR and --model CAND are both required")
        if args.max_ppl_change is None and args.max_ppl_increase is None and args.max_mean_kl is None:
            raise ValueError("give at least one limit: --max-ppl-change X (or --max-ppl-increase X) and/or "
                             "--max-mean-kl X")
        if args.max_ppl_change is not None and args.max_ppl_increase is not None:
            raise ValueError("--max-ppl-change and --max-ppl-increase both limit ΔPPL; give one "
                             "(--max-ppl-increase X is --max-ppl-change X --direction increase)")
        if args.direction is not None and args.direction not in ("both", "increase"):
            raise ValueError(f"--direction must be both or increase, got {args.direction!r}")
        if args.max_ppl_increase is not None and args.direction == "both":
            raise ValueError("--max-ppl-increase is one-sided and contradicts --direction both; use "
                             "--max-ppl-change X --direction both")
        if args.direction is not None and args.max_ppl_change is None and args.max_ppl_increase is None:
            raise ValueError("--direction applies to --max-ppl-change X; give that limit too")
        change = args.max_ppl_change if args.max_ppl_increase is None else args.max_ppl_increase
        name = "--max-ppl-change" if args.max_ppl_increase is None else "--max-ppl-increase"
        direction = "increase" if args.max_ppl_increase is not None else (args.direction or "both")
        if change is not None:
            parse_limit(change, name)
        kl_limit = None if args.max_mean_kl is None else parse_limit(args.max_mean_kl, "--max-mean-kl")[0]
        from logitparity.cli import apply_torch_threads
        from logitparity.ppl import gate, perplexity

        args.torch_threads = _int(args.torch_threads, "--torch-threads")
        apply_torch_threads(args)

        result = perplexity(
            candidate=args.model, baseline_cache=args.baseline_cache, candidate_dtype=args.dtype,
            candidate_device=args.device, batch_size=_int(args.batch_size, "--batch-size"),
            threads=_int(args.threads, "--threads"), progress=False,
        )
    except Exception as e:  # anything that stops the measurement: skip this commit
        print(f"logitparity gate: could not run ({type(e).__name__}): {e}", file=sys.stderr)
        return SKIP
    try:
        v = gate(result, max_ppl_change=change, direction=direction, max_mean_kl=kl_limit)
    except Exception as e:  # noqa: BLE001 - a result the gate cannot judge: skip
        print(f"logitparity gate: could not run ({type(e).__name__}): {e}", file=sys.stderr)
        return SKIP
    code = GOOD if v.passed else BAD
    lines = [line.strip() for line in v.lines()[1:]]
    print(f"logitparity gate: {'GOOD' if code == GOOD else 'BAD'} ({result.settings['scored']} tokens, "
          f"cache {args.baseline_cache})")
    for line in lines:
        print(f"  {line}")
    if args.json:
        from logitparity._fileio import write_text_atomic
        from logitparity.report import jsonable

        out = {"verdict": "good" if code == GOOD else "bad", "exit_code": code, "checks": lines,
               "gate": jsonable(v.to_dict()), "result": result.to_dict()}
        write_text_atomic(Path(args.json), json.dumps(out, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return code
