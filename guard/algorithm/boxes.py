"""Random box trees (ReX's search space) and the 14 mutants of a split box."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The non-empty proper subsets of a box's 4 children, in ReX's order: 4 singles, 6 pairs,
# 4 triples. Row m says which children mutant m keeps.
COMBINATIONS: np.ndarray = np.array(
    [
        [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1],
        [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1],
        [1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1],
    ],
    dtype=bool,
)  # fmt: skip
MUTANTS_PER_BOX = len(COMBINATIONS)
KEPT_CHILDREN: np.ndarray = COMBINATIONS.sum(axis=1)


@dataclass(frozen=True, slots=True)
class Box:
    """Half-open pixel rectangle [row_start, row_stop) x [col_start, col_stop) at a tree depth."""

    row_start: int
    row_stop: int
    col_start: int
    col_stop: int
    depth: int = 0

    @property
    def area(self) -> int:
        return (self.row_stop - self.row_start) * (self.col_stop - self.col_start)

    def paint(self, canvas: np.ndarray, value: float | bool = True) -> None:
        """Set this box's pixels of an H x W array (in place)."""
        canvas[self.row_start : self.row_stop, self.col_start : self.col_stop] = value


def can_split(box: Box, min_box_size: int, tree_depth: int) -> bool:
    """ReX splits a box only above the size floor and not below the depth limit.

    An area of 1 cannot be split either: the cut pixel is drawn excluding the first pixel.
    """
    return box.depth <= tree_depth and box.area >= max(min_box_size, 2)


def split_box(box: Box, rng: np.random.Generator) -> tuple[Box, Box, Box, Box]:
    """Cut a box at the row and column of one random pixel (never its first pixel, as ReX).

    Returns the top-left, top-right, bottom-left and bottom-right children; the pixel's row
    and column belong to the bottom and right children, so some children may be empty.
    """
    width = box.col_stop - box.col_start
    position = int(rng.integers(1, box.area))
    row = box.row_start + position // width
    col = box.col_start + position % width
    depth = box.depth + 1
    return (
        Box(box.row_start, row, box.col_start, col, depth),
        Box(box.row_start, row, col, box.col_stop, depth),
        Box(row, box.row_stop, box.col_start, col, depth),
        Box(row, box.row_stop, col, box.col_stop, depth),
    )
