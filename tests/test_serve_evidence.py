"""What a check computes and shows: exactly the evidence groups the calibrated score reads,
the verdict with its evidence (Explain, the verdict log), MPSs only where they pay
(``explain="flagged"``), and the exchangeability martingale of the served scores."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from guard import demo
from guard.calibration.fit import artifact_from_fit, fit_calibration
from guard.calibration.run import run_items
from guard.cli import app
from guard.datasets import open_labelled_data
from guard.engine import MpsEngine
from guard.evidence import FEATURE_GROUPS, MPS_GROUPS, STABILITY_SEED_OFFSET, item_features
from guard.preprocess import Preprocessing
from guard.runtime import MaskedClassifier
from guard.service import guarded_model
from guard.service.guarded_model import GuardedModel, feature_groups
from guard.settings import EngineSettings
from guard.transport.grpc.client import GuardClient
from guard.verdict.artifact import CalibrationArtifact, load_artifact, save_artifact
from guard.verdict.detector import Detector
from guard.verdict.scores import LinearScore
from tests.serving import (
    LOOPBACK,
    infer_request,
    inference_stub,
    output_arrays,
    running_sidecar,
    scrape,
    value,
    wait_for,
)

MODEL = "digits_cnn"
ALL_GROUPS = tuple(FEATURE_GROUPS)
# The terms of a hand-made evidence score that reads two MPS groups and nothing else.
RESTRICTED_TERMS = ("msp", "class=3", "mps_components", "complement_confidence")


# -- calibrations -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Calibration files for the demo model: "evidence" (an evidence score fitted on the
    records of 80 held-out digits with every feature group, engine iters 3), "restricted"
    (its detector with the score cut to RESTRICTED_TERMS), and "no-reference" (the demo's
    without the exchangeability reference, as an older guard calibrate wrote it)."""
    directory = tmp_path_factory.mktemp("calibrations")
    classifier = MaskedClassifier(demo.DEMO_MODEL)
    shipped = load_artifact(demo.DEMO_CALIBRATION)
    settings = EngineSettings.model_validate({**shipped.engine, "iters": 3})
    preprocessing = Preprocessing.model_validate(shipped.preprocessing or {})
    data = open_labelled_data(demo.DEMO_HELDOUT, classifier.spec, preprocessing)
    data.keys, data.labels = data.keys[:80], data.labels[:80]
    records = run_items(
        data,
        classifier,
        MpsEngine(classifier, settings),
        directory / "records.jsonl",
        stability=True,
    ).records
    fit = fit_calibration(records, score="evidence", n_boot=0)
    artifact = artifact_from_fit(
        fit,
        model=shipped.model,
        preprocessing=shipped.preprocessing,
        engine=settings.model_dump(mode="json"),
        class_names=shipped.class_names,
        area_reference=[r.mps_area_fraction for r in records],
    )
    score = fit.detector.score
    assert isinstance(score, LinearScore)
    keep = [score.terms.index(term) for term in RESTRICTED_TERMS]
    restricted = LinearScore(
        kind="evidence",
        terms=list(RESTRICTED_TERMS),
        means=[score.means[i] for i in keep],
        stds=[score.stds[i] for i in keep],
        coefficients=[score.coefficients[i] for i in keep],
        intercept=score.intercept,
    )
    files = {
        "evidence": artifact,
        "restricted": _with_detector(
            artifact, fit.detector.model_copy(update={"score": restricted})
        ),
        "no-reference": _with_detector(
            shipped, shipped.detector.model_copy(update={"exchangeability_reference": None})
        ),
    }
    paths = {}
    for name, document in files.items():
        paths[name] = directory / f"{name}.json"
        save_artifact(document, paths[name])
    return paths


def _with_detector(artifact: CalibrationArtifact, detector: Detector) -> CalibrationArtifact:
    return CalibrationArtifact.model_validate(
        {**artifact.model_dump(), "detector": detector.model_dump()}
    )


def _independent_table(
    classifier: MaskedClassifier, settings: EngineSettings, images: np.ndarray
) -> dict[str, Any]:
    """Every feature of every group for ``images``, computed as the calibration run does
    (guard.calibration.run, guard.calibration.records.feature_table), without the sidecar."""
    prediction = classifier.predict(images)
    results = MpsEngine(classifier, settings).explain_batch(images)
    second = MpsEngine(
        classifier, settings.model_copy(update={"seed": settings.seed + STABILITY_SEED_OFFSET})
    ).explain_batch(images)
    rows = item_features(
        classifier,
        settings.baseline,
        images,
        prediction.scores,
        classifier.output_kind,
        results,
        groups=ALL_GROUPS,
        second=second,
    )
    table: dict[str, Any] = {name: np.array([row[name] for row in rows]) for name in rows[0]}
    table.update(
        msp=prediction.confidences,
        margin=prediction.margins,
        predicted_class=prediction.classes,
        mps_area_fraction=np.array([r.mps_area_fraction for r in results]),
    )
    return table


class _Spy:
    """Records the groups each ``mps_features`` call computes, and the model evaluations."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.groups: list[tuple[str, ...]] = []
        self.evaluations = 0
        real = guarded_model.mps_features

        def spy(*args: Any, groups: Any = MPS_GROUPS, **kwargs: Any) -> Any:
            self.groups.append(tuple(groups))
            return real(*args, groups=groups, **kwargs)

        monkeypatch.setattr(guarded_model, "mps_features", spy)

    def count(self, calls: int, evaluations: int) -> None:
        self.evaluations += evaluations


def _guarded(calibration: Path, spy: _Spy) -> GuardedModel:
    return GuardedModel.from_files(demo.DEMO_MODEL, calibration, on_model_call=spy.count)


# -- which features ------------------------------------------------------------------------------


def test_feature_groups_of_each_kind_of_score() -> None:
    assert feature_groups({"msp"}) == ()
    assert feature_groups({"msp", "margin", "predicted_class"}) == ()
    assert feature_groups({"energy", "msp"}) == ("confidence",)
    assert feature_groups({"mps_area_fraction", "predicted_class"}) == ()  # the MPS itself
    assert feature_groups({"seed_dice", "insertion_auc", "entropy"}) == (
        "confidence",
        "insertion",
        "stability",
    )
    with pytest.raises(Exception, match="cannot compute: no_such_feature"):
        feature_groups({"msp", "no_such_feature"})


def test_a_msp_calibration_computes_no_mps_feature_group(
    monkeypatch: pytest.MonkeyPatch, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    assert load_artifact(demo.DEMO_CALIBRATION).detector.score_kind == "msp"
    spy = _Spy(monkeypatch)
    model = _guarded(demo.DEMO_CALIBRATION, spy)
    assert model.feature_groups == () and not model.needs_mps
    x = heldout[0][:4]
    checks = model.check(x, model.predict(x))
    assert spy.groups == []  # no MPS feature, no extra evaluation: the MPS alone
    assert spy.evaluations == sum(c.model_evaluations for c in checks) > 0
    assert all(set(c.features) == {"msp"} for c in checks)
    assert all(c.evidence == (("msp", c.features["msp"]),) for c in checks)


@pytest.mark.parametrize("name", ["evidence", "restricted"])
def test_an_evidence_calibration_computes_exactly_the_groups_its_terms_read(
    name: str,
    calibrations: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    heldout: tuple[np.ndarray, np.ndarray],
) -> None:
    spy = _Spy(monkeypatch)
    model = _guarded(calibrations[name], spy)
    detector = model.calibration.detector
    expected = ALL_GROUPS if name == "evidence" else ("mps_shape", "complement")
    assert model.feature_groups == expected and model.needs_mps
    x = heldout[0][100:106]
    checks = model.check(x, model.predict(x))
    assert spy.groups == [tuple(g for g in MPS_GROUPS if g in expected)]
    # Every evaluation (MPS, MPS features, second seed's MPS) is in the items' counts.
    assert spy.evaluations == sum(c.model_evaluations for c in checks)

    settings = model.engine.settings
    table = _independent_table(MaskedClassifier(demo.DEMO_MODEL), settings, x)
    verdicts = detector.evaluate(table)
    np.testing.assert_allclose([c.score for c in checks], verdicts.score, rtol=1e-6)
    np.testing.assert_allclose([c.p_value for c in checks], verdicts.p_value, rtol=1e-6)
    assert [c.flagged for c in checks] == verdicts.flagged.tolist()
    for k, check in enumerate(checks):
        assert set(check.features) == detector.features - {"predicted_class"}
        for feature, found in check.features.items():
            assert found == pytest.approx(float(table[feature][k]), rel=1e-6, abs=1e-9), feature
        assert [t for t, _ in check.evidence] == [t for t, _ in verdicts.evidence[k]]


def test_the_sidecar_serves_the_evidence_verdict_with_its_evidence(
    calibrations: dict[str, Path],
    heldout: tuple[np.ndarray, np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    x = heldout[0][100:106]
    path = calibrations["evidence"]
    detector = load_artifact(path).detector
    settings = EngineSettings.model_validate(load_artifact(path).engine)
    table = _independent_table(MaskedClassifier(demo.DEMO_MODEL), settings, x)
    expected = detector.evaluate(table)
    with (
        caplog.at_level(logging.INFO, logger="guard.verdicts"),
        running_sidecar(calibration=path, explain="flagged") as sidecar,
    ):
        stub = inference_stub(sidecar)
        input_name = sidecar.models[0].classifier.spec.input_name
        out = output_arrays(stub.ModelInfer(infer_request(MODEL, input_name, x, id="ev")))
        with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
            answer = client.explain(x[0], include_mask=True)
    # An MPS-using score: explain "flagged" computes every MPS all the same.
    assert not np.isnan(out["guard_mps_area"]).any()
    np.testing.assert_allclose(out["guard_score"], expected.score, rtol=1e-5)
    np.testing.assert_allclose(out["guard_p_value"], expected.p_value, rtol=1e-5)

    # Explain: the evidence (top terms, largest first) and every feature the score read.
    assert answer.score == pytest.approx(expected.score[0], rel=1e-5)
    terms = [(e.feature, e.contribution) for e in answer.evidence]
    assert [t for t, _ in terms] == [t for t, _ in expected.evidence[0]]
    for (_, got), (_, want) in zip(terms, expected.evidence[0], strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert [c for _, c in terms] == sorted((c for _, c in terms), reverse=True)
    assert set(answer.features) == detector.features - {"predicted_class"}
    assert answer.features["seed_dice"] == pytest.approx(float(table["seed_dice"][0]))
    assert answer.mask.height == 32

    # The verdict log line carries the same.
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "guard.verdicts"]
    logged = [r for r in records if r["request_id"] == "ev"]
    assert [r["item"] for r in logged] == list(range(len(x)))
    first = logged[0]
    assert first["explained"] == "always"
    assert [e["feature"] for e in first["evidence"]] == [t for t, _ in expected.evidence[0]]
    assert first["features"]["complement_confidence"] == pytest.approx(
        float(table["complement_confidence"][0]), abs=1e-6
    )


# -- cost follows value --------------------------------------------------------------------------


def _mixed(heldout: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Held-out digits (mostly passed) and uniform noise (mostly flagged by the demo's msp)."""
    noise = np.random.default_rng(0).random((8, 1, 32, 32), dtype=np.float32)
    return np.concatenate([heldout[0][:24], noise])


def test_explain_flagged_computes_the_mps_of_flagged_predictions_only(
    heldout: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    x = _mixed(heldout)
    with (
        caplog.at_level(logging.INFO, logger="guard.verdicts"),
        running_sidecar(explain="flagged", explain_sample_rate=0.0) as sidecar,
    ):
        stub = inference_stub(sidecar)
        input_name = sidecar.models[0].classifier.spec.input_name
        out = output_arrays(stub.ModelInfer(infer_request(MODEL, input_name, x, id="fl")))
        with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
            explained = client.explain(x[0])  # Explain always computes the MPS
        metrics = scrape(sidecar.metrics_port)
    flagged = out["guard_flagged"]
    assert out["guard_checked"].all() and 3 <= flagged.sum() < len(x)
    # MPS areas for the flagged items, none for the others.
    assert not np.isnan(out["guard_mps_area"][flagged]).any()
    assert np.isnan(out["guard_mps_area"][~flagged]).all()
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "guard.verdicts"]
    logged = sorted((r for r in records if r["request_id"] == "fl"), key=lambda r: r["item"])
    assert [r["explained"] for r in logged] == ["flagged" if f else "none" for f in flagged]
    assert all(
        r["mps_area_fraction"] is None for r, f in zip(logged, flagged, strict=True) if not f
    )
    spent = sum(r["model_evaluations"] for r in logged) + explained.model_evaluations
    assert value(metrics, "guard_model_evaluations_total", model=MODEL) == spent
    # The MPS-area histogram and drift take only the random sample (none here) and Explain.
    assert value(metrics, "guard_mps_area_fraction_count", model=MODEL) == 1
    assert value(metrics, "guard_mps_area_drift_window_items", model=MODEL) == 1
    assert value(metrics, "guard_checked_predictions_total", model=MODEL) == len(x) + 1


def test_explain_flagged_samples_a_random_share_for_the_mps_area_statistics(
    heldout: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    x = _mixed(heldout)
    with (
        caplog.at_level(logging.INFO, logger="guard.verdicts"),
        running_sidecar(explain="flagged", explain_sample_rate=0.5) as sidecar,
    ):
        stub = inference_stub(sidecar)
        input_name = sidecar.models[0].classifier.spec.input_name
        for _ in range(3):
            stub.ModelInfer(infer_request(MODEL, input_name, x, id="half"))
        metrics = scrape(sidecar.metrics_port)
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "guard.verdicts"]
    why = [r["explained"] for r in logged]
    sampled = why.count("sample")
    assert 3 * len(x) * 0.25 <= sampled <= 3 * len(x) * 0.75  # 48, sd 4.9
    # Flagged and sampled items are drawn independently: flagged ones are sampled too.
    assert any(r["flagged"] and r["explained"] == "sample" for r in logged)
    assert all(r["explained"] == "flagged" for r in logged if r["flagged"] and r["explained"] != "sample")  # fmt: skip
    assert all(r["explained"] == "none" for r in logged if not r["flagged"] and r["explained"] != "sample")  # fmt: skip
    assert value(metrics, "guard_mps_area_fraction_count", model=MODEL) == sampled
    assert value(metrics, "guard_mps_area_drift_window_items", model=MODEL) == sampled


# -- exchangeability ----------------------------------------------------------------------------


def _martingale_path(sidecar: Any, batches: Iterator[np.ndarray]) -> list[float]:
    """The martingale gauge after each ModelInfer request of ``batches``."""
    stub = inference_stub(sidecar)
    input_name = sidecar.models[0].classifier.spec.input_name
    path = [value(scrape(sidecar.metrics_port), "guard_calibration_martingale", model=MODEL)]
    for batch in batches:
        stub.ModelInfer(infer_request(MODEL, input_name, batch), timeout=60)
        path.append(
            value(scrape(sidecar.metrics_port), "guard_calibration_martingale", model=MODEL)
        )
    return path


def test_the_martingale_stays_low_on_exchangeable_traffic_and_rises_under_shift(
    heldout: tuple[np.ndarray, np.ndarray],
) -> None:
    """Exchangeable traffic: the demo calibration used every item of guard/demo/heldout.npz
    (its exchangeability reference is its held-out half's scores), so those same items in a
    random order are the calibration's own data, exchangeable with the reference by
    construction. Shifted traffic: uniform noise, which the digits model is unsure of."""
    x = heldout[0]
    order = np.random.default_rng(0).permutation(len(x))
    with running_sidecar(explain="flagged", explain_sample_rate=0.0) as sidecar:
        calm = _martingale_path(sidecar, (x[order[i : i + 30]] for i in range(0, len(x), 30)))
        assert value(scrape(sidecar.metrics_port), "guard_checked_predictions_total", model=MODEL) == len(x)  # fmt: skip
    assert calm[0] == 1.0
    assert max(calm) < 20, calm

    noise = np.random.default_rng(1).random((48, 1, 32, 32), dtype=np.float32)
    with running_sidecar(explain="flagged", explain_sample_rate=0.0) as sidecar:
        shifted = _martingale_path(sidecar, (noise[i : i + 8] for i in range(0, len(noise), 8)))
        # Explain requests (looks on demand) leave it alone.
        with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
            client.explain(noise[0])
        after = value(scrape(sidecar.metrics_port), "guard_calibration_martingale", model=MODEL)
    assert shifted[-1] >= 20, shifted
    assert after == shifted[-1]


def test_without_an_exchangeability_reference_there_is_no_martingale_series(
    calibrations: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="guard.service.data_plane"),
        running_sidecar(calibration=calibrations["no-reference"]) as sidecar,
    ):
        metrics = scrape(sidecar.metrics_port)
    assert "guard_calibration_martingale" not in metrics
    warned = [
        r.getMessage() for r in caplog.records if "exchangeability reference" in r.getMessage()
    ]
    assert len(warned) == 1 and "re-run guard calibrate" in warned[0]


def test_explain_flagged_in_async_mode_and_on_the_command_line(
    heldout: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    x = _mixed(heldout)
    with (
        caplog.at_level(logging.INFO, logger="guard.verdicts"),
        running_sidecar(mode="async", explain="flagged", explain_sample_rate=0.0) as sidecar,
    ):
        stub = inference_stub(sidecar)
        input_name = sidecar.models[0].classifier.spec.input_name
        stub.ModelInfer(infer_request(MODEL, input_name, x, id="bg"))
        wait_for(
            lambda: (
                value(scrape(sidecar.metrics_port), "guard_checked_predictions_total", model=MODEL)
                == len(x)
            ),
            what="the background checks",
        )
        martingale = value(
            scrape(sidecar.metrics_port), "guard_calibration_martingale", model=MODEL
        )
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "guard.verdicts"]
    assert sorted(r["item"] for r in logged) == list(range(len(x)))
    assert {r["explained"] for r in logged} == {"flagged", "none"}
    assert all((r["mps_area_fraction"] is None) == (not r["flagged"]) for r in logged)
    assert martingale != 1.0  # background checks feed it too

    # The options come from the settings' fields (tests/test_cli.py checks every one's help).
    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "400"}).stdout
    assert "--explain " in help_text and "[all|flagged]" in help_text
    assert "--explain-sample-rate" in help_text and "[default: 0.1]" in help_text
