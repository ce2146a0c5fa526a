"""``guard calibrate``: MPS-size distributions of correct and incorrect predictions, fitted
on labelled data, with a conformal alarm threshold and an honest report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from guard.cli.common import (
    EXIT_INTERRUPTED,
    Runtime,
    build_runtime,
    err_console,
    fatal,
    out_console,
    progress_bar,
)
from guard.cli.options import DATA_HELP, BatchItemsOpt, RuntimeOptions, with_runtime_options
from guard.cli.scaleout import (
    RayCpusOpt,
    RayGpusOpt,
    RayOpt,
    RayWorkersOpt,
    ray_executor,
    report_ray,
)
from guard.errors import GuardError
from guard.numbers import count, number

if TYPE_CHECKING:  # scikit-learn and matplotlib load when the command runs, not for --help
    from guard.cached_run import CachedRun
    from guard.calibration.fit import FitResult
    from guard.calibration.records import ItemRecord
    from guard.datasets import LabelledData
    from guard.scaleout import RayExecutor
    from guard.verdict.artifact import CalibrationArtifact

    RunResult = CachedRun[ItemRecord]

Option = typer.Option
DataArg = Annotated[Path, typer.Argument(metavar="DATA", help=DATA_HELP)]
OutOpt = Annotated[Path, Option(help="calibration artifact (JSON) to write")]
ReportOpt = Annotated[
    Path | None,
    Option(help="write summary.json, records.csv, report.md, plots and gallery.html here"),
]
AlphaOpt = Annotated[float, Option(help="false-alarm rate allowed on correct predictions")]
ScoreOpt = Annotated[
    str,
    Option(
        help="auto (chosen on the fit split; the default), mps (the paper's check), msp, "
        "confidence, class-confidence, combined or evidence"
    ),
]
PerClassOpt = Annotated[
    bool, Option(help="thresholds per predicted class (the guarantee holds for each class)")
]
DeltaOpt = Annotated[
    float | None,
    Option(
        help="calibration-conditional guarantee: with probability 1-DELTA over the calibration "
        "data, the false-alarm rate is <= alpha (e.g. 0.1)"
    ),
]
StabilityOpt = Annotated[
    bool, Option(help="also record a second seed's MPS and its agreement (twice the MPS cost)")
]
SmallTailOpt = Annotated[bool, Option(help="also flag unusually small (myopic) MPSs")]
HoldoutOpt = Annotated[float, Option(help="share of items held out from fitting")]
SplitSeedOpt = Annotated[int, Option(help="seed of the stratified fit/held-out split")]
RestartOpt = Annotated[bool, Option(help="ignore the cache of an earlier run and start over")]


@dataclass(frozen=True)
class FitOptions:
    alpha: float
    score: str
    holdout_fraction: float
    seed: int
    flag_small_tail: bool
    per_class: bool
    delta: float | None


@with_runtime_options()
def calibrate(
    data: DataArg,
    out: OutOpt = Path("calibration.json"),
    report: ReportOpt = None,
    alpha: AlphaOpt = 0.05,
    score: ScoreOpt = "auto",
    flag_small_tail: SmallTailOpt = False,
    per_class: PerClassOpt = False,
    delta: DeltaOpt = None,
    stability: StabilityOpt = False,
    holdout_fraction: HoldoutOpt = 0.5,
    split_seed: SplitSeedOpt = 0,
    batch_items: BatchItemsOpt = 8,
    restart: RestartOpt = False,
    ray: RayOpt = None,
    ray_workers: RayWorkersOpt = None,
    ray_cpus: RayCpusOpt = 1.0,
    ray_gpus: RayGpusOpt = 0.0,
    *,
    options: RuntimeOptions,
) -> None:
    """Fit the guard's check on labelled data: run the engine on every item, fit, report.

    Per-item results are cached in OUT.cache.jsonl as they are computed; re-running the same
    command after an interruption resumes where it stopped. With --ray the items' MPSs are
    computed on a Ray cluster's workers (the same records), the fit and report here.
    """
    fitting = FitOptions(
        alpha, score, holdout_fraction, split_seed, flag_small_tail, per_class, delta
    )
    _validate(fitting, batch_items)
    cluster = ray_executor(ray, ray_workers, ray_cpus, ray_gpus)
    runtime, data_set = _load(data, options)
    with cluster as executor:
        result = _run(
            data_set, runtime, out, batch_items=batch_items, restart=restart,
            stability=stability, executor=executor,
        )  # fmt: skip
    report_ray(executor)
    _report_skipped(result.skipped)
    fit = _fit(result, fitting)
    artifact = _artifact(fit, runtime, data_set, result)
    _write(artifact, out, report, fit, result, data_set, runtime)
    _print_summary(artifact, out, report, resumed=result.resumed)


def _validate(fitting: FitOptions, batch_items: int) -> None:
    from guard.calibration.fit import SCORE_CHOICES

    if fitting.score not in SCORE_CHOICES:
        raise fatal(f"--score must be one of {', '.join(SCORE_CHOICES)}, not {fitting.score!r}")
    if not 0 < fitting.alpha < 1:
        raise fatal(f"--alpha must lie strictly between 0 and 1, not {fitting.alpha}")
    if fitting.delta is not None and not 0 < fitting.delta < 1:
        raise fatal(f"--delta must lie strictly between 0 and 1, not {fitting.delta}")
    if not 0 < fitting.holdout_fraction < 1:
        raise fatal(
            f"--holdout-fraction must lie strictly between 0 and 1, not {fitting.holdout_fraction}"
        )
    if batch_items < 1:
        raise fatal(f"--batch-items must be at least 1, not {batch_items}")


def _load(data: Path, options: RuntimeOptions) -> tuple[Runtime, LabelledData]:
    from guard.datasets import open_labelled_data

    runtime = build_runtime(options)
    spec = runtime.classifier.spec
    return runtime, open_labelled_data(data, spec, runtime.preprocessing, runtime.class_names)


def _run(
    data_set: LabelledData,
    runtime: Runtime,
    out: Path,
    *,
    batch_items: int,
    restart: bool,
    stability: bool,
    executor: RayExecutor | None = None,
) -> RunResult:
    """The engine on every item, cached next to OUT; an interruption keeps what is done."""
    from guard.calibration.run import run_items

    cache = out.with_name(out.name + ".cache.jsonl")
    try:
        with progress_bar("calibrating") as progress:
            task = progress.add_task("calibrate", total=len(data_set), rate="")

            def advance(done: int) -> None:
                progress.update(task, advance=done)
                elapsed = progress.tasks[task].elapsed or 0.0
                completed = progress.tasks[task].completed
                rate = f"{number(completed / elapsed, 1)} items/s" if elapsed else ""
                progress.update(task, rate=rate)

            result = run_items(
                data_set, runtime.classifier, runtime.engine, cache, stability=stability,
                batch_items=batch_items, restart=restart, on_progress=advance,
                executor=executor,
            )  # fmt: skip
    except KeyboardInterrupt:
        err_console.print(
            f"interrupted: results so far are kept in {cache}; run the same command again to resume"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    for note in result.notes:
        err_console.print(note, markup=False, highlight=False)
    return result


def _report_skipped(skipped: list[tuple[str, str]]) -> None:
    if not skipped:
        return
    err_console.print(f"skipped {count(len(skipped), 'unreadable item')}:", highlight=False)
    for key, reason in skipped:
        err_console.print(f"  {key}: {reason}", markup=False, highlight=False, soft_wrap=True)


def _fit(result: RunResult, fitting: FitOptions) -> FitResult:
    from guard.calibration.fit import fit_calibration

    try:
        return fit_calibration(
            result.records, alpha=fitting.alpha, score=fitting.score,
            holdout_fraction=fitting.holdout_fraction, seed=fitting.seed,
            flag_small_tail=fitting.flag_small_tail, per_class=fitting.per_class,
            delta=fitting.delta,
        )  # fmt: skip
    except (GuardError, ValueError) as exc:
        raise fatal(f"cannot fit the calibration: {exc}") from None


def _artifact(
    fit: FitResult, runtime: Runtime, data_set: LabelledData, result: RunResult
) -> CalibrationArtifact:
    from guard.calibration.fit import artifact_from_fit
    from guard.verdict.artifact import ModelInfo

    spec = runtime.classifier.spec
    model_info = ModelInfo(
        sha256=runtime.classifier.sha256, input_name=spec.input_name, layout=spec.layout,
        channels=spec.channels, height=spec.height, width=spec.width,
        output_name=spec.output_name, num_classes=len(data_set.class_names),
    )  # fmt: skip
    return artifact_from_fit(
        fit,
        model=model_info,
        preprocessing=runtime.preprocessing.model_dump(mode="json"),
        engine=runtime.engine.settings.model_dump(mode="json"),
        class_names=data_set.class_names,
        area_reference=[r.mps_area_fraction for r in result.records],
    )


def _write(
    artifact: CalibrationArtifact,
    out: Path,
    report: Path | None,
    fit: FitResult,
    result: RunResult,
    data_set: LabelledData,
    runtime: Runtime,
) -> None:
    from guard.calibration.report import write_report
    from guard.verdict.artifact import save_artifact

    out.parent.mkdir(parents=True, exist_ok=True)
    save_artifact(artifact, out)
    if report is not None:
        write_report(
            report, artifact, fit, result.records, result.skipped,
            data=data_set, engine=runtime.engine,
        )  # fmt: skip


def _print_summary(
    artifact: CalibrationArtifact, out: Path, report: Path | None, resumed: int
) -> None:
    m, detector = artifact.metrics, artifact.detector
    out_console.print(
        f"{m.n_items} items ({resumed} from the cache), accuracy {number(m.accuracy)}, "
        f"{m.n_incorrect} errors; score {detector.score_kind}, alpha {detector.alpha}"
    )
    out_console.print(
        f"held-out: false-alarm rate {number(m.false_alarm_rate_holdout)}, detection rate "
        f"{number(m.detection_rate_holdout)}; AUROC "
        + ", ".join(f"{kind} {number(s.auroc)}" for kind, s in m.scores.items())
    )
    for note in artifact.notes:
        out_console.print(f"note: {note}", markup=False, soft_wrap=True)
    out_console.print(f"calibration written to {out}" + (f", report in {report}" if report else ""))
