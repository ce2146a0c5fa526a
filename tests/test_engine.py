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
    keeps = plain.top1(baseline[None])[0] == original
    assert result.baseline_keeps_class == keeps
    assert mps.any(), "by default (rex-xai's) extraction starts at the first chunk"
    if mps.sum() > chunk:  # the empty prefix is never tested
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


def _baseline_class_items(x: np.ndarray, plain: PlainModel) -> np.ndarray:
    baseline_class = plain.top1(np.zeros_like(x[:1]))[0]
    same = np.flatnonzero(plain.top1(x[:200]) == baseline_class)
    assert same.size, "the demo model should predict its all-baseline class for some digits"
    return same


def test_when_the_baseline_alone_keeps_the_class_the_mps_still_starts_at_the_first_chunk(
    demo_classifier, heldout, plain
) -> None:  # noqa: ANN001
    x, _ = heldout
    same = _baseline_class_items(x, plain)[:3]
    strict = MpsEngine(demo_classifier, FAST.model_copy(update={"empty_mps": True}))
    rex_like = MpsEngine(demo_classifier, FAST).explain_batch(x[same])
    for image, result, empty in zip(x[same], rex_like, strict.explain_batch(x[same]), strict=True):
        assert result.baseline_keeps_class and empty.baseline_keeps_class and result.degenerate
        assert result.baseline_class == result.predicted_class == empty.predicted_class
        _check_mps(plain, image, np.zeros_like(image), result, FAST.chunk_size)
        # empty_mps: the strict reading of Definition 1, the empty set is tested first
        assert not empty.mps_mask.any() and empty.mps_area_fraction == 0.0 and empty.degenerate
        assert np.array_equal(empty.responsibility, result.responsibility)
        assert empty.model_evaluations < result.model_evaluations


def test_empty_mps_changes_nothing_where_the_baseline_gets_another_class(
    demo_classifier, heldout
) -> None:  # noqa: ANN001
    images = heldout[0][:12]
    default = MpsEngine(demo_classifier, FAST).explain_batch(images)
    strict = MpsEngine(demo_classifier, FAST.model_copy(update={"empty_mps": True}))
    for a, b in zip(default, strict.explain_batch(images), strict=True):
        if not a.baseline_keeps_class:
            assert np.array_equal(a.mps_mask, b.mps_mask)
            assert a.model_evaluations == b.model_evaluations


def test_single_chunk_mps_is_degenerate_and_larger_ones_are_not(demo_classifier, heldout) -> None:  # noqa: ANN001
    results = MpsEngine(demo_classifier, FAST).explain_batch(heldout[0][:40])
    for r in results:
        assert r.degenerate == (r.mps_pixels <= FAST.chunk_size or r.baseline_keeps_class)
        assert r.mps_pixels >= FAST.chunk_size
    assert any(not r.degenerate for r in results)


def test_the_rex_stream_is_deterministic_and_another_landscape(demo_classifier, heldout) -> None:  # noqa: ANN001
    images = heldout[0][:3]
    rex = FAST.model_copy(update={"random_stream": "rex"})
    first = MpsEngine(demo_classifier, rex).explain_batch(images)
    alone = MpsEngine(demo_classifier, rex).explain(images[1])
    counter = MpsEngine(demo_classifier, FAST).explain_batch(images)
    assert np.array_equal(first[1].responsibility, alone.responsibility)
    assert np.array_equal(first[1].mps_mask, alone.mps_mask)
    assert not all(
        np.array_equal(a.responsibility, b.responsibility)
        for a, b in zip(first, counter, strict=True)
    )


@pytest.mark.parametrize("seed", [-1, 2**32 - 5])
def test_the_rex_stream_refuses_seeds_numpy_cannot_take(demo_classifier, seed: int) -> None:  # noqa: ANN001
    from guard.errors import ConfigError

    with pytest.raises(ConfigError, match="random_stream rex"):
        MpsEngine(demo_classifier, FAST.model_copy(update={"random_stream": "rex", "seed": seed}))


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
