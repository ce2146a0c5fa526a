"""The ``guard`` command line. Thin: it builds settings, calls the engine and reports."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from guard import demo
from guard.engine import MpsEngine, MpsResult
from guard.errors import ConfigError, GuardError
from guard.preprocess import Preprocessing, input_to_display, load_input
from guard.render import save_picture
from guard.runtime import MaskedClassifier
from guard.settings import EngineSettings, ModelOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="mps-guard: minimal sufficient pixel sets of an image classifier's predictions.",
)
# Piped output gets a fixed width wide enough for the table instead of rich's 80 columns.
out_console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True)

EXIT_INPUT_ERRORS = 1  # the run finished but some inputs failed
EXIT_FATAL = 2  # nothing could be done (model, settings)


@dataclass
class Outcome:
    path: Path
    result: MpsResult | None = None
    error: str | None = None


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"{text!r} is not a comma-separated list of numbers") from exc


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} file {path}: {exc}") from exc


def _engine_settings(path: Path | None, overrides: dict[str, Any]) -> EngineSettings:
    base = _load_json(path, "engine settings") if path else {}
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return EngineSettings.model_validate({**base, **given})
    except ValidationError as exc:
        raise ConfigError(f"invalid engine settings: {exc}") from exc


def _preprocessing(path: Path | None, overrides: dict[str, Any]) -> Preprocessing:
    base = Preprocessing.from_file(path).model_dump() if path else {}
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Preprocessing.model_validate({**base, **given})
    except ValidationError as exc:
        raise ConfigError(f"invalid preprocessing settings: {exc}") from exc


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


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]explaining"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )


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
            outcome.path.name, name, f"{r.confidence:.3f}", f"{100 * r.mps_area_fraction:.2f}%",
            str(r.mps_pixels), "yes" if r.degenerate else "no", str(r.baseline_class),
            str(r.model_evaluations), str(r.model_calls), f"{r.seconds:.3f}",
        )  # fmt: skip
    out_console.print(table)
    for note in notes:
        out_console.print(f"note: {note}")


def _run_explain(
    inputs: list[Path],
    classifier: MaskedClassifier,
    engine_settings: EngineSettings,
    preprocessing: Preprocessing,
    *,
    as_json: bool,
    save_masks: Path | None,
    out: Path | None,
    class_names: list[str] | None,
) -> int:
    engine = MpsEngine(classifier, engine_settings)
    outcomes: list[Outcome] = []
    with _progress() as progress:
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
    failures = [o for o in outcomes if o.error is not None]
    for outcome in failures:
        _print_error(str(outcome.error))
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
    if save_masks is not None:
        save_masks.mkdir(parents=True, exist_ok=True)
        np.save(save_masks / f"{stem}.npy", result.mps_mask)
    if out is not None:
        shown = None if outcome.path.suffix.lower() == ".npy" else preprocessing
        pixels = input_to_display(tensor, classifier.spec, shown)
        name = class_names[result.predicted_class] if class_names else None
        save_picture(out / f"{stem}.png", pixels, result, name)


def _print_error(message: str) -> None:
    # soft_wrap: one error, one line, whatever the terminal width (and greppable in logs)
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def _fatal(message: str) -> typer.Exit:
    _print_error(message)
    return typer.Exit(EXIT_FATAL)


Model = Annotated[
    Path | None, typer.Option(help="ONNX classifier (default: the bundled demo model)")
]


@app.command()
def explain(
    inputs: Annotated[
        list[Path], typer.Argument(help="image files, or .npy tensors in the model's layout")
    ],
    model: Model = None,
    preprocessing: Annotated[Path | None, typer.Option(help="JSON preprocessing settings")] = None,
    scale: Annotated[
        float | None, typer.Option(help="multiplies 8-bit pixels (default 1/255)")
    ] = None,
    mean: Annotated[
        str | None, typer.Option(help="per-channel mean after scaling, e.g. 0.485,0.456,0.406")
    ] = None,
    std: Annotated[str | None, typer.Option(help="per-channel std after scaling")] = None,
    color_mode: Annotated[str | None, typer.Option(help="decode images as L, RGB or RGBA")] = None,
    resize: Annotated[str | None, typer.Option(help="nearest, bilinear or bicubic")] = None,
    layout: Annotated[str, typer.Option(help="auto, NCHW or NHWC")] = "auto",
    height: Annotated[
        int | None, typer.Option(help="input height where the model leaves it dynamic")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="input width where the model leaves it dynamic")
    ] = None,
    output: Annotated[
        str | None, typer.Option(help="model output to read (default: the first)")
    ] = None,
    output_kind: Annotated[str, typer.Option(help="auto, logits or probabilities")] = "auto",
    provider: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda")] = "auto",
    engine_settings: Annotated[Path | None, typer.Option(help="JSON engine settings")] = None,
    iters: Annotated[int | None, typer.Option(help="responsibility runs (default 20)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed shared by every image (default 0)")] = None,
    tree_depth: Annotated[int | None, typer.Option(help="default 10")] = None,
    min_box_size: Annotated[int | None, typer.Option(help="default 10 pixels")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="default 10 pixels")] = None,
    baseline: Annotated[
        str | None, typer.Option(help="0, per-channel 'a,b,c', or blur[:SIGMA]")
    ] = None,
    combination: Annotated[str | None, typer.Option(help="multiplicative or additive")] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(help="most mutants per model call (512)")
    ] = None,
    classes: Annotated[Path | None, typer.Option(help="JSON list of class names")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per input")] = False,
    save_masks: Annotated[
        Path | None, typer.Option(help="write each MPS as a boolean HxW .npy")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="write a picture per input into this folder")
    ] = None,
) -> None:
    """Compute the minimal sufficient pixel set of each input's prediction."""
    try:
        if model is None:
            model = demo.DEMO_MODEL
            preprocessing = preprocessing or demo.DEMO_PREPROCESSING
            classes = classes or demo.DEMO_CLASSES
        prep = _preprocessing(
            preprocessing,
            {
                "scale": scale,
                "mean": _floats(mean),
                "std": _floats(std),
                "color_mode": color_mode,
                "resize": resize,
            },
        )
        settings = _engine_settings(
            engine_settings,
            {
                "iters": iters, "seed": seed, "tree_depth": tree_depth, "min_box_size": min_box_size,
                "chunk_size": chunk_size, "baseline": baseline, "combination": combination,
                "max_batch_size": max_batch_size,
            },
        )  # fmt: skip
        try:
            options = ModelOptions(
                layout=layout, height=height, width=width, output=output,
                output_kind=output_kind, provider=provider,
            )  # fmt: skip
        except ValidationError as exc:
            raise ConfigError(f"invalid model options: {exc}") from exc
        class_names = _load_json(classes, "class names") if classes else None
        classifier = MaskedClassifier(model, options)
        if class_names is not None and classifier.spec.num_classes not in (0, len(class_names)):
            raise ConfigError(
                f"{len(class_names)} class names given, the model has {classifier.spec.num_classes} outputs"
            )
    except GuardError as exc:
        raise _fatal(str(exc)) from None
    code = _run_explain(
        inputs, classifier, settings, prep,
        as_json=as_json, save_masks=save_masks, out=out, class_names=class_names,
    )  # fmt: skip
    raise typer.Exit(code)


@app.command("demo")
def run_demo(
    out: Annotated[Path, typer.Option(help="folder for the pictures")] = Path("out/demo"),
) -> None:
    """Explain the bundled demo images with the bundled demo model and write pictures."""
    images = sorted(demo.DEMO_IMAGES.glob("*.png"))
    if not images:
        raise _fatal(f"no demo images in {demo.DEMO_IMAGES}")
    explain(inputs=images, out=out, layout="auto", output_kind="auto", provider="auto")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
