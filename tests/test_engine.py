"""The engine on the real demo model, checked independently of the engine's own runtime."""

from __future__ import annotations

import numpy as np
import pytest

from guard import demo
from guard.engine import MpsEngine
from guard.errors import InvalidInputError
from guard.runtime import MaskedClassifier
from guard.settings import EngineSettings
from tests.oracle import PlainModel, masked, shorter_prefix

FAST = EngineSettings(iters=5)


@pytest.fixture(scope="module")
def plain() -> PlainModel:
    return PlainModel(demo.DEMO_MODEL)


def _check_mps(
    plain: PlainModel, image: np.ndarray, baseline: np.ndarray, result, chunk: int
) -> None:  # noqa: ANN001
    original = plain.top1(image[None])[0]
    assert result.predicted_class == original
    mps = result.mps_mask
    assert mps.dtype == bool and mps.shape == (32, 32)
    assert result.mps_area_fraction == pytest.approx(mps.sum() / mps.size)
    assert plain.top1(masked(image, baseline, mps, "NCHW")[None])[0] == original, (
        "MPS not sufficient"
    )
    if mps.any():
        shorter = shorter_prefix(result.responsibility, mps, chunk)
        assert shorter.sum() == mps.sum() - chunk and (shorter <= mps).all()
        assert plain.top1(masked(image, baseline, shorter, "NCHW")[None])[0] != original, (
            "a prefix one chunk shorter already passes: the MPS is not the first sufficient prefix"
        )


def test_every_mps_is_sufficient_and_the_first_sufficient_prefix(
    demo_classifier, heldout, plain
) -> None:  # noqa: ANN001
    x, _ = heldout
    engine = MpsEngine(demo_classifier, FAST)
    images = x[:24]
    for image, result in zip(images, engine.explain_batch(images), strict=True):
        _check_mps(plain, image, np.zeros_like(image), result, FAST.chunk_size)
        assert result.responsibility.max() == pytest.approx(1.0)
        assert result.model_calls < 40 < result.model_evaluations


def test_batched_and_single_explanations_agree_and_repeat(demo_classifier, heldout) -> None:  # noqa: ANN001
    x, _ = heldout
    engine = MpsEngine(demo_classifier, FAST)
    together = engine.explain_batch(x[:4])
    for image, batched in zip(x[:4], together, strict=True):
        alone, again = engine.explain(image), engine.explain(image)
        assert np.array_equal(alone.mps_mask, batched.mps_mask)
        assert np.array_equal(alone.responsibility, again.responsibility)
        assert alone.model_evaluations == batched.model_evaluations


def test_another_seed_gives_another_landscape(demo_classifier, heldout) -> None:  # noqa: ANN001
    image = heldout[0][5]
    a = MpsEngine(demo_classifier, EngineSettings(iters=5, seed=0)).explain(image)
    b = MpsEngine(demo_classifier, EngineSettings(iters=5, seed=1)).explain(image)
    assert not np.array_equal(a.responsibility, b.responsibility)


def test_max_batch_size_splits_calls_without_changing_the_result(demo_classifier, heldout) -> None:  # noqa: ANN001
    image = heldout[0][3]
    big = MpsEngine(demo_classifier, FAST).explain(image)
    small = MpsEngine(demo_classifier, FAST.model_copy(update={"max_batch_size": 16})).explain(
        image
    )
    assert np.array_equal(big.mps_mask, small.mps_mask)
    assert small.model_evaluations == big.model_evaluations
    assert small.model_calls > big.model_calls
    assert small.model_calls >= small.model_evaluations / 16


def test_empty_mps_when_the_baseline_alone_keeps_the_class(demo_classifier, heldout, plain) -> None:  # noqa: ANN001
    x, _ = heldout
    zeros = np.zeros_like(x[:1])
    baseline_class = plain.top1(zeros)[0]
    predictions = plain.top1(x[:200])
    same = np.flatnonzero(predictions == baseline_class)
    assert same.size, "the demo model should predict its all-baseline class for some digits"
    result = MpsEngine(demo_classifier, FAST).explain(x[same[0]])
    assert result.baseline_class == result.predicted_class == baseline_class
    assert not result.mps_mask.any() and result.mps_area_fraction == 0.0 and result.degenerate


def test_single_chunk_mps_is_degenerate_and_larger_ones_are_not(demo_classifier, heldout) -> None:  # noqa: ANN001
    results = MpsEngine(demo_classifier, FAST).explain_batch(heldout[0][:40])
    for r in results:
        assert r.degenerate == (r.mps_pixels <= FAST.chunk_size)
    assert any(not r.degenerate for r in results)


@pytest.mark.parametrize("baseline", ["0.3", "blur:3"])
def test_other_baselines_give_sufficient_mpss(
    demo_classifier, heldout, plain, baseline: str
) -> None:  # noqa: ANN001
    settings = EngineSettings(iters=5, baseline=baseline)
    for image in heldout[0][:6]:
        result = MpsEngine(demo_classifier, settings).explain(image)
        reference = settings.baseline.image(image, channel_axis=0)
        if settings.baseline.kind == "blur":
            assert reference.std() > 0 and not np.allclose(reference, image)
        else:
            assert np.all(reference == np.float32(0.3))
        _check_mps(plain, image, reference, result, settings.chunk_size)


def test_a_wrong_shape_or_non_finite_input_is_rejected(demo_classifier) -> None:  # noqa: ANN001
    engine = MpsEngine(demo_classifier, FAST)
    with pytest.raises(InvalidInputError, match=r"shape \[M, 1, 32, 32\]"):
        engine.explain(np.zeros((1, 28, 28), np.float32))
    bad = np.zeros((1, 32, 32), np.float32)
    bad[0, 3, 3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        engine.explain(bad)


def test_provider_is_reported(demo_classifier: MaskedClassifier) -> None:
    assert demo_classifier.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    cpu = MaskedClassifier(
        demo.DEMO_MODEL, demo_classifier.options.model_copy(update={"provider": "cpu"})
    )
    assert cpu.provider == "CPUExecutionProvider"


def test_a_passed_deadline_stops_the_work(demo_classifier, heldout) -> None:  # noqa: ANN001
    import time

    from guard.errors import DeadlineExceededError

    engine = MpsEngine(demo_classifier, EngineSettings(iters=2))
    with pytest.raises(DeadlineExceededError):
        engine.explain(heldout[0][0], deadline=time.monotonic() - 1)
    later = engine.explain(heldout[0][0], deadline=time.monotonic() + 60)
    assert later.mps_area_fraction == engine.explain(heldout[0][0]).mps_area_fraction
