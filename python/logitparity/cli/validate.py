"""``logitparity validate DUMP``: check a dump against docs/dump-format.md
and list every violation (file, record, field, expected, found); exit 0
when there is none, 2 otherwise. For engine authors writing dumps in any
language. ``--against REF`` adds the compatibility checks ``compare`` makes,
as a pre-flight before a long capture (the dump may hold only its manifest).
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "Check a dump against the format spec and list every violation (exit 0 valid, 2 not); --against REF: compatibility."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dump", metavar="DUMP", help="dump directory to check")
    p.add_argument("--against", metavar="REF", default=None,
                   help="reference dump: also check that `compare REF DUMP` would accept the pair")
    p.add_argument("--errors-only", action="store_true",
                   help="report only what readers refuse (not the 'spec' findings a reader copes with)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the violations as JSON ('-' prints them)")


def run(args: argparse.Namespace) -> int:
    from logitparity._fileio import write_text_atomic
    from logitparity.validate import validate_dump

    found = validate_dump(args.dump, against=args.against)
    if args.errors_only:
        found = [v for v in found if v.level == "error"]
    if args.json:
        data = json.dumps({"dump": args.dump, "against": args.against, "valid": not found,
                           "violations": [v.__dict__ for v in found]}, indent=1, ensure_ascii=False) + "\n"
        if args.json == "-":
            sys.stdout.write(data)
        else:
            write_text_atomic(args.json, data)
    out = sys.stderr if args.json == "-" else sys.stdout
    for v in found:
        print(f"{v.level}: {v}", file=out)
    n_err = sum(v.level == "error" for v in found)
    what = f"{args.dump}" + (f" against {args.against}" if args.against else "")
    if found:
        print(f"{what}: {len(found)} violation{'s' if len(found) != 1 else ''} ({n_err} that readers refuse, "
              f"{len(found) - n_err} of the spec); docs/dump-format.md states each rule", file=out)
        return 2
    print(f"{what}: valid", file=out)
    return 0
