"""The audit's findings as one JSON-ready document, and the ranking paragraph that states them.

Per-model figures use every item the model explained; the tests that pair models, and each
model's seed-to-seed noise floor, use the *matched* items, those every model explained (they
differ only where an item was skipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from guard.audit.localisation import resize_mask
from guard.audit.run import AuditModel, AuditRecord
from guard.audit.statistics import (
    bootstrap_ci,
    bootstrap_indices,
    friedman,
    incorrect_effect,
    kruskal_wallis,
    location_tests,
    model_summary,
    overlap_matrices,
    pairwise_wilcoxon,
)
from guard.numbers import mean, median, number, p_value


@dataclass
class ModelOutcome:
    """One model's run: its records in data order and the items it skipped."""

    model: AuditModel
    records: list[AuditRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    resumed: int = 0


def matched_keys(outcomes: list[ModelOutcome]) -> list[str]:
    """Keys every model explained, in data order."""
    common = set.intersection(*({r.key for r in o.records} for o in outcomes))
    return [r.key for r in outcomes[0].records if r.key in common]


def _jsonable(value: Any) -> Any:
    """NaN and inf become null; numpy scalars and arrays become plain JSON values."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summarise(
    outcomes: list[ModelOutcome], *, level: float, engine: dict[str, Any], n_items: int,
    masks: str | None,
) -> dict[str, Any]:  # fmt: skip
    """Everything the report states, computed from the records."""
    names = [o.model.name for o in outcomes]
    keys = matched_keys(outcomes)
    by_key = [{r.key: r for r in o.records} for o in outcomes]
    matched = [[lookup[k] for k in keys] for lookup in by_key]
    seeds = outcomes[0].model.seeds
    doc: dict[str, Any] = {
        "n_items": n_items,
        "n_matched": len(keys),
        "level": level,
        "masks": masks,
        "engine": engine,
        "seeds": seeds,
        "models": [
            {
                "name": o.model.name,
                "path": str(o.model.path),
                "sha256": o.model.classifier.sha256,
                "family": o.model.family,
                "input_size": list(o.model.shape),
                "n_skipped": len(o.skipped),
                "n_resumed": o.resumed,
                **model_summary(o.records),
            }
            for o in outcomes
        ],  # fmt: skip
        "notes": [],
    }
    for m in doc["models"]:
        if (m["degenerate_fraction"] or 0) > 0.5:
            doc["notes"].append(
                f"{m['degenerate_fraction']:.0%} of {m['name']}'s MPSs are degenerate (empty or one "
                "chunk): its area figures say little about where it looks; another --baseline or "
                "a smaller --chunk-size may tell more."
            )
    # MPSs of models with different input sizes are compared on the largest grid.
    grid = max((o.model.shape for o in outcomes), key=lambda s: s[0] * s[1])
    seed_masks = [
        [[resize_mask(m, *grid) for m in r.seed_masks(*o.model.shape)] for r in rows]
        for o, rows in zip(outcomes, matched, strict=True)
    ]
    correct = np.array([[r.correct for r in rows] for rows in matched], dtype=bool)
    correct = correct.reshape(len(outcomes), len(keys))
    tests = location_tests(seed_masks, correct, names, level) if len(seeds) > 1 else None
    doc["overlap_grid"] = list(grid)
    doc["noise_floor"] = (
        [_noise_floor(name, *within) for name, within in zip(names, tests["within"], strict=True)]
        if tests is not None
        else None
    )
    if tests is None and len(outcomes) > 1:
        doc["notes"].append(
            "One seed (--seeds 1): no within-model noise floor, so the Dice and Hausdorff "
            "tables cannot say whether two models look at different places (MPSs of one model "
            "under two seeds may overlap little); --seeds 2 measures it."
        )
    if len(outcomes) < 2:
        doc["notes"].append(
            "One model only: the per-model tables are given; the tests and overlaps that "
            "compare models need two or more."
        )
        doc["ranking"] = ranking_paragraph(_jsonable(doc))
        return _jsonable(doc)

    area = np.array([[r.mps_area_fraction for r in rows] for rows in matched]).T  # [items, models]
    doc["kruskal_wallis"] = kruskal_wallis(
        [[r.mps_area_fraction for r in o.records] for o in outcomes]
    )
    doc["friedman"] = _friedman_by_family(outcomes, area, doc["notes"])
    doc["pairwise"] = pairwise_wilcoxon(area, names, level)
    for key, metric in (("pairwise_rra", "rra"),
                        ("pairwise_dual_polarity", "dual_polarity_precision")):  # fmt: skip
        values = np.array([[getattr(r, metric) for r in rows] for rows in matched], dtype=float).T
        defined = ~np.isnan(values).any(axis=1) if values.size else np.zeros(0, bool)
        doc[key] = (
            pairwise_wilcoxon(values[defined], names, level) if masks and defined.any() else []
        )
    doc["incorrect_effect"] = incorrect_effect(
        area=np.concatenate([[r.mps_area_fraction for r in rows] for rows in matched]),
        incorrect=np.concatenate([[not r.correct for r in rows] for rows in matched]),
        model=np.repeat(np.arange(len(outcomes)), len(keys)),
        cluster=np.tile(np.arange(len(keys)), len(outcomes)),
    )  # fmt: skip
    first_seed = [[item[0] for item in model] for model in seed_masks]
    doc.update(overlap_matrices(first_seed, correct))
    if tests is not None:
        doc["location_tests"] = {"dice": tests["dice"], "hausdorff": tests["hausdorff"]}
    doc["ranking"] = ranking_paragraph(_jsonable(doc))
    return _jsonable(doc)


def _noise_floor(name: str, dice: np.ndarray, distance: np.ndarray) -> dict[str, Any]:
    """One model's seed-to-seed Dice and Hausdorff over the matched images it gets right."""
    index = bootstrap_indices(len(dice))
    out: dict[str, Any] = {"name": name}
    for what, values in (("dice", dice), ("hausdorff", distance)):
        defined = values[~np.isnan(values)]
        out.update({
            f"{what}_mean": mean(defined), f"{what}_mean_ci": bootstrap_ci(values, index),
            f"{what}_median": median(defined), f"{what}_n": len(defined),
        })  # fmt: skip
    return out


def _friedman_by_family(
    outcomes: list[ModelOutcome], area: np.ndarray, notes: list[str]
) -> list[dict[str, Any]]:
    families: dict[str, list[int]] = {}
    for i, o in enumerate(outcomes):
        families.setdefault(o.model.family, []).append(i)
    results = []
    for family, members in families.items():
        names = [outcomes[i].model.name for i in members]
        if len(members) < 3:
            if len(members) == 2:
                notes.append(
                    f"Family {family!r} has two models: the Friedman test needs three; the "
                    "pairwise signed-rank test compares them."
                )
            continue
        results.append({"family": family, "models": names, "test": friedman(area[:, members])})
    return results


def ranking_paragraph(doc: dict[str, Any]) -> str:
    """Which model needs the most / fewest pixels, which localises best, which differences
    are significant at the chosen level: one paragraph of plain sentences."""
    models = doc["models"]
    level = doc["level"]
    by_area = sorted(
        (m for m in models if m["mps_area_mean"] is not None), key=lambda m: m["mps_area_mean"]
    )
    if not by_area:
        return "No model explained any item."
    parts = []
    accurate = max(models, key=lambda m: m["accuracy"] or 0)
    parts.append(f"Most accurate: {accurate['name']} ({number(accurate['accuracy'])}).")
    if len(by_area) == 1:
        m = by_area[0]
        parts.append(f"{m['name']} needs a mean MPS area of {number(m['mps_area_mean'])}.")
    else:
        low, high = by_area[0], by_area[-1]
        parts.append(
            f"Fewest pixels: {low['name']} (mean MPS area {number(low['mps_area_mean'])}); most: "
            f"{high['name']} ({number(high['mps_area_mean'])})."
        )
    kw = doc.get("kruskal_wallis")
    if kw is not None:
        verdict = (
            "differ significantly" if kw["p_value"] <= level else "do not differ significantly"
        )
        parts.append(
            f"The models' MPS areas {verdict} at level {level} (Kruskal-Wallis H = "
            f"{kw['statistic']:.1f}, p = {p_value(kw['p_value'])})."
        )
    pairwise = doc.get("pairwise") or []
    if pairwise:
        parts.append(_pairs_sentence(pairwise, "MPS area", "smaller"))
    located = [m for m in models if m.get("rra") is not None]
    if located:
        best = max(located, key=lambda m: m["rra"])
        worst = min(located, key=lambda m: m["rra"])
        parts.append(
            f"Best localisation against the object masks: {best['name']} (RRA "
            f"{with_ci(best, 'rra')}, MPS precision in mask "
            f"{with_ci(best, 'mps_precision_in_mask')}, pointing game "
            f"{with_ci(best, 'pointing_game')})"
            + (
                f"; worst: {worst['name']} (RRA {with_ci(worst, 'rra')})"
                if worst is not best
                else ""
            )
            + f"; the masks cover {number(best.get('mask_share'))} of the image, the chance level "
            "of RRA and MPS precision."
        )
        if doc.get("pairwise_rra"):
            parts.append(_pairs_sentence(doc["pairwise_rra"], "RRA", "lower"))
        polar = [m for m in located if m.get("dual_polarity_precision") is not None]
        if polar:
            parts.append(
                "Dual-polarity precision (about 0.5 for a map unrelated to the object): "
                + ", ".join(f"{m['name']} {with_ci(m, 'dual_polarity_precision')}" for m in polar)
                + "."
            )
        if doc.get("pairwise_dual_polarity"):
            parts.append(
                _pairs_sentence(doc["pairwise_dual_polarity"], "dual-polarity precision", "lower")
            )
    parts.extend(_location_sentences(doc))
    effect = doc.get("incorrect_effect")
    if effect is not None:
        direction = "larger" if effect["estimate"] > 0 else "smaller"
        significant = (effect["p_value_clustered"] or 1.0) <= level
        parts.append(
            f"Controlling for the model, incorrect predictions have {direction} MPSs by "
            f"{abs(effect['estimate']):.3f} of the image (SE {effect['std_error_clustered']:.3f}, "
            f"clustered by image; p = {p_value(effect['p_value_clustered'])}, "
            f"{'significant' if significant else 'not significant'} at {level})."
        )
    return " ".join(parts)


def with_ci(figures: dict[str, Any], name: str, digits: int = 3) -> str:
    """A figure and its interval (the ``NAME_ci`` entry), if any: "0.412 [0.380, 0.445]"."""
    text = number(figures.get(name), digits)
    ci = figures.get(f"{name}_ci")
    if ci is None or figures.get(name) is None:
        return text
    return f"{text} [{number(ci[0], digits)}, {number(ci[1], digits)}]"


def _location_sentences(doc: dict[str, Any]) -> list[str]:
    """Whether models' MPSs lie in different places, judged against each model's own
    seed-to-seed agreement: only then are two models said to look at different places."""
    if len(doc["models"]) < 2:
        return []
    tests = doc.get("location_tests")
    if tests is None:
        return [
            "With one seed there is no within-model noise floor: the Dice and Hausdorff "
            "tables do not say whether the models look at different places."
        ]
    level, seeds = doc["level"], doc["seeds"]
    rows = tests["dice"]

    def figures(r: dict[str, Any]) -> str:
        return (
            f"Dice between {number(r['between_mean'])} vs within {number(r['within_a_mean'])} "
            f"and {number(r['within_b_mean'])}, {r['n_items']} images; p = {p_value(r['p_bonferroni'])}"
        )

    different = [
        f"{r['model_a']} and {r['model_b']} ({figures(r)})" for r in rows if r["different"]
    ]
    alike = [
        f"{r['model_a']} and {r['model_b']} ({figures(r)})" for r in rows if not r["different"]
    ]
    text = (
        "MPS locations, against each model's own agreement between seeds "
        f"{' and '.join(map(str, seeds))} (between-model Dice across seeds below both "
        f"within-model Dice, one-sided Wilcoxon signed-rank, Bonferroni, level {level}): "
    )
    if different:
        text += "different places: " + "; ".join(different)
        if alike:
            text += "; not distinguishable from reseeding one model: " + "; ".join(alike)
    else:
        text += "no two models' MPSs differ in place by more than reseeding moves one model's: "
        text += "; ".join(alike)
    return [text + "."]


def _ordered(row: dict[str, Any]) -> tuple[str, str]:
    """(lower, higher) model of a pair, by the Hodges-Lehmann estimate of the difference (it
    moves where the median difference sits at zero), else the mean difference."""
    hl = row.get("hodges_lehmann") or {}
    estimate = hl.get("estimate") if hl.get("estimate") is not None else 0.0
    a_lower = estimate < 0 or (estimate == 0 and row["mean_difference"] < 0)
    return (row["model_a"], row["model_b"]) if a_lower else (row["model_b"], row["model_a"])


def _pairs_sentence(rows: list[dict[str, Any]], what: str, lower_word: str) -> str:
    significant = [
        "{} {} than {} (p = {})".format(
            _ordered(r)[0], lower_word, _ordered(r)[1], p_value(r["p_bonferroni"])
        )
        for r in rows
        if r["significant"]
    ]
    others = [f"{r['model_a']} vs {r['model_b']}" for r in rows if not r["significant"]]
    text = f"Pairwise {what} (Wilcoxon signed-rank, Bonferroni): "
    text += (
        ("significant: " + "; ".join(significant)) if significant else "no significant difference"
    )
    if others and significant:
        text += "; not significant: " + ", ".join(others)
    return text + "."
