"""Scores from the model's own confidence: free with the prediction, no MPS needed.

- ``msp``: 1 - maximum softmax probability (Hendrycks and Gimpel 2017), the standard baseline.
- ``confidence``: one confidence feature (MSP, margin, entropy, max-logit, energy or
  MaxLogit-pNorm, Cattelan and Silva 2023), the one that ranked errors best on the fit split,
  negated where higher means more confident.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from guard.verdict.schema import Strict
from guard.verdict.scores.base import CONFIDENCE_FEATURES, Features, column

__all__ = ["ConfidenceScore", "MspScore"]


class MspScore(Strict):
    """1 - MSP."""

    kind: Literal["msp"] = "msp"

    @property
    def features(self) -> frozenset[str]:
        return frozenset({"msp"})

    def scores(self, features: Features) -> NDArray[np.float64]:
        return 1.0 - column(features, "msp")

    def contributions(self, features: Features) -> list[list[tuple[str, float]]]:
        return [[("msp", float(v))] for v in column(features, "msp")]


class ConfidenceScore(Strict):
    """One confidence feature, signed so that higher is more suspicious."""

    kind: Literal["confidence"] = "confidence"
    feature: Literal[CONFIDENCE_FEATURES] = Field(  # type: ignore[valid-type]
        description="the confidence feature used"
    )
    higher_is_confident: bool = Field(description="True for all but entropy")

    @property
    def features(self) -> frozenset[str]:
        return frozenset({self.feature})

    def scores(self, features: Features) -> NDArray[np.float64]:
        values = column(features, self.feature)
        return -values if self.higher_is_confident else values

    def contributions(self, features: Features) -> list[list[tuple[str, float]]]:
        return [[(self.feature, float(v))] for v in column(features, self.feature)]
