"""Pictures of an explanation: the input, its responsibility map and its MPS, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from guard.engine import MpsResult

# Anchors of the "inferno" colour map (dark = no responsibility, bright = most).
_INFERNO = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)
_MIN_PANEL_PIXELS = 192
_TITLE_HEIGHT = 16


def heatmap(values: np.ndarray) -> np.ndarray:
    """H x W values in [0, 1] to H x W x 3 8-bit colours."""
    position = np.clip(values, 0.0, 1.0) * (len(_INFERNO) - 1)
    low = np.floor(position).astype(int).clip(0, len(_INFERNO) - 2)
    weight = (position - low)[..., None]
    colours = _INFERNO[low] * (1 - weight) + _INFERNO[low + 1] * weight
    return np.rint(colours).astype(np.uint8)


def mps_overlay(pixels: np.ndarray, mps_mask: np.ndarray) -> np.ndarray:
    """The input dimmed outside the MPS and tinted green inside it."""
    rgb = pixels.astype(np.float64)
    tinted = rgb * 0.6 + np.array([0.0, 255.0, 80.0]) * 0.4
    dimmed = rgb * 0.2
    return np.rint(np.where(mps_mask[..., None], tinted, dimmed)).astype(np.uint8)


def explanation_picture(
    pixels: np.ndarray, result: MpsResult, class_name: str | None = None
) -> Image.Image:
    """Three titled panels: input, responsibility heatmap, MPS overlay."""
    rgb = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[..., :3]
    label = class_name if class_name is not None else str(result.predicted_class)
    panels = [
        (rgb, f"class {label} ({result.confidence:.2f})"),
        (heatmap(result.responsibility), "responsibility"),
        (mps_overlay(rgb, result.mps_mask), f"MPS {100 * result.mps_area_fraction:.1f}%"),
    ]
    height, width = rgb.shape[:2]
    factor = max(1, -(-_MIN_PANEL_PIXELS // max(height, width)))
    panel_w, panel_h = width * factor, height * factor
    canvas = Image.new("RGB", (3 * panel_w + 2 * 4, panel_h + _TITLE_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (array, title) in enumerate(panels):
        panel = Image.fromarray(array).resize((panel_w, panel_h), Image.Resampling.NEAREST)
        x = i * (panel_w + 4)
        canvas.paste(panel, (x, _TITLE_HEIGHT))
        draw.text((x + 2, 2), title, fill="black")
    return canvas


def save_picture(
    path: Path, pixels: np.ndarray, result: MpsResult, class_name: str | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    explanation_picture(pixels, result, class_name).save(path)
