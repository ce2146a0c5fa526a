"""The audit report: summary.json, records.csv, mps_masks.npz, report.md and the violin plot.

records.csv holds every model's record of every item and mps_masks.npz every MPS, so each
figure of the report can be recomputed independently of this code.
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

from guard.audit.localisation import LOCALISATION_METRICS  # noqa: E402
from guard.audit.summary import ModelOutcome  # noqa: E402
from guard.numbers import number, p_value  # noqa: E402

LOCALISATION_LABELS = {
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
    "Kruskal-Wallis: H test (tie-corrected) that the MPS-area distributions of all models are "
    "equal, every explained item of every model.",
    "Friedman: chi-square test on the matched images (explained by every model) of each family "
    "of three or more models.",
    "Pairwise: Wilcoxon signed-rank test (zero differences dropped) of each pair of models on "
    "the matched images, p-values multiplied by the number of pairs (Bonferroni).",
    "Effect of being incorrect: OLS of MPS area on an incorrect-prediction indicator with one "
    "fixed effect per model (the mean within-model difference, incorrect minus correct); "
    "classical and image-clustered (CR1) standard errors.",
    "Dice: 2|A n B| / (|A| + |B|) of two models' MPSs (two empty MPSs: 1), averaged over the "
    "matched images both models classify correctly.",
    "Hausdorff: the largest distance, in pixels, from a pixel of one MPS to the nearest pixel "
    "of the other, both ways; images where either MPS is empty are left out.",
    "Relevance: the responsibility map minus its minimum (pixels no run credited have none).",
    "MPS precision in mask: |MPS n mask| / |MPS| (empty MPSs left out). Mask coverage: "
    "|MPS n mask| / |mask|.",
    "RRA (relevance rank accuracy, Arras et al. 2022): of the K most responsible pixels, K the "
    "mask's size, the share inside the mask (ties as the engine ranks pixels).",
    "RMA (relevance mass accuracy): relevance inside the mask / total relevance.",
    "Pointing game: 1 when the most responsible pixel lies inside the mask, else 0.",
    "Dual-polarity precision: of the pixels with positive relevance, the share inside the mask "
    "(1: positive responsibility on the object and none outside).",
]


def write_report(directory: Path, outcomes: list[ModelOutcome], summary: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_records(directory / "records.csv", outcomes)
    _write_masks(directory / "mps_masks.npz", outcomes)
    _plot_violin(directory / "mps_area_violin.png", outcomes)
    (directory / "report.md").write_text(_markdown(summary, outcomes))


def _write_records(path: Path, outcomes: list[ModelOutcome]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "key", "label", "predicted_class", "correct", "confidence",
                         "mps_area_fraction", "degenerate", "baseline_class", *LOCALISATION_METRICS])  # fmt: skip
        for outcome in outcomes:
            for r in outcome.records:
                located = [("" if (v := getattr(r, n)) is None else f"{v:.17g}") for n in LOCALISATION_METRICS]  # fmt: skip
                writer.writerow([outcome.model.name, r.key, r.label, r.predicted_class,
                                 int(r.correct), f"{r.confidence:.17g}", f"{r.mps_area_fraction:.17g}",
                                 int(r.degenerate), r.baseline_class, *located])  # fmt: skip


def _write_masks(path: Path, outcomes: list[ModelOutcome]) -> None:
    """Per model: ``NAME`` bool [items, H, W] and ``NAME__keys``, in records.csv's order."""
    arrays: dict[str, np.ndarray] = {}
    for outcome in outcomes:
        shape = outcome.model.shape
        masks = [r.mps_mask(*shape) for r in outcome.records]
        arrays[outcome.model.name] = np.array(masks, dtype=bool).reshape(-1, *shape)
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
            counts: list[list[int]], digits: int) -> list[str]:  # fmt: skip
    lines = [f"| {title} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row, n in zip(names, values, counts, strict=True):
        cells = [f"{number(v, digits)} (n={c})" for v, c in zip(row, n, strict=True)]
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
    lines = [
        "# Model audit",
        "",
        f"{len(names)} model(s), {s['n_items']} labelled items ({s['n_matched']} explained by every "
        f"model), significance level {s['level']}; engine: iters {engine.get('iters')}, seed "
        f"{engine.get('seed')}, chunk {engine.get('chunk_size')}, baseline {_baseline(engine)}."
        + (f" Object masks: `{s['masks']}`." if s["masks"] else " No object masks."),
        "",
        "## Ranking",
        "",
        s["ranking"],
        "",
        *[f"- Note: {note}" for note in s["notes"]],
        "",
        "## Per model (the paper's Table 1)",
        "",
        "| model | family | input | items | accuracy | area mean (median) all | correct | incorrect "
        "| degenerate | baseline class (share) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in s["models"]:
        lines.append(
            f"| {m['name']} | {m['family']} | {m['input_size'][0]}x{m['input_size'][1]} | "
            f"{m['n_items']} ({m['n_incorrect']} wrong) | {number(m['accuracy'])} | "
            f"{number(m['mps_area_mean'])} ({number(m['mps_area_median'])}) | "
            f"{number(m['mps_area_mean_correct'])} ({number(m['mps_area_median_correct'])}) | "
            f"{number(m['mps_area_mean_incorrect'])} ({number(m['mps_area_median_incorrect'])}) | "
            f"{number(m['degenerate_fraction'])} | {m['baseline_class']} ({number(m['baseline_class_fraction'])}) |"
        )
    lines += ["", "![MPS area per model](mps_area_violin.png)", ""]
    if s["masks"]:
        lines += [
            "## Localisation against the object masks",
            "",
            "| model | " + " | ".join(LOCALISATION_LABELS.values()) + " |",
            "|---" * (len(LOCALISATION_LABELS) + 1) + "|",
            *[
                f"| {m['name']} | "
                + " | ".join(f"{number(m[k])} (n={m[f'{k}_n']})" for k in LOCALISATION_LABELS)
                + " |"
                for m in s["models"]
            ],
            "",
        ]
    if len(names) > 1:
        lines += _across_models(s, names)
    lines += ["## Definitions", "", *[f"- {d}" for d in DEFINITIONS], ""]
    skipped = [(o.model.name, key, reason) for o in outcomes for key, reason in o.skipped]
    if skipped:
        lines += ["## Skipped items", "", *[f"- {n}: `{k}`: {r}" for n, k, r in skipped], ""]
    return "\n".join(lines)


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
    lines += ["", "| pair | images | median difference (a - b) | p | p Bonferroni | significant |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in s["pairwise"]:
        lines.append(
            f"| {r['model_a']} - {r['model_b']} | {r['n_items']} | {r['median_difference']:+.4f} | "
            f"{p_value(r['p_value'])} | {p_value(r['p_bonferroni'])} | {'yes' if r['significant'] else 'no'} |"
        )
    if s.get("pairwise_rra"):
        lines += ["", "RRA, pairwise on the same images:", "",
                  "| pair | images | median difference (a - b) | p Bonferroni | significant |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in s["pairwise_rra"]:
            lines.append(
                f"| {r['model_a']} - {r['model_b']} | {r['n_items']} | {r['median_difference']:+.4f} "
                f"| {p_value(r['p_bonferroni'])} | {'yes' if r['significant'] else 'no'} |"
            )
    grid = s["overlap_grid"]
    lines += ["", f"MPS overlap on images both models classify correctly (compared on a "
              f"{grid[0]}x{grid[1]} grid; n: images in each mean):", ""]  # fmt: skip
    lines += _matrix("Dice (Table 2)", names, s["dice"], s["dice_items"], 3)
    lines += [""]
    lines += _matrix("Hausdorff, px (Table 3)", names, s["hausdorff"], s["hausdorff_items"], 2)
    return [*lines, ""]
