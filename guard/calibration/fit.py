"""Fitting the check offline: candidate scores, the choice among them, conformal references.

Splits (all stratified on (correct, predicted class), deterministic for a seed):

1. fit split (``1 - holdout_fraction``): every candidate score is fitted here, and ``auto``
   chooses among them here, by cross-validated AURC (``folds`` folds of the fit split), and
   nowhere else.
2. held-out split, divided once more in halves:
   - reference half: its *correct* items' scores are the conformal reference (and their
     areas the small-tail reference);
   - evaluation half: its correct items give the reported false-alarm rates, measured on
     items the threshold never saw.
   The detection rate uses every held-out incorrect item (the reference holds correct items
   only). Ranking metrics (AUROC, AUPR-Error, FPR@95TPR, AURC, AUGRC) use the whole held-out
   split, since no score depends on the conformal reference.

Choice (``score="auto"``), in two steps that each keep the simpler score unless the richer one
has a lower cross-validated AURC with a paired-bootstrap 95% interval of the difference above
0: MSP (free, the baseline every detector must match) against the best other confidence-only
score (the best confidence feature, class-conditional confidence); then that winner against
the best MPS-using score (area, combined, evidence). Parsimony: fewer moving parts, no MPS
cost in the sidecar, and better behaviour under shift (learned combinations of confidence and
MPS features have been measured to lose to confidence alone on corrupted inputs).

Descriptive statistics (area means and medians, the Mann-Whitney test, degenerate share,
baseline class) use all items: they fit nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import beta

from guard.calibration import detection_metrics as metrics
from guard.calibration.candidates import available, fit_score
from guard.calibration.records import ItemRecord, feature_table
from guard.errors import InvalidInputError
from guard.numbers import count, mean, median, number
from guard.verdict.artifact import (
    SCHEMA_VERSION,
    CalibrationArtifact,
    HeldoutMetrics,
    Increment,
    MannWhitneyResult,
    ModelInfo,
    Rate,
    ScoreMetrics,
)
from guard.verdict.conformal import ConformalReference, minimum_reference
from guard.verdict.detector import Detector
from guard.verdict.scores import MPS_SCORES, SCORE_KINDS, MpsScore, ScoreModel

__all__ = [
    "SCORE_CHOICES",
    "FitResult",
    "artifact_from_fit",
    "conformal_references",
    "fit_calibration",
    "stratified_split",
]

SCORE_CHOICES = ("auto", *SCORE_KINDS)
CONFIDENCE_ONLY = ("msp", "confidence", "class-confidence")
DEGENERATE_NOTE_FRACTION = 0.5
BASELINE_NOTE_FRACTION = 0.2
FEW_ERRORS = 10
SPREAD_NOTE_RATIO = 1.5  # note a marginal threshold whose 90% draw exceeds this x alpha
VOID_AUROC = 0.6  # below this (and >= 0.5) the MPS score is reported as close to chance

Indices = NDArray[np.int64]
Table = Mapping[str, NDArray[np.float64]]


@dataclass(frozen=True, eq=False)
class FitResult:
    """A fitted detector plus what was measured on held-out data."""

    detector: Detector
    metrics: HeldoutMetrics
    notes: tuple[str, ...]
    fit_indices: Indices = field(repr=False)
    reference_indices: Indices = field(repr=False)  # held-out, conformal-reference half
    evaluation_indices: Indices = field(repr=False)  # held-out, evaluation half
    candidates: dict[str, ScoreModel] = field(repr=False, default_factory=dict)
    # The selected score under each threshold option the report measures.
    options: dict[str, Detector] = field(repr=False, default_factory=dict)


def stratified_split(
    records: Sequence[ItemRecord], holdout_fraction: float = 0.5, seed: int = 0
) -> tuple[Indices, Indices]:
    """(fit_indices, holdout_indices), stratified on (correct, predicted_class).

    Every stratum, and every correctness group as a whole, gets the holdout fraction of its
    items up to rounding (within one item), so even strata of one or two items are spread
    fairly rather than all landing on one side.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    correct = np.array([r.correct for r in records], dtype=bool)
    predicted = np.array([r.predicted_class for r in records], dtype=np.int64)
    return _split(correct, predicted, holdout_fraction, np.random.default_rng(seed))


def _split(
    correct: NDArray[np.bool_],
    predicted: NDArray[np.int64],
    fraction: float,
    rng: np.random.Generator,
) -> tuple[Indices, Indices]:
    # Systematic sampling with a random start over items sorted by stratum (random order
    # within): any contiguous run of m items gets floor or ceil of m * fraction chosen.
    n = correct.size
    order = np.lexsort((rng.random(n), predicted, ~correct))
    start = rng.random()
    i = np.arange(n)
    chosen = np.floor((i + 1) * fraction + start) > np.floor(i * fraction + start)
    return np.sort(order[~chosen]), np.sort(order[chosen])


def _rows(table: Table, idx: Indices) -> dict[str, NDArray[np.float64]]:
    return {name: np.asarray(values)[idx] for name, values in table.items()}


def _folds(incorrect: NDArray[np.bool_], k: int, seed: int) -> list[Indices]:
    """k stratified folds (positions into ``incorrect``), deterministic for a seed."""
    rng = np.random.default_rng([seed, 2])
    assignment = np.empty(incorrect.size, dtype=np.int64)
    for group in (np.flatnonzero(incorrect), np.flatnonzero(~incorrect)):
        order = rng.permutation(group)
        assignment[order] = np.arange(order.size) % k
    return [np.flatnonzero(assignment == f) for f in range(k)]


def out_of_fold_scores(
    kinds: Sequence[str], table: Table, incorrect: NDArray[np.bool_], folds: int, seed: int
) -> dict[str, NDArray[np.float64]]:
    """Each candidate's scores of the fit items, each item scored by a fit without its fold."""
    out = {kind: np.full(incorrect.size, np.nan) for kind in kinds}
    for test in _folds(incorrect, folds, seed):
        train = np.setdiff1d(np.arange(incorrect.size), test)
        train_rows, test_rows = _rows(table, train), _rows(table, test)
        for kind in kinds:
            out[kind][test] = fit_score(kind, train_rows, incorrect[train]).scores(test_rows)
    return out


@dataclass(frozen=True)
class Choice:
    """Which score ``auto`` took, and why."""

    kind: str
    cv_aurc: dict[str, float]
    best_confidence_only: str
    best_mps: str | None
    gain: tuple[float, float, float] | None  # AURC(best conf-only) - AURC(best MPS), 95% CI
    reason: str


def _measurably_better(
    simpler: str,
    richer: str,
    oof: Mapping[str, NDArray[np.float64]],
    cv: Mapping[str, float],
    incorrect: NDArray[np.bool_],
    *,
    n_boot: int,
    seed: int,
) -> tuple[bool, tuple[float, float, float], str]:
    """Whether ``richer`` lowers the cross-validated AURC of ``simpler`` with a 95% CI above 0."""
    gain = metrics.bootstrap_difference(
        metrics.aurc, oof[simpler], oof[richer], incorrect, n_boot=n_boot, seed=seed
    )
    compared = (
        f"cross-validated AURC on the fit split {cv[richer]:.4f} for {richer} against "
        f"{cv[simpler]:.4f} for {simpler} (improvement {gain[0]:+.4f}, 95% CI "
        f"{number(gain[1], 4)} to {number(gain[2], 4)})"
    )
    return (not math.isnan(gain[1]) and gain[1] > 0), gain, compared


def choose_score(
    kinds: Sequence[str],
    oof: Mapping[str, NDArray[np.float64]],
    incorrect: NDArray[np.bool_],
    *,
    n_boot: int,
    seed: int,
) -> Choice:
    """The parsimonious choice by cross-validated AURC on the fit split (see module doc).

    Two steps, each keeping the simpler score unless the richer one measurably improves on
    it: MSP (the free baseline) against the best other confidence-only score, then that
    winner against the best MPS-using score.
    """
    cv = {kind: metrics.aurc(oof[kind], incorrect) for kind in kinds}
    compare = partial(
        _measurably_better, oof=oof, cv=cv, incorrect=incorrect, n_boot=n_boot, seed=seed
    )

    def best(group: Sequence[str]) -> str | None:
        scored = [k for k in group if k in kinds and not math.isnan(cv[k])]
        return min(scored, key=lambda k: cv[k]) if scored else None

    plain = "msp"
    plain_reason = "no other confidence-only score has a lower cross-validated AURC than MSP"
    rival = best([k for k in CONFIDENCE_ONLY if k != "msp"])
    if rival is not None and cv[rival] < cv["msp"]:
        better, _, compared = compare("msp", rival)
        if better:
            plain, plain_reason = rival, f"{rival} measurably improves on MSP: {compared}"
        else:
            plain_reason = (
                f"the free baseline MSP is kept: {rival} did not measurably improve on it "
                f"({compared})"
            )
    mps = best([k for k in kinds if k in MPS_SCORES])
    if mps is None:
        reason = f"{plain_reason}; no MPS score to compare"
        return Choice(plain, cv, plain, None, None, reason)
    better, gain, compared = compare(plain, mps)
    if better:
        reason = f"the MPS-using score {mps} measurably improves on {plain}: {compared}"
        return Choice(mps, cv, plain, mps, gain, reason)
    reason = (
        f"{plain_reason}; the best MPS-using score did not measurably improve on {plain}: "
        f"{compared}; the simpler score is kept (fewer moving parts, no MPS cost per request, "
        "better behaviour under shift)"
    )
    return Choice(plain, cv, plain, mps, gain, reason)


def conformal_references(
    correct_scores: ArrayLike,
    correct_areas: ArrayLike,
    *,
    alpha: float,
    flag_small_tail: bool,
    delta: float | None = None,
) -> tuple[ConformalReference, ConformalReference | None]:
    """Conformal references from held-out correct predictions that fitted nothing else.

    With the small tail on, each tail gets alpha/2 so that the union of both alarms keeps
    the false-alarm rate on correct predictions <= alpha.
    """
    per_tail = alpha / 2 if flag_small_tail else alpha
    score_reference = ConformalReference.from_values(correct_scores, per_tail, delta)
    small = -np.asarray(correct_areas, dtype=np.float64)
    small_reference = (
        ConformalReference.from_values(small, per_tail, delta) if flag_small_tail else None
    )
    return score_reference, small_reference


def _detector(
    score: ScoreModel,
    scores: NDArray[np.float64],
    table: Table,
    reference_correct: Indices,
    reference_all: Indices,
    *,
    alpha: float,
    flag_small_tail: bool,
    per_class: bool,
    delta: float | None,
) -> Detector:
    area = table["mps_area_fraction"]
    score_reference, small_reference = conformal_references(
        scores[reference_correct],
        area[reference_correct],
        alpha=alpha,
        flag_small_tail=flag_small_tail,
        delta=delta,
    )
    class_references = {}
    exchangeability = np.sort(scores[reference_all]).tolist()
    if per_class:
        per_tail = score_reference.alpha
        classes = table["predicted_class"].astype(np.int64)
        for c in np.unique(classes[reference_correct]):
            rows = reference_correct[classes[reference_correct] == c]
            reference = ConformalReference.from_values(scores[rows], per_tail, delta)
            if reference.threshold is not None:  # too few: the pooled reference serves it
                class_references[int(c)] = reference
    return Detector(
        score=score,
        alpha=alpha,
        per_class=per_class,
        delta=delta,
        flag_small_tail=flag_small_tail,
        score_reference=score_reference,
        class_references=class_references,
        small_tail_reference=small_reference,
        exchangeability_reference=exchangeability,
    )


def _rate(flags: NDArray[np.bool_]) -> Rate:
    """A flagged share with its Clopper-Pearson 95% interval."""
    n, k = int(flags.size), int(flags.sum())
    if n == 0:
        return Rate(rate=None, ci=(None, None), n=0)
    low = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))
    return Rate(rate=k / n, ci=(low, high), n=n)


def _score_metrics(
    scores: NDArray[np.float64],
    incorrect: NDArray[np.bool_],
    cv_aurc: float | None,
    n_boot: int,
    seed: int,
) -> ScoreMetrics:
    auroc_ci = metrics.bootstrap_interval(
        metrics.auroc, scores, incorrect, n_boot=n_boot, seed=seed
    )
    aurc_ci = metrics.bootstrap_interval(metrics.aurc, scores, incorrect, n_boot=n_boot, seed=seed)
    return ScoreMetrics(
        auroc=metrics.auroc(scores, incorrect),
        aupr_error=metrics.aupr_error(scores, incorrect),
        fpr_at_95_tpr=metrics.fpr_at_95_tpr(scores, incorrect),
        aurc=metrics.aurc(scores, incorrect),
        augrc=metrics.augrc(scores, incorrect),
        auroc_ci=auroc_ci,
        aurc_ci=aurc_ci,
        cv_aurc=cv_aurc,
    )


def fit_calibration(
    records: Sequence[ItemRecord],
    *,
    alpha: float = 0.05,
    score: str = "auto",
    holdout_fraction: float = 0.5,
    seed: int = 0,
    flag_small_tail: bool = False,
    per_class: bool = False,
    delta: float | None = None,
    folds: int = 5,
    n_boot: int = 2000,
) -> FitResult:
    """Fit the candidates on labelled records, choose, and measure on held-out ones."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if delta is not None and not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if score not in SCORE_CHOICES:
        raise ValueError(f"score must be one of {', '.join(SCORE_CHOICES)}, got {score!r}")
    records = list(records)
    n = len(records)
    table = feature_table(records)
    kinds = available(table)
    if score not in ("auto", *kinds):
        raise InvalidInputError(
            f"the {score} score needs features these records do not hold (available: "
            f"{', '.join(kinds)}); re-run guard calibrate with the evidence features"
        )
    area = table["mps_area_fraction"]
    predicted = table["predicted_class"].astype(np.int64)
    incorrect = np.array([not r.correct for r in records], dtype=bool)
    fit_idx, holdout_idx = stratified_split(records, holdout_fraction, seed)
    if fit_idx.size == 0 or holdout_idx.size == 0:
        raise InvalidInputError(
            f"calibration needs labelled items on both sides of the split; got {n} in all"
        )
    if fit_idx.size < 2 * folds:
        raise InvalidInputError(
            f"calibration needs at least {2 * folds} items in the fit split to cross-validate "
            f"the scores ({folds} folds); got {fit_idx.size} of {n} labelled items. Label more data"
        )

    # Everything fitted or chosen sees the fit split only.
    fit_rows, fit_incorrect = _rows(table, fit_idx), incorrect[fit_idx]
    oof = out_of_fold_scores(kinds, fit_rows, fit_incorrect, min(folds, max(2, fit_idx.size)), seed)
    choice = choose_score(kinds, oof, fit_incorrect, n_boot=n_boot, seed=seed)
    selected = choice.kind if score == "auto" else score
    candidates = {kind: fit_score(kind, fit_rows, fit_incorrect) for kind in kinds}
    scores = {kind: model.scores(table) for kind, model in candidates.items()}

    # Held-out split: a conformal-reference half and an evaluation half.
    rng = np.random.default_rng([seed, 1])
    ref_local, eval_local = _split(~incorrect[holdout_idx], predicted[holdout_idx], 0.5, rng)
    reference_idx, evaluation_idx = holdout_idx[ref_local], holdout_idx[eval_local]
    reference_correct = reference_idx[~incorrect[reference_idx]]
    evaluation_correct = evaluation_idx[~incorrect[evaluation_idx]]
    holdout_incorrect = holdout_idx[incorrect[holdout_idx]]

    def detector(per_class_: bool, delta_: float | None) -> Detector:
        return _detector(
            candidates[selected],
            scores[selected],
            table,
            reference_correct,
            reference_idx,
            alpha=alpha,
            flag_small_tail=flag_small_tail,
            per_class=per_class_,
            delta=delta_,
        )

    deployed = detector(per_class, delta)
    options = {
        "marginal": detector(False, None),
        "per-class": detector(True, None),
        "calibration-conditional": detector(False, delta if delta is not None else 0.1),
    }

    def flags(d: Detector, idx: Indices) -> NDArray[np.bool_]:
        return d.evaluate(_rows(table, idx)).flagged if idx.size else np.zeros(0, dtype=bool)

    y_hold = incorrect[holdout_idx]
    score_metrics = {
        kind: _score_metrics(
            scores[kind][holdout_idx], y_hold, choice.cv_aurc.get(kind), n_boot, seed
        )
        for kind in kinds
    }
    increment = _increment(choice, scores, holdout_idx, y_hold, n_boot, seed)
    false_alarms = flags(deployed, evaluation_correct)
    detections = flags(deployed, holdout_incorrect)
    baseline = np.array([r.baseline_class for r in records], dtype=np.int64)
    baseline_values, baseline_counts = np.unique(baseline, return_counts=True)
    mode_at = int(np.argmax(baseline_counts))
    result_metrics = HeldoutMetrics(
        n_items=n,
        n_correct=int((~incorrect).sum()),
        n_incorrect=int(incorrect.sum()),
        accuracy=float((~incorrect).mean()),
        n_fit=int(fit_idx.size),
        n_holdout=int(holdout_idx.size),
        n_holdout_incorrect=int(holdout_incorrect.size),
        n_reference_correct=int(reference_correct.size),
        n_evaluation_correct=int(evaluation_correct.size),
        false_alarm_rate_holdout=_rate(false_alarms).rate,
        detection_rate_holdout=_rate(detections).rate,
        scores=score_metrics,
        false_alarm_rates={
            name: _rate(flags(d, evaluation_correct)) for name, d in options.items()
        },
        detection_rate=_rate(detections),
        selected_score=selected,
        selection=choice.reason if score == "auto" else "chosen by --score",
        mps_increment=increment,
        mean_area_correct=mean(area[~incorrect]),
        median_area_correct=median(area[~incorrect]),
        mean_area_incorrect=mean(area[incorrect]),
        median_area_incorrect=median(area[incorrect]),
        degenerate_fraction=float(np.mean([r.degenerate for r in records])),
        baseline_class_mode=int(baseline_values[mode_at]),
        baseline_class_mode_fraction=float(baseline_counts[mode_at] / n),
        baseline_matches_prediction_fraction=float(np.mean(baseline == predicted)),
        mann_whitney=MannWhitneyResult(
            **metrics.mann_whitney_area(area[incorrect], area[~incorrect])
        ),
    )
    notes = _notes(
        result_metrics,
        deployed,
        candidates,
        fit_incorrect=int(fit_incorrect.sum()),
        fit_correct=int((~fit_incorrect).sum()),
        fit_classes=np.unique(predicted[fit_idx]),
    )
    return FitResult(
        detector=deployed,
        metrics=result_metrics,
        notes=tuple(notes),
        fit_indices=fit_idx,
        reference_indices=reference_idx,
        evaluation_indices=evaluation_idx,
        candidates=candidates,
        options=options,
    )


def _increment(
    choice: Choice,
    scores: Mapping[str, NDArray[np.float64]],
    holdout_idx: Indices,
    y_hold: NDArray[np.bool_],
    n_boot: int,
    seed: int,
) -> Increment | None:
    """Held-out AUROC of the best MPS score (chosen on the fit split) minus class-confidence's."""
    if choice.best_mps is None:
        return None
    baseline = "class-confidence"
    diff = metrics.bootstrap_auroc_difference(
        scores[choice.best_mps][holdout_idx], scores[baseline][holdout_idx], y_hold,
        n_boot=n_boot, seed=seed,
    )  # fmt: skip
    return Increment(
        baseline=baseline,
        candidate=choice.best_mps,
        auroc_diff=diff[0],
        ci=(diff[1], diff[2]),
        n_boot=n_boot,
    )


def mps_value_sentences(m: HeldoutMetrics) -> list[str]:
    """Whether the MPS added detection value here, and what it gives regardless."""
    inc = m.mps_increment
    if inc is None or inc.auroc_diff is None:
        added = "Whether the MPS adds detection value could not be measured on this data."
    else:
        low, high = inc.ci
        ci = f"{inc.auroc_diff:+.3f}, 95% CI {number(low)} to {number(high)}"
        if low is not None and low > 0:
            added = (
                f"The MPS adds detection value on this model and data: {inc.candidate} beats "
                f"{inc.baseline} in held-out AUROC by {ci}."
            )
        elif high is not None and high < 0:
            added = (
                f"The MPS adds no detection value on this model and data: {inc.candidate} is "
                f"worse than {inc.baseline} in held-out AUROC ({ci})."
            )
        else:
            added = (
                f"The MPS adds no measurable detection value on this model and data: "
                f"{inc.candidate} vs {inc.baseline} in held-out AUROC: {ci}."
            )
    gives = (
        "What the MPS still gives is evidence: for each flagged prediction, the pixels the model "
        "needed for it, to look at before acting on the flag."
    )
    return [added, gives]


def _notes(
    m: HeldoutMetrics,
    detector: Detector,
    candidates: Mapping[str, ScoreModel],
    *,
    fit_incorrect: int,
    fit_correct: int,
    fit_classes: NDArray[np.int64],
) -> list[str]:
    """Plain-language caveats: when a number means less than it seems, say so."""
    notes: list[str] = [f"Score {m.selected_score}: {m.selection}.", *mps_value_sentences(m)]
    if fit_incorrect == 0:
        notes.append(
            "No incorrect predictions in the fit split: the fitted scores carry no information "
            "beyond confidence. Calibrate on data where the model makes mistakes."
        )
    elif fit_incorrect < FEW_ERRORS:
        notes.append(
            f"Only {count(fit_incorrect, 'incorrect prediction')} in the fit split: the "
            "fitted scores are noisy. Use more labelled data."
        )
    if fit_correct == 0:
        notes.append(
            "No correct predictions in the fit split: the fitted scores carry no information."
        )
    if m.n_holdout_incorrect < FEW_ERRORS:
        notes.append(
            f"Only {count(m.n_holdout_incorrect, 'incorrect prediction')} in the held-out "
            "split: AUROC, AUPR-Error, FPR@95TPR and the detection rate are very uncertain."
        )
    mps_model = candidates.get("mps")
    if isinstance(mps_model, MpsScore) and fit_incorrect:
        own = sorted(mps_model.area_model.per_class)
        pooled = [int(c) for c in fit_classes if int(c) not in mps_model.area_model.per_class]
        if pooled and own:
            notes.append(
                f"The MPS-area score has per-class area distributions for {len(own)} of "
                f"{len(own) + len(pooled)} predicted classes; the others use the pooled ones."
            )
    if m.degenerate_fraction >= DEGENERATE_NOTE_FRACTION:
        notes.append(
            f"{m.degenerate_fraction:.0%} of MPSs are degenerate (a single chunk, or the all-baseline input alone keeps the class): "
            "for this model and baseline the MPS size carries little information. Try "
            "another baseline, e.g. a blurred copy of the image instead of a constant."
        )
    if m.baseline_matches_prediction_fraction >= BASELINE_NOTE_FRACTION:
        notes.append(
            f"For {m.baseline_matches_prediction_fraction:.0%} of items the all-baseline "
            f"input already gets the predicted class (most common baseline class: "
            f"{m.baseline_class_mode}, {m.baseline_class_mode_fraction:.0%} of items), so "
            "their MPSs are empty or minimal whatever the image shows: MPS size says nothing "
            "about those predictions. Try another baseline, e.g. a blurred one."
        )
    mps_auroc = m.scores["mps"].auroc if "mps" in m.scores else None
    if mps_auroc is not None and mps_auroc < VOID_AUROC:
        notes.append(
            f"AUROC of the MPS-area score (the paper's check) on held-out data is "
            f"{mps_auroc:.2f}: MPS size alone separates errors from correct predictions "
            "barely better than chance, or worse, for this model, data and baseline."
        )
    notes.append(
        "Held-out AUROC: "
        + ", ".join(f"{kind} {number(s.auroc, 2)}" for kind, s in m.scores.items())
        + "."
    )
    reference = detector.score_reference
    if reference.threshold is None:
        needed = minimum_reference(reference.alpha, reference.delta)
        notes.append(
            "The conformal reference has only "
            f"{count(m.n_reference_correct, 'held-out correct prediction')}; at least "
            f"{needed} are needed for alpha={reference.alpha:g}"
            + (f" and delta={reference.delta:g}" if reference.delta is not None else "")
            + ", so nothing will be flagged. Use more labelled data or a larger alpha."
        )
    elif reference.delta is None:
        high = reference.false_alarm_quantile(0.9)
        if high is not None and high > SPREAD_NOTE_RATIO * reference.alpha:
            notes.append(
                f"With {count(m.n_reference_correct, 'held-out correct prediction')} in the "
                f"conformal reference, the marginal guarantee holds on average over calibration "
                f"draws, but one draw's threshold gives a false-alarm rate above {high:.3f} in "
                f"1 draw of 10. --delta 0.1 bounds the rate of this draw instead (with "
                f"probability 0.9), or label more data."
            )
    if detector.per_class:
        served = len(detector.class_references)
        notes.append(
            f"Per-class thresholds for {served} of {len(fit_classes)} predicted classes; "
            "classes with too few held-out correct predictions use the pooled threshold, and "
            "for them the guarantee is marginal only."
        )
    notes.append(f"Guarantee: {detector.guarantee}.")
    if detector.flag_small_tail:
        notes.append(
            f"Unusually small MPSs are flagged too; each tail is tested at alpha/2 = "
            f"{detector.alpha / 2:g}, so at most alpha = {detector.alpha:g} of correct "
            "predictions are flagged in all."
        )
    return notes


def artifact_from_fit(
    fit: FitResult,
    *,
    model: ModelInfo,
    preprocessing: dict[str, Any] | None,
    engine: dict[str, Any],
    class_names: list[str],
    area_reference: ArrayLike | None = None,
) -> CalibrationArtifact:
    """Bind a fit to the model and engine settings that produced its records."""
    return CalibrationArtifact(
        schema_version=SCHEMA_VERSION,
        created_at=datetime.now(UTC),
        model=model,
        preprocessing=preprocessing,
        engine=engine,
        class_names=list(class_names),
        detector=fit.detector,
        metrics=fit.metrics,
        notes=list(fit.notes),
        area_reference=None
        if area_reference is None
        else np.sort(np.asarray(area_reference, dtype=np.float64)).tolist(),
    )
