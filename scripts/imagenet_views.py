"""Labelled views of the hand-labelled ImageNet photos, as EfficientNet-Lite0 inputs (.npz).

The bundled photos (``guard/imagenet/labels.csv``) are too few to calibrate on, and no
labelled ImageNet data ships with the repo. Each photo is taken at several shorter sides
(centre crop: closer views) and mirrored, keeping its label: enough items for ``guard
calibrate`` to run, so that the sidecar can serve the model and its cost can be measured
(``make bench-serve-imagenet``). Views of the same few photos are not independent: a
calibration made from them measures nothing about the model's errors, and with so few
held-out correct predictions its threshold flags nothing at alpha 0.05 (its notes say so).

    python scripts/imagenet_views.py --out out/imagenet-views.npz
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import onnx

from guard import imagenet
from guard.preprocess import Preprocessing, load_input
from guard.runtime.spec import inspect_model
from guard.settings import ModelOptions

ZOOMS = (256, 304, 368, 448)


def views(zooms: tuple[int, ...] = ZOOMS) -> tuple[np.ndarray, np.ndarray]:
    """(x [N, 3, 224, 224] float32, y [N] int64): every labelled photo at every zoom, mirrored."""
    spec = inspect_model(onnx.load(str(imagenet.LITE0_MODEL)), ModelOptions())
    preprocessing = Preprocessing.from_file(imagenet.LITE0_PREPROCESSING)
    names = json.loads(imagenet.IMAGENET_CLASSES.read_text())
    with (imagenet.IMAGENET_IMAGES.parent / "labels.csv").open(newline="") as f:
        labelled = [(row["path"], names.index(row["label"])) for row in csv.DictReader(f)]
    x, y = [], []
    for relative, label in labelled:
        path = imagenet.IMAGENET_IMAGES.parent / relative
        for zoom in zooms:
            view = load_input(path, spec, preprocessing.model_copy(update={"resize_shorter": zoom}))
            x += [view, view[..., ::-1]]  # NCHW: the last axis is the width
            y += [label, label]
    return np.stack(x).astype(np.float32), np.array(y, dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/imagenet-views.npz"))
    args = parser.parse_args()
    x, y = views()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, x=x, y=y)
    print(f"{len(x)} labelled views of {len(set(y.tolist()))} photos written to {args.out}")


if __name__ == "__main__":
    main()
