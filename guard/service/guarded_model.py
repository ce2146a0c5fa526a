"""A guarded model: the classifier, its one MPS engine and its calibration, checked to belong
together; it predicts, and checks predictions (features, score, verdict, MPS) into ``Check``s.

A check computes exactly the evidence groups (guard.evidence) its calibrated detector reads:
none beyond the prediction for a confidence score, the MPS and the groups its terms name for
an MPS-using one (``feature_groups``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import ValidationError

from guard.engine import MpsEngine, MpsResult
from guard.errors import ConfigError, ModelLoadError
from guard.evidence import (
    FEATURE_GROUPS,
    MPS_GROUPS,
    STABILITY_SEED_OFFSET,
    baselines_for,
    confidence_features,
    extra_evaluations,
    mps_features,
    stability_features,
)
from guard.gallery import input_pixels
from guard.preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    Preprocessing,
    input_from_bytes,
    load_input,
)
from guard.runtime import MaskedClassifier, ModelSpec
from guard.runtime.classifier import Prediction
from guard.service.cancellation import raise_if_gone
from guard.service.settings import ServeSettings
from guard.settings import EngineSettings, ModelOptions
from guard.verdict.artifact import CalibrationArtifact, load_artifact
from guard.verdict.detector import SCORE_REASON

VERSION = "1"  # the one version of each served model, as the inference protocol names it
PLATFORM = "onnxruntime_onnx"  # what runs the model, in the inference protocol's words

# Engine settings that change how work is split into model calls, never the MPS itself.
_PERFORMANCE_ONLY = frozenset({"max_batch_size", "extraction_batch"})

# (model calls, model evaluations) just spent on MPSs: told once per engine model call.
ModelCallHook = Callable[[int, int], None]
# (images, deadline) -> their MPSs: the engine's explain_batch, or a queue in front of it.
Explain = Callable[[np.ndarray, float | None], list[MpsResult]]
# Why a check has its MPS: every check gets one ("always"), or, where only flagged predictions
# are explained, it was in the random sample ("sample"), or flagged ("flagged"); or none.
Explained = Literal["always", "sample", "flagged", "none"]

# Per-prediction columns every check has from the prediction itself, as calibration records
# them (guard.calibration.records.feature_table): the model's own top-1 probability, margin
# and class. ``mps_area_fraction`` comes with the MPS itself, every other feature from a group.
_PREDICTION_COLUMNS = frozenset({"msp", "margin", "predicted_class"})
_MPS_AREA = "mps_area_fraction"


def feature_groups(features: Collection[str]) -> tuple[str, ...]:
    """The evidence groups (``FEATURE_GROUPS`` order) that compute ``features`` beyond the
    prediction's own columns; ``ConfigError`` naming any feature no group computes."""
    owner = {name: group for group, names in FEATURE_GROUPS.items() for name in names}
    unknown = sorted(set(features) - set(owner) - _PREDICTION_COLUMNS - {_MPS_AREA})
    if unknown:
        raise ConfigError(
            f"the calibrated score reads features this guard cannot compute: {', '.join(unknown)}"
        )
    needed = {owner[name] for name in features if name in owner and name not in _PREDICTION_COLUMNS}
    return tuple(group for group in FEATURE_GROUPS if group in needed)


@dataclass(frozen=True)
class Check:
    """The guard's verdict on one prediction, its evidence, and the MPS (where computed)."""

    predicted_class: int
    predicted_name: str
    confidence: float
    mps_area_fraction: float | None  # None: no MPS was computed (``explained`` "none")
    degenerate: bool | None
    score: float
    p_value: float
    flagged: bool
    reason: str
    model_evaluations: int  # spent on this item's MPS and MPS features (0 without an MPS)
    model_calls: int
    mps_mask: np.ndarray | None  # bool [H, W]
    # The score's terms that pushed it up most, largest first: (term, contribution).
    evidence: tuple[tuple[str, float], ...] = ()
    # The value of every feature the score read (the predicted class aside: a field above).
    features: Mapping[str, float] = field(default_factory=dict)
    explained: Explained = "always"
    # float [H, W] in [0, 1], with the MPS: how much each pixel mattered to the prediction.
    responsibility: np.ndarray | None = None

    @property
    def representative(self) -> bool:
        """Whether this check's MPS is one of an unbiased sample of the checked predictions
        (every check's, or a random share's), which MPS-area statistics may use."""
        return self.explained in ("always", "sample")


@dataclass(frozen=True)
class ModelMetadata:
    """What a client may know of a served model: its name, versions and tensors."""

    name: str
    versions: tuple[str, ...]
    input_name: str
    input_shape: tuple[int, ...]  # one item, in the model's layout, without the batch axis
    input_dtype: np.dtype
    output_name: str
    num_classes: int
    class_names: tuple[str, ...]  # empty, or one per class
    platform: str


class _CheckedInputs:
    """The classifier as the engine sees it: the images reach the engine after ``predict``
    has validated them (the one full check of a request's inputs), so they are only cast;
    and every model call spent on MPSs is reported to ``on_model_call``."""

    def __init__(self, classifier: MaskedClassifier, on_model_call: ModelCallHook) -> None:
        self._classifier = classifier
        self._on_model_call = on_model_call
        self.spec: ModelSpec = classifier.spec

    def check_images(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(images).astype(self.spec.dtype, copy=False)

    def evaluate(
        self, images: np.ndarray, baselines: np.ndarray, masks: np.ndarray, image_index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        raise_if_gone()  # a cancelled request stops between model calls, as at its deadline
        answer = self._classifier.evaluate(images, baselines, masks, image_index)
        self._on_model_call(self._classifier.model_calls(len(masks)), len(masks))
        return answer

    def class_probabilities(
        self,
        images: np.ndarray,
        baselines: np.ndarray,
        masks: np.ndarray,
        image_index: np.ndarray,
        classes: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The MPS features' extra evaluations (guard.evidence.mps_features), counted too."""
        answer = self._classifier.class_probabilities(
            images, baselines, masks, image_index, classes
        )
        if len(masks):
            self._on_model_call(self._classifier.model_calls(len(masks)), len(masks))
        return answer

    def model_calls(self, mutants: int) -> int:
        return self._classifier.model_calls(mutants)


def _uncounted(calls: int, evaluations: int) -> None:
    pass


class GuardedModel:
    """Everything needed to predict, explain and score for one model.

    ``predict`` validates its batch and runs the model; ``check`` takes items ``predict``
    has seen and gives each its ``Check``: the MPS from the model's one engine, scored
    against the calibration.
    """

    def __init__(
        self,
        name: str,
        classifier: MaskedClassifier,
        calibration: CalibrationArtifact,
        *,
        engine_settings: EngineSettings,
        preprocessing: Preprocessing,
        on_model_call: ModelCallHook | None = None,
    ) -> None:
        self.name = name
        self.classifier = classifier
        self.calibration = calibration
        self.preprocessing = preprocessing
        self._inputs = _CheckedInputs(classifier, on_model_call or _uncounted)
        self.engine = MpsEngine(self._inputs, engine_settings)
        detector = calibration.detector
        self.feature_groups = feature_groups(detector.features)
        self.needs_mps = detector.needs_mps
        # The stability features compare the MPS with a second seed's.
        self._second_engine = (
            MpsEngine(
                self._inputs,
                engine_settings.model_copy(
                    update={"seed": engine_settings.seed + STABILITY_SEED_OFFSET}
                ),
            )
            if "stability" in self.feature_groups
            else None
        )
        self._mps_groups = [group for group in MPS_GROUPS if group in self.feature_groups]
        self._extra_evaluations = extra_evaluations(self._mps_groups)
        spec = classifier.spec
        self.metadata = ModelMetadata(
            name=name,
            versions=(VERSION,),
            input_name=spec.input_name,
            input_shape=tuple(spec.input_shape),
            input_dtype=np.dtype(spec.dtype),
            output_name=spec.output_name,
            # A graph that leaves the class count open reports 0: the calibration knows it.
            num_classes=spec.num_classes or calibration.model.num_classes,
            class_names=tuple(calibration.class_names),
            platform=PLATFORM,
        )

    @classmethod
    def from_files(
        cls,
        model: str | os.PathLike[str],
        calibration: str | os.PathLike[str],
        *,
        name: str | None = None,
        provider: str = "auto",
        engine_settings: EngineSettings | str | os.PathLike[str] | None = None,
        allow_model_mismatch: bool = False,
        allow_engine_mismatch: bool = False,
        spin_threads: bool = True,
        on_model_call: ModelCallHook | None = None,
    ) -> GuardedModel:
        """Load a model and its calibration; ``GuardError`` with one clear message when either
        is missing or unusable or they do not belong together.

        ``engine_settings`` (settings, or a JSON file of them) replaces the calibration's
        where they differ only in speed, or anywhere with ``allow_engine_mismatch``.
        """
        model_path, calibration_path = Path(model), Path(calibration)
        artifact = load_artifact(
            calibration_path,
            model_sha256=_file_sha256(model_path),
            allow_model_mismatch=allow_model_mismatch,
        )
        info = artifact.model
        classifier = MaskedClassifier(
            model_path,
            ModelOptions(
                layout=info.layout,
                height=info.height,
                width=info.width,
                output=info.output_name,
                provider=provider,  # type: ignore[arg-type]
                spin_threads=spin_threads,
            ),
        )
        spec = classifier.spec
        # A model whose graph leaves the class count open reports 0 until run: nothing to compare.
        served = (spec.channels, spec.height, spec.width, spec.num_classes or info.num_classes)
        fitted = (info.channels, info.height, info.width, info.num_classes)
        if served != fitted:
            raise ConfigError(
                f"the calibration is for a model taking {fitted[:3]} (channels, height, width) "
                f"with {fitted[3]} classes; {model_path} takes {served[:3]} with {served[3]} "
                "classes"
            )
        chosen = _engine_settings(
            artifact, calibration_path, engine_settings, allow_mismatch=allow_engine_mismatch
        )
        try:
            preprocessing = Preprocessing.model_validate(artifact.preprocessing or {})
        except ValidationError as exc:
            raise ConfigError(
                f"calibration {calibration_path}: invalid preprocessing: {exc}"
            ) from exc
        return cls(
            name or model_path.stem,
            classifier,
            artifact,
            engine_settings=chosen,
            preprocessing=preprocessing,
            on_model_call=on_model_call,
        )

    # -- facts --------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return self.calibration.class_names

    def class_name(self, index: int) -> str:
        names = self.class_names
        return names[index] if 0 <= index < len(names) else ""

    @property
    def flag_reasons(self) -> list[str]:
        """The reasons this calibration can flag a prediction for."""
        detector = self.calibration.detector
        return [SCORE_REASON[detector.score_kind]] + (
            ["myopic_mps"] if detector.flag_small_tail else []
        )

    # -- inputs -------------------------------------------------------------------------------

    def decode(
        self, data: bytes, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> np.ndarray:
        """An encoded image (PNG, JPEG, ...) as a model input, preprocessed as calibrated;
        ``InvalidInputError`` from its header alone when it has over ``max_image_pixels``."""
        return input_from_bytes(
            data, self.classifier.spec, self.preprocessing, max_image_pixels=max_image_pixels
        )

    def display(self, tensor: np.ndarray) -> np.ndarray:
        """A model input (one item) as the model saw it, in 8-bit H x W x C pixels for
        pictures: the calibrated preprocessing undone (guard.gallery.input_pixels)."""
        return input_pixels(tensor, self.classifier.spec, self.preprocessing)

    def load(self, path: str | os.PathLike[str]) -> np.ndarray:
        """An image file (preprocessed as calibrated) or an .npy tensor as a model input."""
        return load_input(Path(path), self.classifier.spec, self.preprocessing)

    # -- predictions and checks ---------------------------------------------------------------

    def predict(self, images: np.ndarray) -> Prediction:
        """The model on a batch [M, *input_shape]; ``InvalidInputError`` for a wrong shape or
        a non-finite value (the one full check of the inputs)."""
        return self.classifier.predict(images)

    def check(
        self,
        images: np.ndarray,
        prediction: Prediction,
        *,
        deadline: float | None = None,
        explain: Explain | None = None,
        only_flagged: bool = False,
        sampled: np.ndarray | None = None,
    ) -> list[Check]:
        """Checks of items already predicted (``prediction`` is ``predict``'s for ``images``):
        the features the calibrated detector reads, its verdict, and the MPS.

        ``explain`` computes the MPSs (default: this model's engine, on the caller's thread);
        ``deadline`` is a ``time.monotonic()`` instant after which ``DeadlineExceededError``
        ends the work. Every item's MPS is computed, unless ``only_flagged`` and the detector
        reads no MPS feature: then the verdict comes first, from the prediction alone, and the
        MPS is computed only for the items it flags and those ``sampled`` (bool [M], drawn by
        the caller independently of the verdict); the other checks carry no MPS.
        """
        count = len(images)
        if count == 0:
            return []
        explain = explain or self.engine.explain_batch
        table = self._prediction_columns(prediction)
        results: list[MpsResult | None]
        if self.needs_mps or not only_flagged:
            found = explain(images, deadline)
            columns, extra = self._mps_columns(images, found, deadline)
            table.update(columns)
            verdicts = self.calibration.detector.evaluate(table)
            results, why = list(found), ["always"] * count
        else:
            verdicts = self.calibration.detector.evaluate(table)
            sample = np.zeros(count, bool) if sampled is None else np.asarray(sampled, bool)
            chosen = np.flatnonzero(sample | verdicts.flagged)
            results = [None] * count
            found = explain(images[chosen], deadline) if chosen.size else []
            for i, result in zip(chosen, found, strict=True):
                results[i] = result
            why = [
                "sample" if sample[i] else "flagged" if verdicts.flagged[i] else "none"
                for i in range(count)
            ]
            extra = np.zeros((count, 2), np.int64)
        read = sorted(self.calibration.detector.features - {"predicted_class"})
        checks = []
        for k, result in enumerate(results):
            predicted = int(prediction.classes[k])
            evaluations = calls = 0
            if result is not None:
                evaluations = result.model_evaluations + int(extra[k, 0])
                calls = result.model_calls + int(extra[k, 1])
            checks.append(
                Check(
                    predicted_class=predicted,
                    predicted_name=self.class_name(predicted),
                    confidence=float(prediction.confidences[k]),
                    mps_area_fraction=None if result is None else result.mps_area_fraction,
                    degenerate=None if result is None else result.degenerate,
                    score=float(verdicts.score[k]),
                    p_value=float(verdicts.p_value[k]),
                    flagged=bool(verdicts.flagged[k]),
                    reason=str(verdicts.reason[k]),
                    model_evaluations=evaluations,
                    model_calls=calls,
                    mps_mask=None if result is None else result.mps_mask,
                    evidence=tuple((str(t), float(c)) for t, c in verdicts.evidence[k]),
                    features={name: float(np.asarray(table[name])[k]) for name in read},
                    explained=why[k],  # type: ignore[arg-type]
                    responsibility=None if result is None else result.responsibility,
                )
            )
        return checks

    def _prediction_columns(self, prediction: Prediction) -> dict[str, np.ndarray]:
        """The features of the prediction alone: its own columns, and the confidence group
        where the detector reads it."""
        table: dict[str, np.ndarray] = {}
        if "confidence" in self.feature_groups:
            table.update(confidence_features(prediction.scores, self.classifier.output_kind))
        table["msp"] = np.asarray(prediction.confidences, dtype=np.float64)
        table["margin"] = np.asarray(prediction.margins, dtype=np.float64)
        table["predicted_class"] = np.asarray(prediction.classes, dtype=np.float64)
        return table

    def _mps_columns(
        self, images: np.ndarray, results: Sequence[MpsResult], deadline: float | None
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The MPS area and the MPS feature groups the detector reads, as columns; and per
        item the model evaluations and calls they took beyond the MPS ([M, 2])."""
        rows: list[dict[str, float]] = [{} for _ in results]
        extra = np.zeros((len(results), 2), np.int64)
        if self._mps_groups:
            baselines = baselines_for(self._inputs, images, self.engine.settings.baseline)
            found = mps_features(self._inputs, images, baselines, results, groups=self._mps_groups)
            for row, values in zip(rows, found, strict=True):
                row.update(values)
            if self._extra_evaluations:
                extra[:, 0] += self._extra_evaluations
                extra[:, 1] += self.classifier.model_calls(self._extra_evaluations)
        if self._second_engine is not None:
            second = self._second_engine.explain_batch(images, deadline)
            for k, (row, a, b) in enumerate(zip(rows, results, second, strict=True)):
                row.update(stability_features(a, b))
                extra[k] += (b.model_evaluations, b.model_calls)
        columns = {_MPS_AREA: np.array([r.mps_area_fraction for r in results], dtype=np.float64)}
        for name in rows[0] if rows else ():
            columns[name] = np.array([row[name] for row in rows], dtype=np.float64)
        return columns, extra


def load_guarded_model(
    settings: ServeSettings, *, on_model_call: ModelCallHook | None = None
) -> GuardedModel:
    """The model and calibration ``settings`` serve (see ``GuardedModel.from_files``)."""
    if settings.model is None or settings.calibration is None:
        raise ConfigError("a model and its calibration are needed to serve")
    return GuardedModel.from_files(
        settings.model,
        settings.calibration,
        name=settings.served_name,
        provider=settings.provider,
        engine_settings=settings.engine_settings,
        allow_model_mismatch=settings.allow_model_mismatch,
        allow_engine_mismatch=settings.allow_engine_mismatch,
        # Spinning MPS threads would take the CPU that request handling needs.
        spin_threads=False,
        on_model_call=on_model_call,
    )


def _engine_settings(
    calibration: CalibrationArtifact,
    calibration_path: Path,
    given: EngineSettings | str | os.PathLike[str] | None,
    *,
    allow_mismatch: bool,
) -> EngineSettings:
    """The calibration's engine settings, or the given ones where they differ only in speed
    (or the mismatch is explicitly allowed)."""
    try:
        fitted = EngineSettings.model_validate(calibration.engine)
    except ValidationError as exc:
        raise ConfigError(
            f"calibration {calibration_path}: invalid engine settings: {exc}"
        ) from exc
    if given is None:
        return fitted
    if isinstance(given, EngineSettings):
        source = "the given engine settings"
    else:
        path = Path(given)
        source = f"engine settings in {path}"
        try:
            given = EngineSettings.model_validate(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, ValidationError) as exc:
            raise ConfigError(f"engine settings file {path}: {exc}") from exc
    differing = sorted(
        name
        for name in EngineSettings.model_fields
        if name not in _PERFORMANCE_ONLY and getattr(given, name) != getattr(fitted, name)
    )
    if differing and not allow_mismatch:
        raise ConfigError(
            f"{source} differ from the calibration's in {', '.join(differing)}: "
            "MPSs made differently cannot be scored against it. Re-run guard calibrate with "
            "these settings, or pass --allow-engine-mismatch"
        )
    return given


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
