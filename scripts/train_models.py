"""Train the demo and benchmark CNNs on real data and export them as ONNX.

Run from the repository root (needs the ``train`` extra: ``pip install -e '.[train]'``)::

    python scripts/train_models.py [--only demo|demo_rgb|textures]

* demo     - scikit-learn's bundled digits (1,797 real 8x8 scans), upsampled to 32x32
             grayscale -> guard/demo/
* demo_rgb - the same digits as 3 identical channels (rex-xai only takes RGB models)
             -> benchmarks/models/digits_rgb_*
* textures - 64x64 RGB crops of six real photographs bundled with scikit-image
             -> benchmarks/models/textures_*

Everything is seeded and runs on CPU in a few minutes; the exported graphs are checked
against the torch modules with onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx_export import INPUT_NAME, OUTPUT_NAME, CnnWeights, save_cnn
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "guard" / "demo"
BENCH_DIR = ROOT / "benchmarks" / "models"
DIGIT_SIZE = 32
TEXTURE_SIZE = 64
PARITY_ATOL = 1e-4


# ---------------------------------------------------------------------------- model + training


class PlainCnn(nn.Module):
    """Mirror of the ONNX layout in guard.demo.onnx_export (conv/relu/pool stages, MLP head)."""

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        image_size: int,
        hidden: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = out
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.fc0 = nn.Linear(c * side * side, hidden)
        self.fc1 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(self.features(x), 1)
        return self.fc1(torch.relu(self.fc0(h)))

    def cnn_weights(self) -> CnnWeights:
        """Weights as numpy arrays in the layout onnx_export expects."""

        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().astype(np.float32)

        convs = tuple(
            (arr(m.weight), arr(m.bias)) for m in self.features if isinstance(m, nn.Conv2d)
        )
        dense = tuple((arr(m.weight), arr(m.bias)) for m in (self.fc0, self.fc1))
        return CnnWeights(convs, dense)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)
    # Cheap on CPU for these ops; makes reruns bit-identical at a fixed thread count.
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def random_occlusion(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """With probability ``p`` per image, zero one or two random rectangles.

    Zero is the masking baseline the guard uses, so this keeps partially masked inputs
    in distribution for the classifier.
    """
    x = x.clone()
    n, _, h, w = x.shape
    u = torch.rand(n, generator=gen)
    for i in torch.nonzero(u < p).flatten().tolist():
        count = int(torch.randint(1, 3, (1,), generator=gen))
        for _ in range(count):
            rh = int(torch.randint(h // 8, h // 2 + 1, (1,), generator=gen))
            rw = int(torch.randint(w // 8, w // 2 + 1, (1,), generator=gen))
            top = int(torch.randint(0, h - rh + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - rw + 1, (1,), generator=gen))
            x[i, :, top : top + rh, left : left + rw] = 0.0
    return x


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch: int,
    lr: float,
    gen: torch.Generator,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
) -> None:
    """Adam + cosine schedule, minibatches shuffled by ``gen``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            xb = augment(x[idx], gen)
            opt.zero_grad()
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch == 0 or (epoch + 1) % 5 == 0 or epoch == epochs - 1:
            print(f"  epoch {epoch + 1:3d}/{epochs}  loss {total / len(x):.4f}")
    model.eval()


@torch.no_grad()
def logits_of(model: nn.Module, x: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(x)).numpy()


def export_and_check(model: PlainCnn, size: int, path: Path, x_check: np.ndarray) -> np.ndarray:
    """Write the ONNX file and assert onnxruntime matches torch to PARITY_ATOL."""
    save_cnn(model.cnn_weights(), size, size, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = sess.run([OUTPUT_NAME], {INPUT_NAME: x_check})[0]
    torch_logits = logits_of(model, x_check)
    diff = float(np.max(np.abs(onnx_logits - torch_logits)))
    print(f"  parity torch vs onnxruntime on {len(x_check)} inputs: max |diff| = {diff:.2e}")
    if diff > PARITY_ATOL:
        raise SystemExit(f"parity check failed for {path.name}: {diff} > {PARITY_ATOL}")
    print(f"  wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KiB)")
    return onnx_logits


def report_accuracy(name: str, logits: np.ndarray, y: np.ndarray) -> float:
    acc = float(np.mean(logits.argmax(1) == y))
    print(f"  {name} held-out accuracy: {acc:.4f} ({int(round(acc * len(y)))}/{len(y)})")
    return acc


# ---------------------------------------------------------------------------- digits


@dataclass(frozen=True)
class Digits:
    pixels: np.ndarray  # uint8 [1797, 32, 32], exactly what the demo PNGs hold
    labels: np.ndarray  # int64 [1797]
    train_idx: np.ndarray  # int64, sorted
    heldout_idx: np.ndarray  # int64, sorted


def digit_to_uint8(image: np.ndarray) -> np.ndarray:
    """One load_digits image (0..16) -> uint8 32x32, the demo's canonical pixels.

    x * 255 / 16 hits a .5 only for x == 8 (127.5); rint and round-half-up agree there (128).
    """
    small = np.rint(image.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)
    big = Image.fromarray(small).resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(big, dtype=np.uint8)


def load_digit_data() -> Digits:
    bunch = load_digits()
    pixels = np.stack([digit_to_uint8(im) for im in bunch.images])
    labels = bunch.target.astype(np.int64)
    train_idx, heldout_idx = train_test_split(
        np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=0
    )
    return Digits(
        pixels, labels, np.sort(train_idx).astype(np.int64), np.sort(heldout_idx).astype(np.int64)
    )


def digits_input(pixels: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [N, 32, 32] -> float32 [N, C, 32, 32] in [0, 1] (identical channels)."""
    x = pixels.astype(np.float32)[:, None] / np.float32(255.0)
    return np.ascontiguousarray(np.repeat(x, channels, axis=1))


def train_digits(channels: int, seed: int) -> tuple[PlainCnn, Digits, np.ndarray]:
    data = load_digit_data()
    x = digits_input(data.pixels, channels)
    gen = seed_everything(seed)
    model = PlainCnn(channels, (16, 32), DIGIT_SIZE, hidden=64, num_classes=10)
    t0 = time.perf_counter()
    train(
        model,
        torch.from_numpy(x[data.train_idx]),
        torch.from_numpy(data.labels[data.train_idx]),
        epochs=30,
        batch=64,
        lr=2e-3,
        gen=gen,
        augment=random_occlusion,
    )
    print(f"  trained in {time.perf_counter() - t0:.1f} s on {len(data.train_idx)} digits")
    return model, data, x


def build_demo() -> None:
    print("[demo] 1-channel digits CNN")
    model, data, x = train_digits(channels=1, seed=0)
    x_held, y_held = x[data.heldout_idx], data.labels[data.heldout_idx]
    logits = export_and_check(model, DIGIT_SIZE, DEMO_DIR / "digits_cnn.onnx", x_held)
    report_accuracy("demo", logits, y_held)
    occluded = random_occlusion(
        torch.from_numpy(x_held), torch.Generator().manual_seed(1), p=1.0
    ).numpy()
    report_accuracy("demo (random occlusion)", logits_of(model, occluded), y_held)

    np.savez_compressed(DEMO_DIR / "heldout.npz", x=x_held, y=y_held, index=data.heldout_idx)
    preprocessing = {
        "color_mode": "L",
        "scale": 1.0 / 255.0,
        "mean": None,
        "std": None,
        "resize": "bilinear",
    }
    (DEMO_DIR / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2) + "\n")
    (DEMO_DIR / "classes.json").write_text(json.dumps([str(i) for i in range(10)]) + "\n")

    # First held-out example of each of the first 8 labels met, in index order.
    image_dir = DEMO_DIR / "images"
    image_dir.mkdir(exist_ok=True)
    for old in image_dir.glob("*.png"):
        old.unlink()
    seen: set[int] = set()
    for idx in data.heldout_idx:
        label = int(data.labels[idx])
        if label in seen:
            continue
        seen.add(label)
        path = image_dir / f"digit{label}_{idx}.png"
        Image.fromarray(data.pixels[idx]).save(path)
        # The PNG read back and scaled must be bit-identical to the model input.
        back = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / np.float32(255.0)
        assert np.array_equal(back, x[idx, 0]), path
        if len(seen) == 8:
            break
    print(f"  wrote {len(seen)} PNGs to {image_dir.relative_to(ROOT)}/")


def build_demo_rgb() -> None:
    print("[demo_rgb] 3-channel digits CNN")
    model, data, x = train_digits(channels=3, seed=1)
    x_held, y_held = x[data.heldout_idx], data.labels[data.heldout_idx]
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    logits = export_and_check(model, DIGIT_SIZE, BENCH_DIR / "digits_rgb_cnn.onnx", x_held)
    report_accuracy("demo_rgb", logits, y_held)
    np.savez_compressed(
        BENCH_DIR / "digits_rgb_heldout.npz", x=x_held, y=y_held, index=data.heldout_idx
    )


# ---------------------------------------------------------------------------- textures

# (class name, skimage.data loader name, fraction of columns that show the class); all six
# ship inside the scikit-image wheel. chelsea's right quarter is blurred background, not cat.
TEXTURE_SOURCES: tuple[tuple[str, str, float], ...] = (
    ("brick", "brick", 1.0),
    ("grass", "grass", 1.0),
    ("gravel", "gravel", 1.0),
    ("cat_fur", "chelsea", 0.76),
    ("tissue", "immunohistochemistry", 1.0),
    ("deep_sky", "hubble_deep_field", 1.0),
)
# Train crops come from the left 70% of each image's usable columns, held-out crops from
# the rest; the regions do not overlap, so no held-out pixel is ever seen in training.
TRAIN_FRACTION = 0.7
HELDOUT_PER_CLASS = 34
TRAIN_PER_CLASS = 640


def load_texture_sources() -> list[np.ndarray]:
    """Each source image as float32 [3, H, W] in [0, 1]; grayscale replicated to RGB."""
    import skimage.data

    images = []
    for _, loader, usable in TEXTURE_SOURCES:
        im = np.asarray(getattr(skimage.data, loader)())
        if im.ndim == 2:
            im = np.repeat(im[:, :, None], 3, axis=2)
        im = im[:, : int(im.shape[1] * usable)]
        images.append(np.ascontiguousarray(im[:, :, :3].transpose(2, 0, 1)))
    return images


def random_crops(
    image: np.ndarray, cols: tuple[int, int], count: int, rng: np.random.Generator
) -> np.ndarray:
    """``count`` uint8 crops [count, 3, 64, 64] lying wholly within columns [lo, hi)."""
    lo, hi = cols
    h = image.shape[1]
    tops = rng.integers(0, h - TEXTURE_SIZE + 1, count)
    lefts = rng.integers(lo, hi - TEXTURE_SIZE + 1, count)
    return np.stack(
        [
            image[:, t : t + TEXTURE_SIZE, s : s + TEXTURE_SIZE]
            for t, s in zip(tops, lefts, strict=True)
        ]
    )


def split_columns(width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    cut = int(width * TRAIN_FRACTION)
    return (0, cut), (cut, width)


def texture_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """uint8 crops -> float in [0, 1], with random horizontal flips (vertical ones would
    be unrealistic for top-lit photos)."""
    x = x.float() / 255.0
    flip = torch.rand(len(x), generator=gen) < 0.5
    x[flip] = torch.flip(x[flip], dims=[3])
    return x


def build_textures() -> None:
    print("[textures] 64x64 RGB texture CNN")
    sources = load_texture_sources()
    rng = np.random.default_rng(0)
    held_x, held_y = [], []
    for label, image in enumerate(sources):
        _, held_cols = split_columns(image.shape[2])
        held_x.append(random_crops(image, held_cols, HELDOUT_PER_CLASS, rng))
        held_y.append(np.full(HELDOUT_PER_CLASS, label, dtype=np.int64))
    x_held = np.concatenate(held_x).astype(np.float32) / np.float32(255.0)
    y_held = np.concatenate(held_y)

    # A large fixed pool of uint8 train crops (converted to float per batch to save memory).
    xs, ys = [], []
    for label, image in enumerate(sources):
        train_cols, _ = split_columns(image.shape[2])
        xs.append(random_crops(image, train_cols, TRAIN_PER_CLASS, rng))
        ys.append(np.full(TRAIN_PER_CLASS, label, dtype=np.int64))
    x_train, y_train = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    gen = seed_everything(2)
    model = PlainCnn(
        3, (32, 64, 128, 128), TEXTURE_SIZE, hidden=128, num_classes=len(TEXTURE_SOURCES)
    )
    t0 = time.perf_counter()
    train(model, x_train, y_train, epochs=4, batch=64, lr=1e-3, gen=gen, augment=texture_augment)
    print(f"  trained in {time.perf_counter() - t0:.1f} s")

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    logits = export_and_check(model, TEXTURE_SIZE, BENCH_DIR / "textures_cnn.onnx", x_held)
    report_accuracy("textures", logits, y_held)
    np.savez_compressed(BENCH_DIR / "textures_heldout.npz", x=x_held, y=y_held)
    names = [name for name, _, _ in TEXTURE_SOURCES]
    (BENCH_DIR / "textures_classes.json").write_text(json.dumps(names) + "\n")


BUILDERS: dict[str, Callable[[], None]] = {
    "demo": build_demo,
    "demo_rgb": build_demo_rgb,
    "textures": build_textures,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BUILDERS), help="build just this model")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name, build in BUILDERS.items():
        if args.only in (None, name):
            t0 = time.perf_counter()
            build()
            print(f"[{name}] done in {time.perf_counter() - t0:.1f} s\n")


if __name__ == "__main__":
    main()
