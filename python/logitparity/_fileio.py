"""File writes shared by every module that writes results.

``write_text_atomic``: a file is either the old one or the complete new one,
never a torn mix. ``append_text``: one write appended to a file, synced.
Neither follows a symbolic link: the temporary file is created exclusively
(O_EXCL | O_NOFOLLOW), the rename replaces a link at the target instead of
writing through it, and appends refuse a link (O_NOFOLLOW), so a hostile
directory cannot redirect a write to a file elsewhere. Errors are OSErrors
naming the path; a failed write leaves no temporary behind.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["append_text", "make_parent", "write_text_atomic"]

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
