"""Smoke test of the detection and shift benchmarks: tiny limits on the demo model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import bench_detection, bench_shift


def _in_unit(value: float | None) -> bool:
    return value is None or (math.isfinite(value) and 0.0 <= value <= 1.0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench_cache")


def test_bench_detection_runs(
    cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "detection.json"
    result = bench_detection.main(
        ["--pairs", "demo", "demo_ood", "--limit", "30", "--n-boot", "20",
         "--cache-dir", str(cache_dir), "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| digits (demo) |" in printed and "| digits (demo) vs OOD |" in printed
    assert "Bar: " in printed
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    rows = {r["pair"]: r for r in result["rows"]}
    assert set(rows) == {"demo", "demo_ood"}
    for row in rows.values():
        for key in ("n", "positives", "scores", "selected_score", "mps_increment",
                    "mps_minus_msp", "mps_adds_value", "false_alarm", "flagged", "auto_minus_msp", "bar",
                    "seconds_per_item"):  # fmt: skip
            assert key in row
        assert row["selected_score"] in row["scores"]
        assert row["mps_adds_value"].split(" (")[0] in ("yes", "no", "not measurable")
        assert row["bar"]["pass"] in ("yes", "no", "not measurable")
        for figures in row["scores"].values():
            assert _in_unit(figures["auroc"]) and _in_unit(figures["aurc"])
            assert all(_in_unit(v) for v in [*figures["auroc_ci"], *figures["aurc_ci"]])
        assert _in_unit(row["flagged"]["rate"])
        assert row["seconds_per_item"] is not None and row["seconds_per_item"] > 0
    assert rows["demo"]["n"] == 30
    assert set(rows["demo"]["false_alarm"]) == set(bench_detection.FALSE_ALARM_KINDS)
    for rate in rows["demo"]["false_alarm"].values():
        assert _in_unit(rate["rate"]) and all(_in_unit(v) for v in rate["ci"])
    assert rows["demo_ood"]["positives"] == bench_detection.ood_count(30)
    assert set(rows["demo_ood"]["by_kind"]) == set(bench_detection.OOD_KINDS)


def test_bench_shift_runs(
    cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shift.json"
    result = bench_shift.main(
        ["--pair", "demo", "--limit", "60", "--n-boot", "20", "--horizon", "30",
         "--min-items", "20", "--reps", "3", "--null-reps", "5", "--calibration-reps", "20",
         "--cache-dir", str(cache_dir), "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| unshifted (clean traffic half) |" in printed
    assert "detects first." in printed
    saved = json.loads(out.read_text())
    for key in ("settings", "calibration", "thresholds", "false_alarms", "scenarios"):
        assert key in saved
    assert set(result["false_alarms"]) == set(bench_shift.MONITORS)
    for rate in result["false_alarms"].values():
        assert _in_unit(rate["rate"]) and rate["n"] == 5
    assert [(s["shift"], s["fraction"]) for s in result["scenarios"]] == list(bench_shift.SCENARIOS)
    for scenario in result["scenarios"]:
        for monitor in bench_shift.MONITORS:
            summary = scenario["monitors"][monitor]
            assert summary["reps"] == 3 and _in_unit(summary["detected_fraction"])
            assert summary["median"] is None or 0 < summary["median"] <= 30
        assert set(scenario["first"]) <= set(bench_shift.MONITORS)
    assert all(0.0 <= t <= 1.0 for t in result["thresholds"].values())


@pytest.mark.parametrize("per_class", [False, True])
def test_the_exchangeable_range_of_false_alarms_holds_its_level(per_class: bool) -> None:
    import numpy as np

    from guard.verdict.conformal import ConformalReference
    from guard.verdict.detector import Detector
    from guard.verdict.scores.confidence import MspScore

    rng = np.random.default_rng(0)
    alpha, draws, exceeded = 0.05, 3000, 0
    classes = np.repeat([0, 1], [44, 60])
    for _ in range(draws):
        own: dict[int, ConformalReference] = {}
        if per_class:  # class 1's scores sit higher and get their own reference
            shift = np.where(classes == 1, 0.5, 0.0)
            reference, fresh = rng.random(classes.size) + shift, rng.random(classes.size) + shift
            pooled = ConformalReference.from_values(reference[classes == 0], alpha)
            own = {1: ConformalReference.from_values(reference[classes == 1], alpha)}
        else:
            pooled = ConformalReference.from_values(rng.random(43), alpha)
            fresh = rng.random(classes.size)
        detector = Detector(
            score=MspScore(), alpha=alpha, per_class=per_class, delta=None,
            flag_small_tail=False, score_reference=pooled, class_references=own,
            small_tail_reference=None, exchangeability_reference=[],
        )  # fmt: skip
        thresholds = np.array([own.get(int(c), pooled).threshold for c in classes])
        flagged = int(np.sum(fresh > thresholds))
        exceeded += flagged > bench_detection.exchangeable_most(detector, classes)
    # The range is a 97.5% quantile of a discrete count: exceeded in at most 2.5% of draws.
    assert 0.005 < exceeded / draws < 0.025 + 3 * math.sqrt(0.025 * 0.975 / draws)
