"""Split-conformal p-values against held-out correct predictions' values of a statistic."""

from __future__ import annotations

import math
from typing import Any, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import Field, PrivateAttr, model_validator

from guard.verdict.schema import Derived, Strict

__all__ = ["ConformalReference"]


def _largest_count(n: int, alpha: float) -> int:
    """Largest c with (1 + c) / (n + 1) <= alpha, or -1: how many reference values may be >= s."""
    c = math.floor(alpha * (n + 1)) - 1
    # Settle float rounding with the same comparison the p-values use.
    while (c + 2) / (n + 1) <= alpha:
        c += 1
    while c >= 0 and (c + 1) / (n + 1) > alpha:
        c -= 1
    return c


class ConformalReference(Strict):
    """Held-out correct predictions' values of a statistic (higher = more suspicious).

    p(s) = (1 + #{v_i >= s}) / (n + 1); this tail flags when p <= ``alpha`` (the whole alpha,
    or alpha/2 when two tails share it), which is the same as s > ``threshold``.
    ``threshold`` is None when the reference is too small for any value to reach alpha
    (n + 1 < 1/alpha). For the small tail the statistic is -area, so it flags
    area < -threshold.
    """

    alpha: float = Field(gt=0, lt=1)
    values: list[float]  # sorted ascending
    threshold: float | None
    _arrays: Derived = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        self._arrays = Derived(np.asarray(self.values, dtype=np.float64))

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        v = np.asarray(self.values, dtype=np.float64)
        if v.size > 1 and np.any(np.diff(v) < 0):
            raise ValueError("conformal reference values must be sorted ascending")
        if self.threshold != _threshold(v, self.alpha):
            raise ValueError("conformal threshold does not match its reference values and alpha")
        return self

    @classmethod
    def from_values(cls, values: ArrayLike, alpha: float) -> ConformalReference:
        """Reference from held-out correct predictions' values (any order)."""
        v = np.sort(np.asarray(values, dtype=np.float64).ravel())
        return cls(alpha=alpha, values=v.tolist(), threshold=_threshold(v, alpha))

    def p_values(self, statistic: ArrayLike) -> NDArray[np.float64]:
        """Conformal p-values of new values of the statistic."""
        (reference,) = self._arrays.arrays
        s = np.asarray(statistic, dtype=np.float64)
        at_least = reference.size - np.searchsorted(reference, s, side="left")
        return (1.0 + at_least) / (reference.size + 1.0)


def _threshold(sorted_values: NDArray[np.float64], alpha: float) -> float | None:
    n = sorted_values.size
    c = _largest_count(n, alpha)
    return None if c < 0 else float(sorted_values[n - 1 - c])
