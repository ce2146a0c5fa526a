"""Pieces of the data plane on their own: the drift statistic and the work queues."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from scipy import stats

from guard.errors import DeadlineExceededError, UnavailableError
from guard.service.batching import BackgroundQueue, BoundedExplainer, SharedExplainer
from guard.service.drift import DriftMonitor, ks_distance
from tests.serving import wait_for


@pytest.mark.parametrize("seed", range(5))
def test_ks_distance_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.beta(2, 5, size=rng.integers(5, 300))
    b = np.round(rng.beta(2, 3, size=rng.integers(5, 300)), 2)  # ties, as MPS areas have
    assert ks_distance(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic)
    assert ks_distance(a, a) == 0


def test_drift_monitor_keeps_a_window_of_recent_areas() -> None:
    reference = np.linspace(0.0, 0.2, 101)
    monitor = DriftMonitor(reference, window=50)
    assert monitor.distance() == 0 and monitor.items() == 0
    monitor.add(np.full(50, 0.9))  # nothing like the reference
    assert monitor.distance() == 1
    monitor.add(np.linspace(0.0, 0.2, 50))  # the window now holds only reference-like areas
    assert monitor.items() == 50
    assert monitor.distance() < 0.05


class _Recorder:
    """A stand-in explain function that records the batches it is given (engine tested elsewhere)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay = delay

    def __call__(self, images: np.ndarray, deadline: float | None = None) -> list[float]:
        time.sleep(self.delay)
        self.batches.append(len(images))
        return [float(image.sum()) for image in images]


def test_shared_explainer_batches_concurrent_callers_and_returns_each_its_own() -> None:
    recorder = _Recorder()
    shared = SharedExplainer(recorder, max_items=6, max_wait=1.0)  # type: ignore[arg-type]
    barrier = threading.Barrier(4)
    answers: dict[int, list[float]] = {}

    def call(i: int) -> None:
        barrier.wait()
        answers[i] = shared.explain(np.full((2 if i else 1, 3), float(i)))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared.close(timeout=5)
    assert answers == {0: [0.0], 1: [3.0, 3.0], 2: [6.0, 6.0], 3: [9.0, 9.0]}
    assert sum(recorder.batches) == 7 and max(recorder.batches) <= 6 and len(recorder.batches) == 2


def test_shared_explainer_gives_up_at_the_deadline() -> None:
    shared = SharedExplainer(_Recorder(delay=0.5), max_items=4, max_wait=0.0)  # type: ignore[arg-type]
    with pytest.raises(DeadlineExceededError):
        shared.explain(np.zeros((1, 3)), deadline=time.monotonic() + 0.05)
    assert shared.explain(np.ones((1, 3))) == [3.0]
    shared.close(timeout=5)


def test_bounded_explainer_runs_at_most_workers_at_once_and_waits_within_the_deadline() -> None:
    lock, running, peak = threading.Lock(), [0], [0]

    def explain(images: np.ndarray, deadline: float | None) -> list[float]:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return [float(image.sum()) for image in images]

    bounded = BoundedExplainer(explain, workers=2)  # type: ignore[arg-type]
    answers: dict[int, list[float]] = {}
    threads = [
        threading.Thread(
            target=lambda i=i: answers.update({i: bounded.explain(np.full((1, 2), i))})
        )
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {i: [2.0 * i] for i in range(8)} and peak[0] == 2

    entered, release = threading.Event(), threading.Event()

    def hold(images: np.ndarray, deadline: float | None) -> list[float]:
        entered.set()
        release.wait(10)
        return [0.0]

    busy = BoundedExplainer(hold, workers=1)  # type: ignore[arg-type]
    holder = threading.Thread(target=busy.explain, args=(np.zeros((1, 2)),))
    holder.start()
    assert entered.wait(10)
    with pytest.raises(DeadlineExceededError, match="waiting"):
        busy.explain(np.zeros((1, 2)), deadline=time.monotonic() + 0.05)
    release.set()
    holder.join()


def test_background_queue_never_blocks_and_drains_on_close() -> None:
    done: list[int] = []
    release = threading.Event()

    def process(batch: list[int]) -> None:
        release.wait(5)
        done.extend(batch)

    queue = BackgroundQueue(process, capacity=2, max_batch=10)
    accepted = [queue.submit(i) for i in range(6)]
    # the worker holds at most one item, the queue two more: the rest are refused at once
    assert 2 <= sum(accepted) <= 3 and not all(accepted)
    release.set()
    assert queue.close(timeout=5) == 0
    assert sorted(done) == [i for i, ok in enumerate(accepted) if ok]
    assert not queue.submit(99)


def test_background_queue_counts_failed_batches_and_reports_its_depth() -> None:
    failed: list[int] = []
    release = threading.Event()

    def process(batch: list[int]) -> None:
        release.wait(5)
        raise RuntimeError("model fault")

    queue = BackgroundQueue(process, capacity=4, max_batch=1, on_failure=failed.append)
    assert all(queue.submit(i) for i in range(3))
    wait_for(lambda: queue.depth() == 2, what="the worker to take one item")
    release.set()
    assert queue.close(timeout=5) == 0
    assert failed == [1, 1, 1] and queue.depth() == 0


def test_shared_batches_run_until_the_last_callers_deadline_and_refuse_work_after_close() -> None:
    deadlines: list[float | None] = []

    def explain(images: np.ndarray, deadline: float | None) -> list[float]:
        deadlines.append(deadline)
        return [0.0] * len(images)

    shared = SharedExplainer(explain, max_items=4, max_wait=0.0)  # type: ignore[arg-type]
    later = time.monotonic() + 30
    shared.explain(np.zeros((1, 2)), deadline=later)
    shared.explain(np.zeros((1, 2)))
    assert deadlines == [later, None]
    shared.close(timeout=5)
    with pytest.raises(UnavailableError):
        shared.explain(np.zeros((1, 2)))
