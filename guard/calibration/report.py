"""The calibration report: summary.json, records.csv, report.md and PNG plots.

Every figure in the report is computed from the per-item records written next to it
(records.csv), so anyone can recompute it independently.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from guard.calibration import detection_metrics as metrics  # noqa: E402
from guard.calibration.fit import FitResult  # noqa: E402
from guard.calibration.records import ItemRecord  # noqa: E402
from guard.numbers import number  # noqa: E402
from guard.verdict.artifact import CalibrationArtifact  # noqa: E402
from guard.verdict.scores import suspicion_scores  # noqa: E402

SCORE_KINDS = ("mps", "msp", "combined")
SCORE_LABELS = {
    "mps": "MPS area (posterior)",
    "msp": "MSP (1 - confidence)",
    "combined": "combined",
}


def _splits(fit: FitResult, count: int) -> list[str]:
    split = ["fit"] * count
    for i in fit.reference_indices:
        split[int(i)] = "holdout-reference"
    for i in fit.evaluation_indices:
        split[int(i)] = "holdout-evaluation"
    return split


def held_out_scores(
    artifact: CalibrationArtifact, records: list[ItemRecord]
) -> dict[str, np.ndarray]:
    """Each score kind for the given records, from the fitted artifact."""
    detector = artifact.detector
    arrays = {
        "mps_area_fraction": np.array([r.mps_area_fraction for r in records]),
        "confidence": np.array([r.confidence for r in records]),
        "predicted_class": np.array([r.predicted_class for r in records]),
        "margin": np.array([r.margin for r in records]),
    }
    return {
        kind: suspicion_scores(kind, detector.area_model, detector.combined, **arrays)
        for kind in SCORE_KINDS
    }


def summary(artifact: CalibrationArtifact, skipped: list[tuple[str, str]]) -> dict[str, Any]:
    m = artifact.metrics
    return {
        "n_items": m.n_items,
        "n_correct": m.n_correct,
        "n_incorrect": m.n_incorrect,
        "n_skipped": len(skipped),
        "accuracy": m.accuracy,
        "alpha": artifact.detector.alpha,
        "score": artifact.detector.score_kind,
        "flag_small_tail": artifact.detector.flag_small_tail,
        "false_alarm_rate_holdout": m.false_alarm_rate_holdout,
        "detection_rate_holdout": m.detection_rate_holdout,
        **{f"auroc_{kind}": m.scores[kind].auroc for kind in SCORE_KINDS},
        **{f"aupr_error_{kind}": m.scores[kind].aupr_error for kind in SCORE_KINDS},
        **{f"fpr_at_95_tpr_{kind}": m.scores[kind].fpr_at_95_tpr for kind in SCORE_KINDS},
        **{f"aurc_{kind}": m.scores[kind].aurc for kind in SCORE_KINDS},
        "auroc_combined_minus_msp": m.auroc_gain_combined_over_msp.model_dump(),
        "mean_area_correct": m.mean_area_correct,
        "mean_area_incorrect": m.mean_area_incorrect,
        "median_area_correct": m.median_area_correct,
        "median_area_incorrect": m.median_area_incorrect,
        "degenerate_fraction": m.degenerate_fraction,
        "baseline_class": m.baseline_class_mode,
        "baseline_class_fraction": m.baseline_class_mode_fraction,
        "baseline_matches_prediction_fraction": m.baseline_matches_prediction_fraction,
        "mann_whitney": m.mann_whitney.model_dump(),
        "n_fit": m.n_fit,
        "n_holdout": m.n_holdout,
        "n_holdout_incorrect": m.n_holdout_incorrect,
        "n_reference_correct": m.n_reference_correct,
        "n_evaluation_correct": m.n_evaluation_correct,
        "engine": artifact.engine,
        "model_sha256": artifact.model.sha256,
        "notes": artifact.notes,
    }


def write_report(
    directory: Path,
    artifact: CalibrationArtifact,
    fit: FitResult,
    records: list[ItemRecord],
    skipped: list[tuple[str, str]],
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    split = _splits(fit, len(records))
    _write_records(directory / "records.csv", records, split, artifact)
    facts = summary(artifact, skipped)
    (directory / "summary.json").write_text(json.dumps(facts, indent=2) + "\n")

    holdout = np.sort(np.concatenate([fit.reference_indices, fit.evaluation_indices]))
    held = [records[int(i)] for i in holdout]
    scores = held_out_scores(artifact, held)
    incorrect = np.array([not r.correct for r in held])
    _plot_areas(directory / "mps_area.png", records)
    _plot_roc(directory / "roc.png", scores, incorrect)
    _plot_risk_coverage(directory / "risk_coverage.png", scores, incorrect)
    (directory / "report.md").write_text(_markdown(facts, artifact, records, skipped))


def _write_records(
    path: Path, records: list[ItemRecord], split: list[str], artifact: CalibrationArtifact
) -> None:
    """Every item with its split, its score of each kind and the deployed check's verdict."""
    scores = held_out_scores(artifact, records)
    verdicts = artifact.detector.evaluate(
        mps_area_fraction=[r.mps_area_fraction for r in records],
        confidence=[r.confidence for r in records],
        predicted_class=[r.predicted_class for r in records],
        margin=[r.margin for r in records],
    )
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "label", "predicted_class", "correct", "confidence", "margin",
                         "mps_area_fraction", "degenerate", "baseline_class", "split",
                         *(f"score_{kind}" for kind in SCORE_KINDS), "p_value", "flagged"])  # fmt: skip
        for i, (record, part) in enumerate(zip(records, split, strict=True)):
            writer.writerow([record.key, record.label, record.predicted_class, int(record.correct),
                             f"{record.confidence:.8g}", f"{record.margin:.8g}",
                             f"{record.mps_area_fraction:.8g}", int(record.degenerate),
                             record.baseline_class, part,
                             *(f"{scores[kind][i]:.17g}" for kind in SCORE_KINDS),
                             f"{verdicts.p_value[i]:.17g}", int(verdicts.flagged[i])])  # fmt: skip


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)  # figures are not freed otherwise


def _plot_areas(path: Path, records: list[ItemRecord]) -> None:
    correct = [r.mps_area_fraction for r in records if r.correct]
    incorrect = [r.mps_area_fraction for r in records if not r.correct]
    fig, (hist, violin) = plt.subplots(1, 2, figsize=(10, 4))
    bins = np.linspace(0, max([*correct, *incorrect, 0.05]), 40)
    hist.hist(correct, bins=bins, alpha=0.6, density=True, label=f"correct (n={len(correct)})")
    if incorrect:
        hist.hist(
            incorrect, bins=bins, alpha=0.6, density=True, label=f"incorrect (n={len(incorrect)})"
        )
    hist.set_xlabel("MPS area (fraction of the image)")
    hist.set_ylabel("density")
    hist.legend()
    groups = [g for g in (correct, incorrect) if g]
    violin.violinplot(groups, showmedians=True)
    violin.set_xticks(range(1, len(groups) + 1), ["correct", "incorrect"][: len(groups)])
    violin.set_ylabel("MPS area")
    fig.suptitle("MPS area of correct and incorrect predictions")
    _save(fig, path)


def _plot_roc(path: Path, scores: dict[str, np.ndarray], incorrect: np.ndarray) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for kind, score in scores.items():
        fpr, tpr = metrics.roc_curve(score, incorrect)
        value = metrics.auroc(score, incorrect)
        ax.plot(fpr, tpr, label=f"{SCORE_LABELS[kind]} (AUROC {number(value)})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate (correct flagged)")
    ax.set_ylabel("true positive rate (errors flagged)")
    ax.set_title("Error detection on held-out data")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def _plot_risk_coverage(path: Path, scores: dict[str, np.ndarray], incorrect: np.ndarray) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    for kind, score in scores.items():
        coverage, risk = metrics.risk_coverage_curve(score, incorrect)
        ax.plot(
            coverage,
            risk,
            label=f"{SCORE_LABELS[kind]} (AURC {number(metrics.aurc(score, incorrect), 4)})",
        )
    ax.set_xlabel("coverage (share of predictions kept)")
    ax.set_ylabel("risk (error rate among kept)")
    ax.set_title("Risk-coverage on held-out data")
    ax.legend(fontsize=8)
    _save(fig, path)


def _area_row(name: str, areas: list[float]) -> str:
    if not areas:
        return f"| {name} | 0 | n/a | n/a |"
    return f"| {name} | {len(areas)} | {np.mean(areas):.4f} | {np.median(areas):.4f} |"


def _markdown(
    facts: dict[str, Any],
    artifact: CalibrationArtifact,
    records: list[ItemRecord],
    skipped: list[tuple[str, str]],
) -> str:
    mw = facts["mann_whitney"]
    gain = facts["auroc_combined_minus_msp"]
    lines = [
        "# Calibration report",
        "",
        f"Model sha256 `{artifact.model.sha256[:16]}...`, score `{facts['score']}`, alpha {facts['alpha']}, "
        f"{facts['n_items']} items ({facts['n_skipped']} skipped), accuracy {number(facts['accuracy'])}.",
        "",
        "## What this calibration can and cannot do",
        "",
        *[f"- {note}" for note in artifact.notes],
        "",
        "## Alarm on held-out data",
        "",
        f"- False-alarm rate on correct predictions: **{number(facts['false_alarm_rate_holdout'])}** "
        f"(guaranteed <= {facts['alpha']} in expectation by the split-conformal rule; measured on "
        f"{facts['n_evaluation_correct']} held-out correct items not used for the threshold).",
        f"- Detection rate on incorrect predictions: **{number(facts['detection_rate_holdout'])}** "
        f"({facts['n_holdout_incorrect']} held-out errors).",
        "",
        "## MPS area (the paper's Table 1)",
        "",
        "| predictions | n | mean area | median area |",
        "|---|---|---|---|",
        _area_row("all", [r.mps_area_fraction for r in records]),
        _area_row("correct", [r.mps_area_fraction for r in records if r.correct]),
        _area_row("incorrect", [r.mps_area_fraction for r in records if not r.correct]),
        "",
        f"Degenerate MPSs (empty or one chunk): {number(facts['degenerate_fraction'])}. "
        f"The all-baseline input is classified as class {facts['baseline_class']} for "
        f"{number(facts['baseline_class_fraction'])} of items; {number(facts['baseline_matches_prediction_fraction'])} "
        "of items are predicted as their all-baseline class (their MPS is empty).",
        "",
        "![MPS area](mps_area.png)",
        "",
        "## Is the MPS of an incorrect prediction larger?",
        "",
        f"Two-sided Mann-Whitney U test of MPS area, incorrect ({mw['n_incorrect']}) vs correct "
        f"({mw['n_correct']}): U = {number(mw['u_statistic'], 1)}, p = {number(mw['p_two_sided'], 4)}; "
        f"rank-biserial effect size {number(mw['rank_biserial'])} (> 0: incorrect larger). "
        f"Direction at level {mw['level']}: **{mw['direction']}**. The paper's one-sided hypothesis "
        f"(incorrect MPSs are larger) has p = {number(mw['p_incorrect_larger'], 4)}.",
        "",
        "## Error detection on held-out data",
        "",
        "| score | AUROC | AUPR-Error | FPR at 95% TPR | AURC |",
        "|---|---|---|---|---|",
        *[
            f"| {SCORE_LABELS[k]} | {number(facts[f'auroc_{k}'])} | {number(facts[f'aupr_error_{k}'])} | "
            f"{number(facts[f'fpr_at_95_tpr_{k}'])} | {number(facts[f'aurc_{k}'], 4)} |"
            for k in SCORE_KINDS
        ],
        "",
        f"AUROC(combined) - AUROC(MSP) = {number(gain['estimate'])}, 95% paired-bootstrap interval "
        f"[{number(gain['ci_low'])}, {number(gain['ci_high'])}] ({gain['n_boot']} resamples).",
        "",
        "![ROC](roc.png) ![Risk-coverage](risk_coverage.png)",
        "",
        "## Definitions",
        "",
        "- MPS area: pixels of the minimal sufficient pixel set / (H x W). Degenerate: empty, or one chunk.",
        "- `mps` score: posterior probability that the prediction is incorrect given its MPS area "
        "(kernel densities on logit(area) for correct and incorrect predictions of the fit split, "
        "per predicted class where there is enough data, prior = the fit split's error rate).",
        "- `msp` score: 1 - top-1 probability. `combined`: logistic regression on logit(area), MSP and margin.",
        "- p-value: (1 + #{held-out correct scores >= s}) / (n + 1); flagged when p <= alpha.",
        "- AUPR-Error: average precision with errors as positives. AURC: area under the risk-coverage curve.",
        "",
    ]
    if skipped:
        lines += ["## Skipped items", "", *[f"- `{key}`: {reason}" for key, reason in skipped], ""]
    return "\n".join(lines)
