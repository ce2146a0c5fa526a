"""The test-fixture model variants load, run and agree with the demo model they derive from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from guard import demo
from tests.fixtures import models as fx

Builder = Callable[[Path], Path]
VALID: list[Builder] = [
    fx.nhwc_model,
    fx.fixed_batch_model,
    fx.fixed_batch_unfixable_model,
    fx.probabilities_model,
    fx.rgb_model,
    fx.wide_model,
    fx.dynamic_hw_model,
    fx.two_outputs_model,
    fx.not_image_model,
]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(path: Path, x: np.ndarray, output: str | None = None) -> np.ndarray:
    sess = _session(path)
    name = output or sess.get_outputs()[0].name
    return sess.run([name], {sess.get_inputs()[0].name: x})[0]


def _run_one_by_one(path: Path, x: np.ndarray) -> np.ndarray:
    sess = _session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fixture_models")


@pytest.fixture(scope="module")
def demo_logits(heldout: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return _run(demo.DEMO_MODEL, heldout[0], "logits")


def _agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1) == reference.argmax(1)))


@pytest.mark.parametrize("build", VALID, ids=lambda b: b.__name__)
def test_valid_variant_checks_and_loads(build: Builder, out_dir: Path) -> None:
    path = build(out_dir)
    assert path.suffix == ".onnx" and path.parent == out_dir
    model = onnx.load_model(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    _session(path)


def test_builders_are_deterministic(tmp_path: Path) -> None:
    for build in VALID:
        a = build(tmp_path / "a").read_bytes()
        b = build(tmp_path / "b").read_bytes()
        assert a == b, build.__name__


def test_demo_heldout_accuracy(
    heldout: tuple[np.ndarray, np.ndarray], demo_logits: np.ndarray
) -> None:
    assert np.mean(demo_logits.argmax(1) == heldout[1]) >= 0.96


def test_nhwc(
    out_dir: Path, heldout: tuple[np.ndarray, np.ndarray], demo_logits: np.ndarray
) -> None:
    path = fx.nhwc_model(out_dir)
    assert _session(path).get_inputs()[0].shape == ["N", 32, 32, 1]
    logits = _run(path, heldout[0].transpose(0, 2, 3, 1).copy())
    np.testing.assert_allclose(logits, demo_logits, atol=1e-5)
    assert _agreement(logits, demo_logits) == 1.0


def test_fixed_batch(
    out_dir: Path, heldout: tuple[np.ndarray, np.ndarray], demo_logits: np.ndarray
) -> None:
    path = fx.fixed_batch_model(out_dir)
    assert _session(path).get_inputs()[0].shape == [1, 1, 32, 32]
    logits = _run_one_by_one(path, heldout[0])
    assert _agreement(logits, demo_logits) == 1.0
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises its own error classes
        _run(path, heldout[0][:2])

    # The simple edit (symbolic batch dims, Reshape [1, -1] -> [0, -1]) makes it batch.
    model = onnx.load_model(str(path))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    for i, init in enumerate(model.graph.initializer):
        if init.name == "flatten.shape":
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(np.array([0, -1], dtype=np.int64), init.name)
            )
    fixed = out_dir / "fixed_batch_edited.onnx"
    onnx.save_model(model, str(fixed))
    np.testing.assert_allclose(_run(fixed, heldout[0]), demo_logits, atol=1e-5)


def test_fixed_batch_unfixable(
    out_dir: Path, heldout: tuple[np.ndarray, np.ndarray], demo_logits: np.ndarray
) -> None:
    path = fx.fixed_batch_unfixable_model(out_dir)
    logits = _run_one_by_one(path, heldout[0])
    np.testing.assert_allclose(logits, demo_logits, atol=1e-4)
    assert _agreement(logits, demo_logits) >= 0.99

    model = onnx.load_model(str(path))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    edited = out_dir / "fixed_batch_unfixable_edited.onnx"
    onnx.save_model(model, str(edited))
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises its own error classes
        _run(edited, heldout[0][:2])


def test_probabilities(
    out_dir: Path, heldout: tuple[np.ndarray, np.ndarray], demo_logits: np.ndarray
) -> None:
    path = fx.probabilities_model(out_dir)
    outputs = _session(path).get_outputs()
    assert [o.name for o in outputs] == ["probabilities"]
    probs = _run(path, heldout[0])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert _agreement(probs, demo_logits) == 1.0


def test_rgb(
    out_dir: Path, heldout: tuple[np.ndarray, np.ndarray], demo_logits: np.ndarray
) -> None:
    path = fx.rgb_model(out_dir)
    assert _session(path).get_inputs()[0].shape == ["N", 3, 32, 32]
    logits = _run(path, np.repeat(heldout[0], 3, axis=1))
    assert _agreement(logits, demo_logits) >= 0.99


def test_wide(out_dir: Path) -> None:
    path = fx.wide_model(out_dir)
    assert _session(path).get_inputs()[0].shape == ["N", 1, 48, 192]
    x = np.random.default_rng(0).random((3, 1, 48, 192), dtype=np.float32)
    logits = _run(path, x)
    assert logits.shape == (3, 10) and np.isfinite(logits).all()


def test_dynamic_hw(
    out_dir: Path, heldout: tuple[np.ndarray, np.ndarray], demo_logits: np.ndarray
) -> None:
    path = fx.dynamic_hw_model(out_dir)
    assert _session(path).get_inputs()[0].shape == ["N", 1, "H", "W"]
    logits = _run(path, heldout[0])
    assert _agreement(logits, demo_logits) >= 0.99
    assert _run(path, np.zeros((2, 1, 40, 56), dtype=np.float32)).shape == (2, 10)


def test_two_outputs(
    out_dir: Path, heldout: tuple[np.ndarray, np.ndarray], demo_logits: np.ndarray
) -> None:
    path = fx.two_outputs_model(out_dir)
    sess = _session(path)
    assert [o.name for o in sess.get_outputs()] == ["features", "logits"]
    features, logits = sess.run(None, {"image": heldout[0]})
    assert features.shape == (len(heldout[0]), 2048)
    np.testing.assert_allclose(logits, demo_logits, atol=1e-5)
    assert _agreement(logits, demo_logits) == 1.0


def test_not_image(out_dir: Path) -> None:
    from sklearn.datasets import load_digits

    path = fx.not_image_model(out_dir)
    sess = _session(path)
    assert sess.get_inputs()[0].shape == ["N", 64]
    digits = load_digits()
    logits = _run(path, (digits.data / 16.0).astype(np.float32))
    # A real classifier, though its on-graph resize differs slightly from PIL's.
    assert np.mean(logits.argmax(1) == digits.target) >= 0.95


def test_corrupt(out_dir: Path) -> None:
    path = fx.corrupt_model(out_dir)
    assert path.suffix == ".onnx" and path.stat().st_size == 4096
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError or onnx's own
        onnx.load_model(str(path))
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises its own error classes
        _session(path)
