"""Number formatting shared by the renderers."""

from __future__ import annotations

import math
from typing import Any


def general(x: Any, digits: int = 3) -> str:
    """``digits`` significant digits; '—' for None or NaN (not measured),
    '∞' / '−∞', and a bare '0'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"
