"""The calibration artifact: a versioned JSON document, and the per-prediction check it drives.

Everything fitted offline is stored as plain numbers (density grids, regression
coefficients, sorted conformal references), so serving needs numpy only: no scipy or
scikit-learn objects, no refitting, and no code path to unpickling.

Scoring a prediction:

- ``mps`` score: posterior probability that the prediction is incorrect given its MPS area,
  P(incorrect | area) = pi f1(a) / (pi f1(a) + (1 - pi) f0(a)), with f1/f0 the area densities
  of incorrect/correct predictions (per predicted class where fitted, else pooled) and pi the
  fit-split error rate. Whether large or small areas are suspicious is whatever the densities
  say; nothing assumes the paper's direction.
- ``msp`` score: 1 - confidence. ``combined``: a logistic regression on logit(area),
  confidence and margin.
- Alarm: conformal p-value of the score against held-out correct predictions,
  p = (1 + #{s_i >= s}) / (n + 1); flagged when p <= alpha, so a correct prediction is
  flagged with probability at most alpha (exchangeability). With ``flag_small_tail`` a second p-value
  on -area against the held-out correct areas flags "myopic" (unusually small) MPSs; each
  tail is then tested at alpha/2, so by the union bound the total false-alarm rate on correct
  predictions stays <= alpha. The verdict's p-value is then the Bonferroni one,
  min(1, 2 min(p_score, p_small)), so ``flagged == (p_value <= alpha)`` always holds.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from guard.errors import ConfigError

if TYPE_CHECKING:
    from calibration.fit import FitResult

__all__ = [
    "AreaDensity",
    "AreaModel",
    "AurocDifference",
    "CalibrationArtifact",
    "CombinedModel",
    "ConformalReference",
    "DensityPair",
    "Detector",
    "HeldoutMetrics",
    "MannWhitneyResult",
    "ModelInfo",
    "SCORE_REASON",
    "ScoreKind",
    "ScoreMetrics",
    "Verdict",
    "Verdicts",
    "artifact_from_fit",
    "combined_features",
    "load_artifact",
    "logit_area",
    "posterior_incorrect",
    "save_artifact",
    "score_prediction",
    "suspicion_scores",
]

SCHEMA_VERSION = 1
ScoreKind = Literal["mps", "msp", "combined"]
Reason = Literal["ok", "suspicious_mps_area", "low_confidence", "suspicious_combined", "myopic_mps"]
COMBINED_FEATURES = ("logit_mps_area", "confidence", "margin")
SCORE_REASON: dict[str, Reason] = {
    "mps": "suspicious_mps_area",
    "msp": "low_confidence",
    "combined": "suspicious_combined",
}


class _Strict(BaseModel):
    # Unknown fields are refused at every level, so a misspelt key cannot be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _Derived:
    """numpy copies of a model's list fields, made once for cheap scoring.

    Derived from the fields, so never part of equality (pydantic compares private
    attributes, and arrays cannot be compared to a bool).
    """

    __slots__ = ("arrays",)

    def __init__(self, *arrays: NDArray[np.float64]) -> None:
        self.arrays = arrays

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Derived)

    __hash__ = None  # type: ignore[assignment]


def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


# An undefined metric (NaN in Python) is stored as JSON null: strict JSON has no NaN.
OptionalFloat = Annotated[float | None, BeforeValidator(_nan_to_none)]


class ModelInfo(_Strict):
    """The classifier the calibration belongs to."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_name: str
    layout: Literal["NCHW", "NHWC"]
    channels: int = Field(ge=1)
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    output_name: str
    num_classes: int = Field(ge=2)


def logit_area(mps_area_fraction: ArrayLike, eps: float) -> NDArray[np.float64]:
    """logit(clip(area, eps, 1 - eps)): the axis on which area densities live."""
    a = np.clip(np.asarray(mps_area_fraction, dtype=np.float64), eps, 1.0 - eps)
    return np.log(a) - np.log1p(-a)


class AreaDensity(_Strict):
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
    _arrays: _Derived = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        values = np.asarray(self.log_density, dtype=np.float64)
        self._arrays = _Derived(self.grid_start + self.grid_step * np.arange(values.size), values)

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


class DensityPair(_Strict):
    """Area densities of correct and of incorrect predictions; None where there were none."""

    correct: AreaDensity | None
    incorrect: AreaDensity | None


class AreaModel(_Strict):
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


class CombinedModel(_Strict):
    """Logistic regression on standardised [logit(area), confidence, margin]."""

    feature_names: list[str] = Field(default=list(COMBINED_FEATURES))
    means: list[float] = Field(min_length=3, max_length=3)
    stds: list[float] = Field(min_length=3, max_length=3)
    coefficients: list[float] = Field(min_length=3, max_length=3)
    intercept: float

    @model_validator(mode="after")
    def _check(self) -> Self:
        if tuple(self.feature_names) != COMBINED_FEATURES:
            raise ValueError(f"feature_names must be {list(COMBINED_FEATURES)}")
        if any(s <= 0 for s in self.stds):
            raise ValueError("feature stds must be positive")
        return self

    def probability_incorrect(self, features: NDArray[np.float64]) -> NDArray[np.float64]:
        """P(incorrect) for rows of raw (unstandardised) features."""
        z = (features - np.asarray(self.means)) / np.asarray(self.stds)
        logit = z @ np.asarray(self.coefficients) + self.intercept
        return 0.5 * (1.0 + np.tanh(0.5 * logit))


def combined_features(
    mps_area_fraction: ArrayLike, confidence: ArrayLike, margin: ArrayLike, eps: float
) -> NDArray[np.float64]:
    """Feature rows [logit(area), confidence, margin] of the combined score."""
    return np.column_stack(
        [
            logit_area(mps_area_fraction, eps),
            np.asarray(confidence, dtype=np.float64),
            np.asarray(margin, dtype=np.float64),
        ]
    )


def suspicion_scores(
    kind: ScoreKind,
    area_model: AreaModel,
    combined: CombinedModel | None,
    *,
    mps_area_fraction: ArrayLike,
    confidence: ArrayLike,
    predicted_class: ArrayLike,
    margin: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Scores of a batch of predictions (higher is more suspicious); numpy only."""
    area = np.atleast_1d(np.asarray(mps_area_fraction, dtype=np.float64))
    if kind == "mps":
        classes = np.atleast_1d(np.asarray(predicted_class, dtype=np.int64))
        return _mps_scores(area_model, area, classes)
    conf = np.atleast_1d(np.asarray(confidence, dtype=np.float64))
    if kind == "msp":
        return 1.0 - conf
    if margin is None:
        raise ValueError("the combined score needs the margin (top-1 minus top-2 probability)")
    if combined is None:
        # No regression could be fitted (one class only): no information beyond the prior.
        return np.full(area.shape, area_model.prior_incorrect)
    features = combined_features(area, conf, np.atleast_1d(margin), area_model.area_eps)
    return combined.probability_incorrect(features)


def _largest_count(n: int, alpha: float) -> int:
    """Largest c with (1 + c) / (n + 1) <= alpha, or -1: how many reference values may be >= s."""
    c = math.floor(alpha * (n + 1)) - 1
    # Settle float rounding with the same comparison the p-values use.
    while (c + 2) / (n + 1) <= alpha:
        c += 1
    while c >= 0 and (c + 1) / (n + 1) > alpha:
        c -= 1
    return c


class ConformalReference(_Strict):
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
    _arrays: _Derived = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        self._arrays = _Derived(np.asarray(self.values, dtype=np.float64))

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


class Detector(_Strict):
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


class ScoreMetrics(_Strict):
    """Error detection by one score on the held-out split (None: undefined there)."""

    auroc: OptionalFloat
    aupr_error: OptionalFloat
    fpr_at_95_tpr: OptionalFloat
    aurc: OptionalFloat


class MannWhitneyResult(_Strict):
    """Mann-Whitney U test of MPS area, incorrect vs correct (all items)."""

    u_statistic: OptionalFloat
    p_two_sided: OptionalFloat
    p_incorrect_larger: OptionalFloat  # one-sided: the paper's hypothesis
    rank_biserial: OptionalFloat  # > 0: incorrect MPSs tend to be larger
    direction: Literal["incorrect larger", "incorrect smaller", "no difference"]
    level: float
    n_incorrect: int
    n_correct: int


class AurocDifference(_Strict):
    """AUROC(combined) - AUROC(msp) on the held-out split, 95% paired-bootstrap interval."""

    estimate: OptionalFloat
    ci_low: OptionalFloat
    ci_high: OptionalFloat
    n_boot: int


class HeldoutMetrics(_Strict):
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
    mean_area_correct: OptionalFloat
    median_area_correct: OptionalFloat
    mean_area_incorrect: OptionalFloat
    median_area_incorrect: OptionalFloat
    degenerate_fraction: float
    baseline_class_mode: int  # most common top-1 class of the all-baseline input
    baseline_class_mode_fraction: float  # share of items whose baseline input gets that class
    baseline_matches_prediction_fraction: float  # share of items predicted as their baseline class
    mann_whitney: MannWhitneyResult
    auroc_gain_combined_over_msp: AurocDifference


class CalibrationArtifact(_Strict):
    """The output of ``guard calibrate``: bound to one model and one engine configuration."""

    schema_version: Literal[1]
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
        outside = [c for c in self.detector.area_model.per_class if not 0 <= c < n]
        if outside:
            raise ValueError(f"per-class densities for classes {outside} outside 0..{n - 1}")
        return self


def artifact_from_fit(
    fit: FitResult,
    *,
    model: ModelInfo,
    preprocessing: dict[str, Any] | None,
    engine: dict[str, Any],
    class_names: list[str],
    area_reference: ArrayLike | None = None,
) -> CalibrationArtifact:
    """Bind a fit to the model and engine settings that produced its records."""
    return CalibrationArtifact(
        schema_version=SCHEMA_VERSION,
        created_at=datetime.now(UTC),
        model=model,
        preprocessing=preprocessing,
        engine=engine,
        class_names=list(class_names),
        detector=fit.detector,
        metrics=fit.metrics,
        notes=list(fit.notes),
        area_reference=None
        if area_reference is None
        else np.sort(np.asarray(area_reference, dtype=np.float64)).tolist(),
    )


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
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"calibration file {source} has schema_version {version!r}; this guard reads "
            f"version {SCHEMA_VERSION}. Re-run guard calibrate."
        )
    try:
        artifact = CalibrationArtifact.model_validate_json(text)
    except ValidationError as exc:
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


def score_prediction(
    artifact: CalibrationArtifact,
    *,
    mps_area_fraction: float,
    confidence: float,
    predicted_class: int,
    margin: float | None = None,
) -> Verdict:
    """Check one prediction against the calibration (numpy only; no refitting).

    ``margin`` is needed only for the ``combined`` score kind.
    """
    if not (math.isfinite(mps_area_fraction) and 0.0 <= mps_area_fraction <= 1.0):
        raise ValueError(f"mps_area_fraction must be in [0, 1], got {mps_area_fraction}")
    if not math.isfinite(confidence):
        raise ValueError(f"confidence must be finite, got {confidence}")
    verdicts = artifact.detector.evaluate(
        mps_area_fraction=[mps_area_fraction],
        confidence=[confidence],
        predicted_class=[predicted_class],
        margin=None if margin is None else [margin],
    )
    reason: Reason = verdicts.reason[0].item()
    return Verdict(
        score=float(verdicts.score[0]),
        p_value=float(verdicts.p_value[0]),
        flagged=bool(verdicts.flagged[0]),
        reason=reason,
    )
