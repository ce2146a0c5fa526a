"""``guard explain`` and ``guard demo``: MPSs of individual inputs, as a table, JSON and pictures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from guard import demo
from guard.cli.common import (
    EXIT_INPUT_ERRORS,
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
    print_error,
    progress_bar,
)
from guard.engine import MpsEngine, MpsResult
from guard.errors import ConfigError, GuardError
from guard.preprocess import Preprocessing, input_to_display, load_input
from guard.render import save_picture
from guard.runtime import MaskedClassifier


@dataclass
class Outcome:
    path: Path
    result: MpsResult | None = None
    error: str | None = None


def _explain_each(
    paths: list[Path], engine: MpsEngine, preprocessing: Preprocessing
) -> Iterator[tuple[Outcome, np.ndarray | None]]:
    """Explain inputs one by one; a bad input is reported and the others go on."""
    spec = engine.evaluator.spec
    for path in paths:
        try:
            tensor = load_input(path, spec, preprocessing)
            yield Outcome(path, result=engine.explain(tensor)), tensor
        except GuardError as exc:
            yield Outcome(path, error=str(exc)), None
        except Exception as exc:  # noqa: BLE001 - one input's fault must not stop the others
            yield Outcome(path, error=f"{path}: internal error ({type(exc).__name__}: {exc})"), None


def _result_record(outcome: Outcome, class_names: list[str] | None) -> dict[str, Any]:
    if outcome.result is None:
        return {"path": str(outcome.path), "error": outcome.error}
    r = outcome.result
    record: dict[str, Any] = {
        "path": str(outcome.path),
        "predicted_class": r.predicted_class,
        "confidence": round(r.confidence, 6),
        "mps_area_fraction": round(r.mps_area_fraction, 6),
        "mps_pixels": r.mps_pixels,
        "degenerate": r.degenerate,
        "baseline_class": r.baseline_class,
        "model_evaluations": r.model_evaluations,
        "model_calls": r.model_calls,
        "seconds": round(r.seconds, 4),
    }
    if class_names is not None:
        record["predicted_name"] = class_names[r.predicted_class]
    return record


def _print_table(outcomes: list[Outcome], class_names: list[str] | None, notes: list[str]) -> None:
    table = Table(title="Minimal sufficient pixel sets")
    for column in ("input", "class", "conf.", "MPS area", "MPS px", "degenerate", "baseline class",
                   "evals", "calls", "seconds"):  # fmt: skip
        table.add_column(column, justify="left" if column == "input" else "right")
    for outcome in outcomes:
        r = outcome.result
        if r is None:
            continue
        name = class_names[r.predicted_class] if class_names else str(r.predicted_class)
        table.add_row(
            escape(outcome.path.name), escape(name), f"{r.confidence:.3f}", f"{100 * r.mps_area_fraction:.2f}%",
            str(r.mps_pixels), "yes" if r.degenerate else "no", str(r.baseline_class),
            str(r.model_evaluations), str(r.model_calls), f"{r.seconds:.3f}",
        )  # fmt: skip
    out_console.print(table)
    for note in notes:
        out_console.print(f"note: {note}", markup=False, highlight=False)


def _run_explain(
    inputs: list[Path],
    classifier: MaskedClassifier,
    engine: MpsEngine,
    preprocessing: Preprocessing,
    *,
    as_json: bool,
    save_masks: Path | None,
    out: Path | None,
    class_names: list[str] | None,
) -> int:
    outcomes: list[Outcome] = []
    with progress_bar("explaining") as progress:
        task = progress.add_task("explain", total=len(inputs), rate="")
        for outcome, tensor in _explain_each(inputs, engine, preprocessing):
            outcomes.append(outcome)
            if outcome.result is not None and tensor is not None:
                _write_outputs(
                    outcome, tensor, classifier, preprocessing, save_masks, out, class_names
                )
            if as_json:
                out_console.print_json(
                    json.dumps(_result_record(outcome, class_names)), indent=None
                )
            rate = f"{1 / outcome.result.seconds:.1f} img/s" if outcome.result else ""
            progress.update(task, advance=1, rate=rate)
    if not as_json:
        _print_table(outcomes, class_names, classifier.notes + [f"provider: {classifier.provider}"])
    else:  # stdout stays pure JSON lines; what a user should know goes to stderr
        for note in classifier.notes:
            err_console.print(f"note: {note}", markup=False, highlight=False)
    failures = [o for o in outcomes if o.error is not None]
    for outcome in failures:
        print_error(str(outcome.error))
    if out is not None and not as_json:
        out_console.print(f"pictures written to {out}")
    return EXIT_INPUT_ERRORS if failures else 0


def _write_outputs(
    outcome: Outcome,
    tensor: np.ndarray,
    classifier: MaskedClassifier,
    preprocessing: Preprocessing,
    save_masks: Path | None,
    out: Path | None,
    class_names: list[str] | None,
) -> None:
    result = outcome.result
    assert result is not None
    stem = outcome.path.stem
    try:
        if save_masks is not None:
            save_masks.mkdir(parents=True, exist_ok=True)
            np.save(save_masks / f"{stem}.npy", result.mps_mask)
        if out is not None:
            shown = None if outcome.path.suffix.lower() == ".npy" else preprocessing
            pixels = input_to_display(tensor, classifier.spec, shown)
            name = class_names[result.predicted_class] if class_names else None
            save_picture(out / f"{stem}.png", pixels, result, name)
    except OSError as exc:
        raise ConfigError(f"cannot write the outputs of {outcome.path}: {exc}") from exc


def explain(
    inputs: Annotated[
        list[Path], typer.Argument(help="image files, or .npy tensors in the model's layout")
    ],
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
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per input")] = False,
    save_masks: Annotated[
        Path | None, typer.Option(help="write each MPS as a boolean HxW .npy")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="write a picture per input into this folder")
    ] = None,
) -> None:
    """Compute the minimal sufficient pixel set of each input's prediction."""
    args = RuntimeArgs(
        **{k: v for k, v in locals().items() if k in RuntimeArgs.__dataclass_fields__}
    )
    try:
        runtime = build_runtime(args)
    except GuardError as exc:
        raise fatal(str(exc)) from None
    code = _run_explain(
        inputs, runtime.classifier, runtime.engine, runtime.preprocessing,
        as_json=as_json, save_masks=save_masks, out=out, class_names=runtime.class_names,
    )  # fmt: skip
    raise typer.Exit(code)


def run_demo(
    out: Annotated[Path, typer.Option(help="folder for the pictures")] = Path("out/demo"),
) -> None:
    """Explain the bundled demo images with the bundled demo model and write pictures."""
    images = sorted(demo.DEMO_IMAGES.glob("*.png"))
    if not images:
        raise fatal(f"no demo images in {demo.DEMO_IMAGES}")
    explain(inputs=images, out=out)
