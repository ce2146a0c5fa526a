"""The audit's statistics, each against a value computed another way (by hand, by brute force,
or by a closed form) on small inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import cdist, directed_hausdorff
from scipy.stats import rankdata

from guard.algorithm.landscape import combine_runs
from guard.audit import statistics
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
    signed_relevance,
)
from guard.audit.run import AuditRecord, audit_seeds, pack_mask
from guard.audit.statistics import (
    bootstrap_ci,
    bootstrap_indices,
    friedman,
    hodges_lehmann,
    incorrect_effect,
    kruskal_wallis,
    location_tests,
    model_summary,
    overlap_matrices,
    pairwise_wilcoxon,
    seed_overlap,
    signed_rank_depth,
    within_seed_overlap,
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
    # Signed relevance, multiplicative: log r minus its median (0, five of nine pixels are 1):
    # positive inside log 5 + log 3, nothing negative anywhere, total log 120.
    assert dual_polarity_precision(r, truth) == pytest.approx(np.log(15) / np.log(120))
    # Additive: r minus its median (1): inside 4 + 2 of a total 10.
    assert dual_polarity_precision(r, truth, "additive") == pytest.approx(6 / 10)
    # All ties: the engine's ranking takes the higher flat index first.
    flat = np.ones((2, 2))
    assert relevance_rank_accuracy(flat, _mask((2, 2), (1, 1))) == 1.0
    assert relevance_rank_accuracy(flat, _mask((2, 2), (0, 0))) == 0.0
    assert relevance_mass_accuracy(flat, _mask((2, 2), (0, 0))) is None  # no relevance at all


def _looking_at(where: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A multiplicative responsibility map whose runs credit ``where``: 20 runs' maps of small
    noise, plus responsibility 0.5 on ``where`` in each run."""
    runs = rng.uniform(0, 0.05, (20, *where.shape)) + 0.5 * where
    return combine_runs(runs, "multiplicative")


def test_dual_polarity_precision_tells_object_from_background() -> None:
    rng = np.random.default_rng(5)
    obj = np.zeros((16, 16), bool)
    obj[2:6, 2:6] = True  # 16 of 256 pixels: a mask share of 1/16
    patch = np.zeros_like(obj)
    patch[10:14, 9:13] = True  # as large, on the background
    on_object, on_background = _looking_at(obj, rng), _looking_at(patch, rng)
    noise = _looking_at(np.zeros_like(obj), rng)
    # The old reading (pixels of positive relevance above the floor inside the mask) is the
    # mask share for every one of them: the multiplicative map is above its floor everywhere
    # but at its minimum.
    for r in (on_object, on_background, noise):
        support = r - r.min() > 0
        assert support[obj].sum() / support.sum() == pytest.approx(1 / 16, abs=0.01)
    high = dual_polarity_precision(on_object, obj)
    low = dual_polarity_precision(on_background, obj)
    chance = dual_polarity_precision(noise, obj)
    assert high is not None and low is not None and chance is not None
    assert high > 0.8 and low < 0.2 and 0.4 < chance < 0.6
    # Its extremes: all evidence above the median on the object, all below it off it; reversed.
    exact = np.where(obj, np.e, 1.0)
    assert dual_polarity_precision(exact, obj) == pytest.approx(1.0)
    assert dual_polarity_precision(np.where(obj, 1 / np.e, 1.0), obj) == pytest.approx(0.0)
    # The additive map is read on its own scale.
    assert dual_polarity_precision(np.where(obj, 1.0, 0.1), obj, "additive") == pytest.approx(1.0)
    # Undefined: a flat map, an empty or a full mask.
    assert dual_polarity_precision(np.ones((4, 4)), obj[:4, :4]) is None
    assert dual_polarity_precision(on_object, np.zeros_like(obj)) is None
    assert dual_polarity_precision(on_object, np.ones_like(obj)) is None


def test_signed_relevance_is_the_runs_evidence_about_its_median() -> None:
    rng = np.random.default_rng(6)
    runs = rng.uniform(0, 1, (20, 6, 7))
    r = combine_runs(runs, "multiplicative")
    evidence = np.log1p(runs).sum(axis=0)  # the sum over runs of log(1 + r_run)
    assert np.allclose(signed_relevance(r), evidence - np.median(evidence))
    assert np.allclose(signed_relevance(r * 3.0), signed_relevance(r))  # the scaling is immaterial
    additive = combine_runs(runs, "additive")
    assert np.allclose(signed_relevance(additive, "additive"), additive - np.median(additive))


def test_nearest_resize_of_masks() -> None:
    small = np.array([[True, False], [False, True]])
    assert np.array_equal(resize_mask(small, 4, 4), np.kron(small, np.ones((2, 2), bool)))
    big = np.zeros((4, 4), bool)
    big[1, 1] = big[3, 3] = True  # pixel centres 1 and 3 are sampled
    assert np.array_equal(resize_mask(big, 2, 2), small)


# ---------------------------------------------------------------------------- tests across models


def test_bootstrap_interval_against_a_loop_over_the_resamples() -> None:
    rng = np.random.default_rng(7)
    values = rng.random(30)
    values[rng.random(30) < 0.3] = np.nan  # left out of the figure (say, incorrect items)
    index = bootstrap_indices(30)
    assert index.shape == (2000, 30)
    assert np.array_equal(index, np.random.default_rng(0).integers(0, 30, size=(2000, 30)))
    for statistic, f in (("mean", np.mean), ("median", np.median)):
        replicates = []
        for row in index:
            chosen = values[row][~np.isnan(values[row])]
            if chosen.size:
                replicates.append(f(chosen))
        expected = np.percentile(replicates, [2.5, 97.5])
        assert bootstrap_ci(values, index, statistic) == pytest.approx(list(expected))
    assert bootstrap_ci(np.full(30, np.nan), index) is None
    # A subset present in a few items only: resamples without one are dropped.
    rare = np.full(30, np.nan)
    rare[4] = 1.0
    assert bootstrap_ci(rare, index) == [1.0, 1.0]


def _walsh(d: np.ndarray) -> np.ndarray:
    return np.sort([(d[i] + d[j]) / 2 for i in range(len(d)) for j in range(i, len(d))])


def test_signed_rank_depth_against_enumeration_and_the_normal_limit() -> None:
    for n in (6, 9, 12):
        sums = [sum(k for k, keep in zip(range(1, n + 1), signs, strict=True) if keep)
                for signs in itertools.product((0, 1), repeat=n)]  # fmt: skip
        cdf = np.cumsum(np.bincount(sums)) / 2**n
        assert signed_rank_depth(n) == int(np.flatnonzero(cdf <= 0.025)[-1])
    assert signed_rank_depth(5) is None  # 2 / 32 > 0.025: no interval at 95%
    exact = int(np.flatnonzero(statistics._signed_rank_cdf(301) <= 0.025)[-1])
    assert abs(signed_rank_depth(301) - exact) <= 2  # the normal approximation beyond 300


def test_hodges_lehmann_estimate_and_interval() -> None:
    rng = np.random.default_rng(8)
    d = rng.normal(0.3, 1.0, 15)
    hl = hodges_lehmann(d)
    assert hl is not None and hl["n"] == 15
    walsh = _walsh(d)
    assert hl["estimate"] == pytest.approx(np.median(walsh))
    depth = signed_rank_depth(15)
    assert (hl["low"], hl["high"]) == (walsh[depth], walsh[-1 - depth])
    # The interval inverts the exact two-sided signed-rank test at 5%: just inside its ends the
    # test keeps the shift, just outside it rejects it.
    for end, inward in ((hl["low"], 1), (hl["high"], -1)):
        inside = stats.wilcoxon(d - (end + inward * 1e-9), method="exact").pvalue
        outside = stats.wilcoxon(d - (end - inward * 1e-9), method="exact").pvalue
        assert inside > 0.05 >= outside
    # Ties at one chunk: the median difference is 0, the estimate half a chunk.
    chunk = 10 / 1024
    tied = np.array([0.0] * 11 + [-chunk] * 9)
    assert np.median(tied) == 0.0
    assert hodges_lehmann(tied)["estimate"] == pytest.approx(-chunk / 2)
    assert hodges_lehmann([]) is None
    assert hodges_lehmann([0.1, 0.2])["low"] is None  # too few for a 95% interval


def test_hodges_lehmann_of_many_differences_samples_the_walsh_averages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = np.random.default_rng(9).normal(0.1, 1.0, 400)
    exact = hodges_lehmann(d)
    monkeypatch.setattr(statistics, "WALSH_EXACT_LIMIT", 100)
    monkeypatch.setattr(statistics, "WALSH_SAMPLE", 400_000)
    sampled = hodges_lehmann(d)
    assert exact is not None and sampled is not None
    for key in ("estimate", "low", "high"):
        assert sampled[key] == pytest.approx(exact[key], abs=0.01)


def _square(top: int, left: int, size: int = 3, shape: tuple[int, int] = (12, 12)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_seed_overlap_within_and_between_models() -> None:
    a = [_square(0, 0), _square(0, 1)]  # one model, two seeds: moved one column
    b = [_square(8, 8), _square(8, 9)]
    d, h = seed_overlap(a, a)
    assert d == pytest.approx(dice(a[0], a[1])) and h == pytest.approx(1.0)
    d, h = seed_overlap(a, b)  # a's seed 0 against b's seed 1 and a's seed 1 against b's seed 0
    assert d == 0.0
    assert h == pytest.approx((hausdorff(a[0], b[1]) + hausdorff(a[1], b[0])) / 2)
    within_d, within_h = within_seed_overlap([a, a, b], np.array([True, False, True]))
    assert np.isnan(within_d[1]) and np.isnan(within_h[1])
    assert within_d[0] == pytest.approx(2 * 6 / 18) and within_h[2] == pytest.approx(1.0)
    empty = [np.zeros((12, 12), bool), _square(0, 0)]
    assert seed_overlap(empty, empty) == (0.0, None)


def test_location_tests_call_places_different_only_below_both_noise_floors() -> None:
    rng = np.random.default_rng(10)
    items = 12
    near, far, also_near = [], [], []
    for _ in range(items):
        top, left = rng.integers(0, 3, 2)
        near.append([_square(top, left), _square(top, left + 1)])
        also_near.append([_square(top + 1, left), _square(top, left)])
        far.append([_square(8, 8), _square(9, 8)])
    correct = np.ones((3, items), bool)
    correct[2, 0] = False  # the third model gets item 0 wrong: its pairs use 11 images
    out = location_tests([near, also_near, far], correct, ["a", "b", "c"], level=0.05)
    by_pair = {(r["model_a"], r["model_b"]): r for r in out["dice"]}
    assert not by_pair["a", "b"]["different"]  # as far apart as reseeding moves them
    assert by_pair["a", "c"]["different"] and by_pair["b", "c"]["different"]
    assert by_pair["a", "c"]["n_items"] == 11
    # Recomputed: one-sided signed-rank tests against each model's own seed-to-seed Dice.
    row = by_pair["a", "c"]
    both = np.arange(1, items)
    between = np.array([seed_overlap(near[i], far[i])[0] for i in both])
    within_a = np.array([dice(*near[i]) for i in both])
    within_c = np.array([dice(*far[i]) for i in both])
    p_a = stats.wilcoxon(between, within_a, alternative="less").pvalue
    p_c = stats.wilcoxon(between, within_c, alternative="less").pvalue
    assert row["between_mean"] == pytest.approx(between.mean())
    assert row["within_a_mean"] == pytest.approx(within_a.mean())
    assert (row["p_a"], row["p_b"]) == pytest.approx((p_a, p_c))
    assert row["p_bonferroni"] == pytest.approx(min(1.0, 3 * max(p_a, p_c)))
    assert row["hodges_lehmann_a"]["estimate"] == pytest.approx(
        np.median(_walsh(between - within_a))
    )
    # Hausdorff: the far model's MPSs are further from the others than reseeding moves them.
    haus = {(r["model_a"], r["model_b"]): r for r in out["hausdorff"]}
    assert haus["a", "c"]["different"] and not haus["a", "b"]["different"]
    assert np.isnan(out["within"][2][0][0])  # item 0 is wrong for the third model


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
    assert rows[0]["hodges_lehmann"]["estimate"] == pytest.approx(np.median(_walsh(d)))
    assert rows[1]["hodges_lehmann"]["estimate"] == 0.0


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
    # Every figure with its bootstrap interval over the same resamples of the three items.
    index = bootstrap_indices(3)
    assert s["accuracy_ci"] == pytest.approx(
        list(np.percentile([np.mean([[1, 1, 0][i] for i in row]) for row in index], [2.5, 97.5]))
    )
    assert s["mps_area_median_ci"] == bootstrap_ci([0.25, 0.75, 0.5], index, "median")
    assert s["mps_area_mean_incorrect_ci"] == [0.5, 0.5]  # one incorrect item
    assert s["rra_ci"] == bootstrap_ci([0.5, np.nan, 1.0], index)
    assert s["rma_ci"] is None


def test_packed_mps_round_trips() -> None:
    mask, other = np.random.default_rng(2).random((2, 7, 5)) < 0.4
    record = AuditRecord("k", 0, 0, 0.5, float(mask.mean()), False, 0, pack_mask(mask),
                         other_seeds_bits=(pack_mask(other),))  # fmt: skip
    again = AuditRecord.from_json_line(record.to_json_line())
    assert again == record and np.array_equal(again.mps_mask(7, 5), mask)
    seeds = again.seed_masks(7, 5)
    assert len(seeds) == 2 and np.array_equal(seeds[0], mask) and np.array_equal(seeds[1], other)
    assert audit_seeds(7, 3) == [7, 1007, 2007]
