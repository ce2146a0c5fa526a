"""Ground-truth object masks for an audit: an array in an .npz, or a folder mirroring the images.

Masks are boolean H x W at the images' own resolution (resized to each model's input by
nearest neighbour). Every item must have one: a partial set of masks would make the
localisation figures of different models rest on different images, so it is refused with
the missing items named.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from guard.audit.localisation import resize_mask
from guard.errors import ConfigError

MASK_SUFFIXES = (".png", ".npy", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class GroundTruth:
    """One mask per item key; ``digest`` fingerprints them for the per-item cache."""

    source: Path
    digest: str
    _array: np.ndarray | None = None  # [N, H, W] bool, item i under key index i
    _files: dict[str, Path] | None = None
    _index: dict[str, int] | None = None

    def mask(self, key: str, height: int, width: int) -> np.ndarray:
        """The item's mask at a model's input size."""
        if self._array is not None and self._index is not None:
            return resize_mask(self._array[self._index[key]], height, width)
        assert self._files is not None
        return resize_mask(_read_mask_file(self._files[key]), height, width)


def open_ground_truth(masks: Path | None, data: Path, keys: list[str]) -> GroundTruth | None:
    """Masks from ``masks`` (an .npz with ``masks``, or a folder), else from the data .npz's own
    ``masks`` array; None when there are none."""
    if masks is None:
        if data.suffix.lower() == ".npz" and "masks" in _npz_names(data):
            return _from_npz(data, keys)
        return None
    if not masks.exists():
        raise ConfigError(f"masks {masks} do not exist")
    if masks.is_dir():
        return _from_folder(masks, keys)
    if masks.suffix.lower() == ".npz":
        return _from_npz(masks, keys)
    raise ConfigError(f"masks {masks}: expected a folder mirroring the images or an .npz")


def _npz_names(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return list(archive.files)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def _from_npz(path: Path, keys: list[str]) -> GroundTruth:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "masks" not in archive:
                raise ConfigError(f"{path} holds no 'masks' array (N x H x W booleans)")
            array = archive["masks"]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read masks from {path}: {exc}") from exc
    if array.ndim != 3 or not (array.dtype == bool or np.isin(array, (0, 1)).all()):
        raise ConfigError(
            f"{path}: masks must be N x H x W booleans, got {array.dtype} {list(array.shape)}"
        )
    if len(array) != len(keys):
        raise ConfigError(
            f"{path}: {len(array)} masks for {len(keys)} items; every item needs a mask"
        )
    array = array.astype(bool)
    digest = hashlib.sha256(np.packbits(array).tobytes() + str(array.shape).encode()).hexdigest()
    return GroundTruth(path, digest, _array=array, _index={key: i for i, key in enumerate(keys)})


def _from_folder(folder: Path, keys: list[str]) -> GroundTruth:
    files: dict[str, Path] = {}
    missing: list[str] = []
    for i, key in enumerate(keys):
        # npz items ("npz:7") look for 7.png / 7.npy; image files for the same relative path,
        # or the same name with a mask suffix.
        relative = Path(str(i)) if key.startswith("npz:") else Path(key)
        candidates = [folder / relative] + [
            (folder / relative).with_suffix(suffix) for suffix in MASK_SUFFIXES
        ]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            missing.append(key)
        else:
            files[key] = found
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ConfigError(
            f"masks folder {folder} has no mask for {len(missing)} of {len(keys)} items ({shown}); "
            "every item needs one (same relative path, .png or .npy)"
        )
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode() + b"\0" + files[key].read_bytes())
    return GroundTruth(folder, digest.hexdigest(), _files=files)


def _read_mask_file(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"mask {path}: not a readable .npy array ({exc})") from exc
        if array.ndim != 2:
            raise ConfigError(f"mask {path}: expected H x W, got shape {list(array.shape)}")
        return array.astype(bool)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L")) > 0  # any non-black pixel is the object
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"mask {path}: cannot decode image ({exc})") from exc
