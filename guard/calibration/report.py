"""The calibration report: summary.json, records.csv, report.md, PNG plots and gallery.html.

Every figure in the report is computed from the per-item records written next to it
(records.csv), so anyone can recompute it independently. gallery.html shows the held-out
items the deployed score finds most suspicious, correct and incorrect, with their MPSs
recomputed (the records keep no masks; the engine is deterministic, so they are the MPSs the
records were made from).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from guard.calibration import detection_metrics as metrics  # noqa: E402
from guard.calibration.fit import FitResult  # noqa: E402
from guard.calibration.records import ItemRecord, feature_table  # noqa: E402
from guard.gallery import (  # noqa: E402
    Card,
    Section,
    evidence_text,
    explanation_panels,
    input_pixels,
    write_gallery,
)
from guard.gallery import number as figure  # noqa: E402
from guard.numbers import number  # noqa: E402
from guard.verdict.artifact import CalibrationArtifact  # noqa: E402

if TYPE_CHECKING:
    from guard.datasets import LabelledData
    from guard.engine import MpsEngine

# Items per group (correct, incorrect) in gallery.html.
GALLERY_ITEMS = 6

SCORE_LABELS = {
    "mps": "MPS area (posterior)",
    "msp": "MSP (1 - confidence)",
    "confidence": "best confidence feature",
    "class-confidence": "class-conditional confidence",
    "combined": "combined (area, MSP, margin)",
    "evidence": "evidence (confidence, class, MPS features)",
}


def _splits(fit: FitResult, count: int) -> list[str]:
    split = ["fit"] * count
    for i in fit.reference_indices:
        split[int(i)] = "holdout-reference"
    for i in fit.evaluation_indices:
        split[int(i)] = "holdout-evaluation"
    return split


def candidate_scores(fit: FitResult, records: list[ItemRecord]) -> dict[str, np.ndarray]:
    """Each fitted candidate's scores of the given records."""
    table = feature_table(records)
    return {kind: model.scores(table) for kind, model in fit.candidates.items()}


def summary(artifact: CalibrationArtifact, skipped: list[tuple[str, str]]) -> dict[str, Any]:
    """The figures of the report as JSON: each is recomputable from records.csv."""
    m = artifact.metrics
    increment = m.mps_increment
    return {
        "n_items": m.n_items,
        "n_correct": m.n_correct,
        "n_incorrect": m.n_incorrect,
        "n_skipped": len(skipped),
        "accuracy": m.accuracy,
        "alpha": artifact.detector.alpha,
        "delta": artifact.detector.delta,
        "per_class": artifact.detector.per_class,
        "guarantee": artifact.detector.guarantee,
        "selected_score": m.selected_score,
        "selection": m.selection,
        "flag_small_tail": artifact.detector.flag_small_tail,
        "scores": {
            kind: {
                "auroc": s.auroc,
                "auroc_ci": list(s.auroc_ci),
                "aupr_error": s.aupr_error,
                "aurc": s.aurc,
                "aurc_ci": list(s.aurc_ci),
                "augrc": s.augrc,
                "fpr_at_95tpr": s.fpr_at_95_tpr,
                "cv_aurc": s.cv_aurc,
            }
            for kind, s in m.scores.items()
        },
        "mps_increment": None
        if increment is None
        else {
            "baseline": increment.baseline,
            "candidate": increment.candidate,
            "auroc_diff": increment.auroc_diff,
            "ci": list(increment.ci),
            "n_boot": increment.n_boot,
        },
        "false_alarm_rate_holdout": m.false_alarm_rate_holdout,
        "detection_rate_holdout": m.detection_rate_holdout,
        "false_alarm_rates": {k: r.model_dump() for k, r in m.false_alarm_rates.items()},
        "detection_rate": None if m.detection_rate is None else m.detection_rate.model_dump(),
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
    *,
    data: LabelledData | None = None,
    engine: MpsEngine | None = None,
) -> None:
    """The report in ``directory``; with the ``data`` the records were made from and their
    ``engine``, gallery.html too (the MPSs of its few items are recomputed)."""
    directory.mkdir(parents=True, exist_ok=True)
    split = _splits(fit, len(records))
    _write_records(directory / "records.csv", records, split, artifact, fit)
    facts = summary(artifact, skipped)
    (directory / "summary.json").write_text(json.dumps(facts, indent=2) + "\n")

    holdout = np.sort(np.concatenate([fit.reference_indices, fit.evaluation_indices]))
    held = [records[int(i)] for i in holdout]
    scores = candidate_scores(fit, held)
    incorrect = np.array([not r.correct for r in held])
    _plot_areas(directory / "mps_area.png", records)
    _plot_roc(directory / "roc.png", scores, incorrect)
    _plot_risk_coverage(directory / "risk_coverage.png", scores, incorrect)
    markdown = _markdown(facts, artifact, records, skipped)
    if data is not None and engine is not None:
        shown = write_suspicious_gallery(
            directory / "gallery.html", artifact, fit, records, data, engine
        )
        markdown += (
            "\n## Most suspicious held-out items\n\n"
            f"[gallery.html](gallery.html): the {shown} held-out items with the highest scores, "
            "correct and incorrect, with their inputs, responsibility maps and MPSs.\n"
        )
    (directory / "report.md").write_text(markdown)


def suspicious_items(
    artifact: CalibrationArtifact, fit: FitResult, records: list[ItemRecord], count: int
) -> tuple[list[int], list[int]]:
    """The held-out records (indices) the deployed score ranks highest: up to ``count``
    correct predictions (false alarms first) and ``count`` incorrect ones, highest first."""
    holdout = np.sort(np.concatenate([fit.reference_indices, fit.evaluation_indices])).astype(int)
    if not len(holdout):
        return [], []
    scores = artifact.detector.evaluate(feature_table([records[i] for i in holdout])).score
    order = holdout[np.argsort(-np.asarray(scores), kind="stable")]
    correct = [int(i) for i in order if records[i].correct][:count]
    incorrect = [int(i) for i in order if not records[i].correct][:count]
    return correct, incorrect


def write_suspicious_gallery(
    path: Path,
    artifact: CalibrationArtifact,
    fit: FitResult,
    records: list[ItemRecord],
    data: LabelledData,
    engine: MpsEngine,
    count: int = GALLERY_ITEMS,
) -> int:
    """gallery.html of ``suspicious_items``, their MPSs recomputed; how many it shows."""
    correct, incorrect = suspicious_items(artifact, fit, records, count)
    chosen = correct + incorrect
    wanted = {records[i].key for i in chosen}
    tensors = {
        item.key: item.tensor
        for item in data.items(skip=set(data.keys) - wanted)
        if item.tensor is not None
    }
    chosen = [i for i in chosen if records[i].key in tensors]
    images = np.stack([tensors[records[i].key] for i in chosen]) if chosen else None
    results = engine.explain_batch(images) if images is not None else []
    chosen_records = [records[i] for i in chosen]
    verdicts = artifact.detector.evaluate(feature_table(chosen_records)) if chosen else None
    cards: dict[int, Card] = {}
    for k, (i, result) in enumerate(zip(chosen, results, strict=True)):
        assert verdicts is not None and images is not None
        record = records[i]
        names = data.class_names
        pixels = input_pixels(images[k], data.spec, data.preprocessing)
        cards[i] = Card(
            title=f"{record.key}: label {_class(names, record.label)}, "
            f"predicted {_class(names, record.predicted_class)}",
            panels=explanation_panels(pixels, result.mps_mask, result.responsibility),
            figures=[
                ("confidence", figure(record.confidence)),
                ("score", figure(float(verdicts.score[k]), 4)),
                ("p-value", figure(float(verdicts.p_value[k]), 4)),
                ("MPS area", f"{100 * record.mps_area_fraction:.1f}% of pixels"),
                ("evidence", evidence_text(verdicts.evidence[k])),
            ],
            badge=str(verdicts.reason[k]) if verdicts.flagged[k] else "passed",
        )
    score = SCORE_LABELS.get(artifact.detector.score_kind, artifact.detector.score_kind)
    write_gallery(
        path,
        "Calibration: the most suspicious held-out items",
        f"The held-out items (not used to fit the score) with the highest scores of the deployed "
        f"score, {score}, at alpha {artifact.detector.alpha}; the badge is the verdict (the "
        "flag reason, or passed). Panels: the input as the model saw it, the responsibility "
        "map, the MPS (green) over the input.",
        [
            Section(
                "Correct predictions with the highest scores (false alarms first)",
                [cards[i] for i in correct if i in cards],
                "No held-out correct prediction.",
            ),
            Section(
                "Incorrect predictions with the highest scores (errors caught first)",
                [cards[i] for i in incorrect if i in cards],
                "No held-out incorrect prediction.",
            ),
        ],
    )
    return len(cards)


def _class(names: list[str], index: int) -> str:
    name = names[index] if 0 <= index < len(names) else ""
    return str(index) if not name or name == str(index) else f"{index} ({name})"


def _write_records(
    path: Path,
    records: list[ItemRecord],
    split: list[str],
    artifact: CalibrationArtifact,
    fit: FitResult,
) -> None:
    """Every item with its split, features, each candidate's score and the deployed verdict."""
    scores = candidate_scores(fit, records)
    verdicts = artifact.detector.evaluate(feature_table(records))
    kinds = list(scores)
    features = sorted(set.intersection(*(set(r.features) for r in records))) if records else []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "label", "predicted_class", "correct", "confidence", "margin",
                         "mps_area_fraction", "degenerate", "baseline_class", "split",
                         *(f"score_{kind}" for kind in kinds), "p_value", "flagged",
                         *(f"feature_{name}" for name in features)])  # fmt: skip
        for i, (record, part) in enumerate(zip(records, split, strict=True)):
            writer.writerow([record.key, record.label, record.predicted_class, int(record.correct),
                             f"{record.confidence:.17g}", f"{record.margin:.17g}",
                             f"{record.mps_area_fraction:.17g}", int(record.degenerate),
                             record.baseline_class, part,
                             *(f"{scores[kind][i]:.17g}" for kind in kinds),
                             f"{verdicts.p_value[i]:.17g}", int(verdicts.flagged[i]),
                             *(f"{record.features[name]:.17g}" for name in features)])  # fmt: skip


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
    lines = [
        "# Calibration report",
        "",
        f"Model sha256 `{artifact.model.sha256[:16]}...`, score `{facts['selected_score']}`, alpha {facts['alpha']}, "
        f"{facts['n_items']} items ({facts['n_skipped']} skipped), accuracy {number(facts['accuracy'])}.",
        "",
        "## What this calibration can and cannot do",
        "",
        *[f"- {note}" for note in artifact.notes],
        "",
        "## Alarm on held-out data",
        "",
        f"Guarantee of this calibration: {facts['guarantee']}.",
        "",
        f"- False-alarm rate on correct predictions: **{number(facts['false_alarm_rate_holdout'])}** "
        f"(measured on {facts['n_evaluation_correct']} held-out correct items not used for the threshold).",
        f"- Detection rate on incorrect predictions: **{number(facts['detection_rate_holdout'])}** "
        f"({facts['n_holdout_incorrect']} held-out errors).",
        "",
        "The selected score's false-alarm rate on the same held-out correct items under each "
        "threshold option (95% Clopper-Pearson intervals):",
        "",
        "| threshold | false-alarm rate | 95% CI | n |",
        "|---|---|---|---|",
        *[
            f"| {name} | {number(r['rate'])} | {number(r['ci'][0])} to {number(r['ci'][1])} | {r['n']} |"
            for name, r in facts["false_alarm_rates"].items()
        ],
        "",
        "## MPS area (the paper's Table 1)",
        "",
        "| predictions | n | mean area | median area |",
        "|---|---|---|---|",
        _area_row("all", [r.mps_area_fraction for r in records]),
        _area_row("correct", [r.mps_area_fraction for r in records if r.correct]),
        _area_row("incorrect", [r.mps_area_fraction for r in records if not r.correct]),
        "",
        f"Degenerate MPSs (one chunk, or the all-baseline input keeps the class): {number(facts['degenerate_fraction'])}. "
        f"The all-baseline input is classified as class {facts['baseline_class']} for "
        f"{number(facts['baseline_class_fraction'])} of items; {number(facts['baseline_matches_prediction_fraction'])} "
        "of items are predicted as their all-baseline class.",
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
        f"Selected: **{facts['selected_score']}**. {facts['selection']}.",
        "",
        "| score | CV AURC (fit split) | AUROC [95% CI] | AUPR-Error | FPR at 95% TPR | AURC [95% CI] | AUGRC |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {SCORE_LABELS[k]} | {number(v['cv_aurc'], 4)} | {number(v['auroc'])} "
            f"[{number(v['auroc_ci'][0])}, {number(v['auroc_ci'][1])}] | {number(v['aupr_error'])} | "
            f"{number(v['fpr_at_95tpr'])} | {number(v['aurc'], 4)} "
            f"[{number(v['aurc_ci'][0], 4)}, {number(v['aurc_ci'][1], 4)}] | {number(v['augrc'], 4)} |"
            for k, v in facts["scores"].items()
        ],
        "",
        *(
            [
                f"MPS increment: AUROC({facts['mps_increment']['candidate']}) - "
                f"AUROC({facts['mps_increment']['baseline']}) = {number(facts['mps_increment']['auroc_diff'])}, "
                f"95% paired-bootstrap interval [{number(facts['mps_increment']['ci'][0])}, "
                f"{number(facts['mps_increment']['ci'][1])}] ({facts['mps_increment']['n_boot']} resamples).",
            ]
            if facts["mps_increment"]
            else []
        ),
        "",
        "![ROC](roc.png) ![Risk-coverage](risk_coverage.png)",
        "",
        "## Definitions",
        "",
        "- MPS area: pixels of the minimal sufficient pixel set / (H x W). Degenerate: empty, or one chunk.",
        "- `mps` score: posterior probability that the prediction is incorrect given its MPS area "
        "(kernel densities on logit(area) for correct and incorrect predictions of the fit split, "
        "per predicted class where there is enough data, prior = the fit split's error rate).",
        "- `msp` score: 1 - top-1 probability. `confidence`: the confidence feature (MSP, margin, "
        "entropy, max-logit, energy, MaxLogit-pNorm) with the lowest AURC on the fit split. "
        "`class-confidence`: logistic regression on that feature with an intercept and slope per "
        "predicted class. `combined`: logistic regression on logit(area), MSP and margin. "
        "`evidence`: regularised logistic regression on confidence features, the predicted class "
        "and the MPS evidence features.",
        "- Choice (`auto`): cross-validated AURC on the fit split, in two steps that keep the "
        "simpler score unless the richer one's gain has a 95% interval above 0: MSP against the "
        "best other confidence-only score, then that winner against the best MPS-using score.",
        "- p-value: (1 + #{held-out correct scores >= s}) / (n + 1) (marginal), or its "
        "calibration-conditional bound; flagged when p <= alpha.",
        "- AUGRC: area under the generalized risk-coverage curve (accepted errors / all items).",
        "- AUPR-Error: average precision with errors as positives. AURC: area under the risk-coverage curve.",
        "",
    ]
    if skipped:
        lines += ["## Skipped items", "", *[f"- `{key}`: {reason}" for key, reason in skipped], ""]
    return "\n".join(lines)
