"""Phase 1 of ReX: causal responsibility landscapes, many runs advanced together.

ReX computes a landscape with ``iters`` independent greedy descents ("runs") over random box
trees. ``Landscapes`` holds any number of runs (every run of every image of a batch) as arrays
and advances them all one tree level per step without calling a model: ``propose`` returns the
keep-masks of the current level's mutants and ``update`` takes back which of them passed. So one batched model call serves a whole tree level
of every run, and the per-level bookkeeping is a handful of array operations.

Faithful to rex-xai 0.4.1 (``responsibility.causal_explanation``, default queue "area" of
length 1): the boxes of a job are split in order and processing stops at the first box that
cannot be split (area < ``min_box_size`` or depth > ``tree_depth``); each split box yields the
14 mutants that keep a non-empty proper subset of its 4 children plus the job's other boxes in
full; passing mutants give each kept child 1/k (k kept children); the next job is the kept
children of the smallest passing mutant of the *last* processed box, and the run ends when that
box has no passing mutant or the children are deeper than ``tree_depth``.

Randomness, two streams, each the same for every image (so calibration and serving agree):

- ``counter`` (default): the split pixel of job box ``slot`` at tree ``level`` of run ``i`` is a
  counter-based hash of (seed, i, level, slot), so each run has its own stream determined by
  (seed, i) and all runs draw at once.
- ``rex``: rex-xai 0.4.1's own streams, so that the same seed gives rex-xai's landscape and MPS.
  rex-xai seeds numpy's global legacy generator with ``seed + i + 1`` before run ``i``
  (``np.random.seed(args.seed + process)``, process = 1..iters) and draws
  ``np.random.randint(1, h * w)`` for each box it splits, in job order, unravelled over the
  box's (h, w). ``RexStreams`` replays exactly that: numpy's legacy ``randint`` takes 32-bit
  Mersenne Twister words, masks each to the smallest all-ones mask covering ``area - 2`` and
  rejects values above it (a box of area 2 draws nothing), which is done here for all runs at
  once. Because run ``i`` of seed ``s`` is run ``i - 1`` of seed ``s + 1``, rex-xai's
  neighbouring seeds share 19 of 20 runs (use distant seeds to compare rex-xai with itself).

Arithmetic: by default responsibility is counted in exact twelfths, so equal responsibility is
exactly equal whatever the order of the sums. With the ``rex`` stream it is rex-xai's float32
arithmetic instead, since its rounding orders nearly tied pixels (see ``combine_runs_rex``):
rex-xai adds float32(1/k) to each kept child for each passing mutant in turn, to a run map that
starts at 1 (multiplicative) or 0 (additive). A pixel lies in one child of one split box per
level, so its value is a chain of float32 additions per box: computed here per child and
painted as exact float64 differences, which sum to the float32 value exactly.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

from guard.algorithm.boxes import COMBINATIONS, KEPT_CHILDREN, KEPT_INDEX, MUTANTS_PER_BOX

ResponsibilityForm = Literal["simple", "witness"]
Combination = Literal["multiplicative", "additive"]
RandomStream = Literal["counter", "rex"]

JOB_SLOTS = 3  # a mutant keeps at most 3 children, so a job has at most 3 boxes
_COMBINATIONS_INT = COMBINATIONS.astype(np.int64)
# Mutant m's kept children as a 4-bit set (bit c: child c).
COMBINATION_BITS = (
    (COMBINATIONS.astype(np.uint8) << np.arange(4, dtype=np.uint8)).sum(1).astype(np.uint8)
)
# For job slot s, the other slots (kept in full while s is split).
_OTHER_SLOTS = np.array([[1, 2], [0, 2], [0, 1]])
_MASK64 = (1 << 64) - 1
_NEVER = np.iinfo(np.int64).max  # the visible area of a mutant that did not pass
_SLOT_NUMBERS = np.arange(1, JOB_SLOTS + 1, dtype=np.uint64)
_SLOTS = np.arange(JOB_SLOTS)
# Children as picks from (row0, row1, col0, col1, cut row, cut col) of the split box.
_CHILD_FIELDS = np.array([[0, 4, 2, 5], [0, 4, 5, 3], [4, 1, 2, 5], [4, 1, 5, 3]])
# Child bits of a pixel by its row and column: children 0 1 / 2 3 are top, bottom, left, right.
_TOP, _BOTTOM, _LEFT, _RIGHT = (np.uint8(b) for b in (0b0011, 0b1100, 0b0101, 0b1010))


# Responsibility is counted in 1/12ths: 1/k and 1/(k+1) for k <= 3 kept children are whole
# units, so sums are exact and equal responsibility stays exactly equal for the ranking.
UNITS = 12


def child_weights(form: ResponsibilityForm) -> np.ndarray:
    """[14, 4] responsibility a passing mutant gives each kept child, in 1/``UNITS``.

    "simple" is ReX's 1/k for a mutant keeping k children; "witness" is the paper's 1/(k+1)
    Halpern-Pearl form.
    """
    k = KEPT_CHILDREN[:, None]
    return COMBINATIONS * (UNITS // (k if form == "simple" else k + 1))


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def run_keys(seed: int, run_ids: np.ndarray) -> np.ndarray:
    """uint64 [R]: the key of each run's random stream, from (seed, run id)."""
    base = _splitmix(np.full(len(run_ids), seed & _MASK64, dtype=np.uint64))
    return _splitmix(base ^ _splitmix(run_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))


def split_draws(keys: np.ndarray, levels: int) -> np.ndarray:
    """uint64 [R, levels, 3]: the random draw of each job slot of each run at each tree level."""
    level_keys = _splitmix(keys[:, None] + np.arange(levels, dtype=np.uint64))
    return _splitmix(level_keys[..., None] + _SLOT_NUMBERS)


def split_positions(areas: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The counter stream's cut positions: ``draws`` mapped to 1..area-1 (flat, in the box)."""
    return 1 + (draws % np.maximum(areas - 1, 1).astype(np.uint64)).astype(np.int64)


def split_rects(rects: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Children [..., 4, 4] of boxes [..., 4] cut at one random pixel each (counter stream)."""
    areas = (rects[..., 1] - rects[..., 0]) * (rects[..., 3] - rects[..., 2])
    return cut_rects(rects, split_positions(areas, draws))


def cut_rects(rects: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Children [..., 4, 4] of boxes [..., 4] cut at the pixel ``positions`` [...] (flat, row by row
    inside the box).

    As ReX: the pixel is drawn uniformly among the box's pixels except its first; its row and
    column start the bottom and right children, so top or left children may be empty.
    Children are top-left, top-right, bottom-left, bottom-right as (row0, row1, col0, col1).
    """
    r0, c0 = rects[..., 0], rects[..., 2]
    row, col = np.divmod(positions, np.maximum(rects[..., 3] - c0, 1))
    fields = np.concatenate([rects, (r0 + row)[..., None], (c0 + col)[..., None]], axis=-1)
    return fields[..., _CHILD_FIELDS]


_REX_WINDOW = 8  # words looked at per draw and step; a draw needs more with odds < 2**-8


@lru_cache(maxsize=256)
def _rex_words(seed: int, count: int) -> np.ndarray:
    """The first ``count`` 32-bit words of ``numpy.random.RandomState(seed)``, as int64."""
    words = np.random.RandomState(seed).randint(0, 2**32, size=count, dtype=np.uint64)
    words = words.astype(np.int64)
    words.flags.writeable = False
    return words


class RexStreams:
    """rex-xai 0.4.1's random streams for runs ``run_ids`` of ``seed`` (see the module notes).

    Run ``i`` replays ``numpy.random.RandomState(seed + i + 1)``; ``positions`` draws, for the
    split boxes of one tree level in job order, what rex-xai's ``randint(1, area)`` returns.
    Several rows may hold the same run id (the same run of several images): each keeps its own
    place in the stream.
    """

    def __init__(self, seed: int, run_ids: np.ndarray) -> None:
        ids, self._stream = np.unique(np.asarray(run_ids, dtype=np.int64), return_inverse=True)
        self._seeds = [int(seed) + int(i) + 1 for i in ids]
        if ids.size and (min(self._seeds) < 0 or max(self._seeds) >= 2**32):
            raise ValueError(
                f"the rex stream needs 0 <= seed + run + 1 < 2**32 (numpy's legacy seeding); "
                f"seed {seed} with runs {int(ids[0])}..{int(ids[-1])} is outside it"
            )
        self._used = np.zeros(len(self._stream), dtype=np.int64)
        self._words = np.zeros((len(ids), 0), dtype=np.int64)
        self._grow(16 * _REX_WINDOW)

    def _grow(self, count: int) -> None:
        self._words = np.stack([_rex_words(s, count) for s in self._seeds]).reshape(
            len(self._seeds), count
        )

    def positions(self, areas: np.ndarray, processed: np.ndarray) -> np.ndarray:
        """int64 [R, S]: rex-xai's cut of each processed box (``areas`` [R, S]; slots of a row
        in job order), drawn from each row's stream in turn; 1 where nothing is split."""
        positions = np.ones(areas.shape, dtype=np.int64)
        for slot in range(areas.shape[1]):
            rows = np.flatnonzero(processed[:, slot])
            span = areas[rows, slot] - 2  # randint(1, area): 1 + a value in 0..area-2
            mask = span.copy()
            for shift in (1, 2, 4, 8, 16):
                mask |= mask >> shift
            value = np.zeros(len(rows), dtype=np.int64)
            pending = np.flatnonzero(span > 0)  # randint(1, 2) is 1 and draws nothing
            while pending.size:
                owners = rows[pending]
                start = self._used[owners]
                if start.max() + _REX_WINDOW > self._words.shape[1]:
                    self._grow(2 * self._words.shape[1])
                window = start[:, None] + np.arange(_REX_WINDOW)
                candidates = (
                    self._words[self._stream[owners][:, None], window] & mask[pending, None]
                )
                accepted = candidates <= span[pending, None]
                first = accepted.argmax(axis=1)
                found = accepted[np.arange(len(pending)), first]
                value[pending[found]] = candidates[found, first[found]]
                self._used[owners] += np.where(found, first + 1, _REX_WINDOW)
                pending = pending[~found]
            positions[rows, slot] = 1 + value
        return positions


def _indicators(rects: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row [..., H] and column [..., W] indicators of rectangles [..., 4]: a rectangle is
    their outer product."""
    rows, cols = np.arange(height), np.arange(width)
    in_rows = (rows >= rects[..., 0:1]) & (rows < rects[..., 1:2])
    in_cols = (cols >= rects[..., 2:3]) & (cols < rects[..., 3:4])
    return in_rows, in_cols


def paint_rects(rects: np.ndarray, weights: np.ndarray, height: int, width: int) -> np.ndarray:
    """Sum over rectangles [N, B, 4] of weight x indicator: float [N, H, W].

    Each rectangle is an outer product of a row and a column indicator, so the weighted sum
    is one batched matmul [N, H, B] @ [N, B, W].
    """
    in_rows, in_cols = _indicators(rects, height, width)
    weighted = in_rows * weights[..., None].astype(np.float64)
    return np.matmul(weighted.transpose(0, 2, 1), in_cols.astype(np.float64))


def mutant_masks(children: np.ndarray, others: np.ndarray, height: int, width: int) -> np.ndarray:
    """Keep-masks bool [P * 14, H, W] of the mutants of P split boxes.

    ``children`` [P, 4, 4] are each box's children, ``others`` [P, 2, 4] the job's other boxes
    (kept whole; empty rectangles where the job has fewer). Each pixel gets a 4-bit code: bit c
    for child c, all bits for the other boxes; mutant m keeps the pixels whose code shares a bit
    with ``COMBINATION_BITS[m]``. The children tile the box as a 2x2 grid, so a pixel's child
    bit is its row's bits (top: children 0 and 1, bottom: 2 and 3) and its column's (left: 0
    and 2, right: 1 and 3): one byte-wide pass for the children, one for the other boxes.
    """
    count = len(children)
    rows, cols = np.arange(height), np.arange(width)
    top_left, bottom_right = children[:, 0], children[:, 3]
    row_bits = np.where(rows < bottom_right[:, 0:1], _TOP, _BOTTOM)
    row_bits[(rows < top_left[:, 0:1]) | (rows >= bottom_right[:, 1:2])] = 0
    col_bits = np.where(cols < bottom_right[:, 2:3], _LEFT, _RIGHT)
    col_bits[(cols < top_left[:, 2:3]) | (cols >= bottom_right[:, 3:4])] = 0
    code = row_bits[:, :, None] & col_bits[:, None, :]
    if (others[..., 1] > others[..., 0]).any():  # most jobs are a single box
        rows, cols = _indicators(others, height, width)
        code[(rows[..., :, None] & cols[..., None, :]).any(axis=1)] = 0b1111
    shared = code.reshape(count, 1, height * width) & COMBINATION_BITS[None, :, None]
    # Compared in place: one allocation the size of all masks instead of two, which costs
    # page faults each level once the masks outgrow malloc's reuse threshold.
    kept = np.not_equal(shared, 0, out=shared.view(bool))
    return kept.reshape(count * MUTANTS_PER_BOX, height, width)


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
        stream: RandomStream = "counter",
        combination: Combination = "multiplicative",
    ) -> None:
        runs = len(run_ids)
        self.height, self.width = height, width
        self.run_ids = np.asarray(run_ids, dtype=np.int64)
        self.stream = stream
        if stream == "rex":
            self._rex = RexStreams(seed, self.run_ids)
        else:  # every split a run can make (depths 0..tree_depth), drawn at once
            self._draws = split_draws(run_keys(seed, self.run_ids), tree_depth + 1)
        self.seed, self.min_box_size, self.tree_depth = seed, min_box_size, tree_depth
        self.search_limit = search_limit
        self.weights = child_weights(form)
        # rex: float32 value of each job box's pixels, and what a passing mutant adds to each
        # child it keeps: rex-xai's float32(1/k) (or 1/(k+1) for the witness form)
        self._values = np.full(
            (runs, JOB_SLOTS), 1.0 if combination == "multiplicative" else 0.0, np.float32
        )
        self._added = (self.weights / UNITS).astype(np.float32)  # [14, 4], 0 where not kept
        self._keeps = self.weights > 0
        self.evaluations = np.zeros(runs, dtype=np.int64)
        self.done = np.zeros(runs, dtype=bool)
        # A job: up to 3 boxes (row0, row1, col0, col1) of one depth; slots past ``job_size``
        # hold leftovers that are never read.
        self.job = np.zeros((runs, JOB_SLOTS, 4), dtype=np.int64)
        self.job[:, 0] = (0, height, 0, width)
        self.job_size = np.ones(runs, dtype=np.int64)
        self.depth = 0  # depth of the job boxes; all runs descend one level per step
        self._rows = np.arange(runs)
        self._processed = np.zeros((runs, JOB_SLOTS), dtype=bool)
        self._children = np.zeros((runs, JOB_SLOTS, 4, 4), dtype=np.int64)
        self._job_area = np.zeros((runs, JOB_SLOTS), dtype=np.int64)
        # What each level paints (children [R, 12, 4] and their units [R, 12], or with the rex
        # stream their float32 increase as float64), painted at the end: one matmul instead of
        # one per level.
        self._painted: list[tuple[np.ndarray, np.ndarray]] = []
        self._responsibility: np.ndarray | None = None

    @property
    def responsibility(self) -> np.ndarray:
        """float [R, H, W]: each run's responsibility map so far.

        With the rex stream: rex-xai's float32 run map less its start (1 or 0), exactly.
        """
        if self._responsibility is None:
            runs = len(self.run_ids)
            if self._painted:
                rects = np.concatenate([p[0] for p in self._painted], axis=1)
                units = np.concatenate([p[1] for p in self._painted], axis=1)
                painted = paint_rects(rects, units, self.height, self.width)
                self._responsibility = painted if self.stream == "rex" else painted / UNITS
            else:
                self._responsibility = np.zeros((runs, self.height, self.width))
        return self._responsibility

    def propose(self) -> tuple[np.ndarray, np.ndarray]:
        """Keep-masks [N, H, W] of this level's mutants and the run each belongs to [N].

        Runs are listed in order, and within a run its split boxes in job order, 14 mutants
        each in ReX's combination order. Runs with nothing to split are marked done.
        """
        job = self.job
        in_job = _SLOTS < self.job_size[:, None]
        area = (job[..., 1] - job[..., 0]) * (job[..., 3] - job[..., 2]) * in_job
        self._job_area = area
        splittable = (area >= max(self.min_box_size, 2)) & (self.depth <= self.tree_depth)
        processed = np.logical_and.accumulate(splittable, axis=1) & ~self.done[:, None]
        self.done |= ~processed[:, 0]
        self._processed = processed

        if self.stream == "rex":
            positions = self._rex.positions(area, processed)
        else:
            positions = split_positions(area, self._draws[:, min(self.depth, self.tree_depth)])
        self._children = cut_rects(job, positions)
        others = job[:, _OTHER_SLOTS] * in_job[:, _OTHER_SLOTS, None]  # [R, 3, 2, 4]
        masks = mutant_masks(self._children[processed], others[processed], self.height, self.width)
        owners = np.repeat(np.nonzero(processed)[0], MUTANTS_PER_BOX)
        return masks, owners

    def update(self, passing: np.ndarray) -> None:
        """Take the verdicts (True = same top-1 class) for the mutants of the last ``propose``."""
        processed, rows = self._processed, self._rows
        verdicts = np.zeros((*processed.shape, MUTANTS_PER_BOX), dtype=bool)
        verdicts[processed] = np.asarray(passing, dtype=bool).reshape(-1, MUTANTS_PER_BOX)
        split = processed.sum(axis=1)
        self.evaluations += MUTANTS_PER_BOX * split

        # Passing mutants share 1/k among the k children they keep.
        if self.stream == "rex":
            before = np.repeat(self._values[:, :, None], 4, axis=2)  # [R, 3, 4]
            values = before.copy()
            for mutant in range(MUTANTS_PER_BOX):  # in rex-xai's order, in float32
                adds = verdicts[:, :, mutant, None] & self._keeps[mutant]
                values = np.where(adds, values + self._added[mutant], values)
            units = values.astype(np.float64) - before  # exact: both are float32 values
        else:
            units = verdicts.view(np.uint8) @ self.weights  # [R, 3, 4]
        self._painted.append(
            (self._children.reshape(len(rows), -1, 4), units.reshape(len(rows), -1))
        )
        self._responsibility = None

        # Next job: kept children of the smallest passing mutant of the last processed box.
        last = np.maximum(split - 1, 0)
        last_verdicts = verdicts[rows, last]  # [R, 14]
        children = self._children[rows, last]  # [R, 4, 4]
        child_area = (children[..., 1] - children[..., 0]) * (children[..., 3] - children[..., 2])
        static_area = self._job_area.sum(axis=1) - self._job_area[rows, last]
        visible = child_area @ _COMBINATIONS_INT.T + static_area[:, None]
        chosen = np.where(last_verdicts, visible, _NEVER).argmin(axis=1)
        # KEPT_INDEX pads with 4 (no child); those slots are past the job's size, never read.
        self.job = children[rows[:, None], KEPT_INDEX[chosen] % 4]
        self.job_size = KEPT_CHILDREN[chosen]
        if self.stream == "rex":
            self._values = values[rows, last][rows[:, None], KEPT_INDEX[chosen] % 4]
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


def combine_runs_rex(maps: np.ndarray, combination: Combination) -> np.ndarray:
    """``combine_runs`` in rex-xai 0.4.1's float32 arithmetic, runs in order.

    ``maps`` [R, H, W] are the runs' float32 maps less their start (``Landscapes`` with the rex
    stream). Multiplicative: the global map starts at 1 and is multiplied by each run's map
    (1 + r) then divided by its maximum, in float32, one run after another; additive: the
    float32 sum. Rounding makes pixels whose exact products differ by less than about 1e-6
    (relative) equal or reversed, and the ranking follows rex-xai there too.
    """
    if combination == "multiplicative":
        total = np.ones(maps.shape[1:], dtype=np.float32)
        for run_map in maps:
            total *= (1.0 + run_map).astype(np.float32)
            total /= total.max()
        return total.astype(np.float64)
    total = np.zeros(maps.shape[1:], dtype=np.float32)
    for run_map in maps:
        total += run_map.astype(np.float32)
    result = total.astype(np.float64)  # dividing in float64 keeps every distinct value distinct
    peak = result.max()
    return result / peak if peak > 0 else result
