"""Calibration throughput on this machine: local vs Ray (1 and 2 worker processes), and what
bounds a cluster run on the driver.

Measured, each on the same held-out digits of the demo model (``--items``, ``--iters``,
``--batch-items``), records checked equal to the local run's:

* ``local``: ``run_items`` in this process (onnxruntime on all cores), and ``local 1 thread``
  (onnxruntime on one thread, as in a Ray worker of one CPU).
* ``ray actors N``: ``run_items`` with ``guard.scaleout.RayExecutor`` on a local Ray cluster
  (``ray.init(address="local")``), N workers of one CPU each: what ``--ray`` runs. Wall time
  includes starting the workers (each loads the model); ``steady`` is the rate after the first
  batch.
* ``ray data N``: the same worker class as a Ray Data ``map_batches`` callable class
  (``concurrency=N``, ``num_cpus=1``, ``batch_size=--batch-items``), for comparison.
* the per-batch overhead Ray adds: a worker's round trip on batches whose items are all NaN
  (skipped without a model call: Ray's cost alone, moving the tensors and the outcomes), one
  batch at a time, less the same work done in this process.
* the driver's record-writing rate: outcomes of ``--driver-records`` items handed to
  ``run_cached`` as fast as it takes them (a JSON line per record, one write and fsync per
  batch), the most records per second a driver can absorb, whatever the cluster's size.

    python benchmarks/bench_ray.py [--items 64] [--iters 10] [--json benchmarks/results/ray.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guard import demo  # noqa: E402
from guard.cached_run import CachedRun, batch_outcomes, run_cached  # noqa: E402
from guard.calibration.records import ItemRecord  # noqa: E402
from guard.calibration.run import explainer, run_items  # noqa: E402
from guard.datasets import Item, LabelledData, open_labelled_data  # noqa: E402
from guard.engine import MpsEngine  # noqa: E402
from guard.preprocess import Preprocessing  # noqa: E402
from guard.runtime import MaskedClassifier  # noqa: E402
from guard.scaleout import (  # noqa: E402
    MpsWorker,
    RayExecutor,
    RaySettings,
    WorkerRecipe,
    guard_version,
    session_threads,
)
from guard.settings import EngineSettings  # noqa: E402


@dataclass
class Row:
    mode: str
    workers: int
    items: int
    seconds: float
    items_per_s: float
    steady_items_per_s: float | None  # after the first batch (workers started)
    equal_to_local: bool | None


def _data(
    items: int, directory: Path, classifier: MaskedClassifier, nan: bool = False
) -> LabelledData:
    with np.load(demo.DEMO_HELDOUT, allow_pickle=False) as archive:
        x, y = archive["x"][:items].copy(), archive["y"][:items]
    if nan:
        x[:] = np.nan
    path = directory / f"digits{items}{'-nan' if nan else ''}.npz"
    np.savez(path, x=x, y=y)
    return open_labelled_data(
        path, classifier.spec, Preprocessing.from_file(demo.DEMO_PREPROCESSING)
    )


class _Clock:
    """Times a run's batches as they complete: the first one, and the whole run."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.first_items = 0

    def __call__(self, done: int) -> None:
        if self.first is None:
            self.first, self.first_items = time.perf_counter(), done

    def steady(self, items: int) -> float | None:
        if self.first is None or items <= self.first_items:
            return None
        return (items - self.first_items) / (time.perf_counter() - self.first)


def _timed(
    label: str, workers: int, run: Any, local: CachedRun[ItemRecord] | None
) -> tuple[Row, CachedRun[ItemRecord]]:
    clock = _Clock()
    result = run(clock)
    seconds = time.perf_counter() - clock.start
    items = len(result.records) + len(result.skipped)
    equal = None if local is None else result.records == local.records
    row = Row(label, workers, items, seconds, items / seconds, clock.steady(items), equal)
    steady = f"{row.steady_items_per_s:.2f}" if row.steady_items_per_s else "-"
    print(f"{label:<14} {workers:>7} {items:>5} {seconds:>8.2f} {row.items_per_s:>8.2f} "
          f"{steady:>8} {'' if equal is None else equal}", flush=True)  # fmt: skip
    return row, result


def _ray_data(data: LabelledData, classifier: MaskedClassifier, engine: MpsEngine,
              workers: int, batch_items: int) -> tuple[float, list[str]]:  # fmt: skip
    """Seconds and record lines of the same run as a Ray Data pipeline of MpsWorker actors."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    recipe = WorkerRecipe(classifier.path.name, classifier.sha256, classifier.options,
                          engine.settings, partial(explainer, stability=False), 1,
                          guard_version())  # fmt: skip
    model_ref, recipe_ref = ray.put(classifier.path.read_bytes()), ray.put(recipe)

    class Explain:  # a Ray Data callable class: one model session per actor, as MpsWorker
        def __init__(self) -> None:
            self.worker = MpsWorker(ray.get(model_ref), ray.get(recipe_ref))

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            items = [Item(str(k), int(label), tensor=t)
                     for k, label, t in zip(batch["key"], batch["label"], batch["tensor"], strict=True)]  # fmt: skip
            lines = [o.to_json_line() if not isinstance(o, str) else o
                     for _, o in self.worker.explain_batch(items)]  # fmt: skip
            return {"line": np.array(lines, dtype=object)}

    start = time.perf_counter()
    rows = [{"key": i.key, "label": i.label, "tensor": i.tensor} for i in data.items()]
    dataset = ray.data.from_items(rows).map_batches(
        Explain, batch_size=batch_items, num_cpus=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
    )  # fmt: skip
    lines = [row["line"] for row in dataset.iter_rows()]
    return time.perf_counter() - start, lines


def _driver_rate(records: list[ItemRecord], count: int, batch_items: int, directory: Path) -> float:
    """Records per second run_cached writes when the outcomes arrive as fast as it takes them."""
    keys = [f"item{i}" for i in range(count)]
    copies = [replace(records[i % len(records)], key=key) for i, key in enumerate(keys)]
    data = LabelledData(directory, ["x"], keys, [0] * count, None, None)  # type: ignore[arg-type]

    def runner(batches: Any) -> Any:
        for batch in batches:
            yield [(item.key, copies[int(item.key[4:])]) for item in batch]

    data.items = lambda skip=None: (Item(k, 0) for k in keys)  # type: ignore[method-assign]
    cache = directory / "driver.jsonl"
    start = time.perf_counter()
    run_cached(data, cache, {"bench": 1}, lambda items: [], ItemRecord.from_json_line,
               batch_items=batch_items, restart=True, runner=runner)  # fmt: skip
    return count / (time.perf_counter() - start)


def _round_trip_ms(
    directory: Path, classifier: MaskedClassifier, engine: MpsEngine, args: argparse.Namespace
) -> float:
    """Ray's cost of one batch, in ms: a worker's round trip (send the batch's tensors, get its
    outcomes back) on batches of NaN items, which it skips without a model call, less the same
    work done here; one batch at a time, so none of it is hidden behind other batches."""
    import ray

    empty = list(_data(args.batch_items, directory, classifier, nan=True).items())
    recipe = WorkerRecipe(classifier.path.name, classifier.sha256, classifier.options,
                          engine.settings, partial(explainer, stability=False), 1,
                          guard_version())  # fmt: skip
    worker = ray.remote(num_cpus=1)(MpsWorker).remote(
        ray.put(classifier.path.read_bytes()), ray.put(recipe)
    )
    ray.get(worker.info.remote())
    explain = explainer(classifier, engine, stability=False)
    start = time.perf_counter()
    for _ in range(args.overhead_batches):
        batch_outcomes(empty, explain)
    here = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.overhead_batches):
        ray.get(worker.explain_batch.remote(empty))
    there = time.perf_counter() - start
    ray.kill(worker)
    return (there - here) / args.overhead_batches * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch-items", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--overhead-batches", type=int, default=300)
    parser.add_argument("--driver-records", type=int, default=20000)
    parser.add_argument("--skip-ray-data", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import ray

    classifier = MaskedClassifier(demo.DEMO_MODEL)
    engine = MpsEngine(classifier, EngineSettings(iters=args.iters))
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        data = _data(args.items, directory, classifier)
        print(
            f"{'mode':<14} {'workers':>7} {'items':>5} {'seconds':>8} {'items/s':>8} {'steady':>8} equal"
        )
        rows: list[Row] = []
        row, local = _timed("local", 1, lambda clock: run_items(
            data, classifier, engine, directory / "local.jsonl", batch_items=args.batch_items,
            restart=True, on_progress=clock), None)  # fmt: skip
        rows.append(row)
        with session_threads(1):  # what one Ray worker of one CPU runs
            single = MaskedClassifier(demo.DEMO_MODEL)
        single_engine = MpsEngine(single, engine.settings)
        row, _ = _timed("local 1 thread", 1, lambda clock: run_items(
            data, single, single_engine, directory / "single.jsonl",
            batch_items=args.batch_items, restart=True, on_progress=clock), local)  # fmt: skip
        rows.append(row)

        started = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)  # fmt: skip
        ray_start = time.perf_counter() - started
        try:
            for workers in args.workers:
                with RayExecutor(RaySettings(workers=workers)) as executor:
                    row, _ = _timed("ray actors", workers, lambda clock, e=executor: run_items(
                        data, classifier, engine, directory / "ray.jsonl",
                        batch_items=args.batch_items, restart=True, on_progress=clock,
                        executor=e), local)  # fmt: skip
                rows.append(row)
            if not args.skip_ray_data:
                local_lines = sorted(r.to_json_line() for r in local.records)
                for workers in args.workers:
                    seconds, lines = _ray_data(data, classifier, engine, workers, args.batch_items)
                    equal = sorted(lines) == local_lines
                    rows.append(
                        Row(
                            "ray data",
                            workers,
                            len(lines),
                            seconds,
                            len(lines) / seconds,
                            None,
                            equal,
                        )
                    )
                    print(f"{'ray data':<14} {workers:>7} {len(lines):>5} {seconds:>8.2f} "
                          f"{len(lines) / seconds:>8.2f} {'-':>8} {equal}", flush=True)  # fmt: skip

            per_batch_ms = _round_trip_ms(directory, classifier, engine, args)
        finally:
            ray.shutdown()
        driver_rate = _driver_rate(local.records, args.driver_records, args.batch_items, directory)

    local_rate = rows[0].items_per_s
    print(f"\nRay start (local cluster): {ray_start:.1f} s")
    print(f"Ray's overhead: {per_batch_ms:.1f} ms per batch of {args.batch_items} items "
          f"({per_batch_ms / args.batch_items:.2f} ms per item; an item's MPS here: "
          f"{1000 / local_rate:.0f} ms at {args.iters} iterations on all cores)")  # fmt: skip
    print(f"driver: {driver_rate:,.0f} records/s written to the cache "
          f"(batches of {args.batch_items}, one fsync each)")  # fmt: skip
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},
        "settings": {"items": args.items, "iters": args.iters, "batch_items": args.batch_items},
        "rows": [asdict(r) for r in rows],
        "ray_start_s": ray_start,
        "ray_overhead_ms_per_batch": per_batch_ms,
        "ray_overhead_ms_per_item": per_batch_ms / args.batch_items,
        "driver_records_per_s": driver_rate,
    }  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
