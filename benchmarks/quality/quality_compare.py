#!/usr/bin/env python3
"""Compare a candidate dump with a reference dump and write the markdown
report (plus JSON and plots when asked). Exit 0 pass, 1 fail, 2 error.

    python benchmarks/quality/quality_compare.py REF_DUMP CAND_DUMP \
        [--report report.md] [--json report.json] [--plots DIR] [--policy fp16|quantized|lossless|FILE]

A thin script over ``logitparity.compare_dumps`` and
``logitparity.report.write_report`` (the same as ``logitparity compare``).
"""

from __future__ import annotations

import argparse
import sys

from logitparity.compare import compare_dumps
from logitparity.report import write_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", help="reference dump directory")
    ap.add_argument("cand", help="candidate dump directory")
    ap.add_argument("--report", default="report.md", help="markdown report path (default report.md)")
    ap.add_argument("--json", default=None, help="JSON with every number")
    ap.add_argument("--plots", default=None, help="directory for PNG plots")
    ap.add_argument("--policy", default="fp16", help="fp16 (default), quantized, lossless or a TOML file")
    ap.add_argument("--noise-floor", default=None, help="noise-floor file from `logitparity calibrate`")
    ap.add_argument("--top-worst", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        comp = compare_dumps(args.ref, args.cand, policy=args.policy, noise_floor=args.noise_floor)
    except (ValueError, FileNotFoundError) as e:
        print(f"quality_compare: error: {e}", file=sys.stderr)
        return 2
    written = write_report(comp, args.report, args.json, args.plots, top_worst=args.top_worst)
    print(comp.verdict)
    print(f"report: {written['markdown']}")
    return 0 if comp.verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
