"""Corrupted copies of the texture model's held-out crops: a labelled set with real errors.

The texture CNN is nearly perfect on clean held-out crops (1 error in 204), which leaves a
calibration nothing to learn about errors. Production inputs drift: sensors add noise, optics
blur, exposure changes. This script applies such corruptions (in the spirit of ImageNet-C) to
the same real held-out crops, keeping their labels:

    python scripts/make_shifted_textures.py   # -> benchmarks/models/textures_shifted.npz

Deterministic (seeded); numpy and scipy only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "benchmarks" / "models" / "textures_heldout.npz"
TARGET = ROOT / "benchmarks" / "models" / "textures_shifted.npz"


def gaussian_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, 0.05, size=x.shape)


def defocus(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return gaussian_filter(x, sigma=(0, rng.uniform(1.0, 2.0), rng.uniform(1.0, 2.0)))


def low_contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(1, 2), keepdims=True)
    return mean + (x - mean) * rng.uniform(0.3, 0.6)


CORRUPTIONS = {"gaussian_noise": gaussian_noise, "defocus": defocus, "low_contrast": low_contrast}


def main() -> None:
    data = np.load(SOURCE, allow_pickle=False)
    x, y = data["x"].astype(np.float64), data["y"]
    rng = np.random.default_rng(0)
    images, labels, kinds = [], [], []
    for kind, (name, corrupt) in enumerate(CORRUPTIONS.items()):
        for image, label in zip(x, y, strict=True):
            images.append(np.clip(corrupt(image, rng), 0.0, 1.0))
            labels.append(label)
            kinds.append(kind)
        print(f"{name}: {len(x)} items")
    np.savez_compressed(
        TARGET,
        x=np.asarray(images, dtype=np.float32),
        y=np.asarray(labels, dtype=np.int64),
        corruption=np.asarray(kinds, dtype=np.int64),
        corruption_names=np.asarray(list(CORRUPTIONS)),
    )
    print(f"wrote {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
