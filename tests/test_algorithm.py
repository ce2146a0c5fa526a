"""The pure algorithm, driven by simple oracles instead of a model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from guard.algorithm.boxes import COMBINATIONS, KEPT_INDEX
from guard.algorithm.extraction import PrefixSearch, rank_pixels
from guard.algorithm.landscape import (
    UNITS,
    Landscapes,
    RexStreams,
    child_weights,
    combine_runs,
    combine_runs_rex,
    mutant_masks,
    paint_rects,
    run_keys,
    split_draws,
    split_rects,
)

Oracle = Callable[[np.ndarray], bool]
Box = tuple[int, int, int, int]
Cut = Callable[[Box, int, int], list[Box]]  # (box, depth, slot) -> its 4 children


def test_combinations_are_the_14_non_empty_proper_subsets_in_rex_order() -> None:
    rows = {tuple(row) for row in COMBINATIONS.astype(int)}
    assert len(rows) == 14
    assert all(0 < sum(row) < 4 for row in rows)
    assert COMBINATIONS.sum(axis=1).tolist() == [1] * 4 + [2] * 6 + [3] * 4
    for row, index in zip(COMBINATIONS, KEPT_INDEX, strict=True):
        assert [i for i in index if i < 4] == np.flatnonzero(row).tolist()


def test_splits_tile_the_box_and_never_cut_at_its_first_pixel() -> None:
    box = np.array([3, 17, 5, 12])
    draws = split_draws(run_keys(0, np.arange(200)), 1)[:, 0, 0]
    children = split_rects(np.broadcast_to(box, (200, 4)), draws)
    cuts = set()
    for four in children:
        canvas = np.zeros((20, 20), dtype=int)
        for r0, r1, c0, c1 in four:
            canvas[r0:r1, c0:c1] += 1
        assert (canvas[3:17, 5:12] == 1).all() and canvas.sum() == 14 * 7
        cut = (four[3][0], four[3][2])  # the drawn pixel starts the bottom-right child
        assert cut != (3, 5)
        cuts.add(cut)
    assert len(cuts) > 60  # the draw covers the box, not a few pixels


def test_draws_depend_on_seed_run_and_level_only() -> None:
    def draws(seed: int, ids: list[int], level: int) -> np.ndarray:
        return split_draws(run_keys(seed, np.array(ids)), 6)[:, level]

    a = draws(0, [0, 1, 2], level=3)
    assert np.array_equal(a, draws(0, [0, 1, 2], level=3))
    assert np.array_equal(a[1], draws(0, [1], level=3)[0])
    assert not np.array_equal(a, draws(1, [0, 1, 2], level=3))
    assert not np.array_equal(a, draws(0, [0, 1, 2], level=4))
    assert len(set(a.ravel().tolist())) == a.size


def _box_mask(rect, height: int = 16, width: int = 16) -> np.ndarray:  # noqa: ANN001
    mask = np.zeros((height, width), bool)
    mask[rect[0] : rect[1], rect[2] : rect[3]] = True
    return mask


def test_rects_paint_with_their_weights() -> None:
    rects = np.array([[[0, 2, 0, 3], [2, 4, 1, 2], [0, 0, 0, 0]]])
    painted = paint_rects(rects, np.array([[0.5, 2.0, 9.0]]), 4, 4)[0]
    assert painted[0, 0] == 0.5 and painted[3, 1] == 2.0 and painted[3, 3] == 0.0
    assert painted.sum() == 0.5 * 6 + 2.0 * 2


def test_mutant_masks_keep_their_children_and_the_other_boxes() -> None:
    children = np.array([[[0, 3, 0, 5], [0, 3, 5, 8], [3, 8, 0, 5], [3, 8, 5, 8]]])
    others = np.array([[[10, 16, 10, 12], [0, 0, 0, 0]]])
    masks = mutant_masks(children, others, 16, 16)
    assert masks.shape == (14, 16, 16) and masks.dtype == bool
    assert set(np.unique(masks.view(np.uint8)).tolist()) == {0, 1}  # valid bools for onnxruntime
    static = _box_mask(others[0, 0])
    for mask, keep in zip(masks, COMBINATIONS, strict=True):
        expected = static.copy()
        for rect, kept in zip(children[0], keep, strict=True):
            if kept:
                expected |= _box_mask(rect)
        assert np.array_equal(mask, expected)


def test_witness_form_gives_one_over_k_plus_one_in_whole_units() -> None:
    simple, witness = child_weights("simple"), child_weights("witness")
    assert simple.dtype.kind == witness.dtype.kind == "i"  # exact sums
    assert (simple[0] / UNITS).tolist() == [1, 0, 0, 0]
    assert (witness[0] / UNITS).tolist() == [0.5, 0, 0, 0]
    assert (simple[10] / UNITS).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    assert (witness[10] / UNITS).tolist() == [0.25, 0.25, 0.25, 0]


def _drive(landscapes: Landscapes, passes: Oracle) -> tuple[int, list[np.ndarray]]:
    levels, seen = 0, []
    while True:
        masks, owners = landscapes.propose()
        if not len(masks):
            return levels, seen
        seen.append(masks)
        landscapes.update(np.array([passes(m) for m in masks]))
        levels += 1


def test_responsibility_concentrates_on_the_pixels_the_oracle_needs() -> None:
    key = (20, 7)  # the "class" survives exactly when this pixel is kept
    landscapes = Landscapes(32, 32, run_ids=np.arange(10))
    levels, _ = _drive(landscapes, lambda mask: bool(mask[key]))
    assert 2 <= levels <= 11
    for run_map in landscapes.responsibility:
        assert run_map[key] == run_map.max() > 0
    combined = combine_runs(landscapes.responsibility, "multiplicative")
    assert combined[key] == combined.max() == 1.0


def test_first_level_mutants_are_the_14_combinations_of_the_root_children() -> None:
    landscapes = Landscapes(16, 16, run_ids=np.array([0]))
    masks, owners = landscapes.propose()
    assert masks.shape == (14, 16, 16) and (owners == 0).all()
    children = split_rects(
        np.array([[0, 16, 0, 16]]), split_draws(run_keys(0, np.array([0])), 1)[:, 0, 0]
    )[0]
    for mask, keep in zip(masks, COMBINATIONS, strict=True):
        expected = np.zeros((16, 16), bool)
        for (r0, r1, c0, c1), kept in zip(children, keep, strict=True):
            if kept:
                expected[r0:r1, c0:c1] = True
        assert np.array_equal(mask, expected)


def test_the_jobs_other_boxes_stay_whole_and_the_smallest_passing_mutant_leads() -> None:
    landscapes = Landscapes(32, 32, run_ids=np.array([4]), min_box_size=4)
    masks, _ = landscapes.propose()
    passing = np.zeros(14, bool)
    passing[[4, 10]] = True  # children {0, 1} and {0, 1, 2} pass; {0, 1} is smaller
    landscapes.update(passing)
    assert landscapes.job_size[0] == 2
    job_union = masks[4]
    first_box, second_box = (_box_mask(rect, 32, 32) for rect in landscapes.job[0, :2])
    assert np.array_equal(first_box | second_box, job_union)
    second, _ = landscapes.propose()
    other_box = job_union & ~first_box
    for mask in second[:14]:  # splitting box 0 keeps box 1 whole, and stays inside the job
        assert (mask & other_box).sum() == other_box.sum() and not (mask & ~job_union).any()


def test_a_run_with_no_passing_mutant_stops_after_one_level() -> None:
    landscapes = Landscapes(16, 16, run_ids=np.arange(3))
    levels, _ = _drive(landscapes, lambda mask: False)
    assert levels == 1
    assert landscapes.evaluations.tolist() == [14, 14, 14] and not landscapes.responsibility.any()


def test_runs_stop_at_the_depth_limit_and_the_search_limit() -> None:
    deep = Landscapes(64, 64, run_ids=np.arange(2), min_box_size=1, tree_depth=3)
    levels, _ = _drive(deep, lambda mask: True)
    assert levels == 4  # levels 0..3 are split, then children at depth 4 exceed the limit
    limited = Landscapes(64, 64, run_ids=np.arange(2), search_limit=20)
    _drive(limited, lambda mask: True)
    assert (limited.evaluations <= 20 + 3 * 14).all() and limited.done.all()


def test_runs_are_deterministic_for_a_seed_and_differ_across_seeds() -> None:
    def passes(mask: np.ndarray) -> bool:
        return mask[5:9, 5:9].sum() >= 8

    first, second = (
        Landscapes(24, 24, np.arange(3), seed=3),
        Landscapes(24, 24, np.arange(3), seed=3),
    )
    other = Landscapes(24, 24, np.arange(3), seed=4)
    for landscapes in (first, second, other):
        _drive(landscapes, passes)
    assert np.array_equal(first.responsibility, second.responsibility)
    assert not np.array_equal(first.responsibility, other.responsibility)


def test_the_same_run_id_gives_the_same_run_wherever_it_sits() -> None:
    def passes(mask: np.ndarray) -> bool:
        return bool(mask[10, 10])

    alone = Landscapes(24, 24, np.array([7]))
    among = Landscapes(24, 24, np.array([1, 7, 3]))
    _drive(alone, passes)
    _drive(among, passes)
    assert np.array_equal(alone.responsibility[0], among.responsibility[1])


def test_multiplicative_combination_is_the_normalised_product_of_one_plus_r() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 4, 5))
    product = np.prod(1 + maps, axis=0)
    assert np.allclose(combine_runs(maps, "multiplicative"), product / product.max())
    total = maps.sum(axis=0)
    assert np.allclose(combine_runs(maps, "additive"), total / total.max())


def test_ranking_breaks_ties_by_higher_flat_index_first() -> None:
    responsibility = np.array([[0.5, 1.0, 0.5], [0.2, 1.0, 0.5]])
    assert rank_pixels(responsibility).tolist() == [4, 1, 5, 2, 0, 3]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 50])
def test_first_passing_prefix_does_not_depend_on_the_block_size(block: int) -> None:
    # Sufficiency is not monotone along the ranking: prefixes 4 and 9 pass, 5-8 do not.
    ranking = np.arange(100)[::-1].copy()
    search = PrefixSearch(ranking, 10, 10, chunk_size=10)
    calls = 0
    while not search.done:
        masks = search.propose(block)
        search.update(np.array([int(m.sum()) // 10 in (4, 9) for m in masks]))
        calls += 1
    assert search.mps_chunks == 4
    mask = search.mps_mask()
    assert mask.sum() == 40 and mask.ravel()[ranking[:40]].all()
    assert calls == -(-4 // block)


def test_whole_image_is_the_mps_when_no_prefix_passes() -> None:
    search = PrefixSearch(np.arange(25), 5, 5, chunk_size=10)
    while not search.done:
        search.update(np.zeros(len(search.propose(2)), dtype=bool))
    assert search.mps_chunks == 3 and search.mps_mask().all()


def _counter_cut(draws: np.ndarray) -> Cut:
    return lambda box, depth, slot: [
        tuple(c) for c in split_rects(np.array(box), draws[depth, slot])
    ]


def _rex_cut(seed: int, run: int) -> Cut:
    """rex-xai 0.4.1's ``Box.__2d_parts`` with its global generator seeded for run ``run``."""
    state = np.random.RandomState(seed + run + 1)  # rex: np.random.seed(args.seed + process)

    def cut(box: Box, depth: int, slot: int) -> list[Box]:
        r0, r1, c0, c1 = box
        pos = state.randint(1, (r1 - r0) * (c1 - c0))  # random_coords(Uniform, h * w, 1, ...)
        row, col = (int(v) for v in np.unravel_index(pos, (r1 - r0, c1 - c0)))
        row, col = row + r0, col + c0
        return [(r0, row, c0, col), (r0, row, col, c1), (row, r1, c0, col), (row, r1, col, c1)]

    return cut


def _sequential_rex_run(height: int, width: int, cut: Cut, passes: Oracle, *,
                        min_box_size: int = 10, tree_depth: int = 10,
                        float32_start: float | None = None) -> np.ndarray:  # fmt: skip
    """One ReX run written as rex-xai 0.4.1 does it: box by box, one mutant at a time.

    Exact sums from 0, or with ``float32_start`` rex-xai's float32 run map from that start
    (``ResponsibilityMaps.new_map`` and ``update_maps``).
    """
    if float32_start is None:
        responsibility = np.zeros((height, width))
    else:
        responsibility = np.full((height, width), float32_start, dtype=np.float32)
    job, depth = [(0, height, 0, width)], 0
    while True:
        processed = []
        for slot, box in enumerate(job):
            area = (box[1] - box[0]) * (box[3] - box[2])
            if area < max(min_box_size, 2) or depth > tree_depth:
                break  # rex: "no children, breaking"
            children = cut(box, depth, slot)
            static = [other for i, other in enumerate(job) if i != slot]
            verdicts = []
            for keep in COMBINATIONS:
                mask = np.zeros((height, width), bool)
                for rect in [c for c, k in zip(children, keep, strict=True) if k] + static:
                    mask[rect[0] : rect[1], rect[2] : rect[3]] = True
                verdicts.append(passes(mask))
            for keep, ok in zip(COMBINATIONS, verdicts, strict=True):
                if ok:
                    shares = np.zeros(4, dtype=responsibility.dtype)  # rex: float32 zeros
                    shares[keep] += 1 / keep.sum()
                    for rect, kept, share in zip(children, keep, shares, strict=True):
                        if kept:
                            responsibility[rect[0] : rect[1], rect[2] : rect[3]] += share
            static_area = sum((r[1] - r[0]) * (r[3] - r[2]) for r in static)
            processed.append((children, verdicts, static_area))
        if not processed or not any(processed[-1][1]):
            return responsibility
        children, verdicts, static_area = processed[-1]
        areas = [sum((c[1] - c[0]) * (c[3] - c[2]) for c, k in zip(children, keep, strict=True) if k)
                 + static_area for keep in COMBINATIONS]  # fmt: skip
        chosen = min((a, m) for m, (a, ok) in enumerate(zip(areas, verdicts, strict=True)) if ok)[1]
        job = [c for c, k in zip(children, COMBINATIONS[chosen], strict=True) if k]
        depth += 1
        if depth > tree_depth:
            return responsibility


def _oracle(seed: int) -> Oracle:
    rng = np.random.default_rng(seed)
    weights = rng.normal(0.3, 1.0, size=(24, 20))  # mixed signs: keeping pixels can hurt
    threshold = 0.15 * weights.sum()

    def passes(mask: np.ndarray) -> bool:  # a fixed, non-monotone "classifier" of masks
        return bool((weights * mask).sum() > threshold) and bool(
            mask[(seed * 7) % 24, (seed * 5) % 20]
        )

    return passes


@pytest.mark.parametrize("stream", ["counter", "rex"])
@pytest.mark.parametrize("seed", range(6))
def test_vectorised_runs_equal_a_sequential_rex_run(seed: int, stream: str) -> None:
    passes = _oracle(seed)
    runs = np.array([0, 1, 2, 3, 4, 1])  # run 1 twice: e.g. two images in one batch
    landscapes = Landscapes(
        24, 20, run_ids=runs, seed=seed, min_box_size=6, tree_depth=6, stream=stream
    )
    _drive(landscapes, passes)
    draws = split_draws(run_keys(seed, runs), 7)
    for row, run in enumerate(runs):
        if stream == "counter":
            expected = _sequential_rex_run(
                24, 20, _counter_cut(draws[row]), passes, min_box_size=6, tree_depth=6
            )
            assert np.allclose(landscapes.responsibility[row], expected)
        else:  # rex-xai's float32 run map, to the bit
            expected = _sequential_rex_run(24, 20, _rex_cut(seed, run), passes, min_box_size=6,
                                           tree_depth=6, float32_start=1.0)  # fmt: skip
            assert np.array_equal(landscapes.responsibility[row] + 1.0, expected)
    assert landscapes.responsibility.any()


def test_rex_stream_additive_run_maps_are_rex_xais_float32_sums_from_zero() -> None:
    passes = _oracle(4)
    landscapes = Landscapes(24, 20, np.arange(3), seed=2, min_box_size=6, stream="rex",
                            combination="additive")  # fmt: skip
    _drive(landscapes, passes)
    for run in range(3):
        expected = _sequential_rex_run(24, 20, _rex_cut(2, run), passes, min_box_size=6,
                                       float32_start=0.0)  # fmt: skip
        assert np.array_equal(landscapes.responsibility[run], expected)


def test_rex_combination_is_rex_xais_float32_merge() -> None:
    """``ResponsibilityMaps.merge``: multiply by each run's map, then divide by the maximum."""
    rng = np.random.default_rng(5)
    thirds = np.float32(1 / 3)
    run_maps = 1 + (rng.integers(0, 9, size=(20, 6, 7)) * thirds).astype(np.float32)
    expected = np.ones((6, 7), dtype=np.float32)
    for run_map in run_maps:
        expected *= run_map
        expected /= np.max(expected)
    combined = combine_runs_rex(run_maps.astype(np.float64) - 1.0, "multiplicative")
    assert np.array_equal(combined, expected)
    exact = combine_runs(run_maps.astype(np.float64) - 1.0, "multiplicative")
    assert np.allclose(combined, exact, rtol=1e-5) and not np.array_equal(combined, exact)


def test_rex_stream_runs_small_boxes_as_rex_does() -> None:
    """Boxes down to 2 pixels: ``randint(1, 2)`` returns 1 without consuming the stream."""
    passes = _oracle(3)
    landscapes = Landscapes(24, 20, np.arange(4), seed=9, min_box_size=1, stream="rex")
    _drive(landscapes, passes)
    for run in range(4):
        expected = _sequential_rex_run(24, 20, _rex_cut(9, run), passes, min_box_size=1,
                                       float32_start=1.0)  # fmt: skip
        assert np.array_equal(landscapes.responsibility[run] + 1.0, expected)


def test_rex_stream_draws_what_numpys_legacy_randint_draws() -> None:
    rng = np.random.default_rng(0)
    ids = np.array([0, 3, 0, 7, 19])
    streams = RexStreams(5, ids)
    reference = [np.random.RandomState(5 + i + 1) for i in ids]
    for _ in range(60):  # more words than the streams first hold
        areas = rng.integers(2, 70_000, size=(len(ids), 3))
        areas[rng.random(areas.shape) < 0.2] = 2
        processed = np.logical_and.accumulate(rng.random(areas.shape) < 0.8, axis=1)
        positions = streams.positions(areas, processed)
        for row, slot in zip(*np.nonzero(processed), strict=True):
            assert positions[row, slot] == reference[row].randint(1, int(areas[row, slot]))
        assert (positions[~processed] == 1).all()


def test_neighbouring_seeds_share_all_runs_but_one_under_the_rex_stream() -> None:
    passes = _oracle(1)
    seed_0 = Landscapes(24, 20, np.arange(1, 5), seed=0, min_box_size=6, stream="rex")
    seed_1 = Landscapes(24, 20, np.arange(0, 4), seed=1, min_box_size=6, stream="rex")
    counter = Landscapes(24, 20, np.arange(0, 4), seed=1, min_box_size=6)
    for landscapes in (seed_0, seed_1, counter):
        _drive(landscapes, passes)
    assert np.array_equal(seed_0.responsibility, seed_1.responsibility)  # run i + 1 of seed 0
    assert not np.array_equal(seed_1.responsibility, counter.responsibility)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        RexStreams(-2, np.arange(3))
