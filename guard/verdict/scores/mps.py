"""The paper's check: P(incorrect | MPS area), from area densities fitted offline.

P(incorrect | area) = pi f1(a) / (pi f1(a) + (1 - pi) f0(a)), with f1/f0 the densities of
logit(area) of incorrect/correct predictions (per predicted class where fitted, else pooled)
and pi the fit-split error rate. Whether large or small areas are suspicious is whatever the
densities say; nothing assumes the paper's direction.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import Field, PrivateAttr, model_validator

from guard.verdict.schema import Derived, Strict
from guard.verdict.scores.base import Features, column
from guard.verdict.scores.linear import logit_area

__all__ = ["AreaDensity", "AreaModel", "DensityPair", "MpsScore", "posterior_incorrect"]


class AreaDensity(Strict):
    """A Gaussian KDE of logit(area) stored as log-densities on a regular grid.

    Evaluated by linear interpolation of the log-density; outside the grid (more than six
    bandwidths beyond the data) the value is ``log_floor``, the weight of a small uniform
    component mixed in so that areas never seen give no evidence either way instead of a
    ratio of two vanishing Gaussian tails.
    """

    grid_start: float
    grid_step: float = Field(gt=0)
    log_density: list[float] = Field(min_length=2)
    log_floor: float
    bandwidth: float = Field(gt=0)
    n: int = Field(ge=1)
    _arrays: Derived = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        values = np.asarray(self.log_density, dtype=np.float64)
        self._arrays = Derived(self.grid_start + self.grid_step * np.arange(values.size), values)

    def log_pdf(self, logit_mps_area: ArrayLike) -> NDArray[np.float64]:
        """Log-density at points on the logit axis."""
        grid, values = self._arrays.arrays
        return np.interp(
            np.asarray(logit_mps_area, dtype=np.float64),
            grid,
            values,
            left=self.log_floor,
            right=self.log_floor,
        )


class DensityPair(Strict):
    """Area densities of correct and of incorrect predictions; None where there were none."""

    correct: AreaDensity | None
    incorrect: AreaDensity | None


class AreaModel(Strict):
    """What the ``mps`` score needs: the densities and the prior error rate."""

    area_eps: float = Field(gt=0, lt=0.5)
    prior_incorrect: float = Field(ge=0, le=1)
    pooled: DensityPair
    # Only classes with enough correct and incorrect fit items; others use the pooled pair.
    per_class: dict[int, DensityPair]

    @model_validator(mode="after")
    def _complete_pairs(self) -> Self:
        for c, pair in self.per_class.items():
            if pair.correct is None or pair.incorrect is None:
                raise ValueError(
                    f"per-class densities of class {c} must have both correct and incorrect"
                )
        return self

    def pair_for(self, predicted_class: int) -> DensityPair:
        """The densities used for predictions of this class."""
        return self.per_class.get(predicted_class, self.pooled)


def posterior_incorrect(
    log_density_incorrect: ArrayLike, log_density_correct: ArrayLike, prior_incorrect: float
) -> NDArray[np.float64]:
    """Bayes: P(incorrect | area) from the two log-densities at that area and the prior."""
    if not 0.0 < prior_incorrect < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior_incorrect}")
    log_odds = (
        math.log(prior_incorrect)
        - math.log1p(-prior_incorrect)
        + np.asarray(log_density_incorrect, dtype=np.float64)
        - np.asarray(log_density_correct, dtype=np.float64)
    )
    return 0.5 * (1.0 + np.tanh(0.5 * log_odds))  # the logistic function, without overflow


def _mps_scores(
    model: AreaModel, mps_area_fraction: NDArray[np.float64], predicted_class: NDArray[np.int64]
) -> NDArray[np.float64]:
    x = logit_area(mps_area_fraction, model.area_eps)
    out = np.full(x.shape, model.prior_incorrect)
    if model.pooled.correct is None or model.pooled.incorrect is None:
        # One class never occurred in the fit split: the prior (0 or 1) is all there is.
        return out
    for c in np.unique(predicted_class):
        pair = model.pair_for(int(c))
        assert pair.correct is not None and pair.incorrect is not None
        rows = predicted_class == c
        out[rows] = posterior_incorrect(
            pair.incorrect.log_pdf(x[rows]), pair.correct.log_pdf(x[rows]), model.prior_incorrect
        )
    return out


class MpsScore(Strict):
    """The ``mps`` score: posterior probability of an error given the MPS area."""

    kind: Literal["mps"] = "mps"
    area_model: AreaModel

    @property
    def features(self) -> frozenset[str]:
        return frozenset({"mps_area_fraction", "predicted_class"})

    def scores(self, features: Features) -> NDArray[np.float64]:
        return _mps_scores(
            self.area_model,
            column(features, "mps_area_fraction"),
            column(features, "predicted_class").astype(np.int64),
        )

    def contributions(self, features: Features) -> list[list[tuple[str, float]]]:
        return [[("mps_area_fraction", float(a))] for a in column(features, "mps_area_fraction")]
