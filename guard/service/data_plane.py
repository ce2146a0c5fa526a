"""The sidecar's data plane, for any transport: which model a request names, whether it is
admitted, which of its items are checked and when, and the metrics and verdict log of it all.
Predicting and checking themselves are the ``GuardedModel``'s.

No protobuf here: requests arrive as numpy arrays, answers leave as dataclasses, failures as
``GuardError``s. In ``sync`` mode the verdicts of a request's items are in its answer; in
``async`` mode the answer carries the prediction only and the items wait in a bounded
background queue (dropped and counted when it is full: the request path never blocks on it),
whose verdicts reach the metrics and the JSON verdict log.

With ``explain="flagged"`` and a score that reads no MPS feature, an inference request's MPSs
are computed only for the predictions the score flags and for a random ``explain_sample_rate``
share of all checked ones, drawn before and independently of the verdict; the MPS-area
histogram and drift use only that random share, so they stay unbiased estimates of the
served MPS areas. ``Explain`` always computes the MPS.

Each served model's exchangeability martingale (guard.verdict.martingale) takes the score of
every prediction checked for an inference request: ``Explain`` requests are looks on demand,
often at predictions already flagged, and would bias it.

With ``keep_flagged`` the flagged predictions of both kinds of request are kept, with their
inputs and MPSs, in a bounded ``FlagStore`` (``flags``) that the /flags page shows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from guard.engine import MpsResult
from guard.errors import DeadlineExceededError, OverloadedError, UnknownModelError
from guard.runtime.classifier import Prediction
from guard.service.batching import BackgroundQueue, BoundedExplainer, SharedExplainer
from guard.service.drift import DriftMonitor
from guard.service.flag_store import FlagStore
from guard.service.guarded_model import VERSION, Check, GuardedModel, ModelMetadata
from guard.service.limits import shown
from guard.service.memory import release_freed_memory
from guard.service.metrics import GuardMetrics
from guard.service.settings import ServeSettings
from guard.verdict.martingale import ExchangeabilityMartingale

log = logging.getLogger(__name__)
verdict_log = logging.getLogger("guard.verdicts")

# What happened to one item's check.
CheckStatus = Literal["checked", "queued", "not_sampled", "queue_full"]


@dataclass(frozen=True)
class Timings:
    predict_seconds: float
    explain_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class Inference:
    """A request's predictions, and the check of each item where it was done in the request."""

    prediction: Prediction
    status: list[CheckStatus]
    checks: list[Check | None]
    timings: Timings


@dataclass(frozen=True)
class _Pending:
    """An item waiting for its background check."""

    request_id: str
    item: int
    image: np.ndarray
    prediction: Prediction  # the item's own row of the request's prediction


class _Served:
    """One model with its own drift window and, depending on settings, its work queues."""

    def __init__(self, model: GuardedModel, settings: ServeSettings, metrics: GuardMetrics) -> None:
        self.model = model
        reference = model.calibration.area_reference
        self.drift = DriftMonitor(reference, settings.drift_window) if reference else None
        scores = model.calibration.detector.exchangeability_reference
        # A fixed seed: the martingale's tie-breaking draws are independent of the scores
        # either way, and a replayed stream gives the same values.
        self.martingale = ExchangeabilityMartingale(scores, seed=0) if scores else None
        if self.martingale is None:
            log.warning(
                "the calibration of %s holds no exchangeability reference (made by an older "
                "guard calibrate): guard_calibration_martingale is not exported for it; "
                "re-run guard calibrate to monitor it",
                model.name,
            )
        # Explain only what the score flags (and a random share) where the score needs no MPS.
        self.only_flagged = settings.explain == "flagged" and not model.needs_mps
        if settings.explain == "flagged" and model.needs_mps:
            log.info(
                "explain flagged computes every MPS of %s all the same: its %s score reads "
                "MPS features",
                model.name,
                model.calibration.detector.score_kind,
            )
        explain_batch = model.engine.explain_batch
        on_batch = metrics.shared_batch.labels(model=model.name).observe
        self.shared = (
            SharedExplainer(
                explain_batch,
                max_items=settings.max_batch_items,
                max_wait=settings.batch_wait_ms / 1000.0,
                workers=settings.explain_workers,
                on_batch=on_batch,
            )
            if _shares(settings, model)
            else None
        )
        self.on_batch = on_batch
        self.own = BoundedExplainer(explain_batch, workers=settings.explain_workers)
        self.background: BackgroundQueue[_Pending] | None = None

    def explain(self, images: np.ndarray, deadline: float | None) -> list[MpsResult]:
        if self.shared is not None:
            return self.shared.explain(images, deadline)
        results = self.own.explain(images, deadline)
        self.on_batch(len(results))
        return results


def _shares(settings: ServeSettings, model: GuardedModel) -> bool:
    """Whether concurrent requests share model calls: as set, else where it pays (CUDA)."""
    if settings.share_model_calls is not None:
        return settings.share_model_calls
    return model.classifier.provider == "CUDAExecutionProvider"


class DataPlane:
    """Serves guarded models: ``metadata`` (the one lookup of a request), then ``infer`` (a
    batch, verdicts by mode) or ``explain`` (one item, always its full verdict)."""

    def __init__(
        self, models: Sequence[GuardedModel], settings: ServeSettings, metrics: GuardMetrics
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._served: dict[str, _Served] = {}
        self._slots = threading.BoundedSemaphore(settings.max_concurrency)
        # Decoding holds a full-size image: as many at once as MPS computations, no more.
        self._decoding = threading.BoundedSemaphore(settings.explain_workers)
        self._sampler = random.Random()
        # The last keep_flagged flagged predictions, for the /flags page (None: kept nowhere).
        self.flags = (
            FlagStore.for_models(settings.keep_flagged, models, directory=settings.flagged_dir)
            if settings.keep_flagged
            else None
        )
        for model in models:
            served = _Served(model, settings, metrics)
            if settings.mode == "async":
                served.background = BackgroundQueue(
                    lambda batch, served=served: self._check_background(served, batch),
                    capacity=settings.queue_size,
                    max_batch=settings.max_batch_items,
                    on_failure=metrics.skipped.labels(model.name, "error").inc,
                )
            self._served[model.name] = served
            detector = model.calibration.detector
            metrics.register_model(
                model.name,
                provider=model.classifier.provider,
                sha256=model.classifier.sha256,
                mode=settings.mode,
                score_kind=detector.score_kind,
                alpha=detector.alpha,
                flag_reasons=model.flag_reasons,
                queue_capacity=settings.queue_size if settings.mode == "async" else 0,
                drift=served.drift,
                area_reference=model.calibration.area_reference,
                queue_depth=served.background.depth if served.background else None,
                background_in_progress=(
                    served.background.in_progress if served.background else None
                ),
                martingale=_reader(served.martingale),
            )

    # -- lookup -------------------------------------------------------------------------------

    @property
    def models(self) -> list[GuardedModel]:
        return [served.model for served in self._served.values()]

    @property
    def default_name(self) -> str:
        """The model a request without a name gets (where its protocol allows): the first."""
        return next(iter(self._served))

    def label(self, name: str) -> str:
        """``name`` as a metric label: a served model's name, else "unknown" (bounded labels)."""
        return name if name in self._served else "unknown"

    def metadata(self, name: str, version: str = "") -> ModelMetadata:
        """The served model called ``name`` (version empty or the one served), as a client
        may see it; ``UnknownModelError`` when there is none."""
        served = self._served.get(name)
        if served is None:
            known = ", ".join(sorted(self._served))
            raise UnknownModelError(f"unknown model {shown(name)}; this server serves: {known}")
        if version not in ("", VERSION):
            raise UnknownModelError(
                f"model {name!r} has no version {shown(version)}; it has version {VERSION}"
            )
        return served.model.metadata

    # -- requests -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """A request slot, or ``OverloadedError`` at once when all are taken."""
        if not self._slots.acquire(blocking=False):
            raise OverloadedError(
                f"the server is handling its limit of {self.settings.max_concurrency} "
                "concurrent requests; retry later"
            )
        try:
            yield
        finally:
            self._slots.release()

    def infer(
        self,
        model: ModelMetadata,
        images: np.ndarray,
        *,
        request_id: str,
        deadline: float | None = None,
    ) -> Inference:
        """Predict a batch for ``model`` (from ``metadata``); check each sampled item now
        (sync) or in the background (async)."""
        started = time.perf_counter()
        served = self._served[model.name]
        prediction, predicted = self._predict(served, images, started)

        sampled = [self._sampled() for _ in range(len(images))]
        status: list[CheckStatus] = ["not_sampled"] * len(images)
        checks: list[Check | None] = [None] * len(images)
        chosen = [i for i, s in enumerate(sampled) if s]
        self.metrics.skipped.labels(model.name, "not_sampled").inc(len(images) - len(chosen))
        if served.background is not None:
            for i in chosen:
                pending = _Pending(
                    request_id,
                    i,
                    images[i].copy(),  # not a view that keeps the whole request alive
                    _rows(prediction, [i]),
                )
                status[i] = "queued" if served.background.submit(pending) else "queue_full"
                if status[i] == "queue_full":
                    self.metrics.skipped.labels(model.name, "queue_full").inc()
        elif chosen:
            found = self._check(
                served,
                images[chosen],
                _rows(prediction, chosen),
                request_ids=[request_id] * len(chosen),
                items=chosen,
                deadline=deadline,
                inference=True,
            )
            for i, check in zip(chosen, found, strict=True):
                status[i], checks[i] = "checked", check
        timings = self._finish(served, started, predicted)
        return Inference(prediction, status, checks, timings)

    def explain(
        self,
        model: ModelMetadata,
        image: np.ndarray | bytes,
        *,
        request_id: str,
        deadline: float | None = None,
    ) -> tuple[Check, Timings]:
        """Predict and check one item for ``model`` (from ``metadata``): a model input, or
        encoded image bytes; whatever the mode."""
        started = time.perf_counter()
        served = self._served[model.name]
        images = (self._decode(served, image, deadline) if isinstance(image, bytes) else image)[
            None
        ]
        prediction, predicted = self._predict(served, images, started)
        (check,) = self._check(
            served, images, prediction, request_ids=[request_id], items=[0], deadline=deadline
        )
        return check, self._finish(served, started, predicted)

    def close(self, timeout: float | None = None) -> None:
        """Finish background checks within ``timeout``, then stop the workers."""
        ends = None if timeout is None else time.monotonic() + timeout
        for served in self._served.values():
            left = None if ends is None else max(0.0, ends - time.monotonic())
            if served.background is not None:
                dropped = served.background.close(left)
                if dropped:
                    log.warning(
                        "%d queued check(s) of %s dropped at shutdown", dropped, served.model.name
                    )
            if served.shared is not None:
                served.shared.close(left)

    def _decode(self, served: _Served, data: bytes, deadline: float | None) -> np.ndarray:
        """An encoded image as a model input, at most ``explain_workers`` at once (each holds
        the image at full size while it is decoded), the others waiting within their deadline;
        the memory of large ones handed back to the system afterwards."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._decoding.acquire(timeout=timeout):
            raise DeadlineExceededError("the deadline passed while waiting to decode the image")
        try:
            return served.model.decode(data, max_image_pixels=self.settings.max_image_pixels)
        finally:
            self._decoding.release()
            release_freed_memory()

    def _predict(
        self, served: _Served, images: np.ndarray, started: float
    ) -> tuple[Prediction, float]:
        """The model's prediction, counted and timed from ``started``; and when it was ready."""
        prediction = served.model.predict(images)
        predicted = time.perf_counter()
        name = served.model.name
        self.metrics.predictions.labels(model=name).inc(len(images))
        self.metrics.stage_seconds.labels(model=name, stage="predict").observe(predicted - started)
        return prediction, predicted

    def _finish(self, served: _Served, started: float, predicted: float) -> Timings:
        finished = time.perf_counter()
        total = finished - started
        self.metrics.stage_seconds.labels(model=served.model.name, stage="total").observe(total)
        return Timings(predicted - started, finished - predicted, total)

    # -- checks -------------------------------------------------------------------------------

    def _sampled(self) -> bool:
        rate = self.settings.sample_rate
        return rate >= 1.0 or (rate > 0.0 and self._sampler.random() < rate)

    def _check(
        self,
        served: _Served,
        images: np.ndarray,
        prediction: Prediction,
        *,
        request_ids: Sequence[str],
        items: Sequence[int],
        deadline: float | None,
        inference: bool = False,
    ) -> list[Check]:
        """The checks of items already predicted, counted and logged. ``inference``: items of
        inference requests, whose MPSs follow ``explain`` and whose scores feed the
        martingale; otherwise (``Explain``) every MPS is computed."""
        name = served.model.name
        started = time.perf_counter()
        only_flagged = inference and served.only_flagged
        sampled = None
        if only_flagged:
            rate = self.settings.explain_sample_rate
            sampled = np.array([self._sampler.random() < rate for _ in range(len(images))])
        try:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceededError("the deadline passed before the MPS could be computed")
            checks = served.model.check(
                images,
                prediction,
                deadline=deadline,
                explain=served.explain,
                only_flagged=only_flagged,
                sampled=sampled,
            )
        except DeadlineExceededError:
            self.metrics.skipped.labels(name, "deadline").inc(len(images))
            raise
        self._count(served, checks, time.perf_counter() - started, request_ids, items)
        if self.flags is not None:
            source = "infer" if inference else "explain"
            try:
                self.flags.keep(served.model, images, checks, request_ids, items, source=source)
            except Exception:  # the page's store must never fail a request
                log.exception("could not keep the flagged predictions of %s", name)
        if inference and served.martingale is not None:
            served.martingale.update([check.score for check in checks])
        return checks

    def _check_background(self, served: _Served, batch: Sequence[_Pending]) -> None:
        self._check(
            served,
            np.stack([p.image for p in batch]),
            _joined([p.prediction for p in batch]),
            request_ids=[p.request_id for p in batch],
            items=[p.item for p in batch],
            deadline=None,
            inference=True,
        )

    def _count(
        self,
        served: _Served,
        checks: Sequence[Check],
        seconds: float,
        request_ids: Sequence[str],
        items: Sequence[int],
    ) -> None:
        name, m = served.model.name, self.metrics
        m.stage_seconds.labels(model=name, stage="explain").observe(seconds)
        m.checked.labels(model=name).inc(len(checks))
        # MPS areas of an unbiased sample only: not those computed because the score flagged.
        areas = [c.mps_area_fraction for c in checks if c.representative]
        for check in checks:
            if check.flagged:
                m.flagged.labels(model=name, reason=check.reason).inc()
        for area in areas:
            m.mps_area.labels(model=name).observe(area)
        if served.drift is not None and areas:
            served.drift.add(areas)
        if self.settings.log_verdicts and verdict_log.isEnabledFor(logging.INFO):
            for request_id, item, check in zip(request_ids, items, checks, strict=True):
                record = _verdict_record(name, request_id, item, check)
                verdict_log.info(json.dumps(_finite(record), allow_nan=False))


def _rows(prediction: Prediction, rows: Sequence[int]) -> Prediction:
    """Some items of a prediction (copies)."""
    index = np.asarray(rows, dtype=np.int64)
    return Prediction(
        scores=prediction.scores[index],
        classes=prediction.classes[index],
        confidences=prediction.confidences[index],
        margins=prediction.margins[index],
    )


def _joined(parts: Sequence[Prediction]) -> Prediction:
    """Predictions of several requests' items as one batch."""
    return Prediction(
        scores=np.concatenate([p.scores for p in parts]),
        classes=np.concatenate([p.classes for p in parts]),
        confidences=np.concatenate([p.confidences for p in parts]),
        margins=np.concatenate([p.margins for p in parts]),
    )


def _reader(martingale: ExchangeabilityMartingale | None) -> Callable[[], float] | None:
    """The martingale's value, read at scrape time (None: no martingale, no series)."""
    return None if martingale is None else lambda: martingale.value


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _finite(value: object) -> object:
    """``value`` with every NaN or infinite number (at any depth) as None: strict JSON has no
    such numbers, and a figure that is not finite is undefined for this item."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _verdict_record(model: str, request_id: str, item: int, check: Check) -> dict[str, object]:
    return {
        "event": "verdict",
        "model": model,
        "request_id": request_id,
        "item": item,
        "predicted_class": check.predicted_class,
        "predicted_name": check.predicted_name,
        "confidence": round(check.confidence, 6),
        "mps_area_fraction": _rounded(check.mps_area_fraction),
        "degenerate": check.degenerate,
        "explained": check.explained,
        "model_evaluations": check.model_evaluations,
        "score": round(check.score, 6),
        "p_value": round(check.p_value, 6),
        "flagged": check.flagged,
        "reason": check.reason,
        "evidence": [
            {"feature": term, "contribution": round(contribution, 6)}
            for term, contribution in check.evidence
        ],
        "features": {name: round(v, 6) for name, v in check.features.items()},
    }
