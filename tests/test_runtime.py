"""Reading any single-image ONNX classifier: layouts, batch dimensions, outputs, errors.

Every variant is built from the real demo weights (tests/fixtures/models.py); every MPS is
checked with plain onnxruntime on the variant's own file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from guard import demo
from guard.engine import MpsEngine
from guard.errors import ConfigError, ModelLoadError, UnsupportedModelError
from guard.runtime import MaskedClassifier
from guard.settings import EngineSettings, ModelOptions
from tests.fixtures import models
from tests.oracle import PlainModel, masked

FAST = EngineSettings(iters=4)


@pytest.fixture(scope="module")
def digits(heldout) -> np.ndarray:  # noqa: ANN001
    return heldout[0][:6]


def _wide(x: np.ndarray) -> np.ndarray:
    rows = np.arange(48) * 32 // 48
    cols = np.arange(192) * 32 // 192
    return x[:, :, rows][:, :, :, cols]


# name -> (builder, inputs from NCHW digits, layout, options, plain-model kwargs)
VARIANTS = {
    "nhwc": (models.nhwc_model, lambda x: x.transpose(0, 2, 3, 1), "NHWC", {}, {}),
    "probabilities": (models.probabilities_model, lambda x: x, "NCHW", {}, {}),
    "rgb": (models.rgb_model, lambda x: np.repeat(x, 3, axis=1), "NCHW", {}, {}),
    "wide": (models.wide_model, _wide, "NCHW", {}, {}),
    "dynamic_hw": (models.dynamic_hw_model, lambda x: x, "NCHW", {"height": 32, "width": 32}, {}),
    "two_outputs": (
        models.two_outputs_model,
        lambda x: x,
        "NCHW",
        {"output": "logits"},
        {"output": "logits"},
    ),
    "fixed_batch": (models.fixed_batch_model, lambda x: x, "NCHW", {}, {"batch_one": True}),
    "fixed_batch_unfixable": (
        models.fixed_batch_unfixable_model,
        lambda x: x,
        "NCHW",
        {},
        {"batch_one": True},
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_gives_sufficient_mpss(name: str, digits: np.ndarray, tmp_path: Path) -> None:
    build, relayout, layout, options, plain_kwargs = VARIANTS[name]
    path = build(tmp_path)
    classifier = MaskedClassifier(path, ModelOptions(**options))
    assert classifier.spec.layout == layout
    plain = PlainModel(path, **plain_kwargs)
    inputs = relayout(digits).astype(np.float32)
    engine = MpsEngine(classifier, FAST)
    results = (
        engine.explain_batch(inputs[:3])
        if name != "fixed_batch_unfixable"
        else [engine.explain(inputs[0])]
    )
    for image, result in zip(inputs, results, strict=False):
        original = plain.top1(image[None])[0]
        assert result.predicted_class == original
        kept = masked(image, np.zeros_like(image), result.mps_mask, layout)
        assert plain.top1(kept[None])[0] == original
        assert result.mps_mask.shape == (classifier.spec.height, classifier.spec.width)


def test_layout_detection_and_sizes(tmp_path: Path) -> None:
    nhwc = MaskedClassifier(models.nhwc_model(tmp_path)).spec
    assert (nhwc.layout, nhwc.channels, nhwc.height, nhwc.width) == ("NHWC", 1, 32, 32)
    wide = MaskedClassifier(models.wide_model(tmp_path)).spec
    assert (wide.height, wide.width, wide.input_shape) == (48, 192, (1, 48, 192))
    forced = MaskedClassifier(models.nhwc_model(tmp_path), ModelOptions(layout="NHWC")).spec
    assert forced.layout == "NHWC"


def test_output_kind_is_detected_and_overridable(tmp_path: Path, digits: np.ndarray) -> None:
    probabilities = MaskedClassifier(models.probabilities_model(tmp_path))
    logits = MaskedClassifier(models.nhwc_model(tmp_path))
    assert probabilities.output_kind == "probabilities" and logits.output_kind == "logits"
    prediction = probabilities.predict(digits)
    assert np.allclose(prediction.scores.sum(axis=1), 1, atol=1e-5)
    # The confidence is the top probability, not a softmax of probabilities.
    assert np.allclose(prediction.confidences, prediction.scores.max(axis=1), atol=1e-6)
    overridden = MaskedClassifier(
        models.probabilities_model(tmp_path), ModelOptions(output_kind="logits")
    )
    assert overridden.output_kind == "logits"


def test_a_fixed_batch_is_made_dynamic_when_the_graph_allows(tmp_path: Path) -> None:
    editable = MaskedClassifier(models.fixed_batch_model(tmp_path))
    assert editable.batch_mode == "made_dynamic" and editable.model_calls(100) == 1
    assert any("edited" in note for note in editable.notes)
    stuck = MaskedClassifier(models.fixed_batch_unfixable_model(tmp_path))
    assert stuck.batch_mode == "single" and stuck.model_calls(100) == 100
    assert any("one mutant per model call" in note for note in stuck.notes)


def test_single_mode_counts_one_call_per_evaluation(tmp_path: Path, digits: np.ndarray) -> None:
    stuck = MaskedClassifier(models.fixed_batch_unfixable_model(tmp_path))
    result = MpsEngine(stuck, EngineSettings(iters=2)).explain(digits[0])
    assert result.model_calls == result.model_evaluations


def test_predict_returns_the_models_own_output(tmp_path: Path, digits: np.ndarray) -> None:
    path = models.two_outputs_model(tmp_path)
    classifier = MaskedClassifier(path, ModelOptions(output="logits"))
    session = PlainModel(path, output="logits").session
    expected = session.run(["logits"], {session.get_inputs()[0].name: digits})[0]
    assert np.allclose(classifier.predict(digits).scores, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("build", "options", "error", "message"),
    [
        (models.corrupt_model, {}, ModelLoadError, "not a valid ONNX model"),
        (lambda d: Path(d) / "missing.onnx", {}, ModelLoadError, "does not exist"),
        (models.not_image_model, {}, UnsupportedModelError, "rank 2"),
        (models.dynamic_hw_model, {}, UnsupportedModelError, "set height and width"),
        (models.two_outputs_model, {"output": "nope"}, UnsupportedModelError, "no output 'nope'"),
    ],
)
def test_unusable_models_get_one_clear_error(
    tmp_path: Path, build, options, error, message
) -> None:  # noqa: ANN001
    with pytest.raises(error, match=message):
        MaskedClassifier(build(tmp_path), ModelOptions(**options))


def test_a_per_channel_baseline_is_applied_per_channel(tmp_path: Path, digits: np.ndarray) -> None:
    path = models.rgb_model(tmp_path)
    settings = EngineSettings(iters=4, baseline="0.1,0.5,0.9")
    engine = MpsEngine(MaskedClassifier(path), settings)
    plain = PlainModel(path)
    for image in np.repeat(digits[:3], 3, axis=1):
        result = engine.explain(image)
        baseline = settings.baseline.image(image, channel_axis=0)
        assert baseline[:, 0, 0].tolist() == pytest.approx([0.1, 0.5, 0.9])
        kept = masked(image, baseline, result.mps_mask, "NCHW")
        assert plain.top1(kept[None])[0] == result.predicted_class == plain.top1(image[None])[0]
    with pytest.raises(ConfigError, match="2 channel values"):
        MpsEngine(MaskedClassifier(path), EngineSettings(baseline="0.1,0.2"))


def test_a_declared_dynamic_batch_that_does_not_batch_falls_back_to_single(
    tmp_path: Path, digits: np.ndarray
) -> None:
    import onnx

    model = onnx.load(str(models.fixed_batch_unfixable_model(tmp_path)))
    for value in [model.graph.input[0], *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    path = tmp_path / "liar.onnx"
    onnx.save(model, str(path))
    classifier = MaskedClassifier(path)
    assert classifier.batch_mode == "single"
    assert any("declares a dynamic batch" in note for note in classifier.notes)
    result = MpsEngine(classifier, EngineSettings(iters=2)).explain(digits[0])
    assert result.model_calls == result.model_evaluations


def _spinning(classifier: MaskedClassifier) -> str:
    options = classifier._session.get_session_options()
    return options.get_session_config_entry("session.intra_op.allow_spinning")


def test_worker_threads_spin_offline_and_not_in_the_sidecar() -> None:
    from guard.service.guarded_model import load_guarded_model
    from guard.service.settings import ServeSettings

    assert _spinning(MaskedClassifier(demo.DEMO_MODEL)) == "1"
    quiet = MaskedClassifier(demo.DEMO_MODEL, ModelOptions(spin_threads=False))
    assert _spinning(quiet) == "0"
    assert (
        _spinning(
            load_guarded_model(
                ServeSettings(model=demo.DEMO_MODEL, calibration=demo.DEMO_CALIBRATION)
            ).classifier
        )
        == "0"
    )


def test_io_binding_sends_each_requests_images_once_and_changes_nothing(
    digits: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    plain = MaskedClassifier(demo.DEMO_MODEL)
    bound = MaskedClassifier(demo.DEMO_MODEL, ModelOptions(io_binding="on"))
    assert plain.device is None and bound.device == "cpu"  # auto: on with CUDA only
    copies = []
    real = ort.OrtValue.ortvalue_from_numpy
    monkeypatch.setattr(
        ort.OrtValue,
        "ortvalue_from_numpy",
        lambda a, *args: copies.append(a.shape) or real(a, *args),
    )
    for image in digits[:3]:
        expected, got = MpsEngine(plain).explain(image), MpsEngine(bound).explain(image)
        np.testing.assert_array_equal(got.mps_mask, expected.mps_mask)
        np.testing.assert_array_equal(got.responsibility, expected.responsibility)
        assert got.model_evaluations == expected.model_evaluations
        assert got.model_calls == expected.model_calls > 2
    # Images and baselines bound once per MPS (2 copies each), not once per model call.
    assert len(copies) == 3 * 2
    np.testing.assert_array_equal(
        bound.predict(digits[:4]).scores, plain.predict(digits[:4]).scores
    )
