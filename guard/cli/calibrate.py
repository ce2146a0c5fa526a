"""``guard calibrate``: MPS-size distributions of correct and incorrect predictions, fitted
on labelled data, with a conformal alarm threshold and an honest report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from guard.cli.common import (
    EXIT_INTERRUPTED,
    BaselineOpt,
    ChunkSizeOpt,
    ClassesOpt,
    ColorModeOpt,
    CombinationOpt,
    EngineSettingsOpt,
    HeightOpt,
    ItersOpt,
    LayoutOpt,
    MaxBatchOpt,
    MeanOpt,
    MinBoxSizeOpt,
    ModelOpt,
    OutputKindOpt,
    OutputOpt,
    PreprocessingOpt,
    ProviderOpt,
    ResizeOpt,
    RuntimeArgs,
    ScaleOpt,
    SeedOpt,
    StdOpt,
    TreeDepthOpt,
    WidthOpt,
    build_runtime,
    err_console,
    fatal,
    out_console,
    progress_bar,
)
from guard.errors import GuardError


def calibrate(
    data: Annotated[
        Path, typer.Argument(help="ImageFolder directory, path,label CSV, or .npz with x and y")
    ],
    out: Annotated[Path, typer.Option(help="calibration artifact (JSON) to write")] = Path(
        "calibration.json"
    ),
    report: Annotated[
        Path | None, typer.Option(help="write summary.json, records.csv, report.md and plots here")
    ] = None,
    alpha: Annotated[
        float, typer.Option(help="false-alarm rate allowed on correct predictions")
    ] = 0.05,
    score: Annotated[str, typer.Option(help="mps (the paper's check), msp or combined")] = "mps",
    flag_small_tail: Annotated[
        bool, typer.Option(help="also flag unusually small (myopic) MPSs")
    ] = False,
    holdout_fraction: Annotated[
        float, typer.Option(help="share of items held out from fitting")
    ] = 0.5,
    split_seed: Annotated[int, typer.Option(help="seed of the stratified fit/held-out split")] = 0,
    batch_items: Annotated[
        int, typer.Option(help="images explained together (share model calls)")
    ] = 8,
    restart: Annotated[
        bool, typer.Option(help="ignore the cache of an earlier run and start over")
    ] = False,
    model: ModelOpt = None,
    preprocessing: PreprocessingOpt = None,
    scale: ScaleOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    color_mode: ColorModeOpt = None,
    resize: ResizeOpt = None,
    layout: LayoutOpt = "auto",
    height: HeightOpt = None,
    width: WidthOpt = None,
    output: OutputOpt = None,
    output_kind: OutputKindOpt = "auto",
    provider: ProviderOpt = "auto",
    engine_settings: EngineSettingsOpt = None,
    iters: ItersOpt = None,
    seed: SeedOpt = None,
    tree_depth: TreeDepthOpt = None,
    min_box_size: MinBoxSizeOpt = None,
    chunk_size: ChunkSizeOpt = None,
    baseline: BaselineOpt = None,
    combination: CombinationOpt = None,
    max_batch_size: MaxBatchOpt = None,
    classes: ClassesOpt = None,
) -> None:
    """Fit the guard's check on labelled data: run the engine on every item, fit, report.

    Per-item results are cached in OUT.cache.jsonl as they are computed; re-running the same
    command after an interruption resumes where it stopped.
    """
    # Heavy imports only for this command (scikit-learn, matplotlib).
    from guard.calibration.fit import artifact_from_fit, fit_calibration
    from guard.calibration.report import write_report
    from guard.calibration.run import run_items
    from guard.datasets import open_labelled_data
    from guard.verdict.artifact import ModelInfo, save_artifact

    args = RuntimeArgs(
        **{k: v for k, v in locals().items() if k in RuntimeArgs.__dataclass_fields__}
    )
    if score not in ("mps", "msp", "combined"):
        raise fatal(f"--score must be mps, msp or combined, not {score!r}")
    if not 0 < alpha < 1:
        raise fatal(f"--alpha must lie strictly between 0 and 1, not {alpha}")
    if not 0 < holdout_fraction < 1:
        raise fatal(f"--holdout-fraction must lie strictly between 0 and 1, not {holdout_fraction}")
    if batch_items < 1:
        raise fatal(f"--batch-items must be at least 1, not {batch_items}")
    try:
        runtime = build_runtime(args)
        spec = runtime.classifier.spec
        data_set = open_labelled_data(data, spec, runtime.preprocessing, runtime.class_names)
    except GuardError as exc:
        raise fatal(str(exc)) from None

    cache = out.with_name(out.name + ".cache.jsonl")
    try:
        with progress_bar("calibrating") as progress:
            task = progress.add_task("calibrate", total=len(data_set), rate="")

            def advance(count: int) -> None:
                progress.update(task, advance=count)
                elapsed = progress.tasks[task].elapsed or 0.0
                done = progress.tasks[task].completed
                progress.update(task, rate=f"{done / elapsed:.1f} items/s" if elapsed else "")

            result = run_items(
                data_set, runtime.classifier, runtime.engine, cache,
                batch_items=batch_items, restart=restart, on_progress=advance,
            )  # fmt: skip
    except KeyboardInterrupt:
        err_console.print(
            f"interrupted: results so far are kept in {cache}; run the same command again to resume"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except GuardError as exc:
        raise fatal(str(exc)) from None

    if result.skipped:
        err_console.print(f"skipped {len(result.skipped)} unreadable item(s):", highlight=False)
        for key, reason in result.skipped:
            err_console.print(f"  {key}: {reason}", markup=False, highlight=False, soft_wrap=True)
    try:
        fit = fit_calibration(
            result.records, alpha=alpha, score=_score_kind(score), holdout_fraction=holdout_fraction,
            seed=split_seed, flag_small_tail=flag_small_tail,
        )  # fmt: skip
    except (GuardError, ValueError) as exc:
        raise fatal(f"cannot fit the calibration: {exc}") from None
    model_info = ModelInfo(
        sha256=runtime.classifier.sha256, input_name=spec.input_name, layout=spec.layout,
        channels=spec.channels, height=spec.height, width=spec.width,
        output_name=spec.output_name, num_classes=len(data_set.class_names),
    )  # fmt: skip
    artifact = artifact_from_fit(
        fit,
        model=model_info,
        preprocessing=runtime.preprocessing.model_dump(mode="json"),
        engine=runtime.engine.settings.model_dump(mode="json"),
        class_names=data_set.class_names,
        area_reference=[r.mps_area_fraction for r in result.records],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_artifact(artifact, out)
    if report is not None:
        write_report(report, artifact, fit, result.records, result.skipped)
    _print_summary(artifact, out, report, resumed=result.resumed)


def _score_kind(text: str) -> Literal["mps", "msp", "combined"]:
    return "msp" if text == "msp" else "combined" if text == "combined" else "mps"


def _print_summary(artifact, out: Path, report: Path | None, resumed: int) -> None:  # noqa: ANN001
    m = artifact.metrics

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    out_console.print(
        f"{m.n_items} items ({resumed} from the cache), accuracy {fmt(m.accuracy)}, "
        f"{m.n_incorrect} errors; score {artifact.detector.score_kind}, alpha {artifact.detector.alpha}"
    )
    out_console.print(
        f"held-out: false-alarm rate {fmt(m.false_alarm_rate_holdout)}, detection rate "
        f"{fmt(m.detection_rate_holdout)}; AUROC mps {fmt(m.scores['mps'].auroc)}, "
        f"msp {fmt(m.scores['msp'].auroc)}, combined {fmt(m.scores['combined'].auroc)}"
    )
    for note in artifact.notes:
        out_console.print(f"note: {note}", markup=False, soft_wrap=True)
    out_console.print(f"calibration written to {out}" + (f", report in {report}" if report else ""))
