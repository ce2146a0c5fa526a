"""The pure algorithm, driven by simple oracles instead of a model."""

from __future__ import annotations

import numpy as np
import pytest

from guard.algorithm.boxes import COMBINATIONS, Box, can_split, split_box
from guard.algorithm.extraction import PrefixSearch, rank_pixels
from guard.algorithm.landscape import LandscapeRun, child_weights, combine_runs


def test_combinations_are_the_14_non_empty_proper_subsets_in_rex_order() -> None:
    rows = {tuple(row) for row in COMBINATIONS.astype(int)}
    assert len(rows) == 14
    assert all(0 < sum(row) < 4 for row in rows)
    assert COMBINATIONS.sum(axis=1).tolist() == [1] * 4 + [2] * 6 + [3] * 4


@pytest.mark.parametrize("seed", range(20))
def test_split_tiles_the_box_and_never_cuts_at_its_first_pixel(seed: int) -> None:
    box = Box(3, 17, 5, 12, depth=2)
    children = split_box(box, np.random.default_rng(seed))
    canvas = np.zeros((20, 20), dtype=int)
    for child in children:
        canvas[child.row_start : child.row_stop, child.col_start : child.col_stop] += 1
        assert child.depth == 3
    inside = canvas[3:17, 5:12]
    assert (inside == 1).all() and canvas.sum() == box.area
    # The cut pixel is the first pixel of the bottom-right child; never the box's first pixel.
    cut = (children[3].row_start, children[3].col_start)
    assert cut != (box.row_start, box.col_start)


def test_boxes_below_size_or_beyond_depth_are_not_split() -> None:
    assert not can_split(Box(0, 3, 0, 3), min_box_size=10, tree_depth=10)
    assert can_split(Box(0, 4, 0, 3), min_box_size=10, tree_depth=10)
    assert not can_split(Box(0, 32, 0, 32, depth=11), min_box_size=10, tree_depth=10)
    assert not can_split(Box(0, 1, 0, 1), min_box_size=1, tree_depth=10)


def test_witness_form_gives_one_over_k_plus_one() -> None:
    simple, witness = child_weights("simple"), child_weights("witness")
    assert simple[0].tolist() == [1, 0, 0, 0] and witness[0].tolist() == [0.5, 0, 0, 0]
    assert simple[10].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])


def _drive(run: LandscapeRun, passes) -> int:  # noqa: ANN001
    levels = 0
    while not run.done:
        masks = run.propose()
        if len(masks) == 0:
            break
        run.update(np.array([passes(m) for m in masks]))
        levels += 1
    return levels


def test_responsibility_concentrates_on_the_pixels_the_oracle_needs() -> None:
    key = (20, 7)  # the "class" survives exactly when this pixel is kept

    def passes(mask: np.ndarray) -> bool:
        return bool(mask[key])

    maps = []
    for i in range(10):
        run = LandscapeRun(32, 32, rng=np.random.default_rng([0, i]))
        levels = _drive(run, passes)
        assert 1 <= levels <= 11
        assert run.responsibility[key] == run.responsibility.max() > 0
        maps.append(run.responsibility)
    combined = combine_runs(maps, "multiplicative")
    assert combined[key] == 1.0
    assert combined.max() == 1.0


def test_a_run_with_no_passing_mutant_stops_after_one_level() -> None:
    run = LandscapeRun(16, 16, rng=np.random.default_rng(1))
    assert _drive(run, lambda mask: False) == 1
    assert run.evaluations == 14 and not run.responsibility.any()


def test_runs_are_deterministic_for_a_seed() -> None:
    def passes(mask: np.ndarray) -> bool:
        return mask[5:9, 5:9].sum() >= 8

    first, second, other = (LandscapeRun(24, 24, rng=np.random.default_rng(s)) for s in (3, 3, 4))
    for run in (first, second, other):
        _drive(run, passes)
    assert np.array_equal(first.responsibility, second.responsibility)
    assert first.evaluations == second.evaluations
    assert not np.array_equal(first.responsibility, other.responsibility)


def test_search_limit_stops_a_run() -> None:
    run = LandscapeRun(64, 64, rng=np.random.default_rng(0), search_limit=20)
    _drive(run, lambda mask: True)
    assert run.done and run.evaluations <= 20 + 3 * 14


def test_multiplicative_combination_is_the_normalised_product_of_one_plus_r() -> None:
    rng = np.random.default_rng(0)
    maps = [rng.random((4, 5)) for _ in range(3)]
    product = np.prod([1 + m for m in maps], axis=0)
    assert np.allclose(combine_runs(maps, "multiplicative"), product / product.max())
    total = np.sum(maps, axis=0)
    assert np.allclose(combine_runs(maps, "additive"), total / total.max())


def test_ranking_breaks_ties_by_higher_flat_index_first() -> None:
    responsibility = np.array([[0.5, 1.0, 0.5], [0.2, 1.0, 0.5]])
    assert rank_pixels(responsibility).tolist() == [4, 1, 5, 2, 0, 3]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 50])
def test_first_passing_prefix_does_not_depend_on_the_block_size(block: int) -> None:
    # Sufficiency is not monotone along the ranking: prefixes 4 and 9 pass, 5-8 do not.
    ranking = np.arange(100)[::-1].copy()
    passing_prefixes = {4, 9}
    search = PrefixSearch(ranking, 10, 10, chunk_size=10)
    calls = 0
    while not search.done:
        masks = search.propose(block)
        chunks = [int(m.sum()) // 10 for m in masks]
        search.update(np.array([c in passing_prefixes for c in chunks]))
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
