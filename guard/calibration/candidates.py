"""The candidate scores, fitted from per-item feature tables: one fitter per score, one registry.

Every fitter takes the feature table of the fit items and whether each was incorrect, and
returns the score's serialisable model (guard.verdict.scores). ``auto`` fits each candidate
whose features the records hold, compares them by cross-validated AURC on the fit split and
keeps the simplest that is not measurably worse (guard.calibration.fit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.linear_model import LogisticRegression

from guard.calibration import detection_metrics as metrics
from guard.verdict.scores import (
    AREA_EPS,
    CONFIDENCE_FEATURES,
    AreaDensity,
    AreaModel,
    ConfidenceScore,
    DensityPair,
    LinearScore,
    MpsScore,
    MspScore,
    ScoreModel,
    logit_area,
)
from guard.verdict.scores.linear import design_matrix

__all__ = [
    "CANDIDATES",
    "MPS_FEATURE_NAMES",
    "Table",
    "available",
    "fit_area_density",
    "fit_score",
]

Table = Mapping[str, NDArray[np.float64]]
Fitter = Callable[[Table, NDArray[np.bool_]], ScoreModel]

DENSITY_FLOOR_WEIGHT = 1e-3  # weight of the uniform component mixed into every density
MIN_BANDWIDTH = 0.05  # logit units; below this, areas differ by less than a few percent
MAX_GRID_POINTS = 1024
MIN_CLASS_ITEMS = 30
MIN_CLASS_ERRORS = 10
# Inverse L2 strength of the logistic scores, on standardised terms. Strong for the evidence
# model: its ~25 terms meet a few dozen errors in a typical calibration set.
CLASS_CONFIDENCE_C = 1.0
EVIDENCE_C = 0.1
# Evidence features from the MPS (guard.evidence); "degenerate"-like flags are features too.
MPS_FEATURE_NAMES = (
    "log_mps_area",
    "degenerate",
    "baseline_keeps_class",
    "mps_only_confidence",
    "mps_confidence_ratio",
    "complement_keeps_class",
    "complement_confidence",
    "complement_top_probability",
    "insertion_1",
    "insertion_2",
    "insertion_5",
    "insertion_10",
    "insertion_20",
    "insertion_auc",
    "responsibility_entropy",
    "responsibility_half_max_area",
    "responsibility_in_mps",
    "mps_components",
    "mps_centroid_distance",
    "seed_dice",
    "seed_log_area_ratio",
)


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


def fit_area_model(
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


def _confidence_features(table: Table) -> list[str]:
    return [name for name in CONFIDENCE_FEATURES if name in table]


def _best_confidence(table: Table, incorrect: NDArray[np.bool_]) -> ConfidenceScore:
    """The confidence feature with the lowest AURC on these items (entropy: higher is worse)."""
    best: tuple[float, str] | None = None
    for name in _confidence_features(table):
        higher_is_confident = name != "entropy"
        score = -table[name] if higher_is_confident else table[name]
        value = metrics.aurc(score, incorrect)
        if not math.isnan(value) and (best is None or value < best[0]):
            best = (value, name)
    name = best[1] if best is not None else "msp"
    return ConfidenceScore(feature=name, higher_is_confident=name != "entropy")


def _logistic(
    kind: str, table: Table, incorrect: NDArray[np.bool_], terms: list[str], c: float
) -> LinearScore:
    """L2-regularised logistic regression on standardised terms; the prior where one outcome."""
    x = design_matrix(table, terms)
    means = x.mean(axis=0)
    stds = x.std(axis=0)
    stds[stds < 1e-12] = 1.0  # a constant term: left unscaled, its weight shrinks to 0
    if incorrect.all() or not incorrect.any():
        prior = min(max(float(incorrect.mean()), 1e-12), 1 - 1e-12)
        coefficients, intercept = np.zeros(len(terms)), math.log(prior) - math.log1p(-prior)
    else:
        model = LogisticRegression(C=c, max_iter=2000).fit((x - means) / stds, incorrect)
        coefficients, intercept = model.coef_[0], float(model.intercept_[0])
    return LinearScore(
        kind=kind,  # type: ignore[arg-type]
        terms=terms,
        means=means.tolist(),
        stds=stds.tolist(),
        coefficients=np.asarray(coefficients).tolist(),
        intercept=intercept,
    )


def _classes(table: Table) -> list[int]:
    return sorted({int(c) for c in table["predicted_class"]})


def _fit_mps(table: Table, incorrect: NDArray[np.bool_]) -> MpsScore:
    return MpsScore(
        area_model=fit_area_model(
            table["mps_area_fraction"],
            table["predicted_class"].astype(np.int64),
            incorrect,
            min_class_items=MIN_CLASS_ITEMS,
            min_class_errors=MIN_CLASS_ERRORS,
            area_eps=AREA_EPS,
        )
    )


def _fit_msp(table: Table, incorrect: NDArray[np.bool_]) -> MspScore:
    return MspScore()


def _fit_combined(table: Table, incorrect: NDArray[np.bool_]) -> LinearScore:
    return _logistic("combined", table, incorrect, ["logit_mps_area", "msp", "margin"], 1.0)


def _fit_class_confidence(table: Table, incorrect: NDArray[np.bool_]) -> LinearScore:
    """The best confidence feature with an intercept and a slope per predicted class."""
    feature = _best_confidence(table, incorrect).feature
    classes = _classes(table)
    terms = [feature] + [f"class={c}" for c in classes] + [f"class={c}*{feature}" for c in classes]
    return _logistic("class-confidence", table, incorrect, terms, CLASS_CONFIDENCE_C)


def _fit_evidence(table: Table, incorrect: NDArray[np.bool_]) -> LinearScore:
    """Confidence features, the predicted class and every MPS evidence feature recorded."""
    mps = [name for name in MPS_FEATURE_NAMES if name in table]
    terms = _confidence_features(table) + [f"class={c}" for c in _classes(table)] + mps
    return _logistic("evidence", table, incorrect, terms, EVIDENCE_C)


CANDIDATES: dict[str, Fitter] = {
    "msp": _fit_msp,
    "confidence": _best_confidence,
    "class-confidence": _fit_class_confidence,
    "mps": _fit_mps,
    "combined": _fit_combined,
    "evidence": _fit_evidence,
}


def available(table: Table) -> list[str]:
    """The candidates the table's features allow (evidence needs MPS evidence features)."""
    kinds = ["msp", "confidence", "class-confidence"]
    if "mps_area_fraction" in table:
        kinds += ["mps", "combined"]
    if any(name in table for name in MPS_FEATURE_NAMES):
        kinds.append("evidence")
    return kinds


def fit_score(kind: str, table: Table, incorrect: ArrayLike) -> ScoreModel:
    """Fit one candidate on these items."""
    return CANDIDATES[kind](table, np.asarray(incorrect, dtype=bool))
