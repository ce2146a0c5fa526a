"""ReX's mutants of a split box: which of its 4 children each of the 14 mutants keeps."""

from __future__ import annotations

import numpy as np

# The non-empty proper subsets of a box's 4 children, in ReX's order: 4 singles, 6 pairs,
# 4 triples. Row m says which children mutant m keeps.
# fmt: off
COMBINATIONS: np.ndarray = np.array(
    [
        [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1],
        [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1],
        [1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1],
    ],
    dtype=bool,
)
# fmt: on
MUTANTS_PER_BOX = len(COMBINATIONS)
KEPT_CHILDREN: np.ndarray = COMBINATIONS.sum(axis=1)
# Per mutant, the indices of its kept children, padded with 4 (no child) to 3 entries.
KEPT_INDEX: np.ndarray = np.array(
    [np.flatnonzero(row).tolist() + [4] * (3 - int(row.sum())) for row in COMBINATIONS]
)
