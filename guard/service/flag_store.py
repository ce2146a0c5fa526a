"""The sidecar's bounded store of recent flagged predictions, for the /flags page.

Off by default (``keep_flagged`` 0): model inputs may be sensitive. With ``keep_flagged`` N the
last N flagged predictions of all served models are kept in memory, each with the input as the
model saw it (8-bit pixels, the calibrated preprocessing undone), its MPS (packed bits), its
responsibility map (block means, at most ``RESPONSIBILITY_SIDE`` pixels a side, float16) and
its figures; the oldest is dropped for each new one. Nothing is written to disk unless
``flagged_dir`` is given: then each kept item is also written there as ``<stem>.png`` (the
input) and ``<stem>.json`` (the item with its MPS and responsibility map), the newest N pairs
kept (those of earlier runs counted too) and older ones deleted.

Memory bound: one item of an H x W x C input holds at most
``item_bytes(H, W, C) = H*W*C + ceil(H*W/8) + 2*h*w + ITEM_OVERHEAD_BYTES`` bytes, h x w the
responsibility map's kept size (at most 64 x 64) and the overhead the Python objects of its
figures, request id (at most ``MAX_REQUEST_ID_CHARS`` characters kept) and index entry. The
store holds at most N items of the largest served input: ``bound_bytes = N * item_bytes``,
refused at start when over ``MAX_STORE_BYTES`` (1 GiB).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from guard.errors import ConfigError
from guard.gallery import RESPONSIBILITY_SIDE, downsample, png_bytes
from guard.service.guarded_model import Check, GuardedModel

log = logging.getLogger(__name__)

MAX_STORE_BYTES = 1 << 30
"""The most memory ``keep_flagged`` may reserve (refused at start beyond it)."""

ITEM_OVERHEAD_BYTES = 4096
"""Per item beyond its arrays: the item object, its figures and evidence, the request id
(at most ``MAX_REQUEST_ID_CHARS`` characters), three array headers and its index entry."""

MAX_REQUEST_ID_CHARS = 256
"""The longest request id kept with an item (longer ones are cut)."""

Source = Literal["infer", "explain"]

_FILE_PREFIX = "flag-"


def responsibility_shape(height: int, width: int) -> tuple[int, int]:
    """The size a height x width responsibility map is kept at (see ``downsample``)."""
    factor = max(1, -(-max(height, width) // RESPONSIBILITY_SIDE))
    return -(-height // factor), -(-width // factor)


def item_bytes(height: int, width: int, channels: int) -> int:
    """The most memory one kept item of a height x width x channels input takes."""
    rows, cols = responsibility_shape(height, width)
    return (
        height * width * channels
        + math.ceil(height * width / 8)
        + 2 * rows * cols
        + ITEM_OVERHEAD_BYTES
    )


@dataclass(frozen=True, eq=False)
class FlaggedItem:
    """One kept flagged prediction."""

    id: int
    model: str
    request_id: str
    item: int  # its position in its request
    source: Source  # an inference request, or Explain
    time: float  # seconds since the epoch, when it was checked
    predicted_class: int
    predicted_name: str
    confidence: float
    score: float
    p_value: float
    reason: str
    evidence: tuple[tuple[str, float], ...]
    mps_area_fraction: float | None
    pixels: np.ndarray  # uint8 [H, W, C]: the input as the model saw it
    mps_bits: np.ndarray | None  # np.packbits of the bool [H, W] MPS mask
    responsibility: np.ndarray | None  # float16 [h, w], at most RESPONSIBILITY_SIDE a side

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape[0], self.pixels.shape[1]

    @property
    def mps_mask(self) -> np.ndarray | None:
        if self.mps_bits is None:
            return None
        height, width = self.shape
        return (
            np.unpackbits(self.mps_bits, count=height * width).astype(bool).reshape(height, width)
        )

    @property
    def nbytes(self) -> int:
        """The bytes of its arrays."""
        arrays = (self.pixels, self.mps_bits, self.responsibility)
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def timestamp(self) -> str:
        """Its time in UTC, ISO 8601 to the millisecond."""
        moment = datetime.fromtimestamp(self.time, UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def record(self) -> dict[str, Any]:
        """Its figures as JSON (no pictures): what /flags.json lists."""
        return {
            "id": self.id,
            "model": self.model,
            "request_id": self.request_id,
            "item": self.item,
            "source": self.source,
            "time": self.timestamp,
            "predicted_class": self.predicted_class,
            "predicted_name": self.predicted_name,
            "confidence": _finite(self.confidence),
            "score": _finite(self.score),
            "p_value": _finite(self.p_value),
            "flagged": True,
            "reason": self.reason,
            "evidence": [
                {"feature": term, "contribution": _finite(value)} for term, value in self.evidence
            ],
            "mps_area_fraction": _finite(self.mps_area_fraction),
        }

    def bundle(self) -> dict[str, Any]:
        """Everything about it as JSON, for a labelling tool: the figures, the input's size,
        the MPS mask (one string of 0 and 1 per row) and the kept responsibility map."""
        height, width = self.shape
        mask = self.mps_mask
        responsibility = self.responsibility
        return {
            **self.record(),
            "input": {"height": height, "width": width, "channels": int(self.pixels.shape[2])},
            "mps_mask": None
            if mask is None
            else {
                "height": height,
                "width": width,
                "rows": ["".join("1" if v else "0" for v in row) for row in mask],
            },
            "responsibility": None
            if responsibility is None
            else {
                "height": int(responsibility.shape[0]),
                "width": int(responsibility.shape[1]),
                "block": -(-max(height, width) // RESPONSIBILITY_SIDE),
                "values": np.round(responsibility.astype(np.float64), 4).tolist(),
            },
        }

    def input_png(self) -> bytes:
        """The input as the model saw it, as PNG."""
        return png_bytes(self.pixels)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


class FlagStore:
    """The last ``capacity`` flagged predictions, newest last; thread-safe."""

    def __init__(
        self,
        capacity: int,
        input_shapes: Sequence[tuple[int, int, int]],
        *,
        directory: Path | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("a flag store keeps at least one item")
        self.capacity = capacity
        self.item_bound = max(item_bytes(*shape) for shape in input_shapes)
        self.bound_bytes = capacity * self.item_bound
        if self.bound_bytes > MAX_STORE_BYTES:
            most = MAX_STORE_BYTES // self.item_bound
            raise ConfigError(
                f"keep_flagged {capacity} would keep up to {_mib(self.bound_bytes)} of flagged "
                f"inputs ({self.item_bound} bytes each); the limit is {_mib(MAX_STORE_BYTES)}: "
                f"keep at most {most}"
            )
        self.directory = directory
        self._items: OrderedDict[int, FlaggedItem] = OrderedDict()
        self._lock = threading.Lock()
        self._next_id = 1
        self._files: deque[str] = deque()
        self._write_failed_at = -math.inf
        if directory is not None:
            self._files.extend(_existing_stems(directory))
            self._rotate()

    @classmethod
    def for_models(
        cls, capacity: int, models: Sequence[GuardedModel], *, directory: Path | None = None
    ) -> FlagStore:
        shapes = [
            (m.classifier.spec.height, m.classifier.spec.width, m.classifier.spec.channels)
            for m in models
        ]
        return cls(capacity, shapes, directory=directory)

    # -- adding -------------------------------------------------------------------------------

    def keep(
        self,
        model: GuardedModel,
        images: np.ndarray,
        checks: Sequence[Check],
        request_ids: Sequence[str],
        items: Sequence[int],
        *,
        source: Source,
    ) -> list[FlaggedItem]:
        """Keep the flagged ones of a batch's checks (``images`` the model inputs)."""
        kept = []
        for image, check, request_id, item in zip(images, checks, request_ids, items, strict=True):
            if check.flagged:
                kept.append(
                    self.add(model.name, model.display(image), check, request_id, item, source)
                )
        return kept

    def add(
        self,
        model: str,
        pixels: np.ndarray,
        check: Check,
        request_id: str,
        item: int,
        source: Source,
    ) -> FlaggedItem:
        """Keep one flagged prediction (``pixels`` its input as 8-bit H x W x C)."""
        pixels = np.array(pixels, dtype=np.uint8, copy=True)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        mask = check.mps_mask
        responsibility = check.responsibility
        unnumbered = FlaggedItem(
            id=0,
            model=model,
            request_id=request_id[:MAX_REQUEST_ID_CHARS],
            item=int(item),
            source=source,
            time=time.time(),
            predicted_class=check.predicted_class,
            predicted_name=check.predicted_name,
            confidence=check.confidence,
            score=check.score,
            p_value=check.p_value,
            reason=check.reason,
            evidence=tuple(check.evidence),
            mps_area_fraction=check.mps_area_fraction,
            pixels=pixels,
            mps_bits=None if mask is None else np.packbits(np.asarray(mask, dtype=bool).ravel()),
            responsibility=None
            if responsibility is None
            else downsample(responsibility).astype(np.float16),
        )
        with self._lock:  # ids in the order items are kept, whatever thread keeps them
            flagged = dataclasses.replace(unnumbered, id=self._next_id)
            self._next_id += 1
            self._items[flagged.id] = flagged
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        if self.directory is not None:
            self._write(flagged)
        return flagged

    # -- reading ------------------------------------------------------------------------------

    def items(
        self, *, reason: str | None = None, predicted: str | None = None, model: str | None = None
    ) -> list[FlaggedItem]:
        """The kept items, newest first; only those of a ``reason``, a ``predicted`` class
        (its index or its name) or a ``model`` where given."""
        with self._lock:
            found = list(reversed(self._items.values()))
        return [
            f
            for f in found
            if (reason is None or f.reason == reason)
            and (model is None or f.model == model)
            and (predicted is None or predicted in (str(f.predicted_class), f.predicted_name))
        ]

    def get(self, identifier: int) -> FlaggedItem | None:
        with self._lock:
            return self._items.get(identifier)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        """The bytes of the kept items' arrays (the bound counts their objects too)."""
        with self._lock:
            return sum(f.nbytes for f in self._items.values())

    # -- files --------------------------------------------------------------------------------

    def _write(self, flagged: FlaggedItem) -> None:
        """``<stem>.png`` and ``<stem>.json`` in the directory, each written whole (a reader
        never sees half a file), and the oldest pairs beyond the capacity deleted."""
        assert self.directory is not None
        moment = datetime.fromtimestamp(flagged.time, UTC).strftime("%Y%m%dT%H%M%S%fZ")
        stem = f"{_FILE_PREFIX}{moment}-{flagged.id:06d}"
        bundle = {**flagged.bundle(), "png": f"{stem}.png"}
        try:
            _write_whole(self.directory / f"{stem}.png", flagged.input_png())
            _write_whole(self.directory / f"{stem}.json", json.dumps(bundle).encode())
        except OSError as exc:
            now = time.monotonic()
            if now - self._write_failed_at > 60:  # at most one warning a minute
                self._write_failed_at = now
                log.warning(
                    "cannot write flagged item %d to %s: %s", flagged.id, self.directory, exc
                )
            return
        with self._lock:
            self._files.append(stem)
            self._rotate()

    def _rotate(self) -> None:
        assert self.directory is not None
        while len(self._files) > self.capacity:
            old = self._files.popleft()
            for suffix in (".png", ".json"):
                try:
                    (self.directory / f"{old}{suffix}").unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("cannot delete old flagged item %s%s: %s", old, suffix, exc)


def _existing_stems(directory: Path) -> list[str]:
    """The stems of items an earlier run wrote, oldest first; ``ConfigError`` when the
    directory cannot be made or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".{_FILE_PREFIX}probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write flagged items to {directory}: {exc.strerror or exc}"
        ) from exc
    stems = {p.stem for p in directory.glob(f"{_FILE_PREFIX}*.json")}
    stems |= {p.stem for p in directory.glob(f"{_FILE_PREFIX}*.png")}
    return sorted(stems)


def _write_whole(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"
