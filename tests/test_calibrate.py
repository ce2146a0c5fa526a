"""``guard calibrate`` end to end on the demo model: data formats, resume, report, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from guard import demo
from guard.calibration.run import run_items
from guard.cli import app
from guard.datasets import open_labelled_data
from guard.engine import MpsEngine
from guard.errors import ConfigError
from guard.preprocess import Preprocessing
from guard.settings import EngineSettings
from guard.verdict.artifact import load_artifact, score_prediction

runner = CliRunner()
FAST = ["--iters", "3"]
PREPROCESSING = Preprocessing.from_file(demo.DEMO_PREPROCESSING)


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, heldout) -> Path:  # noqa: ANN001
    x, y = heldout
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, x=x[:160], y=y[:160])
    return path


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, small_npz: Path) -> Path:
    out = tmp_path_factory.mktemp("calibration")
    args = [
        "calibrate",
        str(small_npz),
        "--out",
        str(out / "cal.json"),
        "--report",
        str(out / "report"),
        *FAST,
    ]
    result = runner.invoke(app, [*args, "--holdout-fraction", "0.5", "--alpha", "0.1"])
    assert result.exit_code == 0, result.output
    return out


def test_artifact_loads_binds_the_model_and_scores(calibrated: Path, demo_classifier) -> None:  # noqa: ANN001
    artifact = load_artifact(calibrated / "cal.json", model_sha256=demo_classifier.sha256)
    assert artifact.engine["iters"] == 3 and artifact.detector.alpha == 0.1
    assert artifact.class_names == [str(i) for i in range(10)]
    verdict = score_prediction(
        artifact, mps_area_fraction=0.02, confidence=0.99, predicted_class=3, margin=0.98
    )
    assert 0 < verdict.p_value <= 1 and verdict.flagged == (verdict.p_value <= 0.1)
    with pytest.raises(ConfigError, match="sha256"):
        load_artifact(calibrated / "cal.json", model_sha256="0" * 64)


def test_report_figures_match_a_recomputation_from_the_records(calibrated: Path) -> None:
    report = calibrated / "report"
    for name in (
        "summary.json",
        "records.csv",
        "report.md",
        "mps_area.png",
        "roc.png",
        "risk_coverage.png",
    ):
        assert (report / name).stat().st_size > 0
    summary = json.loads((report / "summary.json").read_text())
    with (report / "records.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    correct = np.array([row["correct"] == "1" for row in rows])
    area = np.array([float(row["mps_area_fraction"]) for row in rows])
    assert summary["n_items"] == len(rows) == 160
    assert summary["n_correct"] == correct.sum() and summary["n_incorrect"] == (~correct).sum()
    assert summary["accuracy"] == pytest.approx(correct.mean())
    assert summary["mean_area_correct"] == pytest.approx(area[correct].mean(), rel=1e-6)
    if (~correct).any():
        assert summary["mean_area_incorrect"] == pytest.approx(area[~correct].mean(), rel=1e-6)
    degenerate = np.array([row["degenerate"] == "1" for row in rows])
    assert summary["degenerate_fraction"] == pytest.approx(degenerate.mean())
    held = np.array([row["split"].startswith("holdout") for row in rows])
    msp = 1 - np.array([float(row["confidence"]) for row in rows])
    if 0 < (~correct[held]).sum() < held.sum():
        assert summary["scores"]["msp"]["auroc"] == pytest.approx(
            roc_auc_score(~correct[held], msp[held]), abs=1e-9
        )
    # The deployed check's figures, recomputed from the per-item scores and verdicts.
    flagged = np.array([row["flagged"] == "1" for row in rows])
    evaluation = np.array([row["split"] == "holdout-evaluation" for row in rows])
    assert summary["false_alarm_rate_holdout"] == pytest.approx(
        flagged[evaluation & correct].mean()
    )
    if (~correct[held]).any():
        assert summary["detection_rate_holdout"] == pytest.approx(flagged[held & ~correct].mean())
        for kind in summary["scores"]:
            score = np.array([float(row[f"score_{kind}"]) for row in rows])
            assert summary["scores"][kind]["auroc"] == pytest.approx(
                roc_auc_score(~correct[held], score[held]), abs=1e-9
            )
    assert set(summary["scores"]) == {
        "mps", "msp", "confidence", "class-confidence", "combined", "evidence"
    }  # fmt: skip
    assert summary["selected_score"] in summary["scores"]
    assert {"baseline", "auroc_diff", "ci"} <= set(summary["mps_increment"])
    for key in ("false_alarm_rate_holdout", "detection_rate_holdout", "baseline_class", "alpha"):
        assert key in summary
    # Every evidence feature is in the records, so any score can be refitted from them.
    assert {"feature_complement_confidence", "feature_insertion_5", "feature_pnorm_p2"} <= set(
        rows[0]
    )
    assert "Mann-Whitney" in (report / "report.md").read_text()


def test_an_interrupted_run_resumes_to_the_same_records(
    tmp_path: Path, small_npz: Path, demo_classifier
) -> None:  # noqa: ANN001
    spec = demo_classifier.spec
    data = open_labelled_data(small_npz, spec, PREPROCESSING)
    data.keys, data.labels = data.keys[:40], data.labels[:40]
    engine = MpsEngine(demo_classifier, EngineSettings(iters=2))
    whole = run_items(data, demo_classifier, engine, tmp_path / "whole.jsonl", batch_items=8)

    seen = []

    def interrupt(count: int) -> None:
        seen.append(count)
        if sum(seen) >= 16:
            raise KeyboardInterrupt

    cache = tmp_path / "cut.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_items(data, demo_classifier, engine, cache, batch_items=8, on_progress=interrupt)
    assert 16 <= len(cache.read_text().splitlines()) - 1 < 40
    resumed = run_items(data, demo_classifier, engine, cache, batch_items=5)
    assert resumed.resumed >= 16
    assert resumed.records == whole.records

    other = MpsEngine(demo_classifier, EngineSettings(iters=3))
    with pytest.raises(ConfigError, match="other settings"):
        run_items(data, demo_classifier, other, cache)
    assert len(run_items(data, demo_classifier, other, cache, restart=True).records) == 40


def _write_png(path: Path, tensor: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(tensor[0] * 255).astype(np.uint8), mode="L").save(path)


def test_image_folder_with_a_corrupt_file_is_calibrated_and_the_file_listed(
    tmp_path: Path, heldout
) -> None:  # noqa: ANN001
    x, y = heldout
    root = tmp_path / "folder"
    for i in range(60):
        _write_png(root / str(y[i]) / f"item{i}.png", x[i])
    for label in range(10):
        (root / str(label)).mkdir(exist_ok=True)
    (root / "3" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "cal.json"
    result = runner.invoke(app, ["calibrate", str(root), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable item" in result.output and "broken.png" in result.output
    assert load_artifact(out).metrics.n_items == 60


def test_csv_manifest_with_class_names(tmp_path: Path, heldout) -> None:  # noqa: ANN001
    x, y = heldout
    rows = []
    for i in range(40):
        _write_png(tmp_path / "img" / f"{i}.png", x[i])
        rows.append(f"img/{i}.png,{y[i]}")
    manifest = tmp_path / "data.csv"
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    spec = open_labelled_data(manifest, _spec(), PREPROCESSING)
    assert len(spec) == 40 and spec.labels[:5] == [int(v) for v in y[:5]]


def _spec():  # noqa: ANN202
    from guard.runtime import MaskedClassifier

    return MaskedClassifier(demo.DEMO_MODEL).spec


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "empty").mkdir() or d / "empty", "no class subfolders"),
        (lambda d: _manifest(d, "path,label\na.png,7\nb.png,cat\n"), "line 3: unknown label 'cat'"),
        (
            lambda d: _npz(d, np.zeros((4, 3, 32, 32), np.float32), np.zeros(4, np.int64)),
            "x has shape [4, 3, 32, 32]",
        ),
        (
            lambda d: _npz(d, np.zeros((4, 1, 32, 32), np.float32), np.array([0, 1, 2, 12])),
            "labels must lie in 0..9",
        ),
        (lambda d: d / "nothing.npz", "does not exist"),
        (
            lambda d: _npz(d, np.zeros((0, 1, 32, 32), np.float32), np.zeros(0, np.int64)),
            "holds no items",
        ),
        (
            lambda d: _manifest(d, "path,label\na.png,7\nb.png\n"),
            "line 3: needs both a path and a label",
        ),
    ],
)
def test_bad_data_gets_a_clear_message(tmp_path: Path, make, message: str) -> None:  # noqa: ANN001
    result = runner.invoke(
        app, ["calibrate", str(make(tmp_path)), "--out", str(tmp_path / "c.json")]
    )
    assert result.exit_code == 2
    assert message in result.output and isinstance(result.exception, SystemExit)


def test_labels_that_do_not_fit_the_model_are_refused(tmp_path: Path) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["cat", "dog"]))
    data = _npz(tmp_path, np.zeros((4, 1, 32, 32), np.float32), np.zeros(4, np.int64))
    result = runner.invoke(
        app, ["calibrate", str(data), "--classes", str(labels), "--out", str(tmp_path / "c.json")]
    )
    assert (
        result.exit_code == 2 and "2 class names given, the model has 10 outputs" in result.output
    )


def _manifest(directory: Path, text: str) -> Path:
    path = directory / "data.csv"
    path.write_text(text)
    return path


def _npz(directory: Path, x: np.ndarray, y: np.ndarray) -> Path:
    path = directory / "data.npz"
    np.savez(path, x=x, y=y)
    return path


def test_the_shipped_demo_calibration_belongs_to_the_demo_model(demo_classifier) -> None:  # noqa: ANN001
    artifact = load_artifact(demo.DEMO_CALIBRATION, model_sha256=demo_classifier.sha256)
    assert EngineSettings.model_validate(artifact.engine) == EngineSettings()  # ReX defaults
    assert Preprocessing.model_validate(artifact.preprocessing) == PREPROCESSING
    assert artifact.metrics.n_items == len(np.load(demo.DEMO_HELDOUT)["y"])


def test_the_report_gallery_shows_the_top_scored_held_out_items_with_their_mps(
    calibrated: Path,
) -> None:
    """gallery.html: the held-out correct and incorrect items with the highest deployed
    scores (from records.csv), in that order, each with its input, responsibility map and
    recomputed MPS, which is the one the record was made from (the same area)."""
    import re

    from guard.calibration.report import GALLERY_ITEMS

    report = calibrated / "report"
    page = (report / "gallery.html").read_text()
    assert "gallery.html" in (report / "report.md").read_text()
    assert "<script" not in page and "http" not in page.split("</style>")[1]
    summary = json.loads((report / "summary.json").read_text())
    with (report / "records.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"].startswith("holdout")]
    score = f"score_{summary['selected_score']}"
    ranked = sorted(rows, key=lambda r: -float(r[score]))  # stable: data order among ties
    expected = [r for r in ranked if r["correct"] == "1"][:GALLERY_ITEMS]
    expected += [r for r in ranked if r["correct"] == "0"][:GALLERY_ITEMS]
    cards = page.split('<article class="card">')[1:]
    assert len(cards) == len(expected) > GALLERY_ITEMS
    for card, row in zip(cards, expected, strict=True):
        assert card.startswith(f"<h2>{row['key']}: label {row['label']}, predicted")
        badge = re.search(r'<span class="badge">([^<]*)</span>', card)[1]
        assert (badge != "passed") == (row["flagged"] == "1")
        assert card.count("<img ") == 3 and card.count('src="data:image/png;base64,') == 3
        area = float(row["mps_area_fraction"])
        assert f"<dd>{100 * area:.1f}% of pixels</dd>" in card  # the record's
        assert f"MPS {100 * area:.1f}% of pixels</figcaption>" in card  # the recomputed mask's
