"""``logitparity compare REF CAND``: verdict and report for two dumps."""

from __future__ import annotations

import argparse
import sys

HELP = "Compare a candidate dump with a reference dump: verdict (exit 0 pass, 1 fail, 2 error) and report."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", metavar="REF", help="reference dump directory")
    p.add_argument("cand", metavar="CAND", help="candidate dump directory")
    add_report_arguments(p)
    p.add_argument("--policy", default=None,
                   help="built-in policy (fp16, bf16, quantized, lossless) or a TOML file (default: fp16 without "
                        "--noise-floor; with it, the statistical verdict against the floor)")
    p.add_argument("--noise-floor", metavar="FILE", default=None,
                   help="noise-floor file from `logitparity calibrate`: without --policy (or with a built-in one) "
                        "the candidate is judged against it, paired by position; a TOML policy uses it for "
                        "noise_factor thresholds")
    p.add_argument("--factor", type=float, default=None, metavar="F",
                   help="with --noise-floor: FAIL when the candidate is worse than F x its floor (default 2)")
    p.add_argument("--confidence", type=float, default=None, metavar="C",
                   help="with --noise-floor: confidence of the test (default 0.95)")
    p.add_argument("--continuation", metavar="CAND_TF", default=None,
                   help="a score-mode dump of the candidate on the reference's tokens: past each free-running "
                        "split the comparison continues teacher-forced with it")
    p.add_argument("--near-tie-margin", type=float, default=0.5, metavar="X",
                   help="a split where the reference's top-1 minus top-2 logit is below X is a near-tie (default 0.5)")
    p.add_argument("--max-positions", type=int, default=None, metavar="N",
                   help="compare at most the first N positions of each prompt")
    p.add_argument("--threads", type=int, default=None, help="core threads (default: all cores)")
    p.add_argument("--allow-partial", action="store_true",
                   help="judge a run marked incomplete, or prompts missing on one side (default: exit 2); "
                        "the report then says INCOMPLETE first")


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """--report/--json/--plots/--top-worst, shared with `demo`."""
    p.add_argument("--report", metavar="FILE.md", default=None, help="write the markdown report ('-' prints it)")
    p.add_argument("--json", metavar="FILE.json", default=None, help="write every number as JSON")
    p.add_argument("--plots", metavar="DIR", default=None, help="write PNG plots into DIR")
    p.add_argument("--top-worst", type=int, default=5, metavar="N", help="worst prompts shown in the report (default 5)")


def summary_lines(comp) -> list[str]:
    """A few lines for the terminal: verdict, thresholds, key figures."""
    v = comp.verdict
    lines = [f"INCOMPLETE (--allow-partial): {why}" for why in getattr(comp, "incomplete", [])]
    lines += [f"{'PASS' if v.passed else 'FAIL'}: policy {v.policy!r}, {len(comp.prompts)} prompts, "
             f"{len(comp.tokens)} compared positions ({comp.mode})"]
    if comp.floor_judgement is not None:
        j = comp.floor_judgement
        lines.append(f"  noise floor {comp.noise.source}: {comp.noise.describe()}")
        lines.append(f"  paired {j.positions} positions over {j.prompts} prompts ({j.unpaired} without a floor value); "
                     f"top-1 changed: candidate {j.top1_cand}, floor {j.top1_floor}")
    for r in v.results:
        meas = "not measured" if r.measured != r.measured else f"{r.measured:.4g}"
        lines.append(f"  {'ok  ' if r.passed else 'FAIL'} {r.metric} = {meas} (limit {r.comparison} {r.limit:.4g})"
                     + (f" [{r.note}]" if r.note else ""))
    if comp.free_running_available:
        label = comp.match_label
        for n in comp.n_values:
            lines.append(f"  {label} match at {n}: {comp.greedy_match(n)}; real divergence before {n}: "
                         f"{comp.real_divergence(n)}")
    for note in comp.notes:
        lines.append(f"  note: {note}")
    return lines


def write_outputs(comp, args) -> None:
    from logitparity.report import render_markdown, write_report

    if args.top_worst < 0:
        raise ValueError(f"--top-worst must be >= 0, got {args.top_worst}")
    md = None if args.report in (None, "-") else args.report
    written = write_report(comp, md, args.json, args.plots, top_worst=args.top_worst)
    if args.report == "-":
        print(render_markdown(comp, top_worst=args.top_worst))
    for key in ("markdown", "json"):
        if written[key]:
            print(f"wrote {written[key]}", file=sys.stderr)
    if written["plots"]:
        print(f"wrote {len(written['plots'])} plots into {args.plots}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from logitparity.distributed import barrier, broadcast, compare_ranks, launched

    comp = compare_ranks(  # one process, or split across torchrun's ranks (docs/distributed.md)
        args.ref, args.cand, policy=args.policy, noise_floor=args.noise_floor,
        near_tie_margin=args.near_tie_margin, threads=args.threads, max_positions=args.max_positions,
        allow_partial=args.allow_partial,
        continuation=args.continuation, factor=args.factor, confidence=args.confidence,
    )
    if comp is None:  # another rank of a distributed comparison: rank 0 reports; the same exit code
        code = broadcast(None)
        barrier()
        return code
    code = 0 if comp.verdict.passed else 1
    if launched():
        broadcast(code)
    out = sys.stderr if args.report == "-" else sys.stdout
    print("\n".join(summary_lines(comp)), file=out)
    try:
        write_outputs(comp, args)
    finally:
        barrier()
    return code
