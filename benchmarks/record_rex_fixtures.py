"""Record rex-xai 0.4.1's MPSs on a few held-out images as test fixtures (``tests/fixtures/rex``).

    python benchmarks/record_rex_fixtures.py            # both models, seed 0 (a few minutes)
    python benchmarks/record_rex_fixtures.py --models digits_rgb

rex-xai runs in its own virtual environment (``benchmarks/rex_reference.py`` builds it on first
use); the fixtures keep only what ``tests/test_fidelity.py`` needs to check, without rex-xai,
that the engine with ``random_stream="rex"`` reproduces rex-xai: the image indices, rex-xai's
predicted class, MPS area and mask (packed bits), and rex-xai's own float32 responsibility on
both sides of the MPS boundary (the smallest value inside the mask, the largest outside), which
the engine's replay of rex-xai's float32 arithmetic must reproduce to the bit.

Two models with different failure modes of a naive reimplementation:
- ``digits_rgb``: many MPSs are a single chunk, and the all-baseline input gets class 4, so
  digits predicted as 4 show whether the empty set is tested (rex-xai never tests it);
- ``textures``: large MPSs (most of the image) next to one-chunk MPSs of class 5, the
  all-baseline input's class.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import rex_reference  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "rex"

# name: (model, held-out data, indices). Indices spread over the classes, with items whose
# all-baseline input keeps the predicted class (digits 147 and 392, textures 174 and 203).
FIXTURES = {
    "digits_rgb": (
        "benchmarks/models/digits_rgb_cnn.onnx",
        "benchmarks/models/digits_rgb_heldout.npz",
        [0, 49, 98, 147, 196, 294, 343, 392],
    ),
    "textures": (
        "benchmarks/models/textures_cnn.onnx",
        "benchmarks/models/textures_heldout.npz",
        [58, 87, 116, 145, 174, 203],
    ),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(name: str, seed: int, out: Path) -> Path:
    model, data, indices = FIXTURES[name]
    model_path, data_path = ROOT / model, ROOT / data
    with np.load(data_path, allow_pickle=False) as held_out:
        x = held_out["x"][indices].astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="rex-fixture-") as tmp:
        rows = rex_reference.run_reference(model_path, x, seed=seed, workdir=Path(tmp))
    masks = np.stack([r["mps_mask"] for r in rows])
    n, height, width = masks.shape

    def value(row: dict, key: str) -> float:
        return np.nan if row[key] is None else float(row[key])

    target = out / f"{name}.npz"
    np.savez_compressed(
        target,
        model=np.str_(model),
        model_sha256=np.str_(sha256(model_path)),
        data=np.str_(data),
        rex_version=np.str_(rex_reference.REX_VERSION),
        seed=np.int64(seed),
        indices=np.array(indices, dtype=np.int64),
        predicted_class=np.array([r["predicted_class"] for r in rows], dtype=np.int64),
        mps_area_fraction=np.array([r["mps_area_fraction"] for r in rows], dtype=np.float64),
        shape=np.array([height, width], dtype=np.int64),
        mps_masks=np.packbits(masks.reshape(n, -1), axis=1),
        responsibility_inside_min=np.array([value(r, "responsibility_inside_min") for r in rows]),
        responsibility_outside_max=np.array([value(r, "responsibility_outside_max") for r in rows]),
    )
    areas = ", ".join(f"{r['mps_area_fraction']:.4f}" for r in rows)
    print(f"{name}: {n} MPSs from rex-xai {rex_reference.REX_VERSION} -> {target} ({areas})")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=list(FIXTURES), choices=list(FIXTURES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        record(name, args.seed, args.out)


if __name__ == "__main__":
    main()
