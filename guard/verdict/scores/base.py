"""What every suspicion score shares: the feature table it reads and the names it may use.

A score reads named per-prediction features (arrays of one value per prediction) and returns
one number per prediction, higher meaning more suspicious. Features of the whole input cost
nothing beyond the prediction; any other feature needs the MPS (and sometimes a few extra
model evaluations), so a score's feature names tell the sidecar what it must compute.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["CONFIDENCE_FEATURES", "Features", "column", "needs_mps"]

# Per-prediction features (name -> one value per prediction); "predicted_class" is one of them.
Features = Mapping[str, ArrayLike]

# Features of the whole input's model output: free with the prediction (guard.evidence).
CONFIDENCE_FEATURES = (
    "msp",
    "margin",
    "entropy",
    "max_logit",
    "energy",
    "pnorm_p2",
    "pnorm_p4",
    "pnorm_p8",
)
_FREE = frozenset(CONFIDENCE_FEATURES) | {"predicted_class"}


def column(features: Features, name: str) -> NDArray[np.float64]:
    """One feature as a float array; ``ValueError`` naming it when it is missing."""
    try:
        values = features[name]
    except KeyError:
        raise ValueError(f"the score needs the feature {name!r}, which was not computed") from None
    return np.atleast_1d(np.asarray(values, dtype=np.float64))


def needs_mps(feature_names: frozenset[str]) -> bool:
    """Whether any of these features comes from the MPS rather than the prediction alone."""
    return not feature_names <= _FREE
