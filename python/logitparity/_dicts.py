"""Reading nested manifest sections."""

from __future__ import annotations

from typing import Any


def dig(m: Any, *keys: str, default: Any = None) -> Any:
    """``m[k1][k2]...``, or ``default`` where a level is missing or is not a
    dict (manifests from other engines may lack any section)."""
    for k in keys:
        if not isinstance(m, dict) or k not in m:
            return default
        m = m[k]
    return m
