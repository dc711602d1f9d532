"""The ``logitparity`` command line: one module per subcommand.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``; it may set ``ERROR_EXIT`` (``gate``: 125, what
``git bisect run`` reads as "could not run"). Exit codes mean one thing each:
0 pass, 1 the candidate failed (a verdict or a gate), 2 error (bad input,
incompatible or incomplete runs, a bad environment: a full disk, an output
path that is a directory, a closed pipe). Errors print one message naming
the path and the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import Any, Callable

# name -> module; a module that is not importable is left out of --help.
SUBCOMMANDS = {
    "demo": "logitparity.cli.demo",
    "dump": "logitparity.cli.dump",
    "compare": "logitparity.cli.compare",
    "validate": "logitparity.cli.validate",
    "calibrate": "logitparity.cli.calibrate",
    "ppl": "logitparity.cli.ppl",
    "gate": "logitparity.cli.gate",
    "tasks": "logitparity.cli.tasks",
    "layers": "logitparity.cli.layers",
    "sensitivity": "logitparity.cli.sensitivity",
    "stats": "logitparity.cli.stats",
}
ERROR = 2


class UserError(Exception):
    """Bad input or incompatible runs: printed without a traceback, exit 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with the subcommand's
    error code (125 for gate, so that a typo does not mark a commit bad)."""

    error_exit = ERROR

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.print_usage(sys.stderr)
        self.exit(self.error_exit, f"{self.prog}: error: {message}\n")


class OldSpelling(argparse.Action):
    """Store the value, as argparse's default action does, for an option
    whose first name is the one to use and whose further names are old
    spellings kept for one release (``--storage``, ``--logits``): a value
    given under an old name prints a note naming the new one to stderr.
    ``add_argument("--new", "--old", dest=..., action=OldSpelling)``."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102 - argparse's hook
        new = self.option_strings[0]
        if option_string is not None and option_string != new:
            print(f"{parser.prog}: note: {option_string} is the old spelling of {new}; use {new} "
                  f"(the old one goes in the next release)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _load(name: str):
    try:
        return importlib.import_module(SUBCOMMANDS[name])
    except ModuleNotFoundError as e:
        if e.name == SUBCOMMANDS[name]:
            return None
        raise


# ---------------------------------------------------------------- model options

# The dtypes a model runs in: capture.hf.DTYPES (load_model's dtype=), written
# here so that building the parser imports no capture code; test_cli_errors.py
# checks that the two agree. Every subcommand's --dtype-like option offers these.
MODEL_DTYPES = ("fp32", "bf16", "fp16")
# How a model argument names the embedded SmolLM2-135M-Instruct (load_model(None)).
DEFAULT_MODEL = "default"


def model_arg(value: str | None) -> str | None:
    """A model argument as load_model takes it: DEFAULT_MODEL ('default') or
    nothing is None, the embedded model; a path stays as it is."""
    return None if value == DEFAULT_MODEL else value


# ---------------------------------------------------------------- torch threads


def default_torch_threads() -> int:
    """The CPUs this process may use (its affinity mask, so a container's or
    taskset's limit counts). Idle OpenMP threads sleep instead of spinning
    (OMP_WAIT_POLICY=PASSIVE, set by apply_torch_threads), which is what made
    two threads 9x slower than one on a shared 2-core machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def add_torch_threads_argument(p: argparse.ArgumentParser) -> None:
    """--torch-threads N: torch's intra-op threads for the model, distinct
    from the C++ core's --threads. One definition for every subcommand."""
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="threads torch uses to run the model (default: the CPUs this process may use, "
                        f"{default_torch_threads()} here, with idle threads sleeping: OMP_WAIT_POLICY=PASSIVE "
                        "unless set); distinct from --threads, the C++ core's")


def apply_torch_threads(args: argparse.Namespace) -> int:
    """Set torch's thread count from --torch-threads (before the first
    model runs). Without the flag, a process that already imported torch
    keeps its setting. Returns the count."""
    n = getattr(args, "torch_threads", None)
    if n is None and "torch" in sys.modules:  # called from Python (a notebook, a test): its choice stands
        import torch

        return torch.get_num_threads()
    if n is None:
        n = default_torch_threads()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"--torch-threads must be an integer >= 1, got {n!r}")
    # OpenMP reads its wait policy once, when torch loads it: set it first.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------- output files


def write_outputs(args: argparse.Namespace, markdown: str, write_json: Callable[[str], Any],
                  write_plot: Callable[[str], Any]) -> None:
    """--report MD, --json FILE and --plot PNG of the subcommands that have
    all three (layers, sensitivity, stats): each file written when asked, in
    that order; write_json and write_plot take the path."""
    from logitparity._fileio import write_text_atomic

    if args.report:
        write_text_atomic(args.report, markdown)
    if args.json:
        write_json(args.json)
    if args.plot:
        write_plot(args.plot)


# ---------------------------------------------------------------- the parser and main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="logitparity",
        description="Prove that a candidate LLM inference path produces the same outputs as its reference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        mod = _load(name)
        if mod is None:
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        p.error_exit = getattr(mod, "ERROR_EXIT", ERROR)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _error_exit=p.error_exit, _parser=p)
    return parser


_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space or write somewhere else",
    errno.EDQUOT: "the disk quota is exhausted: free space or write somewhere else",
    errno.EISDIR: "a directory is in the way: give a file path",
    errno.ENOTDIR: "a file is in the way where a directory belongs: choose another path",
    errno.EEXIST: "something is already there: choose another path",
    errno.EACCES: "permission denied: choose a path you may write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose another path",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOENT: "no such file or directory: check the path",
    errno.ELOOP: "a symbolic link is in the way (logitparity never writes through one): remove it",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def describe_os_error(e: OSError) -> str:
    """An OSError as one line: what, which path, and the fix."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    what = e.strerror or str(e)
    fix = _OS_FIXES.get(e.errno or -1, "")
    return f"{paths + ': ' if paths else ''}{what}" + (f"; {fix}" if fix else "")


def _quiet_stdout() -> None:
    """After a closed pipe: send the rest of stdout nowhere, so that the
    interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, with its exit code
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return ERROR
    fail = getattr(args, "_error_exit", ERROR)
    name = f"logitparity {args.command}"
    try:
        return int(args._run(args))
    except BrokenPipeError:
        _quiet_stdout()
        print(f"{name}: error: the output pipe was closed before the result was written "
              "(e.g. `| head`); write it to a file with --report/--json instead", file=sys.stderr)
        return fail
    except (UserError, ValueError, FileNotFoundError) as e:
        # ValueError covers UnicodeDecodeError and every input check
        msg = str(e) if not isinstance(e, UnicodeDecodeError) else f"a file is not UTF-8 text ({e})"
        if isinstance(e, FileNotFoundError) and e.filename is not None:
            msg = describe_os_error(e)
        print(f"{name}: error: {msg}", file=sys.stderr)
        return fail
    except OSError as e:
        print(f"{name}: error: {describe_os_error(e)}", file=sys.stderr)
        return fail
    except MemoryError:
        print(f"{name}: error: out of memory; use fewer prompts, a smaller --batch-size or top-K storage",
              file=sys.stderr)
        return fail
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
