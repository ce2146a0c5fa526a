"""Evidence features: hand-computed values, and model probabilities checked with plain onnxruntime."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from guard import demo
from guard.algorithm.baselines import Baseline
from guard.engine import MpsEngine, MpsResult
from guard.evidence import (
    CONFIDENCE_FEATURES,
    EXTRA_EVALUATIONS,
    EXTRA_MPS,
    FEATURE_GROUPS,
    MPS_FEATURES,
    MPS_GROUPS,
    baselines_for,
    confidence_features,
    extra_evaluations,
    mask_shape_features,
    mps_features,
    responsibility_features,
    stability_features,
)
from guard.runtime import MaskedClassifier
from guard.settings import EngineSettings
from tests.fixtures import models
from tests.oracle import masked

FAST = EngineSettings(iters=5)


def _plain_scores(path: Path, batch: np.ndarray, batch_one: bool = False) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    if batch_one:
        return np.concatenate([session.run(None, {name: b[None]})[0] for b in batch])
    return session.run(None, {name: batch.astype(np.float32)})[0]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# -- confidence ---------------------------------------------------------------------------------


def test_confidence_features_of_logits_match_hand_computed_values() -> None:
    features = confidence_features(np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), "logits")
    assert tuple(features) == CONFIDENCE_FEATURES
    total = math.exp(2) + math.exp(1) + 1
    p = [math.exp(2) / total, math.exp(1) / total, 1 / total]
    expected = {
        "msp": [p[0], 1 / 3],
        "margin": [p[0] - p[1], 0.0],
        "entropy": [-sum(q * math.log(q) for q in p), math.log(3)],
        "max_logit": [2.0, 0.0],
        "energy": [math.log(total), math.log(3)],  # logsumexp: higher = more confident
        # centred logits [1, 0, -1]: max / (1 + 0 + 1)^(1/p); equal logits: 0
        "pnorm_p2": [2**-0.5, 0.0],
        "pnorm_p4": [2**-0.25, 0.0],
        "pnorm_p8": [2**-0.125, 0.0],
    }
    for name, values in expected.items():
        assert features[name] == pytest.approx(values, rel=1e-12, abs=1e-12), name


def test_confidence_features_of_probabilities_use_log_probabilities_as_logits() -> None:
    features = confidence_features(np.array([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]]), "probabilities")
    logs = np.log([0.7, 0.2, 0.1])
    centred = logs - logs.mean()
    assert features["msp"] == pytest.approx([0.7, 1.0])
    assert features["margin"] == pytest.approx([0.5, 1.0])
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert features["entropy"] == pytest.approx([entropy, 0.0])
    assert features["max_logit"] == pytest.approx([math.log(0.7), 0.0])
    assert features["energy"] == pytest.approx([0.0, 0.0], abs=1e-12)  # log(sum p)
    for p in (2, 4, 8):
        norm = (np.abs(centred) ** p).sum() ** (1 / p)
        assert features[f"pnorm_p{p}"][0] == pytest.approx(centred.max() / norm)
    # Zeros are floored before the log: every value finite.
    assert all(np.isfinite(v).all() for v in features.values())
    assert features["pnorm_p2"][1] > 0


def test_pnorm_of_probabilities_equals_pnorm_of_their_logits_and_large_logits_stay_finite() -> None:
    logits = np.array([[3.0, -1.0, 0.5, 2.0], [10.0, 9.0, -4.0, 0.0]])
    from_logits = confidence_features(logits, "logits")
    from_probabilities = confidence_features(_softmax(logits), "probabilities")
    for name in ("msp", "margin", "entropy", "pnorm_p2", "pnorm_p4", "pnorm_p8"):
        assert from_probabilities[name] == pytest.approx(from_logits[name], rel=1e-9), name
    huge = confidence_features(np.array([[1e200, -1e200, 0.0], [3e38, 3e38, -3e38]]), "logits")
    assert all(np.isfinite(v).all() for v in huge.values())
    assert huge["pnorm_p8"][0] == pytest.approx(2**-0.125)
    with pytest.raises(ValueError, match="output_kind"):
        confidence_features(logits, "scores")  # type: ignore[arg-type]


# -- class_probabilities ------------------------------------------------------------------------


def _mutants(images: np.ndarray, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = rng.random((count, 32, 32)) < rng.random((count, 1, 1))
    masks[0] = True
    masks[1] = False
    return masks, rng.integers(0, len(images), count)


def _expected(path, images, baselines, masks, index, classes, probabilities, batch_one=False):  # noqa: ANN001, ANN202
    batch = np.stack(
        [masked(images[j], baselines[j], m, "NCHW") for m, j in zip(masks, index, strict=True)]
    )
    scores = _plain_scores(path, batch, batch_one).astype(np.float64)
    p = scores if probabilities else _softmax(scores)
    rows = np.arange(len(masks))
    top = p.argmax(axis=1)
    return top, p[rows, top], p[rows, classes]


def test_class_probabilities_equal_plain_onnxruntime_on_the_masked_inputs(
    demo_classifier, heldout
) -> None:  # noqa: ANN001
    images = heldout[0][:3]
    baselines = np.full_like(images, 0.25)
    masks, index = _mutants(images, 40)
    classes = np.arange(40) % 10
    got = demo_classifier.class_probabilities(images, baselines, masks, index, classes)
    expected = _expected(demo.DEMO_MODEL, images, baselines, masks, index, classes, False)
    assert np.array_equal(got[0], expected[0])
    assert np.allclose(got[1], expected[1], atol=1e-5)
    assert np.allclose(got[2], expected[2], atol=1e-5)
    assert got[2].std() > 0.1  # not all the same class or all the same probability
    empty = demo_classifier.class_probabilities(
        images, baselines, masks[:0], index[:0], classes[:0]
    )
    assert all(len(part) == 0 for part in empty)


def test_class_probabilities_of_probability_models_and_one_call_per_mutant_in_single_mode(
    tmp_path: Path, heldout, monkeypatch
) -> None:  # noqa: ANN001
    images = heldout[0][:2]
    baselines = np.zeros_like(images)
    masks, index = _mutants(images, 6, seed=1)
    classes = np.array([0, 3, 5, 7, 9, 1])

    path = models.probabilities_model(tmp_path)
    probabilities = MaskedClassifier(path)
    assert probabilities.output_kind == "probabilities"
    got = probabilities.class_probabilities(images, baselines, masks, index, classes)
    expected = _expected(path, images, baselines, masks, index, classes, True)
    for g, e in zip(got, expected, strict=True):
        assert np.allclose(g, e, atol=1e-6)

    path = models.fixed_batch_unfixable_model(tmp_path)
    single = MaskedClassifier(path)
    assert single.batch_mode == "single"
    calls = []
    run = single._run
    monkeypatch.setattr(single, "_run", lambda *a: calls.append(len(a[2])) or run(*a))
    got = single.class_probabilities(images, baselines, masks, index, classes)
    assert calls == [1] * 6
    expected = _expected(path, images, baselines, masks, index, classes, False, batch_one=True)
    assert np.array_equal(got[0], expected[0])
    assert np.allclose(got[2], expected[2], atol=1e-5)


# -- mps_features -------------------------------------------------------------------------------


class CountingClassifier:
    """The demo classifier, counting model calls and the mutants in each."""

    def __init__(self, inner: MaskedClassifier) -> None:
        self.inner, self.spec, self.calls = inner, inner.spec, []

    def check_images(self, images: np.ndarray) -> np.ndarray:
        return self.inner.check_images(images)

    def class_probabilities(self, *args: np.ndarray) -> tuple[np.ndarray, ...]:
        self.calls.append(len(args[2]))
        return self.inner.class_probabilities(*args)


@pytest.fixture(scope="module")
def explained(demo_classifier, heldout) -> tuple[np.ndarray, np.ndarray, list[MpsResult]]:  # noqa: ANN001
    images = heldout[0][:6]
    results = MpsEngine(demo_classifier, FAST).explain_batch(images)
    baselines = baselines_for(demo_classifier, images, FAST.baseline)
    return images, baselines, results


def _ranked_prefix(responsibility: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` pixels by responsibility, ties to the higher flat index (as ReX)."""
    flat = responsibility.ravel()
    order = sorted(range(flat.size), key=lambda i: (flat[i], i), reverse=True)
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:count]] = True
    return keep.reshape(responsibility.shape)


def test_mps_features_equal_a_direct_evaluation_of_the_same_masks(
    demo_classifier, explained
) -> None:  # noqa: ANN001
    images, baselines, results = explained
    assert np.array_equal(baselines, np.zeros_like(images))
    counting = CountingClassifier(demo_classifier)
    records = mps_features(counting, images, baselines, results)
    assert counting.calls == [7 * len(images)]  # one call for the whole batch
    for image, result, record in zip(images, results, records, strict=True):
        assert tuple(record) == MPS_FEATURES
        assert all(math.isfinite(v) for v in record.values())
        mps, c = result.mps_mask, result.predicted_class
        sizes = [10, 20, 51, 102, 205]  # round(f * 1024) for 1, 2, 5, 10, 20%
        keeps = [mps, ~mps] + [_ranked_prefix(result.responsibility, k) for k in sizes]
        batch = np.stack([masked(image, np.zeros_like(image), k, "NCHW") for k in keeps])
        p = _softmax(_plain_scores(demo.DEMO_MODEL, batch).astype(np.float64))
        assert record["mps_only_confidence"] == pytest.approx(p[0, c], abs=1e-5)
        assert record["mps_confidence_ratio"] == pytest.approx(
            p[0, c] / result.confidence, abs=1e-4
        )
        assert record["complement_keeps_class"] == float(p[1].argmax() == c)
        assert record["complement_confidence"] == pytest.approx(p[1, c], abs=1e-5)
        assert record["complement_top_probability"] == pytest.approx(p[1].max(), abs=1e-5)
        curve = [record[f"insertion_{n}"] for n in (1, 2, 5, 10, 20)]
        assert curve == pytest.approx(p[2:, c], abs=1e-5)
        x = [0.01, 0.02, 0.05, 0.10, 0.20]
        auc = sum((curve[i] + curve[i + 1]) / 2 * (x[i + 1] - x[i]) for i in range(4)) / 0.19
        assert record["insertion_auc"] == pytest.approx(auc, abs=1e-9)
        area = max(mps.sum(), 1) / 1024
        assert record["log_mps_area"] == pytest.approx(math.log(area))
        assert record["degenerate"] == float(result.degenerate)
        assert record["baseline_keeps_class"] == float(result.baseline_class == c)
    # The insertion points differ across items: they are not all one constant.
    assert len({round(r["insertion_5"], 6) for r in records}) > 1


def test_each_group_costs_its_extra_evaluations_and_computes_only_its_features(
    demo_classifier, explained
) -> None:  # noqa: ANN001
    images, baselines, results = explained
    everything = mps_features(demo_classifier, images, baselines, results)
    for group in MPS_GROUPS:
        counting = CountingClassifier(demo_classifier)
        records = mps_features(counting, images, baselines, results, groups={group})
        cost = EXTRA_EVALUATIONS[group] * len(images)
        assert counting.calls == ([cost] if cost else []), group
        for record, full in zip(records, everything, strict=True):
            assert tuple(record) == FEATURE_GROUPS[group]
            assert record == {name: full[name] for name in FEATURE_GROUPS[group]}
    counting = CountingClassifier(demo_classifier)
    pair = mps_features(counting, images, baselines, results, groups={"insertion", "mps_only"})
    assert counting.calls == [6 * len(images)]
    assert tuple(pair[0]) == FEATURE_GROUPS["mps_only"] + FEATURE_GROUPS["insertion"]
    assert mps_features(counting, images, baselines, results, groups=set()) == [{}] * len(images)
    assert len(counting.calls) == 1
    assert sum(EXTRA_EVALUATIONS[g] for g in MPS_GROUPS) == 7
    assert EXTRA_MPS == {g: int(g == "stability") for g in FEATURE_GROUPS}
    assert extra_evaluations(MPS_GROUPS, (0.1, 0.5)) == 4
    with pytest.raises(ValueError, match="confidence_features"):
        mps_features(demo_classifier, images, baselines, results, groups={"confidence"})


def test_empty_mps_is_evaluated_like_any_other(demo_classifier, explained) -> None:  # noqa: ANN001
    images, baselines, results = explained
    empty = replace(results[0], mps_mask=np.zeros((32, 32), bool), mps_area_fraction=0.0)
    record = mps_features(demo_classifier, images[:1], baselines[:1], [empty])[0]
    batch = np.stack([np.zeros_like(images[0]), images[0]])  # all baseline; nothing removed
    p = _softmax(_plain_scores(demo.DEMO_MODEL, batch).astype(np.float64))
    c = empty.predicted_class
    assert record["log_mps_area"] == pytest.approx(math.log(1 / 1024))
    assert record["mps_only_confidence"] == pytest.approx(p[0, c], abs=1e-5)
    assert record["complement_confidence"] == pytest.approx(p[1, c], abs=1e-5)
    assert record["responsibility_in_mps"] == 0.0
    assert record["mps_components"] == 0.0 and record["mps_centroid_distance"] == 0.0


def test_baselines_for_uses_the_engines_baseline_per_image(demo_classifier, heldout) -> None:  # noqa: ANN001
    images = heldout[0][:2]
    assert np.array_equal(
        baselines_for(demo_classifier, images, Baseline(value=0.5)), images * 0 + 0.5
    )
    blurred = baselines_for(demo_classifier, images, Baseline(kind="blur", sigma=2.0))
    assert blurred.shape == images.shape and not np.allclose(blurred[0], blurred[1])


# -- hand-made maps and masks -------------------------------------------------------------------


def test_responsibility_features_on_hand_made_maps() -> None:
    r = np.full((4, 4), 0.1)
    r[0, 0], r[0, 1], r[1, 0], r[3, 3] = 1.0, 0.6, 0.4, 0.3  # above the floor: .9 .5 .3 .2
    mps = np.zeros((4, 4), bool)
    mps[0, :2] = True
    features = responsibility_features(r, mps)
    share = r.ravel() / r.sum()
    assert features["responsibility_entropy"] == pytest.approx(
        -(share * np.log(share)).sum() / math.log(16)
    )
    assert features["responsibility_half_max_area"] == pytest.approx(2 / 16)  # .9 and .5 >= .45
    assert features["responsibility_in_mps"] == pytest.approx(1.4 / 1.9)

    spike = np.zeros((4, 4))
    spike[2, 2] = 1.0
    four = np.zeros((4, 4))
    four[:2, :2] = 1.0
    assert responsibility_features(spike, mps)["responsibility_entropy"] == 0.0
    assert responsibility_features(four, mps)["responsibility_entropy"] == pytest.approx(0.5)
    flat = responsibility_features(np.ones((4, 4)), mps)
    assert flat == {
        "responsibility_entropy": pytest.approx(1.0),
        "responsibility_half_max_area": 1.0,
        "responsibility_in_mps": pytest.approx(2 / 16),
    }
    assert responsibility_features(r, np.zeros((4, 4), bool))["responsibility_in_mps"] == 0.0


def test_components_and_centroid_on_hand_made_masks() -> None:
    diagonal = np.eye(5, dtype=bool)  # touching only at corners: 5 components when 4-connected
    assert mask_shape_features(diagonal) == {"mps_components": 5.0, "mps_centroid_distance": 0.0}
    corner = np.zeros((5, 5), bool)
    corner[0, 0] = True
    assert mask_shape_features(corner)["mps_centroid_distance"] == pytest.approx(1.0)
    blob = np.zeros((5, 9), bool)
    blob[0:2, 0:2] = True  # one component, centroid (0.5, 0.5); centre (2, 4)
    blob[4, 8] = True  # a second one; centroid of all five pixels (1.2, 2.0)
    features = mask_shape_features(blob)
    assert features["mps_components"] == 2.0
    assert features["mps_centroid_distance"] == pytest.approx(
        math.hypot(0.8, 2.0) / math.hypot(4, 8) * 2
    )
    assert mask_shape_features(np.zeros((5, 5), bool)) == {
        "mps_components": 0.0,
        "mps_centroid_distance": 0.0,
    }


def test_stability_features(explained) -> None:  # noqa: ANN001
    base = explained[2][0]
    a = np.zeros((32, 32), bool)
    b = np.zeros((32, 32), bool)
    a[:4, :5] = True  # 20 pixels
    b[2:6, :5] = True  # 20 pixels, 10 shared
    first, second = replace(base, mps_mask=a), replace(base, mps_mask=b)
    assert stability_features(first, second) == {"seed_dice": 0.5, "seed_log_area_ratio": 0.0}
    empty = replace(base, mps_mask=np.zeros((32, 32), bool))
    assert stability_features(empty, empty) == {"seed_dice": 1.0, "seed_log_area_ratio": 0.0}
    one_sided = stability_features(first, empty)
    assert one_sided["seed_dice"] == 0.0
    assert one_sided["seed_log_area_ratio"] == pytest.approx(math.log(20))
    assert tuple(one_sided) == FEATURE_GROUPS["stability"]
