"""The audit report: summary.json, records.csv, mps_masks.npz, report.md, the violin plot
and gallery.html.

records.csv holds every model's record of every item and mps_masks.npz every MPS under every
seed, so each figure of the report can be recomputed independently of this code. gallery.html
shows the images the models disagree on most, with each model's MPS over the input.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from guard.audit.localisation import LOCALISATION_METRICS, dice  # noqa: E402
from guard.audit.statistics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE  # noqa: E402
from guard.audit.summary import ModelOutcome, with_ci  # noqa: E402
from guard.gallery import (  # noqa: E402
    Card,
    Section,
    input_pixels,
    overlay_panel,
    panel,
    rgb,
    write_gallery,
)
from guard.numbers import number, p_value  # noqa: E402

if TYPE_CHECKING:
    from guard.audit.run import AuditRecord
    from guard.datasets import LabelledData

# Images in gallery.html.
GALLERY_ITEMS = 8

LOCALISATION_LABELS = {
    "mask_share": "mask share",
    "mps_precision_in_mask": "MPS precision in mask",
    "mask_coverage": "mask coverage",
    "rra": "RRA",
    "rma": "RMA",
    "pointing_game": "pointing game",
    "dual_polarity_precision": "dual-polarity precision",
}

DEFINITIONS = [
    "MPS area: pixels of the minimal sufficient pixel set / (H x W) of the model's input.",
    "Degenerate: an empty MPS (the all-baseline input already gives the class) or a single chunk.",
    "Baseline class: the class most often predicted for the all-baseline input, and its share.",
    f"[low, high]: {CONFIDENCE:.0%} percentile bootstrap interval over the images "
    f"({BOOTSTRAP_RESAMPLES} resamples, numpy.random.default_rng({BOOTSTRAP_SEED}).integers(0, "
    f"n, size=({BOOTSTRAP_RESAMPLES}, n)) for a model's n items, the same resamples for each of "
    "its figures; a figure of a subset, such as the area of correct predictions, is taken over "
    "the subset's items in each resample, and resamples without any are dropped).",
    "Kruskal-Wallis: H test (tie-corrected) that the MPS-area distributions of all models are "
    "equal, every explained item of every model.",
    "Friedman: chi-square test on the matched images (explained by every model) of each family "
    "of three or more models.",
    "Pairwise: Wilcoxon signed-rank test (zero differences dropped) of each pair of models on "
    "the matched images, p-values multiplied by the number of pairs (Bonferroni).",
    f"Hodges-Lehmann (HL): the median of the Walsh averages (d_i + d_j) / 2, i <= j, of the "
    f"paired differences d, with the {CONFIDENCE:.0%} interval that inverts the signed-rank test "
    "(Hollander and Wolfe; exact null distribution up to 300 images, normal beyond). Where "
    "most differences are 0 and the rest one chunk, the median difference is 0 but HL is not.",
    "Effect of being incorrect: OLS of MPS area on an incorrect-prediction indicator with one "
    "fixed effect per model (the mean within-model difference, incorrect minus correct); "
    "classical and image-clustered (CR1) standard errors.",
    "Dice: 2|A n B| / (|A| + |B|) of two models' MPSs (two empty MPSs: 1), averaged over the "
    "matched images both models classify correctly.",
    "Hausdorff: the largest distance, in pixels, from a pixel of one MPS to the nearest pixel "
    "of the other, both ways; images where either MPS is empty are left out.",
    "Seeds: every image is explained under the engine's seed s and under s + 1000 (further "
    "seeds s + 2000, ...); the first seed's MPS is the one of every other table. Neighbouring "
    "seeds would not do: with rex-xai's random stream seeds s and s + 1 share 19 of 20 runs.",
    "Noise floor (within-model): the Dice (Hausdorff) of one model's MPSs of the same image "
    "under two seeds, averaged over seed pairs, over the matched images it classifies "
    "correctly. Between-model across seeds: model a's MPS under one seed against model b's "
    "under another, averaged over such pairs (the same seed for both would share the box "
    "partitions and make the models look more alike than they are).",
    "Different places: on the images both classify correctly, the between-model Dice across "
    "seeds is below BOTH models' within-model Dice, each by a one-sided Wilcoxon signed-rank "
    "test over the images; the pair's p-value is the larger of the two (intersection-union), "
    "multiplied by the number of pairs (Bonferroni). Hausdorff the same way, above both.",
    "Relevance (RMA): the responsibility map minus its minimum (pixels no run credited have none).",
    "Mask share: the object mask's share of the image; the chance level of MPS precision, "
    "RRA, RMA and the pointing game (what an MPS or ranking unrelated to the object scores).",
    "MPS precision in mask: |MPS n mask| / |MPS| (empty MPSs left out). Mask coverage: "
    "|MPS n mask| / |mask|.",
    "RRA (relevance rank accuracy, Arras et al. 2022): of the K most responsible pixels, K the "
    "mask's size, the share inside the mask (ties as the engine ranks pixels).",
    "RMA (relevance mass accuracy): relevance inside the mask / total relevance.",
    "Pointing game: 1 when the most responsible pixel lies inside the mask, else 0.",
    "Signed relevance: the runs' evidence minus its median over the image, the evidence being "
    "log r for the multiplicative combination (the sum over runs of log(1 + r_run), up to a "
    "constant) and r for the additive one. Positive: credited more than the typical pixel; "
    "negative: less. Not relative to the floor: every pixel is at or above it, so nothing "
    "would be negative; not on r itself: the top pixels are thousands of times the median "
    "and the negative side would weigh nothing.",
    "Dual-polarity precision: (positive signed relevance inside the mask + |negative signed "
    "relevance| outside) / total |signed relevance|. 1: everything above the median pixel on "
    "the object and everything below it off it; about 0.5: a map unrelated to the mask; 0: "
    "the reverse. (Counting the pixels of positive relevance above the floor instead gives "
    "the mask share whatever the model does: every pixel of a multiplicative map is above it.)",
]


def write_report(
    directory: Path,
    outcomes: list[ModelOutcome],
    summary: dict[str, Any],
    data_sets: Sequence[LabelledData] | None = None,
) -> None:
    """The report in ``directory``; with each model's ``data_sets`` (as it read the data) and
    two or more models, gallery.html too."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_records(directory / "records.csv", outcomes)
    _write_masks(directory / "mps_masks.npz", outcomes)
    _plot_violin(directory / "mps_area_violin.png", outcomes)
    markdown = _markdown(summary, outcomes)
    if data_sets is not None and len(outcomes) > 1:
        shown = write_disagreement_gallery(directory / "gallery.html", outcomes, data_sets)
        markdown += (
            "\n## Where the models disagree most\n\n"
            f"[gallery.html](gallery.html): the {shown} images the models disagree on most (the "
            "most different predicted classes, then the least MPS overlap), with each model's "
            "MPS over the input.\n"
        )
    (directory / "report.md").write_text(markdown)


def disagreement(
    records: Sequence[AuditRecord], shapes: Sequence[tuple[int, int]]
) -> tuple[int, float]:
    """How much the models disagree on one image: the number of distinct predicted classes
    beyond one, then 1 - the mean Dice of their MPSs over the pairs of models with the same
    input size (0 where no pair has)."""
    classes = len({r.predicted_class for r in records}) - 1
    overlaps = [
        dice(a.mps_mask(*shape), b.mps_mask(*shape))
        for (a, shape), (b, other) in itertools.combinations(zip(records, shapes, strict=True), 2)
        if shape == other
    ]
    return classes, (1.0 - float(np.mean(overlaps))) if overlaps else 0.0


def write_disagreement_gallery(
    path: Path,
    outcomes: list[ModelOutcome],
    data_sets: Sequence[LabelledData],
    count: int = GALLERY_ITEMS,
) -> int:
    """gallery.html: the ``count`` images every model explained that they disagree on most
    (``disagreement``); how many it shows."""
    shapes = [o.model.shape for o in outcomes]
    by_key = [{r.key: r for r in o.records} for o in outcomes]
    matched = [r.key for r in outcomes[0].records if all(r.key in found for found in by_key)]
    ranked = sorted(
        matched,
        key=lambda key: disagreement([found[key] for found in by_key], shapes),
        reverse=True,
    )[:count]
    wanted = set(ranked)
    inputs = [
        {
            item.key: item.tensor
            for item in data.items(skip=set(data.keys) - wanted)
            if item.tensor is not None
        }
        for data in data_sets
    ]
    cards = []
    for key in ranked:
        if not all(key in found for found in inputs):
            continue
        records = [found[key] for found in by_key]
        classes, apart = disagreement(records, shapes)
        names = data_sets[0].class_names
        panels = [panel("input", rgb(_display(data_sets[0], inputs[0][key])))]
        figures = [("label", _class(names, records[0].label))]
        for outcome, data, found, record in zip(outcomes, data_sets, inputs, records, strict=True):
            name = outcome.model.name
            pixels = _display(data, found[key])
            caption = f"{name}: {_class(names, record.predicted_class)}"
            panels.append(overlay_panel(caption, pixels, record.mps_mask(*outcome.model.shape)))
            figures.append(
                (name, f"class {_class(names, record.predicted_class)}, confidence "
                       f"{record.confidence:.3f}, MPS {100 * record.mps_area_fraction:.1f}%"
                       + ("" if record.correct else " (wrong)"))
            )  # fmt: skip
        figures.append(("mean MPS Dice", "n/a" if apart == 0.0 and classes else f"{1 - apart:.3f}"))
        cards.append(
            Card(
                title=f"{key}: label {_class(names, records[0].label)}",
                panels=panels,
                figures=figures,
                badge="predictions differ" if classes else "MPSs differ",
            )
        )
    write_gallery(
        path,
        "Audit: where the models disagree most",
        "The images every model explained, ordered by how many different classes the models "
        "predict, then by how little their MPSs overlap (mean Dice of the first seed's MPSs "
        "over pairs of models with the same input size). Panels: the input, then each model's "
        "MPS (green) over the input as that model saw it.",
        [Section("Images", cards, "No image was explained by every model.")],
    )
    return len(cards)


def _display(data: LabelledData, tensor: np.ndarray) -> np.ndarray:
    return input_pixels(tensor, data.spec, data.preprocessing)


def _class(names: list[str], index: int) -> str:
    name = names[index] if 0 <= index < len(names) else ""
    return str(index) if not name or name == str(index) else f"{index} ({name})"


def _write_records(path: Path, outcomes: list[ModelOutcome]) -> None:
    """One row per model and item; ``mps_area_fraction_seedS``: the area under further seed S."""
    other_seeds = outcomes[0].model.seeds[1:] if outcomes else []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "key", "label", "predicted_class", "correct", "confidence",
                         "mps_area_fraction", "degenerate", "baseline_class", *LOCALISATION_METRICS,
                         *(f"mps_area_fraction_seed{seed}" for seed in other_seeds)])  # fmt: skip
        for outcome in outcomes:
            shape = outcome.model.shape
            for r in outcome.records:
                located = [("" if (v := getattr(r, n)) is None else f"{v:.17g}") for n in LOCALISATION_METRICS]  # fmt: skip
                others = [f"{m.mean():.17g}" for m in r.seed_masks(*shape)[1:]]
                writer.writerow([outcome.model.name, r.key, r.label, r.predicted_class,
                                 int(r.correct), f"{r.confidence:.17g}", f"{r.mps_area_fraction:.17g}",
                                 int(r.degenerate), r.baseline_class, *located, *others])  # fmt: skip


def _write_masks(path: Path, outcomes: list[ModelOutcome]) -> None:
    """Per model: ``NAME`` bool [items, H, W] (the first seed's MPSs), ``NAME__seedS`` (under
    each further seed S) and ``NAME__keys``, in records.csv's order."""
    arrays: dict[str, np.ndarray] = {}
    for outcome in outcomes:
        shape = outcome.model.shape
        per_seed = zip(*(r.seed_masks(*shape) for r in outcome.records), strict=True)
        for k, (seed, masks) in enumerate(zip(outcome.model.seeds, per_seed, strict=False)):
            name = outcome.model.name if k == 0 else f"{outcome.model.name}__seed{seed}"
            arrays[name] = np.array(masks, dtype=bool).reshape(-1, *shape)
        if not outcome.records:
            arrays[outcome.model.name] = np.zeros((0, *shape), dtype=bool)
        arrays[f"{outcome.model.name}__keys"] = np.array(
            [r.key for r in outcome.records], dtype=str
        )
    np.savez_compressed(path, **arrays)


def _plot_violin(path: Path, outcomes: list[ModelOutcome]) -> None:
    """MPS area per model (the paper's Figure 3)."""
    present = [o for o in outcomes if o.records]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(present) + 1), 4))
    if present:
        areas = [[r.mps_area_fraction for r in o.records] for o in present]
        ax.violinplot(areas, showmedians=True)
        ax.set_xticks(range(1, len(present) + 1), [o.model.name for o in present])
    ax.set_ylabel("MPS area (fraction of the image)")
    ax.set_title("MPS area per model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)  # figures are not freed otherwise


def _matrix(title: str, names: list[str], values: list[list[float | None]],
            counts: list[list[int]], digits: int,
            diagonal: list[tuple[float | None, int]] | None = None) -> list[str]:  # fmt: skip
    """A models x models table; ``diagonal`` (the seed-to-seed noise floor) replaces the
    trivial self-comparison, marked with an asterisk."""
    lines = [f"| {title} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, (name, row, n) in enumerate(zip(names, values, counts, strict=True)):
        cells = [f"{number(v, digits)} (n={c})" for v, c in zip(row, n, strict=True)]
        if diagonal is not None:
            value, c = diagonal[i]
            cells[i] = f"{number(value, digits)}* (n={c})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _baseline(engine: dict[str, Any]) -> str:
    b = engine.get("baseline") or {}
    if b.get("kind") == "constant":
        return f"constant {b.get('value')}"
    if b.get("kind") == "channel":
        return f"per-channel {b.get('channels')}"
    return f"{b.get('kind')} (sigma {b.get('sigma')})"


def _markdown(s: dict[str, Any], outcomes: list[ModelOutcome]) -> str:
    names = [m["name"] for m in s["models"]]
    engine = s["engine"]
    seeds = s.get("seeds") or [engine.get("seed")]
    lines = [
        "# Model audit",
        "",
        f"{len(names)} model(s), {s['n_items']} labelled items ({s['n_matched']} explained by every "
        f"model), significance level {s['level']}; engine: iters {engine.get('iters')}, seed "
        f"{engine.get('seed')}, chunk {engine.get('chunk_size')}, baseline {_baseline(engine)}; "
        f"MPSs under seeds {', '.join(map(str, seeds))}."
        + (f" Object masks: `{s['masks']}`." if s["masks"] else " No object masks."),
        "",
        "## Ranking",
        "",
        s["ranking"],
        "",
        *[f"- Note: {note}" for note in s["notes"]],
        "",
        f"## Per model (the paper's Table 1; [{CONFIDENCE:.0%} bootstrap interval])",
        "",
        "| model | family | input | items | accuracy | area mean (median) all | correct | incorrect "
        "| degenerate | baseline class (share) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def area(m: dict[str, Any], suffix: str) -> str:
        return f"{with_ci(m, 'mps_area_mean' + suffix)} ({with_ci(m, 'mps_area_median' + suffix)})"

    for m in s["models"]:
        lines.append(
            f"| {m['name']} | {m['family']} | {m['input_size'][0]}x{m['input_size'][1]} | "
            f"{m['n_items']} ({m['n_incorrect']} wrong) | {with_ci(m, 'accuracy')} | "
            f"{area(m, '')} | {area(m, '_correct')} | {area(m, '_incorrect')} | "
            f"{with_ci(m, 'degenerate_fraction')} | {m['baseline_class']} "
            f"({with_ci(m, 'baseline_class_fraction')}) |"
        )
    lines += ["", "![MPS area per model](mps_area_violin.png)", ""]
    if s["masks"]:
        lines += [
            f"## Localisation against the object masks (means, [{CONFIDENCE:.0%} bootstrap interval])",
            "",
            "| model | " + " | ".join(LOCALISATION_LABELS.values()) + " |",
            "|---" * (len(LOCALISATION_LABELS) + 1) + "|",
            *[
                f"| {m['name']} | "
                + " | ".join(f"{with_ci(m, k)} (n={m[f'{k}_n']})" for k in LOCALISATION_LABELS)
                + " |"
                for m in s["models"]
            ],
            "",
            "Chance levels: the mask share for MPS precision, RRA, RMA and the pointing game; "
            "about 0.5 for dual-polarity precision.",
            "",
        ]
    if s.get("noise_floor"):
        lines += _noise_floor_table(s, seeds)
    if len(names) > 1:
        lines += _across_models(s, names)
    lines += ["## Definitions", "", *[f"- {d}" for d in DEFINITIONS], ""]
    skipped = [(o.model.name, key, reason) for o in outcomes for key, reason in o.skipped]
    if skipped:
        lines += ["## Skipped items", "", *[f"- {n}: `{k}`: {r}" for n, k, r in skipped], ""]
    return "\n".join(lines)


def _noise_floor_table(s: dict[str, Any], seeds: list[int]) -> list[str]:
    lines = [
        f"## Noise floor: each model's MPSs under seeds {' and '.join(map(str, seeds))}",
        "",
        "On the matched images the model classifies correctly; the diagonal (*) of Tables 2 "
        "and 3 below.",
        "",
        "| model | Dice mean [CI] | Dice median | images | Hausdorff px mean [CI] | Hausdorff median | images |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for f in s["noise_floor"]:
        lines.append(
            f"| {f['name']} | {with_ci(f, 'dice_mean')} | {number(f['dice_median'])} | "
            f"{f['dice_n']} | {with_ci(f, 'hausdorff_mean', 2)} | "
            f"{number(f['hausdorff_median'], 2)} | {f['hausdorff_n']} |"
        )
    return [*lines, ""]


def _signed(value: float | None, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def _hl(hl: dict[str, Any] | None, digits: int = 4) -> str:
    """A Hodges-Lehmann estimate and its interval: "+0.0050 [+0.0000, +0.0100]"."""
    if not hl or hl.get("estimate") is None:
        return "n/a"
    low, high = _signed(hl["low"], digits), _signed(hl["high"], digits)
    return f"{_signed(hl['estimate'], digits)} [{low}, {high}]"


def _pairwise_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| pair | images | median difference (a - b) | HL (a - b) [95% CI] | p | p Bonferroni | significant |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['model_a']} - {r['model_b']} | {r['n_items']} | {_signed(r['median_difference'], 4)} | "
            f"{_hl(r.get('hodges_lehmann'))} | {p_value(r['p_value'])} | "
            f"{p_value(r['p_bonferroni'])} | {'yes' if r['significant'] else 'no'} |"
        )
    return lines


def _location_table(rows: list[dict[str, Any]], what: str, digits: int) -> list[str]:
    lines = [
        f"| pair | images | {what} between (across seeds) | within a | within b | "
        "HL between - within a [CI] | HL between - within b [CI] | p (larger, Bonferroni) | different |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['model_a']} - {r['model_b']} | {r['n_items']} | {number(r['between_mean'], digits)} | "
            f"{number(r['within_a_mean'], digits)} | {number(r['within_b_mean'], digits)} | "
            f"{_hl(r['hodges_lehmann_a'], digits)} | {_hl(r['hodges_lehmann_b'], digits)} | "
            f"{p_value(r['p_bonferroni'])} | {'yes' if r['different'] else 'no'} |"
        )
    return lines


def _across_models(s: dict[str, Any], names: list[str]) -> list[str]:
    kw = s["kruskal_wallis"]
    lines = ["## Across models", ""]
    lines.append(
        "Kruskal-Wallis on MPS area: "
        + ("not defined (every area identical)." if kw is None else
           f"H = {kw['statistic']:.2f}, df = {kw['df']}, p = {p_value(kw['p_value'])}.")
    )  # fmt: skip
    for f in s["friedman"]:
        test = f["test"]
        lines.append(
            f"Friedman on MPS area, family `{f['family']}` ({', '.join(f['models'])}): "
            + ("not defined (every item ties)." if test is None else
               f"chi2 = {test['statistic']:.2f}, df = {test['df']}, p = {p_value(test['p_value'])}, "
               f"{test['n_items']} images.")
        )  # fmt: skip
    effect = s["incorrect_effect"]
    lines.append(
        "Effect of being incorrect on MPS area (model fixed effects): "
        + ("not estimable (no incorrect or no correct predictions)." if effect is None else
           f"{effect['estimate']:+.4f} (SE {effect['std_error']:.4f}, p = {p_value(effect['p_value'])}; "
           f"clustered by image SE {effect['std_error_clustered']:.4f}, p = "
           f"{p_value(effect['p_value_clustered'])}), {effect['n_observations']} observations.")
    )  # fmt: skip
    lines += ["", "MPS area, pairwise on the same images:", "", *_pairwise_table(s["pairwise"])]
    for key, what in (
        ("pairwise_rra", "RRA"),
        ("pairwise_dual_polarity", "Dual-polarity precision"),
    ):
        if s.get(key):
            lines += ["", f"{what}, pairwise on the same images:", "", *_pairwise_table(s[key])]
    grid = s["overlap_grid"]
    floor = s.get("noise_floor")
    lines += ["", f"MPS overlap on images both models classify correctly, first seed (compared "
              f"on a {grid[0]}x{grid[1]} grid; n: images in each mean)"
              + ("; diagonal (*): the same model under two seeds, the noise floor:" if floor
                 else "; no noise floor with one seed (the diagonal compares a model with itself):"),
              ""]  # fmt: skip
    dice_floor = [(f["dice_mean"], f["dice_n"]) for f in floor] if floor else None
    haus_floor = [(f["hausdorff_mean"], f["hausdorff_n"]) for f in floor] if floor else None
    lines += _matrix("Dice (Table 2)", names, s["dice"], s["dice_items"], 3, dice_floor)
    lines += [""]
    lines += _matrix("Hausdorff, px (Table 3)", names, s["hausdorff"], s["hausdorff_items"], 2,
                     haus_floor)  # fmt: skip
    tests = s.get("location_tests")
    if tests:
        lines += ["", "Different places? Between-model overlap across seeds against both "
                  "within-model overlaps (one-sided Wilcoxon signed-rank over the images, the "
                  "larger p of the two, Bonferroni over pairs):", ""]  # fmt: skip
        lines += _location_table(tests["dice"], "Dice", 3)
        lines += [""]
        lines += _location_table(tests["hausdorff"], "Hausdorff px", 2)
    return [*lines, ""]
