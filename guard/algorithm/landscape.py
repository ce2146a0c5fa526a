"""Phase 1 of ReX: the causal responsibility landscape of one prediction.

One ``LandscapeRun`` is one of ReX's ``iters`` independent greedy descents over a random box
tree. A run does not call the model: ``propose`` returns the keep-masks of its mutants for the
current tree level and ``update`` takes back which of them passed. That split lets all runs of
all images advance in lockstep, one batched model call per tree level.

Faithful to rex-xai 0.4.1 (``responsibility.causal_explanation`` with the default queue "area",
length 1): the boxes of a job are processed in order and processing stops at the first box that
cannot be split; the next job is the kept children of the smallest passing mutant of the *last*
processed box, and the run ends when that box has no passing mutant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from guard.algorithm.boxes import (
    COMBINATIONS,
    KEPT_CHILDREN,
    MUTANTS_PER_BOX,
    Box,
    can_split,
    split_box,
)

ResponsibilityForm = Literal["simple", "witness"]
Combination = Literal["multiplicative", "additive"]


def child_weights(form: ResponsibilityForm) -> np.ndarray:
    """[14, 4] responsibility a passing mutant gives each kept child.

    "simple" is ReX's 1/k for a mutant keeping k children; "witness" is the paper's 1/(k+1)
    Halpern-Pearl form.
    """
    k = KEPT_CHILDREN[:, None].astype(np.float64)
    return COMBINATIONS / (k if form == "simple" else k + 1.0)


@dataclass
class _SplitBox:
    children: tuple[Box, Box, Box, Box]
    static_area: int  # pixels kept in full from the job's other boxes


@dataclass
class LandscapeRun:
    """One greedy descent over a random box tree, driven from outside (see module doc)."""

    height: int
    width: int
    rng: np.random.Generator
    min_box_size: int = 10
    tree_depth: int = 10
    search_limit: int | None = None
    form: ResponsibilityForm = "simple"
    responsibility: np.ndarray = field(init=False)
    evaluations: int = field(init=False, default=0)
    done: bool = field(init=False, default=False)
    _job: list[Box] = field(init=False)
    _pending: list[_SplitBox] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.responsibility = np.zeros((self.height, self.width), dtype=np.float64)
        self._job = [Box(0, self.height, 0, self.width, depth=0)]
        self._weights = child_weights(self.form)

    def propose(self) -> np.ndarray:
        """Keep-masks [14 * P, H, W] of this level's mutants (P processed boxes), or none.

        When nothing can be proposed the run is marked done and an empty array is returned.
        """
        if self.done:
            return np.zeros((0, self.height, self.width), dtype=bool)
        self._pending = []
        mask_blocks = []
        for index, box in enumerate(self._job):
            if not can_split(box, self.min_box_size, self.tree_depth):
                break
            children = split_box(box, self.rng)
            static = np.zeros((self.height, self.width), dtype=bool)
            for other in self._job[:index] + self._job[index + 1 :]:
                other.paint(static)
            self._pending.append(_SplitBox(children, int(static.sum())))
            mask_blocks.append(_mutant_masks(children, static))
        if not mask_blocks:
            self.done = True
            return np.zeros((0, self.height, self.width), dtype=bool)
        return np.concatenate(mask_blocks)

    def update(self, passing: np.ndarray) -> None:
        """Take the verdicts for the masks of the last ``propose`` (True = same top-1 class)."""
        passing = np.asarray(passing, dtype=bool)
        if passing.shape != (MUTANTS_PER_BOX * len(self._pending),):
            raise ValueError(f"expected {MUTANTS_PER_BOX * len(self._pending)} verdicts")
        self.evaluations += passing.size
        for split, verdicts in zip(
            self._pending, passing.reshape(-1, MUTANTS_PER_BOX), strict=True
        ):
            if verdicts.any():
                shares = verdicts.astype(np.float64) @ self._weights
                for child, share in zip(split.children, shares, strict=True):
                    if child.area > 0 and share > 0:
                        self.responsibility[
                            child.row_start : child.row_stop, child.col_start : child.col_stop
                        ] += share
        self._job = self._next_job(self._pending[-1], passing[-MUTANTS_PER_BOX:])
        if not self._job or self._job[0].depth > self.tree_depth:
            self.done = True
        elif self.search_limit is not None and self.evaluations > self.search_limit:
            self.done = True

    @staticmethod
    def _next_job(split: _SplitBox, verdicts: np.ndarray) -> list[Box]:
        """Kept children of the smallest passing mutant (first in ReX's order on ties)."""
        if not verdicts.any():
            return []
        child_areas = np.array([child.area for child in split.children])
        visible = COMBINATIONS.astype(np.int64) @ child_areas + split.static_area
        visible = np.where(verdicts, visible, np.iinfo(np.int64).max)
        chosen = int(np.argmin(visible))
        return [
            child for child, kept in zip(split.children, COMBINATIONS[chosen], strict=True) if kept
        ]


def _mutant_masks(children: tuple[Box, Box, Box, Box], static: np.ndarray) -> np.ndarray:
    """[14, H, W] keep-masks: each combination of children plus the static boxes."""
    height, width = static.shape
    child_masks = np.zeros((4, height, width), dtype=np.uint8)
    for mask, child in zip(child_masks, children, strict=True):
        child.paint(mask, 1)
    # Children are disjoint, so a sum of indicators is their union.
    kept = (COMBINATIONS.astype(np.uint8) @ child_masks.reshape(4, -1)).astype(bool)
    return kept.reshape(MUTANTS_PER_BOX, height, width) | static


def combine_runs(maps: list[np.ndarray], combination: Combination) -> np.ndarray:
    """Global responsibility map from the runs' maps, scaled so its maximum is 1.

    Multiplicative (ReX 0.4.x): each run's map starts at 1 and the global map is their
    product, so the ranking follows prod(1 + r_run). Summed in log space to avoid overflow;
    the result equals ReX's product renormalised by its maximum. Additive (ReX 0.3.x): the sum.
    """
    stacked = np.stack(maps)
    if combination == "multiplicative":
        log_product = np.log1p(stacked).sum(axis=0)
        return np.exp(log_product - log_product.max())
    total = stacked.sum(axis=0)
    peak = total.max()
    return total / peak if peak > 0 else total
