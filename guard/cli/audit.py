"""``guard audit``: compare models by their MPSs on the same labelled images (size, overlap,
correctness, localisation against object masks), to choose which model to deploy."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

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

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def audit(
    model: Annotated[
        list[Path], typer.Option(help="ONNX classifier; repeat for every model to compare")
    ],
    data: Annotated[
        Path, typer.Option(help="ImageFolder directory, path,label CSV, or .npz with x and y")
    ],
    report: Annotated[
        Path,
        typer.Option(help="write summary.json, records.csv, report.md, plots and the cache here"),
    ],
    masks: Annotated[
        Path | None,
        typer.Option(
            help="object masks: a folder mirroring the images, or an .npz with 'masks' "
            "(default: the data .npz's own 'masks', if any)"
        ),
    ] = None,  # fmt: skip
    name: Annotated[
        list[str] | None,
        typer.Option(help="a name per model, in --model order (default: file stems)"),
    ] = None,
    family: Annotated[
        list[str] | None,
        typer.Option(
            help="a family label per model, in --model order; the Friedman test runs "
            "within each family of three or more (default: one family of all)"
        ),
    ] = None,  # fmt: skip
    level: Annotated[float, typer.Option(help="significance level of the tests")] = 0.05,
    batch_items: Annotated[
        int, typer.Option(help="images explained together (share model calls)")
    ] = 8,
    restart: Annotated[
        bool, typer.Option(help="ignore the cached results of an earlier run and start over")
    ] = False,
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
    """Run every model on the same labelled images with identical engine settings and compare
    their MPSs: per-model tables, significance tests, overlaps, localisation, a ranking.

    Per-item results are cached per model under REPORT/cache/ as they are computed; re-running
    the same command after an interruption resumes where it stopped. With one model only the
    per-model tables are written and the comparisons are left out (the report says so).
    """
    # Heavy imports only for this command (scipy, matplotlib).
    from guard.audit.masks import open_ground_truth
    from guard.audit.report import write_report
    from guard.audit.run import AuditModel, run_model
    from guard.audit.summary import ModelOutcome, summarise
    from guard.datasets import open_labelled_data

    names = name or [path.stem for path in model]
    families = family or ["all"] * len(model)
    if not model:
        raise fatal("give at least one --model")
    if len(names) != len(model):
        raise fatal(f"{len(names)} --name values for {len(model)} models; give one per model")
    if len(families) != len(model):
        raise fatal(f"{len(families)} --family values for {len(model)} models; give one per model")
    if len(set(names)) != len(names):
        raise fatal(f"model names must differ ({', '.join(names)}); set them with --name")
    if bad := [n for n in names if not _NAME.match(n)]:
        raise fatal(f"model names may hold only letters, digits, '_', '.', '-': {bad}")
    if not 0 < level < 1:
        raise fatal(f"--level must lie strictly between 0 and 1, not {level}")
    if batch_items < 1:
        raise fatal(f"--batch-items must be at least 1, not {batch_items}")

    shared = RuntimeArgs(
        **{k: v for k, v in locals().items() if k in RuntimeArgs.__dataclass_fields__ and k != "model"}
    )  # fmt: skip
    audited, data_sets = [], []
    for path, model_name, model_family in zip(model, names, families, strict=True):
        runtime = build_runtime(replace(shared, model=path))
        # Each model reads the data at its own input size (image files are resized to it).
        data_sets.append(open_labelled_data(data, runtime.classifier.spec, runtime.preprocessing,
                                            runtime.class_names))  # fmt: skip
        audited.append(
            AuditModel(model_name, path, model_family, runtime.classifier, runtime.engine)
        )
    keys = data_sets[0].keys
    classes_seen = {len(d.class_names) for d in data_sets}
    if len(classes_seen) > 1:
        raise fatal(f"the models have different numbers of classes ({sorted(classes_seen)})")
    truth = open_ground_truth(masks, data, keys)

    outcomes = []
    try:
        with progress_bar("auditing") as progress:
            for audited_model, data_set in zip(audited, data_sets, strict=True):
                task = progress.add_task(
                    audited_model.name, total=len(data_set), rate=audited_model.name
                )
                outcome = run_model(
                    audited_model, data_set, truth, report / "cache" / f"{audited_model.name}.jsonl",
                    batch_items=batch_items, restart=restart,
                    on_progress=lambda count, task=task: progress.update(task, advance=count),
                )  # fmt: skip
                outcomes.append(ModelOutcome(audited_model, outcome.records, outcome.skipped,
                                             outcome.resumed))  # fmt: skip
    except KeyboardInterrupt:
        err_console.print(
            f"interrupted: results so far are kept in {report / 'cache'}; run the same command again to resume"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None

    for outcome in outcomes:
        if outcome.skipped:
            err_console.print(f"{outcome.model.name}: skipped {len(outcome.skipped)} item(s):",
                              markup=False, highlight=False)  # fmt: skip
            for key, reason in outcome.skipped:
                err_console.print(
                    f"  {key}: {reason}", markup=False, highlight=False, soft_wrap=True
                )
    if not any(o.records for o in outcomes):
        raise fatal("no item could be explained by any model; nothing to report")
    summary = summarise(
        outcomes, level=level, engine=audited[0].engine.settings.model_dump(mode="json"),
        n_items=len(keys), masks=str(truth.source) if truth else None,
    )  # fmt: skip
    write_report(report, outcomes, summary)
    _print_summary(summary, report)


def _print_summary(summary: dict[str, Any], report: Path) -> None:
    def f(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    for m in summary["models"]:
        located = (
            f", RRA {f(m['rra'])}, pointing game {f(m['pointing_game'])}"
            if summary["masks"]
            else ""
        )
        out_console.print(
            f"{m['name']}: accuracy {f(m['accuracy'])}, MPS area mean {f(m['mps_area_mean'])} "
            f"(correct {f(m['mps_area_mean_correct'])}, incorrect {f(m['mps_area_mean_incorrect'])})"
            + located, markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    out_console.print(summary["ranking"], markup=False, highlight=False)
    for note in summary["notes"]:
        out_console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    out_console.print(f"report written to {report}", markup=False, highlight=False)
