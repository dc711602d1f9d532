"""``logitparity gate``: a ``git bisect run`` / CI oracle. Scores a candidate
model against a baseline cache and exits 0 (PASS: within the limits, which
``git bisect run`` reads as good), 1 (FAIL: bad), or 125 (could not run: bad
arguments, a missing or incompatible cache, a model that does not load), which
``git bisect run`` treats as "skip".

    logitparity ppl --model REF --save-baseline base/ --max-tokens 4096
    git bisect run logitparity gate --baseline-cache base/ --model CAND --max-ppl-change 0.1 --max-mean-kl 0.01

For an engine whose bug lives in code, not weights, the gate judges the
engine's dump against a reference dump with ``compare`` instead: the engine is
run by ``--candidate-command`` (or its dump given with ``--candidate-dump``)::

    git bisect run logitparity gate --reference-dump ref/ --noise-floor floor.json \
        --candidate-command 'cargo run --release -- --prompts {prompts} --out {out}'
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

HELP = ("Bisect/CI oracle: a candidate model vs a baseline cache (perplexity), or a candidate engine's dump vs a "
        "reference dump; exit 0 PASS (bisect: good), 1 FAIL (bad), 125 could not run (skip).")

PASS, FAIL, SKIP = 0, 1, 125  # git bisect run reads 0 as good, 1 as bad, 125 as skip
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
    g = p.add_argument_group("judging an engine's dump instead of perplexity (for engines whose bug lives in code)")
    g.add_argument("--reference-dump", metavar="REF", help="the reference dump; the candidate is judged by compare")
    g.add_argument("--candidate-dump", metavar="DIR", help="the candidate's dump")
    g.add_argument("--candidate-command", metavar="CMD",
                   help="a shell command that writes the candidate dump: {prompts} becomes a JSONL file of the "
                        "reference's prompts (id, category, text, chat_template, prompt_token_ids) and {out} the "
                        "dump directory to write (also in $LP_PROMPTS and $LP_OUT); its failure exits 125")
    g.add_argument("--work", metavar="DIR", help="where --candidate-command writes (default: a temporary directory, "
                   "removed afterwards)")
    g.add_argument("--noise-floor", metavar="FILE", help="judge against this noise floor (logitparity calibrate)")
    g.add_argument("--policy", metavar="P", help="or under this policy (fp16, bf16, quantized, lossless, a TOML file)")


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


def _engine_prompts(ref, path: Path) -> None:
    """The reference's prompts with their exact input tokens, for an engine
    without a tokenizer of its own (benchmarks/quality/example_engine.py)."""
    from logitparity._fileio import write_text_atomic

    lines = [json.dumps({"id": r["id"], "category": r["category"], "text": r["prompt"],
                         "chat_template": r["chat_template"], "prompt_token_ids": r["prompt_token_ids"]},
                        ensure_ascii=False) for r in ref.records]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def _run_dumps(args: argparse.Namespace) -> int:
    """--reference-dump: compare a candidate dump (given, or written by
    --candidate-command) with the reference; 0 pass, 1 fail, 125 could not run."""
    import shlex
    import shutil
    import subprocess
    import tempfile

    work = None
    try:
        given = [n for n in ("baseline_cache", "model", "max_ppl_change", "max_ppl_increase", "max_mean_kl",
                             "direction") if getattr(args, n) is not None]
        if given:
            raise ValueError(f"--reference-dump judges a dump by compare; {', '.join('--' + n.replace('_', '-') for n in given)} "
                             "belong to the perplexity gate: leave them out")
        if (args.candidate_dump is None) == (args.candidate_command is None):
            raise ValueError("with --reference-dump give exactly one of --candidate-dump DIR or --candidate-command CMD")
        if args.noise_floor is None and args.policy is None:
            raise ValueError("give --noise-floor FILE (preferred) or --policy P to judge the candidate dump by")
        from logitparity.compare import compare_dumps
        from logitparity.dump import load_dump

        ref = load_dump(args.reference_dump)
        cand = args.candidate_dump
        if args.candidate_command is not None:
            work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="logitparity-gate-"))
            work.mkdir(parents=True, exist_ok=True)
            prompts, out = work / "prompts.jsonl", work / "candidate"
            if out.exists():
                raise ValueError(f"{out} already exists; remove it or pass another --work")
            _engine_prompts(ref, prompts)
            cmd = args.candidate_command.replace("{prompts}", shlex.quote(str(prompts))).replace(
                "{out}", shlex.quote(str(out)))
            print(f"logitparity gate: + {cmd}", file=sys.stderr)
            env = {**os.environ, "LP_PROMPTS": str(prompts), "LP_OUT": str(out)}
            rc = subprocess.run(cmd, shell=True, env=env).returncode
            if rc != 0:
                raise RuntimeError(f"the candidate command exited {rc}")
            cand = out
        comp = compare_dumps(ref, cand, policy=args.policy, noise_floor=args.noise_floor,
                             threads=_int(args.threads, "--threads"), decode=None)
    except Exception as e:  # anything that stops the measurement: skip this commit
        print(f"logitparity gate: could not run ({type(e).__name__}): {e}", file=sys.stderr)
        return SKIP
    finally:
        if work is not None and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    v = comp.verdict
    code = PASS if v.passed else FAIL
    print(f"logitparity gate: {'PASS' if code == PASS else 'FAIL'} ({len(comp.prompts)} prompts, "
          f"{len(comp.tokens)} positions, {comp.mode}, reference {args.reference_dump})")
    for line in v.lines()[1:]:
        print(f"  {line.strip()}")
    if args.json:
        from logitparity._fileio import write_text_atomic
        from logitparity.report import comparison_dict

        out = {"verdict": "PASS" if code == PASS else "FAIL", "exit_code": code, "comparison": comparison_dict(comp)}
        write_text_atomic(Path(args.json), json.dumps(out, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return code


def run(args: argparse.Namespace) -> int:
    if args.reference_dump is not None:
        return _run_dumps(args)
    try:
        if args.candidate_dump or args.candidate_command or args.noise_floor or args.policy:
            raise ValueError("--candidate-dump, --candidate-command, --noise-floor and --policy judge a dump: "
                             "give --reference-dump REF with them")
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
    code = PASS if v.passed else FAIL
    lines = [line.strip() for line in v.lines()[1:]]
    print(f"logitparity gate: {'PASS' if code == PASS else 'FAIL'} ({result.settings['scored']} tokens, "
          f"cache {args.baseline_cache})")
    for line in lines:
        print(f"  {line}")
    if args.json:
        from logitparity._fileio import write_text_atomic
        from logitparity.report import jsonable

        out = {"verdict": "PASS" if code == PASS else "FAIL", "exit_code": code, "checks": lines,
               "gate": jsonable(v.to_dict()), "result": result.to_dict()}
        write_text_atomic(Path(args.json), json.dumps(out, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return code
