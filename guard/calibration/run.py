"""The calibration run: prediction, confidence, margin and MPS of every labelled item."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from guard.cached_run import CachedRun, fingerprint, run_cached
from guard.calibration.records import ItemRecord
from guard.datasets import Item, LabelledData
from guard.engine import MpsEngine
from guard.runtime import MaskedClassifier

__all__ = ["run_items"]


def run_items(
    data: LabelledData,
    classifier: MaskedClassifier,
    engine: MpsEngine,
    cache: Path,
    *,
    batch_items: int = 8,
    restart: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> CachedRun[ItemRecord]:
    """Compute (or take from the cache) the calibration record of every item, in data order."""

    def explain(items: list[Item]) -> list[ItemRecord]:
        images = np.stack([item.tensor for item in items])
        prediction = classifier.predict(images)
        explained = engine.explain_batch(images)
        return [
            ItemRecord(
                key=item.key,
                label=item.label,
                predicted_class=mps.predicted_class,
                confidence=mps.confidence,
                margin=float(prediction.margins[i]),
                mps_area_fraction=mps.mps_area_fraction,
                degenerate=mps.degenerate,
                baseline_class=mps.baseline_class,
            )
            for i, (item, mps) in enumerate(zip(items, explained, strict=True))
        ]

    return run_cached(
        data, cache, fingerprint(classifier, engine, data), explain, ItemRecord.from_json_line,
        batch_items=batch_items, restart=restart, on_progress=on_progress,
    )  # fmt: skip
