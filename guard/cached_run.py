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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TextIO, TypeVar

import numpy as np

from guard.datasets import Item, LabelledData
from guard.engine import MpsEngine
from guard.errors import ConfigError, GuardError
from guard.runtime import MaskedClassifier

CACHE_FORMAT = 1


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
# (decoded, finite items of one batch) -> one record per item; GuardError: a batch-level problem
Explain = Callable[[list[Item]], list[R]]


def _read_cache(
    cache: Path, expected: dict[str, Any], parse: Callable[[str], R]
) -> tuple[list[R], list[tuple[str, str]]]:
    lines = cache.read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if header != {"fingerprint": expected}:
        raise ConfigError(
            f"cache {cache} was made with other settings, model or data; "
            "delete it or pass --restart to start over"
        )
    records, skipped = [], []
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption: that item is simply redone
        if "skipped" in entry:
            skipped.append((entry["key"], entry["skipped"]))
        else:
            records.append(parse(line))
    return records, skipped


@dataclass
class CachedRun(Generic[R]):
    """The records of a run in data order, the items skipped and why."""

    records: list[R]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    resumed: int = 0  # items taken from the cache


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
) -> CachedRun[R]:
    """Compute (or take from the JSON-lines cache) one record per item, in data order.

    The cache's first line is ``expected`` (the fingerprint); a cache with another one is
    refused. Unreadable or non-finite items, and batches the model rejects, are skipped and
    cached as such, so a resumed run does not retry them.
    """
    records: list[R] = []
    skipped: list[tuple[str, str]] = []
    if cache.exists() and not restart:
        records, skipped = _read_cache(cache, expected, parse)
    else:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"fingerprint": expected}) + "\n")
    done = {r.key for r in records} | {key for key, _ in skipped}
    result = CachedRun(records, skipped, resumed=len(done))
    if on_progress and done:
        on_progress(len(done))

    with cache.open("a") as handle:
        batch: list[Item] = []
        for item in data.items(skip=done):
            batch.append(item)
            if len(batch) == batch_items:
                _process(batch, explain, result, handle, on_progress)
                batch = []
        if batch:
            _process(batch, explain, result, handle, on_progress)
    order = {key: i for i, key in enumerate(data.keys)}
    result.records.sort(key=lambda r: order[r.key])
    return result


def _process(
    batch: list[Item],
    explain: Explain[R],
    result: CachedRun[R],
    handle: TextIO,
    on_progress: Callable[[int], None] | None,
) -> None:
    lines = []
    good = []
    for item in batch:
        if item.tensor is not None and np.isfinite(item.tensor).all():
            good.append(item)
        else:
            reason = item.error or f"{item.key}: input contains NaN or Inf values"
            result.skipped.append((item.key, reason))
            lines.append(json.dumps({"key": item.key, "skipped": reason}))
    if good:
        try:
            records = explain(good)
        except GuardError as exc:  # a batch-level input problem: record it per item
            for item in good:
                result.skipped.append((item.key, str(exc)))
                lines.append(json.dumps({"key": item.key, "skipped": str(exc)}))
            records = []
        for record in records:
            result.records.append(record)
            lines.append(record.to_json_line())
    handle.write("".join(line + "\n" for line in lines))
    handle.flush()
    if on_progress:
        on_progress(len(batch))
