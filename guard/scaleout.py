"""Offline runs across a Ray cluster: the items' MPSs on Ray workers, the rest on the driver.

``guard calibrate --ray`` and ``guard audit --ray`` hand a ``RayExecutor`` to the run
(guard.cached_run's ``Executor``). It starts a pool of Ray actors, each holding one model
session and engine, built once from the model file's bytes and the run's settings, which
travel once through the object store (``ray.put``), never with the items. The driver decodes
the items, sends each batch (the same batches a local run makes) to the least busy worker, at
most ``in_flight`` per worker, and appends each batch's records to the run's JSON-lines cache
as it completes; fitting, statistics and reports run on the driver as before. The engine is
deterministic per image and a worker explains exactly the batches a local run would, so the
records equal a local run's on the same hardware and packages (a worker on another build of
onnxruntime, or on a GPU, may round differently).

A worker that dies (its process killed, its node lost) is replaced by a new one in its place,
and each batch it held is sent again, up to ``max_retries`` times; deaths and retries are
counted for the report. Ray's own actor restarts and task retries are off (``max_restarts=0``,
``max_task_retries=0``) so that every failure is seen and counted here (and a new worker gets
its constructor's object refs from this driver, which holds them). An interrupted driver keeps the cache: the same
command resumes it, with or without Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from guard.cached_run import BatchRunner, MakeExplain, Outcomes, R, batch_outcomes
from guard.datasets import Item
from guard.engine import MpsEngine
from guard.errors import ConfigError, GuardError
from guard.runtime import MaskedClassifier
from guard.settings import EngineSettings, ModelOptions

log = logging.getLogger(__name__)

RAY_MISSING = "--ray needs Ray, which is not installed: pip install 'mps-guard[ray]'"
# Workers are named actors in this namespace (mps-guard-<run>-<model>-<index>), so that an
# operator (or a test) can find them in the cluster.
NAMESPACE = "mps-guard"
# Methods answered while a worker explains a batch (its info), on a thread of their own.
CONTROL = "control"


def guard_version() -> str:
    try:
        return importlib.metadata.version("mps-guard")
    except importlib.metadata.PackageNotFoundError:  # a source tree on the path, not installed
        return "unknown"


def import_ray() -> ModuleType:
    """Ray, or a ConfigError saying how to install it (the ``ray`` extra)."""
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide: the cluster, the workers and what each one asks of it."""

    # "local" (a cluster started on this machine for the run), "auto" (the cluster this
    # machine belongs to, or RAY_ADDRESS), "ray://head:10001" (Ray Client), "head:6379".
    address: str = "local"
    workers: int | None = None  # None: as many as the cluster's CPUs (GPUs) hold
    cpus_per_worker: float = 1.0  # also the worker's onnxruntime threads (at least 1)
    gpus_per_worker: float = 0.0
    in_flight: int = 2  # batches sent ahead to each worker, so it never waits for the driver
    max_retries: int = 3  # times one batch is sent again after its worker died

    def check(self) -> None:
        if not self.address.strip():
            raise ConfigError("--ray needs an address: local, auto, ray://HOST:10001 or HOST:PORT")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--ray-workers must be at least 1, not {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"--ray-cpus must be positive, not {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"--ray-gpus must not be negative, not {self.gpus_per_worker}")
        if self.in_flight < 1 or self.max_retries < 0:
            raise ConfigError("in_flight must be at least 1 and max_retries not negative")


@dataclass
class RayStats:
    """What the cluster did, for the report: workers (their info), batches and retries."""

    workers: list[dict[str, Any]] = field(default_factory=list)
    batches: int = 0
    items: int = 0
    worker_deaths: int = 0  # failures seen: a worker process that died (then restarted)
    retried_batches: int = 0
    retried_items: int = 0

    @property
    def nodes(self) -> int:
        return len({w["node_id"] for w in self.workers})

    def summary(self) -> list[str]:
        """Lines for the user: the pool, and the retries when there were any."""
        if not self.workers:
            return ["ray: nothing left to compute (every item was in the cache)"]
        nodes = self.nodes
        lines = [
            f"ray: {self.items} items in {self.batches} batches on {len(self.workers)} "
            f"worker{'s' if len(self.workers) != 1 else ''} ({nodes} node{'s' if nodes != 1 else ''})"
        ]
        if self.retried_batches:
            lines.append(
                f"ray: {self.worker_deaths} worker failure{'s' if self.worker_deaths != 1 else ''}; "
                f"{self.retried_batches} batch{'es' if self.retried_batches != 1 else ''} "
                f"({self.retried_items} items) sent again and completed"
            )
        return lines


@dataclass(frozen=True)
class WorkerRecipe:
    """What a worker builds its model runtime and explain function from (with the model's
    bytes): small, and put in the object store once per run."""

    model_name: str
    model_sha256: str
    model_options: ModelOptions
    engine_settings: EngineSettings
    make_explain: MakeExplain[Any]
    threads: int | None  # onnxruntime intra-op threads; None: its default (all cores)
    guard_version: str


class MpsWorker:
    """One Ray actor: one model session and engine, built once, then batch after batch."""

    def __init__(self, model_bytes: bytes, recipe: WorkerRecipe) -> None:
        import onnxruntime
        import ray

        with tempfile.TemporaryDirectory(prefix="mps-guard-") as directory:
            path = Path(directory) / recipe.model_name
            path.write_bytes(model_bytes)
            with session_threads(recipe.threads):
                classifier = MaskedClassifier(path, recipe.model_options)
        if classifier.sha256 != recipe.model_sha256:
            raise ConfigError("the model bytes a Ray worker received are not the driver's model")
        engine = MpsEngine(classifier, recipe.engine_settings)
        self._explain = recipe.make_explain(classifier, engine)
        self._info = {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "guard_version": guard_version(),
            "onnxruntime": onnxruntime.__version__,
            "provider": classifier.provider,
        }

    def info(self) -> dict[str, Any]:
        """Where the worker runs and what with (pid, node, versions, provider)."""
        return dict(self._info)

    def explain_batch(self, batch: list[Item]) -> Outcomes[Any]:
        return batch_outcomes(batch, self._explain)


@contextlib.contextmanager
def session_threads(threads: int | None) -> Iterator[None]:
    """onnxruntime sessions made inside use ``threads`` intra-op threads: a worker given one
    CPU of a node must not start a thread per core of it (each of the node's workers would).
    The runtime has no setting for it, so the session options are capped while the worker's
    classifier is built, in the worker's own process."""
    if threads is None:
        yield
        return
    import onnxruntime

    original = onnxruntime.SessionOptions

    def capped() -> Any:
        options = original()
        options.intra_op_num_threads = threads
        return options

    onnxruntime.SessionOptions = capped  # type: ignore[misc]
    try:
        yield
    finally:
        onnxruntime.SessionOptions = original  # type: ignore[misc]


@dataclass
class _Sent:
    batch: list[Item]
    worker: int  # its place in the pool
    actor: Any  # the worker's handle when the batch was sent (a replaced worker has a new one)
    attempt: int  # 0 the first time


class _Pool:
    """A run's workers: the least busy one takes the next batch; a dead one is replaced by a
    new one in its place (Ray's own restarts and task retries are off, so each is seen here)."""

    def __init__(self, ray: ModuleType, settings: RaySettings, shared: list[Any], name: str,
                 size: int) -> None:  # fmt: skip
        self.ray, self.settings, self.shared, self.name = ray, settings, shared, name
        self.actor_class = ray.remote(concurrency_groups={CONTROL: 1})(MpsWorker)
        self.generation = [0] * size
        self.actors = [self._start(i) for i in range(size)]
        self.load = [0] * size
        self.pending: dict[Any, _Sent] = {}

    def _start(self, worker: int) -> Any:
        return self.actor_class.options(
            name=f"{self.name}-{worker}.{self.generation[worker]}",
            namespace=NAMESPACE,
            num_cpus=self.settings.cpus_per_worker,
            num_gpus=self.settings.gpus_per_worker,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        ).remote(*self.shared)  # object refs: each worker fetches the model from the store

    def send(self, batch: list[Item], attempt: int) -> None:
        worker = min(range(len(self.actors)), key=self.load.__getitem__)
        actor = self.actors[worker]
        self.pending[actor.explain_batch.remote(batch)] = _Sent(batch, worker, actor, attempt)
        self.load[worker] += 1

    def take(self, ref: Any) -> _Sent:
        sent = self.pending.pop(ref)
        self.load[sent.worker] -= 1
        return sent

    def replace(self, worker: int, dead: Any) -> bool:
        """A new worker in place of ``dead``; False where that was done already (every batch
        a dead worker held fails, and the first failure replaces it)."""
        if self.actors[worker] is not dead:
            return False
        with contextlib.suppress(Exception):
            self.ray.kill(dead, no_restart=True)
        self.generation[worker] += 1
        self.actors[worker] = self._start(worker)
        return True

    def info(self, worker: int) -> Any:
        """The worker's info (an object ref), answered even while it explains a batch."""
        return self.actors[worker].info.options(concurrency_group=CONTROL).remote()

    def close(self) -> None:
        if not self.ray.is_initialized():  # disconnected already: the workers went with it
            return
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)


class RayExecutor:
    """Runs a cached run's batches on Ray workers (see the module's notes).

    A context manager: entering connects to the cluster (or starts a local one) unless Ray is
    already initialised in this process; leaving disconnects (and stops a cluster it started).

    >>> with RayExecutor(RaySettings("auto")) as executor:
    ...     run = run_items(data, classifier, engine, cache, executor=executor)
    >>> executor.stats.summary()
    """

    def __init__(self, settings: RaySettings | None = None) -> None:
        self.settings = settings or RaySettings()
        self.settings.check()
        self.stats = RayStats()
        self.run_id = uuid.uuid4().hex[:8]
        self._ray: ModuleType | None = None
        self._connected_here = False
        self._pools = 0

    # -- the cluster --------------------------------------------------------------------------

    def __enter__(self) -> RayExecutor:
        ray = import_ray()
        if not ray.is_initialized():
            local = self.settings.address == "local"
            # Ray's own messages stay quiet under the progress bar: failures arrive as errors.
            options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
            if local:
                options["include_dashboard"] = False
            try:
                ray.init(address=self.settings.address, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(
                    f"cannot connect to the Ray cluster at {self.settings.address!r}: {exc}"
                ) from None
            self._connected_here = True
        self._ray = ray
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._connected_here and self._ray is not None:
            self._ray.shutdown()
        self._ray = None
        self._connected_here = False

    def worker_count(self) -> int:
        """The workers asked for, or as many as the cluster's resources hold (at least one)."""
        if self.settings.workers is not None:
            return self.settings.workers
        resources = self._cluster().cluster_resources()
        if self.settings.gpus_per_worker > 0:
            fits = resources.get("GPU", 0) / self.settings.gpus_per_worker
        else:
            fits = resources.get("CPU", 0) / self.settings.cpus_per_worker
        return max(1, int(fits + 1e-9))

    def _cluster(self) -> ModuleType:
        if self._ray is None:
            raise RuntimeError("use the RayExecutor in a with block (it connects to the cluster)")
        return self._ray

    # -- guard.cached_run's Executor -------------------------------------------------------

    def __call__(
        self, make_explain: MakeExplain[R], classifier: MaskedClassifier, engine: MpsEngine
    ) -> BatchRunner[R]:
        def runner(batches: Iterator[list[Item]]) -> Iterator[Outcomes[R]]:
            return self._run(make_explain, classifier, engine, batches)

        return runner

    def _run(
        self,
        make_explain: MakeExplain[R],
        classifier: MaskedClassifier,
        engine: MpsEngine,
        batches: Iterator[list[Item]],
    ) -> Iterator[Outcomes[R]]:
        first = next(batches, None)
        if first is None:  # everything was in the cache: no worker is started
            return
        ray = self._cluster()
        shared = self._share(make_explain, classifier, engine)
        self._pools += 1
        pool = _Pool(ray, self.settings, shared, f"mps-guard-{self.run_id}-{self._pools}",
                     self.worker_count())  # fmt: skip
        try:
            yield from self._schedule(ray, pool, first, batches)
        finally:
            pool.close()

    def _share(
        self, make_explain: MakeExplain[Any], classifier: MaskedClassifier, engine: MpsEngine
    ) -> list[Any]:
        """The model's bytes and the workers' recipe, put in the object store once."""
        ray = self._cluster()
        model_bytes = classifier.path.read_bytes()
        if hashlib.sha256(model_bytes).hexdigest() != classifier.sha256:
            raise ConfigError(f"model file {classifier.path} changed while the run was starting")
        settings = self.settings
        threads = None if settings.gpus_per_worker > 0 else max(1, int(settings.cpus_per_worker))
        recipe = WorkerRecipe(
            model_name=classifier.path.name, model_sha256=classifier.sha256,
            model_options=classifier.options, engine_settings=engine.settings,
            make_explain=make_explain, threads=threads, guard_version=guard_version(),
        )  # fmt: skip
        return [ray.put(model_bytes), ray.put(recipe)]

    def _schedule(
        self, ray: ModuleType, pool: _Pool, first: list[Item], batches: Iterator[list[Item]]
    ) -> Iterator[Outcomes[Any]]:
        from ray.exceptions import ActorUnschedulableError, RayActorError, WorkerCrashedError

        def fill() -> None:
            while len(pool.pending) < self.settings.in_flight * len(pool.actors):
                batch = next(batches, None)
                if batch is None:
                    return
                pool.send(batch, 0)

        pool.send(first, 0)
        fill()
        self._check_workers(pool)
        while pool.pending:
            done, _ = ray.wait(list(pool.pending), num_returns=1, timeout=0.5)
            for ref in done:
                sent = pool.take(ref)
                try:
                    outcomes = ray.get(ref)
                except ActorUnschedulableError as exc:
                    raise ConfigError(f"the cluster cannot place a Ray worker: {exc}") from None
                except (RayActorError, WorkerCrashedError) as exc:
                    if getattr(exc, "actor_init_failed", False):
                        raise ConfigError(f"a Ray worker could not start: {_cause(exc)}") from None
                    self._retry(sent, exc)
                    if pool.replace(sent.worker, sent.actor):
                        self.stats.worker_deaths += 1
                    pool.send(sent.batch, sent.attempt + 1)
                    continue
                self.stats.batches += 1
                self.stats.items += len(outcomes)
                yield outcomes
            fill()

    def _retry(self, sent: _Sent, exc: Exception) -> None:
        """Count a batch sent again, or give up on it after ``max_retries``."""
        keys = [item.key for item in sent.batch]
        if sent.attempt >= self.settings.max_retries:
            shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            raise GuardError(
                f"a batch ({shown}) failed {sent.attempt + 1} times on Ray workers that died; "
                f"the last time: {_first_line(exc)}. Records so far are in the cache: run the "
                "same command again to resume"
            )
        self.stats.retried_batches += 1
        self.stats.retried_items += len(keys)
        log.warning(
            "Ray worker %d died (%s); sending its batch of %d items again (retry %d of %d)",
            sent.worker, _first_line(exc), len(keys), sent.attempt + 1, self.settings.max_retries,
        )  # fmt: skip

    def _check_workers(self, pool: _Pool) -> None:
        """Every worker's info, once it has loaded the model: a worker that cannot load it is
        fatal; one that died while starting is replaced and asked again."""
        from ray.exceptions import RayActorError

        workers = []
        for worker in range(len(pool.actors)):
            for attempt in range(self.settings.max_retries + 1):
                actor = pool.actors[worker]
                try:
                    workers.append(pool.ray.get(pool.info(worker)))
                    break
                except RayActorError as exc:
                    if exc.actor_init_failed or attempt == self.settings.max_retries:
                        raise ConfigError(f"a Ray worker could not start: {_cause(exc)}") from None
                    if pool.replace(worker, actor):
                        self.stats.worker_deaths += 1
        mine = guard_version()
        if other := {w["guard_version"] for w in workers} - {mine}:
            raise ConfigError(
                f"the Ray workers run mps-guard {', '.join(sorted(other))}, the driver {mine}: "
                "install the same version on the cluster (its image)"
            )
        self.stats.workers = workers


def _cause(exc: BaseException) -> str:
    """The last line of a worker's error: the exception its constructor raised, say."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
