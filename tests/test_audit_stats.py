"""The audit's statistics, each against a value computed another way (by hand, by brute force,
or by a closed form) on small inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist, directed_hausdorff
from scipy.stats import rankdata

from guard.audit.localisation import (
    dice,
    dual_polarity_precision,
    hausdorff,
    mask_coverage,
    pointing_game,
    precision_in_mask,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    resize_mask,
)
from guard.audit.run import AuditRecord, pack_mask
from guard.audit.statistics import (
    friedman,
    incorrect_effect,
    kruskal_wallis,
    model_summary,
    overlap_matrices,
    pairwise_wilcoxon,
)


def _mask(shape: tuple[int, int], *pixels: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for r, c in pixels:
        mask[r, c] = True
    return mask


# ---------------------------------------------------------------------------- per-image metrics


def test_dice_on_hand_made_masks() -> None:
    a = np.zeros((6, 6), bool)
    b = np.zeros((6, 6), bool)
    a[1:3, 1:3] = True  # 4 pixels
    b[1:3, 1:4] = True  # 6 pixels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 10)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0  # two empty MPSs agree


def test_hausdorff_known_values_and_brute_force() -> None:
    assert hausdorff(_mask((8, 8), (0, 0)), _mask((8, 8), (3, 4))) == pytest.approx(5.0)
    assert hausdorff(_mask((8, 8), (0, 0), (0, 1)), _mask((8, 8), (0, 0))) == pytest.approx(1.0)
    assert hausdorff(_mask((8, 8), (0, 0)), np.zeros((8, 8), bool)) is None
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.random((2, 12, 9)) < 0.15
        if not a.any() or not b.any():
            continue
        pa, pb = np.argwhere(a), np.argwhere(b)
        d = cdist(pa, pb)
        brute = max(d.min(axis=1).max(), d.min(axis=0).max())
        assert hausdorff(a, b) == pytest.approx(brute)
        assert hausdorff(a, b) == pytest.approx(
            max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])
        )


def test_precision_and_coverage_of_the_mps() -> None:
    truth = np.zeros((4, 4), bool)
    truth[:2, :3] = True  # 6 pixels
    mps = _mask((4, 4), (0, 0), (0, 1), (1, 2), (3, 3))  # 3 of 4 inside
    assert precision_in_mask(mps, truth) == pytest.approx(0.75)
    assert mask_coverage(mps, truth) == pytest.approx(0.5)
    assert precision_in_mask(np.zeros_like(mps), truth) is None
    assert mask_coverage(mps, np.zeros_like(truth)) is None


def test_rra_rma_pointing_and_dual_polarity_by_hand() -> None:
    r = np.array([[5.0, 1.0, 1.0], [4.0, 1.0, 2.0], [1.0, 3.0, 1.0]])
    truth = _mask((3, 3), (0, 0), (0, 1), (2, 1))  # K = 3
    # Top 3 by responsibility: 5 (in), 4 (out), 3 (in) -> 2 of 3.
    assert relevance_rank_accuracy(r, truth) == pytest.approx(2 / 3)
    # Relevance above the floor (1): 4, 0, 0 / 3, 0, 1 / 0, 2, 0; inside: 4 + 0 + 2 of 10.
    assert relevance_mass_accuracy(r, truth) == pytest.approx(6 / 10)
    assert pointing_game(r, truth) == 1.0
    assert pointing_game(r, _mask((3, 3), (1, 0))) == 0.0
    # Positive relevance on 4 pixels, 2 of them inside.
    assert dual_polarity_precision(r, truth) == pytest.approx(2 / 4)
    # All ties: the engine's ranking takes the higher flat index first.
    flat = np.ones((2, 2))
    assert relevance_rank_accuracy(flat, _mask((2, 2), (1, 1))) == 1.0
    assert relevance_rank_accuracy(flat, _mask((2, 2), (0, 0))) == 0.0
    assert relevance_mass_accuracy(flat, _mask((2, 2), (0, 0))) is None  # no relevance at all


def test_nearest_resize_of_masks() -> None:
    small = np.array([[True, False], [False, True]])
    assert np.array_equal(resize_mask(small, 4, 4), np.kron(small, np.ones((2, 2), bool)))
    big = np.zeros((4, 4), bool)
    big[1, 1] = big[3, 3] = True  # pixel centres 1 and 3 are sampled
    assert np.array_equal(resize_mask(big, 2, 2), small)


# ---------------------------------------------------------------------------- tests across models


def test_kruskal_wallis_against_the_tie_corrected_formula() -> None:
    groups = [[0.1, 0.2, 0.2, 0.5], [0.3, 0.3, 0.6, 0.7, 0.9], [0.05, 0.2, 0.4]]
    pooled = np.concatenate(groups)
    ranks = rankdata(pooled)
    n = len(pooled)
    sizes = np.cumsum([0, *map(len, groups)])
    h = 12 / (n * (n + 1)) * sum(
        ranks[a:b].sum() ** 2 / (b - a) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ) - 3 * (n + 1)
    _, ties = np.unique(pooled, return_counts=True)
    h /= 1 - (ties**3 - ties).sum() / (n**3 - n)
    result = kruskal_wallis(groups)
    assert result is not None and result["statistic"] == pytest.approx(h)
    assert result["df"] == 2 and 0 < result["p_value"] < 1
    assert kruskal_wallis([[0.1, 0.1], [0.1]]) is None  # every value identical
    assert kruskal_wallis([[0.1, 0.2]]) is None  # one group


def test_friedman_against_the_tie_corrected_formula() -> None:
    x = np.array(
        [[0.1, 0.2, 0.3], [0.2, 0.2, 0.5], [0.4, 0.1, 0.3], [0.1, 0.3, 0.6], [0.2, 0.3, 0.1]]
    )
    n, k = x.shape
    ranks = np.apply_along_axis(rankdata, 1, x)
    chi2 = 12 / (n * k * (k + 1)) * (ranks.sum(axis=0) ** 2).sum() - 3 * n * (k + 1)
    ties = sum((c**3 - c).sum() for c in (np.unique(row, return_counts=True)[1] for row in x))
    chi2 /= 1 - ties / (n * (k**3 - k))
    result = friedman(x)
    assert result is not None and result["statistic"] == pytest.approx(chi2)
    assert result["n_items"] == 5 and result["df"] == 2
    assert friedman(x[:, :2]) is None  # needs three models
    assert friedman(np.ones((4, 3))) is None


def test_pairwise_signed_rank_with_bonferroni() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((12, 3))
    x[:, 2] = x[:, 0]  # identical to model a
    rows = pairwise_wilcoxon(x, ["a", "b", "c"], level=0.05)
    assert [(r["model_a"], r["model_b"]) for r in rows] == [("a", "b"), ("a", "c"), ("b", "c")]
    d = x[:, 0] - x[:, 1]
    ranks = rankdata(np.abs(d))
    assert rows[0]["statistic"] == pytest.approx(min(ranks[d > 0].sum(), ranks[d < 0].sum()))
    for row in rows:
        assert row["p_bonferroni"] == pytest.approx(min(1.0, 3 * row["p_value"]))
    assert rows[1]["p_value"] == 1.0 and rows[1]["n_nonzero"] == 0


def test_fixed_effects_estimate_and_errors_against_the_within_transformation() -> None:
    rng = np.random.default_rng(1)
    n_items, n_models = 30, 3
    model = np.repeat(np.arange(n_models), n_items)
    cluster = np.tile(np.arange(n_items), n_models)
    incorrect = rng.random(n_items * n_models) < 0.3
    area = 0.1 * model + 0.05 * incorrect + rng.normal(0, 0.02, len(model))
    result = incorrect_effect(area, incorrect, model, cluster)
    assert result is not None
    # Frisch-Waugh-Lovell: demean both by model, regress without an intercept.
    x = incorrect.astype(float)
    xd = x - np.array([x[model == m].mean() for m in range(n_models)])[model]
    yd = area - np.array([area[model == m].mean() for m in range(n_models)])[model]
    beta = (xd @ yd) / (xd @ xd)
    residual = yd - beta * xd
    dof = len(area) - (n_models + 1)
    assert result["estimate"] == pytest.approx(beta)
    assert result["std_error"] == pytest.approx(np.sqrt(residual @ residual / dof / (xd @ xd)))
    # With one observation per cluster the clustered (CR1) error is White's HC1.
    single = incorrect_effect(area, incorrect, model, np.arange(len(area)))
    assert single is not None
    n = len(area)
    hc1 = n / (n - (n_models + 1)) * (xd**2 @ residual**2) / (xd @ xd) ** 2
    assert single["std_error_clustered"] == pytest.approx(np.sqrt(hc1))
    assert incorrect_effect(area, np.zeros_like(incorrect), model, cluster) is None


def test_overlap_matrices_average_over_images_both_models_get_right() -> None:
    shape = (5, 5)
    a = [_mask(shape, (0, 0), (0, 1)), _mask(shape, (4, 4)), _mask(shape)]
    b = [_mask(shape, (0, 0)), _mask(shape, (0, 0)), _mask(shape, (2, 2))]
    correct = np.array([[True, True, True], [True, False, True]])  # item 1 wrong for b
    out = overlap_matrices([a, b], correct)
    # Items 0 and 2: Dice 2/3 and 0 (one empty); Hausdorff only item 0 (item 2 has an empty MPS).
    assert out["dice"][0, 1] == out["dice"][1, 0] == pytest.approx((2 / 3 + 0) / 2)
    assert out["dice_items"][0, 1] == 2 and out["hausdorff_items"][0, 1] == 1
    assert out["hausdorff"][0, 1] == pytest.approx(1.0)
    assert out["dice"][0, 0] == 1.0 and out["hausdorff"][1, 1] == 0.0


def test_model_summary_table_one() -> None:
    mask = pack_mask(np.zeros((2, 2), bool))
    records = [
        AuditRecord("a", 0, 0, 0.9, 0.25, False, 1, mask, rra=0.5),
        AuditRecord("b", 1, 1, 0.8, 0.75, False, 1, mask, rra=None),
        AuditRecord("c", 1, 0, 0.6, 0.5, True, 0, mask, rra=1.0),
    ]
    s = model_summary(records)
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["mps_area_mean_correct"] == pytest.approx(0.5)
    assert s["mps_area_mean_incorrect"] == pytest.approx(0.5)
    assert s["mps_area_median"] == pytest.approx(0.5)
    assert s["degenerate_fraction"] == pytest.approx(1 / 3)
    assert s["baseline_class"] == 1 and s["baseline_class_fraction"] == pytest.approx(2 / 3)
    assert s["rra"] == pytest.approx(0.75) and s["rra_n"] == 2
    assert s["rma"] is None and s["rma_n"] == 0


def test_packed_mps_round_trips() -> None:
    mask = np.random.default_rng(2).random((7, 5)) < 0.4
    record = AuditRecord("k", 0, 0, 0.5, float(mask.mean()), False, 0, pack_mask(mask))
    again = AuditRecord.from_json_line(record.to_json_line())
    assert again == record and np.array_equal(again.mps_mask(7, 5), mask)
