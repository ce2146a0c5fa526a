"""Engine speed against the model-only floor and against the reference tool, side by side.

    python benchmarks/bench_engine.py                       # all models, rex-xai included
    python benchmarks/bench_engine.py --no-rex --limit 20   # quick look
    python benchmarks/bench_engine.py --provider cuda --no-rex
    python benchmarks/bench_engine.py --models "digits RGB (3x32x32)" "textures (3x64x64)" \
        --limit 48 --repeats 1 --iters-curve             # fidelity to rex-xai only

Per model and held-out image (``--limit`` images spread evenly over the held-out set, whose
items may be sorted by class): the engine's MPS (wall seconds, model evaluations and calls);
the *floor*, i.e. the plain model (no masking graph, same provider) evaluating the same number
of inputs at the same batch sizes; the engine with ``random_stream="rex"`` (its cost against
the default stream); and, for 3-channel models, rex-xai 0.4.1 with the same settings in its
own virtual environment: seconds per MPS, median MPS areas, Spearman agreement of per-image
areas (engine with rex-xai, rex-xai with itself at seeds 0 and 1000: neighbouring seeds share
19 of 20 runs in rex-xai), and with rex-xai's stream the share of images whose MPS area, and
whose mask, is exactly rex-xai's. Finally the cost/agreement curve for fewer iterations.
Everything runs interleaved in one process so the ratios are robust to a noisy machine; engine
and floor are each timed ``--repeats`` times per image and the fastest counts (rex-xai, timed
once, is compared with the engine's first timing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import rex_reference  # noqa: E402
from guard.engine import MpsEngine  # noqa: E402
from guard.runtime import MaskedClassifier  # noqa: E402
from guard.settings import FAST_PRESET, EngineSettings, ModelOptions  # noqa: E402

MODELS = {
    "digits (1x32x32, demo)": ("guard/demo/digits_cnn.onnx", "guard/demo/heldout.npz"),
    "digits RGB (3x32x32)": (
        "benchmarks/models/digits_rgb_cnn.onnx",
        "benchmarks/models/digits_rgb_heldout.npz",
    ),
    "textures (3x64x64)": (
        "benchmarks/models/textures_cnn.onnx",
        "benchmarks/models/textures_heldout.npz",
    ),
    # A real pretrained ImageNet classifier on real photos (scripts/export_imagenet.py): the
    # bundled scikit-image photos and matplotlib's sample photo, with the model's preprocessing.
    "imagenet lite0 (3x224x224)": (
        "guard/imagenet/efficientnet_lite0.onnx",
        "guard/imagenet/images",
    ),
}


class RecordingEvaluator:
    """Passes calls through to the classifier and records each call's batch size."""

    def __init__(self, classifier: MaskedClassifier) -> None:
        self.classifier = classifier
        self.spec = classifier.spec
        self.batch_sizes: list[int] = []

    def check_images(self, images: np.ndarray) -> np.ndarray:
        return self.classifier.check_images(images)

    def evaluate(self, images, baselines, masks, image_index):  # noqa: ANN001, ANN201
        self.batch_sizes.append(len(masks))
        return self.classifier.evaluate(images, baselines, masks, image_index)

    def model_calls(self, mutants: int) -> int:
        return self.classifier.model_calls(mutants)


class Floor:
    """The plain model file on the same provider, fed ready-made batches."""

    def __init__(self, path: Path, providers: list[str], spin: bool, image: np.ndarray) -> None:
        options = ort.SessionOptions()
        # Threads as the engine's session has them, so only the engine's own work differs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.image = image
        self._batches: dict[int, np.ndarray] = {}

    def seconds(self, batch_sizes: list[int]) -> float:
        total = 0.0
        for size in batch_sizes:
            batch = self._batches.setdefault(size, np.repeat(self.image[None], size, axis=0))
            started = time.perf_counter()
            self.session.run(None, {self.input: batch})
            total += time.perf_counter() - started
        return total


@dataclass
class EngineRun:
    areas: np.ndarray
    seconds: np.ndarray
    floor_seconds: np.ndarray
    single_seconds: np.ndarray  # the first timing alone, as a tool timed once would see it
    evaluations: np.ndarray
    calls: np.ndarray
    masks: np.ndarray  # bool [N, H, W]


def run_engine(
    classifier: MaskedClassifier,
    x: np.ndarray,
    settings: EngineSettings,
    floor: Floor | None,
    repeats: int = 1,
    block: int = 10,
) -> EngineRun:
    """Engine on every image; the floor replays each image's batch sizes.

    Engine and floor alternate in blocks of images: close in time (a noisy machine affects
    both alike), yet each runs several images in a row, as it would in service, instead of
    the two sessions evicting each other's caches at every image. With ``repeats`` > 1 the
    block is run that many times, alternating, and each image keeps its fastest engine and
    fastest floor time: the cost of the work itself, less the machine's interruptions.
    """
    recorder = RecordingEvaluator(classifier)
    engine = MpsEngine(recorder, settings)
    rows = []
    for start in range(0, len(x), block):
        images = x[start : start + block]
        results, sizes = [], []
        seconds = np.full((repeats, len(images)), np.inf)
        floor_seconds = np.full((repeats, len(images)), np.nan if floor is None else np.inf)
        for repeat in range(repeats):
            for i, image in enumerate(images):
                recorder.batch_sizes = []
                started = time.perf_counter()
                result = engine.explain(image)
                seconds[repeat, i] = time.perf_counter() - started
                if repeat == 0:
                    results.append(result)
                    sizes.append(recorder.batch_sizes)
            if floor is not None:
                floor_seconds[repeat] = [floor.seconds(batch_sizes) for batch_sizes in sizes]
        for i, result in enumerate(results):
            rows.append(
                (
                    result.mps_area_fraction,
                    seconds[:, i].min(),
                    floor_seconds[:, i].min(),
                    seconds[0, i],
                    result.model_evaluations,
                    result.model_calls,
                    result.mps_mask,
                )
            )
    columns = [np.array(c) for c in zip(*rows, strict=True)]
    return EngineRun(*columns)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def p90(values: np.ndarray) -> float:
    return float(np.percentile(values, 90))


def spread(count: int, limit: int | None) -> np.ndarray:
    """``limit`` indices spread evenly over ``count`` items (all of them without a limit)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


def photos(folder: Path, classifier: MaskedClassifier, zooms: Sequence[int]) -> np.ndarray:
    """The photos of ``folder`` and matplotlib's sample photo, preprocessed as the model's
    ``preprocessing.json`` beside it says, once per shorter side in ``zooms`` (the centre crop
    of a larger resize is a closer view): more inputs than photos for the agreement figures."""
    import matplotlib

    from guard.preprocess import Preprocessing, load_input

    preprocessing = Preprocessing.from_file(classifier.path.parent / "preprocessing.json")
    paths = sorted(folder.iterdir()) + [
        Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    ]
    return np.stack([
        load_input(path, classifier.spec, preprocessing.model_copy(update={"resize_shorter": zoom}))
        for zoom in zooms
        for path in paths
    ])  # fmt: skip


def bench_model(name: str, model: Path, data: Path, args: argparse.Namespace) -> dict:
    classifier = MaskedClassifier(model, ModelOptions(provider=args.provider))
    if data.is_dir():
        x = photos(data, classifier, args.zooms)
    else:
        with np.load(data, allow_pickle=False) as held_out:
            x = held_out["x"][spread(len(held_out["x"]), args.limit)].astype(np.float32)
    providers = [classifier.provider] + (
        ["CPUExecutionProvider"] if classifier.provider != "CPUExecutionProvider" else []
    )
    floor = Floor(model, providers, classifier.options.spin_threads, x[0])
    settings = EngineSettings(seed=0)
    pixels = classifier.spec.height * classifier.spec.width
    print(f"\n## {name}: {len(x)} images, provider {classifier.provider}", file=sys.stderr)
    MpsEngine(classifier, settings).explain(x[0])  # warm-up (session allocations)
    main = run_engine(classifier, x, settings, floor, args.repeats)
    row = {
        "model": name,
        "images": len(x),
        "provider": classifier.provider,
        "evaluations_median": float(np.median(main.evaluations)),
        "calls_median": float(np.median(main.calls)),
        "engine_s_median": float(np.median(main.seconds)),
        "engine_s_p90": p90(main.seconds),
        "floor_s_median": float(np.median(main.floor_seconds)),
        "floor_s_p90": p90(main.floor_seconds),
        "engine_over_floor": float(np.median(main.seconds / main.floor_seconds)),
        "area_median": float(np.median(main.areas)),
    }
    other_seed = run_engine(classifier, x, settings.model_copy(update={"seed": 1}), None)
    row["engine_vs_engine_seed1_spearman"] = spearman(main.areas, other_seed.areas)
    # rex-xai's random streams, in lockstep like the default one: what they cost
    rex_stream = run_engine(
        classifier, x, settings.model_copy(update={"random_stream": "rex"}), None, args.repeats
    )
    row.update(
        {
            "rex_stream_s_median": float(np.median(rex_stream.seconds)),
            "rex_stream_over_counter": float(np.median(rex_stream.seconds / main.seconds)),
            "rex_stream_area_median": float(np.median(rex_stream.areas)),
            "one_chunk_fraction": float(np.mean(main.areas * pixels <= settings.chunk_size)),
        }
    )

    # The fast preset beside the default: its cost, its floor, and how its areas agree with
    # the default's against rex-xai's agreement with itself (seeds 0 and 1000, with rex-xai's
    # streams in the engine, which give rex-xai's MPSs).
    fast = run_engine(classifier, x, settings.model_copy(update=FAST_PRESET), floor, args.repeats)
    rex_other = run_engine(
        classifier, x, settings.model_copy(update={"random_stream": "rex", "seed": 1000}), None
    )
    fast_other = run_engine(
        classifier, x, settings.model_copy(update={**FAST_PRESET, "seed": 1000}), None
    )
    row.update(
        {
            "fast_evaluations_mean": float(np.mean(fast.evaluations)),
            "default_evaluations_mean": float(np.mean(main.evaluations)),
            "fast_over_default_evaluations": float(
                np.mean(fast.evaluations) / np.mean(main.evaluations)
            ),
            "fast_over_default_evaluations_max": float(np.max(fast.evaluations / main.evaluations)),
            "fast_calls_median": float(np.median(fast.calls)),
            "fast_s_median": float(np.median(fast.seconds)),
            "fast_s_p90": p90(fast.seconds),
            "fast_floor_s_median": float(np.median(fast.floor_seconds)),
            "fast_over_floor": float(np.median(fast.seconds / fast.floor_seconds)),
            "default_over_fast_s": float(np.median(main.seconds) / np.median(fast.seconds)),
            "fast_area_median": float(np.median(fast.areas)),
            "fast_over_default_area_median": float(
                np.median(fast.areas) / np.median(main.areas) if np.median(main.areas) else np.nan
            ),
            "fast_vs_default_spearman": spearman(main.areas, fast.areas),
            "fast_seed1000_vs_default_spearman": spearman(main.areas, fast_other.areas),
            "rex_stream_vs_seed1000_spearman": spearman(rex_stream.areas, rex_other.areas),
            "fast_sufficient": bool(sufficient(classifier, x, fast.masks)),
        }
    )

    curve = []
    for iters in args.iters_curve:
        run = (
            main
            if iters == 20
            else run_engine(
                classifier, x, settings.model_copy(update={"iters": iters}), None, args.repeats
            )
        )
        curve.append(
            {
                "iters": iters,
                "engine_s_median": float(np.median(run.seconds)),
                "evaluations_median": float(np.median(run.evaluations)),
                "spearman_vs_20": spearman(main.areas, run.areas),
                "area_median": float(np.median(run.areas)),
            }
        )
    row["iters_curve"] = curve

    if args.rex and classifier.spec.channels == 3 and classifier.spec.layout == "NCHW":
        with tempfile.TemporaryDirectory() as tmp:
            rex = [
                rex_reference.run_reference(model, x, seed=seed, workdir=Path(tmp) / f"seed{seed}")
                for seed in (0, 1000)  # rex seeds run i with seed + i: nearby seeds share runs
            ]
        rex_areas = [np.array([r["mps_area_fraction"] for r in runs]) for runs in rex]
        rex_seconds = np.array([r["seconds"] for r in rex[0]])
        rex_masks = np.stack([r["mps_mask"] for r in rex[0]])
        same_mask = (rex_stream.masks == rex_masks).all(axis=(1, 2))
        strict = run_engine(classifier, x, settings.model_copy(update={"empty_mps": True}), None)
        row.update(
            {
                "rex_s_median": float(np.median(rex_seconds)),
                "rex_s_p90": p90(rex_seconds),
                # rex-xai is timed once per image, so the engine's single timings face it.
                "rex_over_engine": float(np.median(rex_seconds) / np.median(main.single_seconds)),
                "rex_evaluations_median": float(
                    np.median([r.get("model_evaluations", np.nan) for r in rex[0]])
                ),
                "rex_area_median": float(np.median(rex_areas[0])),
                "engine_vs_rex_spearman": spearman(main.areas, rex_areas[0]),
                "rex_vs_rex_seed1_spearman": spearman(rex_areas[0], rex_areas[1]),
                "rex_one_chunk_fraction": float(
                    np.mean(rex_areas[0] * pixels <= settings.chunk_size)
                ),
                # the engine before rex-xai's extraction became the default
                "empty_mps_area_median": float(np.median(strict.areas)),
                "empty_mps_vs_rex_spearman": spearman(strict.areas, rex_areas[0]),
                "rex_stream_same_area": float(np.mean(rex_stream.areas == rex_areas[0])),
                "rex_stream_same_mask": float(np.mean(same_mask)),
            }
        )
    return row


def sufficient(classifier: MaskedClassifier, x: np.ndarray, masks: np.ndarray) -> bool:
    """Every MPS keeps the class on its own (zero baseline), by the plain model file."""
    session = ort.InferenceSession(str(classifier.path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    whole = np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
    axis = classifier.spec.channel_axis + 1
    kept = np.expand_dims(masks, axis).astype(x.dtype)
    masked = [session.run(None, {name: (x[i : i + 1] * kept[i : i + 1])})[0] for i in range(len(x))]
    return bool((np.concatenate(masked).argmax(1) == whole.argmax(1)).all())


def print_tables(rows: list[dict]) -> None:
    print(
        "\n| model | images | evals/MPS | calls/MPS | engine s/MPS (median, p90) | floor s/MPS (median, p90) | engine / floor |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['images']} | {r['evaluations_median']:.0f} | {r['calls_median']:.0f} | "
            f"{r['engine_s_median']:.4f}, {r['engine_s_p90']:.4f} | {r['floor_s_median']:.4f}, {r['floor_s_p90']:.4f} | "
            f"{r['engine_over_floor']:.2f}x |"
        )
    print("\n| model | engine s/MPS, counter stream | rex stream | rex / counter |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['engine_s_median']:.4f} | {r['rex_stream_s_median']:.4f} | "
            f"{r['rex_stream_over_counter']:.2f}x |"
        )
    rex_rows = [r for r in rows if "rex_s_median" in r]
    if rex_rows:
        print(
            "\n| model | images | MPS area median engine / rex-xai (ratio) | Spearman engine-rex | "
            "Spearman rex-rex (seed 0 vs 1000) | one-chunk MPSs engine / rex | empty_mps: area "
            "median, Spearman with rex | rex stream: same area | same mask |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rex_rows:
            ratio = r["area_median"] / r["rex_area_median"] if r["rex_area_median"] else np.nan
            print(
                f"| {r['model']} | {r['images']} | {r['area_median']:.4f} / "
                f"{r['rex_area_median']:.4f} ({ratio:.2f}) | {r['engine_vs_rex_spearman']:.3f} | "
                f"{r['rex_vs_rex_seed1_spearman']:.3f} | {r['one_chunk_fraction']:.2f} / "
                f"{r['rex_one_chunk_fraction']:.2f} | {r['empty_mps_area_median']:.4f}, "
                f"{r['empty_mps_vs_rex_spearman']:.3f} | {r['rex_stream_same_area']:.1%} | "
                f"{r['rex_stream_same_mask']:.1%} |"
            )
        print(
            "\n| model | rex-xai s/MPS (median, p90) | rex-xai / engine | rex evals/MPS | MPS area median engine / rex | Spearman engine-rex | Spearman rex-rex (seed 0 vs 1000) | Spearman engine-engine (seed 0 vs 1) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rex_rows:
            print(
                f"| {r['model']} | {r['rex_s_median']:.3f}, {r['rex_s_p90']:.3f} | {r['rex_over_engine']:.1f}x | "
                f"{r['rex_evaluations_median']:.0f} | {r['area_median']:.4f} / {r['rex_area_median']:.4f} | "
                f"{r['engine_vs_rex_spearman']:.3f} | {r['rex_vs_rex_seed1_spearman']:.3f} | {r['engine_vs_engine_seed1_spearman']:.3f} |"
            )
    print(
        "\n| model | images | evals/MPS default, fast (mean) | fast / default evals (mean, max) | "
        "calls/MPS default, fast | s/MPS default, fast (median) | floor s/MPS default, fast | "
        "default / fast s | Spearman fast-default (fast seed 1000) | Spearman rex-rex (seed 0 vs "
        "1000) | MPS area median default, fast (ratio) | fast MPSs sufficient |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['images']} | {r['default_evaluations_mean']:.0f}, "
            f"{r['fast_evaluations_mean']:.0f} | {r['fast_over_default_evaluations']:.3f}, "
            f"{r['fast_over_default_evaluations_max']:.3f} | {r['calls_median']:.0f}, "
            f"{r['fast_calls_median']:.0f} | {r['engine_s_median']:.4f}, {r['fast_s_median']:.4f} | "
            f"{r['floor_s_median']:.4f}, {r['fast_floor_s_median']:.4f} | "
            f"{r['default_over_fast_s']:.1f}x | {r['fast_vs_default_spearman']:.3f} "
            f"({r['fast_seed1000_vs_default_spearman']:.3f}) | "
            f"{r['rex_stream_vs_seed1000_spearman']:.3f} | {r['area_median']:.4f}, "
            f"{r['fast_area_median']:.4f} ({r['fast_over_default_area_median']:.2f}) | "
            f"{'yes' if r['fast_sufficient'] else 'NO'} |"
        )
    print("\n| model | iters | engine s/MPS | evals/MPS | Spearman vs 20 iters | MPS area median |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for c in r["iters_curve"]:
            print(
                f"| {r['model']} | {c['iters']} | {c['engine_s_median']:.4f} | {c['evaluations_median']:.0f} | "
                f"{c['spearman_vs_20']:.3f} | {c['area_median']:.4f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=100,
        help="held-out images per model, spread evenly over the held-out set",
    )
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--no-rex", dest="rex", action="store_false", help="skip the reference tool"
    )
    parser.add_argument(
        "--models", nargs="*", default=list(MODELS), help="subset of: " + ", ".join(MODELS)
    )
    parser.add_argument("--iters-curve", type=int, nargs="*", default=[20, 10, 5])
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="times each block of images is timed (engine and floor alternating); the fastest "
        "of each image counts",
    )
    parser.add_argument(
        "--zooms",
        type=int,
        nargs="+",
        default=[256, 304, 368, 448],
        help="photo folders: each photo resized to each of these shorter sides, then centre-cut",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.rex:
        rex_reference.ensure_rex_venv()
    rows = []
    for name in args.models:
        model, data = MODELS[name]
        rows.append(bench_model(name, ROOT / model, ROOT / data, args))
    print_tables(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
