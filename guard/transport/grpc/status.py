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
    OverloadedError,
    UnavailableError,
    UnknownModelError,
)
from guard.service.metrics import GuardMetrics

log = logging.getLogger(__name__)

_CODES: list[tuple[type[GuardError], grpc.StatusCode]] = [
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownModelError, grpc.StatusCode.NOT_FOUND),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
]

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
            code, message = grpc.StatusCode.OK, ""
            if heavy:
                metrics.in_flight.inc()
            try:
                return method(self, request, context)
            except GuardError as exc:
                code, message = status_of(exc), str(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.error("%s failed: %s", name, exc)
            except Exception:  # noqa: BLE001 - the boundary: every fault becomes INTERNAL
                reference = uuid.uuid4().hex[:12]
                log.exception("%s failed (reference %s)", name, reference)
                code = grpc.StatusCode.INTERNAL
                message = f"internal error (reference {reference}); see the server log"
            finally:
                if heavy:
                    metrics.in_flight.dec()
                metrics.requests.labels(self.model_label(request), name, code.name.lower()).inc()
            context.abort(code, message)  # raises: the RPC ends here with that status

        return handle

    return decorate
