"""Phase 1 of ReX: causal responsibility landscapes, many runs advanced together.

ReX computes a landscape with ``iters`` independent greedy descents ("runs") over random box
trees. ``Landscapes`` holds any number of runs (every run of every image of a batch) as arrays
and advances them all one tree level per step without calling a model: ``propose`` returns the
mutants of the current level as rectangles (``rects_to_masks`` turns them into keep-masks) and
``update`` takes back which of them passed. So one batched model call serves a whole tree level
of every run, and the per-level bookkeeping is a handful of array operations.

Faithful to rex-xai 0.4.1 (``responsibility.causal_explanation``, default queue "area" of
length 1): the boxes of a job are split in order and processing stops at the first box that
cannot be split (area < ``min_box_size`` or depth > ``tree_depth``); each split box yields the
14 mutants that keep a non-empty proper subset of its 4 children plus the job's other boxes in
full; passing mutants give each kept child 1/k (k kept children); the next job is the kept
children of the smallest passing mutant of the *last* processed box, and the run ends when that
box has no passing mutant or the children are deeper than ``tree_depth``.

Randomness: the split pixel of job box ``slot`` at tree ``level`` of run ``i`` is a
counter-based hash of (seed, i, level, slot), so each run has its own stream determined by
(seed, i), the same for every image, and all runs draw at once.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from guard.algorithm.boxes import COMBINATIONS, KEPT_CHILDREN, KEPT_INDEX, MUTANTS_PER_BOX

ResponsibilityForm = Literal["simple", "witness"]
Combination = Literal["multiplicative", "additive"]

JOB_SLOTS = 3  # a mutant keeps at most 3 children, so a job has at most 3 boxes
RECTS_PER_MUTANT = 5  # up to 3 kept children plus the job's other (at most 2) boxes
_COMBINATIONS_INT = COMBINATIONS.astype(np.int64)
# For job slot s, the other slots (kept in full while s is split).
_OTHER_SLOTS = np.array([[1, 2], [0, 2], [0, 1]])
_MASK64 = (1 << 64) - 1


def child_weights(form: ResponsibilityForm) -> np.ndarray:
    """[14, 4] responsibility a passing mutant gives each kept child.

    "simple" is ReX's 1/k for a mutant keeping k children; "witness" is the paper's 1/(k+1)
    Halpern-Pearl form.
    """
    k = KEPT_CHILDREN[:, None].astype(np.float64)
    return COMBINATIONS / (k if form == "simple" else k + 1.0)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_draws(seed: int, run_ids: np.ndarray, level: int) -> np.ndarray:
    """uint64 [R, 3]: the random draw of each job slot of each run at a tree level."""
    base = _splitmix(np.full(len(run_ids), seed & _MASK64, dtype=np.uint64))
    run_key = _splitmix(base ^ _splitmix(run_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
    level_key = _splitmix(run_key + np.uint64(level))
    return _splitmix(level_key[:, None] + np.arange(1, JOB_SLOTS + 1, dtype=np.uint64))


def split_rects(rects: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Children [..., 4, 4] of boxes [..., 4] cut at one random pixel each.

    As ReX: the pixel is drawn uniformly among the box's pixels except its first; its row and
    column start the bottom and right children, so top or left children may be empty.
    Children are top-left, top-right, bottom-left, bottom-right as (row0, row1, col0, col1).
    """
    r0, r1, c0, c1 = np.moveaxis(rects, -1, 0)
    width = np.maximum(c1 - c0, 1)
    area = (r1 - r0) * (c1 - c0)
    position = 1 + (draws % np.maximum(area - 1, 1).astype(np.uint64)).astype(np.int64)
    row, col = r0 + position // width, c0 + position % width
    children = np.stack(
        [
            np.stack([r0, row, c0, col], -1),
            np.stack([r0, row, col, c1], -1),
            np.stack([row, r1, c0, col], -1),
            np.stack([row, r1, col, c1], -1),
        ],
        axis=-2,
    )
    return children


def _nonempty(rects: np.ndarray) -> tuple[list[int], list[list[int]]]:
    """(owner, rectangle) pairs of the non-empty rectangles of [N, B, 4]."""
    nonempty = (rects[..., 1] > rects[..., 0]) & (rects[..., 3] > rects[..., 2])
    owners, slots = np.nonzero(nonempty)
    return owners.tolist(), rects[owners, slots].tolist()


def paint_rects(rects: np.ndarray, weights: np.ndarray, height: int, width: int) -> np.ndarray:
    """Sum over rectangles [N, B, 4] of weight x indicator: float [N, H, W].

    A loop of slice additions: measured faster than broadcasting or matmul formulations for
    a few thousand rectangles, and it scales with rectangle count, not image size.
    """
    canvas = np.zeros((len(rects), height, width), dtype=np.float64)
    owners, boxes = _nonempty(rects)
    flat_weights = weights[
        np.nonzero((rects[..., 1] > rects[..., 0]) & (rects[..., 3] > rects[..., 2]))
    ]
    for owner, (r0, r1, c0, c1), weight in zip(owners, boxes, flat_weights.tolist(), strict=True):
        if weight:
            canvas[owner, r0:r1, c0:c1] += weight
    return canvas


def rects_to_masks(rects: np.ndarray, height: int, width: int) -> np.ndarray:
    """Keep-masks bool [N, H, W]: the union of each mutant's rectangles [N, R, 4]."""
    masks = np.zeros((len(rects), height, width), dtype=bool)
    owners, boxes = _nonempty(rects)
    for owner, (r0, r1, c0, c1) in zip(owners, boxes, strict=True):
        masks[owner, r0:r1, c0:c1] = True
    return masks


class Landscapes:
    """Any number of ReX runs advanced together, one tree level per ``propose``/``update``."""

    def __init__(
        self,
        height: int,
        width: int,
        run_ids: np.ndarray,
        *,
        seed: int = 0,
        min_box_size: int = 10,
        tree_depth: int = 10,
        search_limit: int | None = None,
        form: ResponsibilityForm = "simple",
    ) -> None:
        runs = len(run_ids)
        self.height, self.width = height, width
        self.run_ids = np.asarray(run_ids, dtype=np.int64)
        self.seed, self.min_box_size, self.tree_depth = seed, min_box_size, tree_depth
        self.search_limit = search_limit
        self.weights = child_weights(form)
        self.responsibility = np.zeros((runs, height, width), dtype=np.float64)
        self.evaluations = np.zeros(runs, dtype=np.int64)
        self.done = np.zeros(runs, dtype=bool)
        # A job: up to 3 boxes (row0, row1, col0, col1) of one depth; unused slots are empty.
        self.job = np.zeros((runs, JOB_SLOTS, 4), dtype=np.int64)
        self.job[:, 0] = (0, height, 0, width)
        self.job_size = np.ones(runs, dtype=np.int64)
        self.depth = 0  # depth of the job boxes; all runs descend one level per step
        self._processed = np.zeros((runs, JOB_SLOTS), dtype=bool)
        self._children = np.zeros((runs, JOB_SLOTS, 4, 4), dtype=np.int64)

    def propose(self) -> tuple[np.ndarray, np.ndarray]:
        """Mutants of this level: rectangles [N, 5, 4] and the run each belongs to [N].

        Runs are listed in order, and within a run its split boxes in job order, 14 mutants
        each in ReX's combination order. Runs with nothing to split are marked done.
        """
        job = self.job
        area = (job[..., 1] - job[..., 0]) * (job[..., 3] - job[..., 2])
        in_job = np.arange(JOB_SLOTS) < self.job_size[:, None]
        splittable = in_job & (area >= max(self.min_box_size, 2)) & (self.depth <= self.tree_depth)
        processed = np.cumprod(splittable, axis=1).astype(bool) & ~self.done[:, None]
        self.done |= ~processed[:, 0]
        self._processed = processed

        children = split_rects(job, split_draws(self.seed, self.run_ids, self.depth))
        self._children = children
        empty = np.zeros((*children.shape[:2], 1, 4), dtype=np.int64)
        kept = np.concatenate([children, empty], axis=2)[:, :, KEPT_INDEX]  # [R, 3, 14, 3, 4]
        others = job[:, _OTHER_SLOTS] * in_job[:, _OTHER_SLOTS][..., None]  # [R, 3, 2, 4]
        others = np.broadcast_to(others[:, :, None], (*kept.shape[:3], 2, 4))
        rects = np.concatenate([kept, others], axis=3)[processed]  # [P, 14, 5, 4]
        owners = np.repeat(np.nonzero(processed)[0], MUTANTS_PER_BOX)
        return rects.reshape(-1, RECTS_PER_MUTANT, 4), owners

    def update(self, passing: np.ndarray) -> None:
        """Take the verdicts (True = same top-1 class) for the mutants of the last ``propose``."""
        processed = self._processed
        verdicts = np.zeros((*processed.shape, MUTANTS_PER_BOX), dtype=bool)
        verdicts[processed] = np.asarray(passing, dtype=bool).reshape(-1, MUTANTS_PER_BOX)
        self.evaluations += MUTANTS_PER_BOX * processed.sum(axis=1)

        # Passing mutants share 1/k among the k children they keep.
        shares = verdicts.astype(np.float64) @ self.weights  # [R, 3, 4]
        runs = len(shares)
        self.responsibility += paint_rects(
            self._children.reshape(runs, -1, 4), shares.reshape(runs, -1), self.height, self.width
        )

        # Next job: kept children of the smallest passing mutant of the last processed box.
        last = np.maximum(processed.sum(axis=1) - 1, 0)
        rows = np.arange(runs)
        last_verdicts = verdicts[rows, last]  # [R, 14]
        children = self._children[rows, last]  # [R, 4, 4]
        child_area = (children[..., 1] - children[..., 0]) * (children[..., 3] - children[..., 2])
        in_job = np.arange(JOB_SLOTS) < self.job_size[:, None]
        job_area = (self.job[..., 1] - self.job[..., 0]) * (self.job[..., 3] - self.job[..., 2])
        static_area = (job_area * in_job).sum(axis=1) - job_area[rows, last]
        visible = child_area @ _COMBINATIONS_INT.T + static_area[:, None]
        visible = np.where(last_verdicts, visible, np.iinfo(np.int64).max)
        chosen = visible.argmin(axis=1)
        padded = np.concatenate([children, np.zeros((runs, 1, 4), dtype=np.int64)], axis=1)
        self.job = padded[rows[:, None], KEPT_INDEX[chosen]]
        self.job_size = KEPT_CHILDREN[chosen]
        self.depth += 1

        self.done |= ~last_verdicts.any(axis=1) | (self.depth > self.tree_depth)
        if self.search_limit is not None:
            self.done |= self.evaluations > self.search_limit


def combine_runs(maps: np.ndarray, combination: Combination) -> np.ndarray:
    """Global responsibility map from runs' maps [R, H, W], scaled so its maximum is 1.

    Multiplicative (ReX 0.4.x): each run's map starts at 1 and the global map is their
    product, so the ranking follows prod(1 + r_run). Summed in log space to avoid overflow;
    the result equals ReX's product renormalised by its maximum. Additive (ReX 0.3.x): the sum.
    """
    if combination == "multiplicative":
        log_product = np.log1p(maps).sum(axis=0)
        return np.exp(log_product - log_product.max())
    total = maps.sum(axis=0)
    peak = total.max()
    return total / peak if peak > 0 else total
