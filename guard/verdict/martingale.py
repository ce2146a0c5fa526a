"""Is served traffic still exchangeable with the calibration data? A conformal test martingale.

Each checked prediction's score gets a smoothed conformal p-value against the bag of every
score seen before it: the held-out reference items' (correct and incorrect alike: the traffic
as calibrated), then each served one in turn, p = (#{v > s} + U (#{v = s} + 1)) / (n + 1)
with U uniform on [0, 1]. While the sequence stays exchangeable these p-values are independent
and uniform (Vovk et al.); against a fixed reference they would not be independent, and a
martingale would slowly bet on the reference's own sampling error. The simple mixture martingale
(Vovk et al., "Testing exchangeability on-line", 2003) bets on small p-values, that is on
scores growing more suspicious than calibrated:

    M_n = integral over e in [0, 1] of prod_i e p_i^(e - 1) de,

kept in log space on a grid of e. Under exchangeability M is a test martingale, so by Ville's
inequality P(M ever reaches 1/delta) <= delta, over draws of the calibration data and of the
traffic (as for the conformal false-alarm guarantee): M >= 1/delta is evidence at level delta that
the calibration's guarantee no longer holds, and the model should be recalibrated. The bag
grows by one score per check up to ``max_bag`` scores (memory: 8 bytes each); past it, scores
are no longer added and the p-values use that large, fixed bag.

It accumulates evidence since the sidecar started: after a long exchangeable stretch it sits
well below 1, and a later shift needs correspondingly more predictions to lift it.
"""

from __future__ import annotations

import threading

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ExchangeabilityMartingale", "smoothed_p_values"]

_GRID = np.linspace(0.005, 0.995, 100)  # betting exponents e (midpoints of 100 bins)


def smoothed_p_values(
    reference_sorted: NDArray[np.float64], scores: ArrayLike, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Smoothed conformal p-values of new scores against sorted reference scores."""
    s = np.atleast_1d(np.asarray(scores, dtype=np.float64))
    n = reference_sorted.size
    above = n - np.searchsorted(reference_sorted, s, side="right")
    equal = np.searchsorted(reference_sorted, s, side="right") - np.searchsorted(
        reference_sorted, s, side="left"
    )
    u = rng.random(s.size)
    return (above + u * (equal + 1)) / (n + 1)


class ExchangeabilityMartingale:
    """The mixture martingale over a stream of scores; thread-safe, O(grid) per update."""

    def __init__(
        self, reference: ArrayLike, seed: int | None = None, max_bag: int = 100_000
    ) -> None:
        self._bag = np.sort(np.asarray(reference, dtype=np.float64).ravel())
        if self._bag.size == 0:
            raise ValueError("the martingale needs reference scores")
        self._max_bag = max_bag
        self._log_products = np.zeros(_GRID.size)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.count = 0

    def update(self, scores: ArrayLike) -> float:
        """Add checked predictions' scores; the martingale's value after them."""
        with self._lock:
            p = np.empty(np.size(scores))
            for i, score in enumerate(np.atleast_1d(np.asarray(scores, dtype=np.float64))):
                p[i] = smoothed_p_values(self._bag, score, self._rng)[0]
                if self._bag.size < self._max_bag:
                    at = np.searchsorted(self._bag, score)
                    self._bag = np.insert(self._bag, at, score)
            p = np.clip(p, 1e-300, 1.0)
            self._log_products += p.size * np.log(_GRID) + (_GRID - 1.0) * np.log(p).sum()
            self.count += int(p.size)
            return self._value()

    @property
    def value(self) -> float:
        with self._lock:
            return self._value()

    def _value(self) -> float:
        top = float(self._log_products.max())
        log_mean = top + float(np.log(np.mean(np.exp(self._log_products - top))))
        return float(np.exp(min(log_mean, 700.0)))
