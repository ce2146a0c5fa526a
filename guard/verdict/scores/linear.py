"""Logistic scores: P(incorrect) from a regularised logistic model on named terms.

A term is a feature (``msp``, ``complement_confidence``, ...), ``logit_mps_area``, a predicted-
class indicator ``class=K``, or an interaction ``class=K*FEATURE``. Three scores share this form:

- ``combined``: logit(area), MSP and margin (the paper's check plus confidence);
- ``class-confidence``: one confidence feature conditioned on the predicted class (an intercept
  and a slope per class, shrunk towards the pooled ones by the regularisation);
- ``evidence``: confidence features, the predicted class and MPS evidence features together.
"""

from __future__ import annotations

from typing import Literal, Self

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, model_validator

from guard.verdict.schema import Strict
from guard.verdict.scores.base import Features, column

__all__ = ["AREA_EPS", "LinearScore", "design_matrix", "logit_area", "term_features"]

AREA_EPS = 1e-5  # areas are clipped to [eps, 1 - eps] before the logit; 0 and 1 do occur


def logit_area(
    mps_area_fraction: NDArray[np.float64], eps: float = AREA_EPS
) -> NDArray[np.float64]:
    """logit(clip(area, eps, 1 - eps))."""
    a = np.clip(mps_area_fraction, eps, 1.0 - eps)
    return np.log(a) - np.log1p(-a)


def _feature(features: Features, name: str) -> NDArray[np.float64]:
    if name == "logit_mps_area":
        return logit_area(column(features, "mps_area_fraction"))
    return column(features, name)


def term_features(terms: list[str]) -> frozenset[str]:
    """The features a list of terms reads."""
    needed: set[str] = set()
    for term in terms:
        for part in term.split("*"):
            if part.startswith("class="):
                needed.add("predicted_class")
            elif part == "logit_mps_area":
                needed.add("mps_area_fraction")
            else:
                needed.add(part)
    return frozenset(needed)


def design_matrix(features: Features, terms: list[str]) -> NDArray[np.float64]:
    """Rows of raw (unstandardised) term values, one column per term."""
    cache: dict[str, NDArray[np.float64]] = {}

    def part(name: str) -> NDArray[np.float64]:
        if name not in cache:
            if name.startswith("class="):
                cache[name] = (column(features, "predicted_class") == int(name[6:])).astype(
                    np.float64
                )
            else:
                cache[name] = _feature(features, name)
        return cache[name]

    columns = []
    for term in terms:
        values = np.ones(1)
        for name in term.split("*"):
            values = values * part(name)
        columns.append(values)
    return np.column_stack(columns) if columns else np.zeros((0, 0))


class LinearScore(Strict):
    """Logistic regression on standardised terms; the score is P(incorrect)."""

    kind: Literal["combined", "class-confidence", "evidence"]
    terms: list[str] = Field(min_length=1)
    means: list[float]
    stds: list[float]
    coefficients: list[float]
    intercept: float

    @model_validator(mode="after")
    def _shapes(self) -> Self:
        n = len(self.terms)
        if not len(self.means) == len(self.stds) == len(self.coefficients) == n:
            raise ValueError(f"means, stds and coefficients need one value per term ({n})")
        if any(s <= 0 for s in self.stds):
            raise ValueError("term stds must be positive")
        for term in self.terms:
            for part in term.split("*"):
                if part.startswith("class=") and not part[6:].isdigit():
                    raise ValueError(f"bad class term {term!r}")
        return self

    @property
    def features(self) -> frozenset[str]:
        return term_features(self.terms)

    def _standardised(self, features: Features) -> NDArray[np.float64]:
        return (design_matrix(features, self.terms) - np.asarray(self.means)) / np.asarray(
            self.stds
        )

    def scores(self, features: Features) -> NDArray[np.float64]:
        logit = self._standardised(features) @ np.asarray(self.coefficients) + self.intercept
        return 0.5 * (1.0 + np.tanh(0.5 * logit))  # the logistic function, without overflow

    def contributions(self, features: Features) -> list[list[tuple[str, float]]]:
        """Per prediction, the terms that pushed its score up most (coefficient x value).

        Class terms of another predicted class (value 0) are left out: against the average
        item their absence counts, but "class=657" as evidence for an espresso reads as nonsense.
        """
        parts = self._standardised(features) * np.asarray(self.coefficients)
        class_terms = np.array(["class=" in term for term in self.terms])
        parts[(design_matrix(features, self.terms) == 0) & class_terms] = -np.inf
        order = np.argsort(-parts, axis=1, kind="stable")[:, :3]
        return [
            [(self.terms[j], float(parts[i, j])) for j in row if parts[i, j] > 0]
            for i, row in enumerate(order)
        ]
