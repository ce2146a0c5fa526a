"""A guarded model: the classifier, its one MPS engine and its calibration, checked to belong
together; it predicts, and checks predictions (MPS, score, verdict) into ``Check``s."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from guard.engine import MpsEngine, MpsResult
from guard.errors import ConfigError, ModelLoadError
from guard.preprocess import Preprocessing, input_from_bytes, load_input
from guard.runtime import MaskedClassifier, ModelSpec
from guard.runtime.classifier import Prediction
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


@dataclass(frozen=True)
class Check:
    """The guard's verdict on one prediction, with the MPS it rests on."""

    predicted_class: int
    predicted_name: str
    confidence: float
    mps_area_fraction: float
    degenerate: bool
    score: float
    p_value: float
    flagged: bool
    reason: str
    model_evaluations: int
    model_calls: int
    mps_mask: np.ndarray  # bool [H, W]


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
        answer = self._classifier.evaluate(images, baselines, masks, image_index)
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
        self.engine = MpsEngine(
            _CheckedInputs(classifier, on_model_call or _uncounted), engine_settings
        )
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

    def decode(self, data: bytes) -> np.ndarray:
        """An encoded image (PNG, JPEG, ...) as a model input, preprocessed as calibrated."""
        return input_from_bytes(data, self.classifier.spec, self.preprocessing)

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
        confidences: np.ndarray,
        margins: np.ndarray,
        *,
        deadline: float | None = None,
        explain: Explain | None = None,
    ) -> list[Check]:
        """Checks of items already predicted: their MPSs, scored against the calibration.

        ``confidences`` and ``margins`` are the prediction's; ``explain`` computes the MPSs
        (default: this model's engine, on the caller's thread); ``deadline`` is a
        ``time.monotonic()`` instant after which ``DeadlineExceededError`` ends the work.
        """
        results = (explain or self.engine.explain_batch)(images, deadline)
        return self.verdicts(results, confidences, margins)

    def verdicts(
        self, results: Sequence[MpsResult], confidences: np.ndarray, margins: np.ndarray
    ) -> list[Check]:
        """The checks of explained predictions (confidence and margin from the prediction)."""
        scored = self.calibration.detector.evaluate(
            mps_area_fraction=[r.mps_area_fraction for r in results],
            confidence=confidences,
            predicted_class=[r.predicted_class for r in results],
            margin=margins,
        )
        return [
            Check(
                predicted_class=r.predicted_class,
                predicted_name=self.class_name(r.predicted_class),
                confidence=float(confidences[k]),
                mps_area_fraction=r.mps_area_fraction,
                degenerate=r.degenerate,
                score=float(scored.score[k]),
                p_value=float(scored.p_value[k]),
                flagged=bool(scored.flagged[k]),
                reason=str(scored.reason[k]),
                model_evaluations=r.model_evaluations,
                model_calls=r.model_calls,
                mps_mask=r.mps_mask,
            )
            for k, r in enumerate(results)
        ]


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
