"""The MPS engine: ReX's two phases for a batch of images, all runs in lockstep.

Per batch of images: one model call for the originals and their all-baseline versions, one call
per tree level for the mutants of every active run of every image (phase 1), and a few calls
that each test a block of consecutive ranking prefixes (phase 2). Calls are split only where a
level holds more than ``max_batch_size`` mutants.

As rex-xai 0.4.1 does, extraction starts at the first chunk of the ranking even when the
all-baseline input already gets the predicted class (the empty set is never tested); the result
reports whether it does (``baseline_keeps_class``). ``EngineSettings.empty_mps`` tests the empty
set first instead, and ``random_stream="rex"`` draws rex-xai's own random streams, with which
the engine's MPSs are rex-xai's (see ``guard.algorithm.landscape``).

The fast preset (``guard.settings.FAST_PRESET``) changes three settings: fewer runs, ``mutants``
"monotone" (a box's mutants evaluated only where the verdicts so far do not imply them, in up to
three calls per level) and ``extraction`` "bisect" (one prefix per image and call, about
2 log2(chunks) of them). Its MPSs are sufficient by construction like the default's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from guard.algorithm.boxes import MUTANTS_PER_BOX, monotone_verdicts
from guard.algorithm.extraction import BisectSearch, PrefixSearch, rank_pixels
from guard.algorithm.landscape import Landscapes, combine_runs, combine_runs_rex
from guard.errors import ConfigError, DeadlineExceededError
from guard.runtime.spec import ModelSpec
from guard.settings import EngineSettings

# (classes, confidences, image index) of evaluated mutants -> which keep the original class
Verdict = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class MutantEvaluator(Protocol):
    """What the engine needs from a model runtime (``MaskedClassifier`` is the real one)."""

    spec: ModelSpec

    def check_images(self, images: np.ndarray) -> np.ndarray: ...

    def evaluate(
        self, images: np.ndarray, baselines: np.ndarray, masks: np.ndarray, image_index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def model_calls(self, mutants: int) -> int: ...


@dataclass(frozen=True)
class MpsResult:
    """A prediction and its minimal sufficient pixel set."""

    predicted_class: int
    confidence: float
    mps_mask: np.ndarray  # bool [H, W]: the pixels that alone keep the predicted class
    mps_area_fraction: float  # the paper's "area": MPS pixels / (H * W)
    responsibility: np.ndarray  # float [H, W], maximum 1
    baseline_class: int  # top-1 class of the all-baseline input
    # The all-baseline input passes: it gets the predicted class (at the confidence filter).
    # The MPS is then empty with ``empty_mps``, else (rex-xai) the first passing prefix anyway.
    baseline_keeps_class: bool
    # Says little about the image: the MPS is a single chunk (or empty), or the baseline alone
    # keeps the class (so any MPS is sufficient only as much as nothing at all is).
    degenerate: bool
    model_evaluations: int
    model_calls: int
    seconds: float  # wall time of the explain call that produced this result

    @property
    def mps_pixels(self) -> int:
        return int(self.mps_mask.sum())


class _Accounting:
    """Model evaluations and calls per image of a batch."""

    def __init__(
        self, evaluator: MutantEvaluator, images: int, max_batch_size: int, deadline: float | None
    ) -> None:
        self.evaluator = evaluator
        self.max_batch_size = max_batch_size
        self.deadline = deadline
        self.evaluations = np.zeros(images, dtype=np.int64)
        self.calls = np.zeros(images, dtype=np.int64)

    def evaluate(
        self, images: np.ndarray, baselines: np.ndarray, masks: np.ndarray, index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        classes, confidences = [], []
        for start in range(0, len(masks), self.max_batch_size):
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise DeadlineExceededError("the deadline passed while the MPS was computed")
            part = slice(start, start + self.max_batch_size)
            c, p = self.evaluator.evaluate(images, baselines, masks[part], index[part])
            classes.append(c)
            confidences.append(p)
            counts = np.bincount(index[part], minlength=len(self.calls))
            self.evaluations += counts
            for image in np.flatnonzero(counts):
                self.calls[image] += self.evaluator.model_calls(int(counts[image]))
        if len(classes) == 1:
            return classes[0], confidences[0]
        return np.concatenate(classes), np.concatenate(confidences)


class MpsEngine:
    """Computes MPSs of a classifier's predictions with ReX's algorithm and defaults.

    >>> engine = MpsEngine(MaskedClassifier("model.onnx"), EngineSettings(iters=20))
    >>> result = engine.explain(image)  # one input in the model's layout, no batch axis
    """

    def __init__(self, evaluator: MutantEvaluator, settings: EngineSettings | None = None) -> None:
        self.evaluator = evaluator
        self.settings = settings or EngineSettings()
        baseline, channels = self.settings.baseline, evaluator.spec.channels
        if baseline.kind == "channel" and len(baseline.channels or ()) != channels:
            raise ConfigError(
                f"baseline has {len(baseline.channels or ())} channel values, "
                f"the model input has {channels} channels"
            )
        if self.settings.random_stream == "rex" and not (
            0 <= self.settings.seed and self.settings.seed + self.settings.iters < 2**32
        ):
            raise ConfigError(
                "random_stream rex seeds run i with seed + i + 1 as numpy's legacy generator "
                f"does, which needs 0 <= seed and seed + iters < 2**32; seed is {self.settings.seed}"
            )

    def explain(self, image: np.ndarray, deadline: float | None = None) -> MpsResult:
        """The MPS of one input (model layout, without the batch axis)."""
        return self.explain_batch(np.asarray(image)[None], deadline)[0]

    def explain_batch(self, images: np.ndarray, deadline: float | None = None) -> list[MpsResult]:
        """MPSs of a batch [M, *input_shape]; the images share every model call.

        ``deadline`` (a ``time.monotonic()`` instant) stops the work between model calls with
        ``DeadlineExceededError`` once it has passed.
        """
        started = time.perf_counter()
        spec, s = self.evaluator.spec, self.settings
        images = self.evaluator.check_images(images)
        count = len(images)
        if count == 0:
            return []
        baselines = np.stack([s.baseline.image(image, spec.channel_axis) for image in images])
        books = _Accounting(self.evaluator, count, s.max_batch_size, deadline)
        shape = (spec.height, spec.width)

        # The originals and their all-baseline versions, in one call.
        whole = np.concatenate([np.ones((count, *shape), bool), np.zeros((count, *shape), bool)])
        index = np.tile(np.arange(count), 2)
        classes, confidences = books.evaluate(images, baselines, whole, index)
        target, target_confidence = classes[:count], confidences[:count]
        threshold = target_confidence * s.confidence_filter
        baseline_class = classes[count:]
        baseline_passes = (baseline_class == target) & (confidences[count:] >= threshold)
        empty = baseline_passes & s.empty_mps  # the strict reading: the empty set is the MPS

        def passing(classes: np.ndarray, confidences: np.ndarray, index: np.ndarray) -> np.ndarray:
            return (classes == target[index]) & (confidences >= threshold[index])

        responsibility = self._landscapes(images, baselines, books, passing)
        search = BisectSearch if s.extraction == "bisect" else PrefixSearch
        searches = [search(rank_pixels(r), *shape, chunk_size=s.chunk_size) for r in responsibility]
        self._extract(images, baselines, books, passing, searches, empty)

        seconds = time.perf_counter() - started
        results = []
        for m, search in enumerate(searches):
            mask = np.zeros(shape, bool) if empty[m] else search.mps_mask()
            results.append(
                MpsResult(
                    predicted_class=int(target[m]),
                    confidence=float(target_confidence[m]),
                    mps_mask=mask,
                    mps_area_fraction=float(mask.sum()) / mask.size,
                    responsibility=responsibility[m],
                    baseline_class=int(baseline_class[m]),
                    baseline_keeps_class=bool(baseline_passes[m]),
                    degenerate=bool(baseline_passes[m] or search.mps_chunks == 1),
                    model_evaluations=int(books.evaluations[m]),
                    model_calls=int(books.calls[m]),
                    seconds=seconds,
                )
            )
        return results

    def _landscapes(
        self, images: np.ndarray, baselines: np.ndarray, books: _Accounting, passing: Verdict
    ) -> np.ndarray:
        """Phase 1: every run of every image advances one tree level per model call."""
        s, spec = self.settings, self.evaluator.spec
        count = len(images)
        landscapes = Landscapes(
            spec.height,
            spec.width,
            run_ids=np.tile(np.arange(s.iters), count),  # run i of every image: same stream
            seed=s.seed,
            min_box_size=s.min_box_size,
            tree_depth=s.tree_depth,
            search_limit=s.search_limit,
            form=s.responsibility_form,
            stream=s.random_stream,
            combination=s.combination,
        )
        while True:
            masks, runs = landscapes.propose()
            if not len(masks):
                break
            index = runs // s.iters
            if s.mutants == "monotone":
                verdicts = self._monotone(images, baselines, books, passing, masks, index)
            else:
                verdicts = passing(*books.evaluate(images, baselines, masks, index), index)
            del masks  # freed before the next level's masks are allocated, so malloc reuses it
            landscapes.update(verdicts)
        maps = landscapes.responsibility.reshape(count, s.iters, spec.height, spec.width)
        combine = combine_runs_rex if s.random_stream == "rex" else combine_runs
        return np.stack([combine(image_maps, s.combination) for image_maps in maps])

    @staticmethod
    def _monotone(
        images: np.ndarray,
        baselines: np.ndarray,
        books: _Accounting,
        passing: Verdict,
        masks: np.ndarray,
        index: np.ndarray,
    ) -> np.ndarray:
        """A level's verdicts, evaluating only the mutants that monotonicity does not imply
        (``EngineSettings.mutants`` "monotone"): up to three calls instead of one."""
        boxes = len(masks) // MUTANTS_PER_BOX
        per_box = masks.reshape(boxes, MUTANTS_PER_BOX, *masks.shape[1:])
        owner = index[::MUTANTS_PER_BOX]

        def evaluate(box: np.ndarray, mutant: np.ndarray) -> np.ndarray:
            where = owner[box]
            return passing(*books.evaluate(images, baselines, per_box[box, mutant], where), where)

        return monotone_verdicts(evaluate, boxes).ravel()

    def _extract(
        self,
        images: np.ndarray,
        baselines: np.ndarray,
        books: _Accounting,
        passing: Verdict,
        searches: list[PrefixSearch],
        skip: np.ndarray,
    ) -> None:
        """Phase 2: blocks of consecutive prefixes per call, doubling while none passes (one
        prefix per image and call with ``extraction`` "bisect").

        Every search starts at the first chunk, as rex-xai's; ``skip`` marks the images whose
        MPS is already known to be empty (``empty_mps``).
        """
        block = self.settings.extraction_batch
        active = [m for m in range(len(searches)) if not skip[m]]
        while active:
            proposals = [(m, searches[m].propose(block)) for m in active]
            masks = np.concatenate([p[1] for p in proposals])
            index = np.concatenate([np.full(len(p[1]), p[0]) for p in proposals])
            verdicts = passing(*books.evaluate(images, baselines, masks, index), index)
            offset = 0
            for m, prefix_masks in proposals:
                searches[m].update(verdicts[offset : offset + len(prefix_masks)])
                offset += len(prefix_masks)
            active = [m for m in active if not searches[m].done]
            block = min(2 * block, self.settings.max_batch_size)
