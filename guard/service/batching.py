"""Work queues of the data plane: MPSs of concurrent requests in shared model calls or at most
a few at once in their own, and the bounded background queue of async mode.

Both hand the engine several items at once: ``MpsEngine.explain_batch`` puts the mutants of
all of them into the same model calls, and each item's MPS is the same as when computed alone
(every image uses the same random streams), so sharing changes speed, never verdicts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from guard.engine import MpsResult
from guard.errors import (
    DeadlineExceededError,
    InvalidInputError,
    RequestCancelledError,
    UnavailableError,
)
from guard.service.cancellation import Gone, all_gone, current, stop_when

log = logging.getLogger(__name__)

_STOP = object()  # queue sentinel: the worker finishes what is queued before it, then exits
_CANCEL_POLL = 0.1  # seconds between looks at whether a waiting caller's client is gone
T = TypeVar("T")


@dataclass
class _Job:
    images: np.ndarray
    deadline: float | None  # time.monotonic() after which nobody waits for the result
    gone: Gone | None = None  # true once the caller's client no longer waits (cancelled)
    future: Future[list[MpsResult]] = field(default_factory=Future)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


class SharedExplainer:
    """Collects the items of concurrent requests for up to ``max_wait`` seconds (or until
    ``max_items``) and explains them in one engine call on a worker thread."""

    def __init__(
        self,
        explain: Callable[[np.ndarray, float | None], list[MpsResult]],
        *,
        max_items: int,
        max_wait: float,
        workers: int = 1,
        on_batch: Callable[[int], None] = lambda items: None,
    ) -> None:
        self._explain = explain
        self._max_items = max_items
        self._max_wait = max_wait
        self._on_batch = on_batch
        self._queue: queue.Queue[object] = queue.Queue()
        # Held while a job is queued and while closing starts: no job lands behind the stop
        # markers, where no worker would ever take it.
        self._admission = threading.Lock()
        self._closed = False
        # Several workers: while one waits on the model, another can fill its next batch.
        self._workers = [
            threading.Thread(target=self._run, name=f"guard-shared-explain-{i}", daemon=True)
            for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    def explain(self, images: np.ndarray, deadline: float | None = None) -> list[MpsResult]:
        """MPSs of ``images``, computed together with other callers' items."""
        job = _Job(images, deadline, current())
        with self._admission:
            if self._closed:
                raise UnavailableError("the server is shutting down")
            self._queue.put(job)
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if job.gone is not None:  # look again now and then: the client may cancel
                timeout = _CANCEL_POLL if timeout is None else min(timeout, _CANCEL_POLL)
            try:
                return job.future.result(timeout=timeout)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    job.future.cancel()
                    raise DeadlineExceededError(
                        "the deadline passed while the MPS was computed"
                    ) from None
                if job.gone is not None and job.gone():
                    # Its batch stops once all its callers are gone (see _explain_jobs).
                    job.future.cancel()
                    raise RequestCancelledError("the client cancelled the request") from None

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued jobs within ``timeout``; callers of jobs left then get
        ``UnavailableError`` instead of waiting on."""
        ends = None if timeout is None else time.monotonic() + timeout
        with self._admission:
            self._closed = True
            for _ in self._workers:
                self._queue.put(_STOP)  # one each: a worker exits on the first it takes
        for worker in self._workers:
            worker.join(None if ends is None else max(0.0, ends - time.monotonic()))
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _Job) and job.future.set_running_or_notify_cancel():
                job.future.set_exception(UnavailableError("the server shut down"))

    def _run(self) -> None:
        carry: object | None = None  # the job that did not fit into this worker's last batch
        while True:
            first = carry if carry is not None else self._queue.get()
            if first is _STOP:
                return
            assert isinstance(first, _Job)
            batch, carry = self._collect(first)
            self._explain_jobs(batch)

    def _collect(self, first: _Job) -> tuple[list[_Job], object | None]:
        """``first`` and the jobs arriving within the wait, up to ``max_items``; and the next
        queue entry when it did not fit (a job, or a stop for this worker)."""
        jobs, items = [first], len(first.images)
        closes = time.monotonic() + self._max_wait
        while items < self._max_items:
            try:
                nxt = self._queue.get(timeout=max(0.0, closes - time.monotonic()))
            except queue.Empty:
                break
            if nxt is _STOP or items + len(nxt.images) > self._max_items:  # type: ignore[attr-defined]
                return jobs, nxt
            assert isinstance(nxt, _Job)
            jobs.append(nxt)
            items += len(nxt.images)
        return jobs, None

    def _explain_jobs(self, jobs: list[_Job]) -> None:
        live = []
        for job in jobs:
            if job.future.set_running_or_notify_cancel() and not job.expired():
                live.append(job)
            elif not job.future.done():
                job.future.set_exception(DeadlineExceededError("the deadline passed in the queue"))
        if not live:
            return
        # The batch may run until the last caller stops waiting (no deadline: to the end).
        deadlines = [job.deadline for job in live]
        deadline = None if None in deadlines else max(deadlines)  # type: ignore[type-var]
        try:
            with stop_when(all_gone([job.gone for job in live])):
                results = self._explain(np.concatenate([job.images for job in live]), deadline)
        except InvalidInputError as exc:
            if len(live) == 1:
                raise_in(live, exc)
                return
            # One caller's input (one whose mutants overflow the model) must not fail the
            # others': each is computed alone, so only its own caller gets the error.
            for job in live:
                self._explain_alone(job)
            return
        except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the error
            raise_in(live, exc)
            return
        self._on_batch(len(results))
        start = 0
        for job in live:
            job.future.set_result(results[start : start + len(job.images)])
            start += len(job.images)

    def _explain_alone(self, job: _Job) -> None:
        try:
            with stop_when(job.gone):
                results = self._explain(job.images, job.deadline)
        except BaseException as exc:  # noqa: BLE001 - the caller gets the error
            job.future.set_exception(exc)
            return
        self._on_batch(len(results))
        job.future.set_result(results)


def raise_in(jobs: Sequence[_Job], error: BaseException) -> None:
    """``error`` for every caller of ``jobs``."""
    for job in jobs:
        job.future.set_exception(error)


class BoundedExplainer:
    """Each caller's MPSs in its own engine call, at most ``workers`` at once; the others wait
    within their deadline.

    More at once than the cores can run only contend for them, and each holds its own model
    activations in the model runtime's memory arena, which never shrinks.
    """

    def __init__(
        self, explain: Callable[[np.ndarray, float | None], list[MpsResult]], *, workers: int
    ) -> None:
        self._explain = explain
        self._slots = threading.BoundedSemaphore(workers)

    def explain(self, images: np.ndarray, deadline: float | None = None) -> list[MpsResult]:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._slots.acquire(timeout=timeout):
            raise DeadlineExceededError("the deadline passed while waiting to compute the MPS")
        try:
            return self._explain(images, deadline)
        finally:
            self._slots.release()


class BackgroundQueue(Generic[T]):
    """A bounded queue drained in batches by one worker thread; ``submit`` never blocks."""

    def __init__(
        self,
        process: Callable[[Sequence[T]], None],
        *,
        capacity: int,
        max_batch: int,
        on_failure: Callable[[int], None] = lambda items: None,
    ) -> None:
        self._process = process
        self._max_batch = max_batch
        self._on_failure = on_failure
        self._queue: queue.Queue[object] = queue.Queue(maxsize=capacity)
        # Held while an item is queued and while closing starts, so that no item lands behind
        # the stop marker, where it would be neither checked nor counted as dropped.
        self._admission = threading.Lock()
        self._stopping = False
        self._marker_queued = False
        self._in_progress = 0
        self._worker = threading.Thread(target=self._run, name="guard-background", daemon=True)
        self._worker.start()

    def submit(self, item: T) -> bool:
        """Queue ``item``; False (and nothing queued) when the queue is full or closing."""
        with self._admission:
            if self._stopping:
                return False
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                return False
        return True

    def depth(self) -> int:
        """Items waiting (the stop marker is not one; it is the last entry ever queued)."""
        return max(0, self._queue.qsize() - int(self._marker_queued))

    def close(self, timeout: float | None = None) -> int:
        """Stop taking items, finish the queued ones within ``timeout``; how many were left."""
        with self._admission:
            self._stopping = True
        ends = None if timeout is None else time.monotonic() + timeout
        try:
            self._queue.put(_STOP, timeout=timeout)  # waits only while full and draining
        except queue.Full:
            return self._queue.qsize()
        self._marker_queued = True
        self._worker.join(None if ends is None else max(0.0, ends - time.monotonic()))
        return self.depth() if self._worker.is_alive() else 0

    def _process_isolating(self, batch: list[T]) -> None:
        """``process`` the batch; when one item's input fails it (``InvalidInputError``: its
        outputs overflow the model), each item alone, so that only that one is lost."""
        try:
            self._process(batch)
        except InvalidInputError as exc:
            if len(batch) == 1:
                log.warning("background check of 1 item refused: %s", exc)
                self._on_failure(1)
                return
            for item in batch:
                self._process_isolating([item])
        except Exception:  # noqa: BLE001 - a failed batch must not stop the worker
            log.exception("background check of %d item(s) failed", len(batch))
            self._on_failure(len(batch))

    def in_progress(self) -> int:
        """Items taken from the queue whose checks are being computed now."""
        return self._in_progress

    def _run(self) -> None:
        while True:
            batch: list[T] = []
            item = self._queue.get()
            stop = item is _STOP
            while not stop:
                batch.append(item)  # type: ignore[arg-type]
                if len(batch) >= self._max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                stop = item is _STOP
            if batch:
                self._in_progress = len(batch)
                try:
                    self._process_isolating(batch)
                finally:
                    self._in_progress = 0
            if stop:
                return
