"""A served model: the classifier, its MPS engine and its calibration, checked to belong together."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from guard.engine import MpsEngine, MpsResult
from guard.errors import ConfigError, ModelLoadError
from guard.preprocess import Preprocessing, input_from_bytes
from guard.runtime import MaskedClassifier
from guard.runtime.classifier import Prediction
from guard.service.settings import ServeSettings
from guard.settings import EngineSettings, ModelOptions
from guard.verdict.artifact import CalibrationArtifact, load_artifact
from guard.verdict.detector import Verdicts

# Engine settings that change how work is split into model calls, never the MPS itself.
_PERFORMANCE_ONLY = frozenset({"max_batch_size", "extraction_batch"})


@dataclass(frozen=True)
class GuardedModel:
    """Everything needed to predict, explain and score for one served model."""

    name: str
    classifier: MaskedClassifier
    engine: MpsEngine
    calibration: CalibrationArtifact
    preprocessing: Preprocessing

    @property
    def class_names(self) -> list[str]:
        return self.calibration.class_names

    def class_name(self, index: int) -> str:
        names = self.class_names
        return names[index] if 0 <= index < len(names) else ""

    def predict(self, images: np.ndarray) -> Prediction:
        return self.classifier.predict(images)

    def score(
        self, results: list[MpsResult], confidences: np.ndarray, margins: np.ndarray
    ) -> Verdicts:
        """Verdicts of explained predictions (confidence and margin from the prediction)."""
        return self.calibration.detector.evaluate(
            mps_area_fraction=[r.mps_area_fraction for r in results],
            confidence=confidences,
            predicted_class=[r.predicted_class for r in results],
            margin=margins,
        )

    def decode(self, data: bytes) -> np.ndarray:
        """An encoded image (PNG, JPEG, ...) as a model input, preprocessed as calibrated."""
        return input_from_bytes(data, self.classifier.spec, self.preprocessing)


def load_guarded_model(settings: ServeSettings) -> GuardedModel:
    """Load the model and calibration of ``settings``; ``GuardError`` with one clear message
    when either is missing or unusable or they do not belong together."""
    model_path, calibration_path = settings.model, settings.calibration
    if model_path is None or calibration_path is None:
        raise ConfigError("a model and its calibration are needed to serve")
    calibration = load_artifact(
        calibration_path,
        model_sha256=_file_sha256(model_path),
        allow_model_mismatch=settings.allow_model_mismatch,
    )
    info = calibration.model
    classifier = MaskedClassifier(
        model_path,
        ModelOptions(
            layout=info.layout,
            height=info.height,
            width=info.width,
            output=info.output_name,
            provider=settings.provider,
            # Spinning MPS threads would take the CPU that request handling needs.
            spin_threads=False,
        ),
    )
    spec = classifier.spec
    # A model whose graph leaves the class count open reports 0 until run: nothing to compare.
    served = (spec.channels, spec.height, spec.width, spec.num_classes or info.num_classes)
    fitted = (info.channels, info.height, info.width, info.num_classes)
    if served != fitted:
        raise ConfigError(
            f"the calibration is for a model taking {fitted[:3]} (channels, height, width) with "
            f"{fitted[3]} classes; {model_path} takes {served[:3]} with {served[3]} classes"
        )
    engine_settings = _engine_settings(settings, calibration, calibration_path)
    try:
        preprocessing = Preprocessing.model_validate(calibration.preprocessing or {})
    except ValidationError as exc:
        raise ConfigError(f"calibration {calibration_path}: invalid preprocessing: {exc}") from exc
    return GuardedModel(
        name=settings.model_name or model_path.stem,
        classifier=classifier,
        engine=MpsEngine(classifier, engine_settings),
        calibration=calibration,
        preprocessing=preprocessing,
    )


def _engine_settings(
    settings: ServeSettings, calibration: CalibrationArtifact, calibration_path: Path
) -> EngineSettings:
    """The calibration's engine settings, or the given ones where they differ only in speed
    (or the user explicitly allows the mismatch)."""
    try:
        fitted = EngineSettings.model_validate(calibration.engine)
    except ValidationError as exc:
        raise ConfigError(
            f"calibration {calibration_path}: invalid engine settings: {exc}"
        ) from exc
    if settings.engine_settings is None:
        return fitted
    path = settings.engine_settings
    try:
        given = EngineSettings.model_validate(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, ValidationError) as exc:
        raise ConfigError(f"engine settings file {path}: {exc}") from exc
    differing = sorted(
        name
        for name in EngineSettings.model_fields
        if name not in _PERFORMANCE_ONLY and getattr(given, name) != getattr(fitted, name)
    )
    if differing and not settings.allow_engine_mismatch:
        raise ConfigError(
            f"engine settings in {path} differ from the calibration's in {', '.join(differing)}: "
            "MPSs made differently cannot be scored against it. Re-run guard calibrate with "
            "these settings, or pass --allow-engine-mismatch"
        )
    return given


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
