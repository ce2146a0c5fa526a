"""The audit run: every model's prediction and MPS on the same labelled images.

One resumable JSON-lines cache per model (the calibration run's mechanism, with the masks'
digest and the seeds added to the fingerprint). Each record keeps the MPS itself, bit-packed,
so that the overlap of different models' MPSs can be computed after the run, the MPSs of the
same image under the other seeds (the within-model noise floor of that overlap), and the
localisation metrics against the object mask, which need the responsibility map that is not
kept.
"""

from __future__ import annotations

import base64
import json
import operator
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from guard.audit.localisation import LOCALISATION_METRICS, localisation
from guard.audit.masks import GroundTruth
from guard.cached_run import CachedRun, Executor, Explain, fingerprint, run_cached
from guard.datasets import Item, LabelledData
from guard.engine import MpsEngine
from guard.runtime import MaskedClassifier

AUDIT_FORMAT = 2
# The k-th seed of an audit is seed + k * SEED_STEP. Neighbouring seeds would not do: with
# rex-xai's random stream, seeds s and s + 1 share 19 of 20 runs.
SEED_STEP = 1000


def audit_seeds(seed: int, count: int) -> list[int]:
    """The seeds an audit explains every image under: the engine's, then one per SEED_STEP."""
    return [seed + k * SEED_STEP for k in range(count)]


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
    mask_share: float | None = None
    # The MPS under each further seed of the audit (seed + k * SEED_STEP, k = 1, 2, ...), packed
    # as mps_bits; the prediction does not depend on the seed.
    other_seeds_bits: tuple[str, ...] = ()

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
        object.__setattr__(self, "other_seeds_bits", tuple(map(str, self.other_seeds_bits)))

    @property
    def correct(self) -> bool:
        return self.predicted_class == self.label

    def mps_mask(self, height: int, width: int) -> np.ndarray:
        return unpack_mask(self.mps_bits, height, width)

    def seed_masks(self, height: int, width: int) -> list[np.ndarray]:
        """The MPS under every seed of the audit, the first seed's first."""
        return [
            unpack_mask(bits, height, width) for bits in (self.mps_bits, *self.other_seeds_bits)
        ]

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


def unpack_mask(bits: str, height: int, width: int) -> np.ndarray:
    packed = np.frombuffer(base64.b64decode(bits), dtype=np.uint8)
    return np.unpackbits(packed, count=height * width).astype(bool).reshape(height, width)


@dataclass
class AuditModel:
    """A model under audit: its name in the report, its family label, runtime and engine, and
    the engines of the further seeds (the same settings but the seed)."""

    name: str
    path: Path
    family: str
    classifier: MaskedClassifier
    engine: MpsEngine
    other_engines: tuple[MpsEngine, ...] = field(default=())

    @property
    def shape(self) -> tuple[int, int]:
        return self.classifier.spec.height, self.classifier.spec.width

    @property
    def seeds(self) -> list[int]:
        return [e.settings.seed for e in (self.engine, *self.other_engines)]


def seed_engines(
    classifier: MaskedClassifier, engine: MpsEngine, seeds: int
) -> tuple[MpsEngine, ...]:
    """Engines for the audit's further seeds: ``engine``'s settings with seed + k * SEED_STEP,
    k = 1 .. seeds - 1 (a ConfigError where a seed does not suit the random stream)."""
    return tuple(
        MpsEngine(classifier, engine.settings.model_copy(update={"seed": seed}))
        for seed in audit_seeds(engine.settings.seed, seeds)[1:]
    )


def audit_fingerprint(
    model: AuditModel, data: LabelledData, truth: GroundTruth | None
) -> dict[str, Any]:
    return {
        **fingerprint(model.classifier, model.engine, data),
        "audit_format": AUDIT_FORMAT,
        "seeds": model.seeds,
        "masks": None if truth is None else {"source": str(truth.source.resolve()), "sha256": truth.digest},
    }  # fmt: skip


class Masks(Protocol):
    """What the audit reads of the ground truth: an item's object mask at a model's size."""

    def mask(self, key: str, height: int, width: int) -> np.ndarray: ...


@dataclass(frozen=True)
class PackedMasks:
    """Every item's object mask at one model's input size, bit-packed: the ground truth as it
    travels to remote workers, which may not see the driver's mask files."""

    height: int
    width: int
    bits: dict[str, bytes]

    @classmethod
    def of(cls, truth: Masks, keys: Sequence[str], height: int, width: int) -> PackedMasks:
        return cls(height, width,
                   {key: np.packbits(truth.mask(key, height, width)).tobytes() for key in keys})  # fmt: skip

    def mask(self, key: str, height: int, width: int) -> np.ndarray:
        if (height, width) != (self.height, self.width):
            raise ValueError(
                f"masks packed at {self.height} x {self.width}, not {height} x {width}"
            )
        packed = np.frombuffer(self.bits[key], dtype=np.uint8)
        return np.unpackbits(packed, count=height * width).astype(bool).reshape(height, width)


def run_model(
    model: AuditModel,
    data: LabelledData,
    truth: GroundTruth | None,
    cache: Path,
    *,
    batch_items: int = 8,
    restart: bool = False,
    on_progress: Callable[[int], None] | None = None,
    executor: Executor | None = None,
) -> CachedRun[AuditRecord]:
    """Compute (or take from the cache) the audit record of every item for one model.
    ``executor`` computes the records elsewhere (guard.scaleout: on Ray workers), the same
    ones: each worker builds the model's engines for every seed from the first one's settings,
    and gets the masks at the model's size."""
    runner = None
    if executor is not None:
        height, width = model.shape
        packed = None if truth is None else PackedMasks.of(truth, data.keys, height, width)
        make_explain = partial(explainer, seeds=tuple(model.seeds), truth=packed)
        runner = executor(make_explain, model.classifier, model.engine)
    explain = _explainer(model.classifier, model.engine, model.other_engines, truth)
    return run_cached(
        data, cache, audit_fingerprint(model, data, truth), explain, AuditRecord.from_json_line,
        batch_items=batch_items, restart=restart, on_progress=on_progress, runner=runner,
    )  # fmt: skip


def explainer(
    classifier: MaskedClassifier, engine: MpsEngine, *, seeds: Sequence[int], truth: Masks | None
) -> Explain[AuditRecord]:
    """The audit records of a batch of items from a model runtime (a remote worker's copy of
    the driver's): ``engine`` explains under ``seeds[0]``, and one engine of its settings is
    made for each further seed."""
    if engine.settings.seed != seeds[0]:
        raise ValueError(f"the engine's seed {engine.settings.seed} is not the first, {seeds[0]}")
    others = tuple(
        MpsEngine(classifier, engine.settings.model_copy(update={"seed": seed}))
        for seed in seeds[1:]
    )
    return _explainer(classifier, engine, others, truth)


def _explainer(
    classifier: MaskedClassifier,
    engine: MpsEngine,
    other_engines: Sequence[MpsEngine],
    truth: Masks | None,
) -> Explain[AuditRecord]:
    height, width = classifier.spec.height, classifier.spec.width

    def explain(items: list[Item]) -> list[AuditRecord]:
        images = np.stack([item.tensor for item in items])
        results = engine.explain_batch(images)
        others = [other.explain_batch(images) for other in other_engines]
        combination = engine.settings.combination
        records = []
        for i, (item, mps) in enumerate(zip(items, results, strict=True)):
            located = (
                localisation(mps.mps_mask, mps.responsibility,
                             truth.mask(item.key, height, width), combination)
                if truth is not None
                else {}
            )  # fmt: skip
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
                    other_seeds_bits=tuple(pack_mask(other[i].mps_mask) for other in others),
                    **located,
                )  # fmt: skip
            )
        return records

    return explain
