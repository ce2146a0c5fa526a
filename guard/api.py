"""The guard as a library: the sidecar's verdicts in-process, for a notebook or a batch job.

>>> from guard import Guard
>>> g = Guard.from_files("guard/demo/digits_cnn.onnx", "guard/demo/calibration.json")
>>> c = g.check("guard/demo/images/digit3_45.png")
>>> print(c.predicted_class, c.flagged, c.p_value)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from guard.errors import InvalidInputError
from guard.service.guarded_model import Check, GuardedModel
from guard.settings import EngineSettings

# What ``check`` takes: an image file's path, encoded image bytes, or a model input.
Image = str | os.PathLike[str] | bytes | np.ndarray


class Guard:
    """A classifier and its calibration: each prediction's MPS and verdict, the same as
    ``guard serve`` answers for the same input.

    An input is any of
      - the path of an image file (PNG, JPEG, ...), decoded and preprocessed as the calibration
        says, or of an ``.npy`` file holding a model input;
      - the bytes of an encoded image, decoded and preprocessed the same way;
      - a model input: an array of the model's input shape without the batch axis, in its
        layout (``input_shape``), already preprocessed.
    """

    def __init__(self, model: GuardedModel) -> None:
        self.model = model

    @classmethod
    def from_files(
        cls,
        model: str | os.PathLike[str],
        calibration: str | os.PathLike[str],
        *,
        provider: str = "auto",
        engine_settings: EngineSettings | str | os.PathLike[str] | None = None,
        allow_model_mismatch: bool = False,
        allow_engine_mismatch: bool = False,
    ) -> Guard:
        """An ONNX classifier and the calibration ``guard calibrate`` made for it.

        ``provider`` is "auto", "cpu" or "cuda"; ``engine_settings`` (settings, or a JSON file
        of them) replace the calibration's where they differ only in speed, or anywhere with
        ``allow_engine_mismatch``. ``GuardError`` when a file is unusable or the two do not
        belong together (``allow_model_mismatch`` accepts another model file).
        """
        return cls(
            GuardedModel.from_files(
                model,
                calibration,
                provider=provider,
                engine_settings=engine_settings,
                allow_model_mismatch=allow_model_mismatch,
                allow_engine_mismatch=allow_engine_mismatch,
            )
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """A model input's shape, without the batch axis, in the model's layout."""
        return self.model.metadata.input_shape

    @property
    def class_names(self) -> list[str]:
        """The calibration's class names (empty when it has none)."""
        return self.model.class_names

    def check(self, image: Image) -> Check:
        """The prediction on one input, its MPS, and the guard's verdict on it."""
        return self.check_batch([image])[0]

    def check_batch(self, images: Sequence[Image] | np.ndarray) -> list[Check]:
        """``check`` of each input (or of each item of a model-input batch [N, *input_shape]);
        the items share every model call."""
        if isinstance(images, np.ndarray) and images.ndim == len(self.input_shape) + 1:
            batch = images
        else:
            items = [self._model_input(image) for image in images]
            if not items:
                return []
            batch = np.stack(items)
        prediction = self.model.predict(batch)
        return self.model.check(batch, prediction)

    def _model_input(self, image: Image) -> np.ndarray:
        if isinstance(image, bytes):
            return self.model.decode(image)
        if isinstance(image, str | os.PathLike):
            return self.model.load(image)
        array = np.asarray(image)
        if array.shape != self.input_shape:
            raise InvalidInputError(
                f"a model input has shape {list(array.shape)}; the model takes "
                f"{list(self.input_shape)} (its layout, preprocessed, without the batch axis)"
            )
        return array

    def __repr__(self) -> str:
        return f"Guard({self.model.name!r}, input_shape={self.input_shape})"
