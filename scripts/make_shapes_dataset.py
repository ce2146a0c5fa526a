"""Shapes on real textures, with exact object masks, and three small classifiers for ``guard audit``.

Run from the repository root (needs the ``train`` extra: ``pip install -e '.[train]'``)::

    python scripts/make_shapes_dataset.py

Each image is a 32x32 grayscale crop of one of scikit-image's bundled photographs (brick,
grass, gravel, moon, camera) with one filled shape painted on it: a disk, a square, a
triangle or a cross (the class), of random size, position and contrast. The shape's pixels
are the exact ground-truth mask. Train crops come from the left 70% of each photograph,
held-out crops from the rest, so no held-out background pixel is seen in training.

Three models of two architectures are trained on the same images (with the occlusion augmentation of
``train_models.py``, so masked inputs stay in distribution) and exported as ONNX:

* ``shapes_cnn``    - conv/pool stages, flatten, dense head (``guard.demo.onnx_export``)
* ``shapes_gapcnn`` - conv/pool stages, global average pooling, one dense layer
* ``shapes_cnn_small`` - the first architecture at a quarter of its width

The models take raw 8-bit pixel values (0..255, NCHW float32): the 1/255 scaling is folded
into the first layer, so the held-out ``.npz`` stores exact uint8 pixels and stays small.
Outputs (``benchmarks/models/``): ``shapes_{cnn,gapcnn,cnn_small}.onnx``, ``shapes_heldout.npz``
(``x`` uint8 [N, 1, 32, 32], ``y``, ``masks`` bool [N, 32, 32]), ``shapes_classes.json`` and
``shapes_preprocessing.json`` (scale 1, for image files). Seeded; a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper
from onnx_export import (
    BATCH_DIM,
    INPUT_NAME,
    OUTPUT_NAME,
    CnnWeights,
    build_cnn,
    conv_stack,
    dense_head,
    make_model,
    tensor_info,
)
from torch import nn
from train_models import PlainCnn, random_occlusion, seed_everything, train

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "benchmarks" / "models"
SIZE = 32
CLASSES = ("disk", "square", "triangle", "cross")
BACKGROUNDS = ("brick", "grass", "gravel", "moon", "camera")
TRAIN_FRACTION = 0.7
TRAIN_ITEMS = 8000
HELDOUT_ITEMS = 200
PARITY_ATOL = 1e-3  # logits of raw 0..255 inputs


# ---------------------------------------------------------------------------- data


def shape_mask(kind: str, rng: np.random.Generator) -> np.ndarray:
    """An exact boolean mask [SIZE, SIZE] of one shape of random size and position."""
    size = int(rng.integers(9, 17))  # bounding box side in pixels
    top = int(rng.integers(1, SIZE - size))
    left = int(rng.integers(1, SIZE - size))
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    half = size / 2
    if kind == "disk":
        inside = (rows - half) ** 2 + (cols - half) ** 2 <= half**2
    elif kind == "square":
        inside = np.ones((size, size), bool)
    elif kind == "triangle":  # apex up: the half-width grows linearly with the row
        inside = np.abs(cols - half) <= rows / 2
    else:  # cross: two bars a third of the side thick
        bar = size / 6
        inside = (np.abs(rows - half) <= bar) | (np.abs(cols - half) <= bar)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[top : top + size, left : left + size] = inside
    return mask


def load_backgrounds() -> list[np.ndarray]:
    import skimage.data

    return [np.asarray(getattr(skimage.data, name)(), dtype=np.uint8) for name in BACKGROUNDS]


def make_items(
    backgrounds: list[np.ndarray], count: int, heldout: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` images (uint8 [N, 1, SIZE, SIZE]), labels and exact masks, classes balanced."""
    xs = np.empty((count, 1, SIZE, SIZE), np.uint8)
    masks = np.empty((count, SIZE, SIZE), bool)
    labels = np.arange(count) % len(CLASSES)
    rng.shuffle(labels)
    for i, label in enumerate(labels):
        image = backgrounds[int(rng.integers(len(backgrounds)))]
        cut = int(image.shape[1] * TRAIN_FRACTION)
        lo, hi = (cut, image.shape[1]) if heldout else (0, cut)
        top = int(rng.integers(0, image.shape[0] - SIZE + 1))
        left = int(rng.integers(lo, hi - SIZE + 1))
        crop = image[top : top + SIZE, left : left + SIZE].astype(np.float64)
        mask = shape_mask(CLASSES[label], rng)
        # Contrast against the background under the shape, brighter or darker at random;
        # low contrasts make some items hard, so the models make real errors.
        contrast = rng.uniform(25, 110) * rng.choice([-1.0, 1.0])
        fill = np.clip(crop[mask].mean() + contrast, 0, 255)
        crop[mask] = fill + rng.normal(0, 6, int(mask.sum()))
        xs[i, 0] = np.clip(np.rint(crop), 0, 255).astype(np.uint8)
        masks[i] = mask
    return xs, labels.astype(np.int64), masks


# ---------------------------------------------------------------------------- models


class GapCnn(nn.Module):
    """Conv/relu/pool stages, global average pooling, one linear layer."""

    def __init__(self, channels: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _arr(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _scaled_first(layers: tuple[tuple[np.ndarray, np.ndarray], ...]):  # noqa: ANN202
    """Fold the 1/255 input scaling into the first layer's weights (the bias is unchanged)."""
    (w, b), *rest = layers
    return ((w / np.float32(255.0), b), *rest)


def onnx_of(model: nn.Module) -> onnx.ModelProto:
    """The trained module as an ONNX graph taking raw 0..255 pixels."""
    io_in = [tensor_info(INPUT_NAME, [BATCH_DIM, 1, SIZE, SIZE])]
    io_out = [tensor_info(OUTPUT_NAME, [BATCH_DIM, len(CLASSES)])]
    if isinstance(model, PlainCnn):
        weights = model.cnn_weights()
        return build_cnn(CnnWeights(_scaled_first(weights.convs), weights.dense), SIZE, SIZE)
    if isinstance(model, GapCnn):
        convs = tuple(
            (_arr(m.weight), _arr(m.bias)) for m in model.features if isinstance(m, nn.Conv2d)
        )
        stack = conv_stack(_scaled_first(convs), INPUT_NAME)
        gap = helper.make_node("GlobalAveragePool", [stack.output], ["gap"], name="gap")
        flat = helper.make_node("Flatten", ["gap"], ["flatten"], name="flatten", axis=1)
        head = dense_head(((_arr(model.fc.weight), _arr(model.fc.bias)),), "flatten")
        return make_model(
            stack.nodes + [gap, flat] + head.nodes,
            stack.initializers + head.initializers,
            io_in,
            io_out,
            graph_name="gapcnn",
        )
    raise TypeError(f"no ONNX export for {type(model).__name__}")


def to_float(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """uint8 -> [0, 1] with the occlusion augmentation (zero: the guard's masking baseline)."""
    return random_occlusion(x.float() / 255.0, gen, p=0.5)


ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], int, float]] = {
    # name: (constructor, epochs, learning rate)
    "cnn": (lambda: PlainCnn(1, (8, 16, 16), SIZE, hidden=32, num_classes=len(CLASSES)), 30, 2e-3),
    "gapcnn": (lambda: GapCnn((8, 16, 32), len(CLASSES)), 30, 2e-3),
    # the same family as "cnn", a quarter of its width: for the within-family comparison
    "cnn_small": (
        lambda: PlainCnn(1, (4, 8, 8), SIZE, hidden=16, num_classes=len(CLASSES)),
        30,
        2e-3,
    ),
}


def build_model(
    name: str, x_train: np.ndarray, y_train: np.ndarray, x_held: np.ndarray, y_held: np.ndarray
) -> None:
    make, epochs, lr = ARCHITECTURES[name]
    gen = seed_everything(10 + list(ARCHITECTURES).index(name))
    model = make()
    t0 = time.perf_counter()
    print(f"[{name}] training")
    train(model, torch.from_numpy(x_train), torch.from_numpy(y_train), epochs=epochs, batch=64,
          lr=lr, gen=gen, augment=to_float)  # fmt: skip
    print(f"  trained in {time.perf_counter() - t0:.1f} s")
    path = OUT_DIR / f"shapes_{name}.onnx"
    onnx.save_model(onnx_of(model), str(path))
    raw = x_held.astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run([OUTPUT_NAME], {INPUT_NAME: raw})[0]
    with torch.no_grad():
        reference = model(torch.from_numpy(raw / np.float32(255.0))).numpy()
    diff = float(np.max(np.abs(logits - reference)))
    if diff > PARITY_ATOL:
        raise SystemExit(f"parity check failed for {path.name}: {diff} > {PARITY_ATOL}")
    accuracy = float(np.mean(logits.argmax(1) == y_held))
    print(f"  parity max |diff| {diff:.1e}; held-out accuracy {accuracy:.3f}")
    print(f"  wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(ARCHITECTURES), help="train just this model")
    args = parser.parse_args()
    torch.set_num_threads(2)
    backgrounds = load_backgrounds()
    x_held, y_held, m_held = make_items(backgrounds, HELDOUT_ITEMS, True, np.random.default_rng(1))
    x_train, y_train, _ = make_items(backgrounds, TRAIN_ITEMS, False, np.random.default_rng(0))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT_DIR / "shapes_heldout.npz", x=x_held, y=y_held, masks=m_held)
    (OUT_DIR / "shapes_classes.json").write_text(json.dumps(list(CLASSES)) + "\n")
    preprocessing = {
        "color_mode": "L",
        "scale": 1.0,
        "mean": None,
        "std": None,
        "resize": "bilinear",
    }
    (OUT_DIR / "shapes_preprocessing.json").write_text(json.dumps(preprocessing, indent=2) + "\n")
    for name in ARCHITECTURES:
        if args.only in (None, name):
            build_model(name, x_train, y_train, x_held, y_held)


if __name__ == "__main__":
    main()
