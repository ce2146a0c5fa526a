"""The demo: a small CNN trained on scikit-learn's handwritten digits (scripts/train_models.py)."""

from pathlib import Path

DEMO_DIR = Path(__file__).parent
DEMO_MODEL = DEMO_DIR / "digits_cnn.onnx"
DEMO_PREPROCESSING = DEMO_DIR / "preprocessing.json"
DEMO_HELDOUT = DEMO_DIR / "heldout.npz"
DEMO_IMAGES = DEMO_DIR / "images"
DEMO_CLASSES = DEMO_DIR / "classes.json"
DEMO_CALIBRATION = DEMO_DIR / "calibration.json"
