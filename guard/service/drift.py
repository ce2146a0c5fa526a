"""Drift of the recent MPS-area distribution from the calibration one.

The statistic is the two-sample Kolmogorov-Smirnov distance D = sup |F_recent - F_calibration|
over a sliding window of the most recent areas: 0 when the window looks like calibration, 1
when the two do not overlap at all. It is computed when read (at scrape time), not per item.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
from numpy.typing import ArrayLike, NDArray


def ks_distance(a: ArrayLike, b: ArrayLike) -> float:
    """Two-sample Kolmogorov-Smirnov statistic of samples ``a`` and ``b``."""
    x = np.sort(np.asarray(a, dtype=np.float64).ravel())
    y = np.sort(np.asarray(b, dtype=np.float64).ravel())
    if x.size == 0 or y.size == 0:
        raise ValueError("both samples must be non-empty")
    points = np.concatenate([x, y])
    # Empirical CDFs at every observed point (right-continuous: side="right").
    fx = np.searchsorted(x, points, side="right") / x.size
    fy = np.searchsorted(y, points, side="right") / y.size
    return float(np.max(np.abs(fx - fy)))


class DriftMonitor:
    """A window of recent MPS areas and their KS distance from a reference sample."""

    def __init__(self, reference: ArrayLike, window: int) -> None:
        if window < 1:
            raise ValueError("the drift window must hold at least one item")
        self._reference: NDArray[np.float64] = np.sort(np.asarray(reference, dtype=np.float64))
        if self._reference.size == 0:
            raise ValueError("the drift reference must be non-empty")
        self._recent: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, areas: ArrayLike) -> None:
        values = np.asarray(areas, dtype=np.float64).ravel().tolist()
        with self._lock:
            self._recent.extend(values)

    def items(self) -> int:
        with self._lock:
            return len(self._recent)

    def distance(self) -> float:
        """KS distance of the window from the reference; 0 while the window is empty."""
        with self._lock:
            recent = list(self._recent)
        return ks_distance(recent, self._reference) if recent else 0.0
