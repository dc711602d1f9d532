"""The ``logitparity`` command line: one module per subcommand.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Exit codes: 0 pass, 1 fail (a verdict or a gate), 2
error (bad input, incompatible runs). ``gate`` also uses 125 for "could not
run", as ``git bisect run`` expects.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module; a module that is not importable is left out of --help.
SUBCOMMANDS = {
    "demo": "logitparity.cli.demo",
    "dump": "logitparity.cli.dump",
    "compare": "logitparity.cli.compare",
    "calibrate": "logitparity.cli.calibrate",
    "ppl": "logitparity.cli.ppl",
    "gate": "logitparity.cli.gate",
    "layers": "logitparity.cli.layers",
}


class UserError(Exception):
    """Bad input or incompatible runs: printed without a traceback, exit 2."""


def _load(name: str):
    try:
        return importlib.import_module(SUBCOMMANDS[name])
    except ModuleNotFoundError as e:
        if e.name == SUBCOMMANDS[name]:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logitparity",
        description="Prove that a candidate LLM inference path produces the same outputs as its reference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        mod = _load(name)
        if mod is None:
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args))
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"logitparity {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"logitparity {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
