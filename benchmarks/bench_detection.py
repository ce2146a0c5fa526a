"""Error detection on every labelled model/data pair the repo has: which score, and does the MPS help?

    python benchmarks/bench_detection.py --json benchmarks/results/detection.json
    python benchmarks/bench_detection.py --pairs demo demo_ood --limit 60   # quick look

Per pair: the engine (default settings) and every evidence feature on each item
(``guard.calibration.run.run_items``, cached under ``--cache-dir`` so re-runs are fast), then
``fit_calibration(score="auto")``: every candidate score fitted on the fit split, the choice by
cross-validated AURC there, and everything reported measured on the held-out split.

``*_ood`` pairs: out-of-distribution inputs (uniform noise, one constant colour, and held-out
images flipped left-right with their channels shuffled; on one-channel models the shuffle does
nothing) against the held-out in-distribution items of the base pair. There the positive label
is "is OOD", not "is an error", and the scores are the ones fitted on in-distribution data (the
base pair's fit split): nothing is fitted on OOD inputs. Their false-alarm columns are the base
pair's (same detector, same in-distribution items), so they are left blank; "flagged" is the
share of OOD inputs the deployed (marginal) detector flags.

With ``--limit N`` a pair uses a seeded random subset of N items (the same on every run); the
number of OOD inputs is about the number of held-out in-distribution items. The bar checked at
the end: on every pair, the chosen score's held-out AUROC is at least MSP's up to sampling error
(the paired bootstrap 95% interval of AUROC(auto) - AUROC(MSP) reaches 0 or lies above it), and
its held-out false-alarm rates are at most alpha up to sampling error. For the marginal and
per-class thresholds the guarantee is an average over calibration draws, so their sampling error
includes the draw of the conformal reference: under exchangeability the number of held-out
correct items flagged is a sum of beta-binomials (one per reference), and the rate passes when
that number is within the distribution's 95% range (at most its 97.5% quantile). The
calibration-conditional threshold (delta 0.1) promises the rate of this draw, so its rate
passes when the Clopper-Pearson 95% interval's low end is <= alpha.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import beta, betabinom

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guard.calibration import detection_metrics as dm  # noqa: E402
from guard.calibration.fit import FitResult, fit_calibration  # noqa: E402
from guard.calibration.records import ItemRecord, feature_table  # noqa: E402
from guard.calibration.run import run_items  # noqa: E402
from guard.datasets import LabelledData, open_labelled_data  # noqa: E402
from guard.engine import MpsEngine  # noqa: E402
from guard.numbers import number  # noqa: E402
from guard.preprocess import Preprocessing  # noqa: E402
from guard.runtime import MaskedClassifier  # noqa: E402
from guard.settings import EngineSettings, ModelOptions  # noqa: E402
from guard.verdict.detector import Detector  # noqa: E402
from guard.verdict.scores import MPS_SCORES, SCORE_KINDS  # noqa: E402

DEFAULT_CACHE = ROOT / "benchmarks" / "results" / "detection_cache"
SHIFTED_TEXTURES = "benchmarks/models/textures_shifted.npz"
OOD_KINDS = ("uniform noise", "constant colour", "flipped + channels shuffled")
FALSE_ALARM_KINDS = ("marginal", "per-class", "calibration-conditional")


@dataclass(frozen=True)
class Pair:
    """A labelled model/data pair; ``base`` set for an OOD pair (its in-distribution pair)."""

    label: str
    model: str = ""
    data: str = ""
    preprocessing: str | None = None
    base: str | None = None


PAIRS: dict[str, Pair] = {
    "demo": Pair(
        "digits (demo)", "guard/demo/digits_cnn.onnx", "guard/demo/heldout.npz",
        "guard/demo/preprocessing.json",
    ),
    "digits_rgb": Pair(
        "digits RGB", "benchmarks/models/digits_rgb_cnn.onnx",
        "benchmarks/models/digits_rgb_heldout.npz",
    ),
    "shapes_cnn": Pair(
        "shapes CNN", "benchmarks/models/shapes_cnn.onnx", "benchmarks/models/shapes_heldout.npz",
        "benchmarks/models/shapes_preprocessing.json",
    ),
    "shapes_gapcnn": Pair(
        "shapes GAP-CNN", "benchmarks/models/shapes_gapcnn.onnx",
        "benchmarks/models/shapes_heldout.npz", "benchmarks/models/shapes_preprocessing.json",
    ),
    "shapes_cnn_small": Pair(
        "shapes CNN small", "benchmarks/models/shapes_cnn_small.onnx",
        "benchmarks/models/shapes_heldout.npz", "benchmarks/models/shapes_preprocessing.json",
    ),
    "textures": Pair(
        "textures clean", "benchmarks/models/textures_cnn.onnx",
        "benchmarks/models/textures_heldout.npz",
    ),
    "textures_shifted": Pair(
        "textures corrupted", "benchmarks/models/textures_cnn.onnx", SHIFTED_TEXTURES
    ),
    "demo_ood": Pair("digits (demo) vs OOD", base="demo"),
    "digits_rgb_ood": Pair("digits RGB vs OOD", base="digits_rgb"),
    "shapes_cnn_ood": Pair("shapes CNN vs OOD", base="shapes_cnn"),
    "shapes_gapcnn_ood": Pair("shapes GAP-CNN vs OOD", base="shapes_gapcnn"),
    "shapes_cnn_small_ood": Pair("shapes CNN small vs OOD", base="shapes_cnn_small"),
    "textures_ood": Pair("textures clean vs OOD", base="textures"),
}  # fmt: skip


# --- data, engine and cached records ---------------------------------------------------------


def ensure_shifted_textures() -> None:
    """The corrupted texture crops are generated (git-ignored): make them when missing."""
    if not (ROOT / SHIFTED_TEXTURES).exists():
        from scripts import make_shifted_textures

        make_shifted_textures.main()


def subset_indices(total: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """All items, or a seeded random ``limit`` of them in data order (data files are often
    sorted by class, so the first N would not do)."""
    if limit is None or limit >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).permutation(total)[:limit])


def take(data: LabelledData, idx: np.ndarray) -> LabelledData:
    """The items ``idx`` of an in-memory (npz) data set, keys unchanged."""
    assert data._tensors is not None, "only .npz data sets are subset here"
    return dataclasses.replace(
        data,
        keys=[data.keys[i] for i in idx],
        labels=[data.labels[i] for i in idx],
        _tensors=data._tensors[idx],
    )


@dataclass
class Opened:
    classifier: MaskedClassifier
    engine: MpsEngine
    preprocessing: Preprocessing


_OPENED: dict[str, Opened] = {}


def open_model(pair: Pair) -> Opened:
    """Model, engine (default settings) and preprocessing of a pair, opened once per process."""
    key = f"{pair.model}|{pair.preprocessing}"
    if key not in _OPENED:
        classifier = MaskedClassifier(ROOT / pair.model, ModelOptions())
        preprocessing = (
            Preprocessing.model_validate_json((ROOT / pair.preprocessing).read_text())
            if pair.preprocessing
            else Preprocessing()
        )
        _OPENED[key] = Opened(classifier, MpsEngine(classifier, EngineSettings()), preprocessing)
    return _OPENED[key]


def open_data(pair: Pair, path: Path, limit: int | None) -> LabelledData:
    spec = open_model(pair).classifier.spec
    data = open_labelled_data(path, spec, open_model(pair).preprocessing)
    return take(data, subset_indices(len(data), limit))


@dataclass
class Records:
    records: list[ItemRecord]
    seconds_per_item: float | None  # MPS + evidence features, over the items ever computed
    tensors: np.ndarray  # the inputs, in record order


def cached_records(pair: Pair, data: LabelledData, cache: Path, restart: bool = False) -> Records:
    """Every item's record, computed or taken from the cache; the time per computed item is
    kept beside the cache, so a re-run from the cache still reports it."""
    opened = open_model(pair)
    timing = cache.with_name(cache.name + ".seconds.json")
    spent = json.loads(timing.read_text()) if timing.exists() else {"seconds": 0.0, "items": 0}
    cache.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if restart:
        timing.unlink(missing_ok=True)
        spent = {"seconds": 0.0, "items": 0}
    result = run_items(data, opened.classifier, opened.engine, cache, restart=restart)
    seconds = time.perf_counter() - started
    computed = len(result.records) + len(result.skipped) - result.resumed
    if computed > 0:
        spent = {"seconds": spent["seconds"] + seconds, "items": spent["items"] + computed}
        timing.write_text(json.dumps(spent))
    if result.skipped:
        print(f"  {len(result.skipped)} items skipped: {result.skipped[:3]}", file=sys.stderr)
    index = {key: i for i, key in enumerate(data.keys)}
    assert data._tensors is not None
    tensors = data._tensors[[index[r.key] for r in result.records]]
    per_item = spent["seconds"] / spent["items"] if spent["items"] else None
    return Records(result.records, per_item, tensors)


def make_ood(x: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n OOD inputs in the data's value range, a third of each kind (OOD_KINDS), and the kinds.

    Uniform noise; one constant colour per image (per-channel uniform); in-distribution images
    flipped left-right with a random non-identity channel permutation (one channel: flip only).
    """
    rng = np.random.default_rng([seed, 7])
    low, high = float(x.min()), float(x.max())
    shape = x.shape[1:]
    channels = shape[0]
    kinds = np.arange(n) % len(OOD_KINDS)
    out = np.empty((n, *shape), dtype=np.float32)
    for i, kind in enumerate(kinds):
        if kind == 0:
            out[i] = rng.uniform(low, high, size=shape)
        elif kind == 1:
            out[i] = rng.uniform(low, high, size=(channels, 1, 1)) * np.ones(shape)
        else:
            image = x[rng.integers(len(x))][:, :, ::-1]
            if channels > 1:
                order = np.arange(channels)
                while np.array_equal(order, np.arange(channels)):
                    order = rng.permutation(channels)
                image = image[order]
            out[i] = image
    if np.issubdtype(x.dtype, np.integer) or np.all(np.mod(x, 1) == 0):
        out = np.round(out)  # integer-valued data (8-bit pixels): keep it so
    return out, kinds


def ood_count(n_in_distribution: int) -> int:
    """About the size of the held-out split, a multiple of the number of OOD kinds."""
    return max(len(OOD_KINDS), n_in_distribution // 2 // len(OOD_KINDS) * len(OOD_KINDS))


def ood_records(
    pair_id: str, id_records: Records, cache_dir: Path, restart: bool = False
) -> tuple[Records, np.ndarray]:
    """The OOD inputs for an in-distribution pair, written once as an .npz, and their records."""
    base = PAIRS[pair_id]
    n = ood_count(len(id_records.records))
    path = cache_dir / f"ood_{pair_id}_n{n}.npz"
    if not path.exists():
        x, kinds = make_ood(id_records.tensors, n)
        cache_dir.mkdir(parents=True, exist_ok=True)
        # y: a placeholder label (correctness means nothing for OOD inputs)
        np.savez_compressed(path, x=x, y=np.zeros(n, dtype=np.int64), kind=kinds)
    kinds = np.load(path)["kind"]
    data = open_data(base, path, None)
    cache = cache_dir / f"{Path(base.model).stem}__ood_n{n}.jsonl"
    records = cached_records(base, data, cache, restart)
    order = {f"npz:{i}": i for i in range(n)}
    return records, kinds[[order[r.key] for r in records.records]]


def pair_records(
    pair_id: str, limit: int | None, cache_dir: Path, restart: bool = False
) -> Records:
    pair = PAIRS[pair_id]
    if pair.data == SHIFTED_TEXTURES:
        ensure_shifted_textures()
    data = open_data(pair, ROOT / pair.data, limit)
    cache = cache_dir / f"{Path(pair.model).stem}__{Path(pair.data).stem}__n{len(data)}.jsonl"
    return cached_records(pair, data, cache, restart)


# --- figures ----------------------------------------------------------------------------------


def _float(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _pair_ci(ci: Sequence[float | None]) -> list[float | None]:
    return [_float(v) for v in ci]


def clopper_pearson(k: int, n: int) -> dict[str, Any]:
    if n == 0:
        return {"rate": None, "ci": [None, None], "n": 0}
    low = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))
    return {"rate": k / n, "ci": [low, high], "n": n}


FEW_POSITIVES = 10  # below this many held-out positives a bootstrap interval means little


def adds_value(
    increment: dict[str, Any] | None, over_msp: dict[str, Any] | None, positives: int
) -> str:
    """yes: the best MPS-using score (chosen on the fit split) beats both confidence
    baselines in held-out AUROC, class-confidence (the calibration's MPS increment) and MSP,
    each by a paired-bootstrap 95% interval above 0; not measurable with too few held-out
    positives or no interval."""
    if positives < FEW_POSITIVES:
        return f"not measurable ({positives} held-out)"
    diffs = [d for d in (increment, over_msp) if d is not None]
    if len(diffs) < 2 or any(d["auroc_diff"] is None or None in d["ci"] for d in diffs):
        return "not measurable"
    return "yes" if all(d["ci"][0] > 0 for d in diffs) else "no"


def holdout_indices(fit: FitResult) -> np.ndarray:
    return np.sort(np.concatenate([fit.reference_indices, fit.evaluation_indices]))


def _score_figures(
    scores: np.ndarray, positive: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    return {
        "auroc": _float(dm.auroc(scores, positive)),
        "auroc_ci": _pair_ci(dm.bootstrap_interval(dm.auroc, scores, positive, n_boot, seed)),
        "aurc": _float(dm.aurc(scores, positive)),
        "aurc_ci": _pair_ci(dm.bootstrap_interval(dm.aurc, scores, positive, n_boot, seed)),
    }


def _difference(
    a: np.ndarray, b: np.ndarray, positive: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    diff = dm.bootstrap_auroc_difference(a, b, positive, n_boot=n_boot, seed=seed)
    return {"auroc_diff": _float(diff[0]), "ci": _pair_ci(diff[1:])}


def exchangeable_most(detector: Detector, classes: np.ndarray) -> int:
    """97.5% quantile of how many of these correct items (their predicted classes) the
    detector flags when they are exchangeable with its references' items (within a class for
    a class reference): the references' draw and the items' draw together."""
    if detector.flag_small_tail:
        raise ValueError("the exchangeable range is derived for the score tail alone")
    served = [int(c) if int(c) in detector.class_references else None for c in classes]
    pmf = np.ones(1)
    for group in set(served):
        reference = detector.class_references.get(group, detector.score_reference)
        ab = reference.false_alarm_beta()
        if ab is not None:
            m = served.count(group)
            pmf = np.convolve(pmf, betabinom(m, *ab).pmf(np.arange(m + 1)))
    return int(np.searchsorted(np.cumsum(pmf), 0.975 - 1e-12))


def false_alarm_figures(fit: FitResult, records: Sequence[ItemRecord]) -> dict[str, Any]:
    """Per threshold option: the held-out rate (Clopper-Pearson CI) and, for the marginal
    and per-class options, the most flags the exchangeable range allows."""
    evaluation = [records[i] for i in fit.evaluation_indices if records[i].correct]
    classes = np.array([r.predicted_class for r in evaluation], dtype=np.int64)
    out = {}
    for name, r in fit.metrics.false_alarm_rates.items():
        figures: dict[str, Any] = {"rate": _float(r.rate), "ci": _pair_ci(r.ci), "n": r.n}
        if name != "calibration-conditional" and r.n:
            figures["flagged"] = round(r.rate * r.n)
            figures["exchangeable_most"] = exchangeable_most(fit.options[name], classes)
        out[name] = figures
    return out


def check_bar(row: dict[str, Any], alpha: float) -> dict[str, Any]:
    """The bar for one row (see the module doc)."""
    low, high = row["auto_minus_msp"]["ci"]
    diff = row["auto_minus_msp"]["auroc_diff"]
    if diff is not None and diff == 0.0:
        auroc_ok: str = "yes"  # auto chose MSP (or an identical ranking)
    elif high is None:
        auroc_ok = "not measurable"
    else:
        auroc_ok = "yes" if high >= 0 else "no"
    if row["kind"] == "ood":
        alarms_ok = "see base pair"
    else:
        rates = [row["false_alarm"][k] for k in FALSE_ALARM_KINDS]
        if any(r["rate"] is None for r in rates):
            alarms_ok = "not measurable"
        else:
            within = [
                r["flagged"] <= r["exchangeable_most"] if "flagged" in r else r["ci"][0] <= alpha
                for r in rates
            ]
            alarms_ok = "yes" if all(within) else "no"
    verdicts = {auroc_ok, alarms_ok} - {"see base pair"}
    passed = "no" if "no" in verdicts else ("yes" if verdicts == {"yes"} else "not measurable")
    return {"auroc_ok": auroc_ok, "false_alarm_ok": alarms_ok, "pass": passed}


def detection_row(
    pair_id: str, records: Records, fit: FitResult, n_boot: int, seed: int
) -> dict[str, Any]:
    """Held-out figures of an in-distribution pair, positive = incorrect prediction."""
    m = fit.metrics
    table = feature_table(records.records)
    hold = holdout_indices(fit)
    incorrect = np.array([not r.correct for r in records.records])
    scores = {kind: fit.candidates[kind].scores(table) for kind in fit.candidates}
    selected = m.selected_score or "msp"
    inc = m.mps_increment
    increment = (
        None
        if inc is None
        else {
            "candidate": inc.candidate,
            "baseline": inc.baseline,
            "auroc_diff": _float(inc.auroc_diff),
            "ci": _pair_ci(inc.ci),
        }
    )
    over_msp = (
        None
        if inc is None
        else _difference(
            scores[inc.candidate][hold], scores["msp"][hold], incorrect[hold], n_boot, seed
        )
    )
    row: dict[str, Any] = {
        "pair": pair_id,
        "label": PAIRS[pair_id].label,
        "kind": "errors",
        "n": m.n_items,
        "positives": m.n_incorrect,
        "n_holdout": m.n_holdout,
        "holdout_positives": m.n_holdout_incorrect,
        "accuracy": m.accuracy,
        "scores": {
            kind: {
                "auroc": _float(s.auroc),
                "auroc_ci": _pair_ci(s.auroc_ci),
                "aurc": _float(s.aurc),
                "aurc_ci": _pair_ci(s.aurc_ci),
                "cv_aurc": _float(s.cv_aurc),
            }
            for kind, s in m.scores.items()
        },
        "selected_score": selected,
        "selection": m.selection,
        "mps_increment": increment,
        "mps_minus_msp": over_msp,
        "mps_adds_value": adds_value(increment, over_msp, m.n_holdout_incorrect),
        "false_alarm": false_alarm_figures(fit, records.records),
        "flagged": (
            {"rate": None, "ci": [None, None], "n": 0}
            if m.detection_rate is None
            else {
                "rate": _float(m.detection_rate.rate),
                "ci": _pair_ci(m.detection_rate.ci),
                "n": m.detection_rate.n,
            }
        ),
        "auto_minus_msp": _difference(
            scores[selected][hold], scores["msp"][hold], incorrect[hold], n_boot, seed
        ),
        "seconds_per_item": records.seconds_per_item,
        "degenerate_fraction": m.degenerate_fraction,
    }
    return row


def ood_row(
    pair_id: str,
    id_records: Records,
    fit: FitResult,
    ood: Records,
    kinds: np.ndarray,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Held-out in-distribution items against OOD inputs, positive = OOD, with the scores
    fitted on the base pair's fit split."""
    hold = holdout_indices(fit)
    id_table = feature_table([id_records.records[i] for i in hold])
    ood_table = feature_table(ood.records)
    names = sorted(set(id_table) & set(ood_table))
    table = {name: np.concatenate([id_table[name], ood_table[name]]) for name in names}
    is_ood = np.r_[np.zeros(hold.size, dtype=bool), np.ones(len(ood.records), dtype=bool)]
    scores = {kind: fit.candidates[kind].scores(table) for kind in fit.candidates}
    selected = fit.metrics.selected_score or "msp"
    inc = fit.metrics.mps_increment
    increment = over_msp = None
    if inc is not None:
        increment = {
            "candidate": inc.candidate,
            "baseline": inc.baseline,
            **_difference(scores[inc.candidate], scores[inc.baseline], is_ood, n_boot, seed),
        }
        over_msp = _difference(scores[inc.candidate], scores["msp"], is_ood, n_boot, seed)
    flagged = fit.detector.evaluate(ood_table).flagged
    by_kind = {}
    for k, name in enumerate(OOD_KINDS):
        rows = np.r_[np.ones(hold.size, dtype=bool), kinds == k]
        by_kind[name] = {
            "n": int((kinds == k).sum()),
            "auroc": {kind: _float(dm.auroc(s[rows], is_ood[rows])) for kind, s in scores.items()},
            "flagged": clopper_pearson(int(flagged[kinds == k].sum()), int((kinds == k).sum())),
        }
    return {
        "pair": pair_id,
        "label": PAIRS[pair_id].label,
        "kind": "ood",
        "n": int(is_ood.size),
        "positives": int(is_ood.sum()),
        "n_holdout": int(is_ood.size),
        "holdout_positives": int(is_ood.sum()),
        "scores": {kind: _score_figures(s, is_ood, n_boot, seed) for kind, s in scores.items()},
        "selected_score": selected,
        "selection": "fitted and chosen on the base pair's in-distribution fit split",
        "mps_increment": increment,
        "mps_minus_msp": over_msp,
        "mps_adds_value": adds_value(increment, over_msp, int(is_ood.sum())),
        "false_alarm": {},
        "flagged": clopper_pearson(int(flagged.sum()), int(flagged.size)),
        "auto_minus_msp": _difference(scores[selected], scores["msp"], is_ood, n_boot, seed),
        "seconds_per_item": ood.seconds_per_item,
        "by_kind": by_kind,
    }


# --- tables -----------------------------------------------------------------------------------


def _ci(values: Sequence[float | None], digits: int = 3) -> str:
    return f"[{number(values[0], digits)}, {number(values[1], digits)}]"


def _with_ci(value: float | None, ci: Sequence[float | None], digits: int = 3) -> str:
    return f"{number(value, digits)} {_ci(ci, digits)}"


def _rate(r: dict[str, Any] | None) -> str:
    if not r or r["rate"] is None:
        return "-"
    text = _with_ci(r["rate"], r["ci"], 3)
    if "exchangeable_most" in r:
        text += f"; {r['flagged']} of {r['n']} (exchangeable: at most {r['exchangeable_most']})"
    return text


def print_tables(rows: list[dict[str, Any]], alpha: float) -> None:
    print(
        "\n| pair | n | errors (OOD: OOD inputs) | chosen score | AUROC chosen [CI] | "
        "AUROC MSP | MPS increment: AUROC best MPS score - class-confidence [CI] | "
        "same score - MSP [CI] | MPS adds value (beats both) | "
        f"false alarms, marginal (alpha {alpha:g}) | per-class | calibration-conditional "
        "(delta 0.1) | flagged: held-out errors (OOD: OOD inputs) | s/item (MPS + features) |"
    )
    print("|---" * 14 + "|")
    for r in rows:
        sel = r["scores"][r["selected_score"]]
        inc = r["mps_increment"]
        inc_text = (
            "-"
            if inc is None
            else f"{inc['candidate']}: {number(inc['auroc_diff'], 3)} {_ci(inc['ci'])}"
        )
        over = r["mps_minus_msp"]
        over_text = "-" if over is None else _with_ci(over["auroc_diff"], over["ci"])
        fa = [_rate(r["false_alarm"].get(k)) for k in FALSE_ALARM_KINDS]
        print(
            f"| {r['label']} | {r['n']} | {r['positives']} | {r['selected_score']} | "
            f"{_with_ci(sel['auroc'], sel['auroc_ci'])} | {number(r['scores']['msp']['auroc'])} | "
            f"{inc_text} | {over_text} | {r['mps_adds_value']} | {fa[0]} | {fa[1]} | {fa[2]} | "
            f"{_rate(r['flagged'])} | {number(r['seconds_per_item'], 3)} |"
        )
    for metric, better in (("auroc", "higher"), ("aurc", "lower")):
        header = f"held-out {metric.upper()} [95% CI] ({better} is better): "
        print(f"\n| pair | {header}" + " | ".join(SCORE_KINDS) + " |")
        print("|---" * (len(SCORE_KINDS) + 1) + "|")
        for r in rows:
            cells = []
            for kind in SCORE_KINDS:
                s = r["scores"].get(kind)
                text = "-" if s is None else _with_ci(s[metric], s[f"{metric}_ci"])
                cells.append(f"**{text}**" if kind == r["selected_score"] else text)
            print(f"| {r['label']} | " + " | ".join(cells) + " |")
    ood = [r for r in rows if r["kind"] == "ood"]
    if ood:
        shown = ("msp", "class-confidence", "mps", "evidence")
        print(
            "\n| pair | OOD kind | n | AUROC "
            + " | AUROC ".join(shown)
            + " | flagged by the chosen score |"
        )
        print("|---" * (len(shown) + 4) + "|")
        for r in ood:
            for name, k in r["by_kind"].items():
                cells = " | ".join(number(k["auroc"].get(kind)) for kind in shown)
                print(f"| {r['label']} | {name} | {k['n']} | {cells} | {_rate(k['flagged'])} |")


def print_bar(rows: list[dict[str, Any]], alpha: float) -> bool:
    print(
        "\n| pair | AUROC auto - MSP [paired bootstrap 95% CI] | >= MSP up to sampling error | "
        f"false alarms <= alpha {alpha:g} up to sampling error | pass |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        d = r["auto_minus_msp"]
        b = r["bar"]
        print(
            f"| {r['label']} | {r['selected_score']}: {_with_ci(d['auroc_diff'], d['ci'])} | "
            f"{b['auroc_ok']} | {b['false_alarm_ok']} | {b['pass']} |"
        )
    failed = [r["label"] for r in rows if r["bar"]["pass"] == "no"]
    unmeasured = [r["label"] for r in rows if r["bar"]["pass"] == "not measurable"]
    print(
        "\nBar: "
        + ("met on every measurable pair" if not failed else "NOT met on " + ", ".join(failed))
        + (f"; not measurable on {', '.join(unmeasured)}" if unmeasured else "")
        + "."
    )
    return not failed


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=400, help="items per pair (seeded subset)")
    parser.add_argument(
        "--pair-limit",
        nargs="*",
        default=["textures_shifted=204"],
        metavar="PAIR=N",
        help="a pair's own limit instead of --limit (an OOD pair follows its base pair)",
    )
    parser.add_argument(
        "--pairs", nargs="*", default=list(PAIRS), help="subset of: " + ", ".join(PAIRS)
    )
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="fit splits and bootstrap")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--restart", action="store_true", help="recompute the records, ignoring the caches"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    unknown = [p for p in args.pairs if p not in PAIRS]
    if unknown:
        parser.error(f"unknown pairs {unknown}; choose from {', '.join(PAIRS)}")
    args.limits = {}
    for text in args.pair_limit:
        name, _, value = text.partition("=")
        if name not in PAIRS or PAIRS[name].base is not None or not value.isdigit():
            parser.error(f"--pair-limit {text}: expected PAIR=N for an in-distribution pair")
        args.limits[name] = int(value)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    fits: dict[str, tuple[Records, FitResult]] = {}

    def fitted(pair_id: str) -> tuple[Records, FitResult]:
        if pair_id not in fits:
            print(f"## {PAIRS[pair_id].label}", file=sys.stderr)
            limit = args.limits.get(pair_id, args.limit)
            records = pair_records(pair_id, limit, args.cache_dir, args.restart)
            fit = fit_calibration(
                records.records, alpha=args.alpha, score="auto", seed=args.seed,
                n_boot=args.n_boot,
            )  # fmt: skip
            fits[pair_id] = (records, fit)
        return fits[pair_id]

    rows = []
    for pair_id in args.pairs:
        pair = PAIRS[pair_id]
        if pair.base is None:
            records, fit = fitted(pair_id)
            row = detection_row(pair_id, records, fit, args.n_boot, args.seed)
        else:
            records, fit = fitted(pair.base)
            print(f"## {pair.label}", file=sys.stderr)
            ood, kinds = ood_records(pair.base, records, args.cache_dir, args.restart)
            row = ood_row(pair_id, records, fit, ood, kinds, args.n_boot, args.seed)
        row["bar"] = check_bar(row, args.alpha)
        rows.append(row)
    print_tables(rows, args.alpha)
    met = print_bar(rows, args.alpha)
    seconds = time.perf_counter() - started
    limits = "".join(f", {name} {n}" for name, n in args.limits.items())
    print(f"\n{len(rows)} pairs in {seconds:.0f} s (limit {args.limit} items per pair{limits}).")
    result = {
        "settings": {
            "limit": args.limit,
            "pair_limits": args.limits,
            "alpha": args.alpha,
            "delta": 0.1,
            "n_boot": args.n_boot,
            "seed": args.seed,
            "engine": EngineSettings().model_dump(mode="json"),
            "score": "auto",
            "mps_scores": sorted(MPS_SCORES),
        },
        "rows": rows,
        "bar_met": met,
        "seconds": seconds,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
