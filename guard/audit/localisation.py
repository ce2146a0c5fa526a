"""Per-image comparisons of MPSs and responsibility maps: with each other and with object masks.

Pure numpy on boolean H x W masks and float H x W responsibility maps. A value that is not
defined for an image (an empty MPS has no precision, an empty object mask no coverage) is
``None``, so that averages are taken over the images where it is defined and say how many.

Two readings of a responsibility map. *Relevance* (RMA) is the map above its floor,
``r - min(r)``: the engine's multiplicative combination leaves every pixel a positive value
(pixels no run credited sit at the floor), and the localisation metrics of Arras, Osman and
Samek (2022) expect relevance that is zero where nothing was attributed. *Signed relevance*
(dual-polarity precision) is the runs' summed evidence minus its median over the image: see
``signed_relevance``.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt

from guard.algorithm.extraction import rank_pixels
from guard.algorithm.landscape import Combination


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


def run_evidence(responsibility: np.ndarray, combination: Combination) -> np.ndarray:
    """The map on the scale its runs are combined on: the log of a multiplicative map (the sum
    over runs of ``log(1 + r_run)``, up to the constant of the scaling to maximum 1), an
    additive map as it is (the sum over runs of ``r_run``, scaled)."""
    r = np.asarray(responsibility, dtype=np.float64)
    if combination == "multiplicative":
        return np.log(np.maximum(r, np.finfo(np.float64).tiny))
    return r


def signed_relevance(
    responsibility: np.ndarray, combination: Combination = "multiplicative"
) -> np.ndarray:
    """Each pixel's evidence above (> 0) or below (< 0) the image's median pixel.

    Positive: the runs credited the pixel more than they credited the typical pixel; negative:
    less. The median, not the floor: a pixel no run credited sits at the floor, so relative to
    the floor no pixel is ever negative and the map has one polarity only. On the runs' own
    scale (``run_evidence``): in the multiplicative map's raw values the top pixels are
    thousands of times the median, and the pixels below the median would weigh nothing.
    """
    evidence = run_evidence(responsibility, combination)
    return evidence - np.median(evidence)


def dual_polarity_precision(
    responsibility: np.ndarray, mask: np.ndarray, combination: Combination = "multiplicative"
) -> float | None:
    """(positive signed relevance inside the mask + |negative signed relevance| outside it) /
    total |signed relevance|: 1 when everything above the median pixel is on the object and
    everything below it off the object; about 0.5 for a map unrelated to the mask; 0 for the
    reverse. None for an empty or full mask, or a flat map (no signed relevance)."""
    s = signed_relevance(responsibility, combination)
    total = float(np.abs(s).sum())
    if total <= 0 or not mask.any() or mask.all():
        return None
    agreeing = float(np.clip(s[mask], 0, None).sum()) + float(np.clip(-s[~mask], 0, None).sum())
    return agreeing / total


def mask_share(mask: np.ndarray) -> float:
    """The object mask's share of the image: the chance level of MPS precision, RRA, RMA
    and the pointing game (a ranking or MPS unrelated to the object scores it on average)."""
    return float(np.mean(mask))


LOCALISATION_METRICS = (
    "mask_share",
    "mps_precision_in_mask",
    "mask_coverage",
    "rra",
    "rma",
    "pointing_game",
    "dual_polarity_precision",
)


def localisation(
    mps: np.ndarray,
    responsibility: np.ndarray,
    mask: np.ndarray,
    combination: Combination = "multiplicative",
) -> dict[str, float | None]:
    """Every localisation metric of one image, named as in the report."""
    return {
        "mask_share": mask_share(mask),
        "mps_precision_in_mask": precision_in_mask(mps, mask),
        "mask_coverage": mask_coverage(mps, mask),
        "rra": relevance_rank_accuracy(responsibility, mask),
        "rma": relevance_mass_accuracy(responsibility, mask),
        "pointing_game": pointing_game(responsibility, mask),
        "dual_polarity_precision": dual_polarity_precision(responsibility, mask, combination),
    }


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask (pixel centres), for models of another size."""
    if mask.shape == (height, width):
        return mask
    rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(int), mask.shape[0] - 1)  # fmt: skip
    cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int), mask.shape[1] - 1)  # fmt: skip
    return mask[np.ix_(rows, cols)]
