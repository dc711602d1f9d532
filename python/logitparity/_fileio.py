"""File writes shared by every module that writes results.

``write_text_atomic``: a file is either the old one or the complete new one,
never a torn mix. ``append_text``: one write appended to a file, synced.
``read_tagged_json``: the one reader of every JSON file logitparity tags with
a format and a version (dump, activations and baseline-cache manifests, noise
and layer floors), with one message per failure.
Neither follows a symbolic link: the temporary file is created exclusively
(O_EXCL | O_NOFOLLOW), the rename replaces a link at the target instead of
writing through it, and appends refuse a link (O_NOFOLLOW), so a hostile
directory cannot redirect a write to a file elsewhere. Errors are OSErrors
naming the path; a failed write leaves no temporary behind.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["FORMAT_NAMES", "append_text", "check_version", "make_parent", "read_tagged_json", "write_text_atomic"]

# Every format tag logitparity writes, and what a file with it is: a reader
# handed another kind of file says which kind it got.
FORMAT_NAMES = {
    "logitparity-dump": "a dump manifest (read by `logitparity compare` and `validate`)",
    "logitparity-activations": "a dump's activations manifest (`logitparity layers`)",
    "logitparity-ppl-baseline": "a baseline-cache manifest (`logitparity gate --baseline-cache`)",
    "logitparity.noise-floor": "a noise-floor file (`logitparity compare --noise-floor`)",
    "logitparity-layer-floor": "a layer floor file (`logitparity layers --noise-floor`)",
    "logitparity-sensitivity": "a sensitivity map (`logitparity sensitivity --json`)",
    "logitparity.comparison": "a comparison report (`logitparity compare --json`)",
}

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _named(e: OSError, path: Path) -> OSError:
    """The error with the path the user gave (os.write's errors carry none)."""
    if e.filename is None:
        return type(e)(e.errno, e.strerror or str(e), str(path))
    return e


def write_text_atomic(path: str | os.PathLike, text: str, *, sync: bool = False) -> Path:
    """Write UTF-8 text to path via a temporary sibling and os.replace;
    creates the parent directory. ``sync``: fsync before the rename. Returns
    the path."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(21, "is a directory, expected a file path", str(path))
    make_parent(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, _FLAGS, _MODE)
    try:
        try:
            _write_all(fd, text.encode("utf-8"))
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _named(e, path) from None
        raise
    return path


def make_parent(path: str | os.PathLike) -> None:
    """Create path's parent directories; a file in the way is a
    NotADirectoryError naming it (not mkdir's bare "File exists")."""
    parent = Path(path).parent
    for p in (parent, *parent.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise NotADirectoryError(20, "a file is in the way where a directory belongs", str(p))
            break
    parent.mkdir(parents=True, exist_ok=True)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append UTF-8 text to path in one write and fsync it; refuses a
    symbolic link at path."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), _MODE)
    try:
        _write_all(fd, text.encode("utf-8"))
        os.fsync(fd)
    except OSError as e:
        raise _named(e, Path(path)) from None
    finally:
        os.close(fd)


def check_version(version: Any, reads: "str | tuple[int, ...]", where: str, fix: str) -> None:
    if isinstance(reads, str):  # "M.m": any minor of major M (a newer minor only adds fields)
        m = re.fullmatch(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
        if not m:
            raise ValueError(f"{where}: 'version' must look like '1.0', got {version!r}; {fix}")
        major, ours = int(m.group(1)), int(reads.split(".")[0])
        if major > ours:
            raise ValueError(f"{where}: version {version} is newer than this logitparity reads ({reads}); "
                             "upgrade logitparity (pip install -U logitparity)")
        if major < ours:
            raise ValueError(f"{where}: version {version} is older than this logitparity reads ({reads}); {fix}")
    elif isinstance(version, bool) or version not in reads:
        said = ", ".join(map(str, reads))
        raise ValueError(f"{where}: version {version!r} is not supported (this logitparity reads {said}); {fix}")


def read_tagged_json(path: "str | os.PathLike[str]", *, fmt: str, what: str, fix: str,
                     reads: "str | tuple[int, ...]", accept: "tuple[str, ...]" = ()) -> dict[str, Any]:
    """The JSON object at ``path``, after checking it is UTF-8 JSON, an object
    tagged ``format: fmt`` (or one of ``accept``, returned as is for the
    caller to unwrap) and a ``version`` this logitparity reads: ``reads`` is
    "M.m" (any M.x is read; a newer major says to upgrade) or a tuple of
    accepted integer versions. Every failure names ``what`` and the path,
    what was expected and what was found, and ends with ``fix``:
    FileNotFoundError for a missing file, ValueError otherwise."""
    p = Path(path)
    where = f"{what} {p}"
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} does not exist; {fix}") from None
    except IsADirectoryError:
        raise ValueError(f"{where} is a directory, expected a JSON file; {fix}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); {fix}") from None
    except (ValueError, RecursionError) as e:  # JSON, or an integer past 4300 digits
        raise ValueError(f"{where} is not valid JSON ({e}); {fix}") from None
    got = doc.get("format") if isinstance(doc, dict) else None
    if got in accept:
        return doc
    if got != fmt:
        found = f"format {got!r}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}, not an object"
        kind = FORMAT_NAMES.get(got) if isinstance(got, str) else None
        raise ValueError(f"{where}: expected format {fmt!r}, found {found}"
                         f"{f', which is {kind}' if kind else ''}; {fix}")
    check_version(doc.get("version"), reads, where, fix)
    return doc

