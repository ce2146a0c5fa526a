"""The bundled ImageNet classifier (EfficientNet-Lite0, exported by scripts/export_imagenet.py)
and the ImageNet-style preprocessing: shorter-side resize and centre crop."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guard import imagenet
from guard.errors import InvalidInputError
from guard.preprocess import (
    Preprocessing,
    center_crop_box,
    input_from_bytes,
    load_input,
    shorter_side_size,
)
from guard.runtime import MaskedClassifier
from guard.runtime.spec import ModelSpec

TEST_PHOTOS = ("images/chelsea.png", "images/coffee.png")


@pytest.fixture(scope="module")
def lite0() -> MaskedClassifier:
    return MaskedClassifier(imagenet.LITE0_MODEL)


def _spec(height: int, width: int, channels: int = 3) -> ModelSpec:
    return ModelSpec("image", "NCHW", channels, height, width, np.dtype("float32"), "logits", 10,
                     False)  # fmt: skip


def test_lite0_reproduces_pytorchs_top5_on_real_photos(lite0: MaskedClassifier) -> None:
    expected = json.loads(imagenet.LITE0_EXPECTED.read_text())
    preprocessing = Preprocessing.from_file(imagenet.LITE0_PREPROCESSING)
    assert lite0.spec.input_shape == (3, 224, 224) and lite0.spec.num_classes == 1000
    x = np.stack(
        [load_input(imagenet.IMAGENET_DIR / p, lite0.spec, preprocessing) for p in TEST_PHOTOS]
    )
    scores = lite0.predict(x).scores
    names = json.loads(imagenet.IMAGENET_CLASSES.read_text())
    for row, photo in zip(scores, TEST_PHOTOS, strict=True):
        record = expected["photos"][photo]
        top5 = np.argsort(-row)[:5]
        assert top5.tolist() == record["top5"], photo
        np.testing.assert_allclose(row[top5], record["top5_logits"], atol=2e-3)
        assert [names[c] for c in top5] == record["top5_names"]
    # What the photos show: a cat, an espresso.
    assert names[int(np.argmax(scores[0]))] in ("tabby", "tiger cat", "Egyptian cat")
    assert names[int(np.argmax(scores[1]))] == "espresso"


def test_the_recorded_export_matches_the_shipped_files() -> None:
    import hashlib

    expected = json.loads(imagenet.LITE0_EXPECTED.read_text())
    assert hashlib.sha256(imagenet.LITE0_MODEL.read_bytes()).hexdigest() == expected["sha256"]
    # The normalisation the weights were trained with: (p - 127) / 128, whose stem variance
    # matches the recorded batch-norm statistics; ImageNet's mean/std gives about 4x as much.
    check = expected["normalisation_check"]
    assert 0.5 < check["tf_lite"]["stem_variance_over_bn_running_variance"] < 2.0
    assert check["imagenet"]["stem_variance_over_bn_running_variance"] > 3.0
    preprocessing = Preprocessing.from_file(imagenet.LITE0_PREPROCESSING)
    assert preprocessing.resize_shorter == 256 and preprocessing.resize == "bicubic"
    assert preprocessing.mean == pytest.approx((127 / 255,) * 3)
    assert preprocessing.std == pytest.approx((128 / 255,) * 3)


def test_class_names_labels_and_photo_sources() -> None:
    names = json.loads(imagenet.IMAGENET_CLASSES.read_text())
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[281] == "tabby" and names[967] == "espresso"
    with imagenet.IMAGENET_LABELS.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(row["label"] in names for row in rows)
    photos = json.loads(imagenet.IMAGENET_PHOTOS.read_text())
    assert {p["file"] for p in photos} == {
        f"images/{path.name}" for path in imagenet.IMAGENET_IMAGES.iterdir()
    }
    assert all("CC0" in p["licence"] or "public domain" in p["licence"] for p in photos)
    for row in rows:
        assert (imagenet.IMAGENET_DIR / row["path"]).exists()


@pytest.mark.parametrize(
    ("size", "shorter", "expected"),
    [((451, 300), 256, (384, 256)), ((300, 451), 256, (256, 384)), ((400, 400), 224, (224, 224)),
     ((641, 427), 292, (438, 292))],
)  # fmt: skip
def test_shorter_side_resize_keeps_the_aspect_ratio(size, shorter, expected) -> None:
    # By hand: the longer side is shorter * long / short, truncated (torchvision's Resize).
    assert shorter_side_size(size, shorter) == expected


def test_center_crop_box_by_hand() -> None:
    # (384 - 224) / 2 = 80 columns off the left, (256 - 224) / 2 = 16 rows off the top.
    assert center_crop_box((384, 256), (224, 224)) == (80, 16, 304, 240)
    # Odd margins: round((257 - 224) / 2) = round(16.5) = 16, as torchvision's CenterCrop.
    assert center_crop_box((300, 257), (224, 200)) == (50, 16, 250, 240)
    with pytest.raises(InvalidInputError, match="does not fit"):
        center_crop_box((200, 300), (224, 224))


def test_resize_shorter_then_crop_gives_the_hand_computed_input() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(300, 451, 3), dtype=np.uint8)  # H x W: landscape
    image = Image.fromarray(pixels)
    preprocessing = Preprocessing(resize="bicubic", resize_shorter=256, mean=(0.5,), std=(0.25,))
    spec = _spec(224, 224)
    data = _png(image)
    got = input_from_bytes(data, spec, preprocessing)
    # By hand: 451 x 300 -> 384 x 256 (bicubic), then the 224 x 224 centre from (80, 16).
    by_hand = np.asarray(
        image.resize((384, 256), Image.Resampling.BICUBIC).crop((80, 16, 304, 240)), np.float32
    )
    expected = ((by_hand / 255.0 - 0.5) / 0.25).transpose(2, 0, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_center_crop_without_resize_then_fits_the_model() -> None:
    pixels = np.arange(40 * 60, dtype=np.float32).reshape(40, 60) % 256
    image = Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    preprocessing = Preprocessing(center_crop=(20, 30), resize="nearest")
    got = input_from_bytes(_png(image), _spec(10, 15), preprocessing)
    # The 20 x 30 centre starts at row 10, column 15, then halves by nearest neighbour.
    crop = np.asarray(image, np.float32)[10:30, 15:45]
    expected = np.asarray(
        Image.fromarray(crop.astype(np.uint8)).resize((15, 10), Image.Resampling.NEAREST),
        np.float32,
    )
    np.testing.assert_allclose(got, (expected / 255.0).transpose(2, 0, 1), atol=1e-6)
    with pytest.raises(InvalidInputError, match="does not fit"):
        input_from_bytes(_png(image.resize((25, 15))), _spec(10, 15), preprocessing)


def test_resize_shorter_crops_each_models_own_size() -> None:
    """Without center_crop the model's input size is cut: one setting serves models of two sizes
    (as guard audit needs), each from the same resized image."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), np.uint8))
    preprocessing = Preprocessing(resize_shorter=292)
    for size in (224, 260):
        x = input_from_bytes(_png(image), _spec(size, size), preprocessing)
        assert x.shape == (3, size, size)


def test_crop_settings_are_validated_and_old_settings_still_load() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Preprocessing(resize_shorter=200, center_crop=(224, 224))
    with pytest.raises(ValueError):
        Preprocessing(center_crop=(0, 224))
    old = Preprocessing.model_validate({"color_mode": "L", "scale": 1 / 255, "resize": "bilinear"})
    assert old.resize_shorter is None and old.center_crop is None
    restored = Preprocessing.model_validate_json(
        Preprocessing(resize_shorter=256, center_crop=(224, 224)).model_dump_json()
    )
    assert restored.center_crop == (224, 224)


def test_wide_images_take_the_same_geometry(tmp_path: Path) -> None:
    """16-bit images go through the same resize and crop as 8-bit ones."""
    grey = np.random.default_rng(2).integers(0, 256, (60, 90), dtype=np.uint16)
    wide = Image.fromarray((grey * 257).astype(np.uint16))
    narrow = Image.fromarray(grey.astype(np.uint8))
    preprocessing = Preprocessing(resize_shorter=32, resize="bilinear")
    spec = _spec(28, 28, channels=1)
    paths = []
    for name, image in (("wide.png", wide), ("narrow.png", narrow)):
        image.save(tmp_path / name)
        paths.append(tmp_path / name)
    a, b = (load_input(p, spec, preprocessing) for p in paths)
    assert a.shape == (1, 28, 28)
    np.testing.assert_allclose(a, b, atol=1.5 / 255)


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_cli_options_set_the_geometry() -> None:
    from guard.cli.options import RuntimeOptions, crop_size
    from guard.errors import ConfigError

    assert crop_size("224x200") == (224, 200) and crop_size("224") == (224, 224)
    for bad in ("224x", "x", "0x4", "a"):
        with pytest.raises(ConfigError):
            crop_size(bad)
    given = RuntimeOptions(resize_shorter=256, center_crop="224x224").preprocessing_overrides()
    assert given == {"resize_shorter": 256, "center_crop": (224, 224)}
    assert RuntimeOptions().preprocessing_overrides() == {}


def test_labelled_views_of_the_photos_keep_their_labels(lite0: MaskedClassifier) -> None:
    from scripts.imagenet_views import ZOOMS, views

    x, y = views()
    with (imagenet.IMAGENET_IMAGES.parent / "labels.csv").open(newline="") as f:
        photos = list(csv.DictReader(f))
    assert x.shape == (len(photos) * len(ZOOMS) * 2, 3, 224, 224) and y.shape == (len(x),)
    names = json.loads(imagenet.IMAGENET_CLASSES.read_text())
    assert sorted({names[label] for label in y}) == sorted(p["label"] for p in photos)
    np.testing.assert_array_equal(x[1::2], x[0::2][..., ::-1])  # each view and its mirror
    assert not np.array_equal(x[0], x[2])  # zooms differ
    # The closest view of the espresso is still an espresso to the model.
    espresso = np.flatnonzero(y == names.index("espresso"))
    predicted = lite0.predict(x[espresso]).classes
    assert (predicted == names.index("espresso")).mean() >= 0.5


def test_lite0_calibrated_and_served_end_to_end(tmp_path: Path) -> None:
    """guard calibrate on labelled views, then a real sidecar: OIP metadata and a verdict."""
    from typer.testing import CliRunner

    from guard.cli import app
    from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2 as pb
    from scripts.imagenet_views import views
    from tests.serving import infer_request, inference_stub, parameters, running_sidecar

    x, y = views(zooms=(256, 368))
    np.savez(tmp_path / "views.npz", x=x, y=y)
    calibration = tmp_path / "calibration.json"
    result = CliRunner().invoke(
        app,
        ["calibrate", str(tmp_path / "views.npz"), "--model", str(imagenet.LITE0_MODEL),
         "--preprocessing", str(imagenet.LITE0_PREPROCESSING),
         "--classes", str(imagenet.IMAGENET_CLASSES), "--fast", "--iters", "2",
         "--score", "msp", "--out", str(calibration)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with running_sidecar(model=imagenet.LITE0_MODEL, calibration=calibration) as server:
        stub = inference_stub(server)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="efficientnet_lite0"))
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("image", "FP32", [-1, 3, 224, 224])
        ]
        assert list(meta.outputs[0].shape) == [-1, 1000]
        espresso = json.loads(imagenet.IMAGENET_CLASSES.read_text()).index("espresso")
        coffee = x[np.flatnonzero(y == espresso)[0]]
        response = stub.ModelInfer(infer_request("efficientnet_lite0", "image", coffee[None]))
        p = parameters(response)
        assert p["guard_status"] == "checked" and p["guard_predicted_class"] == espresso
        assert 0 < p["guard_mps_area"] < 1 and 0 <= p["guard_p_value"] <= 1
        assert isinstance(p["guard_flagged"], bool)
