"""An ONNX image classifier with masking composed into its graph, on the best provider."""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from guard.errors import (
    InvalidInputError,
    ModelLoadError,
    ModelRuntimeError,
    NonFiniteOutputError,
)
from guard.runtime import graph as g
from guard.runtime.spec import BatchMode, ModelSpec, ends_in_softmax, inspect_model
from guard.settings import ModelOptions

log = logging.getLogger(__name__)

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class Prediction:
    """The model's own output for a batch of whole images, and its top-1."""

    scores: np.ndarray  # [M, K], exactly what the model returned
    classes: np.ndarray  # [M] int64
    confidences: np.ndarray  # [M] float32, probability of the top class (MSP)
    margins: np.ndarray  # [M] float32, top-1 minus top-2 probability


class MaskedClassifier:
    """Loads a classifier, reads its spec, and evaluates masked copies of its inputs in batches.

    ``evaluate`` is one model call for any number of mutants (or one call per mutant where the
    model's batch dimension is fixed to 1 and could not be made dynamic: see ``batch_mode``).
    ``notes`` collects what a user should know about how the model is driven.
    """

    def __init__(self, path: str | Path, options: ModelOptions | None = None) -> None:
        self.options = options or ModelOptions()
        self.path = Path(path)
        raw = _read_model_bytes(self.path)
        self.sha256 = hashlib.sha256(raw).hexdigest()
        try:
            model = onnx.load_model_from_string(raw)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{self.path} is not a valid ONNX model ({exc})") from exc
        if not model.graph.node:
            raise ModelLoadError(f"{self.path} is not a valid ONNX model (empty graph)")
        self.spec: ModelSpec = inspect_model(model, self.options)
        self.notes: list[str] = []
        self._providers = self._choose_providers()

        self.batch_mode: BatchMode = "dynamic"
        if self.spec.fixed_batch:
            model = self._make_batch_dynamic(model)
        self.output_kind, session = self._detect_output_kind(model)
        self._session = session or self._compose_session(model, self.output_kind)
        if self.batch_mode == "dynamic" and not _batches_exactly(
            self._session, self.spec, self._probe_images()
        ):
            # Declared dynamic, yet something inside the graph hard-codes the batch.
            self.batch_mode = "single"
            self.notes.append(
                "the model declares a dynamic batch dimension but does not run batched: "
                "evaluating one mutant per model call (slow)"
            )
        self.provider: str = self._session.get_providers()[0]
        if self.options.provider == "cuda" and self.provider != _CUDA:
            self.notes.append("CUDA was asked for but is not available: running on CPU")
        bind = self.options.io_binding == "on" or (
            self.options.io_binding == "auto" and self.provider == _CUDA
        )
        self.device: str | None = ("cuda" if self.provider == _CUDA else "cpu") if bind else None
        self._bound = threading.local()  # per thread: the request's inputs on the device

    # -- public API -------------------------------------------------------------------------

    def predict(self, images: np.ndarray) -> Prediction:
        """Run the model on whole images [M, *input_shape]."""
        images = self.check_images(images)
        index = np.arange(len(images), dtype=np.int64)
        masks = np.ones((len(images), self.spec.height, self.spec.width), dtype=bool)
        if self.batch_mode == "single":
            parts = [
                self._run(images, images, masks[i : i + 1], index[i : i + 1], True) for i in index
            ]
            classes, confidences, scores = (np.concatenate(p) for p in zip(*parts, strict=True))
        else:
            classes, confidences, scores = self._run(images, images, masks, index, True)
        if not np.isfinite(scores).all():
            # Finite inputs can still overflow the model (a pixel at 1e38): its NaN or Inf
            # outputs have no top class, confidence or verdict.
            raise NonFiniteOutputError()
        probabilities = (
            _softmax(scores) if self.output_kind == "logits" else scores.astype(np.float64)
        )
        # The class is the argmax of the outputs returned, never a near-tie broken otherwise
        # by the graph's float32 softmax.
        classes = probabilities.argmax(axis=1).astype(np.int64)
        top2 = np.sort(probabilities, axis=1)[:, -2:]
        margins = (top2[:, 1] - top2[:, 0]).astype(np.float32)
        return Prediction(scores=scores, classes=classes, confidences=confidences, margins=margins)

    def evaluate(
        self, images: np.ndarray, baselines: np.ndarray, masks: np.ndarray, image_index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-1 class and confidence of each mutant ``where(masks[i], images[j], baselines[j])``.

        ``images`` and ``baselines`` are [M, *input_shape] in the model's layout (already
        checked); ``masks`` is [N, H, W] (True keeps the pixel); ``image_index`` [N] picks j.
        """
        masks = masks.astype(bool, copy=False)
        image_index = image_index.astype(np.int64, copy=False)
        if self.batch_mode != "single":
            classes, confidences = self._run(images, baselines, masks, image_index, False)
        else:
            parts = [
                self._run(images, baselines, masks[i : i + 1], image_index[i : i + 1], False)
                for i in range(len(masks))
            ]
            classes = np.concatenate([p[0] for p in parts])
            confidences = np.concatenate([p[1] for p in parts])
        if not np.isfinite(confidences).all():  # NaN or Inf among a mutant's outputs
            raise NonFiniteOutputError()
        return classes, confidences

    def class_probabilities(
        self,
        images: np.ndarray,
        baselines: np.ndarray,
        masks: np.ndarray,
        image_index: np.ndarray,
        classes: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-1 class, its probability, and the probability of ``classes[i]``, per mutant.

        Mutants are built as in ``evaluate`` (``where(masks[i], images[j], baselines[j])`` with
        ``j = image_index[i]``), in one model call (one per mutant where ``batch_mode`` is
        ``single``). Probabilities are the softmax of the model's output for logits models and
        the output itself for probability models, in float64; the top-1 class is the composed
        graph's, as the engine sees it. Returns ``(top_classes [N] int64, top_probabilities
        [N], class_probabilities [N])``.
        """
        masks = masks.astype(bool, copy=False)
        image_index = image_index.astype(np.int64, copy=False)
        classes = np.asarray(classes, dtype=np.int64)
        if len(masks) == 0:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        if self.batch_mode == "single":
            parts = [
                self._run(images, baselines, masks[i : i + 1], image_index[i : i + 1], True)
                for i in range(len(masks))
            ]
            top, _, scores = (np.concatenate(p) for p in zip(*parts, strict=True))
        else:
            top, _, scores = self._run(images, baselines, masks, image_index, True)
        probabilities = (
            _softmax(scores) if self.output_kind == "logits" else scores.astype(np.float64)
        )
        rows = np.arange(len(masks))
        return top, probabilities[rows, top], probabilities[rows, classes]

    def model_calls(self, mutants: int) -> int:
        """How many model calls ``evaluate`` makes for this many mutants."""
        return mutants if self.batch_mode == "single" else 1

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """Validate a batch [M, *input_shape] and cast it to the model's dtype."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != self.spec.input_shape:
            raise InvalidInputError(
                f"expected images of shape [M, {', '.join(map(str, self.spec.input_shape))}] "
                f"({self.spec.layout}), got {list(images.shape)}"
            )
        if not np.issubdtype(images.dtype, np.number):
            raise InvalidInputError(f"images must be numeric, got dtype {images.dtype}")
        if not np.isfinite(images).all():
            raise InvalidInputError("images contain NaN or Inf values")
        return images.astype(self.spec.dtype, copy=False)

    # -- construction helpers ---------------------------------------------------------------

    def _choose_providers(self) -> list[str]:
        available = ort.get_available_providers()
        if self.options.provider == "cpu" or _CUDA not in available:
            return [_CPU]
        return [_CUDA, _CPU]

    def _new_session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Spinning workers skip the wake-up after each level's bookkeeping (the engine's gaps
        # between calls), but burn CPU that a server's request threads need.
        spin = "1" if self.options.spin_threads else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        # The GPU build lists CUDA even where no GPU or CUDA library exists, and its fallback
        # to CPU logs an error; under "auto" that fallback is expected, so silence it and
        # report the provider that actually runs (``provider``) instead.
        quiet = self.options.provider == "auto" and _CUDA in self._providers
        if quiet:
            ort.set_default_logger_severity(4)
        try:
            return ort.InferenceSession(
                model.SerializeToString(), sess_options=options, providers=self._providers
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        finally:
            if quiet:
                ort.set_default_logger_severity(2)

    def _compose_session(self, model: onnx.ModelProto, kind: g.OutputKind) -> ort.InferenceSession:
        return self._new_session(g.compose_masked_model(model, self.spec, kind))

    def _probe_images(self) -> np.ndarray:
        rng = np.random.default_rng(0)
        shape = (2, *self.spec.input_shape)
        return np.stack([np.zeros(shape[1:]), rng.random(shape[1:])]).astype(self.spec.dtype)

    def _make_batch_dynamic(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Edit a batch-1 graph to accept batches, keeping the edit only if it is exact."""
        edited = g.make_batch_dynamic(model, self.spec)
        try:
            session = self._new_session(g.compose_masked_model(edited, self.spec, "logits"))
            exact = _batches_exactly(session, self.spec, self._probe_images())
        except ModelLoadError:
            exact = False
        if exact:
            self.batch_mode = "made_dynamic"
            self.notes.append(
                "the model fixes its batch dimension to 1; the graph was edited to batch mutants"
            )
            return edited
        self.batch_mode = "single"
        self.notes.append(
            "the model fixes its batch dimension to 1 and its graph cannot be made to batch: "
            "evaluating one mutant per model call (slow)"
        )
        return model

    def _detect_output_kind(
        self, model: onnx.ModelProto
    ) -> tuple[g.OutputKind, ort.InferenceSession | None]:
        """Logits or probabilities: the setting, a final Softmax, or the values on probes.

        Returns the probing session too when it is already the right one.
        """
        if self.options.output_kind != "auto":
            return self.options.output_kind, None
        if ends_in_softmax(model.graph, self.spec.output_name):
            return "probabilities", None
        session = self._compose_session(model, "logits")
        # One probe per call: batching is only verified afterwards.
        scores = _raw_scores(session, self._probe_images(), self.spec, single=True)
        rows = scores.reshape(len(scores), -1).astype(np.float64)
        is_distribution = (
            (rows >= 0).all() and (rows <= 1).all() and np.allclose(rows.sum(1), 1, atol=1e-3)
        )
        return ("probabilities", None) if is_distribution else ("logits", session)

    def _run(
        self,
        images: np.ndarray,
        baselines: np.ndarray,
        masks: np.ndarray,
        index: np.ndarray,
        with_scores: bool,
    ) -> tuple[np.ndarray, ...]:
        outputs = [g.TOP_CLASS, g.TOP_CONFIDENCE] + ([self.spec.output_name] if with_scores else [])
        if self.device is None:
            feeds = {g.IMAGES: images, g.BASELINES: baselines, g.MASKS: masks, g.IMAGE_INDEX: index}
            result = _run_session(self._session, outputs, feeds)
        else:
            result = self._run_bound(images, baselines, masks, index, outputs)
        if with_scores:
            result[2] = result[2].reshape(len(masks), -1)
        return tuple(result)

    def _run_bound(
        self,
        images: np.ndarray,
        baselines: np.ndarray,
        masks: np.ndarray,
        index: np.ndarray,
        outputs: list[str],
    ) -> list[np.ndarray]:
        """``_run`` with the images and baselines bound on the device once per request: the
        engine passes the same arrays to every call of an MPS, so only the first copies them;
        each call then sends its masks and indices, and receives classes and confidences."""
        held = getattr(self._bound, "inputs", None)
        if held is None or held[0] is not images or held[1] is not baselines:
            on_device = [
                ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)
                for a in (images, baselines)
            ]
            # The arrays are kept with their device copies: identity stays meaningful (no
            # other array can take their id) and CPU values, which share memory, stay valid.
            held = self._bound.inputs = (images, baselines, *on_device)
        try:
            binding = self._session.io_binding()
            binding.bind_ortvalue_input(g.IMAGES, held[2])
            binding.bind_ortvalue_input(g.BASELINES, held[3])
            binding.bind_cpu_input(g.MASKS, np.ascontiguousarray(masks))
            binding.bind_cpu_input(g.IMAGE_INDEX, np.ascontiguousarray(index))
            for name in outputs:
                binding.bind_output(name, "cpu")
            self._session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelRuntimeError(f"onnxruntime failed to run the model: {exc}") from exc


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores.astype(np.float64) - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _read_model_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"model path {path} is not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc}") from exc


def _raw_scores(
    session: ort.InferenceSession, images: np.ndarray, spec: ModelSpec, single: bool = False
) -> np.ndarray:
    """The model's own output on whole images, through a composed session."""
    if single:
        return np.concatenate(
            [_raw_scores(session, images[i : i + 1], spec) for i in range(len(images))]
        )
    index = np.arange(len(images), dtype=np.int64)
    masks = np.ones((len(images), spec.height, spec.width), dtype=bool)
    feeds = {g.IMAGES: images, g.BASELINES: images, g.MASKS: masks, g.IMAGE_INDEX: index}
    return _run_session(session, [spec.output_name], feeds)[0]


def _run_session(session: ort.InferenceSession, outputs: list[str], feeds: dict) -> list:
    """``session.run`` with onnxruntime's untyped failures turned into a guard error."""
    try:
        return session.run(outputs, feeds)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelRuntimeError(f"onnxruntime failed to run the model: {exc}") from exc


def _batches_exactly(session: ort.InferenceSession, spec: ModelSpec, probe: np.ndarray) -> bool:
    """Whether a batch of probes gives what each probe gives alone (and runs at all)."""
    try:
        together = _raw_scores(session, probe, spec)
        alone = _raw_scores(session, probe, spec, single=True)
    except ModelRuntimeError:
        return False
    return together.shape == alone.shape and bool(
        np.allclose(together, alone, rtol=1e-4, atol=1e-5)
    )
