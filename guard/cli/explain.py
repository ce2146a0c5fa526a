"""``guard explain`` and ``guard demo``: MPSs of individual inputs, as a table, JSON and pictures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from guard import demo
from guard.cli.common import (
    EXIT_INPUT_ERRORS,
    Runtime,
    build_runtime,
    err_console,
    fatal,
    out_console,
    print_error,
    progress_bar,
)
from guard.cli.options import RuntimeOptions, with_runtime_options
from guard.errors import ConfigError, GuardError
from guard.numbers import number

if TYPE_CHECKING:  # the engine and runtime load when a command runs, not for --help
    from guard.engine import MpsEngine, MpsResult
    from guard.preprocess import Preprocessing

InputsArg = Annotated[
    list[Path], typer.Argument(help="image files, or .npy tensors in the model's layout")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON object per input")]
SaveMasksOpt = Annotated[Path | None, typer.Option(help="write each MPS as a boolean HxW .npy")]
PicturesOpt = Annotated[
    Path | None, typer.Option(help="write a picture per input into this folder")
]


@dataclass
class Outcome:
    path: Path
    result: MpsResult | None = None
    error: str | None = None


@with_runtime_options()
def explain(
    inputs: InputsArg,
    options: RuntimeOptions,
    as_json: JsonOpt = False,
    save_masks: SaveMasksOpt = None,
    out: PicturesOpt = None,
) -> None:
    """Compute the minimal sufficient pixel set of each input's prediction."""
    raise typer.Exit(_explain(inputs, options, as_json=as_json, save_masks=save_masks, out=out))


def run_demo(
    out: Annotated[Path, typer.Option(help="folder for the pictures")] = Path("out/demo"),
) -> None:
    """Explain the bundled demo images with the bundled demo model and write pictures."""
    images = sorted(demo.DEMO_IMAGES.glob("*.png"))
    if not images:
        raise fatal(f"no demo images in {demo.DEMO_IMAGES}")
    raise typer.Exit(_explain(images, RuntimeOptions(), as_json=False, save_masks=None, out=out))


def _explain(
    inputs: list[Path],
    options: RuntimeOptions,
    *,
    as_json: bool,
    save_masks: Path | None,
    out: Path | None,
) -> int:
    """Build, run, report; the exit code."""
    runtime = build_runtime(options)
    outcomes = _run(inputs, runtime, as_json=as_json, save_masks=save_masks, out=out)
    _report(outcomes, runtime, as_json=as_json, out=out)
    return EXIT_INPUT_ERRORS if any(o.error is not None for o in outcomes) else 0


def _run(
    inputs: list[Path],
    runtime: Runtime,
    *,
    as_json: bool,
    save_masks: Path | None,
    out: Path | None,
) -> list[Outcome]:
    """Explain every input, writing its outputs (and its JSON line) as soon as it is done."""
    outcomes: list[Outcome] = []
    with progress_bar("explaining") as progress:
        task = progress.add_task("explain", total=len(inputs), rate="")
        for outcome, tensor in _explain_each(inputs, runtime.engine, runtime.preprocessing):
            outcomes.append(outcome)
            if outcome.result is not None and tensor is not None:
                _write_outputs(outcome, tensor, runtime, save_masks, out)
            if as_json:
                record = _result_record(outcome, runtime.class_names)
                out_console.print_json(json.dumps(record), indent=None)
            rate = f"{number(1 / outcome.result.seconds, 1)} img/s" if outcome.result else ""
            progress.update(task, advance=1, rate=rate)
    return outcomes


def _explain_each(
    paths: list[Path], engine: MpsEngine, preprocessing: Preprocessing
) -> Iterator[tuple[Outcome, np.ndarray | None]]:
    """Explain inputs one by one; a bad input is reported and the others go on."""
    from guard.preprocess import load_input

    spec = engine.evaluator.spec
    for path in paths:
        try:
            tensor = load_input(path, spec, preprocessing)
            yield Outcome(path, result=engine.explain(tensor)), tensor
        except GuardError as exc:
            yield Outcome(path, error=str(exc)), None
        except Exception as exc:  # noqa: BLE001 - one input's fault must not stop the others
            yield Outcome(path, error=f"{path}: internal error ({type(exc).__name__}: {exc})"), None


def _write_outputs(
    outcome: Outcome,
    tensor: np.ndarray,
    runtime: Runtime,
    save_masks: Path | None,
    out: Path | None,
) -> None:
    from guard.preprocess import input_to_display
    from guard.render import save_picture

    result = outcome.result
    assert result is not None
    stem = outcome.path.stem
    try:
        if save_masks is not None:
            save_masks.mkdir(parents=True, exist_ok=True)
            np.save(save_masks / f"{stem}.npy", result.mps_mask)
        if out is not None:
            shown = None if outcome.path.suffix.lower() == ".npy" else runtime.preprocessing
            pixels = input_to_display(tensor, runtime.classifier.spec, shown)
            names = runtime.class_names
            save_picture(
                out / f"{stem}.png",
                pixels,
                result,
                names[result.predicted_class] if names else None,
            )
    except OSError as exc:
        raise ConfigError(f"cannot write the outputs of {outcome.path}: {exc}") from exc


def _report(outcomes: list[Outcome], runtime: Runtime, *, as_json: bool, out: Path | None) -> None:
    notes = runtime.classifier.notes
    if not as_json:
        _print_table(
            outcomes, runtime.class_names, [*notes, f"provider: {runtime.classifier.provider}"]
        )
    else:  # stdout stays pure JSON lines; what a user should know goes to stderr
        for note in notes:
            err_console.print(f"note: {note}", markup=False, highlight=False)
    for outcome in outcomes:
        if outcome.error is not None:
            print_error(outcome.error)
    if out is not None and not as_json:
        out_console.print(f"pictures written to {out}")


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
        record["baseline_name"] = class_names[r.baseline_class]
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
        baseline = class_names[r.baseline_class] if class_names else str(r.baseline_class)
        table.add_row(
            escape(outcome.path.name), escape(name), number(r.confidence), f"{number(100 * r.mps_area_fraction, 2)}%",
            str(r.mps_pixels), "yes" if r.degenerate else "no", escape(baseline),
            str(r.model_evaluations), str(r.model_calls), number(r.seconds),
        )  # fmt: skip
    out_console.print(table)
    for note in notes:
        out_console.print(f"note: {note}", markup=False, highlight=False)
