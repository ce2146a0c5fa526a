"""``guard audit``: compare models by their MPSs on the same labelled images (size, overlap,
correctness, localisation against object masks), to choose which model to deploy."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from guard.cli.common import (
    EXIT_INTERRUPTED,
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
from guard.numbers import count, number

if TYPE_CHECKING:  # scipy and matplotlib load when the command runs, not for --help
    from guard.audit.masks import GroundTruth
    from guard.audit.run import AuditModel
    from guard.audit.summary import ModelOutcome
    from guard.datasets import LabelledData
    from guard.scaleout import RayExecutor

Option = typer.Option
ModelsOpt = Annotated[list[Path], Option(help="ONNX classifier; repeat for every model to compare")]
DataOpt = Annotated[Path, Option(help=DATA_HELP)]
ReportOpt = Annotated[
    Path,
    Option(
        help="write summary.json, records.csv, report.md, plots, gallery.html and the cache here"
    ),
]
MasksOpt = Annotated[
    Path | None,
    Option(help="object masks: a folder mirroring the images, or an .npz with 'masks' "
                "(default: the data .npz's own 'masks', if any)"),
]  # fmt: skip
NamesOpt = Annotated[
    list[str] | None, Option(help="a name per model, in --model order (default: file stems)")
]
FamiliesOpt = Annotated[
    list[str] | None,
    Option(help="a family label per model, in --model order; the Friedman test runs "
                "within each family of three or more (default: one family of all)"),
]  # fmt: skip
LevelOpt = Annotated[float, Option(help="significance level of the tests")]
SeedsOpt = Annotated[
    int,
    Option(help="explain every image under this many seeds (--seed, then + 1000 each): the "
                "second measures each model's seed-to-seed MPS overlap, the noise floor that "
                "tells whether two models look at different places; 1 skips it (half the time)"),
]  # fmt: skip
RestartOpt = Annotated[
    bool, Option(help="ignore the cached results of an earlier run and start over")
]

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@with_runtime_options(exclude=("model",))
def audit(
    model: ModelsOpt,
    data: DataOpt,
    report: ReportOpt,
    masks: MasksOpt = None,
    name: NamesOpt = None,
    family: FamiliesOpt = None,
    level: LevelOpt = 0.05,
    seeds: SeedsOpt = 2,
    batch_items: BatchItemsOpt = 8,
    restart: RestartOpt = False,
    ray: RayOpt = None,
    ray_workers: RayWorkersOpt = None,
    ray_cpus: RayCpusOpt = 1.0,
    ray_gpus: RayGpusOpt = 0.0,
    *,
    options: RuntimeOptions,
) -> None:
    """Run every model on the same labelled images with identical engine settings and compare
    their MPSs: per-model tables, significance tests, overlaps, localisation, a ranking.

    Per-item results are cached per model under REPORT/cache/ as they are computed; re-running
    the same command after an interruption resumes where it stopped. With one model only the
    per-model tables are written and the comparisons are left out (the report says so).
    With --seeds 2 (the default) every image is also explained under seed + 1000, so the
    report can set each model's seed-to-seed overlap beside the overlap between models.
    With --ray the MPSs are computed on a Ray cluster's workers (the same records), one pool of
    workers per model in turn; the statistics and report are made here.
    """
    from guard.audit.masks import open_ground_truth
    from guard.audit.report import write_report

    names, families = _validate(model, name, family, level, batch_items, seeds)
    cluster = ray_executor(ray, ray_workers, ray_cpus, ray_gpus)
    audited, data_sets = _load(model, names, families, data, options, seeds)
    truth = open_ground_truth(masks, data, data_sets[0].keys)
    with cluster as executor:
        outcomes = _run(
            audited, data_sets, truth, report, batch_items=batch_items, restart=restart,
            executor=executor,
        )  # fmt: skip
    report_ray(executor)
    _report_skipped(outcomes)
    summary = _summarise(outcomes, audited, level, len(data_sets[0].keys), truth)
    write_report(report, outcomes, summary, data_sets)
    _print_summary(summary, report)


def _validate(
    models: list[Path],
    name: list[str] | None,
    family: list[str] | None,
    level: float,
    batch_items: int,
    seeds: int,
) -> tuple[list[str], list[str]]:
    """The models' names and families, once every option is known to be usable."""
    names = name or [path.stem for path in models]
    families = family or ["all"] * len(models)
    if not models:
        raise fatal("give at least one --model")
    if len(names) != len(models):
        raise fatal(f"{len(names)} --name values for {len(models)} models; give one per model")
    if len(families) != len(models):
        raise fatal(f"{len(families)} --family values for {len(models)} models; give one per model")
    if len(set(names)) != len(names):
        raise fatal(f"model names must differ ({', '.join(names)}); set them with --name")
    if bad := [n for n in names if not _NAME.match(n)]:
        raise fatal(f"model names may hold only letters, digits, '_', '.', '-': {bad}")
    if not 0 < level < 1:
        raise fatal(f"--level must lie strictly between 0 and 1, not {level}")
    if batch_items < 1:
        raise fatal(f"--batch-items must be at least 1, not {batch_items}")
    if seeds < 1:
        raise fatal(f"--seeds must be at least 1, not {seeds}")
    return names, families


def _load(
    models: list[Path],
    names: list[str],
    families: list[str],
    data: Path,
    options: RuntimeOptions,
    seeds: int,
) -> tuple[list[AuditModel], list[LabelledData]]:
    """Every model with the same options (and an engine per further seed), and the data as
    each one reads it."""
    from guard.audit.run import AuditModel, seed_engines
    from guard.datasets import open_labelled_data

    audited, data_sets = [], []
    for path, model_name, model_family in zip(models, names, families, strict=True):
        runtime = build_runtime(replace(options, model=path))
        # Each model reads the data at its own input size (image files are resized to it).
        data_sets.append(open_labelled_data(data, runtime.classifier.spec, runtime.preprocessing,
                                            runtime.class_names))  # fmt: skip
        others = seed_engines(runtime.classifier, runtime.engine, seeds)
        audited.append(
            AuditModel(model_name, path, model_family, runtime.classifier, runtime.engine, others)
        )
    classes_seen = {len(d.class_names) for d in data_sets}
    if len(classes_seen) > 1:
        raise fatal(f"the models have different numbers of classes ({sorted(classes_seen)})")
    return audited, data_sets


def _run(
    audited: list[AuditModel],
    data_sets: list[LabelledData],
    truth: GroundTruth | None,
    report: Path,
    *,
    batch_items: int,
    restart: bool,
    executor: RayExecutor | None = None,
) -> list[ModelOutcome]:
    """Every model on every item, cached under REPORT/cache; an interruption keeps what is done."""
    from guard.audit.run import run_model
    from guard.audit.summary import ModelOutcome

    outcomes = []
    try:
        with progress_bar("auditing") as progress:
            for model, data_set in zip(audited, data_sets, strict=True):
                task = progress.add_task(model.name, total=len(data_set), rate=model.name)
                run = run_model(
                    model, data_set, truth, report / "cache" / f"{model.name}.jsonl",
                    batch_items=batch_items, restart=restart,
                    on_progress=lambda done, task=task: progress.update(task, advance=done),
                    executor=executor,
                )  # fmt: skip
                outcomes.append(ModelOutcome(model, run.records, run.skipped, run.resumed))
                for note in run.notes:
                    err_console.print(f"{model.name}: {note}", markup=False, highlight=False)
    except KeyboardInterrupt:
        err_console.print(
            f"interrupted: results so far are kept in {report / 'cache'}; run the same command again to resume"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    return outcomes


def _report_skipped(outcomes: list[ModelOutcome]) -> None:
    for outcome in outcomes:
        if outcome.skipped:
            err_console.print(f"{outcome.model.name}: skipped {count(len(outcome.skipped), 'item')}:",
                              markup=False, highlight=False)  # fmt: skip
            for key, reason in outcome.skipped:
                err_console.print(
                    f"  {key}: {reason}", markup=False, highlight=False, soft_wrap=True
                )
    if not any(o.records for o in outcomes):
        raise fatal("no item could be explained by any model; nothing to report")


def _summarise(
    outcomes: list[ModelOutcome],
    audited: list[AuditModel],
    level: float,
    n_items: int,
    truth: GroundTruth | None,
) -> dict[str, Any]:
    from guard.audit.summary import summarise

    return summarise(
        outcomes, level=level, engine=audited[0].engine.settings.model_dump(mode="json"),
        n_items=n_items, masks=str(truth.source) if truth else None,
    )  # fmt: skip


def _print_summary(summary: dict[str, Any], report: Path) -> None:
    from guard.audit.summary import with_ci

    floors = {f["name"]: f for f in summary.get("noise_floor") or []}
    for m in summary["models"]:
        located = (
            f", RRA {number(m['rra'])}, pointing game {number(m['pointing_game'])}, "
            f"dual-polarity precision {with_ci(m, 'dual_polarity_precision')} (mask share "
            f"{number(m['mask_share'])})"
            if summary["masks"]
            else ""
        )
        if m["name"] in floors:
            located += f", seed-to-seed Dice {with_ci(floors[m['name']], 'dice_mean')}"
        out_console.print(
            f"{m['name']}: accuracy {number(m['accuracy'])}, MPS area mean "
            f"{number(m['mps_area_mean'])} (correct {number(m['mps_area_mean_correct'])}, "
            f"incorrect {number(m['mps_area_mean_incorrect'])})" + located,
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    out_console.print(summary["ranking"], markup=False, highlight=False)
    for note in summary["notes"]:
        out_console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    out_console.print(f"report written to {report}", markup=False, highlight=False)
