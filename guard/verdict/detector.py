"""The check of predictions: a score, its conformal p-value and the flag.

Alarm: conformal p-value of the score against held-out correct predictions,
p = (1 + #{s_i >= s}) / (n + 1); flagged when p <= alpha, so a correct prediction is
flagged with probability at most alpha (exchangeability). With ``flag_small_tail`` a second
p-value on -area against the held-out correct areas flags "myopic" (unusually small) MPSs; each
tail is then tested at alpha/2, so by the union bound the total false-alarm rate on correct
predictions stays <= alpha. The verdict's p-value is then the Bonferroni one,
min(1, 2 min(p_score, p_small)), so ``flagged == (p_value <= alpha)`` always holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import Field, model_validator

from guard.verdict.conformal import ConformalReference
from guard.verdict.schema import Strict
from guard.verdict.scores import AreaModel, CombinedModel, ScoreKind, suspicion_scores

__all__ = ["SCORE_REASON", "Detector", "Reason", "Verdict", "Verdicts"]

Reason = Literal["ok", "suspicious_mps_area", "low_confidence", "suspicious_combined", "myopic_mps"]
SCORE_REASON: dict[str, Reason] = {
    "mps": "suspicious_mps_area",
    "msp": "low_confidence",
    "combined": "suspicious_combined",
}


@dataclass(frozen=True)
class Verdict:
    """The check of one prediction."""

    score: float  # suspicion score of the artifact's kind
    p_value: float  # conformal (Bonferroni over both tails when the small tail is on)
    flagged: bool  # p_value <= alpha
    reason: Reason


@dataclass(frozen=True)
class Verdicts:
    """The check of a batch of predictions, as arrays."""

    score: NDArray[np.float64]
    p_value: NDArray[np.float64]
    flagged: NDArray[np.bool_]
    reason: NDArray[np.str_]


class Detector(Strict):
    """Everything fitted that the check needs: score, densities, conformal references."""

    score_kind: ScoreKind
    alpha: float = Field(gt=0, lt=1)
    flag_small_tail: bool
    area_model: AreaModel
    combined: CombinedModel | None
    score_reference: ConformalReference  # held-out correct predictions' scores
    small_tail_reference: ConformalReference | None  # their -area, when flag_small_tail

    @model_validator(mode="after")
    def _tails(self) -> Self:
        if self.flag_small_tail != (self.small_tail_reference is not None):
            raise ValueError("small_tail_reference must be present exactly when flag_small_tail")
        per_tail = self.alpha / 2 if self.flag_small_tail else self.alpha
        tails = [self.score_reference] + (
            [self.small_tail_reference] if self.small_tail_reference is not None else []
        )
        if any(not math.isclose(t.alpha, per_tail) for t in tails):
            raise ValueError(
                f"each conformal tail must be tested at {per_tail} (alpha split over tails)"
            )
        return self

    def evaluate(
        self,
        *,
        mps_area_fraction: ArrayLike,
        confidence: ArrayLike,
        predicted_class: ArrayLike,
        margin: ArrayLike | None = None,
    ) -> Verdicts:
        """Verdicts for a batch of predictions."""
        area = np.atleast_1d(np.asarray(mps_area_fraction, dtype=np.float64))
        score = suspicion_scores(
            self.score_kind,
            self.area_model,
            self.combined,
            mps_area_fraction=area,
            confidence=confidence,
            predicted_class=predicted_class,
            margin=margin,
        )
        p_score = self.score_reference.p_values(score)
        p_value = p_score
        myopic = np.zeros(score.shape, dtype=bool)
        if self.small_tail_reference is not None:
            p_small = self.small_tail_reference.p_values(-area)
            p_value = np.minimum(1.0, 2.0 * np.minimum(p_score, p_small))
            myopic = p_small < p_score
        flagged = p_value <= self.alpha
        reason = np.where(
            flagged, np.where(myopic, "myopic_mps", SCORE_REASON[self.score_kind]), "ok"
        )
        return Verdicts(
            score=score, p_value=p_value, flagged=flagged, reason=reason.astype(np.str_)
        )
