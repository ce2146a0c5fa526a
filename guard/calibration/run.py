"""The calibration run: prediction, confidence, margin and MPS of every labelled item."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from guard.cached_run import CachedRun, Executor, Explain, fingerprint, run_cached
from guard.calibration.records import ItemRecord
from guard.datasets import Item, LabelledData
from guard.engine import MpsEngine
from guard.evidence import MPS_GROUPS, STABILITY_SEED_OFFSET, item_features
from guard.runtime import MaskedClassifier

__all__ = ["explainer", "run_items"]


def run_items(
    data: LabelledData,
    classifier: MaskedClassifier,
    engine: MpsEngine,
    cache: Path,
    *,
    stability: bool = False,
    batch_items: int = 8,
    restart: bool = False,
    on_progress: Callable[[int], None] | None = None,
    executor: Executor | None = None,
) -> CachedRun[ItemRecord]:
    """Compute (or take from the cache) the calibration record of every item, in data order.

    Each record holds every evidence feature (guard.evidence), so any score can be fitted
    from it; ``stability`` adds a second seed's MPS (twice the MPS cost) and its agreement.
    ``executor`` computes the records elsewhere (guard.scaleout: on Ray workers), the same ones.
    """
    make_explain = partial(explainer, stability=stability)
    runner = executor(make_explain, classifier, engine) if executor is not None else None
    expected = {**fingerprint(classifier, engine, data), "features": _groups(stability)}
    return run_cached(
        data, cache, expected, make_explain(classifier, engine), ItemRecord.from_json_line,
        batch_items=batch_items, restart=restart, on_progress=on_progress, runner=runner,
    )  # fmt: skip


def _groups(stability: bool) -> list[str]:
    return ["confidence", *MPS_GROUPS] + (["stability"] if stability else [])


def explainer(
    classifier: MaskedClassifier, engine: MpsEngine, *, stability: bool
) -> Explain[ItemRecord]:
    """The calibration records of a batch of items, from a model runtime (the driver's, or a
    remote worker's copy of it)."""
    groups = _groups(stability)
    second_engine = (
        MpsEngine(
            classifier,
            engine.settings.model_copy(
                update={"seed": engine.settings.seed + STABILITY_SEED_OFFSET}
            ),
        )
        if stability
        else None
    )

    def explain(items: list[Item]) -> list[ItemRecord]:
        images = np.stack([item.tensor for item in items])
        prediction = classifier.predict(images)
        explained = engine.explain_batch(images)
        second = second_engine.explain_batch(images) if second_engine is not None else None
        features = item_features(
            classifier, engine.settings.baseline, images, prediction.scores,
            classifier.output_kind, explained, groups=groups, second=second,
        )  # fmt: skip
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
                features=features[i],
            )
            for i, (item, mps) in enumerate(zip(items, explained, strict=True))
        ]

    return explain
