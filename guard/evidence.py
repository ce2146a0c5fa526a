"""Per-prediction evidence: confidence features and MPS features for error detection.

Three sources, each a group of named features (``FEATURE_GROUPS``, fixed order):

- ``confidence``: from the model's own output on the whole input (``confidence_features``),
  no extra model evaluation;
- MPS groups (``mps_features``), from an ``MpsResult`` and, for some, a few extra evaluations
  of masked inputs, all in one model call per batch: ``mps_shape`` and ``responsibility`` (none),
  ``mps_only`` (1 per item), ``complement`` (1), ``insertion`` (1 per insertion fraction, 5);
- ``stability`` (``stability_features``): two MPSs of the same input from engines with
  different seeds, so one whole extra MPS per item.

``EXTRA_EVALUATIONS`` and ``EXTRA_MPS`` state these costs per group. A caller computes only the
groups its score needs: ``mps_features(..., groups=...)`` evaluates nothing for groups not asked.

Only numpy and scipy: this module runs inside the sidecar.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
from scipy import ndimage

from guard.algorithm.extraction import rank_pixels

if TYPE_CHECKING:
    from guard.algorithm.baselines import Baseline
    from guard.engine import MpsResult
    from guard.runtime.spec import ModelSpec

DEFAULT_INSERTION_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.10, 0.20)
PNORM_ORDERS: tuple[int, ...] = (2, 4, 8)

# A probability output's zeros are float32 underflow; this floor keeps log(p) finite.
_PROBABILITY_FLOOR = float(np.finfo(np.float32).tiny)


def insertion_feature_names(fractions: Sequence[float]) -> tuple[str, ...]:
    """``insertion_<percent>`` per fraction (0.01 -> ``insertion_1``), then ``insertion_auc``."""
    return (*(f"insertion_{100 * f:g}" for f in fractions), "insertion_auc")


CONFIDENCE_FEATURES: tuple[str, ...] = (
    "msp",
    "margin",
    "entropy",
    "max_logit",
    "energy",
    *(f"pnorm_p{p}" for p in PNORM_ORDERS),
)

FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "confidence": CONFIDENCE_FEATURES,
    "mps_shape": (
        "log_mps_area",
        "degenerate",
        "baseline_keeps_class",
        "mps_components",
        "mps_centroid_distance",
    ),
    "responsibility": (
        "responsibility_entropy",
        "responsibility_half_max_area",
        "responsibility_in_mps",
    ),
    "mps_only": ("mps_only_confidence", "mps_confidence_ratio"),
    "complement": ("complement_keeps_class", "complement_confidence", "complement_top_probability"),
    "insertion": insertion_feature_names(DEFAULT_INSERTION_FRACTIONS),
    "stability": ("seed_dice", "seed_log_area_ratio"),
}

# The groups ``mps_features`` computes, in its output order.
MPS_GROUPS: tuple[str, ...] = ("mps_shape", "responsibility", "mps_only", "complement", "insertion")
MPS_FEATURES: tuple[str, ...] = tuple(name for g in MPS_GROUPS for name in FEATURE_GROUPS[g])
STABILITY_FEATURES: tuple[str, ...] = FEATURE_GROUPS["stability"]

# Model evaluations per item beyond the engine's MPS (and beyond the prediction itself, whose
# scores the confidence features read), per group, with the default insertion fractions.
# ``stability`` needs no single evaluations but a whole second MPS: see ``EXTRA_MPS``.
EXTRA_EVALUATIONS: dict[str, int] = {
    "confidence": 0,
    "mps_shape": 0,
    "responsibility": 0,
    "mps_only": 1,
    "complement": 1,
    "insertion": len(DEFAULT_INSERTION_FRACTIONS),
    "stability": 0,
}
# Whole extra MPS computations per item, per group (one MPS is ~1,000 evaluations).
EXTRA_MPS: dict[str, int] = {group: int(group == "stability") for group in FEATURE_GROUPS}

# A second engine for ``stability_features`` uses this seed offset: with rex-xai's random
# stream (``random_stream="rex"``, run i seeded with seed + i + 1) neighbouring seeds share 19
# of 20 runs, so seed + 1 would give nearly the same MPS.
STABILITY_SEED_OFFSET = 1000


class ProbabilityEvaluator(Protocol):
    """What ``mps_features`` needs from a runtime (``MaskedClassifier`` is the real one)."""

    spec: ModelSpec

    def check_images(self, images: np.ndarray) -> np.ndarray: ...

    def class_probabilities(
        self,
        images: np.ndarray,
        baselines: np.ndarray,
        masks: np.ndarray,
        image_index: np.ndarray,
        classes: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


# -- confidence ---------------------------------------------------------------------------------


def confidence_features(
    scores: np.ndarray, output_kind: Literal["logits", "probabilities"]
) -> dict[str, np.ndarray]:
    """Confidence features [M] each from the model's own output ``scores`` [M, K].

    ``scores`` is ``Prediction.scores`` and ``output_kind`` the classifier's ``output_kind``.

    - ``msp``: the top probability; ``margin``: top-1 minus top-2 probability; ``entropy``: of
      the probabilities, in nats.
    - ``max_logit``: the largest logit.
    - ``energy``: ``logsumexp(z)``, the *negative* free energy of Liu et al. (2020), whose
      energy is ``E = -logsumexp(z)`` (temperature 1). Sign convention: higher = more
      confident, as for every other feature here.
    - ``pnorm_p{2,4,8}``: MaxLogit-pNorm (Cattelan and Silva 2023), ``max_k`` of
      ``(z - mean(z)) / ||z - mean(z)||_p``; 0 where all logits are equal.

    Probability models have no logits: their log-probabilities ``log(max(p, tiny))`` stand in
    (``tiny`` the smallest normal float32, where a float32 softmax underflows). Log-probabilities
    are the logits up to a constant per row, which ``pnorm`` removes by centring, so pnorm is
    the model's own up to that floor; ``max_logit`` is then ``log(msp)`` and ``energy`` is
    ``log(sum p)``, about 0. Every feature is defined for every model, so records have fixed
    columns. Probability outputs are clipped at 0 and renormalised. Finite inputs give finite
    features.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be [M, K] with K >= 1, got shape {list(scores.shape)}")
    if output_kind == "logits":
        logits = scores
        probabilities = _softmax(logits)
    elif output_kind == "probabilities":
        probabilities = _normalised(scores)
        logits = np.log(np.maximum(probabilities, _PROBABILITY_FLOOR))
    else:
        raise ValueError(f"output_kind must be 'logits' or 'probabilities', got {output_kind!r}")

    ordered = np.sort(probabilities, axis=1)
    msp = ordered[:, -1]
    second = ordered[:, -2] if ordered.shape[1] > 1 else np.zeros(len(ordered))
    plogp = np.where(
        probabilities > 0, probabilities * np.log(np.maximum(probabilities, 1e-300)), 0
    )
    features = {
        "msp": msp,
        "margin": msp - second,
        "entropy": np.maximum(-plogp.sum(axis=1), 0.0),
        "max_logit": logits.max(axis=1),
        "energy": _logsumexp(logits),
    }
    centred = logits - logits.mean(axis=1, keepdims=True)
    for p in PNORM_ORDERS:
        norm = _p_norm(centred, p)
        safe = np.where(norm > 0, norm, 1.0)
        features[f"pnorm_p{p}"] = np.where(norm > 0, centred.max(axis=1) / safe, 0.0)
    return {name: features[name] for name in CONFIDENCE_FEATURES}


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _normalised(probabilities: np.ndarray) -> np.ndarray:
    clipped = np.maximum(probabilities, 0.0)
    total = clipped.sum(axis=1, keepdims=True)
    uniform = np.full_like(clipped, 1.0 / clipped.shape[1])
    return np.where(total > 0, clipped / np.where(total > 0, total, 1.0), uniform)


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1)
    return top + np.log(np.exp(logits - top[:, None]).sum(axis=1))


def _p_norm(values: np.ndarray, p: int) -> np.ndarray:
    """Row-wise p-norm, scaled by the largest magnitude first so that x**p cannot overflow."""
    scale = np.abs(values).max(axis=1)
    safe = np.where(scale > 0, scale, 1.0)
    return scale * ((np.abs(values) / safe[:, None]) ** p).sum(axis=1) ** (1.0 / p)


# -- MPS ----------------------------------------------------------------------------------------


def baselines_for(
    classifier: ProbabilityEvaluator, images: np.ndarray, baseline: Baseline
) -> np.ndarray:
    """The baselines the engine uses for ``images`` [M, *input_shape] (``EngineSettings.baseline``).

    Images are checked and cast as the engine does, then ``Baseline.image`` makes each one.
    """
    images = classifier.check_images(images)
    axis = classifier.spec.channel_axis
    return np.stack([baseline.image(image, axis) for image in images]) if len(images) else images


def mps_features(
    classifier: ProbabilityEvaluator,
    images: np.ndarray,
    baselines: np.ndarray,
    results: Sequence[MpsResult],
    *,
    insertion_fractions: Sequence[float] = DEFAULT_INSERTION_FRACTIONS,
    groups: Collection[str] = MPS_GROUPS,
) -> list[dict[str, float]]:
    """MPS features of each item, for the groups asked, in ``MPS_FEATURES`` order.

    ``images`` [M, *input_shape] are the inputs the engine explained, ``baselines`` theirs
    (``baselines_for``), ``results`` the engine's ``MpsResult`` per image. Every extra mutant of
    every item goes into one model call (``classifier.class_probabilities``); none is made for
    groups not asked, and no call at all where no group needs one. Probabilities below are of
    the predicted class unless said otherwise.

    - ``mps_shape``: ``log_mps_area`` (log of the area fraction floored at one pixel, 1/(H*W)),
      ``degenerate`` and ``baseline_keeps_class`` (0/1), ``mps_components`` (4-connected),
      ``mps_centroid_distance`` (MPS centroid to image centre over half the diagonal, pixel
      centres; 0 for an empty MPS).
    - ``responsibility`` (map ``r``, floor removed as ``r - min r`` except for the entropy):
      ``responsibility_entropy`` (of ``r / sum r``, over ``log(H*W)``, in [0, 1]; 1 for an
      all-zero map), ``responsibility_half_max_area`` (share of pixels with ``r - min r`` >= half
      its maximum; 1 for a flat map), ``responsibility_in_mps`` (share of the ``r - min r``
      mass inside the MPS; 0 for an empty MPS; the MPS area for a flat map).
    - ``mps_only`` (1 evaluation): ``mps_only_confidence``, the probability with only the MPS
      kept (the rest at baseline), and ``mps_confidence_ratio``, that over the whole-input
      confidence.
    - ``complement`` (1 evaluation): MPS pixels at baseline, the rest kept:
      ``complement_keeps_class`` (0/1, top-1 still the predicted class),
      ``complement_confidence`` and ``complement_top_probability``.
    - ``insertion`` (1 evaluation per fraction): the probability with only the top ``f`` share
      of pixels by responsibility kept (``round(f * H * W)`` pixels, at least 1, ranked by
      ``rank_pixels`` as the engine ranks them), ``insertion_<percent>``, and
      ``insertion_auc``, the trapezoid area over the fractions divided by their span (a mean
      probability in [0, 1]; the single value for one fraction).

    Empty MPSs are evaluated like any other, so each group costs a fixed number of evaluations.
    """
    asked = _mps_groups(groups)
    images = classifier.check_images(images)
    baselines = np.asarray(baselines).astype(images.dtype, copy=False)
    if len(results) != len(images) or baselines.shape != images.shape:
        raise ValueError(
            f"{len(images)} images need as many baselines and results, got "
            f"{list(baselines.shape)} baselines and {len(results)} results"
        )
    spec = classifier.spec
    shape = (spec.height, spec.width)
    fractions = tuple(float(f) for f in insertion_fractions)
    if "insertion" in asked and (not fractions or not all(0 < f <= 1 for f in fractions)):
        raise ValueError(f"insertion fractions must be in (0, 1], got {fractions}")
    if "insertion" in asked and list(fractions) != sorted(set(fractions)):
        raise ValueError(f"insertion fractions must be increasing, got {fractions}")

    # Extra mutants per item, in a fixed order: MPS only, complement, insertion points.
    plan: list[tuple[str, np.ndarray]] = []
    for result in results:
        mps = np.asarray(result.mps_mask, dtype=bool)
        if mps.shape != shape:
            raise ValueError(
                f"an MPS mask is {list(mps.shape)}, the model's input is {list(shape)}"
            )
        if "mps_only" in asked:
            plan.append(("mps_only", mps))
        if "complement" in asked:
            plan.append(("complement", ~mps))
        if "insertion" in asked:
            ranking = rank_pixels(np.asarray(result.responsibility))
            for fraction in fractions:
                keep = np.zeros(ranking.size, dtype=bool)
                keep[ranking[: _kept_pixels(fraction, ranking.size)]] = True
                plan.append(("insertion", keep.reshape(shape)))
    per_item = len(plan) // max(len(results), 1)
    if plan:
        masks = np.stack([mask for _, mask in plan])
        index = np.repeat(np.arange(len(results), dtype=np.int64), per_item)
        predicted = np.array([r.predicted_class for r in results], dtype=np.int64)
        top, top_p, class_p = classifier.class_probabilities(
            images, baselines, masks, index, predicted[index]
        )

    records = []
    for m, result in enumerate(results):
        record: dict[str, float] = {}
        mps = np.asarray(result.mps_mask, dtype=bool)
        if "mps_shape" in asked:
            record.update(_shape_features(result, mps))
        if "responsibility" in asked:
            record.update(responsibility_features(np.asarray(result.responsibility), mps))
        rows = iter(range(m * per_item, (m + 1) * per_item))
        if "mps_only" in asked:
            i = next(rows)
            record["mps_only_confidence"] = float(class_p[i])
            record["mps_confidence_ratio"] = float(class_p[i] / max(result.confidence, 1e-12))
        if "complement" in asked:
            i = next(rows)
            record["complement_keeps_class"] = float(top[i] == result.predicted_class)
            record["complement_confidence"] = float(class_p[i])
            record["complement_top_probability"] = float(top_p[i])
        if "insertion" in asked:
            curve = np.array([class_p[next(rows)] for _ in fractions])
            names = insertion_feature_names(fractions)
            record.update({name: float(v) for name, v in zip(names, curve, strict=False)})
            record["insertion_auc"] = _mean_trapezoid(np.array(fractions), curve)
        records.append(record)
    return records


def extra_evaluations(
    groups: Collection[str], insertion_fractions: Sequence[float] = DEFAULT_INSERTION_FRACTIONS
) -> int:
    """Model evaluations per item beyond the engine's MPS for these groups (second MPS aside)."""
    counts = dict(EXTRA_EVALUATIONS, insertion=len(insertion_fractions))
    unknown = set(groups) - set(counts)
    if unknown:
        raise ValueError(f"unknown feature groups {sorted(unknown)}; known: {list(counts)}")
    return sum(counts[group] for group in groups)


def _mps_groups(groups: Collection[str]) -> set[str]:
    asked = set(groups)
    elsewhere = asked & {"confidence", "stability"}
    if elsewhere:
        raise ValueError(
            f"mps_features does not compute {sorted(elsewhere)}: use confidence_features / "
            "stability_features"
        )
    unknown = asked - set(MPS_GROUPS)
    if unknown:
        raise ValueError(f"unknown feature groups {sorted(unknown)}; known: {list(FEATURE_GROUPS)}")
    return asked


def _kept_pixels(fraction: float, pixels: int) -> int:
    return min(pixels, max(1, int(np.floor(fraction * pixels + 0.5))))


def _mean_trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) == 1:
        return float(y[0])
    area = float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2)
    return area / float(x[-1] - x[0])


def _floored_log_area(mask: np.ndarray) -> float:
    return float(np.log(max(mask.sum(), 1) / mask.size))


def _shape_features(result: MpsResult, mps: np.ndarray) -> dict[str, float]:
    return {
        "log_mps_area": _floored_log_area(mps),
        "degenerate": float(bool(result.degenerate)),
        "baseline_keeps_class": float(result.baseline_class == result.predicted_class),
        **mask_shape_features(mps),
    }


def mask_shape_features(mask: np.ndarray) -> dict[str, float]:
    """``mps_components`` and ``mps_centroid_distance`` of a boolean mask [H, W]."""
    mask = np.asarray(mask, dtype=bool)
    _, components = ndimage.label(mask)  # the default structure is 4-connected in 2-D
    if not mask.any():
        return {"mps_components": 0.0, "mps_centroid_distance": 0.0}
    height, width = mask.shape
    rows, cols = np.nonzero(mask)
    half_diagonal = np.hypot(height - 1, width - 1) / 2
    distance = np.hypot(rows.mean() - (height - 1) / 2, cols.mean() - (width - 1) / 2)
    return {
        "mps_components": float(components),
        "mps_centroid_distance": float(distance / half_diagonal) if half_diagonal > 0 else 0.0,
    }


def responsibility_features(responsibility: np.ndarray, mps: np.ndarray) -> dict[str, float]:
    """The ``responsibility`` group for one map [H, W] and its MPS (see ``mps_features``)."""
    r = np.asarray(responsibility, dtype=np.float64)
    mps = np.asarray(mps, dtype=bool)
    pixels = r.size
    clipped = np.maximum(r, 0.0)
    total = clipped.sum()
    if total > 0 and pixels > 1:
        share = clipped[clipped > 0] / total
        entropy = float(np.clip(-(share * np.log(share)).sum() / np.log(pixels), 0.0, 1.0))
    else:
        entropy = 1.0
    above_floor = r - r.min()
    peak, mass = above_floor.max(), above_floor.sum()
    half_max_area = float((above_floor >= peak / 2).mean()) if peak > 0 else 1.0
    if not mps.any():
        in_mps = 0.0
    elif mass > 0:
        in_mps = float(above_floor[mps].sum() / mass)
    else:
        in_mps = float(mps.mean())
    return {
        "responsibility_entropy": entropy,
        "responsibility_half_max_area": half_max_area,
        "responsibility_in_mps": in_mps,
    }


# -- stability ----------------------------------------------------------------------------------


def stability_features(first: MpsResult, second: MpsResult) -> dict[str, float]:
    """How much an input's MPS moves with the engine's seed.

    ``first`` and ``second`` are MPSs of the same input from engines that differ only in
    ``EngineSettings.seed``; use ``seed + STABILITY_SEED_OFFSET`` (1000) for the second, since
    with rex-xai's random stream neighbouring seeds share 19 of 20 runs. ``seed_dice``: Dice of
    the two masks (1 when both are empty); ``seed_log_area_ratio``: ``|log(area1 / area2)|``
    with areas floored at one pixel, 1/(H*W).
    """
    a = np.asarray(first.mps_mask, dtype=bool)
    b = np.asarray(second.mps_mask, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"MPS masks of different shapes: {list(a.shape)} and {list(b.shape)}")
    sizes = int(a.sum()) + int(b.sum())
    dice = 2.0 * int((a & b).sum()) / sizes if sizes else 1.0
    return {
        "seed_dice": float(dice),
        "seed_log_area_ratio": abs(_floored_log_area(a) - _floored_log_area(b)),
    }


def item_features(
    classifier: ProbabilityEvaluator,
    baseline: Baseline,
    images: np.ndarray,
    scores: np.ndarray,
    output_kind: Literal["logits", "probabilities"],
    results: Sequence[MpsResult],
    *,
    groups: Collection[str] = ("confidence", *MPS_GROUPS),
    second: Sequence[MpsResult] | None = None,
) -> list[dict[str, float]]:
    """Every asked feature of each explained item, confidence and MPS groups together.

    ``scores`` is the model's own output for ``images`` (``Prediction.scores``); ``second``
    the MPSs of a second seed, for the ``stability`` group.
    """
    rows: list[dict[str, float]] = [{} for _ in results]
    if "confidence" in groups:
        confidence = confidence_features(scores, output_kind)
        for i, row in enumerate(rows):
            row.update({name: float(values[i]) for name, values in confidence.items()})
    mps_groups = [g for g in MPS_GROUPS if g in groups]
    if mps_groups:
        baselines = baselines_for(classifier, images, baseline)
        found = mps_features(classifier, images, baselines, results, groups=mps_groups)
        for row, extra in zip(rows, found, strict=True):
            row.update(extra)
    if "stability" in groups:
        if second is None:
            raise ValueError("the stability features need a second seed's MPSs")
        for row, a, b in zip(rows, results, second, strict=True):
            row.update(stability_features(a, b))
    return rows
