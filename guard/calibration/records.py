"""One labelled item as calibration sees it: prediction, confidence, MPS and evidence features.

Records are produced by the MPS pass over a labelled data set and cached one JSON object
per line, so an interrupted ``guard calibrate`` resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ItemRecord:
    """Everything the offline statistics need about one labelled item."""

    key: str  # file path or "npz:<index>"
    label: int  # true class
    predicted_class: int
    confidence: float  # MSP: top-1 softmax probability
    margin: float  # top-1 minus top-2 probability
    mps_area_fraction: float  # MPS pixels / (H*W), in [0, 1]
    degenerate: bool  # empty MPS or a single chunk
    baseline_class: int  # top-1 class of the all-baseline input
    # Confidence and MPS evidence features by name (guard.evidence), finite numbers.
    features: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Plain Python types whatever the caller passes (numpy scalars are common), so that
        # records compare equal and serialise; a bad value fails here, not deep in a fit.
        object.__setattr__(self, "key", str(self.key))
        for name in ("label", "predicted_class", "baseline_class"):
            object.__setattr__(self, name, operator.index(getattr(self, name)))
        for name in ("confidence", "margin", "mps_area_fraction"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"{self.key}: {name} is not finite")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "degenerate", bool(self.degenerate))
        features = {str(k): float(v) for k, v in self.features.items()}
        bad = sorted(k for k, v in features.items() if not math.isfinite(v))
        if bad:
            raise ValueError(f"{self.key}: features {bad} are not finite")
        object.__setattr__(self, "features", features)
        if not 0.0 <= self.mps_area_fraction <= 1.0:
            raise ValueError(
                f"{self.key}: mps_area_fraction {self.mps_area_fraction} is not in [0, 1]"
            )

    @property
    def correct(self) -> bool:
        """Whether the prediction is the true class."""
        return self.predicted_class == self.label

    def to_json_line(self) -> str:
        """One line of the record cache (no trailing newline)."""
        return json.dumps(asdict(self), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json_line(cls, line: str) -> ItemRecord:
        """Parse one cache line; ``ValueError`` if it is malformed (e.g. cut off mid-write)."""
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON record: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("a record line must hold a JSON object")
        expected = {f.name for f in fields(cls)}
        if set(data) != expected:
            missing, unknown = expected - set(data), set(data) - expected
            raise ValueError(
                f"record fields differ: missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        return cls(
            key=_typed(data, "key", str),
            label=_typed(data, "label", int),
            predicted_class=_typed(data, "predicted_class", int),
            confidence=float(_typed(data, "confidence", (int, float))),
            margin=float(_typed(data, "margin", (int, float))),
            mps_area_fraction=float(_typed(data, "mps_area_fraction", (int, float))),
            degenerate=_typed(data, "degenerate", bool),
            baseline_class=_typed(data, "baseline_class", int),
            features=_features(data["features"]),
        )


def _features(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
    ):
        raise ValueError("record field 'features' must map names to numbers")
    return {str(k): float(v) for k, v in value.items()}


def _typed(data: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = data[name]
    # bool is an int in Python; a JSON true must not pass as a class index or a probability.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"record field {name!r} has the wrong type: {value!r}")
    return value


def feature_table(records: list[ItemRecord]) -> dict[str, Any]:
    """The records as named columns, one value per record: what the scores read.

    Features missing from some records (an older cache) are left out for all.
    """
    table: dict[str, Any] = {
        "msp": np.array([r.confidence for r in records], dtype=np.float64),
        "margin": np.array([r.margin for r in records], dtype=np.float64),
        "mps_area_fraction": np.array([r.mps_area_fraction for r in records], dtype=np.float64),
        "predicted_class": np.array([r.predicted_class for r in records], dtype=np.float64),
    }
    shared = set.intersection(*(set(r.features) for r in records)) if records else set()
    for name in sorted(shared - set(table)):
        table[name] = np.array([r.features[name] for r in records], dtype=np.float64)
    return table
