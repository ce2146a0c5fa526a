"""The suspicion scores a calibration can choose from, one module per form, one registry.

Every score has the same small contract: ``kind``, ``features`` (what it reads),
``scores(features)`` (higher is more suspicious) and ``contributions(features)`` (what pushed
each prediction's score up, shown with a flag). Fitting lives offline (guard.calibration);
here is only what serving needs, as plain numbers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from guard.verdict.scores.base import CONFIDENCE_FEATURES, Features, column, needs_mps
from guard.verdict.scores.confidence import ConfidenceScore, MspScore
from guard.verdict.scores.linear import AREA_EPS, LinearScore, logit_area
from guard.verdict.scores.mps import AreaDensity, AreaModel, DensityPair, MpsScore

__all__ = [
    "AREA_EPS",
    "CONFIDENCE_FEATURES",
    "MPS_SCORES",
    "SCORE_KINDS",
    "SCORE_REASON",
    "AreaDensity",
    "AreaModel",
    "ConfidenceScore",
    "DensityPair",
    "Features",
    "LinearScore",
    "MpsScore",
    "MspScore",
    "ScoreKind",
    "ScoreModel",
    "column",
    "logit_area",
    "needs_mps",
]

ScoreKind = Literal["mps", "msp", "confidence", "class-confidence", "combined", "evidence"]
SCORE_KINDS: tuple[ScoreKind, ...] = (
    "mps",
    "msp",
    "confidence",
    "class-confidence",
    "combined",
    "evidence",
)
# Scores that read MPS features (the others cost nothing beyond the prediction).
MPS_SCORES = frozenset({"mps", "combined", "evidence"})

Reason = Literal[
    "ok",
    "suspicious_mps_area",
    "low_confidence",
    "low_class_confidence",
    "suspicious_combined",
    "suspicious_evidence",
    "myopic_mps",
]
SCORE_REASON: dict[str, Reason] = {
    "mps": "suspicious_mps_area",
    "msp": "low_confidence",
    "confidence": "low_confidence",
    "class-confidence": "low_class_confidence",
    "combined": "suspicious_combined",
    "evidence": "suspicious_evidence",
}

ScoreModel = Annotated[
    MpsScore | MspScore | ConfidenceScore | LinearScore, Field(discriminator="kind")
]
