"""The compiled C++ core, imported on first use.

Modules that only read dumps work without the extension; the first call that
needs it gets an ImportError naming the fix. Every module that calls the core
gets it from here, so that fix is written once.
"""

from __future__ import annotations

from typing import Any


def core() -> Any:
    try:
        from logitparity import _core
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "logitparity._core (the compiled C++ core) is not importable: "
            f"{e}. Build it with `pip install --no-build-isolation -e .` "
            "after installing libhwy-dev (see README)."
        ) from e
    return _core
