"""Error-detection metrics for suspicion scores.

Conventions throughout: the positive class is an *incorrect* prediction and a higher score
is more suspicious. Degenerate inputs (one class only, constant or non-finite scores) give
NaN instead of raising or warning, so a report can print "n/a" and carry on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import mannwhitneyu, rankdata
from sklearn.metrics import average_precision_score
from sklearn.metrics import roc_curve as _sk_roc_curve

__all__ = [
    "augrc",
    "aupr_error",
    "bootstrap_difference",
    "bootstrap_interval",
    "aurc",
    "auroc",
    "bootstrap_auroc_difference",
    "fpr_at_95_tpr",
    "mann_whitney_area",
    "risk_coverage_curve",
    "roc_curve",
]

_NAN = float("nan")


def _as_arrays(
    score: ArrayLike, incorrect: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    s = np.asarray(score, dtype=np.float64).ravel()
    y = np.asarray(incorrect).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} correctness labels")
    return s, y


def _rankable(s: NDArray[np.float64], y: NDArray[np.bool_]) -> bool:
    """Whether a ranking metric is defined: both classes present, scores finite and not constant."""
    n_incorrect = int(y.sum())
    return 0 < n_incorrect < y.size and bool(np.all(np.isfinite(s))) and bool(np.ptp(s) > 0)


def auroc(score: ArrayLike, incorrect: ArrayLike) -> float:
    """Area under the ROC curve: P(score of an error > score of a correct item), ties count half."""
    s, y = _as_arrays(score, incorrect)
    if not _rankable(s, y):
        return _NAN
    # Mann-Whitney form with midranks; equal to sklearn's trapezoidal AUROC, and cheap.
    ranks = rankdata(s)
    n1 = float(y.sum())
    n0 = float(y.size) - n1
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def aupr_error(score: ArrayLike, incorrect: ArrayLike) -> float:
    """Average precision with errors as positives (AUPR-Error)."""
    s, y = _as_arrays(score, incorrect)
    if not _rankable(s, y):
        return _NAN
    return float(average_precision_score(y, s))


def roc_curve(
    score: ArrayLike, incorrect: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(fpr, tpr) at every distinct threshold; both ``[nan]`` on degenerate input."""
    s, y = _as_arrays(score, incorrect)
    if not _rankable(s, y):
        return np.array([_NAN]), np.array([_NAN])
    fpr, tpr, _ = _sk_roc_curve(y, s, drop_intermediate=False)
    return fpr.astype(np.float64), tpr.astype(np.float64)


def fpr_at_95_tpr(score: ArrayLike, incorrect: ArrayLike) -> float:
    """Share of correct items flagged at the strictest threshold that catches >= 95% of errors."""
    fpr, tpr = roc_curve(score, incorrect)
    if np.isnan(tpr[0]):
        return _NAN
    return float(fpr[int(np.searchsorted(tpr, 0.95, side="left"))])


def risk_coverage_curve(
    score: ArrayLike, incorrect: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(coverage, risk) when accepting the least suspicious items first.

    At coverage k/n, risk is the error rate among the k accepted items. Tied scores are
    accepted in random order, and the risk given is its expectation (exact, not sampled), so
    a constant score has risk equal to the overall error rate everywhere. Defined for one
    class too; empty arrays on empty or non-finite input.
    """
    s, y = _as_arrays(score, incorrect)
    if s.size == 0 or not np.all(np.isfinite(s)):
        return np.array([], dtype=np.float64), np.array([], dtype=np.float64)
    order = np.argsort(s, kind="stable")
    s_sorted, y_sorted = s[order], y[order].astype(np.float64)
    _, starts, counts = np.unique(s_sorted, return_index=True, return_counts=True)
    group_errors = np.add.reduceat(y_sorted, starts)
    errors_before = np.cumsum(group_errors) - group_errors
    group = np.repeat(np.arange(starts.size), counts)
    k = np.arange(1, s.size + 1, dtype=np.float64)
    taken_from_group = k - starts[group]
    expected_errors = errors_before[group] + taken_from_group * group_errors[group] / counts[group]
    return k / s.size, expected_errors / k


def aurc(score: ArrayLike, incorrect: ArrayLike) -> float:
    """Area under the risk-coverage curve (mean risk over coverages 1/n..1); lower is better."""
    _, risk = risk_coverage_curve(score, incorrect)
    return float(risk.mean()) if risk.size else _NAN


def augrc(score: ArrayLike, incorrect: ArrayLike) -> float:
    """Area under the generalized risk-coverage curve (Traub et al. 2024): the mean over
    coverages of the share of *all* items that are accepted errors; lower is better."""
    coverage, risk = risk_coverage_curve(score, incorrect)
    return float((risk * coverage).mean()) if risk.size else _NAN


Metric = Callable[[ArrayLike, ArrayLike], float]


def _resamples(n: int, n_boot: int, seed: int) -> NDArray[np.int64]:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_interval(
    metric: Metric, score: ArrayLike, incorrect: ArrayLike, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of a metric over bootstrap resamples of items.

    Resamples where the metric is undefined are skipped; NaN when more than half are.
    """
    s, y = _as_arrays(score, incorrect)
    if s.size == 0 or n_boot <= 0:
        return _NAN, _NAN
    values = np.array([metric(s[idx], y[idx]) for idx in _resamples(s.size, n_boot, seed)])
    return _interval(values, n_boot)


def bootstrap_difference(
    metric: Metric,
    score_a: ArrayLike,
    score_b: ArrayLike,
    incorrect: ArrayLike,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """metric(a) - metric(b) and its 95% interval from a paired bootstrap over items."""
    a, y = _as_arrays(score_a, incorrect)
    b, _ = _as_arrays(score_b, incorrect)
    if a.shape != b.shape:
        raise ValueError(f"score_a has {a.size} items, score_b {b.size}")
    estimate = metric(a, y) - metric(b, y)
    if np.isnan(estimate) or n_boot <= 0:
        return float(estimate), _NAN, _NAN
    diffs = np.array(
        [metric(a[i], y[i]) - metric(b[i], y[i]) for i in _resamples(a.size, n_boot, seed)]
    )
    return (float(estimate), *_interval(diffs, n_boot))


def _interval(values: NDArray[np.float64], n_boot: int) -> tuple[float, float]:
    """95% percentile interval of the finite resampled values; NaN if more than half are not."""
    values = values[np.isfinite(values)]
    if values.size < n_boot / 2:
        return _NAN, _NAN
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def mann_whitney_area(
    area_incorrect: ArrayLike, area_correct: ArrayLike, *, level: float = 0.05
) -> dict[str, Any]:
    """Mann-Whitney U test of MPS area, incorrect vs correct predictions.

    Keys: ``u_statistic`` (U of the incorrect group), ``p_two_sided``, ``p_incorrect_larger``
    (one-sided, the paper's hypothesis), ``rank_biserial`` (2U/(n1 n0) - 1, positive when
    incorrect MPSs tend to be larger), ``direction`` (the sign of the effect when the two-sided
    p-value is below ``level``, else "no difference"), ``level``, ``n_incorrect``, ``n_correct``.
    """
    x = np.asarray(area_incorrect, dtype=np.float64).ravel()
    y = np.asarray(area_correct, dtype=np.float64).ravel()
    result: dict[str, Any] = {
        "u_statistic": _NAN,
        "p_two_sided": _NAN,
        "p_incorrect_larger": _NAN,
        "rank_biserial": _NAN,
        "direction": "no difference",
        "level": level,
        "n_incorrect": int(x.size),
        "n_correct": int(y.size),
    }
    if x.size == 0 or y.size == 0 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return result
    pairs = float(x.size) * float(y.size)
    if np.ptp(np.concatenate([x, y])) == 0:
        # All areas equal: U is defined (half the pairs) but the test's variance is zero.
        result.update(u_statistic=pairs / 2, rank_biserial=0.0)
        return result
    two_sided = mannwhitneyu(x, y, alternative="two-sided")
    larger = mannwhitneyu(x, y, alternative="greater")
    u = float(two_sided.statistic)
    effect = 2 * u / pairs - 1
    p = float(two_sided.pvalue)
    direction = "no difference"
    if p < level and effect != 0:
        direction = "incorrect larger" if effect > 0 else "incorrect smaller"
    result.update(
        u_statistic=u,
        p_two_sided=p,
        p_incorrect_larger=float(larger.pvalue),
        rank_biserial=float(effect),
        direction=direction,
    )
    return result


def bootstrap_auroc_difference(
    score_a: ArrayLike,
    score_b: ArrayLike,
    incorrect: ArrayLike,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """AUROC(a) - AUROC(b) and its 95% percentile interval from a paired bootstrap over items.

    Resamples that hold one class only (or a constant score) are skipped; if more than half
    are skipped, or ``n_boot`` is 0, the interval is NaN.
    """
    return bootstrap_difference(auroc, score_a, score_b, incorrect, n_boot=n_boot, seed=seed)
