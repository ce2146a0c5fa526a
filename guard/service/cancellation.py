"""Stopping a request's work when its client no longer waits for it.

A transport says how to tell that its client is gone (``stop_when``, around the request's
work on the request's thread); the model calls made for the request's MPSs ask between one
call and the next (``raise_if_gone``), as the engine does for deadlines. Work that runs on
another thread for callers (a shared batch) takes the callers' tests with it
(``current``) and stops once all of them are gone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from guard.errors import RequestCancelledError

# True once nobody waits for the work any more.
Gone = Callable[[], bool]

_local = threading.local()


@contextlib.contextmanager
def stop_when(gone: Gone | None) -> Iterator[None]:
    """Within the block, this thread's work stops at its next model call once ``gone()``."""
    previous = getattr(_local, "gone", None)
    _local.gone = gone
    try:
        yield
    finally:
        _local.gone = previous


def current() -> Gone | None:
    """The test of this thread's work (None: it is never abandoned)."""
    return getattr(_local, "gone", None)


def raise_if_gone() -> None:
    """``RequestCancelledError`` when nobody waits for this thread's work any more."""
    gone = getattr(_local, "gone", None)
    if gone is not None and gone():
        raise RequestCancelledError("the client cancelled the request")


def all_gone(tests: list[Gone | None]) -> Gone | None:
    """A test that holds once every one of ``tests`` does (None: some caller always waits)."""
    if not tests or any(test is None for test in tests):
        return None
    return lambda: all(test() for test in tests)  # type: ignore[misc]
