"""Numbers as the offline reports state them: summaries that are None where undefined, and text.

One convention for every report and summary: a statistic of no values is ``None`` (JSON null),
and ``None`` or NaN prints as "n/a".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["count", "mean", "median", "number", "p_value"]


def mean(values: ArrayLike | Sequence[float]) -> float | None:
    """The mean, or None for no values."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()) if v.size else None


def median(values: ArrayLike | Sequence[float]) -> float | None:
    """The median, or None for no values."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.median(v)) if v.size else None


def number(value: float | None, digits: int = 3) -> str:
    """Fixed-point text; "n/a" for None, NaN or infinity."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def p_value(value: float | None) -> str:
    """Two significant digits; scientific below 1e-4 so that tiny p-values stay readable."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.2g}" if value >= 1e-4 else f"{value:.1e}"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """ "1 error", "2 errors"."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"
