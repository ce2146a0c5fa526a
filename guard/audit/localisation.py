"""Per-image comparisons of MPSs and responsibility maps: with each other and with object masks.

Pure numpy on boolean H x W masks and float H x W responsibility maps. A value that is not
defined for an image (an empty MPS has no precision, an empty object mask no coverage) is
``None``, so that averages are taken over the images where it is defined and say how many.

Responsibility here is *relevance above the map's floor*: ``r - min(r)``. The engine's
multiplicative combination leaves every pixel a positive value (pixels no run credited sit
at the floor), and localisation metrics of Arras, Osman and Samek (2022) expect relevance
that is zero where nothing was attributed.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt

from guard.algorithm.extraction import rank_pixels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Sørensen-Dice overlap 2|A n B| / (|A| + |B|); two empty sets are identical (1.0)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def hausdorff(a: np.ndarray, b: np.ndarray) -> float | None:
    """Symmetric Hausdorff distance in pixels (Euclidean, between pixel centres); None if
    either set is empty, where it is not defined."""
    if not a.any() or not b.any():
        return None
    # distance_transform_edt(~b) is, at every pixel, the distance to the nearest pixel of b.
    a_to_b = float(distance_transform_edt(~b)[a].max())
    b_to_a = float(distance_transform_edt(~a)[b].max())
    return max(a_to_b, b_to_a)


def relevance(responsibility: np.ndarray) -> np.ndarray:
    """Responsibility above the map's floor, ``r - min(r)`` (zero where nothing was credited)."""
    r = np.asarray(responsibility, dtype=np.float64)
    return r - r.min()


def precision_in_mask(mps: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of MPS pixels inside the object mask; None for an empty MPS."""
    size = int(mps.sum())
    return None if size == 0 else int(np.logical_and(mps, mask).sum()) / size


def mask_coverage(mps: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of the object mask covered by the MPS; None for an empty object mask."""
    size = int(mask.sum())
    return None if size == 0 else int(np.logical_and(mps, mask).sum()) / size


def relevance_rank_accuracy(responsibility: np.ndarray, mask: np.ndarray) -> float | None:
    """RRA: of the K most responsible pixels (K = mask size), the share inside the mask.
    Ties are broken as the engine ranks pixels, so RRA follows the MPS's own ranking."""
    k = int(mask.sum())
    if k == 0:
        return None
    top = rank_pixels(np.asarray(responsibility))[:k]
    return int(mask.ravel()[top].sum()) / k


def relevance_mass_accuracy(responsibility: np.ndarray, mask: np.ndarray) -> float | None:
    """RMA: relevance inside the mask / total relevance; None when there is no relevance."""
    r = relevance(responsibility)
    total = float(r.sum())
    return None if total <= 0 or not mask.any() else float(r[mask].sum()) / total


def pointing_game(responsibility: np.ndarray, mask: np.ndarray) -> float | None:
    """1.0 when the most responsible pixel (first in the engine's ranking) lies in the mask."""
    if not mask.any():
        return None
    return float(mask.ravel()[rank_pixels(np.asarray(responsibility))[0]])


def dual_polarity_precision(responsibility: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of the pixels with positive relevance that lie inside the mask: 1.0 when all
    positive responsibility is on the object and none outside. None when no pixel has any."""
    support = relevance(responsibility) > 0
    count = int(support.sum())
    return None if count == 0 or not mask.any() else int(support[mask].sum()) / count


LOCALISATION_METRICS = (
    "mps_precision_in_mask",
    "mask_coverage",
    "rra",
    "rma",
    "pointing_game",
    "dual_polarity_precision",
)


def localisation(
    mps: np.ndarray, responsibility: np.ndarray, mask: np.ndarray
) -> dict[str, float | None]:
    """Every localisation metric of one image, named as in the report."""
    return {
        "mps_precision_in_mask": precision_in_mask(mps, mask),
        "mask_coverage": mask_coverage(mps, mask),
        "rra": relevance_rank_accuracy(responsibility, mask),
        "rma": relevance_mass_accuracy(responsibility, mask),
        "pointing_game": pointing_game(responsibility, mask),
        "dual_polarity_precision": dual_polarity_precision(responsibility, mask),
    }


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask (pixel centres), for models of another size."""
    if mask.shape == (height, width):
        return mask
    rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(int), mask.shape[0] - 1)  # fmt: skip
    cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int), mask.shape[1] - 1)  # fmt: skip
    return mask[np.ix_(rows, cols)]
