"""The audit run: every model's prediction and MPS on the same labelled images.

One resumable JSON-lines cache per model (the calibration run's mechanism, with the masks'
digest added to the fingerprint). Each record keeps the MPS itself, bit-packed, so that the
overlap of different models' MPSs can be computed after the run, and the localisation
metrics against the object mask, which need the responsibility map that is not kept.
"""

from __future__ import annotations

import base64
import json
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from guard.audit.localisation import LOCALISATION_METRICS, localisation
from guard.audit.masks import GroundTruth
from guard.cached_run import CachedRun, fingerprint, run_cached
from guard.datasets import Item, LabelledData
from guard.engine import MpsEngine
from guard.runtime import MaskedClassifier

AUDIT_FORMAT = 1


@dataclass(frozen=True)
class AuditRecord:
    """One model's prediction and MPS on one labelled item (with masks: its localisation)."""

    key: str
    label: int
    predicted_class: int
    confidence: float
    mps_area_fraction: float
    degenerate: bool
    baseline_class: int
    mps_bits: str  # base64 of np.packbits(mps_mask.ravel())
    mps_precision_in_mask: float | None = None
    mask_coverage: float | None = None
    rra: float | None = None
    rma: float | None = None
    pointing_game: float | None = None
    dual_polarity_precision: float | None = None

    def __post_init__(self) -> None:
        # Plain Python types (numpy scalars are common), so records serialise and compare.
        for name in ("label", "predicted_class", "baseline_class"):
            object.__setattr__(self, name, operator.index(getattr(self, name)))
        for name in ("confidence", "mps_area_fraction"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in LOCALISATION_METRICS:
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else float(value))
        object.__setattr__(self, "degenerate", bool(self.degenerate))

    @property
    def correct(self) -> bool:
        return self.predicted_class == self.label

    def mps_mask(self, height: int, width: int) -> np.ndarray:
        bits = np.frombuffer(base64.b64decode(self.mps_bits), dtype=np.uint8)
        return np.unpackbits(bits, count=height * width).astype(bool).reshape(height, width)

    def to_json_line(self) -> str:
        return json.dumps(asdict(self), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json_line(cls, line: str) -> AuditRecord:
        data = json.loads(line)
        expected = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != expected:
            raise ValueError(f"not an audit record: {line[:80]}")
        return cls(**data)


def pack_mask(mask: np.ndarray) -> str:
    return base64.b64encode(np.packbits(mask.ravel()).tobytes()).decode("ascii")


@dataclass
class AuditModel:
    """A model under audit: its name in the report, its family label, runtime and engine."""

    name: str
    path: Path
    family: str
    classifier: MaskedClassifier
    engine: MpsEngine

    @property
    def shape(self) -> tuple[int, int]:
        return self.classifier.spec.height, self.classifier.spec.width


def audit_fingerprint(
    model: AuditModel, data: LabelledData, truth: GroundTruth | None
) -> dict[str, Any]:
    return {
        **fingerprint(model.classifier, model.engine, data),
        "audit_format": AUDIT_FORMAT,
        "masks": None if truth is None else {"source": str(truth.source.resolve()), "sha256": truth.digest},
    }  # fmt: skip


def run_model(
    model: AuditModel,
    data: LabelledData,
    truth: GroundTruth | None,
    cache: Path,
    *,
    batch_items: int = 8,
    restart: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> CachedRun[AuditRecord]:
    """Compute (or take from the cache) the audit record of every item for one model."""
    height, width = model.shape

    def explain(items: list[Item]) -> list[AuditRecord]:
        results = model.engine.explain_batch(np.stack([item.tensor for item in items]))
        records = []
        for item, mps in zip(items, results, strict=True):
            located = (
                localisation(mps.mps_mask, mps.responsibility, truth.mask(item.key, height, width))
                if truth is not None
                else {}
            )
            records.append(
                AuditRecord(
                    key=item.key,
                    label=item.label,
                    predicted_class=mps.predicted_class,
                    confidence=mps.confidence,
                    mps_area_fraction=mps.mps_area_fraction,
                    degenerate=mps.degenerate,
                    baseline_class=mps.baseline_class,
                    mps_bits=pack_mask(mps.mps_mask),
                    **located,
                )  # fmt: skip
            )
        return records

    return run_cached(
        data, cache, audit_fingerprint(model, data, truth), explain, AuditRecord.from_json_line,
        batch_items=batch_items, restart=restart, on_progress=on_progress,
    )  # fmt: skip
