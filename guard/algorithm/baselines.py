"""Baselines: the values masked-out pixels take, in model-input space."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from guard.errors import ConfigError


class Baseline(BaseModel):
    """What an occluded pixel becomes.

    ``constant``: one value on every channel (ReX's default 0). ``channel``: one value per
    channel (e.g. a dataset mean). ``blur``: a Gaussian-blurred copy of the input, which is not
    constant and so cannot sit on a class boundary the way a flat image can.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["constant", "channel", "blur"] = "constant"
    value: float = 0.0
    channels: tuple[float, ...] | None = None
    sigma: float = Field(default=4.0, gt=0)

    def __str__(self) -> str:
        if self.kind == "constant":
            return f"{self.value:g}"
        if self.kind == "channel":
            return ",".join(f"{v:g}" for v in self.channels or ())
        return f"blur:{self.sigma:g}"

    def image(self, image: np.ndarray, channel_axis: int) -> np.ndarray:
        """The baseline image for one input (no batch axis; channels on ``channel_axis``)."""
        if self.kind == "constant":
            return np.full_like(image, self.value)
        if self.kind == "channel":
            values = np.asarray(self.channels, dtype=image.dtype)
            if values.size != image.shape[channel_axis]:
                raise ConfigError(
                    f"baseline has {values.size} channel values, the model input has "
                    f"{image.shape[channel_axis]} channels"
                )
            shape = [1] * image.ndim
            shape[channel_axis] = values.size
            return np.broadcast_to(values.reshape(shape), image.shape).copy()
        sigma = [self.sigma] * image.ndim
        sigma[channel_axis] = 0.0  # blur space, never mix channels
        from scipy.ndimage import gaussian_filter  # only for blur; keeps `guard --help` light

        return gaussian_filter(image.astype(np.float64), sigma=sigma).astype(image.dtype)


def parse_baseline(text: object) -> object:
    """Accept the CLI spellings: ``0``, ``0.485,0.456,0.406``, ``blur`` or ``blur:SIGMA``."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return {"kind": "constant", "value": float(text)}
    if not isinstance(text, str):
        return text
    spec = text.strip().lower()
    try:
        if spec.startswith("blur"):
            _, _, sigma = spec.partition(":")
            return {"kind": "blur", "sigma": float(sigma)} if sigma else {"kind": "blur"}
        values = [float(part) for part in spec.split(",")]
    except ValueError as exc:
        raise ValueError(
            f"baseline {text!r} is not a number, a comma-separated list of per-channel "
            "numbers, or blur[:SIGMA]"
        ) from exc
    if len(values) == 1:
        return {"kind": "constant", "value": values[0]}
    return {"kind": "channel", "channels": tuple(values)}


BaselineSetting = Annotated[Baseline, BeforeValidator(parse_baseline)]
