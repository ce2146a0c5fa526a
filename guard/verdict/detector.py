"""The check of predictions: a score, its conformal p-value and the flag.

The p-value is against held-out correct predictions of all classes (marginal guarantee), or
of the predicted class only (``per_class``, Mondrian conformal: the guarantee holds for each
class; classes with too few reference items fall back to the pooled reference, which the
calibration notes name), each either marginal or calibration-conditional (``delta``, see
guard.verdict.conformal).

Alarm: conformal p-value of the score against held-out correct predictions,
p = (1 + #{s_i >= s}) / (n + 1); flagged when p <= alpha, so a correct prediction is
flagged with probability at most alpha (exchangeability). With ``flag_small_tail`` a second
p-value on -area against the held-out correct areas flags "myopic" (unusually small) MPSs; each
tail is then tested at alpha/2, so by the union bound the total false-alarm rate on correct
predictions stays <= alpha. The verdict's p-value is then the Bonferroni one,
min(1, 2 min(p_score, p_small)), so ``flagged == (p_value <= alpha)`` always holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import Field, model_validator

from guard.verdict.conformal import ConformalReference
from guard.verdict.schema import Strict
from guard.verdict.scores import SCORE_REASON, Features, Reason, ScoreModel, column, needs_mps

__all__ = ["SCORE_REASON", "Detector", "Reason", "Verdict", "Verdicts"]


@dataclass(frozen=True)
class Verdict:
    """The check of one prediction."""

    score: float  # suspicion score of the detector's kind
    p_value: float  # conformal (Bonferroni over both tails when the small tail is on)
    flagged: bool  # p_value <= alpha
    reason: Reason
    evidence: tuple[tuple[str, float], ...] = ()  # what pushed the score up most


@dataclass(frozen=True)
class Verdicts:
    """The check of a batch of predictions, as arrays."""

    score: NDArray[np.float64]
    p_value: NDArray[np.float64]
    flagged: NDArray[np.bool_]
    reason: NDArray[np.str_]
    evidence: list[list[tuple[str, float]]]

    def __getitem__(self, i: int) -> Verdict:
        return Verdict(
            score=float(self.score[i]),
            p_value=float(self.p_value[i]),
            flagged=bool(self.flagged[i]),
            reason=self.reason[i].item(),
            evidence=tuple(self.evidence[i]),
        )


# Older callers name the whole input's confidence "confidence"; the score features call it "msp".
_ALIASES = {"confidence": "msp"}


class Detector(Strict):
    """Everything fitted that the check needs: the score and its conformal references."""

    score: ScoreModel
    alpha: float = Field(gt=0, lt=1)
    per_class: bool = False
    delta: float | None = Field(default=None, gt=0, lt=1)
    flag_small_tail: bool
    score_reference: ConformalReference  # held-out correct predictions' scores, all classes
    class_references: dict[int, ConformalReference] = Field(default_factory=dict)
    small_tail_reference: ConformalReference | None  # their -area, when flag_small_tail
    # Scores of every held-out reference item, errors included and sorted: the traffic as
    # calibrated, which the exchangeability martingale compares served scores with.
    exchangeability_reference: list[float] | None = None

    @model_validator(mode="after")
    def _tails(self) -> Self:
        if self.flag_small_tail != (self.small_tail_reference is not None):
            raise ValueError("small_tail_reference must be present exactly when flag_small_tail")
        if self.class_references and not self.per_class:
            raise ValueError("class_references are only used with per_class")
        per_tail = self.alpha / 2 if self.flag_small_tail else self.alpha
        tails = [self.score_reference, *self.class_references.values()]
        tails += [self.small_tail_reference] if self.small_tail_reference is not None else []
        for tail in tails:
            if not np.isclose(tail.alpha, per_tail) or tail.delta != self.delta:
                raise ValueError(
                    f"each conformal tail must be tested at alpha {per_tail} (alpha split over "
                    f"tails) with the detector's delta {self.delta}"
                )
        return self

    @property
    def score_kind(self) -> str:
        return self.score.kind

    @property
    def reasons(self) -> list[Reason]:
        """Every flag reason this detector can give."""
        return [SCORE_REASON[self.score.kind]] + (["myopic_mps"] if self.flag_small_tail else [])

    @property
    def features(self) -> frozenset[str]:
        """The per-prediction features a check needs."""
        extra = {"mps_area_fraction"} if self.flag_small_tail else set()
        return self.score.features | extra | ({"predicted_class"} if self.per_class else set())

    @property
    def needs_mps(self) -> bool:
        return needs_mps(self.features)

    @property
    def guarantee(self) -> str:
        """The false-alarm guarantee in words."""
        scope = "per predicted class" if self.per_class else "marginal"
        if self.delta is None:
            return f"{scope}: P(flag | correct) <= {self.alpha:g}"
        return (
            f"{scope}, calibration-conditional: with probability >= {1 - self.delta:g} over the "
            f"calibration data, the false-alarm rate on correct predictions is <= {self.alpha:g}"
        )

    def evaluate(self, features: Features | None = None, /, **columns: ArrayLike) -> Verdicts:
        """Verdicts for a batch of predictions, from their features (a mapping, or keywords)."""
        table: dict[str, Any] = dict(features or {})
        for name, values in columns.items():
            if values is not None:
                table[_ALIASES.get(name, name)] = values
        score = self.score.scores(table)
        p_score = self._p_values(score, table)
        p_value = p_score
        myopic = np.zeros(score.shape, dtype=bool)
        if self.small_tail_reference is not None:
            p_small = self.small_tail_reference.p_values(-column(table, "mps_area_fraction"))
            p_value = np.minimum(1.0, 2.0 * np.minimum(p_score, p_small))
            myopic = p_small < p_score
        flagged = p_value <= self.alpha
        reason = np.where(
            flagged, np.where(myopic, "myopic_mps", SCORE_REASON[self.score.kind]), "ok"
        )
        return Verdicts(
            score=score,
            p_value=p_value,
            flagged=flagged,
            reason=reason.astype(np.str_),
            evidence=self.score.contributions(table),
        )

    def _p_values(
        self, score: NDArray[np.float64], table: Mapping[str, Any]
    ) -> NDArray[np.float64]:
        p = self.score_reference.p_values(score)
        if self.class_references:
            classes = column(table, "predicted_class").astype(np.int64)
            for c, reference in self.class_references.items():
                rows = classes == c
                if rows.any():
                    p[rows] = reference.p_values(score[rows])
        return p
