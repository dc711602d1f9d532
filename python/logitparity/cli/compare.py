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
    p.add_argument("--candidate-on-reference", metavar="DIR", default=None,
                   help="sampled runs: the candidate scored on the reference's samples (dump --mode score "
                        "--reference-dump REF with the candidate model), so the reference's whole path is compared")
    p.add_argument("--reference-on-candidate", metavar="DIR", default=None,
                   help="sampled runs: the reference scored on the candidate's samples")
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
            lines.append(f"  {label} match at {n}: {comp.greedy_match(n)}" + ("" if comp.sampled else
                         f"; real divergence before {n}: {comp.real_divergence(n)}"))
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


def _sampled(path) -> bool:
    """A sample set, or a dump whose decoding mode is sample."""
    import json
    from pathlib import Path

    from logitparity.sampling import is_sample_set

    if is_sample_set(path):
        return True
    try:
        m = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # compare_dumps reports what is wrong with it
    return isinstance(m, dict) and isinstance(m.get("decoding"), dict) and m["decoding"].get("mode") == "sample"


def sampled_summary_lines(sc) -> list[str]:
    v = sc.verdict
    lines = [f"INCOMPLETE (--allow-partial): {why}" for why in sc.incomplete]
    lines += [f"{'PASS' if v.passed else 'FAIL'}: policy {v.policy!r}, {len(sc.units)} (prompt, seed) pairs over seeds "
              f"{', '.join(map(str, sc.seeds))}, {len(sc.token_path)} compared positions (sampled, T={sc.temperature:g}, "
              f"top-p {sc.top_p})"]
    for r in v.results:
        meas = "not measured" if r.measured != r.measured else f"{r.measured:.4g}"
        lines.append(f"  {'ok  ' if r.passed else 'FAIL'} {r.metric} = {meas} (limit {r.comparison} {r.limit:.4g})"
                     + (f" [{r.note}]" if r.note else ""))
    for n in sc.n_values:
        lines.append(f"  sampled match at {n}: {sc.sampled_match(n)}")
    for note in sc.notes:
        lines.append(f"  note: {note}")
    return lines


def _run_sampled(args: argparse.Namespace) -> int:
    from logitparity._fileio import write_text_atomic
    from logitparity.sampling import compare_sampled

    if args.noise_floor or args.continuation or args.factor is not None or args.confidence is not None or args.plots:
        raise ValueError("sampled runs are judged by a policy (default 'sampled'): --noise-floor, --continuation, "
                         "--factor, --confidence and --plots apply to greedy or teacher-forced runs; pass "
                         "--candidate-on-reference / --reference-on-candidate for the cross-scored paths")
    sc = compare_sampled(args.ref, args.cand, cand_on_ref=args.candidate_on_reference,
                         ref_on_cand=args.reference_on_candidate, policy=args.policy, threads=args.threads,
                         max_positions=args.max_positions, allow_partial=args.allow_partial)
    out = sys.stderr if args.report == "-" else sys.stdout
    print("\n".join(sampled_summary_lines(sc)), file=out)
    if args.report == "-":
        print(sc.to_markdown())
    elif args.report:
        write_text_atomic(args.report, sc.to_markdown())
        print(f"wrote {args.report}", file=sys.stderr)
    if args.json:
        import json

        write_text_atomic(args.json, json.dumps(sc.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if sc.verdict.passed else 1


def run(args: argparse.Namespace) -> int:
    from logitparity.distributed import barrier, broadcast, compare_ranks, launched

    if _sampled(args.ref) and _sampled(args.cand):
        return _run_sampled(args)
    if args.candidate_on_reference or args.reference_on_candidate:
        raise ValueError("--candidate-on-reference and --reference-on-candidate are for sampled runs (both REF and "
                         "CAND sampled: dump --mode sample); for greedy runs use --continuation")

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
