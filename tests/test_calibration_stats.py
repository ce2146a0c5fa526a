"""Offline statistics of ``guard calibrate``: metrics, fitting, conformal guarantee, artifact."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import mannwhitneyu
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from guard.calibration import detection_metrics as metrics
from guard.calibration.fit import (
    FitResult,
    artifact_from_fit,
    conformal_references,
    fit_calibration,
    stratified_split,
)
from guard.calibration.records import ItemRecord
from guard.errors import ConfigError
from guard.verdict.artifact import (
    CalibrationArtifact,
    ModelInfo,
    load_artifact,
    save_artifact,
    score_prediction,
)
from guard.verdict.conformal import ConformalReference
from guard.verdict.scores.mps import posterior_incorrect

SHA = "ab" * 32
OTHER_SHA = "cd" * 32


def _expit(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _synthetic(
    rng: np.random.Generator,
    n: int,
    *,
    error_rate: float = 0.2,
    logit_mean_correct: float = -2.0,
    logit_mean_incorrect: float = -1.0,
    logit_sd: float = 0.7,
    classes: int = 3,
    all_correct: bool = False,
) -> dict[str, np.ndarray]:
    """Items whose logit(area) is Gaussian per outcome; incorrect ones also less confident."""
    incorrect = np.zeros(n, dtype=bool) if all_correct else rng.random(n) < error_rate
    label = rng.integers(0, classes, n)
    predicted = np.where(incorrect, (label + 1) % classes, label)
    logit = rng.normal(np.where(incorrect, logit_mean_incorrect, logit_mean_correct), logit_sd)
    confidence = np.where(incorrect, rng.beta(4, 4, n), rng.beta(8, 2, n))
    margin = confidence - (1 - confidence) * rng.random(n)
    return {
        "label": label,
        "predicted": predicted,
        "area": _expit(logit),
        "confidence": confidence,
        "margin": np.clip(margin, 0.0, 1.0),
        "incorrect": incorrect,
    }


def _records(items: dict[str, np.ndarray]) -> list[ItemRecord]:
    return [
        ItemRecord(
            key=f"npz:{i}",
            label=int(items["label"][i]),
            predicted_class=int(items["predicted"][i]),
            confidence=float(items["confidence"][i]),
            margin=float(items["margin"][i]),
            mps_area_fraction=float(items["area"][i]),
            degenerate=False,
            baseline_class=7,
        )
        for i in range(items["label"].size)
    ]


def _model_info(sha: str = SHA) -> ModelInfo:
    return ModelInfo(
        sha256=sha,
        input_name="x",
        layout="NCHW",
        channels=3,
        height=32,
        width=32,
        output_name="logits",
        num_classes=10,
    )


def _artifact(fit: FitResult) -> CalibrationArtifact:
    return artifact_from_fit(
        fit,
        model=_model_info(),
        preprocessing={"scale": 255.0},
        engine={"iters": 20, "chunk_size": 10},
        class_names=[f"c{i}" for i in range(10)],
    )


@pytest.fixture(scope="module")
def fitted() -> FitResult:
    rng = np.random.default_rng(1)
    return fit_calibration(_records(_synthetic(rng, 1200)), alpha=0.1, score="mps", n_boot=200)


# --- metrics ---------------------------------------------------------------------------


def test_ranking_metrics_match_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    score = rng.integers(0, 8, 300).astype(float)  # many ties
    incorrect = rng.random(300) < 0.3 + 0.05 * score
    assert metrics.auroc(score, incorrect) == pytest.approx(roc_auc_score(incorrect, score))
    assert metrics.aupr_error(score, incorrect) == pytest.approx(
        average_precision_score(incorrect, score)
    )
    fpr, tpr = metrics.roc_curve(score, incorrect)
    sk_fpr, sk_tpr, _ = sk_roc_curve(incorrect, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_fpr_at_95_tpr_hand_computed() -> None:
    errors = np.arange(1.0, 21.0)  # catching 19 of 20 errors needs threshold 2
    correct = np.array([0.5, 1.5, 2.5, 3.5])  # two of them score >= 2
    score = np.concatenate([errors, correct])
    incorrect = np.r_[np.ones(20, bool), np.zeros(4, bool)]
    assert metrics.fpr_at_95_tpr(score, incorrect) == pytest.approx(0.5)


def test_risk_coverage_and_aurc_hand_computed() -> None:
    coverage, risk = metrics.risk_coverage_curve([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 1 / 2, 1 / 3, 2 / 4])
    assert metrics.aurc([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1]) == pytest.approx(
        (0.5 + 1 / 3 + 0.5) / 4
    )
    # Ties are accepted in random order: expected risk, not the luck of a sort.
    _, risk = metrics.risk_coverage_curve([0.0, 0.0, 1.0], [1, 0, 0])
    np.testing.assert_allclose(risk, [0.5, 0.5, 1 / 3])
    assert metrics.aurc(np.zeros(10), np.arange(10) < 3) == pytest.approx(0.3)


def test_mann_whitney_against_scipy_and_directions() -> None:
    rng = np.random.default_rng(3)
    larger, smaller = rng.normal(1.0, 1, 80), rng.normal(0.0, 1, 200)
    result = metrics.mann_whitney_area(larger, smaller)
    reference = mannwhitneyu(larger, smaller, alternative="two-sided")
    assert result["u_statistic"] == pytest.approx(reference.statistic)
    assert result["p_two_sided"] == pytest.approx(reference.pvalue)
    assert result["p_incorrect_larger"] == pytest.approx(
        mannwhitneyu(larger, smaller, alternative="greater").pvalue
    )
    auc = roc_auc_score(np.r_[np.ones(80), np.zeros(200)], np.r_[larger, smaller])
    assert result["rank_biserial"] == pytest.approx(2 * auc - 1)
    assert result["direction"] == "incorrect larger"
    assert metrics.mann_whitney_area(smaller, larger)["direction"] == "incorrect smaller"
    same = metrics.mann_whitney_area(smaller[:50], smaller[:50])
    assert same["direction"] == "no difference" and same["rank_biserial"] == pytest.approx(0.0)


def test_bootstrap_auroc_difference() -> None:
    rng = np.random.default_rng(4)
    incorrect = rng.random(400) < 0.25
    good = incorrect + rng.normal(0, 0.7, 400)
    weak = incorrect + rng.normal(0, 2.0, 400)
    estimate, low, high = metrics.bootstrap_auroc_difference(good, weak, incorrect, n_boot=500)
    assert estimate == pytest.approx(
        metrics.auroc(good, incorrect) - metrics.auroc(weak, incorrect)
    )
    assert low < estimate < high and low > 0
    assert metrics.bootstrap_auroc_difference(good, weak, incorrect, n_boot=500) == (
        estimate,
        low,
        high,
    )
    assert metrics.bootstrap_auroc_difference(good, good, incorrect, n_boot=200) == (0.0, 0.0, 0.0)


def test_degenerate_inputs_give_nan_without_warnings() -> None:
    one_class = np.zeros(20, dtype=bool)
    score = np.linspace(0, 1, 20)
    constant = np.full(20, 0.3)
    mixed = np.arange(20) % 3 == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s, y in [(score, one_class), (score, ~one_class), (constant, mixed)]:
            assert math.isnan(metrics.auroc(s, y))
            assert math.isnan(metrics.aupr_error(s, y))
            assert math.isnan(metrics.fpr_at_95_tpr(s, y))
            assert all(
                math.isnan(v) for v in metrics.bootstrap_auroc_difference(s, s, y, n_boot=50)
            )
            assert np.isnan(metrics.roc_curve(s, y)[0]).all()
        assert math.isnan(metrics.aurc([], []))
        empty = metrics.mann_whitney_area([], [0.1, 0.2])
        assert math.isnan(empty["p_two_sided"]) and empty["direction"] == "no difference"
        flat = metrics.mann_whitney_area([0.2, 0.2], [0.2, 0.2, 0.2])
        assert math.isnan(flat["p_two_sided"]) and flat["u_statistic"] == 3.0


# --- split, densities, posterior --------------------------------------------------------


def test_stratified_split_is_deterministic_and_balanced() -> None:
    records = _records(_synthetic(np.random.default_rng(5), 501, classes=4))
    fit_idx, hold_idx = stratified_split(records, 0.3, seed=2)
    again = stratified_split(records, 0.3, seed=2)
    np.testing.assert_array_equal(fit_idx, again[0])
    assert not np.array_equal(hold_idx, stratified_split(records, 0.3, seed=3)[1])
    assert np.intersect1d(fit_idx, hold_idx).size == 0
    np.testing.assert_array_equal(np.sort(np.r_[fit_idx, hold_idx]), np.arange(501))
    held = np.zeros(501, dtype=bool)
    held[hold_idx] = True
    strata = {(r.correct, r.predicted_class) for r in records}
    for correct, cls in strata:
        rows = np.array([r.correct == correct and r.predicted_class == cls for r in records])
        assert abs(held[rows].sum() - 0.3 * rows.sum()) < 1 + 1e-9


def test_posterior_matches_analytic_gaussians() -> None:
    prior = 0.2
    mu_c, mu_i, sd = -2.0, -1.0, 0.7
    items = _synthetic(
        np.random.default_rng(6),
        40_000,
        error_rate=prior,
        logit_mean_correct=mu_c,
        logit_mean_incorrect=mu_i,
        logit_sd=sd,
    )
    fit = fit_calibration(_records(items), holdout_fraction=0.25, score="mps", n_boot=0)
    x = np.linspace(-2.5, -0.5, 11)
    got = [
        fit.detector.evaluate(mps_area_fraction=_expit(v), confidence=0.9, predicted_class=0).score[
            0
        ]
        for v in x
    ]

    def analytic(p: float) -> np.ndarray:
        f_i = np.exp(-0.5 * ((x - mu_i) / sd) ** 2)
        f_c = np.exp(-0.5 * ((x - mu_c) / sd) ** 2)
        return p * f_i / (p * f_i + (1 - p) * f_c)

    assert fit.detector.score.area_model.prior_incorrect == pytest.approx(prior, abs=0.01)
    np.testing.assert_allclose(got, analytic(prior), atol=0.04)
    # The check above could not pass with the prior ignored (taken as 1/2).
    assert np.max(np.abs(analytic(0.5) - analytic(prior))) > 0.2


def test_posterior_formula() -> None:
    np.testing.assert_allclose(posterior_incorrect(0.0, 0.0, 0.2), 0.2)
    # log-likelihood ratio log(4) with prior 0.2: 0.2*4 / (0.2*4 + 0.8) = 0.5
    np.testing.assert_allclose(posterior_incorrect(math.log(4.0), 0.0, 0.2), 0.5)
    assert posterior_incorrect(800.0, 0.0, 0.5) == pytest.approx(1.0)


@pytest.mark.parametrize("incorrect_mean", [-3.5, -0.5])
def test_direction_is_learned(incorrect_mean: float) -> None:
    items = _synthetic(
        np.random.default_rng(7),
        1500,
        logit_mean_correct=-2.0,
        logit_mean_incorrect=incorrect_mean,
    )
    fit = fit_calibration(_records(items), alpha=0.1, score="mps", n_boot=0)
    auroc = fit.metrics.scores["mps"].auroc
    assert auroc is not None and auroc > 0.8
    artifact = _artifact(fit)
    typical = score_prediction(
        artifact, mps_area_fraction=float(_expit(-2.0)), confidence=0.9, predicted_class=1
    )
    odd = score_prediction(
        artifact,
        mps_area_fraction=float(_expit(incorrect_mean)),
        confidence=0.9,
        predicted_class=1,
    )
    assert not typical.flagged and typical.reason == "ok"
    assert odd.flagged and odd.reason == "suspicious_mps_area" and odd.p_value <= 0.1
    assert odd.score > typical.score


def test_per_class_densities_fall_back_to_pooled() -> None:
    rng = np.random.default_rng(8)
    records: list[ItemRecord] = []
    # class 0: plenty of both; class 1: too few errors; class 2: too few correct
    for cls, n_correct, n_incorrect in [(0, 120, 40), (1, 120, 4), (2, 10, 40)]:
        for i in range(n_correct + n_incorrect):
            wrong = i >= n_correct
            records.append(
                ItemRecord(
                    key=f"npz:{len(records)}",
                    label=(cls + 1) % 3 if wrong else cls,
                    predicted_class=cls,
                    confidence=0.6 if wrong else 0.9,
                    margin=0.3,
                    mps_area_fraction=float(_expit(rng.normal(-1.0 if wrong else -2.0, 0.7))),
                    degenerate=False,
                    baseline_class=5,
                )
            )
    fit = fit_calibration(records, score="mps", n_boot=0)
    assert set(fit.detector.score.area_model.per_class) == {0}
    assert any("pooled" in note for note in fit.notes)

    def score(cls: int, area: float) -> float:
        return float(
            fit.detector.evaluate(
                mps_area_fraction=area, confidence=0.9, predicted_class=cls
            ).score[0]
        )

    for area in (0.05, 0.2, 0.4):
        assert score(1, area) == score(2, area) == score(9, area)  # 9: never seen
        assert score(0, area) != score(1, area)


def test_no_errors_is_handled_gracefully() -> None:
    items = _synthetic(np.random.default_rng(9), 300, all_correct=True)
    assert fit_calibration(_records(items), n_boot=0).metrics.selected_score == "msp"
    fit = fit_calibration(_records(items), score="mps", n_boot=100)
    assert fit.metrics.scores["mps"].auroc is None
    assert fit.metrics.false_alarm_rate_holdout == 0.0
    assert fit.candidates["combined"].coefficients == [0.0, 0.0, 0.0]
    assert any("No incorrect predictions" in note for note in fit.notes)
    verdict = score_prediction(
        _artifact(fit), mps_area_fraction=0.9, confidence=0.2, predicted_class=0
    )
    assert not verdict.flagged


# --- conformal guarantee -----------------------------------------------------------------


def test_conformal_p_value_formula() -> None:
    reference = ConformalReference.from_values([4.0, 1.0, 3.0, 2.0], alpha=0.2)
    np.testing.assert_allclose(reference.p_values([0.0, 3.5, 4.0, 5.0]), [1.0, 0.4, 0.4, 0.2])
    assert reference.threshold == 4.0  # flag s > 4: p = 1/5 <= 0.2
    assert ConformalReference.from_values([1.0, 2.0], alpha=0.2).threshold is None


def _false_alarm_rates(
    fit: FitResult, *, alpha: float, n_reference: int, flag_small_tail: bool, repetitions: int
) -> np.ndarray:
    """False-alarm rate on fresh correct items, each repetition with a fresh reference."""
    rng = np.random.default_rng(10)
    kind = fit.detector.score_kind
    rates = []
    for _ in range(repetitions):
        items = _synthetic(rng, n_reference + 200, all_correct=True)
        scored = fit.detector.evaluate(
            mps_area_fraction=items["area"],
            confidence=items["confidence"],
            predicted_class=items["predicted"],
            margin=items["margin"],
        )
        score_ref, small_ref = conformal_references(
            scored.score[:n_reference],
            items["area"][:n_reference],
            alpha=alpha,
            flag_small_tail=flag_small_tail,
        )
        detector = fit.detector.model_copy(
            update={
                "alpha": alpha,
                "flag_small_tail": flag_small_tail,
                "score_reference": score_ref,
                "small_tail_reference": small_ref,
            }
        )
        fresh = slice(n_reference, None)
        verdicts = detector.evaluate(
            mps_area_fraction=items["area"][fresh],
            confidence=items["confidence"][fresh],
            predicted_class=items["predicted"][fresh],
            margin=items["margin"][fresh],
        )
        assert kind == detector.score_kind
        rates.append(verdicts.flagged.mean())
    return np.asarray(rates)


@pytest.mark.parametrize("kind", ["mps", "msp", "combined"])
def test_conformal_false_alarm_rate_is_alpha(kind: str) -> None:
    fit = fit_calibration(
        _records(_synthetic(np.random.default_rng(11), 1000)), score=kind, n_boot=0
    )
    # n = 49 and alpha = 0.1: alpha (n + 1) is whole, so the rate is exactly alpha in
    # expectation; an off-by-one p-value would give 0.12 (or 0.08).
    rates = _false_alarm_rates(
        fit, alpha=0.1, n_reference=49, flag_small_tail=False, repetitions=300
    )
    se = rates.std(ddof=1) / math.sqrt(rates.size)
    assert abs(rates.mean() - 0.1) < 4 * se
    assert se < 0.004


def test_two_tails_share_alpha() -> None:
    fit = fit_calibration(
        _records(_synthetic(np.random.default_rng(12), 1000)), score="msp", n_boot=0
    )
    # Each tail at 0.05 with n = 39: 2/40 each, so about 0.0975 for two independent tails;
    # each at the full alpha would give about 0.19.
    rates = _false_alarm_rates(
        fit, alpha=0.1, n_reference=39, flag_small_tail=True, repetitions=300
    )
    se = rates.std(ddof=1) / math.sqrt(rates.size)
    assert rates.mean() < 0.1 + 4 * se
    assert rates.mean() > 0.0975 - 4 * se


def test_holdout_is_split_into_reference_and_evaluation(fitted: FitResult) -> None:
    m = fitted.metrics
    parts = [fitted.fit_indices, fitted.reference_indices, fitted.evaluation_indices]
    everything = np.concatenate(parts)
    assert np.unique(everything).size == everything.size == m.n_items
    reference = fitted.detector.score_reference.values
    assert len(reference) == m.n_reference_correct > 0
    assert m.n_evaluation_correct > 0
    assert abs(m.n_reference_correct - m.n_evaluation_correct) <= 3
    assert m.false_alarm_rate_holdout is not None and m.false_alarm_rate_holdout <= 0.2
    assert m.detection_rate_holdout is not None and m.detection_rate_holdout > 0.2


# --- artifact ----------------------------------------------------------------------------


def test_artifact_round_trip_scores_identically(tmp_path: Path, fitted: FitResult) -> None:
    artifact = _artifact(fitted)
    path = tmp_path / "calibration.json"
    save_artifact(artifact, path)
    loaded = load_artifact(path, model_sha256=SHA)
    assert loaded == artifact
    for area in (0.001, 0.05, 0.12, 0.3, 0.7, 1.0):
        for cls in (0, 1, 2, 9):
            kwargs = {"mps_area_fraction": area, "confidence": 0.7, "predicted_class": cls}
            assert score_prediction(loaded, **kwargs) == score_prediction(artifact, **kwargs)


def _write_altered(
    tmp_path: Path, fitted: FitResult, change: Callable[[dict[str, Any]], None]
) -> Path:
    data = json.loads(_artifact(fitted).model_dump_json())
    change(data)
    path = tmp_path / "altered.json"
    path.write_text(json.dumps(data))
    return path


def test_artifact_validation_is_strict(tmp_path: Path, fitted: FitResult) -> None:
    top = _write_altered(tmp_path, fitted, lambda d: d.update(surprise=1))
    with pytest.raises(ConfigError, match="surprise"):
        load_artifact(top)
    nested = _write_altered(tmp_path, fitted, lambda d: d["detector"].update(alpah=0.1))
    with pytest.raises(ConfigError, match="alpah"):
        load_artifact(nested)
    version = _write_altered(tmp_path, fitted, lambda d: d.update(schema_version=99))
    with pytest.raises(ConfigError, match="schema_version 99"):
        load_artifact(version)
    tampered = _write_altered(
        tmp_path, fitted, lambda d: d["detector"]["score_reference"].update(alpha=0.5)
    )
    with pytest.raises(ConfigError, match="invalid"):
        load_artifact(tampered)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_artifact(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_artifact(tmp_path / "missing.json")


def test_model_hash_mismatch(tmp_path: Path, fitted: FitResult) -> None:
    path = tmp_path / "calibration.json"
    save_artifact(_artifact(fitted), path)
    with pytest.raises(ConfigError) as caught:
        load_artifact(path, model_sha256=OTHER_SHA)
    message = str(caught.value)
    assert SHA[:12] in message and OTHER_SHA[:12] in message
    assert "re-run guard calibrate" in message and "allow_model_mismatch=True" in message
    loaded = load_artifact(path, model_sha256=OTHER_SHA, allow_model_mismatch=True)
    assert loaded.model.sha256 == SHA


def test_small_tail_verdict(fitted: FitResult) -> None:
    fit = fit_calibration(
        _records(_synthetic(np.random.default_rng(13), 1200)),
        alpha=0.1,
        flag_small_tail=True,
        score="mps",
        n_boot=0,
    )
    assert fit.detector.score_reference.alpha == fit.detector.small_tail_reference.alpha == 0.05
    artifact = _artifact(fit)
    tiny = score_prediction(artifact, mps_area_fraction=1e-4, confidence=0.9, predicted_class=0)
    assert tiny.flagged and tiny.reason == "myopic_mps" and tiny.p_value <= 0.1
    large = score_prediction(artifact, mps_area_fraction=0.6, confidence=0.9, predicted_class=0)
    assert large.flagged and large.reason == "suspicious_mps_area"


# --- records -----------------------------------------------------------------------------


def test_record_json_line_round_trip() -> None:
    record = ItemRecord("npz:3", 2, 1, 0.8125, 0.5, 0.0234375, True, 0)
    line = record.to_json_line()
    assert "\n" not in line and ItemRecord.from_json_line(line) == record
    assert not record.correct and ItemRecord("a", 1, 1, 0.9, 0.1, 0.5, False, 0).correct
    for bad in [line[:-5], "[]", line.replace('"label":2', '"label":true')]:
        with pytest.raises(ValueError):
            ItemRecord.from_json_line(bad)
    with pytest.raises(ValueError):
        ItemRecord("b", 1, 1, 0.9, 0.1, 1.5, False, 0)


def test_record_accepts_numpy_scalars() -> None:
    record = ItemRecord(
        "npz:0",
        np.int64(1),
        np.int32(1),
        np.float32(0.75),
        np.float64(0.5),
        0.25,
        np.bool_(False),
        0,
    )
    assert type(record.label) is int and type(record.confidence) is float
    assert ItemRecord.from_json_line(record.to_json_line()) == record
    with pytest.raises(TypeError):
        ItemRecord("npz:1", 1.5, 1, 0.9, 0.1, 0.5, False, 0)  # a class index must be whole
