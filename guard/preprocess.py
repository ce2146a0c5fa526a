"""Turning files into model inputs: images (decoded, resized, scaled, normalised) and .npy tensors."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guard.errors import ConfigError, InvalidInputError
from guard.runtime.spec import ModelSpec

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class Preprocessing(BaseModel):
    """How an image file becomes a model input: ``((pixel * scale) - mean) / std``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    color_mode: Literal["auto", "L", "RGB", "RGBA"] = Field(
        default="auto", description="decode as; auto follows the model's channel count"
    )
    scale: float = Field(default=1 / 255, gt=0, description="multiplies 8-bit pixel values")
    mean: tuple[float, ...] | None = Field(default=None, description="per-channel, after scale")
    std: tuple[float, ...] | None = Field(default=None, description="per-channel, after scale")
    resize: Literal["nearest", "bilinear", "bicubic"] = "bilinear"

    @classmethod
    def from_file(cls, path: Path) -> Preprocessing:
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, ValidationError) as exc:
            raise ConfigError(f"preprocessing file {path}: {exc}") from exc

    def channel_values(
        self, values: tuple[float, ...] | None, channels: int, default: float
    ) -> np.ndarray:
        if values is None:
            return np.full(channels, default, dtype=np.float32)
        if len(values) not in (1, channels):
            raise ConfigError(
                f"{len(values)} per-channel values given for a {channels}-channel model"
            )
        return np.broadcast_to(np.asarray(values, dtype=np.float32), (channels,)).copy()


def load_input(path: Path, spec: ModelSpec, preprocessing: Preprocessing) -> np.ndarray:
    """One model input (model layout, no batch axis) from an image file or an .npy tensor."""
    if not path.exists():
        raise InvalidInputError(f"{path}: file does not exist")
    if path.suffix.lower() == ".npy":
        return _load_tensor(path, spec)
    return image_to_input(_decode(path, spec, preprocessing, str(path)), spec, preprocessing)


def input_from_bytes(data: bytes, spec: ModelSpec, preprocessing: Preprocessing) -> np.ndarray:
    """One model input from an encoded image (PNG, JPEG, ...) held in memory."""
    if not data:
        raise InvalidInputError("image: no bytes")
    pixels = _decode(io.BytesIO(data), spec, preprocessing, "image")
    return image_to_input(pixels, spec, preprocessing)


def _load_tensor(path: Path, spec: ModelSpec) -> np.ndarray:
    try:
        tensor = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable .npy array ({exc})") from exc
    if tensor.shape != spec.input_shape:
        raise InvalidInputError(
            f"{path}: tensor has shape {list(tensor.shape)}, the model takes "
            f"{list(spec.input_shape)} ({spec.layout} without the batch axis)"
        )
    if not np.issubdtype(tensor.dtype, np.number) or not np.isfinite(tensor).all():
        raise InvalidInputError(f"{path}: tensor must be numeric with no NaN or Inf values")
    return tensor.astype(spec.dtype)


def _decode(
    source: Path | BinaryIO, spec: ModelSpec, preprocessing: Preprocessing, label: str
) -> np.ndarray:
    mode = preprocessing.color_mode
    if mode == "auto":
        if spec.channels not in _MODES:
            raise ConfigError(f"cannot decode images for a {spec.channels}-channel model")
        mode = _MODES[spec.channels]
    try:
        with Image.open(source) as image:
            image = image.convert(mode)
            if image.size != (spec.width, spec.height):
                image = image.resize((spec.width, spec.height), _RESAMPLING[preprocessing.resize])
            pixels = np.asarray(image, dtype=np.float32)
    except UnidentifiedImageError:
        raise InvalidInputError(
            f"{label}: cannot decode image (not a known image format)"
        ) from None
    except (Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InvalidInputError(f"{label}: cannot decode image ({exc})") from exc
    return pixels[..., None] if pixels.ndim == 2 else pixels  # H x W x C


def image_to_input(pixels: np.ndarray, spec: ModelSpec, preprocessing: Preprocessing) -> np.ndarray:
    """8-bit H x W x C pixels to a model input in the model's layout."""
    if pixels.shape[-1] != spec.channels:
        raise InvalidInputError(
            f"image has {pixels.shape[-1]} channels, the model takes {spec.channels}"
        )
    mean = preprocessing.channel_values(preprocessing.mean, spec.channels, 0.0)
    std = preprocessing.channel_values(preprocessing.std, spec.channels, 1.0)
    tensor = (pixels * preprocessing.scale - mean) / std
    if spec.layout == "NCHW":
        tensor = tensor.transpose(2, 0, 1)
    return np.ascontiguousarray(tensor, dtype=spec.dtype)


def input_to_display(
    tensor: np.ndarray, spec: ModelSpec, preprocessing: Preprocessing | None
) -> np.ndarray:
    """A model input back to 8-bit H x W x C pixels for pictures (min-max if no preprocessing)."""
    pixels = tensor.transpose(1, 2, 0) if spec.layout == "NCHW" else tensor
    pixels = pixels.astype(np.float32)
    if preprocessing is None:
        low, high = float(pixels.min()), float(pixels.max())
        pixels = (pixels - low) / (high - low or 1.0) * 255.0
    else:
        mean = preprocessing.channel_values(preprocessing.mean, spec.channels, 0.0)
        std = preprocessing.channel_values(preprocessing.std, spec.channels, 1.0)
        pixels = (pixels * std + mean) / preprocessing.scale
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
