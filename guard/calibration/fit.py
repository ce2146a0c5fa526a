"""Fitting the check offline: area densities, combined score, conformal references, metrics.

Splits (all stratified on (correct, predicted class), deterministic for a seed):

1. fit split (``1 - holdout_fraction``): area densities, the prior error rate and the
   combined-score regression are fitted here and nowhere else.
2. held-out split, divided once more in halves:
   - reference half: its *correct* items' scores are the conformal reference (and their
     areas the small-tail reference);
   - evaluation half: its correct items give the reported false-alarm rate, which is
     therefore measured on items the threshold never saw.
   The detection rate uses every held-out incorrect item (both halves): the reference holds
   correct items only, so no incorrect item took part in setting the threshold. Ranking
   metrics (AUROC, AUPR-Error, FPR@95TPR, AURC) use the whole held-out split, since no
   score depends on the conformal reference.

Descriptive statistics (area means and medians, the Mann-Whitney test, degenerate share,
baseline class) use all items: they fit nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, get_args

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.linear_model import LogisticRegression

from guard.calibration import detection_metrics as metrics
from guard.calibration.records import ItemRecord
from guard.errors import InvalidInputError
from guard.numbers import count, mean, median, number
from guard.verdict.artifact import (
    SCHEMA_VERSION,
    AurocDifference,
    CalibrationArtifact,
    HeldoutMetrics,
    MannWhitneyResult,
    ModelInfo,
    ScoreMetrics,
)
from guard.verdict.conformal import ConformalReference
from guard.verdict.detector import Detector
from guard.verdict.scores import (
    AreaDensity,
    AreaModel,
    CombinedModel,
    DensityPair,
    ScoreKind,
    combined_features,
    logit_area,
    suspicion_scores,
)

__all__ = [
    "AREA_EPS",
    "FitResult",
    "artifact_from_fit",
    "conformal_references",
    "fit_area_density",
    "fit_calibration",
    "fit_combined",
    "stratified_split",
]

AREA_EPS = 1e-5  # areas are clipped to [eps, 1 - eps] before the logit; 0 and 1 do occur
DENSITY_FLOOR_WEIGHT = 1e-3  # weight of the uniform component mixed into every density
MIN_BANDWIDTH = 0.05  # logit units; below this, areas differ by less than a few percent
MAX_GRID_POINTS = 1024
DEGENERATE_NOTE_FRACTION = 0.5
BASELINE_NOTE_FRACTION = 0.2
FEW_ERRORS = 10
VOID_AUROC = 0.6  # below this (and >= 0.5) the MPS score is reported as close to chance

Indices = NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class FitResult:
    """A fitted detector plus what was measured on held-out data."""

    detector: Detector
    metrics: HeldoutMetrics
    notes: tuple[str, ...]
    fit_indices: Indices = field(repr=False)
    reference_indices: Indices = field(repr=False)  # held-out, conformal-reference half
    evaluation_indices: Indices = field(repr=False)  # held-out, evaluation half


def stratified_split(
    records: Sequence[ItemRecord], holdout_fraction: float = 0.5, seed: int = 0
) -> tuple[Indices, Indices]:
    """(fit_indices, holdout_indices), stratified on (correct, predicted_class).

    Every stratum, and every correctness group as a whole, gets the holdout fraction of its
    items up to rounding (within one item), so even strata of one or two items are spread
    fairly rather than all landing on one side.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    correct = np.array([r.correct for r in records], dtype=bool)
    predicted = np.array([r.predicted_class for r in records], dtype=np.int64)
    return _split(correct, predicted, holdout_fraction, np.random.default_rng(seed))


def _split(
    correct: NDArray[np.bool_],
    predicted: NDArray[np.int64],
    fraction: float,
    rng: np.random.Generator,
) -> tuple[Indices, Indices]:
    # Systematic sampling with a random start over items sorted by stratum (random order
    # within): any contiguous run of m items gets floor or ceil of m * fraction chosen.
    n = correct.size
    order = np.lexsort((rng.random(n), predicted, ~correct))
    start = rng.random()
    i = np.arange(n)
    chosen = np.floor((i + 1) * fraction + start) > np.floor(i * fraction + start)
    return np.sort(order[~chosen]), np.sort(order[chosen])


def _bandwidth(x: NDArray[np.float64]) -> float:
    """Silverman's robust rule; falls back when the data have no spread (e.g. one point)."""
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    q75, q25 = np.percentile(x, [75, 25])
    iqr = float(q75 - q25)
    spread = min(std, iqr / 1.349) if iqr > 0 else std
    if spread <= 0:
        spread = 1.0  # no spread to learn from: a nominal width of one logit unit
    return max(0.9 * spread * x.size ** (-0.2), MIN_BANDWIDTH)


def fit_area_density(logit_mps_area: ArrayLike, *, area_eps: float = AREA_EPS) -> AreaDensity:
    """Gaussian KDE of logit(area), stored as log-density on a grid covering the data +- 6h."""
    x = np.asarray(logit_mps_area, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("a density needs at least one item")
    h = _bandwidth(x)
    lo, hi = float(x.min()) - 6 * h, float(x.max()) + 6 * h
    step = h / 4
    points = int(math.ceil((hi - lo) / step)) + 1
    if points > MAX_GRID_POINTS:
        points = MAX_GRID_POINTS
        step = (hi - lo) / (points - 1)
    # Linear binning onto the grid, then a convolution with the sampled Gaussian kernel:
    # cost independent of the number of items, error O(step^2).
    position = (x - lo) / step
    left = np.clip(np.floor(position).astype(np.int64), 0, points - 2)
    right_weight = position - left
    weights = np.bincount(left, 1 - right_weight, points) + np.bincount(
        left + 1, right_weight, points
    )
    half = int(math.ceil(6 * h / step))
    offsets = np.arange(-half, half + 1) * step
    kernel = np.exp(-0.5 * (offsets / h) ** 2) / (h * math.sqrt(2 * math.pi))
    density = np.convolve(weights, kernel)[half : half + points] / x.size
    # Uniform component over the logit axis that clipped areas can reach.
    floor = DENSITY_FLOOR_WEIGHT / (2 * float(logit_area(1.0 - area_eps, area_eps)))
    log_density = np.log((1 - DENSITY_FLOOR_WEIGHT) * density + floor)
    return AreaDensity(
        grid_start=lo,
        grid_step=step,
        log_density=log_density.tolist(),
        log_floor=math.log(floor),
        bandwidth=h,
        n=int(x.size),
    )


def _density_pair(
    x: NDArray[np.float64], incorrect: NDArray[np.bool_], area_eps: float
) -> DensityPair:
    correct_x, incorrect_x = x[~incorrect], x[incorrect]
    return DensityPair(
        correct=fit_area_density(correct_x, area_eps=area_eps) if correct_x.size else None,
        incorrect=fit_area_density(incorrect_x, area_eps=area_eps) if incorrect_x.size else None,
    )


def _fit_area_model(
    area: NDArray[np.float64],
    predicted: NDArray[np.int64],
    incorrect: NDArray[np.bool_],
    *,
    min_class_items: int,
    min_class_errors: int,
    area_eps: float,
) -> AreaModel:
    x = logit_area(area, area_eps)
    per_class: dict[int, DensityPair] = {}
    for c in np.unique(predicted):
        rows = predicted == c
        n_incorrect = int(incorrect[rows].sum())
        if rows.sum() - n_incorrect >= min_class_items and n_incorrect >= min_class_errors:
            per_class[int(c)] = _density_pair(x[rows], incorrect[rows], area_eps)
    return AreaModel(
        area_eps=area_eps,
        prior_incorrect=float(incorrect.mean()),
        pooled=_density_pair(x, incorrect, area_eps),
        per_class=per_class,
    )


def fit_combined(
    mps_area_fraction: ArrayLike,
    confidence: ArrayLike,
    margin: ArrayLike,
    incorrect: ArrayLike,
    *,
    area_eps: float = AREA_EPS,
) -> CombinedModel | None:
    """Logistic regression of "incorrect" on standardised [logit(area), confidence, margin].

    None when the data hold one outcome only (nothing to regress on).
    """
    y = np.asarray(incorrect, dtype=bool)
    if y.all() or not y.any():
        return None
    features = combined_features(mps_area_fraction, confidence, margin, area_eps)
    means = features.mean(axis=0)
    stds = features.std(axis=0)
    stds[stds < 1e-12] = 1.0  # a constant feature: leave it unscaled, its weight shrinks to 0
    regression = LogisticRegression(max_iter=1000).fit((features - means) / stds, y)
    return CombinedModel(
        means=means.tolist(),
        stds=stds.tolist(),
        coefficients=regression.coef_[0].tolist(),
        intercept=float(regression.intercept_[0]),
    )


def conformal_references(
    correct_scores: ArrayLike,
    correct_areas: ArrayLike,
    *,
    alpha: float,
    flag_small_tail: bool,
) -> tuple[ConformalReference, ConformalReference | None]:
    """Conformal references from held-out correct predictions that fitted nothing else.

    With the small tail on, each tail gets alpha/2 so that the union of both alarms keeps
    the false-alarm rate on correct predictions <= alpha.
    """
    per_tail = alpha / 2 if flag_small_tail else alpha
    score_reference = ConformalReference.from_values(correct_scores, per_tail)
    small = -np.asarray(correct_areas, dtype=np.float64)
    small_reference = ConformalReference.from_values(small, per_tail) if flag_small_tail else None
    return score_reference, small_reference


def _minimum_reference(alpha: float) -> int:
    """Fewest reference items for which the smallest p-value, 1/(n+1), reaches alpha."""
    n = max(0, math.ceil(1 / alpha) - 1)
    while 1 / (n + 1) > alpha:
        n += 1
    return n


def fit_calibration(
    records: Sequence[ItemRecord],
    *,
    alpha: float = 0.05,
    score: ScoreKind = "mps",
    holdout_fraction: float = 0.5,
    seed: int = 0,
    flag_small_tail: bool = False,
    min_class_items: int = 30,
    min_class_errors: int = 10,
    n_boot: int = 2000,
) -> FitResult:
    """Fit the check on labelled records and measure it on held-out ones (see module doc)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if score not in get_args(ScoreKind):
        raise ValueError(f"score must be one of {get_args(ScoreKind)}, got {score!r}")
    n = len(records)
    area = np.array([r.mps_area_fraction for r in records], dtype=np.float64)
    confidence = np.array([r.confidence for r in records], dtype=np.float64)
    margin = np.array([r.margin for r in records], dtype=np.float64)
    predicted = np.array([r.predicted_class for r in records], dtype=np.int64)
    incorrect = np.array([not r.correct for r in records], dtype=bool)
    fit_idx, holdout_idx = stratified_split(records, holdout_fraction, seed)
    if fit_idx.size == 0 or holdout_idx.size == 0:
        raise InvalidInputError(
            f"calibration needs labelled items on both sides of the split; got {n} in all"
        )

    area_model = _fit_area_model(
        area[fit_idx],
        predicted[fit_idx],
        incorrect[fit_idx],
        min_class_items=min_class_items,
        min_class_errors=min_class_errors,
        area_eps=AREA_EPS,
    )
    combined = fit_combined(
        area[fit_idx], confidence[fit_idx], margin[fit_idx], incorrect[fit_idx], area_eps=AREA_EPS
    )
    kinds: tuple[ScoreKind, ...] = get_args(ScoreKind)
    scores = {
        kind: suspicion_scores(
            kind,
            area_model,
            combined,
            mps_area_fraction=area,
            confidence=confidence,
            predicted_class=predicted,
            margin=margin,
        )
        for kind in kinds
    }

    # Held-out split: a conformal-reference half and an evaluation half.
    rng = np.random.default_rng([seed, 1])
    ref_local, eval_local = _split(~incorrect[holdout_idx], predicted[holdout_idx], 0.5, rng)
    reference_idx, evaluation_idx = holdout_idx[ref_local], holdout_idx[eval_local]
    reference_correct = reference_idx[~incorrect[reference_idx]]
    score_reference, small_reference = conformal_references(
        scores[score][reference_correct],
        area[reference_correct],
        alpha=alpha,
        flag_small_tail=flag_small_tail,
    )
    detector = Detector(
        score_kind=score,
        alpha=alpha,
        flag_small_tail=flag_small_tail,
        area_model=area_model,
        combined=combined,
        score_reference=score_reference,
        small_tail_reference=small_reference,
    )
    evaluation_correct = evaluation_idx[~incorrect[evaluation_idx]]
    holdout_incorrect = holdout_idx[incorrect[holdout_idx]]

    def flag_rate(idx: Indices) -> float:
        if idx.size == 0:
            return float("nan")
        verdicts = detector.evaluate(
            mps_area_fraction=area[idx],
            confidence=confidence[idx],
            predicted_class=predicted[idx],
            margin=margin[idx],
        )
        return float(verdicts.flagged.mean())

    y_hold = incorrect[holdout_idx]
    score_metrics = {
        kind: ScoreMetrics(
            auroc=metrics.auroc(scores[kind][holdout_idx], y_hold),
            aupr_error=metrics.aupr_error(scores[kind][holdout_idx], y_hold),
            fpr_at_95_tpr=metrics.fpr_at_95_tpr(scores[kind][holdout_idx], y_hold),
            aurc=metrics.aurc(scores[kind][holdout_idx], y_hold),
        )
        for kind in kinds
    }
    gain = metrics.bootstrap_auroc_difference(
        scores["combined"][holdout_idx],
        scores["msp"][holdout_idx],
        y_hold,
        n_boot=n_boot,
        seed=seed,
    )
    baseline = np.array([r.baseline_class for r in records], dtype=np.int64)
    baseline_values, baseline_counts = np.unique(baseline, return_counts=True)
    mode_at = int(np.argmax(baseline_counts))
    result_metrics = HeldoutMetrics(
        n_items=n,
        n_correct=int((~incorrect).sum()),
        n_incorrect=int(incorrect.sum()),
        accuracy=float((~incorrect).mean()),
        n_fit=int(fit_idx.size),
        n_holdout=int(holdout_idx.size),
        n_holdout_incorrect=int(holdout_incorrect.size),
        n_reference_correct=int(reference_correct.size),
        n_evaluation_correct=int(evaluation_correct.size),
        false_alarm_rate_holdout=flag_rate(evaluation_correct),
        detection_rate_holdout=flag_rate(holdout_incorrect),
        scores=score_metrics,
        mean_area_correct=mean(area[~incorrect]),
        median_area_correct=median(area[~incorrect]),
        mean_area_incorrect=mean(area[incorrect]),
        median_area_incorrect=median(area[incorrect]),
        degenerate_fraction=float(np.mean([r.degenerate for r in records])),
        baseline_class_mode=int(baseline_values[mode_at]),
        baseline_class_mode_fraction=float(baseline_counts[mode_at] / n),
        baseline_matches_prediction_fraction=float(np.mean(baseline == predicted)),
        mann_whitney=MannWhitneyResult(
            **metrics.mann_whitney_area(area[incorrect], area[~incorrect])
        ),
        auroc_gain_combined_over_msp=AurocDifference(
            estimate=gain[0], ci_low=gain[1], ci_high=gain[2], n_boot=n_boot
        ),
    )
    notes = _notes(
        result_metrics,
        area_model,
        combined,
        score_reference,
        fit_incorrect=int(incorrect[fit_idx].sum()),
        fit_correct=int((~incorrect[fit_idx]).sum()),
        fit_classes=np.unique(predicted[fit_idx]),
        detector=detector,
        min_class_items=min_class_items,
        min_class_errors=min_class_errors,
    )
    return FitResult(
        detector=detector,
        metrics=result_metrics,
        notes=tuple(notes),
        fit_indices=fit_idx,
        reference_indices=reference_idx,
        evaluation_indices=evaluation_idx,
    )


def _notes(
    m: HeldoutMetrics,
    area_model: AreaModel,
    combined: CombinedModel | None,
    score_reference: ConformalReference,
    *,
    fit_incorrect: int,
    fit_correct: int,
    fit_classes: NDArray[np.int64],
    detector: Detector,
    min_class_items: int,
    min_class_errors: int,
) -> list[str]:
    """Plain-language caveats: when a number means less than it seems, say so."""
    notes: list[str] = []
    if fit_incorrect == 0:
        notes.append(
            "No incorrect predictions in the fit split: the MPS and combined scores carry no "
            "information (every prediction gets the same score, so they flag nothing). "
            "Calibrate on data where the model makes mistakes."
        )
    elif fit_incorrect < FEW_ERRORS:
        notes.append(
            f"Only {count(fit_incorrect, 'incorrect prediction')} in the fit split: the area "
            "distribution of errors is poorly estimated and the MPS score is noisy. Use "
            "more labelled data."
        )
    if fit_correct == 0:
        notes.append(
            "No correct predictions in the fit split: the MPS score carries no information."
        )
    if combined is None:
        notes.append(
            "The combined score could not be fitted (the fit split has one outcome only); it "
            "equals the prior error rate for every prediction."
        )
    if m.n_holdout_incorrect < FEW_ERRORS:
        notes.append(
            f"Only {count(m.n_holdout_incorrect, 'incorrect prediction')} in the held-out "
            "split: AUROC, AUPR-Error, FPR@95TPR and the detection rate are very uncertain."
        )
    own = sorted(area_model.per_class)
    pooled = [int(c) for c in fit_classes if int(c) not in area_model.per_class]
    if fit_incorrect and pooled:
        rule = (
            f"a class needs >= {min_class_items} correct and >= {min_class_errors} incorrect "
            "fit items for its own"
        )
        if own:
            notes.append(
                f"Per-class area distributions for {len(own)} of "
                f"{len(own) + len(pooled)} predicted classes; the others use the pooled "
                f"distributions ({rule})."
            )
        else:
            notes.append(f"All predicted classes use the pooled area distributions ({rule}).")
    if m.degenerate_fraction >= DEGENERATE_NOTE_FRACTION:
        notes.append(
            f"{m.degenerate_fraction:.0%} of MPSs are degenerate (empty or a single chunk): "
            "for this model and baseline the MPS size carries little information. Try "
            "another baseline, e.g. a blurred copy of the image instead of a constant."
        )
    if m.baseline_matches_prediction_fraction >= BASELINE_NOTE_FRACTION:
        notes.append(
            f"For {m.baseline_matches_prediction_fraction:.0%} of items the all-baseline "
            f"input already gets the predicted class (most common baseline class: "
            f"{m.baseline_class_mode}, {m.baseline_class_mode_fraction:.0%} of items), so "
            "their MPSs are empty or minimal whatever the image shows: MPS size says nothing "
            "about those predictions. Try another baseline, e.g. a blurred one."
        )
    mps_auroc = m.scores["mps"].auroc
    if mps_auroc is None:
        notes.append(
            "The MPS score's AUROC is undefined on the held-out split (constant score or "
            "one outcome only)."
        )
    elif mps_auroc < 0.5:
        notes.append(
            f"AUROC of the MPS score on held-out data is {mps_auroc:.2f} (< 0.5): the "
            "direction learned on the fit split did not generalise. Do not rely on the MPS "
            "score for this model."
        )
    elif mps_auroc < VOID_AUROC:
        notes.append(
            f"AUROC of the MPS score on held-out data is {mps_auroc:.2f}: MPS size separates "
            "errors from correct predictions barely better than chance for this model, data and "
            "baseline, so alarms from it carry little information. Consider another baseline, "
            "more labelled errors, or the msp/combined score."
        )
    gain = m.auroc_gain_combined_over_msp
    notes.append(
        f"Held-out AUROC: MSP {number(m.scores['msp'].auroc, 2)}, MPS area "
        f"{number(mps_auroc, 2)}, combined {number(m.scores['combined'].auroc, 2)}."
    )
    if gain.estimate is not None and gain.ci_low is not None and gain.ci_high is not None:
        verdict = (
            "a measurable gain"
            if gain.ci_low > 0
            else ("a measurable loss" if gain.ci_high < 0 else "no measurable gain")
        )
        notes.append(
            f"The combined score (MPS area, MSP and margin) changes AUROC over MSP alone by "
            f"{gain.estimate:+.3f} (95% CI {gain.ci_low:+.3f} to {gain.ci_high:+.3f}): {verdict}; "
            "part of any gain may come from the margin rather than the MPS."
        )
    if score_reference.threshold is None:
        needed = _minimum_reference(score_reference.alpha)
        notes.append(
            "The conformal reference has only "
            f"{count(m.n_reference_correct, 'held-out correct prediction')}; at least "
            f"{needed} are needed for alpha={score_reference.alpha:g}, "
            "so nothing will be flagged. Use more labelled data or a larger alpha."
        )
    if detector.flag_small_tail:
        notes.append(
            f"Unusually small MPSs are flagged too; each tail is tested at alpha/2 = "
            f"{detector.alpha / 2:g}, so at most alpha = {detector.alpha:g} of correct "
            "predictions are flagged in all."
        )
    return notes


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
