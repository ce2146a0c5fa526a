"""The detection issue's guarantees: the choice of score, its honesty, and the three thresholds."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from guard.calibration import detection_metrics as metrics
from guard.calibration.fit import artifact_from_fit, fit_calibration
from guard.calibration.records import ItemRecord
from guard.calibration.report import write_report
from guard.verdict.artifact import ModelInfo, load_artifact, save_artifact
from guard.verdict.conformal import ConformalReference

FIXTURES = Path(__file__).parent / "fixtures" / "artifacts"


def _items(
    rng: np.random.Generator, n: int, *, mps_signal: float, classes: int = 4
) -> list[ItemRecord]:
    """Items whose confidence is weakly informative and whose MPS feature carries
    ``mps_signal`` standard deviations of separation between errors and correct ones."""
    incorrect = rng.random(n) < 0.2
    label = rng.integers(0, classes, n)
    predicted = np.where(incorrect, (label + 1) % classes, label)
    confidence = np.clip(rng.normal(np.where(incorrect, 0.75, 0.8), 0.1), 0.3, 1.0)
    complement = rng.normal(np.where(incorrect, mps_signal, 0.0), 1.0)
    area = 1.0 / (1.0 + np.exp(-rng.normal(-2.0, 0.7, n)))
    return [
        ItemRecord(
            key=f"npz:{i}",
            label=int(label[i]),
            predicted_class=int(predicted[i]),
            confidence=float(confidence[i]),
            margin=float(confidence[i] * 0.8),
            mps_area_fraction=float(area[i]),
            degenerate=False,
            baseline_class=0,
            features={
                "msp": float(confidence[i]),
                "margin": float(confidence[i] * 0.8),
                "entropy": float(1.0 - confidence[i]),
                "complement_confidence": float(complement[i]),
                "log_mps_area": float(np.log(area[i])),
            },
        )
        for i in range(n)
    ]


def test_auto_keeps_the_simpler_score_when_the_mps_adds_nothing() -> None:
    fit = fit_calibration(_items(np.random.default_rng(0), 1200, mps_signal=0.0), n_boot=300)
    m = fit.metrics
    assert m.selected_score in ("msp", "confidence", "class-confidence")
    assert not fit.detector.needs_mps
    assert "did not measurably improve" in m.selection
    assert m.mps_increment is not None and m.mps_increment.baseline == "class-confidence"
    assert any("no measurable detection value" in n or "no detection value" in n for n in fit.notes)


def test_auto_takes_an_mps_score_when_it_measurably_helps() -> None:
    fit = fit_calibration(_items(np.random.default_rng(1), 1200, mps_signal=2.5), n_boot=300)
    m = fit.metrics
    assert m.selected_score == "evidence" and fit.detector.needs_mps
    assert "complement_confidence" in fit.detector.features
    assert m.scores["evidence"].auroc > m.scores["msp"].auroc + 0.1
    low, _ = m.mps_increment.ci
    assert low is not None and low > 0
    assert any("The MPS adds detection value" in n for n in fit.notes)


def _with_margin(records: list[ItemRecord], margin: np.ndarray) -> list[ItemRecord]:
    return [
        ItemRecord(
            **{**r.__dict__, "margin": float(m), "features": {**r.features, "margin": float(m)}}
        )
        for r, m in zip(records, margin, strict=True)
    ]


def test_auto_keeps_msp_unless_another_confidence_score_measurably_beats_it() -> None:
    rng = np.random.default_rng(5)
    records = _items(rng, 1200, mps_signal=0.0)
    msp = np.array([r.features["msp"] for r in records])
    incorrect = np.array([not r.correct for r in records])
    # A margin that ranks like MSP up to noise: slightly better or worse by chance only.
    noisy = _with_margin(records, msp + rng.normal(0.0, 0.002, msp.size))
    kept = fit_calibration(noisy, n_boot=300).metrics
    assert kept.selected_score == "msp"
    # A margin that really separates errors: it must win, and the reason must say so.
    informative = _with_margin(
        records, np.where(incorrect, 0.2, 0.8) + rng.normal(0, 0.2, msp.size)
    )
    won = fit_calibration(informative, n_boot=300).metrics
    assert won.selected_score in ("confidence", "class-confidence")
    assert "measurably improves on MSP" in won.selection
    assert won.scores[won.selected_score].auroc > won.scores["msp"].auroc + 0.1


def test_no_held_out_item_touches_the_fit_or_the_choice() -> None:
    records = _items(np.random.default_rng(2), 800, mps_signal=1.0)
    fit = fit_calibration(records, n_boot=0)
    held = set(np.concatenate([fit.reference_indices, fit.evaluation_indices]).tolist())
    # Scramble every held-out item's features and labels: nothing fitted or chosen may move.
    rng = np.random.default_rng(3)
    scrambled = [
        ItemRecord(**{
            **r.__dict__,
            "label": int(rng.integers(0, 4)),
            "confidence": float(rng.random()),
            "features": {k: float(rng.normal()) for k in r.features},
        }) if i in held else r
        for i, r in enumerate(records)
    ]  # fmt: skip
    # The split is stratified on correctness, so keep each held-out item's correctness.
    scrambled = [
        s if s.correct == r.correct else ItemRecord(**{**s.__dict__, "label": r.label})
        for s, r in zip(scrambled, records, strict=True)
    ]
    again = fit_calibration(scrambled, n_boot=0)
    assert np.array_equal(again.fit_indices, fit.fit_indices)
    assert again.candidates == fit.candidates
    assert again.metrics.selected_score == fit.metrics.selected_score
    assert again.metrics.selection == fit.metrics.selection


def _far_over_draws(delta: float | None, *, n: int, alpha: float, draws: int) -> np.ndarray:
    """True false-alarm rate of the threshold set on each of ``draws`` fresh references."""
    rng = np.random.default_rng(4)
    rates = []
    for _ in range(draws):
        reference = ConformalReference.from_values(rng.random(n), alpha, delta)
        # Scores are uniform on [0, 1]: the rate of flagging is 1 - threshold.
        rates.append(0.0 if reference.threshold is None else 1.0 - reference.threshold)
    return np.asarray(rates)


def test_calibration_conditional_threshold_holds_with_probability_one_minus_delta() -> None:
    alpha, delta, n = 0.1, 0.1, 200
    conditional = _far_over_draws(delta, n=n, alpha=alpha, draws=2000)
    marginal = _far_over_draws(None, n=n, alpha=alpha, draws=2000)
    exceed = float(np.mean(conditional > alpha))
    assert exceed <= delta + 3 * math.sqrt(delta * (1 - delta) / 2000)
    # The marginal rule is right on average but exceeds alpha in about half of the draws: the
    # conditional one is what makes the difference.
    assert abs(marginal.mean() - alpha) < 0.005
    assert np.mean(marginal > alpha) > 0.3
    assert conditional.mean() < marginal.mean()


def test_the_spread_of_a_marginal_threshold_is_predicted_and_reported() -> None:
    alpha, n = 0.05, 43
    rates = _far_over_draws(None, n=n, alpha=alpha, draws=4000)
    reference = ConformalReference.from_values(np.arange(n, dtype=float), alpha)
    high = reference.false_alarm_quantile(0.9)
    assert high is not None and high > 1.5 * alpha
    assert abs(np.mean(rates > high) - 0.1) < 3 * math.sqrt(0.1 * 0.9 / 4000)
    # A small reference gets the note; the calibration-conditional threshold does not need it.
    records = _items(np.random.default_rng(7), 200, mps_signal=0.0)
    marginal = fit_calibration(records, n_boot=0)
    assert marginal.metrics.n_reference_correct < 60
    assert any("1 draw of 10" in note for note in marginal.notes)
    conditional = fit_calibration(records, n_boot=0, delta=0.1)
    assert not any("1 draw of 10" in note for note in conditional.notes)


def test_per_class_threshold_keeps_each_class_at_alpha() -> None:
    rng = np.random.default_rng(5)
    # Correct predictions of class 1 are much less confident than those of class 0.
    records = []
    for i in range(4000):
        c = i % 2
        wrong = rng.random() < 0.1
        conf = float(np.clip(rng.normal(0.9 if c == 0 else 0.6, 0.05), 0.01, 1.0))
        records.append(
            ItemRecord(
                f"npz:{i}", (c + 1) % 2 if wrong else c, c, conf - 0.2 * wrong, 0.5, 0.1, False, 0
            )  # fmt: skip
        )
    per_class = fit_calibration(records, per_class=True, score="msp", alpha=0.1, n_boot=0)
    pooled = fit_calibration(records, per_class=False, score="msp", alpha=0.1, n_boot=0)
    assert set(per_class.detector.class_references) == {0, 1}
    fresh = {
        "msp": np.r_[rng.normal(0.9, 0.05, 5000), rng.normal(0.6, 0.05, 5000)],
        "predicted_class": np.r_[np.zeros(5000), np.ones(5000)],
    }
    by_class = per_class.detector.evaluate(fresh).flagged
    by_pool = pooled.detector.evaluate(fresh).flagged
    for c in (0, 1):
        assert by_class[fresh["predicted_class"] == c].mean() < 0.1 + 0.02
    # Pooled, the guarantee holds on average only: class 1 takes nearly all the alarms.
    assert by_pool[fresh["predicted_class"] == 1].mean() > 0.15


def test_summary_figures_are_recomputed_from_records_csv(tmp_path: Path) -> None:
    records = _items(np.random.default_rng(6), 600, mps_signal=1.5)
    fit = fit_calibration(records, n_boot=200, seed=0)
    artifact = artifact_from_fit(
        fit,
        model=ModelInfo(
            sha256="ab" * 32,
            input_name="x",
            layout="NCHW",
            channels=1,
            height=8,
            width=8,
            output_name="y",
            num_classes=4,
        ),  # fmt: skip
        preprocessing=None,
        engine={},
        class_names=[],
    )
    write_report(tmp_path, artifact, fit, records, [])
    summary = json.loads((tmp_path / "summary.json").read_text())
    with (tmp_path / "records.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    held = [r for r in rows if r["split"].startswith("holdout")]
    y = np.array([r["correct"] == "0" for r in held])
    assert summary["selected_score"] == fit.metrics.selected_score
    for kind, figures in summary["scores"].items():
        s = np.array([float(r[f"score_{kind}"]) for r in held])
        assert figures["auroc"] == pytest.approx(metrics.auroc(s, y), abs=1e-12)
        assert figures["aurc"] == pytest.approx(metrics.aurc(s, y), abs=1e-12)
        assert figures["fpr_at_95tpr"] == pytest.approx(metrics.fpr_at_95_tpr(s, y), abs=1e-12)
        assert figures["aupr_error"] == pytest.approx(metrics.aupr_error(s, y), abs=1e-12)
        ci = metrics.bootstrap_interval(metrics.auroc, s, y, n_boot=200, seed=0)
        assert figures["auroc_ci"] == pytest.approx(list(ci), abs=1e-12)
    inc = summary["mps_increment"]
    a = np.array([float(r[f"score_{inc['candidate']}"]) for r in held])
    b = np.array([float(r[f"score_{inc['baseline']}"]) for r in held])
    diff = metrics.bootstrap_auroc_difference(a, b, y, n_boot=200, seed=0)
    assert inc["auroc_diff"] == pytest.approx(diff[0], abs=1e-12)
    assert inc["ci"] == pytest.approx([diff[1], diff[2]], abs=1e-12)
    evaluation_correct = [
        r for r in rows if r["split"] == "holdout-evaluation" and r["correct"] == "1"
    ]
    far = np.mean([r["flagged"] == "1" for r in evaluation_correct])
    assert summary["false_alarm_rate_holdout"] == pytest.approx(far)
    assert summary["false_alarm_rates"]["marginal"]["n"] == len(evaluation_correct)


def test_a_version_1_calibration_loads_and_scores_as_it_did(tmp_path: Path) -> None:
    old = json.loads((FIXTURES / "calibration_v1.json").read_text())
    artifact = load_artifact(FIXTURES / "calibration_v1.json")
    assert artifact.engine["empty_mps"] is True and artifact.engine["random_stream"] == "counter"
    assert artifact.detector.score.kind == "combined"
    fitted = old["detector"]["combined"]
    area, conf, margin = 0.02, 0.93, 0.88
    x = np.array([np.log(area) - np.log1p(-area), conf, margin])
    z = (x - np.array(fitted["means"])) / np.array(fitted["stds"])
    expected = 1 / (1 + np.exp(-(z @ np.array(fitted["coefficients"]) + fitted["intercept"])))
    verdict = artifact.detector.evaluate(
        mps_area_fraction=[area], confidence=[conf], margin=[margin], predicted_class=[3]
    )[0]
    assert verdict.score == pytest.approx(expected, rel=1e-12)
    # Saved again, it is a version-2 document that loads the same.
    save_artifact(artifact, tmp_path / "v2.json")
    assert json.loads((tmp_path / "v2.json").read_text())["schema_version"] == 2
    assert load_artifact(tmp_path / "v2.json") == artifact


def test_the_martingale_stays_low_on_exchangeable_traffic_and_rises_on_a_shift() -> None:
    from guard.verdict.martingale import ExchangeabilityMartingale, smoothed_p_values

    rng = np.random.default_rng(7)
    reference = rng.normal(size=400)
    # Smoothed p-values are uniform under exchangeability (over draws of the reference and
    # the new item), ties included.
    p = np.array([
        smoothed_p_values(np.sort(np.round(rng.normal(size=19), 0)), np.round(rng.normal(), 0), rng)[0]
        for _ in range(8000)
    ])  # fmt: skip
    assert abs(p.mean() - 0.5) < 0.01 and abs(np.mean(p <= 0.05) - 0.05) < 0.008
    # Under the null, P(sup M >= 1/delta) <= delta (Ville), over draws of the calibration
    # reference and of the traffic: count runs that ever cross 20.
    crossed = 0
    for run in range(200):
        m = ExchangeabilityMartingale(rng.normal(size=400), seed=run)
        crossed += any(m.update(rng.normal(size=10)) >= 20 for _ in range(50))
    assert crossed / 200 <= 0.05 + 0.03
    # A 30% share of more suspicious traffic is found within a few hundred predictions.
    m = ExchangeabilityMartingale(reference, seed=0)
    seen = 0
    while m.value < 20 and seen < 2000:
        shifted = np.where(rng.random(10) < 0.3, rng.normal(2.5, 0.5, 10), rng.normal(size=10))
        m.update(shifted)
        seen += 10
    assert seen < 600


def test_too_few_items_get_one_clear_message() -> None:
    from guard.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="at least 10 items in the fit split"):
        fit_calibration(_items(np.random.default_rng(8), 6, mps_signal=0.0), n_boot=0)


def test_evidence_names_only_the_terms_a_prediction_has() -> None:
    from guard.verdict.scores.linear import LinearScore

    score = LinearScore(
        kind="class-confidence",
        terms=["msp", "class=1", "class=2", "class=1*msp"],
        means=[0.8, 0.3, 0.3, 0.25],
        stds=[0.1, 0.45, 0.45, 0.4],
        coefficients=[-1.0, -2.0, 1.5, -0.5],
        intercept=0.0,
    )
    features = {"msp": np.array([0.5, 0.5, 0.5]), "predicted_class": np.array([1.0, 2.0, 0.0])}
    evidence = score.contributions(features)
    for row, predicted in zip(evidence, (1, 2, 0), strict=True):
        named = {name.split("*")[0] for name, _ in row if name.startswith("class=")}
        assert named <= {f"class={predicted}"}, (predicted, row)
        assert all(value > 0 for _, value in row)
    # Class 2's own term pushes its score up; the low MSP pushes every score up.
    assert ("class=2", pytest.approx((1 - 0.3) / 0.45 * 1.5)) in evidence[1]
    assert evidence[2] == [("msp", pytest.approx(3.0))]
