"""mps-guard: flags image-classifier predictions whose minimal sufficient pixel set looks wrong.

>>> from guard import Guard
>>> g = Guard.from_files("guard/demo/digits_cnn.onnx", "guard/demo/calibration.json")
>>> c = g.check("guard/demo/images/digit3_45.png")
>>> print(c.predicted_class, c.flagged, c.p_value)

The names below are imported when first used, so that ``import guard`` (and ``guard --help``)
loads neither onnxruntime nor grpc.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("mps-guard")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

# public name -> (module, name there)
_EXPORTS = {
    "Check": ("guard.service.guarded_model", "Check"),
    "EngineSettings": ("guard.settings", "EngineSettings"),
    "Guard": ("guard.api", "Guard"),
    "GuardError": ("guard.errors", "GuardError"),
    "MaskedClassifier": ("guard.runtime", "MaskedClassifier"),
    "ModelOptions": ("guard.settings", "ModelOptions"),
    "MpsEngine": ("guard.engine", "MpsEngine"),
    "MpsResult": ("guard.engine", "MpsResult"),
    "Preprocessing": ("guard.preprocess", "Preprocessing"),
    "load_calibration": ("guard.verdict.artifact", "load_artifact"),
}
__all__ = [
    "Check",
    "EngineSettings",
    "Guard",
    "GuardError",
    "MaskedClassifier",
    "ModelOptions",
    "MpsEngine",
    "MpsResult",
    "Preprocessing",
    "load_calibration",
]

if TYPE_CHECKING:
    from guard.api import Guard
    from guard.engine import MpsEngine, MpsResult
    from guard.errors import GuardError
    from guard.preprocess import Preprocessing
    from guard.runtime import MaskedClassifier
    from guard.service.guarded_model import Check
    from guard.settings import EngineSettings, ModelOptions
    from guard.verdict.artifact import load_artifact as load_calibration


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'guard' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
