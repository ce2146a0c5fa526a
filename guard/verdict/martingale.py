"""Is served traffic still exchangeable with the calibration data? A conformal test martingale.

Each checked prediction's score gets a smoothed conformal p-value against the bag of every
score seen before it: the held-out reference items' (correct and incorrect alike: the traffic
as calibrated), then each served one in turn, p = (#{v > s} + U (#{v = s} + 1)) / (n + 1)
with U uniform on [0, 1]. While the sequence stays exchangeable these p-values are independent
and uniform (Vovk et al.); against a fixed reference they would not be independent, and a
martingale would slowly bet on the reference's own sampling error.

The betting is Vovk's Simple Jumper ("Testing randomness online", 2021), one-sided: capital
is spread over betting functions f_e(p) = 1 + e (1 - 2p), e in {0, 1/2, 1} (each integrates to
1 over [0, 1], and bets on small p-values, that is on scores more suspicious than calibrated),
and before every bet a share ``jump`` of all capital is redistributed evenly over them. The
product is a test martingale, so by Ville's inequality P(M ever reaches 1/delta) <= delta, over
draws of the calibration data and of the traffic (as for the conformal false-alarm guarantee):
M >= 1/delta is evidence at level delta that the calibration's guarantee no longer holds, and
the model should be recalibrated. The jumps keep M from decaying towards 0 during a long
exchangeable stretch, so a shift that starts late is seen as fast as one that starts early
(a plain mixture martingale would first have to climb back from a tiny value).

A shift shows while its scores are new to the bag; once the bag is full of them, later ones are
no longer extreme and M drifts back. The alert therefore reads the running maximum, which is
what Ville's inequality bounds. The bag grows by one score per check up to ``max_bag`` scores
(8 bytes each); past it, scores are no longer added.
"""

from __future__ import annotations

import threading

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ExchangeabilityMartingale", "smoothed_p_values"]

_BETS = np.array([0.0, 0.5, 1.0])  # e of f_e(p) = 1 + e (1 - 2p)


def smoothed_p_values(
    reference_sorted: NDArray[np.float64], scores: ArrayLike, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Smoothed conformal p-values of new scores against sorted reference scores."""
    s = np.atleast_1d(np.asarray(scores, dtype=np.float64))
    n = reference_sorted.size
    right = np.searchsorted(reference_sorted, s, side="right")
    equal = right - np.searchsorted(reference_sorted, s, side="left")
    u = rng.random(s.size)
    return (n - right + u * (equal + 1)) / (n + 1)


class ExchangeabilityMartingale:
    """The Simple Jumper martingale over a stream of scores; thread-safe."""

    def __init__(
        self,
        reference: ArrayLike,
        seed: int | None = None,
        *,
        jump: float = 0.01,
        max_bag: int = 100_000,
    ) -> None:
        self._bag = np.sort(np.asarray(reference, dtype=np.float64).ravel())
        if self._bag.size == 0:
            raise ValueError("the martingale needs reference scores")
        self._jump = jump
        self._max_bag = max_bag
        self._capital = np.full(_BETS.size, 1.0 / _BETS.size)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.count = 0
        self.maximum = 1.0

    def update(self, scores: ArrayLike) -> float:
        """Add checked predictions' scores; the martingale's value after them."""
        with self._lock:
            for score in np.atleast_1d(np.asarray(scores, dtype=np.float64)):
                p = float(smoothed_p_values(self._bag, score, self._rng)[0])
                if self._bag.size < self._max_bag:
                    self._bag = np.insert(self._bag, np.searchsorted(self._bag, score), score)
                total = self._capital.sum()
                self._capital = (1 - self._jump) * self._capital + self._jump * total / _BETS.size
                self._capital *= 1.0 + _BETS * (1.0 - 2.0 * p)
                total = float(self._capital.sum())
                if total > 1e300:  # saturate: far past any alarm, and finite
                    self._capital *= 1e300 / total
                    total = 1e300
                self.count += 1
                self.maximum = max(self.maximum, total)
            return float(self._capital.sum())

    @property
    def value(self) -> float:
        with self._lock:
            return float(self._capital.sum())
