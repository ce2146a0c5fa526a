"""The one place where the guard's errors become gRPC status codes, and every RPC is counted.

A ``GuardError`` is the client's to read: its code and message go back as they are. Anything
else is a fault of the server: the client gets INTERNAL with a generic message and a reference,
the server log gets the whole traceback.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from guard.errors import (
    DeadlineExceededError,
    GuardError,
    InvalidInputError,
    NonFiniteOutputError,
    OverloadedError,
    RequestCancelledError,
    UnavailableError,
    UnknownModelError,
)
from guard.service.cancellation import Gone
from guard.service.limits import bounded_message
from guard.service.metrics import GuardMetrics

log = logging.getLogger(__name__)

_CODES: list[tuple[type[GuardError], grpc.StatusCode]] = [
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownModelError, grpc.StatusCode.NOT_FOUND),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (RequestCancelledError, grpc.StatusCode.CANCELLED),
]
# Outcomes counted under a name of their own rather than their status code's: a model output
# that overflowed (an INVALID_ARGUMENT the client could not have seen coming).
_OUTCOMES: list[tuple[type[GuardError], str]] = [(NonFiniteOutputError, "non_finite_output")]
# A client whose RPC ended this close to its deadline is left to the deadline, which stops
# the work as DEADLINE_EXCEEDED (grpc ends the RPC at about the same instant).
_DEADLINE_MARGIN = 0.25  # seconds

_NO_DEADLINE = 10 * 365 * 24 * 3600.0  # seconds; longer than any real deadline
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.ServicerContext], Response]


def status_of(error: GuardError) -> grpc.StatusCode:
    """The status code of a guard error (INTERNAL for those a client cannot act on)."""
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The client's deadline as a ``time.monotonic()`` instant (None: no deadline)."""
    remaining = context.time_remaining()
    # Without a deadline grpc reports None or an "infinite" number of seconds.
    if remaining is None or remaining > _NO_DEADLINE:
        return None
    return time.monotonic() + remaining


def outcome_of(error: GuardError, code: grpc.StatusCode) -> str:
    """The request outcome counted for ``error`` answered with ``code``."""
    for kind, outcome in _OUTCOMES:
        if isinstance(error, kind):
            return outcome
    return code.name.lower()


def client_gone(context: grpc.ServicerContext, deadline: float | None) -> Gone:
    """A test of whether the client of ``context`` has stopped waiting: it cancelled, or the
    connection went (its deadline passing is the deadline's to report)."""

    def gone() -> bool:
        if context.is_active():
            return False
        return deadline is None or time.monotonic() < deadline - _DEADLINE_MARGIN

    return gone


class Servicer:
    """What ``rpc`` needs of a servicer: the metrics, and the model label of a request."""

    metrics: GuardMetrics

    def model_label(self, request: Any) -> str:
        raise NotImplementedError


def rpc(name: str, *, heavy: bool = False) -> Callable[[Handler], Handler]:
    """Wrap a servicer method: map errors to status codes, count the outcome under ``name``;
    ``heavy`` requests (those that run the model) also count as in flight."""

    def decorate(method: Handler) -> Handler:
        @functools.wraps(method)
        def handle(self: Servicer, request: Any, context: grpc.ServicerContext) -> Any:
            metrics = self.metrics
            code, message, outcome = grpc.StatusCode.OK, "", "ok"
            if heavy:
                metrics.in_flight.inc()
            try:
                return method(self, request, context)
            except GuardError as exc:
                # Bounded: the message travels in trailers that clients cap (8 KiB by default).
                code, message = status_of(exc), bounded_message(str(exc))
                outcome = outcome_of(exc, code)
                if code is grpc.StatusCode.INTERNAL:
                    log.error("%s failed: %s", name, message)
            except Exception:  # noqa: BLE001 - the boundary: every fault becomes INTERNAL
                reference = uuid.uuid4().hex[:12]
                log.exception("%s failed (reference %s)", name, reference)
                code, outcome = grpc.StatusCode.INTERNAL, "internal"
                message = f"internal error (reference {reference}); see the server log"
            finally:
                if heavy:
                    metrics.in_flight.dec()
                metrics.requests.labels(self.model_label(request), name, outcome).inc()
            context.abort(code, message)  # raises: the RPC ends here with that status

        return handle

    return decorate
