"""Resumable offline runs: one record per labelled item, cached as JSON lines.

Results go to a JSON-lines cache next to the output as they are computed, so an interrupted
run resumes where it stopped. The cache's first line fingerprints everything that shapes the
results (model hash, engine settings, preprocessing, data); a cache made differently is never
mixed in. Each image's MPS depends only on the image and the settings (the runs' random
streams are fixed per run index), so a resumed run gives the same records as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from guard.datasets import Item, LabelledData
from guard.engine import MpsEngine
from guard.errors import ConfigError, GuardError
from guard.runtime import MaskedClassifier

CACHE_FORMAT = 1
log = logging.getLogger(__name__)


def fingerprint(
    classifier: MaskedClassifier, engine: MpsEngine, data: LabelledData
) -> dict[str, Any]:
    return {
        "cache_format": CACHE_FORMAT,
        "model_sha256": classifier.sha256,
        "engine": engine.settings.model_dump(mode="json"),
        "preprocessing": data.preprocessing.model_dump(mode="json"),
        "data": str(data.source.resolve()),
        "items": len(data),
    }


class CachedRecord(Protocol):
    """What the cached run needs of a per-item record."""

    key: str

    def to_json_line(self) -> str: ...


R = TypeVar("R", bound=CachedRecord)
# (decoded, finite items of one batch) -> one record per item, in order; a GuardError refuses
# the batch (its items are then tried one by one)
Explain = Callable[[list[Item]], list[R]]
# One outcome per item of a batch: (key, record), or (key, reason) for an item skipped
# (unreadable, non-finite, or refused by the model).
Outcomes = list[tuple[str, R | str]]
# Where the batches are explained, when not here (guard.scaleout: on Ray workers): the batches
# in data order, each batch's outcomes back as it completes, in any order.
BatchRunner = Callable[[Iterator[list[Item]]], Iterable[Outcomes[R]]]
# Builds a run's explain function from a model runtime. A module-level function (or a
# functools.partial of one, with picklable arguments), so that a remote worker builds, from
# its own copy of the model, the same function as the driver.
MakeExplain = Callable[[MaskedClassifier, MpsEngine], Explain[R]]


class Executor(Protocol):
    """Explains a run's batches elsewhere: given ``make_explain`` and the driver's model
    runtime (the model file and the engine settings to copy), the runner of the run's batches."""

    def __call__(
        self, make_explain: MakeExplain[R], classifier: MaskedClassifier, engine: MpsEngine
    ) -> BatchRunner[R]: ...


def _read_cache(
    cache: Path, expected: dict[str, Any], parse: Callable[[str], R]
) -> tuple[list[R], list[tuple[str, str]], list[str]]:
    """The records and skipped items of a cache, and notes on what was repaired.

    A trailing line without its newline was cut short by an interruption: it is dropped (the
    file is truncated after the last complete line), so new records start on a line of their
    own. An empty cache, or one whose first line is not a whole fingerprint, is damaged.
    """
    data = cache.read_bytes()
    first, newline, rest = data.partition(b"\n")
    try:
        header = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("fingerprint"), dict):
        what = "empty" if not data.strip() else "its first line is not a whole fingerprint"
        raise ConfigError(
            f"cache {cache} is damaged ({what}); pass --restart to start over, or delete it"
        )
    if header != {"fingerprint": expected}:
        raise ConfigError(
            f"cache {cache} was made with other settings, model or data; "
            "delete it or pass --restart to start over"
        )
    notes = []
    if not newline:  # a whole header whose newline was never written
        _append(cache, b"\n")
    elif rest and not rest.endswith(b"\n"):
        complete = len(first) + 1 + rest.rfind(b"\n") + 1
        with cache.open("r+b") as handle:
            handle.truncate(complete)
        rest = rest[: complete - len(first) - 1]
        notes.append(
            f"cache {cache}: its last line was cut short (an interrupted write) and was "
            "dropped; that item is computed again"
        )
    found: dict[str, R | str] = {}
    unreadable = 0
    for line in rest.decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            if "skipped" in entry:
                found[str(entry["key"])] = str(entry["skipped"])
            else:
                record = parse(line)
                found[record.key] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            unreadable += 1  # that item is simply computed again
    if unreadable:
        notes.append(
            f"cache {cache}: {unreadable} unreadable line(s) ignored; their items are "
            "computed again"
        )
    records = [entry for entry in found.values() if not isinstance(entry, str)]
    skipped = [(key, entry) for key, entry in found.items() if isinstance(entry, str)]
    return records, skipped, notes


def _append(cache: Path, data: bytes) -> None:
    """Append whole lines in one write, flushed to disk: an interruption leaves either all
    of them or a cut-short last line, which the next run drops."""
    descriptor = os.open(cache, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _start(cache: Path, expected: dict[str, Any]) -> None:
    """A new cache holding the fingerprint line only, put in place whole (never half)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(cache.name + ".partial")
    with partial.open("wb") as handle:
        handle.write((json.dumps({"fingerprint": expected}) + "\n").encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, cache)


@dataclass
class CachedRun(Generic[R]):
    """The records of a run in data order, the items skipped and why, and notes on the cache
    (a repaired interruption) for the user."""

    records: list[R]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason without key)
    resumed: int = 0  # items taken from the cache
    notes: list[str] = field(default_factory=list)


def run_cached(
    data: LabelledData,
    cache: Path,
    expected: dict[str, Any],
    explain: Explain[R],
    parse: Callable[[str], R],
    *,
    batch_items: int = 8,
    restart: bool = False,
    on_progress: Callable[[int], None] | None = None,
    runner: BatchRunner[R] | None = None,
) -> CachedRun[R]:
    """Compute (or take from the JSON-lines cache) one record per item, in data order.

    The cache's first line is ``expected`` (the fingerprint); a cache with another one is
    refused, and so is a damaged one (empty, or a header cut short). A last line cut short by
    an interruption is dropped and its item computed again (``notes`` says so). Unreadable or
    non-finite items, and items the model rejects (``GuardError``), are skipped and cached as
    such, so a resumed run does not retry them; when a batch fails, its items are retried one
    by one so that only the bad ones are skipped. ``runner`` explains the batches elsewhere
    (the same outcomes, from the same batches); records are still written here, as each batch
    completes.
    """
    records: list[R] = []
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    if cache.exists() and not restart:
        records, skipped, notes = _read_cache(cache, expected, parse)
        for note in notes:
            log.warning("%s", note)
    else:
        _start(cache, expected)
    done = {r.key for r in records} | {key for key, _ in skipped}
    result = CachedRun(records, skipped, resumed=len(done), notes=notes)
    if on_progress and done:
        on_progress(len(done))

    batches = _batches(data.items(skip=done), batch_items)
    if runner is None:
        completed: Iterable[Outcomes[R]] = (batch_outcomes(b, explain) for b in batches)
    else:
        completed = runner(batches)
    try:
        for outcomes in completed:
            _record(outcomes, result, cache, on_progress)
    finally:  # an interruption stops the runner's work now (a generator's cleanup runs)
        if isinstance(completed, Generator):
            completed.close()
    order = {key: i for i, key in enumerate(data.keys)}
    result.records.sort(key=lambda r: order[r.key])
    result.skipped.sort(key=lambda s: order.get(s[0], len(order)))
    return result


def _batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def batch_outcomes(batch: list[Item], explain: Explain[R]) -> Outcomes[R]:
    """The outcome of every item of a batch, in its order: unreadable and non-finite items are
    skipped, the others explained together (one by one where ``explain`` refuses them)."""
    outcomes: dict[str, R | str] = {}
    good = []
    for item in batch:
        if item.tensor is not None and np.isfinite(item.tensor).all():
            good.append(item)
        else:  # the reason alone: lists show it after the key
            outcomes[item.key] = item.error or "input contains NaN or Inf values"
    outcomes.update(_explain_isolating(good, explain))
    return [(item.key, outcomes[item.key]) for item in batch]


def _record(
    outcomes: Outcomes[R],
    result: CachedRun[R],
    cache: Path,
    on_progress: Callable[[int], None] | None,
) -> None:
    lines = []
    for key, outcome in outcomes:
        if isinstance(outcome, str):
            result.skipped.append((key, outcome))
            lines.append(json.dumps({"key": key, "skipped": outcome}))
        else:
            result.records.append(outcome)
            lines.append(outcome.to_json_line())
    if lines:
        _append(cache, "".join(line + "\n" for line in lines).encode())
    if on_progress:
        on_progress(len(outcomes))


def _explain_isolating(items: list[Item], explain: Explain[R]) -> list[tuple[str, R | str]]:
    """(key, record) per item, or (key, reason) for those ``explain`` refuses: when the
    batch fails with a ``GuardError``, each item is tried alone, so one bad item (an input the
    model gives non-finite outputs for, say) does not cost its neighbours."""
    if not items:
        return []
    try:
        return [(record.key, record) for record in explain(items)]
    except GuardError as exc:
        if len(items) == 1:
            return [(items[0].key, str(exc))]
    outcomes: list[tuple[str, R | str]] = []
    for item in items:
        outcomes.extend(_explain_isolating([item], explain))
    return outcomes
