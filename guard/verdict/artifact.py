"""The calibration artifact: a versioned JSON document bound to one model and engine.

Everything fitted offline is stored as plain numbers (density grids, regression
coefficients, sorted conformal references), so serving needs numpy only: no scipy or
scikit-learn objects, no refitting, and no code path to unpickling.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, ValidationError, model_validator

from guard.errors import ConfigError
from guard.verdict.detector import Detector, Verdict
from guard.verdict.schema import OptionalFloat, Strict
from guard.verdict.scores import MpsScore, ScoreKind

__all__ = [
    "SCHEMA_VERSION",
    "Increment",
    "CalibrationArtifact",
    "HeldoutMetrics",
    "MannWhitneyResult",
    "ModelInfo",
    "Rate",
    "ScoreMetrics",
    "load_artifact",
    "save_artifact",
    "score_prediction",
]

SCHEMA_VERSION = 2
# Version 1 (before scores were chosen by validation and the engine matched rex-xai's
# extraction) still loads, converted: its detector and metrics map onto version 2, and its
# MPSs keep being made as they were calibrated (the empty-MPS shortcut, the counter stream).
READABLE_VERSIONS = (1, 2)


class ModelInfo(Strict):
    """The classifier the calibration belongs to."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_name: str
    layout: Literal["NCHW", "NHWC"]
    channels: int = Field(ge=1)
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    output_name: str
    num_classes: int = Field(ge=2)


class ScoreMetrics(Strict):
    """Error detection by one score on the held-out split (None: undefined there), with 95%
    bootstrap intervals over held-out items."""

    auroc: OptionalFloat
    aupr_error: OptionalFloat
    fpr_at_95_tpr: OptionalFloat
    aurc: OptionalFloat
    augrc: OptionalFloat = None
    auroc_ci: tuple[OptionalFloat, OptionalFloat] = (None, None)
    aurc_ci: tuple[OptionalFloat, OptionalFloat] = (None, None)
    cv_aurc: OptionalFloat = None  # cross-validated on the fit split: what the choice used


class Rate(Strict):
    """A proportion with its 95% Clopper-Pearson interval."""

    rate: OptionalFloat
    ci: tuple[OptionalFloat, OptionalFloat]
    n: int


class Increment(Strict):
    """AUROC of the best MPS-using score (chosen on the fit split) minus that of the
    confidence-only score that also uses the class (``baseline``), on the held-out split, with
    a paired-bootstrap 95% interval."""

    baseline: str
    candidate: str
    auroc_diff: OptionalFloat
    ci: tuple[OptionalFloat, OptionalFloat]
    n_boot: int


class MannWhitneyResult(Strict):
    """Mann-Whitney U test of MPS area, incorrect vs correct (all items)."""

    u_statistic: OptionalFloat
    p_two_sided: OptionalFloat
    p_incorrect_larger: OptionalFloat  # one-sided: the paper's hypothesis
    rank_biserial: OptionalFloat  # > 0: incorrect MPSs tend to be larger
    direction: Literal["incorrect larger", "incorrect smaller", "no difference"]
    level: float
    n_incorrect: int
    n_correct: int


class HeldoutMetrics(Strict):
    """What the calibration measured. Counts and descriptive statistics use all items; the
    detection metrics use only items that fitted nothing they are scored with."""

    n_items: int
    n_correct: int
    n_incorrect: int
    accuracy: float
    n_fit: int
    n_holdout: int
    n_holdout_incorrect: int
    n_reference_correct: int  # held-out correct items forming the conformal reference
    n_evaluation_correct: int  # held-out correct items the false-alarm rate is measured on
    false_alarm_rate_holdout: OptionalFloat  # flagged share of evaluation-half correct items
    detection_rate_holdout: OptionalFloat  # flagged share of all held-out incorrect items
    scores: dict[ScoreKind, ScoreMetrics]  # ranking metrics on the whole held-out split
    # The deployed score's false-alarm rate under each threshold option, and its detection rate.
    false_alarm_rates: dict[str, Rate] = Field(default_factory=dict)
    detection_rate: Rate | None = None
    selected_score: str | None = None
    selection: str = ""  # why that score, in words
    mps_increment: Increment | None = None
    mean_area_correct: OptionalFloat
    median_area_correct: OptionalFloat
    mean_area_incorrect: OptionalFloat
    median_area_incorrect: OptionalFloat
    degenerate_fraction: float
    baseline_class_mode: int  # most common top-1 class of the all-baseline input
    baseline_class_mode_fraction: float  # share of items whose baseline input gets that class
    baseline_matches_prediction_fraction: float  # share of items predicted as their baseline class
    mann_whitney: MannWhitneyResult


class CalibrationArtifact(Strict):
    """The output of ``guard calibrate``: bound to one model and one engine configuration."""

    schema_version: Literal[2]
    created_at: datetime
    model: ModelInfo
    preprocessing: dict[str, Any] | None
    engine: dict[str, Any]  # engine settings that made the MPSs (validated by the caller)
    class_names: list[str]  # empty, or one per class
    detector: Detector
    metrics: HeldoutMetrics
    notes: list[str]
    # MPS areas of every calibration item, sorted: the distribution that serving compares its
    # recent areas with (drift). Absent from artifacts written before it existed.
    area_reference: list[Annotated[float, Field(ge=0, le=1)]] | None = None

    @model_validator(mode="after")
    def _fits_model(self) -> Self:
        n = self.model.num_classes
        if self.class_names and len(self.class_names) != n:
            raise ValueError(f"{len(self.class_names)} class names for a model with {n} classes")
        score = self.detector.score
        classes = list(self.detector.class_references)
        classes += list(score.area_model.per_class) if isinstance(score, MpsScore) else []
        outside = sorted({c for c in classes if not 0 <= c < n})
        if outside:
            raise ValueError(f"per-class fits for classes {outside} outside 0..{n - 1}")
        return self


def save_artifact(artifact: CalibrationArtifact, path: str | os.PathLike[str]) -> None:
    """Write the artifact as pretty JSON, atomically (a crash never leaves half a file)."""
    target = Path(path)
    text = artifact.model_dump_json(indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a calibration is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_artifact(
    path: str | os.PathLike[str],
    *,
    model_sha256: str | None = None,
    allow_model_mismatch: bool = False,
) -> CalibrationArtifact:
    """Read and validate an artifact; ``ConfigError`` if it is unusable or for another model."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read calibration file {source}: {exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"calibration file {source} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"calibration file {source} must hold a JSON object")
    version = raw.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise ConfigError(
            f"calibration file {source} has schema_version {version!r}; this guard reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}. Re-run guard calibrate."
        )
    try:
        if version == SCHEMA_VERSION:
            artifact = CalibrationArtifact.model_validate_json(text)
        else:
            artifact = CalibrationArtifact.model_validate(_from_version_1(raw))
    except (ValidationError, KeyError, TypeError) as exc:
        if not isinstance(exc, ValidationError):
            raise ConfigError(f"calibration file {source} is invalid: missing {exc}") from exc
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise ConfigError(f"calibration file {source} is invalid: {problems}{more}") from exc
    fitted = artifact.model.sha256
    if model_sha256 is not None and model_sha256 != fitted and not allow_model_mismatch:
        raise ConfigError(
            f"calibration was fitted on model sha256 {fitted[:12]}…, this model is "
            f"{model_sha256[:12]}…; re-run guard calibrate, or load it with allow_model_mismatch=True"
        )
    return artifact


def _from_version_1(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-1 document as version 2, behaving exactly as it did."""
    doc = dict(raw, schema_version=SCHEMA_VERSION)
    old = dict(doc["detector"])
    kind = old.pop("score_kind")
    area_model, combined = old.pop("area_model"), old.pop("combined")
    if kind == "mps":
        score: dict[str, Any] = {"kind": "mps", "area_model": area_model}
    elif kind == "msp":
        score = {"kind": "msp"}
    elif combined is not None:
        fitted = {k: combined[k] for k in ("means", "stds", "coefficients", "intercept")}
        score = {"kind": "combined", "terms": ["logit_mps_area", "msp", "margin"], **fitted}
    else:  # no regression could be fitted: the prior error rate for every prediction
        prior = min(max(area_model["prior_incorrect"], 1e-12), 1 - 1e-12)
        score = {
            "kind": "combined",
            "terms": ["msp"],
            "means": [0.0],
            "stds": [1.0],
            "coefficients": [0.0],
            "intercept": math.log(prior) - math.log1p(-prior),
        }
    doc["detector"] = {**old, "score": score}
    metrics = dict(doc["metrics"])
    metrics.pop("auroc_gain_combined_over_msp", None)
    doc["metrics"] = metrics
    # Version 1 engines tested the empty set first and drew the counter stream.
    doc["engine"] = {"empty_mps": True, "random_stream": "counter", **doc["engine"]}
    return doc


def score_prediction(
    artifact: CalibrationArtifact,
    *,
    mps_area_fraction: float | None = None,
    confidence: float,
    predicted_class: int,
    margin: float | None = None,
    features: dict[str, float] | None = None,
) -> Verdict:
    """Check one prediction against the calibration (numpy only; no refitting).

    ``features`` holds whatever else the calibrated score reads (``Detector.features``).
    """
    if mps_area_fraction is not None and not (
        math.isfinite(mps_area_fraction) and 0.0 <= mps_area_fraction <= 1.0
    ):
        raise ValueError(f"mps_area_fraction must be in [0, 1], got {mps_area_fraction}")
    if not math.isfinite(confidence):
        raise ValueError(f"confidence must be finite, got {confidence}")
    table: dict[str, list[float]] = {k: [v] for k, v in (features or {}).items()}
    table.update(msp=[confidence], predicted_class=[predicted_class])
    if mps_area_fraction is not None:
        table["mps_area_fraction"] = [mps_area_fraction]
    if margin is not None:
        table["margin"] = [margin]
    return artifact.detector.evaluate(table)[0]
