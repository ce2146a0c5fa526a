"""The audit's findings as one JSON-ready document, and the ranking paragraph that states them.

Per-model figures use every item the model explained; the tests that pair models use the
*matched* items, those every model explained (they differ only where an item was skipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from guard.audit.localisation import resize_mask
from guard.audit.run import AuditModel, AuditRecord
from guard.audit.statistics import (
    friedman,
    incorrect_effect,
    kruskal_wallis,
    model_summary,
    overlap_matrices,
    pairwise_wilcoxon,
)
from guard.numbers import number, p_value


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
    doc: dict[str, Any] = {
        "n_items": n_items,
        "n_matched": len(keys),
        "level": level,
        "masks": masks,
        "engine": engine,
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
    if len(outcomes) < 2:
        doc["notes"].append(
            "One model only: the per-model tables are given; the tests and overlaps that "
            "compare models need two or more."
        )
        doc["ranking"] = ranking_paragraph(doc)
        return _jsonable(doc)

    area = np.array([[r.mps_area_fraction for r in rows] for rows in matched]).T  # [items, models]
    doc["kruskal_wallis"] = kruskal_wallis(
        [[r.mps_area_fraction for r in o.records] for o in outcomes]
    )
    doc["friedman"] = _friedman_by_family(outcomes, area, doc["notes"])
    doc["pairwise"] = pairwise_wilcoxon(area, names, level)
    rra = np.array([[r.rra for r in rows] for rows in matched], dtype=float).T
    defined = ~np.isnan(rra).any(axis=1) if rra.size else np.zeros(0, bool)
    doc["pairwise_rra"] = (
        pairwise_wilcoxon(rra[defined], names, level) if masks and defined.any() else []
    )
    doc["incorrect_effect"] = incorrect_effect(
        area=np.concatenate([[r.mps_area_fraction for r in rows] for rows in matched]),
        incorrect=np.concatenate([[not r.correct for r in rows] for rows in matched]),
        model=np.repeat(np.arange(len(outcomes)), len(keys)),
        cluster=np.tile(np.arange(len(keys)), len(outcomes)),
    )  # fmt: skip
    # MPSs of models with different input sizes are compared on the largest grid.
    grid = max((o.model.shape for o in outcomes), key=lambda s: s[0] * s[1])
    masks_by_model = [
        [resize_mask(r.mps_mask(*o.model.shape), *grid) for r in rows]
        for o, rows in zip(outcomes, matched, strict=True)
    ]
    correct = np.array([[r.correct for r in rows] for rows in matched], dtype=bool)
    overlap = overlap_matrices(masks_by_model, correct)
    doc.update({name: value for name, value in overlap.items()})
    doc["overlap_grid"] = list(grid)
    doc["ranking"] = ranking_paragraph(_jsonable(doc))
    return _jsonable(doc)


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
            f"Best localisation against the object masks: {best['name']} (RRA {number(best['rra'])}, "
            f"MPS precision in mask {number(best['mps_precision_in_mask'])}, pointing game "
            f"{number(best['pointing_game'])})"
            + (
                f"; worst: {worst['name']} (RRA {number(worst['rra'])})."
                if worst is not best
                else "."
            )
        )
        if doc.get("pairwise_rra"):
            parts.append(_pairs_sentence(doc["pairwise_rra"], "RRA", "lower"))
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


def _ordered(row: dict[str, Any]) -> tuple[str, str]:
    """(lower, higher) model of a pair, by the median difference, else the mean difference."""
    a_lower = row["median_difference"] < 0 or (
        row["median_difference"] == 0 and row["mean_difference"] < 0
    )
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
