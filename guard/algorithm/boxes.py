"""ReX's mutants of a split box: which of its 4 children each of the 14 mutants keeps."""

from __future__ import annotations

from collections.abc import Callable

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

# SUBSETS[a, b]: mutant a keeps a subset of the children mutant b keeps (a == b included).
SUBSETS: np.ndarray = (COMBINATIONS[:, None, :] <= COMBINATIONS[None, :, :]).all(axis=2)
# The order in which "monotone" evaluates a box's mutants: singles, triples, then pairs. A passing
# single implies its 6 supersets and a failing triple its 6 subsets, so the pairs left to test
# are those neither implies.
MONOTONE_STAGES: tuple[np.ndarray, ...] = (np.arange(0, 4), np.arange(10, 14), np.arange(4, 10))


def monotone_verdicts(
    evaluate: Callable[[np.ndarray, np.ndarray], np.ndarray], boxes: int
) -> np.ndarray:
    """The verdicts bool [boxes, 14] of every mutant of ``boxes`` split boxes, evaluating only
    the mutants that the verdicts known so far do not imply, assuming monotonicity (a mutant
    that keeps more of the box passes when one that keeps less passes; one that keeps less fails
    when one that keeps more fails).

    ``evaluate(box, mutant)`` takes two equal-length index arrays and returns those mutants'
    verdicts; it is called once per stage (singles, triples, pairs) with every box's untested,
    unimplied mutants of the stage. Where the model is monotone on a box the result equals
    evaluating all 14 mutants; a box with a passing single costs 5 to 8 evaluations instead of
    14, one where nothing passes 8.
    """
    verdicts = np.zeros((boxes, MUTANTS_PER_BOX), dtype=bool)
    known = np.zeros((boxes, MUTANTS_PER_BOX), dtype=bool)
    subsets = SUBSETS.astype(np.int64)
    for stage in MONOTONE_STAGES:
        box, mutant = np.nonzero(~known[:, stage])
        mutant = stage[mutant]
        if len(box):
            verdicts[box, mutant] = evaluate(box, mutant)
            known[box, mutant] = True
        implied_pass = (verdicts & known).astype(np.int64) @ subsets > 0
        implied_fail = (~verdicts & known).astype(np.int64) @ subsets.T > 0
        verdicts |= implied_pass & ~known
        known |= implied_pass | implied_fail
    return verdicts
