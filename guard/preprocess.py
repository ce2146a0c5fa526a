"""Turning files into model inputs: images (decoded, resized, scaled, normalised) and .npy tensors."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated, BinaryIO, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from guard.errors import ConfigError, InvalidInputError, describe_validation_error
from guard.runtime.spec import ModelSpec

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest image (width x height) decoded by default: 16.8 Mpx, 64 MiB as RGBA."""

# Images with more than 8 bits per sample, and the value each reads as white. Integer images
# wider than 8 bits (16-bit PNG, TIFF and PGM; Pillow's "I" holds 16-bit data too) span
# 0..65535; float images span 0..1, the usual convention of float image data.
_WIDE_WHITE = {"F": 1.0, "I": 65535.0, "I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0,
               "I;16N": 65535.0}  # fmt: skip


class Preprocessing(BaseModel):
    """How an image file becomes a model input: ``((pixel * scale) - mean) / std``.

    Geometry: the image is resized to the model's input size, or, as ImageNet classifiers
    expect, first resized with its aspect ratio kept (``resize_shorter``) and cut at the centre
    (``center_crop``, by default the model's size), then resized only where that crop has
    another size than the model's input.

    Pixels are on the 8-bit scale (0..255) whatever the file holds: 16-bit images are scaled
    down (``v / 257``), float images read 0..1 as black..white (``v * 255``); values outside
    those ranges are refused, never clipped.

    ``alpha`` says what a transparent pixel becomes when the model takes no alpha channel (L or
    RGB): ``composite`` (default) draws the image over a plain ``alpha_background`` (an 8-bit
    grey level, default 0: black), ``refuse`` rejects images with any transparent pixel, and
    ``ignore`` drops the alpha channel and keeps whatever colour transparent pixels store (the
    behaviour before this setting existed). Compositing is the default because it is what the
    image looks like: a transparent pixel has no colour of its own, and what files store there is
    arbitrary (often the content itself, as in icons or digits drawn in the alpha channel). Black
    is the default background because it is the zero of the pixel scale, which with no
    ``mean``/``std`` is the engine's default baseline (0): a transparent area reads like an
    occluded one. Opaque images are unaffected by this setting. A four-channel (RGBA) model takes
    the alpha channel as it is.

    Every number must be finite, and must map 8-bit pixels to finite float32 inputs, so that no
    setting can make every request fail.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    color_mode: Literal["auto", "L", "RGB", "RGBA"] = Field(
        default="auto", description="decode as; auto follows the model's channel count"
    )
    scale: float = Field(default=1 / 255, gt=0, description="multiplies 8-bit pixel values")
    mean: tuple[float, ...] | None = Field(default=None, description="per-channel, after scale")
    std: tuple[Annotated[float, Field(gt=0)], ...] | None = Field(
        default=None, description="per-channel, after scale"
    )
    resize: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    resize_shorter: int | None = Field(
        default=None,
        ge=1,
        description="first resize the image so that its shorter side has this many pixels, "
        "keeping its aspect ratio (the longer side is truncated, as torchvision's Resize)",
    )
    center_crop: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        description="then cut (height, width) pixels from the centre; with resize_shorter and "
        "no center_crop, the model's input size is cut",
    )
    alpha: Literal["composite", "refuse", "ignore"] = Field(
        default="composite",
        description="transparent pixels, for L and RGB models: drawn over alpha_background, "
        "refused, or their stored colour kept",
    )
    alpha_background: int = Field(
        default=0, ge=0, le=255, description="8-bit grey level that transparent pixels show"
    )

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocessing:
        """A crop must fit inside any image resized to ``resize_shorter``."""
        if self.resize_shorter is not None and self.center_crop is not None:
            if max(self.center_crop) > self.resize_shorter:
                raise ValueError(
                    f"center_crop: {self.center_crop[0]}x{self.center_crop[1]} does not fit in "
                    f"an image whose shorter side is resize_shorter ({self.resize_shorter})"
                )
        return self

    @model_validator(mode="after")
    def _finite_inputs(self) -> Preprocessing:
        """8-bit pixels must become finite float32 inputs (computed as ``image_to_input`` does)."""
        scale = np.float32(self.scale)
        with np.errstate(all="ignore"):
            for pixel in (np.float32(0), np.float32(255)):
                scaled = pixel * scale
                if not np.isfinite(scaled):
                    raise ValueError(f"scale: {self.scale:g} x 255 is too large for float32")
                for mean in self.mean or (0.0,):
                    if not np.isfinite(centred := scaled - np.float32(mean)):
                        raise ValueError(f"mean: {mean:g} is too large for float32")
                    for std in self.std or (1.0,):
                        if not np.isfinite(centred / np.float32(std)):
                            raise ValueError(
                                f"std: {std:g} makes 8-bit pixels too large for float32 "
                                f"(scale {self.scale:g}, mean {mean:g})"
                            )
        return self

    @classmethod
    def from_file(cls, path: Path) -> Preprocessing:
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"preprocessing file {path}: {exc}") from exc
        except ValidationError as exc:
            raise ConfigError(
                describe_validation_error(exc, f"preprocessing file {path}")
            ) from None

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


def load_input(
    path: Path,
    spec: ModelSpec,
    preprocessing: Preprocessing,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """One model input (model layout, no batch axis) from an image file or an .npy tensor.

    ``InvalidInputError`` messages start with the path."""
    try:
        return read_input(path, spec, preprocessing, max_image_pixels=max_image_pixels)
    except InvalidInputError as exc:
        message = f"{path}: {exc}"
    raise InvalidInputError(message)  # outside the handler: the error holds no decoded image


def read_input(
    path: Path,
    spec: ModelSpec,
    preprocessing: Preprocessing,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """``load_input`` whose error messages do not name the file (callers that list files by
    their own key add it once)."""
    if not path.exists():
        raise InvalidInputError("file does not exist")
    if path.suffix.lower() == ".npy":
        return _load_tensor(path, spec)
    return image_to_input(_decode(path, spec, preprocessing, max_image_pixels), spec, preprocessing)


def input_from_bytes(
    data: bytes,
    spec: ModelSpec,
    preprocessing: Preprocessing,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """One model input from an encoded image (PNG, JPEG, ...) held in memory.

    An image of more than ``max_image_pixels`` (width x height) is refused from its header,
    before anything is decoded; nothing larger than the model input outlives the call."""
    if not data:
        raise InvalidInputError("image: no bytes")
    pixels = _decode(io.BytesIO(data), spec, preprocessing, max_image_pixels)
    return image_to_input(pixels, spec, preprocessing)


def _load_tensor(path: Path, spec: ModelSpec) -> np.ndarray:
    try:
        tensor = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"not a readable .npy array ({exc})") from exc
    if tensor.shape != spec.input_shape:
        raise InvalidInputError(
            f"tensor has shape {list(tensor.shape)}, the model takes "
            f"{list(spec.input_shape)} ({spec.layout} without the batch axis)"
        )
    if not np.issubdtype(tensor.dtype, np.number) or not np.isfinite(tensor).all():
        raise InvalidInputError("tensor must be numeric with no NaN or Inf values")
    return tensor.astype(spec.dtype)


def _decode(
    source: Path | BinaryIO, spec: ModelSpec, preprocessing: Preprocessing, max_image_pixels: int
) -> np.ndarray:
    """H x W x C float32 pixels on the 8-bit scale, at the model's size."""
    mode = preprocessing.color_mode
    if mode == "auto":
        if spec.channels not in _MODES:
            raise ConfigError(f"cannot decode images for a {spec.channels}-channel model")
        mode = _MODES[spec.channels]
    try:
        return _decode_image(source, mode, spec, preprocessing, max_image_pixels)
    except UnidentifiedImageError:
        message = "cannot decode image (not a known image format)"
    except InvalidInputError as exc:
        message = str(exc)
    except (Image.DecompressionBombError, OSError, ValueError, EOFError, SyntaxError) as exc:
        message = f"cannot decode image ({exc})"
    # Raised outside the handlers, so that the error (which callers may keep) holds no
    # traceback into the decoding frames and so no full-size image.
    raise InvalidInputError(message)


def _decode_image(
    source: Path | BinaryIO,
    mode: str,
    spec: ModelSpec,
    preprocessing: Preprocessing,
    max_image_pixels: int,
) -> np.ndarray:
    with Image.open(source) as image:  # lazy: reads the header only
        width, height = image.size
        if width * height > max_image_pixels:
            raise InvalidInputError(
                f"image is {width}x{height} ({width * height} pixels); the limit is "
                f"{max_image_pixels} pixels (--max-image-pixels)"
            )
        if image.mode in _WIDE_WHITE:
            pixels = _wide_pixels(image, mode, spec, preprocessing)
        else:
            pixels = _narrow_pixels(image, mode, spec, preprocessing)
    return pixels[..., None] if pixels.ndim == 2 else pixels  # H x W x C


def _narrow_pixels(
    image: Image.Image, mode: str, spec: ModelSpec, preprocessing: Preprocessing
) -> np.ndarray:
    """8-bit images (and the other modes Pillow converts to 8 bits: 1, P, CMYK, YCbCr, ...)."""
    converted = None
    if mode != "RGBA" and _has_alpha(image) and preprocessing.alpha != "ignore":
        rgba = image.convert("RGBA")  # palettes, tRNS and premultiplied modes resolved
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] < 255:
            if preprocessing.alpha == "refuse":
                raise InvalidInputError(_TRANSPARENT)
            background = preprocessing.alpha_background
            converted = Image.new(mode, rgba.size, background if mode == "L" else (background,) * 3)
            converted.paste(rgba.convert(mode), mask=alpha)
        del rgba, alpha
    if converted is None:
        converted = image.convert(mode)
    return np.asarray(fit_to_model(converted, spec, preprocessing), dtype=np.float32)


def fit_to_model(image: Image.Image, spec: ModelSpec, preprocessing: Preprocessing) -> Image.Image:
    """The image at the model's input size: ``resize_shorter`` (aspect kept), ``center_crop``
    (the model's size by default after ``resize_shorter``), then a resize to the model's size
    where the crop (or the whole image, with neither setting) has another size."""
    filter_ = _RESAMPLING[preprocessing.resize]
    if preprocessing.resize_shorter is not None:
        image = image.resize(shorter_side_size(image.size, preprocessing.resize_shorter), filter_)
    crop = preprocessing.center_crop
    if crop is None and preprocessing.resize_shorter is not None:
        crop = (spec.height, spec.width)
    if crop is not None:
        image = image.crop(center_crop_box(image.size, crop))
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), filter_)
    return image


def shorter_side_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``shorter`` and the longer one scaled and truncated,
    as torchvision's ``Resize(shorter)``."""
    width, height = size
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def center_crop_box(size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pillow's (left, top, right, bottom) of a (height, width) crop at the centre of an image
    of (width, height) ``size``, placed as torchvision's ``CenterCrop``; refused if it does
    not fit (a ``center_crop`` larger than the image, without ``resize_shorter``)."""
    width, height = size
    crop_height, crop_width = crop
    if crop_height > height or crop_width > width:
        raise InvalidInputError(
            f"image is {width}x{height} after resizing; the center crop "
            f"({crop_height}x{crop_width}, height x width) does not fit in it"
        )
    top = int(round((height - crop_height) / 2.0))
    left = int(round((width - crop_width) / 2.0))
    return left, top, left + crop_width, top + crop_height


def _has_alpha(image: Image.Image) -> bool:
    """An alpha channel, or a transparent colour or palette entry (GIF, PNG tRNS)."""
    return image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info


_TRANSPARENT = (
    "image has transparent pixels and the preprocessing refuses them (alpha: refuse); "
    "send an opaque image or set alpha to composite or ignore"
)


def _wide_pixels(
    image: Image.Image, mode: str, spec: ModelSpec, preprocessing: Preprocessing
) -> np.ndarray:
    """One-channel images of more than 8 bits, scaled (never clipped) to the 8-bit range."""
    white = _WIDE_WHITE[image.mode]
    values = np.asarray(image)
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > white:
        kind = "a float" if image.mode == "F" else "an integer (16-bit)"
        raise InvalidInputError(
            f"{kind} image is read as 0..{white:g} (black..white); this one holds values in "
            f"[{low:g}, {high:g}]; save it with 8 or 16 bits per channel"
        )
    grey = values.astype(np.float32) * np.float32(255.0 / white)
    opaque = None
    transparency = image.info.get("transparency")
    if isinstance(transparency, int | float) and not isinstance(transparency, bool):
        transparent = values == transparency
        if transparent.any():
            if mode == "RGBA":
                opaque = Image.fromarray(np.where(transparent, 0, 255).astype(np.uint8))
            elif preprocessing.alpha == "refuse":
                raise InvalidInputError(_TRANSPARENT)
            elif preprocessing.alpha == "composite":
                grey[transparent] = preprocessing.alpha_background
        del transparent
    del values
    picture = Image.fromarray(grey)  # mode F
    del grey
    out = np.asarray(fit_to_model(picture, spec, preprocessing), dtype=np.float32)
    if mode == "L":
        return out
    channels = [out, out, out]
    if mode == "RGBA":
        if opaque is None:
            channels.append(np.full_like(out, 255.0))
        else:
            channels.append(np.asarray(fit_to_model(opaque, spec, preprocessing), np.float32))
    return np.stack(channels, axis=-1)


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
