"""Statistics of an audit: per-model tables and the tests that compare models (the paper's
Tables 1-3 and its significance tests).

Pure functions of arrays. A test that is not defined on its input (fewer than two groups,
every value identical) returns None rather than a NaN, so the report can say why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
from scipy import stats

from guard.audit.localisation import LOCALISATION_METRICS, dice, hausdorff
from guard.audit.run import AuditRecord
from guard.numbers import mean, median


def model_summary(records: Sequence[AuditRecord]) -> dict[str, Any]:
    """Accuracy, MPS area for all / correct / incorrect predictions (Table 1), degenerate
    share, the all-baseline class, and each localisation metric's mean where defined."""
    area = [r.mps_area_fraction for r in records]
    right = [r.mps_area_fraction for r in records if r.correct]
    wrong = [r.mps_area_fraction for r in records if not r.correct]
    baseline = Counter(r.baseline_class for r in records).most_common(1)
    summary: dict[str, Any] = {
        "n_items": len(records),
        "n_correct": len(right),
        "n_incorrect": len(wrong),
        "accuracy": len(right) / len(records) if records else None,
        "mps_area_mean": mean(area),
        "mps_area_median": median(area),
        "mps_area_mean_correct": mean(right),
        "mps_area_median_correct": median(right),
        "mps_area_mean_incorrect": mean(wrong),
        "mps_area_median_incorrect": median(wrong),
        "degenerate_fraction": mean([float(r.degenerate) for r in records]),
        "baseline_class": baseline[0][0] if baseline else None,
        "baseline_class_fraction": baseline[0][1] / len(records) if baseline else None,
    }
    for name in LOCALISATION_METRICS:
        defined = [v for r in records if (v := getattr(r, name)) is not None]
        summary[name] = mean(defined)
        summary[f"{name}_n"] = len(defined)
    return summary


def kruskal_wallis(groups: Sequence[Sequence[float]]) -> dict[str, float] | None:
    """Kruskal-Wallis H test (tie-corrected) that the groups' distributions are equal."""
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    pooled = np.concatenate(groups) if groups else np.array([])
    if len(groups) < 2 or np.ptp(pooled) == 0:
        return None
    result = stats.kruskal(*groups)
    return {"statistic": float(result.statistic), "p_value": float(result.pvalue),
            "df": len(groups) - 1}  # fmt: skip


def friedman(matched: np.ndarray) -> dict[str, float] | None:
    """Friedman test on matched items: ``matched`` [items, models], at least 3 models."""
    if matched.ndim != 2 or matched.shape[1] < 3 or len(matched) < 2:
        return None
    if np.all(np.ptp(matched, axis=1) == 0):  # every item ties across models: no ranks differ
        return None
    result = stats.friedmanchisquare(*matched.T)
    return {"statistic": float(result.statistic), "p_value": float(result.pvalue),
            "df": matched.shape[1] - 1, "n_items": len(matched)}  # fmt: skip


def pairwise_wilcoxon(
    matched: np.ndarray, names: Sequence[str], level: float
) -> list[dict[str, Any]]:
    """Wilcoxon signed-rank test of every pair of models on the matched items (the images are
    the same, so a paired test), Bonferroni-corrected for the number of pairs."""
    pairs = list(combinations(range(len(names)), 2))
    rows = []
    for i, j in pairs:
        difference = matched[:, i] - matched[:, j]
        nonzero = int(np.count_nonzero(difference))
        if nonzero == 0:  # identical areas on every item: nothing to test
            statistic, p_value = 0.0, 1.0
        else:
            result = stats.wilcoxon(matched[:, i], matched[:, j], zero_method="wilcox")
            statistic, p_value = float(result.statistic), float(result.pvalue)
        rows.append({
            "model_a": names[i], "model_b": names[j], "n_items": len(difference),
            "n_nonzero": nonzero, "median_difference": float(np.median(difference)),
            "mean_difference": float(np.mean(difference)), "statistic": statistic,
            "p_value": p_value,
        })  # fmt: skip
    for row, adjusted in zip(rows, bonferroni([row["p_value"] for row in rows]), strict=True):
        row["p_bonferroni"] = adjusted
        row["significant"] = adjusted <= level
    return rows


def incorrect_effect(
    area: np.ndarray, incorrect: np.ndarray, model: np.ndarray, cluster: np.ndarray
) -> dict[str, float] | None:
    """OLS of MPS area on "incorrect" with one fixed effect per model: the estimate is the
    mean difference in area between incorrect and correct predictions of the same model.

    Two standard errors: the classical one, and one clustered by image (CR1), because every
    image appears once per model and its observations are not independent.
    """
    area = np.asarray(area, dtype=float)
    x = np.asarray(incorrect, dtype=float)
    models = np.unique(model)
    design = np.column_stack([x, *(model == m for m in models)]).astype(float)
    n, p = design.shape
    if n <= p or np.linalg.matrix_rank(design) < p:
        return None  # no incorrect (or no correct) prediction, or too few items
    coef, *_ = np.linalg.lstsq(design, area, rcond=None)
    residual = area - design @ coef
    bread = np.linalg.inv(design.T @ design)
    sigma2 = float(residual @ residual) / (n - p)
    se = float(np.sqrt(sigma2 * bread[0, 0]))
    groups = np.unique(cluster)
    meat = np.zeros((p, p))
    for g in groups:
        score = design[cluster == g].T @ residual[cluster == g]
        meat += np.outer(score, score)
    g_count = len(groups)
    correction = g_count / (g_count - 1) * (n - 1) / (n - p) if g_count > 1 else float("nan")
    se_clustered = float(np.sqrt((bread @ meat @ bread)[0, 0] * correction))
    estimate = float(coef[0])

    def two_sided(t: float, df: int) -> float:
        return float(2 * stats.t.sf(abs(t), df)) if np.isfinite(t) else float("nan")

    return {
        "estimate": estimate,
        "std_error": se,
        "p_value": two_sided(estimate / se if se > 0 else np.inf, n - p),
        "std_error_clustered": se_clustered,
        "p_value_clustered": two_sided(estimate / se_clustered if se_clustered > 0 else np.inf, g_count - 1),
        "n_observations": n,
        "n_models": len(models),
        "n_clusters": g_count,
    }  # fmt: skip


def overlap_matrices(masks: Sequence[Sequence[np.ndarray]], correct: np.ndarray) -> dict[str, Any]:
    """Mean Dice and mean Hausdorff distance between every two models' MPSs, over the matched
    images both classify correctly (Tables 2 and 3). ``masks[m][i]``: model m's MPS of item i,
    all at one common size; ``correct`` [models, items]. Hausdorff skips empty MPSs."""
    k = len(masks)
    dice_m = np.full((k, k), np.nan)
    haus_m = np.full((k, k), np.nan)
    items = np.zeros((k, k), dtype=int)
    items_h = np.zeros((k, k), dtype=int)
    for a in range(k):
        for b in range(a, k):
            both = np.flatnonzero(correct[a] & correct[b])
            d = [dice(masks[a][i], masks[b][i]) for i in both]
            h = [v for i in both if (v := hausdorff(masks[a][i], masks[b][i])) is not None]
            for x, y in ((a, b), (b, a)):
                dice_m[x, y] = np.mean(d) if d else np.nan
                haus_m[x, y] = np.mean(h) if h else np.nan
                items[x, y], items_h[x, y] = len(d), len(h)
    return {"dice": dice_m, "hausdorff": haus_m, "dice_items": items, "hausdorff_items": items_h}


def bonferroni(p_values: Sequence[float]) -> list[float]:
    """Bonferroni-adjusted p-values: each times the number of tests, at most 1."""
    return [min(1.0, p * len(p_values)) for p in p_values]
