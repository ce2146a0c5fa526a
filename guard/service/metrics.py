"""The sidecar's Prometheus metrics, all on one injected registry (never the global one).

Names follow Prometheus conventions: the ``guard_`` prefix, base units (seconds, fractions),
``_total`` on counters. Every per-model series carries a ``model`` label (the served name).
The alerting rules and the dashboard in deploy/ are written against exactly these names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from guard.service.drift import DriftMonitor

# Latency from a millisecond (a small model's prediction) to a minute (a large model's MPS).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# MPS area is a fraction of the image; the paper's areas span about 0.1% to 100%.
AREA_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# The quantiles the dashboard overlays on the served areas' own (from the histogram).
CALIBRATION_QUANTILES = (0.1, 0.5, 0.9)
# Why a prediction went unchecked (the ``reason`` of guard_skipped_checks_total).
SKIP_REASONS = ("not_sampled", "queue_full", "deadline", "error")


class GuardMetrics:
    """Every metric the sidecar exports; one instance per server, on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "guard_requests",
            "Requests handled, by RPC and outcome (the gRPC status code, lower case).",
            ["model", "rpc", "outcome"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "guard_in_flight_requests",
            "Inference and explain requests being handled now.",
            registry=registry,
        )
        self.predictions = Counter(
            "guard_predictions",
            "Items the model predicted (a batched request counts each item).",
            ["model"],
            registry=registry,
        )
        self.checked = Counter(
            "guard_checked_predictions",
            "Predictions whose MPS was computed and scored against the calibration.",
            ["model"],
            registry=registry,
        )
        self.flagged = Counter(
            "guard_flagged_predictions",
            "Checked predictions the guard flagged, by reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.skipped = Counter(
            "guard_skipped_checks",
            "Predictions left unchecked: not sampled, background queue full, deadline passed, or "
            "their background check failed (see the log).",
            ["model", "reason"],
            registry=registry,
        )
        self.mps_area = Histogram(
            "guard_mps_area_fraction",
            "MPS area of checked predictions, as a fraction of the input's pixels (with "
            "explain=flagged, of the random sample only).",
            ["model"],
            buckets=AREA_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "guard_stage_duration_seconds",
            "Wall time per stage: predict (model on the request), explain (MPSs and scores of "
            "a request's checked items, or of a background batch), total (the whole request).",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.model_evaluations = Counter(
            "guard_model_evaluations",
            "Model evaluations (masked inputs) spent on MPSs.",
            ["model"],
            registry=registry,
        )
        self.model_calls = Counter(
            "guard_model_calls",
            "onnxruntime calls made for MPSs (each evaluates a batch of masked inputs).",
            ["model"],
            registry=registry,
        )
        self.shared_batch = Histogram(
            "guard_explain_batch_items",
            "Items whose MPSs were computed together, sharing model calls.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "guard_queue_depth",
            "Predictions waiting in the background (async) check queue.",
            ["model"],
            registry=registry,
        )
        self.background_in_progress = Gauge(
            "guard_background_items_in_progress",
            "Predictions taken from the background (async) check queue whose checks are being "
            "computed now (guard_queue_depth counts those still waiting).",
            ["model"],
            registry=registry,
        )
        self.queue_capacity = Gauge(
            "guard_queue_capacity",
            "Size of the background check queue.",
            ["model"],
            registry=registry,
        )
        self.alpha = Gauge(
            "guard_calibration_alpha",
            "The calibrated false-alarm rate: correct predictions are flagged at most this often.",
            ["model"],
            registry=registry,
        )
        self.drift = Gauge(
            "guard_mps_area_drift",
            "Kolmogorov-Smirnov distance of the recent MPS areas from the calibration's (0-1).",
            ["model"],
            registry=registry,
        )
        self.martingale = Gauge(
            "guard_calibration_martingale",
            "Exchangeability martingale of the scores of predictions checked for inference "
            "requests since start, against the calibration's held-out ones: while served "
            "traffic is like the calibration data it reaches 1/delta with probability at most "
            "delta, so 20 or more is evidence at level 0.05 that the calibration's false-alarm "
            "guarantee no longer holds.",
            ["model"],
            registry=registry,
        )
        self.calibration_area = Gauge(
            "guard_calibration_mps_area_quantile",
            "Quantiles of the calibration's MPS areas: what the served areas are compared with.",
            ["model", "quantile"],
            registry=registry,
        )
        self.drift_items = Gauge(
            "guard_mps_area_drift_window_items",
            "Recent MPS areas in the drift window.",
            ["model"],
            registry=registry,
        )
        self.info = Info(
            "guard_model",
            "The served model: execution provider that runs it, its sha256, mode and score.",
            ["model"],
            registry=registry,
        )

    def register_model(
        self,
        model: str,
        *,
        provider: str,
        sha256: str,
        mode: str,
        score_kind: str,
        alpha: float,
        flag_reasons: Sequence[str],
        queue_capacity: int,
        drift: DriftMonitor | None,
        area_reference: Sequence[float] | None,
        queue_depth: Callable[[], float] | None = None,
        background_in_progress: Callable[[], float] | None = None,
        martingale: Callable[[], float] | None = None,
    ) -> None:
        """Static facts of a served model, the drift gauges read at scrape time, and a zero
        series for every counter, flag reason (those its calibration can give) and skip reason,
        so that rates and ratios are defined before traffic; the martingale is read at scrape
        time too."""
        self.info.labels(model=model).info(
            {"provider": provider, "sha256": sha256, "mode": mode, "score_kind": score_kind}
        )
        self.alpha.labels(model=model).set(alpha)
        self.queue_capacity.labels(model=model).set(queue_capacity)
        if queue_depth is None:
            self.queue_depth.labels(model=model).set(0)
        else:
            self.queue_depth.labels(model=model).set_function(queue_depth)
        if background_in_progress is None:
            self.background_in_progress.labels(model=model).set(0)
        else:
            self.background_in_progress.labels(model=model).set_function(background_in_progress)
        if area_reference:
            for q in CALIBRATION_QUANTILES:
                self.calibration_area.labels(model=model, quantile=str(q)).set(
                    float(np.quantile(area_reference, q))
                )
        if martingale is not None:  # absent from calibrations without the reference
            self.martingale.labels(model=model).set_function(martingale)
        if drift is not None:
            self.drift.labels(model=model).set_function(drift.distance)
            self.drift_items.labels(model=model).set_function(drift.items)
        for counter in (self.predictions, self.checked, self.model_evaluations, self.model_calls):
            counter.labels(model=model)
        for reason in flag_reasons:
            self.flagged.labels(model=model, reason=reason)
        for reason in SKIP_REASONS:
            self.skipped.labels(model=model, reason=reason)

    def model_call_counter(self, model: str) -> Callable[[int, int], None]:
        """A hook for ``model``'s engine: counts the model calls and evaluations of its MPSs
        (told per model call, so calls shared by several items count once)."""
        calls = self.model_calls.labels(model=model)
        evaluations = self.model_evaluations.labels(model=model)

        def count(model_calls: int, model_evaluations: int) -> None:
            calls.inc(model_calls)
            evaluations.inc(model_evaluations)

        return count
