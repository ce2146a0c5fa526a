"""Model runtime: reading an ONNX classifier, composing masking into its graph, running it."""

from guard.runtime.classifier import MaskedClassifier, Prediction
from guard.runtime.spec import ModelSpec

__all__ = ["MaskedClassifier", "ModelSpec", "Prediction"]
