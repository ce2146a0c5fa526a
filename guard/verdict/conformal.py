"""Split-conformal p-values against held-out correct predictions' values of a statistic.

Two guarantees, both for flagging when p <= alpha:

- marginal (split conformal): p = (1 + c) / (n + 1) with c = #{v_i >= s}; over the draw of
  the reference and the new prediction, a correct prediction is flagged with probability
  <= alpha.
- calibration-conditional (``delta``; Bates et al. 2023): p is the (1 - delta) upper
  confidence bound on the false-alarm rate of the rule "flag when at most c reference values
  are >= s". That rate is Beta(c + 1, n - c) distributed over reference draws (exactly, for
  continuous scores), so p = BetaQuantile(1 - delta; c + 1, n - c), and with probability
  >= 1 - delta over the calibration data the false-alarm rate of the deployed check is
  <= alpha.
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import Field, PrivateAttr, model_validator
from scipy.special import betaincinv

from guard.verdict.schema import Derived, Strict

__all__ = ["ConformalReference", "minimum_reference", "p_value_table"]


def p_value_table(n: int, delta: float | None) -> NDArray[np.float64]:
    """p-value of each count c = #{v_i >= s} in 0..n of a reference of n values."""
    c = np.arange(n + 1, dtype=np.float64)
    if delta is None:
        return (1.0 + c) / (n + 1.0)
    table = np.ones(n + 1)
    table[:n] = betaincinv(c[:n] + 1.0, n - c[:n], 1.0 - delta)
    return table


def _largest_count(n: int, alpha: float, delta: float | None = None) -> int:
    """Largest c whose p-value is <= alpha, or -1: how many reference values may be >= s."""
    table = p_value_table(n, delta)
    allowed = np.flatnonzero(table <= alpha)
    return int(allowed[-1]) if allowed.size else -1


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
    delta: float | None = Field(
        default=None, gt=0, lt=1, description="calibration-conditional guarantee (None: marginal)"
    )
    _arrays: Derived = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        values = np.asarray(self.values, dtype=np.float64)
        self._arrays = Derived(values, p_value_table(values.size, self.delta))

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        v = np.asarray(self.values, dtype=np.float64)
        if v.size > 1 and np.any(np.diff(v) < 0):
            raise ValueError("conformal reference values must be sorted ascending")
        if self.threshold != _threshold(v, self.alpha, self.delta):
            raise ValueError("conformal threshold does not match its reference values and alpha")
        return self

    @classmethod
    def from_values(
        cls, values: ArrayLike, alpha: float, delta: float | None = None
    ) -> ConformalReference:
        """Reference from held-out correct predictions' values (any order)."""
        v = np.sort(np.asarray(values, dtype=np.float64).ravel())
        return cls(
            alpha=alpha, values=v.tolist(), threshold=_threshold(v, alpha, delta), delta=delta
        )

    def false_alarm_beta(self) -> tuple[float, float] | None:
        """Beta(a, b) of this rule's false-alarm rate over reference draws, or None (never flags).

        The rule flags when at most c reference values are >= s; its rate on new correct
        predictions is Beta(c + 1, n - c) over reference draws (continuous scores). The
        marginal guarantee bounds the mean of that distribution, not the rate of one draw.
        """
        n = len(self.values)
        c = _largest_count(n, self.alpha, self.delta)
        return None if c < 0 else (c + 1.0, float(n - c))

    def false_alarm_quantile(self, q: float) -> float | None:
        """The q-quantile, over calibration draws, of the false-alarm rate this rule gives."""
        ab = self.false_alarm_beta()
        return None if ab is None else float(betaincinv(*ab, q))

    def p_values(self, statistic: ArrayLike) -> NDArray[np.float64]:
        """Conformal p-values of new values of the statistic."""
        reference, table = self._arrays.arrays
        s = np.asarray(statistic, dtype=np.float64)
        at_least = reference.size - np.searchsorted(reference, s, side="left")
        return table[at_least]


def minimum_reference(alpha: float, delta: float | None = None) -> int:
    """Fewest reference values for which the smallest p-value reaches alpha."""
    n = 0
    while _largest_count(n, alpha, delta) < 0:
        n += 1 if n < 64 else max(1, n // 8)
    return n


def _threshold(
    sorted_values: NDArray[np.float64], alpha: float, delta: float | None = None
) -> float | None:
    n = sorted_values.size
    c = _largest_count(n, alpha, delta)
    return None if c < 0 else float(sorted_values[n - 1 - c])
