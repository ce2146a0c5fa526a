"""Independent checks: plain onnxruntime on the original model file, masking in plain numpy.

Nothing here uses the guard's runtime or engine, so a wrong composed graph, a wrong mask or a
wrong baseline in the engine cannot hide behind the same mistake in the check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


class PlainModel:
    def __init__(self, path: Path, output: str | None = None, batch_one: bool = False) -> None:
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output = output or self.session.get_outputs()[0].name
        self.batch_one = batch_one

    def top1(self, batch: np.ndarray) -> np.ndarray:
        if self.batch_one:
            return np.concatenate([self._top1(batch[i : i + 1]) for i in range(len(batch))])
        return self._top1(batch)

    def _top1(self, batch: np.ndarray) -> np.ndarray:
        scores = self.session.run([self.output], {self.input: batch.astype(np.float32)})[0]
        return scores.reshape(len(batch), -1).argmax(axis=1)


def masked(image: np.ndarray, baseline: np.ndarray, keep: np.ndarray, layout: str) -> np.ndarray:
    """``image`` where ``keep`` (H x W) is True, ``baseline`` elsewhere, one input without batch."""
    mask = keep[None] if layout == "NCHW" else keep[..., None]
    return np.where(mask, image, baseline)


def shorter_prefix(responsibility: np.ndarray, mps: np.ndarray, chunk: int) -> np.ndarray:
    """The ranking prefix one chunk shorter than the MPS (ties: higher flat index first)."""
    flat = responsibility.ravel()
    order = sorted(range(flat.size), key=lambda i: (flat[i], i), reverse=True)
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[: int(mps.sum()) - chunk]] = True
    return keep.reshape(mps.shape)
