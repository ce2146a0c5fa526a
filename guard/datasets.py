"""Labelled data for offline work (calibration, audits): ImageFolder, CSV manifest or .npz.

Items are decoded lazily, one at a time, with the same preprocessing as ``guard explain``.
An unreadable item is not fatal: it is yielded as a failure so the caller can skip, count
and list it. Problems with the data set as a whole (empty, unknown labels, wrong tensor
shape, labels that do not fit the model) raise ``ConfigError`` with a clear message.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard.errors import ConfigError, GuardError
from guard.preprocess import Preprocessing, read_input
from guard.runtime.spec import ModelSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy"}


@dataclass(frozen=True)
class Item:
    """One labelled input: ``tensor`` in the model's layout, or ``error`` if unreadable (the
    reason only: lists show it after the key)."""

    key: str
    label: int
    tensor: np.ndarray | None = None
    error: str | None = None


@dataclass
class LabelledData:
    """A labelled data set bound to a model's input spec and preprocessing."""

    source: Path
    class_names: list[str]
    keys: list[str]
    labels: list[int]
    spec: ModelSpec
    preprocessing: Preprocessing
    _paths: list[Path] | None = None
    _tensors: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def items(self, skip: set[str] | None = None) -> Iterator[Item]:
        """Items in order, decoded on demand; keys in ``skip`` are passed over undecoded."""
        for i, (key, label) in enumerate(zip(self.keys, self.labels, strict=True)):
            if skip and key in skip:
                continue
            if self._tensors is not None:
                yield Item(key, label, tensor=self._tensors[i])
                continue
            assert self._paths is not None
            try:
                tensor = read_input(self._paths[i], self.spec, self.preprocessing)
            except GuardError as exc:  # the message names no file: callers list it by key
                yield Item(key, label, error=str(exc))
            else:
                yield Item(key, label, tensor=tensor)


def read_class_names(path: Path) -> list[str]:
    """A labels file: a JSON list of names, or one name per line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read labels file {path}: {exc}") from exc
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise ConfigError(f"labels file {path} must be a JSON list of names or one name per line")
    return names


def open_labelled_data(
    source: Path,
    spec: ModelSpec,
    preprocessing: Preprocessing,
    class_names: list[str] | None = None,
    num_classes: int | None = None,
) -> LabelledData:
    """Open an ImageFolder directory, a ``path,label`` CSV manifest, or an .npz with x and y."""
    if not source.exists():
        raise ConfigError(f"data {source} does not exist")
    if source.is_dir():
        data = _image_folder(source, spec, preprocessing, class_names)
    elif source.suffix.lower() == ".csv":
        data = _manifest(source, spec, preprocessing, class_names)
    elif source.suffix.lower() == ".npz":
        data = _npz(source, spec, preprocessing, class_names)
    else:
        raise ConfigError(
            f"data {source}: expected a folder (one subfolder per class), a .csv or an .npz"
        )
    if not len(data):
        raise ConfigError(f"data {source} holds no items")
    classes = num_classes or spec.num_classes
    if classes and len(data.class_names) != classes:
        raise ConfigError(
            f"data {source} has {len(data.class_names)} classes ({', '.join(data.class_names[:5])}"
            f"{', ...' if len(data.class_names) > 5 else ''}); the model has {classes} outputs"
        )
    return data


def _image_folder(
    root: Path, spec: ModelSpec, preprocessing: Preprocessing, class_names: list[str] | None
) -> LabelledData:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConfigError(
            f"data folder {root} has no class subfolders (expected one folder per class)"
        )
    names = class_names or [folder.name for folder in folders]
    unknown = [f.name for f in folders if f.name not in names]
    if unknown:
        raise ConfigError(f"data folder {root}: subfolders {unknown} are not among the class names")
    keys, labels, paths = [], [], []
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                keys.append(str(path.relative_to(root)))
                labels.append(names.index(folder.name))
                paths.append(path)
    return LabelledData(root, names, keys, labels, spec, preprocessing, _paths=paths)


def _manifest(
    path: Path, spec: ModelSpec, preprocessing: Preprocessing, class_names: list[str] | None
) -> LabelledData:
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc}") from exc
    if rows and not {"path", "label"} <= set(rows[0]):
        raise ConfigError(f"manifest {path} needs a header with columns path,label")
    for line, row in enumerate(rows, start=2):
        if not (row.get("path") or "").strip() or not (row.get("label") or "").strip():
            raise ConfigError(f"manifest {path}, line {line}: needs both a path and a label")
    raw = [row["label"].strip() for row in rows]
    if class_names is None:
        if all(label.lstrip("-").isdigit() for label in raw):
            top = max((int(label) for label in raw), default=-1)
            class_names = [str(i) for i in range(max(top + 1, spec.num_classes))]
        else:
            class_names = sorted(set(raw))
    labels = []
    for line, label in enumerate(raw, start=2):
        if label in class_names:
            labels.append(class_names.index(label))
        elif label.lstrip("-").isdigit() and 0 <= int(label) < len(class_names):
            labels.append(int(label))
        else:
            raise ConfigError(f"manifest {path}, line {line}: unknown label {label!r}")
    paths = [(path.parent / row["path"].strip()) for row in rows]
    keys = [row["path"].strip() for row in rows]
    return LabelledData(path, class_names, keys, labels, spec, preprocessing, _paths=paths)


def _npz(
    path: Path, spec: ModelSpec, preprocessing: Preprocessing, class_names: list[str] | None
) -> LabelledData:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise ConfigError(f"{path} must hold arrays 'x' (inputs) and 'y' (labels)")
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if x.ndim != 4 or x.shape[1:] != spec.input_shape:
        raise ConfigError(
            f"{path}: x has shape {list(x.shape)}, expected [N, {', '.join(map(str, spec.input_shape))}] "
            f"({spec.layout}, preprocessed)"
        )
    if not len(x):
        raise ConfigError(f"data {path} holds no items")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(
            f"{path}: y must be {len(x)} integer labels, got {y.dtype} {list(y.shape)}"
        )
    names = class_names or [str(i) for i in range(max(int(y.max()) + 1, spec.num_classes))]
    if y.min() < 0 or y.max() >= len(names):
        raise ConfigError(
            f"{path}: labels must lie in 0..{len(names) - 1}, found {y.min()}..{y.max()}"
        )
    keys = [f"npz:{i}" for i in range(len(x))]
    return LabelledData(
        path,
        names,
        keys,
        y.astype(int).tolist(),
        spec,
        preprocessing,
        _tensors=x.astype(spec.dtype),
    )
