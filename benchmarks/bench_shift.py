"""How many served predictions each monitor needs to notice a shift in the traffic.

    python benchmarks/bench_shift.py --json benchmarks/results/shift.json
    python benchmarks/bench_shift.py --pair demo --limit 60 --reps 5   # quick look

A calibrated pair (default: textures_cnn on clean texture crops). The clean items are split in
two, stratified on (correct, predicted class): a calibration half, on which the check is fitted
(``fit_calibration(score="auto")``, as ``guard calibrate`` does) and whose MPS areas and MSPs
are the drift references (the sidecar's area reference is the calibration records' areas), and
a traffic half that nothing was fitted on. Served traffic is simulated by taking the clean
traffic half in a random order (without replacement: a stream that repeated items would no
longer be exchangeable with the calibration data, and the martingale would rightly notice; so
the horizon is at most the size of that half), each item replaced with probability p by one
drawn from a shifted
pool instead: corrupted crops (``scripts/make_shifted_textures.py``: noise, defocus, low
contrast) at p = 10%, 30% and 100%, and OOD inputs (``bench_detection.make_ood``) at 30%.
Items arrive in batches; after each batch every monitor is read:

- area drift: the two-sample KS distance (``guard.service.drift.ks_distance``) between the MPS
  areas of the last ``--window`` served items and the calibration areas;
- confidence drift: the same KS distance for the MSP;
- the exchangeability martingale (``guard.verdict.martingale``) over the calibrated score,
  started from the detector's exchangeability reference, alarming at 1/delta = 20.

Each KS threshold is set so that on unshifted traffic (clean traffic half only) it alarms at
most once in 20 repetitions over the same horizon: the 95th percentile of the largest KS
distance seen over the horizon in ``--calibration-reps`` unshifted streams, KS read from
``--min-items`` served items on. The martingale needs no tuning (Ville's inequality bounds its
false alarms by delta). False alarms are then counted on ``--null-reps`` fresh unshifted
streams, and the predictions until the first alarm on ``--reps`` shifted streams per scenario
(median; ">H" when most streams never alarm within the horizon H).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_detection as bd  # noqa: E402
from guard.calibration.fit import fit_calibration, stratified_split  # noqa: E402
from guard.calibration.records import ItemRecord, feature_table  # noqa: E402
from guard.numbers import number  # noqa: E402
from guard.service.drift import ks_distance  # noqa: E402
from guard.verdict.detector import Detector  # noqa: E402
from guard.verdict.martingale import ExchangeabilityMartingale  # noqa: E402

MONITORS = ("MPS-area drift (KS)", "confidence drift (KS)", "exchangeability martingale")
SCENARIOS = (("corrupted", 0.1), ("corrupted", 0.3), ("corrupted", 1.0), ("OOD", 0.3))
SIDECAR_DRIFT_WINDOW = 500  # guard.service.settings.ServeSettings.drift_window's default


@dataclass
class Pool:
    """What the monitors read of each item of a pool."""

    area: np.ndarray
    msp: np.ndarray
    score: np.ndarray  # the calibrated score (higher: more suspicious)

    @classmethod
    def of(cls, records: Sequence[ItemRecord], detector: Detector) -> Pool:
        table = feature_table(list(records))
        return cls(
            area=table["mps_area_fraction"],
            msp=table["msp"],
            score=np.asarray(detector.score.scores(table), dtype=np.float64),
        )

    def take(self, idx: np.ndarray) -> Pool:
        return Pool(self.area[idx], self.msp[idx], self.score[idx])


def corrupted_records(
    pair_id: str, clean: bd.Records, limit: int | None, cache_dir: Path, restart: bool = False
) -> bd.Records:
    """Corrupted inputs of the pair: the repo's corrupted texture crops for textures, else the
    same corruptions applied to the clean items (one corruption per item, in turn)."""
    if pair_id == "textures":
        return bd.pair_records("textures_shifted", limit, cache_dir, restart)
    from scripts.make_shifted_textures import CORRUPTIONS

    pair = bd.PAIRS[pair_id]
    n = len(clean.records)
    path = cache_dir / f"corrupted_{pair_id}_n{n}.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        x = clean.tensors.astype(np.float64)
        top = max(float(x.max()), 1.0)  # the corruptions work on a 0..1 scale
        corrupt = list(CORRUPTIONS.values())
        out = np.stack(
            [np.clip(corrupt[i % len(corrupt)](x[i] / top, rng), 0.0, 1.0) * top for i in range(n)]
        )
        cache_dir.mkdir(parents=True, exist_ok=True)
        labels = np.array([r.label for r in clean.records], dtype=np.int64)
        np.savez_compressed(path, x=out.astype(np.float32), y=labels)
    data = bd.open_data(pair, path, None)
    cache = cache_dir / f"{Path(pair.model).stem}__corrupted_n{n}.jsonl"
    return bd.cached_records(pair, data, cache, restart)


# --- streams and monitors ---------------------------------------------------------------------


def stream(
    clean: Pool, shifted: Pool | None, p: float, horizon: int, rng: np.random.Generator
) -> Pool:
    """``horizon`` items in random order: the clean pool without replacement, each item replaced
    with probability p by one drawn (with replacement) from the shifted pool."""
    if horizon > clean.area.size:
        raise ValueError(f"a horizon of {horizon} needs at least that many clean traffic items")
    picks = clean.take(rng.permutation(clean.area.size)[:horizon])
    if shifted is None or p <= 0:
        return picks
    from_shift = rng.random(horizon) < p
    other = shifted.take(rng.integers(0, shifted.area.size, horizon))
    return Pool(
        *(
            np.where(from_shift, getattr(other, f), getattr(picks, f))
            for f in ("area", "msp", "score")
        )
    )


@dataclass(frozen=True)
class StreamSettings:
    horizon: int
    batch: int
    window: int
    min_items: int
    martingale_level: float  # alarm when the martingale reaches this (1/delta)


def ks_path(
    values: np.ndarray, reference: np.ndarray, s: StreamSettings
) -> list[tuple[int, float]]:
    """(served items, KS distance of the window from the reference) after each batch read."""
    out = []
    for t in range(s.batch, s.horizon + 1, s.batch):
        if t >= s.min_items:
            out.append((t, ks_distance(values[max(0, t - s.window) : t], reference)))
    return out


def first_ks_alarm(
    values: np.ndarray, reference: np.ndarray, threshold: float, s: StreamSettings
) -> float:
    for t, d in ks_path(values, reference, s):
        if d > threshold:
            return float(t)
    return math.inf


def first_martingale_alarm(
    scores: np.ndarray, reference: Sequence[float], seed: int, s: StreamSettings
) -> float:
    martingale = ExchangeabilityMartingale(reference, seed=seed)
    for t in range(s.batch, s.horizon + 1, s.batch):
        if martingale.update(scores[t - s.batch : t]) >= s.martingale_level:
            return float(t)
    return math.inf


def ks_threshold(
    clean: Pool, reference: np.ndarray, field: str, reps: int, seed: int, s: StreamSettings
) -> float:
    """The 95th percentile of the largest KS distance over the horizon on unshifted streams:
    alarming above it, at most 5% of those streams alarm."""
    largest = []
    for r in range(reps):
        values = getattr(
            stream(clean, None, 0.0, s.horizon, np.random.default_rng([seed, 1, r])), field
        )
        largest.append(max(d for _, d in ks_path(values, reference, s)))
    return float(np.quantile(largest, 0.95, method="higher"))


@dataclass
class Monitors:
    area_reference: np.ndarray
    msp_reference: np.ndarray
    exchangeability_reference: list[float]
    area_threshold: float
    msp_threshold: float

    def first_alarms(self, items: Pool, seed: int, s: StreamSettings) -> dict[str, float]:
        return {
            MONITORS[0]: first_ks_alarm(items.area, self.area_reference, self.area_threshold, s),
            MONITORS[1]: first_ks_alarm(items.msp, self.msp_reference, self.msp_threshold, s),
            MONITORS[2]: first_martingale_alarm(
                items.score, self.exchangeability_reference, seed, s
            ),
        }


def summarise(times: list[float], horizon: int) -> dict[str, Any]:
    t = np.asarray(times, dtype=np.float64)
    detected = np.isfinite(t)
    median = float(np.median(t))
    # inverted_cdf: order statistics, no interpolation between a finite time and infinity
    q25, q75 = (float(v) for v in np.percentile(t, [25, 75], method="inverted_cdf"))
    return {
        "reps": int(t.size),
        "detected": int(detected.sum()),
        "detected_fraction": float(detected.mean()) if t.size else None,
        "median": median if math.isfinite(median) else None,  # None: most never alarmed
        "q25": q25 if math.isfinite(q25) else None,
        "q75": q75 if math.isfinite(q75) else None,
        "times": [None if not math.isfinite(v) else int(v) for v in t],
        "horizon": horizon,
    }


def run_scenarios(
    monitors: Monitors,
    clean: Pool,
    pools: dict[str, Pool],
    *,
    reps: int,
    null_reps: int,
    seed: int,
    s: StreamSettings,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """False alarms on unshifted streams, then predictions to the first alarm per scenario."""
    null_times: dict[str, list[float]] = {m: [] for m in MONITORS}
    for r in range(null_reps):
        items = stream(clean, None, 0.0, s.horizon, np.random.default_rng([seed, 2, r]))
        for m, t in monitors.first_alarms(items, seed * 100_003 + r, s).items():
            null_times[m].append(t)
    false_alarms = {
        m: bd.clopper_pearson(int(np.isfinite(times).sum()), len(times))
        for m, times in null_times.items()
    }
    scenarios = []
    for k, (pool_name, p) in enumerate(SCENARIOS):
        if on_progress:
            on_progress(f"{pool_name} at {p:.0%}")
        times: dict[str, list[float]] = {m: [] for m in MONITORS}
        for r in range(reps):
            rng = np.random.default_rng([seed, 3, k, r])
            items = stream(clean, pools[pool_name], p, s.horizon, rng)
            for m, t in monitors.first_alarms(
                items, seed * 100_003 + 7919 * (k + 1) + r, s
            ).items():
                times[m].append(t)
        summary = {m: summarise(t, s.horizon) for m, t in times.items()}
        scenarios.append(
            {
                "shift": pool_name,
                "fraction": p,
                "monitors": summary,
                "first": first_to_detect(summary),
            }
        )
    return {"false_alarms": false_alarms, "scenarios": scenarios}


def first_to_detect(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The monitors with the lowest median predictions to the first alarm (ties: all)."""
    medians = {
        m: (s["median"] if s["median"] is not None else math.inf) for m, s in summary.items()
    }
    best = min(medians.values())
    if not math.isfinite(best):
        return []
    return [m for m, v in medians.items() if v == best]


# --- tables -----------------------------------------------------------------------------------


def _median(s: dict[str, Any]) -> str:
    if s["median"] is None:
        return f">{s['horizon']} ({s['detected']}/{s['reps']} detected)"
    spread = f"[{number(s['q25'], 0)}, {number(s['q75'], 0) if s['q75'] is not None else '>' + str(s['horizon'])}]"
    return f"{s['median']:.0f} {spread} ({s['detected']}/{s['reps']} detected)"


def print_tables(result: dict[str, Any]) -> None:
    st = result["settings"]
    print("\n| traffic (share shifted) | " + " | ".join(MONITORS) + " | first to detect |")
    print("|---" * (len(MONITORS) + 2) + "|")
    fa = result["false_alarms"]
    cells = [
        f"false alarms {number(fa[m]['rate'], 3)} [{number(fa[m]['ci'][0], 3)}, {number(fa[m]['ci'][1], 3)}] ({fa[m]['n']} streams)"
        for m in MONITORS
    ]
    print("| unshifted (clean traffic half) | " + " | ".join(cells) + " | - |")
    for sc in result["scenarios"]:
        cells = [_median(sc["monitors"][m]) for m in MONITORS]
        first = ", ".join(sc["first"]) if sc["first"] else "none within the horizon"
        print(f"| {sc['shift']} {sc['fraction']:.0%} | " + " | ".join(cells) + f" | {first} |")
    print(
        f"\nPredictions served until the first alarm: median [quartiles] over {st['reps']} random "
        f"streams of {st['horizon']} predictions, read every {st['batch']} (KS from "
        f"{st['min_items']} items on, window {st['window']}); KS thresholds (at most 5% of "
        f"{st['calibration_reps']} unshifted streams alarm): area {result['thresholds']['area']:.3f}, "
        f"MSP {result['thresholds']['msp']:.3f}; martingale alarms at {st['martingale_level']:g}."
    )
    print(f"Calibrated score: {result['calibration']['selected_score']}.")
    for sc in result["scenarios"]:
        first = " and ".join(sc["first"]) if sc["first"] else "no monitor"
        print(f"{sc['shift']} at {sc['fraction']:.0%}: {first} detects first.")


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    choices = [p for p, pair in bd.PAIRS.items() if pair.base is None and p != "textures_shifted"]
    parser.add_argument("--pair", choices=choices, default="textures")
    parser.add_argument(
        "--limit",
        type=int,
        default=204,
        help="items per data set (seeded subset; 204, bench_detection's limit for the corrupted "
        "textures, shares its cached records)",
    )
    parser.add_argument("--horizon", type=int, default=500, help="predictions per stream")
    parser.add_argument("--batch", type=int, default=10, help="predictions between readings")
    parser.add_argument(
        "--window", type=int, default=SIDECAR_DRIFT_WINDOW, help="KS window (recent items)"
    )
    parser.add_argument("--min-items", type=int, default=50, help="KS is read from this many on")
    parser.add_argument("--reps", type=int, default=20, help="shifted streams per scenario")
    parser.add_argument(
        "--null-reps", type=int, default=100, help="unshifted streams (false alarms)"
    )
    parser.add_argument(
        "--calibration-reps", type=int, default=200, help="unshifted streams for the KS thresholds"
    )
    parser.add_argument("--delta", type=float, default=0.05, help="martingale alarms at 1/delta")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=bd.DEFAULT_CACHE)
    parser.add_argument(
        "--restart", action="store_true", help="recompute the records, ignoring the caches"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"## {text}", file=sys.stderr)

    say(f"{bd.PAIRS[args.pair].label}: records")
    clean_all = bd.pair_records(args.pair, args.limit, args.cache_dir, args.restart)
    corrupted = corrupted_records(args.pair, clean_all, args.limit, args.cache_dir, args.restart)
    ood, _ = bd.ood_records(args.pair, clean_all, args.cache_dir, args.restart)

    calibration_idx, traffic_idx = stratified_split(clean_all.records, 0.5, args.seed)
    calibration = [clean_all.records[i] for i in calibration_idx]
    say(f"fit on {len(calibration)} calibration items")
    fit = fit_calibration(
        calibration, alpha=args.alpha, score="auto", seed=args.seed, n_boot=args.n_boot
    )
    detector = fit.detector
    clean = Pool.of([clean_all.records[i] for i in traffic_idx], detector)
    pools = {
        "corrupted": Pool.of(corrupted.records, detector),
        "OOD": Pool.of(ood.records, detector),
    }
    reference = Pool.of(calibration, detector)
    horizon = min(args.horizon, clean.area.size)
    if horizon < args.min_items:
        raise SystemExit(
            f"the clean traffic half has {clean.area.size} items, fewer than --min-items "
            f"{args.min_items}: use a larger --limit"
        )
    if horizon < args.horizon:
        say(f"horizon {horizon}: the clean traffic half has {clean.area.size} items")
    s = StreamSettings(horizon, args.batch, args.window, args.min_items, 1.0 / args.delta)
    say("KS thresholds on unshifted streams")
    monitors = Monitors(
        area_reference=reference.area,
        msp_reference=reference.msp,
        exchangeability_reference=list(detector.exchangeability_reference or []),
        area_threshold=ks_threshold(
            clean, reference.area, "area", args.calibration_reps, args.seed, s
        ),
        msp_threshold=ks_threshold(
            clean, reference.msp, "msp", args.calibration_reps, args.seed, s
        ),
    )
    say("streams")
    outcome = run_scenarios(
        monitors,
        clean,
        pools,
        reps=args.reps,
        null_reps=args.null_reps,
        seed=args.seed,
        s=s,
        on_progress=say,
    )
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "settings": {
            "pair": args.pair,
            "limit": args.limit,
            "horizon": s.horizon,
            "batch": args.batch,
            "window": args.window,
            "min_items": args.min_items,
            "reps": args.reps,
            "null_reps": args.null_reps,
            "calibration_reps": args.calibration_reps,
            "martingale_level": 1.0 / args.delta,
            "alpha": args.alpha,
            "seed": args.seed,
        },
        "calibration": {
            "n_calibration": len(calibration),
            "n_traffic_pool": int(traffic_idx.size),
            "n_corrupted_pool": len(corrupted.records),
            "n_ood_pool": len(ood.records),
            "calibration_errors": int(sum(not r.correct for r in calibration)),
            "traffic_accuracy": float(np.mean([clean_all.records[i].correct for i in traffic_idx])),
            "corrupted_accuracy": float(np.mean([r.correct for r in corrupted.records])),
            "selected_score": fit.metrics.selected_score,
            "exchangeability_reference": len(detector.exchangeability_reference or []),
        },
        "thresholds": {"area": monitors.area_threshold, "msp": monitors.msp_threshold},
        **outcome,
        "seconds": seconds,
    }
    print_tables(result)
    print(f"\nDone in {seconds:.0f} s.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
