"""File writes shared by every module that writes results.

``write_text_atomic``: a file is either the old one or the complete new one,
never a torn mix. ``append_text``: one write appended to a file, synced.
``write_bytes_atomic``: the same for binary chunks (safetensors shards,
through logitparity._shards), optionally durable (file and directory synced).
``read_tagged_json``: the one reader of every JSON file logitparity tags with
a format and a version (dump, activations and baseline-cache manifests, noise
and layer floors, sample sets), with one message per failure.

Tags and versions have one shape: ``"format": "logitparity-<kind>"`` and
``"version": "MAJOR.MINOR"`` (a newer minor only adds fields). Files written
before that spelled some tags with a dot and some versions as integers;
``LEGACY_TAGS`` and ``LEGACY_INT_VERSIONS`` are the one table of those
spellings, and the reader hands its caller today's.
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
from typing import Any, Iterable

__all__ = ["FORMAT_NAMES", "LEGACY_INT_VERSIONS", "LEGACY_TAGS", "append_text", "check_version", "make_parent",
           "normalize_tag", "read_tagged_json", "write_bytes_atomic", "write_text_atomic"]

# Every format tag logitparity writes, and what a file with it is: a reader
# handed another kind of file says which kind it got.
FORMAT_NAMES = {
    "logitparity-dump": "a dump manifest (read by `logitparity compare` and `validate`)",
    "logitparity-activations": "a dump's activations manifest (`logitparity layers`)",
    "logitparity-ppl-baseline": "a baseline-cache manifest (`logitparity gate --baseline-cache`)",
    "logitparity-noise-floor": "a noise-floor file (`logitparity compare --noise-floor`)",
    "logitparity-layer-floor": "a layer floor file (`logitparity layers --noise-floor`)",
    "logitparity-sensitivity": "a sensitivity map (`logitparity sensitivity --json`)",
    "logitparity-comparison": "a comparison report (`logitparity compare --json`)",
    "logitparity-sampled-comparison": "a sampled-comparison report (`logitparity compare SET SET --json`)",
    "logitparity-sample-set": "a sample set's index (`logitparity dump --seeds`)",
    "logitparity-layers": "a layer comparison report (`logitparity layers --json`)",
    "logitparity-stats": "a statistics report (`logitparity stats --json`)",
    "logitparity-tasks": "a task-accuracy report (`logitparity tasks --json`)",
    "logitparity-ranks": "a data-parallel capture's plan (ranks/plan.json, `logitparity dump` under torchrun)",
}

# The spellings of files written before every tag was "logitparity-<kind>"
# and every version "MAJOR.MINOR": the old tag -> today's, and the kinds
# whose version was an integer N (read as "N.0"). Readers accept both; writers
# write today's.
LEGACY_TAGS = {
    "logitparity.noise-floor": "logitparity-noise-floor",
    "logitparity.comparison": "logitparity-comparison",
    "logitparity.sampled-comparison": "logitparity-sampled-comparison",
    "logitparity.sample-set": "logitparity-sample-set",
}
LEGACY_INT_VERSIONS = frozenset({
    "logitparity-noise-floor", "logitparity-comparison", "logitparity-sampled-comparison",
    "logitparity-sample-set", "logitparity-ppl-baseline", "logitparity-tasks",
})

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
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
    return write_bytes_atomic(path, [text.encode("utf-8")], sync=sync)


def write_bytes_atomic(path: str | os.PathLike, chunks: "Iterable[Any]", *, sync: bool = False,
                       sync_dir: bool = False) -> Path:
    """Write the bytes-like ``chunks`` in order to path via a temporary
    sibling (created exclusively, mode 0o666 less the umask) and os.replace;
    creates the parent directory. ``sync``: fsync the file before the rename;
    ``sync_dir``: also fsync the directory after it (the rename is durable).
    A failure leaves no temporary behind. Returns the path."""
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
            for chunk in chunks:
                _write_all(fd, chunk)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if sync_dir:
            dfd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
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


def _shown(reads: "str | tuple[str, ...]") -> str:
    return reads if isinstance(reads, str) else ", ".join(reads)


def check_version(version: Any, reads: "str | tuple[str, ...]", where: str, fix: str, *,
                  spelled: Any = None) -> None:
    """``version`` ("M.m") is one this logitparity reads: ``reads`` is "M.m"
    (any minor of major M: a newer minor only adds fields) or a tuple of them
    (several majors). A newer major says to upgrade; an older one ends with
    ``fix``. ``spelled``: the version as the file wrote it, for the message
    (a legacy integer)."""
    m = re.fullmatch(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    if not m:
        raise ValueError(f"{where}: 'version' must look like '1.0', got {version!r}; {fix}")
    major = int(m.group(1))
    shown = version if spelled is None else spelled
    majors = [int(r.split(".")[0]) for r in ((reads,) if isinstance(reads, str) else reads)]
    if major in majors:
        return
    if major > max(majors):
        raise ValueError(f"{where}: version {shown} is newer than this logitparity reads ({_shown(reads)}); "
                         "upgrade logitparity (pip install -U logitparity)")
    raise ValueError(f"{where}: version {shown} is older than this logitparity reads ({_shown(reads)}); {fix}")


def normalize_tag(doc: Any) -> Any:
    """A tagged document with its legacy tag and integer version (LEGACY_TAGS,
    LEGACY_INT_VERSIONS) respelled as today's, in place; anything else as is."""
    if not isinstance(doc, dict):
        return doc
    tag = LEGACY_TAGS.get(doc.get("format"), doc.get("format")) if isinstance(doc.get("format"), str) else None
    if tag is None:
        return doc
    doc["format"] = tag
    v = doc.get("version")
    if tag in LEGACY_INT_VERSIONS and isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        doc["version"] = f"{v}.0"
    return doc


def read_tagged_json(path: "str | os.PathLike[str]", *, fmt: str, what: str, fix: str,
                     reads: "str | tuple[str, ...]", accept: "tuple[str, ...]" = ()) -> dict[str, Any]:
    """The JSON object at ``path``, after checking it is UTF-8 JSON, an object
    tagged ``format: fmt`` (or one of ``accept``, returned as is for the
    caller to unwrap) and a ``version`` this logitparity reads (``reads``:
    check_version). A legacy spelling of the tag or version (LEGACY_TAGS,
    LEGACY_INT_VERSIONS) is read as today's, and the object comes back
    respelled. Every failure names ``what`` and the path, what was expected
    and what was found, and ends with ``fix``: FileNotFoundError for a
    missing file, ValueError otherwise."""
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
    spelled_tag, spelled_version = (doc.get("format"), doc.get("version")) if isinstance(doc, dict) else (None, None)
    doc = normalize_tag(doc)
    got = doc.get("format") if isinstance(doc, dict) else None
    if got in accept:
        return doc
    if got != fmt:
        found = f"format {spelled_tag!r}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}, not an object"
        kind = FORMAT_NAMES.get(got) if isinstance(got, str) else None
        raise ValueError(f"{where}: expected format {fmt!r}, found {found}"
                         f"{f', which is {kind}' if kind else ''}; {fix}")
    check_version(doc.get("version"), reads, where, fix, spelled=spelled_version)
    return doc
