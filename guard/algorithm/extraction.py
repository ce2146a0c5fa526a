"""Phase 2 of ReX: the MPS is the first sufficient prefix of the responsibility ranking.

Pixels are ranked by responsibility; the keep-mask grows along the ranking ``chunk_size``
pixels at a time and the MPS is the *first* prefix whose mutant keeps the original top-1 class.
``PrefixSearch`` proposes a block of consecutive prefixes per model call and takes the first
passing one in ranking order, so testing many prefixes at once never changes the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def rank_pixels(responsibility: np.ndarray) -> np.ndarray:
    """Flat pixel indices by descending responsibility.

    Ties go to the higher flat index first, as ReX's ``sorted(..., reverse=True)`` over
    (value, (row, col)) pairs does, so equal-responsibility regions are taken in the same order.
    """
    flat = responsibility.ravel()
    return np.lexsort((-np.arange(flat.size), -flat))


@dataclass
class PrefixSearch:
    """Finds the first sufficient prefix of a pixel ranking, a block of prefixes per call."""

    ranking: np.ndarray
    height: int
    width: int
    chunk_size: int = 10
    next_chunk: int = 1  # prefix k keeps the first k * chunk_size ranked pixels
    mps_chunks: int | None = field(default=None, init=False)
    _rank_of_pixel: np.ndarray = field(init=False)
    _proposed: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self._rank_of_pixel = np.empty(self.ranking.size, dtype=np.int64)
        self._rank_of_pixel[self.ranking] = np.arange(self.ranking.size)
        self._proposed = np.zeros(0, dtype=np.int64)

    @property
    def total_chunks(self) -> int:
        return -(-self.ranking.size // self.chunk_size)

    @property
    def done(self) -> bool:
        return self.mps_chunks is not None

    def propose(self, count: int) -> np.ndarray:
        """Keep-masks [n, H, W] of the next ``count`` prefixes (fewer at the end of the ranking)."""
        last = min(self.next_chunk + count, self.total_chunks + 1)
        self._proposed = np.arange(self.next_chunk, last)
        return self.prefix_masks(self._proposed)

    def prefix_masks(self, chunks: np.ndarray) -> np.ndarray:
        """Keep-masks [len(chunks), H, W] of the prefixes with the given numbers of chunks."""
        kept = self._rank_of_pixel[None, :] < (np.asarray(chunks) * self.chunk_size)[:, None]
        return kept.reshape(len(chunks), self.height, self.width)

    def update(self, passing: np.ndarray) -> None:
        """Take the verdicts of the last proposal; stop at the first passing prefix."""
        passing = np.asarray(passing, dtype=bool)
        if passing.shape != self._proposed.shape:
            raise ValueError(f"expected {self._proposed.size} verdicts")
        hits = np.flatnonzero(passing)
        if hits.size:
            self.mps_chunks = int(self._proposed[hits[0]])
        elif self._proposed.size == 0 or self._proposed[-1] >= self.total_chunks:
            # The whole image is the last prefix and gives the original class by definition;
            # it can only fail through numerical noise, and then the MPS is the whole image.
            self.mps_chunks = self.total_chunks
        else:
            self.next_chunk = int(self._proposed[-1]) + 1

    def mps_mask(self) -> np.ndarray:
        """The MPS as a boolean H x W mask (requires ``done``)."""
        if self.mps_chunks is None:
            raise RuntimeError("the search has not found a sufficient prefix yet")
        return self.prefix_masks(np.array([self.mps_chunks]))[0]


@dataclass
class BisectSearch(PrefixSearch):
    """A sufficient prefix in few evaluations: gallop (1, 2, 4, ... chunks) to the first passing
    prefix, then bisect between it and the last failing one, one prefix per call.

    The result passes and the prefix one chunk shorter fails (or it is the first chunk): where
    passing is monotone in the prefix length, it is the first passing prefix, as
    ``PrefixSearch`` finds, in about 2 log2(chunks) evaluations instead of up to twice the
    chunks. No prefix is tested twice, and the whole image is never tested (it gives the
    original class by definition).
    """

    failing: int = field(default=0, init=False)  # most chunks known to fail (0: none tested)
    passing: int | None = field(default=None, init=False)  # fewest chunks known to pass

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.total_chunks <= 1:  # the only prefix is the whole image
            self.passing = self.mps_chunks = self.total_chunks

    def propose(self, count: int = 1) -> np.ndarray:
        """The keep-mask [1, H, W] of the next prefix to test (``count`` is not used)."""
        if self.passing is None:
            chunk = self.next_chunk
        else:
            chunk = (self.failing + self.passing) // 2
        self._proposed = np.array([chunk])
        return self.prefix_masks(self._proposed)

    def update(self, passing: np.ndarray) -> None:
        passing = np.asarray(passing, dtype=bool)
        if passing.shape != self._proposed.shape:
            raise ValueError(f"expected {self._proposed.size} verdicts")
        chunk = int(self._proposed[0])
        if passing[0]:
            self.passing = chunk
        else:
            self.failing = chunk
            if self.passing is None:
                self.next_chunk = min(2 * chunk, self.total_chunks)
                if self.next_chunk == self.total_chunks:
                    self.passing = self.total_chunks  # the whole image: not tested
        if self.passing is not None and self.passing - self.failing <= 1:
            self.mps_chunks = self.passing
