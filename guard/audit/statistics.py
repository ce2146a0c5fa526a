"""Statistics of an audit: per-model tables and the tests that compare models (the paper's
Tables 1-3 and its significance tests).

Pure functions of arrays. A test that is not defined on its input (fewer than two groups,
every value identical) returns None rather than a NaN, so the report can say why.

Confidence intervals: per-model figures by the percentile bootstrap over images (the same
resampled images for every figure of a model: ``bootstrap_indices``); differences between
paired figures by the Hodges-Lehmann estimate with the interval that inverts the Wilcoxon
signed-rank test (``hodges_lehmann``).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
from scipy import stats

from guard.audit.localisation import LOCALISATION_METRICS, dice, hausdorff
from guard.audit.run import AuditRecord
from guard.numbers import mean, median

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# Beyond this many paired differences the Walsh averages (n (n + 1) / 2 of them) are sampled.
WALSH_EXACT_LIMIT = 3000
WALSH_SAMPLE = 4_500_000
# Up to this many differences the signed-rank null distribution is exact, beyond it normal.
SIGNED_RANK_EXACT_LIMIT = 300


def bootstrap_indices(n: int) -> np.ndarray:
    """[BOOTSTRAP_RESAMPLES, n] resamples of n items with replacement, the same for a given
    n (``numpy.random.default_rng(BOOTSTRAP_SEED).integers(0, n, size=(2000, n))``)."""
    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, index: np.ndarray, statistic: str = "mean"
) -> list[float] | None:
    """Percentile bootstrap interval (CONFIDENCE) of the mean or median of ``values``.

    ``values`` has one entry per item, NaN where the figure leaves the item out (an incorrect
    prediction in "area of correct predictions", an undefined metric): each resample's
    statistic is over its defined entries, and resamples without any are dropped. None when
    no resample has one. Percentiles with numpy's default (linear) interpolation.
    """
    v = np.asarray(values, dtype=np.float64)
    if index.size == 0 or v.size == 0 or np.isnan(v).all():
        return None
    replicates = np.empty(len(index))
    for start in range(0, len(index), 256):  # bounded memory for large audits
        block = v[index[start : start + 256]]
        defined = ~np.isnan(block)
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # resamples with nothing defined
            if statistic == "mean":
                out = np.where(defined, block, 0.0).sum(axis=1) / defined.sum(axis=1)
            elif statistic == "median":
                out = np.nanmedian(block, axis=1)
            else:
                raise ValueError(f"unknown statistic {statistic!r}")
        replicates[start : start + len(block)] = out
    replicates = replicates[~np.isnan(replicates)]
    if not replicates.size:
        return None
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return [float(low), float(high)]


def _signed_rank_cdf(n: int) -> np.ndarray:
    """P(T+ <= t), t = 0 .. n (n + 1) / 2, of the signed-rank statistic with n untied, nonzero
    differences (each rank's sign a fair coin)."""
    total = n * (n + 1) // 2
    p = np.zeros(total + 1)
    p[0] = 1.0
    for rank in range(1, n + 1):
        shifted = np.zeros_like(p)
        shifted[rank:] = p[:-rank]
        p = (p + shifted) / 2
    return np.cumsum(p)


def signed_rank_depth(n: int, confidence: float = CONFIDENCE) -> int | None:
    """The largest a with P(T+ <= a) <= (1 - confidence) / 2: the interval of the Hodges-Lehmann
    estimate runs from the (a + 1)-th smallest Walsh average to the (a + 1)-th largest
    (Hollander and Wolfe). Exact up to SIGNED_RANK_EXACT_LIMIT differences, else the normal
    approximation with continuity correction. None when even a = 0 is too likely (n < 6 at
    95%)."""
    alpha = (1 - confidence) / 2
    if n <= SIGNED_RANK_EXACT_LIMIT:
        below = np.flatnonzero(_signed_rank_cdf(n) <= alpha * (1 + 1e-12))
        return int(below[-1]) if below.size else None
    total = n * (n + 1) / 2
    sd = math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    a = math.floor(total / 2 - 0.5 - stats.norm.ppf(1 - alpha) * sd)
    return a if a >= 0 else None


def walsh_averages(differences: Sequence[float] | np.ndarray) -> np.ndarray:
    """Sorted (d_i + d_j) / 2 over i <= j; beyond WALSH_EXACT_LIMIT differences, WALSH_SAMPLE
    of them drawn at random (pairs (i, j) uniform, generator seeded 0)."""
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    if n <= WALSH_EXACT_LIMIT:
        averages = np.concatenate([(d[i] + d[i:]) / 2 for i in range(n)]) if n else d
    else:
        rng = np.random.default_rng(0)
        i, j = rng.integers(0, n, size=(2, WALSH_SAMPLE))
        averages = (d[i] + d[j]) / 2
    return np.sort(averages)


def hodges_lehmann(differences: Sequence[float] | np.ndarray) -> dict[str, float | None] | None:
    """The Hodges-Lehmann estimate of paired differences (the median of their Walsh averages)
    with its CONFIDENCE interval from the signed-rank test. Unlike the median difference it
    moves when some differences are one chunk and the others zero (the median of a mix of
    0 and -c is 0 or -c; the estimate lies in between). None for no differences; the
    interval's ends are None below six differences."""
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    if n == 0:
        return None
    averages = walsh_averages(d)
    depth = signed_rank_depth(n)
    if depth is None:
        low = high = None
    elif n <= WALSH_EXACT_LIMIT:
        low, high = float(averages[depth]), float(averages[len(averages) - 1 - depth])
    else:  # the same ranks, as quantiles of the sampled averages
        share = depth / (n * (n + 1) / 2)
        low, high = (float(q) for q in np.quantile(averages, [share, 1 - share]))
    return {"estimate": float(np.median(averages)), "low": low, "high": high, "n": n}


def model_summary(records: Sequence[AuditRecord]) -> dict[str, Any]:
    """Accuracy, MPS area for all / correct / incorrect predictions (Table 1), degenerate
    share, the all-baseline class, and each localisation metric's mean where defined; each
    figure with its bootstrap interval over the items (``NAME_ci``: [low, high] or None)."""
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
    index = bootstrap_indices(len(records))
    correct = np.array([r.correct for r in records], dtype=bool)
    values = np.array(area, dtype=np.float64)
    nan = np.nan
    columns: dict[str, tuple[np.ndarray, str]] = {
        "accuracy": (correct.astype(float), "mean"),
        "mps_area_mean": (values, "mean"),
        "mps_area_median": (values, "median"),
        "mps_area_mean_correct": (np.where(correct, values, nan), "mean"),
        "mps_area_median_correct": (np.where(correct, values, nan), "median"),
        "mps_area_mean_incorrect": (np.where(correct, nan, values), "mean"),
        "mps_area_median_incorrect": (np.where(correct, nan, values), "median"),
        "degenerate_fraction": (np.array([float(r.degenerate) for r in records]), "mean"),
    }
    if baseline:
        shares = [float(r.baseline_class == baseline[0][0]) for r in records]
        columns["baseline_class_fraction"] = (np.array(shares), "mean")
    for name in LOCALISATION_METRICS:
        located = [nan if (v := getattr(r, name)) is None else v for r in records]
        columns[name] = (np.array(located, dtype=np.float64), "mean")
    for name, (column, statistic) in columns.items():
        summary[f"{name}_ci"] = bootstrap_ci(column, index, statistic)
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
            "mean_difference": float(np.mean(difference)),
            "hodges_lehmann": hodges_lehmann(difference), "statistic": statistic,
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


def seed_overlap(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> tuple[float, float | None]:
    """Mean Dice and mean Hausdorff distance of one image's MPSs across seeds: model a's
    under seed j against model b's under seed k, over every j != k (with a the same model as
    b: its seed-to-seed agreement, the noise floor). Hausdorff over the defined pairs, None if
    none is (an empty MPS)."""
    pairs = [(j, k) for j in range(len(a)) for k in range(len(b)) if j != k]
    dices = [dice(a[j], b[k]) for j, k in pairs]
    distances = [d for j, k in pairs if (d := hausdorff(a[j], b[k])) is not None]
    return float(np.mean(dices)), (float(np.mean(distances)) if distances else None)


def within_seed_overlap(
    masks: Sequence[Sequence[np.ndarray]], correct: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One model's seed-to-seed Dice and Hausdorff per image: ``masks[i]`` the MPSs of item i
    under every seed; NaN where the prediction is incorrect (Tables 2 and 3 keep correct
    predictions only) or, for Hausdorff, undefined."""
    d = np.full(len(masks), np.nan)
    h = np.full(len(masks), np.nan)
    for i in np.flatnonzero(correct):
        d[i], distance = seed_overlap(masks[i], masks[i])
        h[i] = np.nan if distance is None else distance
    return d, h


def _against_floor(
    between: np.ndarray, within_a: np.ndarray, within_b: np.ndarray, alternative: str
) -> dict[str, Any]:
    """Between-model values against both models' within-model values on the same images:
    two one-sided signed-rank tests; "below both" holds at a level when both reject, so the
    pair's p-value is the larger (an intersection-union test)."""
    keep = ~(np.isnan(between) | np.isnan(within_a) | np.isnan(within_b))
    between, within_a, within_b = between[keep], within_a[keep], within_b[keep]
    row: dict[str, Any] = {
        "n_items": int(keep.sum()),
        "between_mean": mean(between), "between_median": median(between),
        "within_a_mean": mean(within_a), "within_a_median": median(within_a),
        "within_b_mean": mean(within_b), "within_b_median": median(within_b),
    }  # fmt: skip
    for side, within in (("a", within_a), ("b", within_b)):
        difference = between - within
        if not np.count_nonzero(difference):
            p = 1.0
        else:
            p = float(stats.wilcoxon(between, within, zero_method="wilcox",
                                     alternative=alternative).pvalue)  # fmt: skip
        row[f"p_{side}"] = p
        row[f"hodges_lehmann_{side}"] = hodges_lehmann(difference)
    row["p_value"] = max(row["p_a"], row["p_b"])
    return row


def location_tests(
    masks: Sequence[Sequence[Sequence[np.ndarray]]],
    correct: np.ndarray,
    names: Sequence[str],
    level: float,
) -> dict[str, Any]:
    """Do two models' MPSs lie in different places, beyond what reseeding one model moves them?

    ``masks[m][i][s]``: model m's MPS of item i under seed s (a common grid); ``correct``
    [models, items]. Per pair, on the images both classify correctly: the between-model Dice
    across seeds (seed j of one against seed k != j of the other, so that a shared random
    stream does not make two models look alike) against each model's seed-to-seed Dice, each
    a one-sided Wilcoxon signed-rank test (between < within); the pair's p-value is the larger
    of the two, Bonferroni-corrected over pairs. Hausdorff the same way with between > within.
    ``within``: per model, per item, the seed-to-seed Dice and Hausdorff (NaN where left out).
    """
    k = len(names)
    within = [within_seed_overlap(masks[m], correct[m]) for m in range(k)]
    rows: dict[str, list[dict[str, Any]]] = {"dice": [], "hausdorff": []}
    for a, b in combinations(range(k), 2):
        both = np.flatnonzero(correct[a] & correct[b])
        overlaps = [seed_overlap(masks[a][i], masks[b][i]) for i in both]
        between_d = np.array([o[0] for o in overlaps], dtype=float)
        between_h = np.array([np.nan if o[1] is None else o[1] for o in overlaps], dtype=float)
        for what, between, w, alternative in (("dice", between_d, 0, "less"),
                                              ("hausdorff", between_h, 1, "greater")):  # fmt: skip
            row = {"model_a": names[a], "model_b": names[b]}
            row.update(_against_floor(between, within[a][w][both], within[b][w][both], alternative))
            rows[what].append(row)
    for what in rows:
        adjusted = bonferroni([row["p_value"] for row in rows[what]])
        for row, p in zip(rows[what], adjusted, strict=True):
            row["p_bonferroni"] = p
            row["different"] = row["n_items"] > 0 and p <= level
    return {"within": within, **rows}


def bonferroni(p_values: Sequence[float]) -> list[float]:
    """Bonferroni-adjusted p-values: each times the number of tests, at most 1."""
    return [min(1.0, p * len(p_values)) for p in p_values]
