"""Galleries of explained predictions as self-contained HTML: the sidecar's page of flagged
predictions (guard.transport.http.flags_page) and the galleries of ``guard calibrate --report``
and ``guard audit --report`` draw their cards with the same functions.

A card is one prediction (or one image under several models): titled panels (the input as the
model saw it, the responsibility map, the MPS overlay), a badge (why it is shown) and figures.
Pages hold no script, font or stylesheet from elsewhere; every image is a PNG in a ``data:``
URI, and every value written into the HTML is escaped (class names and request ids come from
users and clients).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from guard.preprocess import Preprocessing, input_to_display
from guard.render import heatmap, mps_overlay
from guard.runtime.spec import ModelSpec

# A responsibility map is kept and drawn at most this many pixels a side (block means).
RESPONSIBILITY_SIDE = 64
# Side of a panel on a gallery card and on an item's own page, in CSS pixels.
CARD_PANEL = 112
LARGE_PANEL = 320


@dataclass(frozen=True)
class Panel:
    """One picture of a card: PNG bytes at their own resolution, drawn scaled."""

    caption: str
    png: bytes
    width: int
    height: int


@dataclass(frozen=True)
class Card:
    """One prediction (or image) in a gallery."""

    title: str
    panels: Sequence[Panel]
    figures: Sequence[tuple[str, str]]  # (label, value), in order
    badge: str = ""  # why it is shown (the flag reason); "" for none
    link: str | None = None  # URL of its own page, if it has one
    note: str = ""  # a line under the figures


def escaped(value: object) -> str:
    """``value`` as HTML text or attribute value: ``&``, ``<``, ``>`` and quotes escaped."""
    return html.escape(str(value), quote=True)


def png_bytes(pixels: np.ndarray) -> bytes:
    """8-bit H x W, H x W x 1 or H x W x 3 pixels as PNG bytes."""
    array = np.asarray(pixels)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def input_pixels(
    tensor: np.ndarray, spec: ModelSpec, preprocessing: Preprocessing | None
) -> np.ndarray:
    """A model input (one item, in the model's layout) as 8-bit H x W x C pixels: the
    preprocessing undone, as the model saw the image; where the input is not in the space the
    preprocessing makes (over 1% of its values undone fall outside 0..255, e.g. raw 0..255
    tensors for a model calibrated with scale 1/255), min-max scaled instead."""
    if preprocessing is not None:
        values = np.asarray(tensor, dtype=np.float64)
        values = values.transpose(1, 2, 0) if spec.layout == "NCHW" else values
        mean = preprocessing.channel_values(preprocessing.mean, spec.channels, 0.0)
        std = preprocessing.channel_values(preprocessing.std, spec.channels, 1.0)
        undone = (values * np.asarray(std) + np.asarray(mean)) / preprocessing.scale
        if np.mean((undone < -0.5) | (undone > 255.5)) > 0.01:
            preprocessing = None
    return input_to_display(np.asarray(tensor), spec, preprocessing)


def rgb(pixels: np.ndarray) -> np.ndarray:
    """H x W x C 8-bit pixels (C 1, 3 or 4) as H x W x 3."""
    pixels = np.asarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[..., :3]


def downsample(values: np.ndarray, side: int = RESPONSIBILITY_SIDE) -> np.ndarray:
    """An H x W map as block means over k x k blocks, k the smallest factor that brings both
    sides to at most ``side`` (the map itself when it is small enough), as float32."""
    values = np.asarray(values, dtype=np.float32)
    height, width = values.shape
    factor = max(1, -(-max(height, width) // side))
    if factor == 1:
        return values.copy()
    rows, cols = -(-height // factor), -(-width // factor)
    padded = np.full((rows * factor, cols * factor), np.nan, dtype=np.float32)
    padded[:height, :width] = values
    blocks = padded.reshape(rows, factor, cols, factor)
    return np.nanmean(blocks, axis=(1, 3)).astype(np.float32)


def panel(caption: str, pixels: np.ndarray) -> Panel:
    array = np.asarray(pixels)
    return Panel(caption, png_bytes(array), width=array.shape[1], height=array.shape[0])


def explanation_panels(
    pixels: np.ndarray,
    mps_mask: np.ndarray | None,
    responsibility: np.ndarray | None,
    *,
    input_caption: str = "input",
) -> list[Panel]:
    """The input as the model saw it, its responsibility map (as kept: at most
    ``RESPONSIBILITY_SIDE`` a side) and the MPS over the input (green; the rest dimmed)."""
    image = rgb(pixels)
    panels = [panel(input_caption, image)]
    if responsibility is not None:
        values = np.nan_to_num(np.asarray(responsibility, dtype=np.float64), nan=0.0)
        panels.append(panel("responsibility", heatmap(values)))
    if mps_mask is not None:
        mask = np.asarray(mps_mask, dtype=bool)
        panels.append(panel(f"MPS {100 * mask.mean():.1f}% of pixels", mps_overlay(image, mask)))
    return panels


def overlay_panel(caption: str, pixels: np.ndarray, mps_mask: np.ndarray) -> Panel:
    """One MPS over the input (for a card comparing several models' MPSs)."""
    return panel(caption, mps_overlay(rgb(pixels), np.asarray(mps_mask, dtype=bool)))


def _image(p: Panel, side: int) -> str:
    scale = side / max(p.width, p.height, 1)
    width, height = max(1, round(p.width * scale)), max(1, round(p.height * scale))
    source = "data:image/png;base64," + base64.b64encode(p.png).decode("ascii")
    return (
        f'<figure><img src="{source}" width="{width}" height="{height}" '
        f'alt="{escaped(p.caption)}"><figcaption>{escaped(p.caption)}</figcaption></figure>'
    )


def _figures(figures: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<dt>{escaped(k)}</dt><dd>{escaped(v)}</dd>" for k, v in figures)
    return f'<dl class="figures">{rows}</dl>'


def card_html(card: Card, *, side: int = CARD_PANEL, large: bool = False) -> str:
    """One card as an ``<article>``; ``large`` for an item's own page (bigger panels)."""
    title = escaped(card.title)
    if card.link is not None and not large:
        title = f'<a href="{escaped(card.link)}">{title}</a>'
    badge = f' <span class="badge">{escaped(card.badge)}</span>' if card.badge else ""
    note = f'<p class="note">{escaped(card.note)}</p>' if card.note else ""
    if not large and len(card.panels) > 3:  # one row on a card still
        side = min(side, (3 * side + 16 - 8 * (len(card.panels) - 1)) // len(card.panels))
    panels = "".join(_image(p, LARGE_PANEL if large else side) for p in card.panels)
    kind = "card large" if large else "card"
    return (
        f'<article class="{kind}"><h2>{title}{badge}</h2>'
        f'<div class="panels">{panels}</div>{_figures(card.figures)}{note}</article>'
    )


def gallery_html(cards: Sequence[Card], *, empty: str = "Nothing to show.") -> str:
    """Cards in a grid, in the order given; ``empty`` (text) when there are none."""
    if not cards:
        return f'<p class="empty">{escaped(empty)}</p>'
    return '<div class="gallery">' + "".join(card_html(c) for c in cards) + "</div>"


_STYLE = """
:root { color-scheme: light; }
body { margin: 0; background: #f3f4f7; color: #1b2230;
  font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { background: #1b2230; color: #fff; padding: 12px 20px; }
header h1 { font-size: 20px; margin: 0; font-weight: 600; }
header p { margin: 4px 0 0; color: #c8cfdc; font-size: 13px; }
header a { color: #9cc3ff; }
nav { background: #fff; border-bottom: 1px solid #dce0e8; padding: 8px 20px; font-size: 13px; }
nav span.label { color: #596276; margin-right: 6px; }
nav a { display: inline-block; margin: 2px 4px 2px 0; padding: 1px 9px; border-radius: 11px;
  border: 1px solid #c4cbd8; color: #1b2230; text-decoration: none; }
nav a.on { background: #1b2230; border-color: #1b2230; color: #fff; }
section { padding: 14px 20px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(372px, 1fr));
  gap: 14px; }
.card { background: #fff; border: 1px solid #dce0e8; border-radius: 8px; padding: 10px 12px; }
.card h2 { font-size: 15px; margin: 0 0 8px; font-weight: 600; }
.card h2 a { color: #1b2230; }
.badge { display: inline-block; margin-left: 6px; padding: 0 8px; border-radius: 10px;
  background: #b3261e; color: #fff; font-size: 12px; font-weight: 500; vertical-align: 1px; }
.panels { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: min-content; }
figure img { display: block; image-rendering: pixelated; background: #000;
  border: 1px solid #c4cbd8; }
figcaption { font-size: 11px; color: #596276; text-align: center; overflow-wrap: anywhere; }
dl.figures { display: grid; grid-template-columns: max-content 1fr; gap: 1px 12px;
  margin: 8px 0 0; font-size: 13px; }
dt { color: #596276; }
dd { margin: 0; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
.note, .empty { color: #596276; }
.card.large { max-width: 1080px; }
.card.large dl.figures { font-size: 14px; }
.downloads a { margin-right: 14px; }
section > h2 { font-size: 17px; margin: 18px 0 6px; }
code { background: #e9ecf2; padding: 0 4px; border-radius: 3px; }
"""


def page_html(
    title: str,
    body: str,
    *,
    heading: str | None = None,
    subheading: str = "",
    nav: str = "",
    refresh_seconds: int | None = None,
) -> str:
    """A whole HTML document: ``body`` and ``nav`` are HTML (escaped by their makers),
    ``title``, ``heading`` and ``subheading`` text; with ``refresh_seconds`` the page reloads
    itself that often."""
    refresh = (
        f'<meta http-equiv="refresh" content="{int(refresh_seconds)}">' if refresh_seconds else ""
    )
    sub = f"<p>{escaped(subheading)}</p>" if subheading else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{refresh}<title>{escaped(title)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>{escaped(heading or title)}</h1>{sub}</header>{nav}"
        f"<section>{body}</section></body></html>"
    )


@dataclass(frozen=True)
class Section:
    """A heading and its cards (``empty``: the text shown where there are none)."""

    heading: str
    cards: Sequence[Card]
    empty: str = "Nothing to show."
    intro: str = ""


def write_gallery(path: Path, title: str, intro: str, sections: Sequence[Section]) -> None:
    """A gallery as one self-contained HTML file (an offline report's), section by section."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f'<p class="note">{escaped(intro)}</p>'] if intro else []
    for section in sections:
        parts.append(f"<h2>{escaped(section.heading)}</h2>")
        if section.intro:
            parts.append(f'<p class="note">{escaped(section.intro)}</p>')
        parts.append(gallery_html(section.cards, empty=section.empty))
    path.write_text(page_html(title, "".join(parts)), encoding="utf-8")


def number(value: float | None, digits: int = 3) -> str:
    """A figure for a card: ``digits`` decimals, "n/a" for a missing or non-finite one."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def evidence_text(evidence: Sequence[tuple[str, float]]) -> str:
    """The score's top terms, "term +0.123, ..." ("none" without any)."""
    return ", ".join(f"{term} {contribution:+.3f}" for term, contribution in evidence) or "none"
