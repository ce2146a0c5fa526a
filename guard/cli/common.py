"""What every ``guard`` command shares: options, settings assembly, error reporting."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from guard import demo
from guard.engine import MpsEngine
from guard.errors import ConfigError, GuardError
from guard.preprocess import Preprocessing
from guard.runtime import MaskedClassifier
from guard.settings import EngineSettings, ModelOptions

# Piped output gets a fixed width wide enough for tables instead of rich's 80 columns.
out_console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True)

EXIT_INPUT_ERRORS = 1  # the run finished but some inputs failed
EXIT_FATAL = 2  # nothing could be done (model, settings, data)
EXIT_INTERNAL = 3  # a fault of the guard itself
EXIT_INTERRUPTED = 130

# Options shared by the commands that run the engine.
ModelOpt = Annotated[
    Path | None, typer.Option(help="ONNX classifier (default: the bundled demo model)")
]
PreprocessingOpt = Annotated[Path | None, typer.Option(help="JSON preprocessing settings")]
ScaleOpt = Annotated[float | None, typer.Option(help="multiplies 8-bit pixels (default 1/255)")]
MeanOpt = Annotated[
    str | None, typer.Option(help="per-channel mean after scaling, e.g. 0.485,0.456,0.406")
]
StdOpt = Annotated[str | None, typer.Option(help="per-channel std after scaling")]
ColorModeOpt = Annotated[str | None, typer.Option(help="decode images as L, RGB or RGBA")]
ResizeOpt = Annotated[str | None, typer.Option(help="nearest, bilinear or bicubic")]
LayoutOpt = Annotated[str, typer.Option(help="auto, NCHW or NHWC")]
HeightOpt = Annotated[
    int | None, typer.Option(help="input height where the model leaves it dynamic")
]
WidthOpt = Annotated[int | None, typer.Option(help="input width where the model leaves it dynamic")]
OutputOpt = Annotated[str | None, typer.Option(help="model output to read (default: the first)")]
OutputKindOpt = Annotated[str, typer.Option(help="auto, logits or probabilities")]
ProviderOpt = Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda")]
EngineSettingsOpt = Annotated[Path | None, typer.Option(help="JSON engine settings")]
ItersOpt = Annotated[int | None, typer.Option(help="responsibility runs (default 20)")]
SeedOpt = Annotated[int | None, typer.Option(help="seed shared by every image (default 0)")]
TreeDepthOpt = Annotated[int | None, typer.Option(help="default 10")]
MinBoxSizeOpt = Annotated[int | None, typer.Option(help="default 10 pixels")]
ChunkSizeOpt = Annotated[int | None, typer.Option(help="default 10 pixels")]
BaselineOpt = Annotated[str | None, typer.Option(help="0, per-channel 'a,b,c', or blur[:SIGMA]")]
CombinationOpt = Annotated[str | None, typer.Option(help="multiplicative or additive")]
MaxBatchOpt = Annotated[int | None, typer.Option(help="most mutants per model call (512)")]
ClassesOpt = Annotated[Path | None, typer.Option(help="class names: JSON list or one per line")]


@dataclass
class RuntimeArgs:
    """The shared options as given on the command line (None: not given)."""

    model: Path | None = None
    preprocessing: Path | None = None
    scale: float | None = None
    mean: str | None = None
    std: str | None = None
    color_mode: str | None = None
    resize: str | None = None
    layout: str = "auto"
    height: int | None = None
    width: int | None = None
    output: str | None = None
    output_kind: str = "auto"
    provider: str = "auto"
    engine_settings: Path | None = None
    iters: int | None = None
    seed: int | None = None
    tree_depth: int | None = None
    min_box_size: int | None = None
    chunk_size: int | None = None
    baseline: str | None = None
    combination: str | None = None
    max_batch_size: int | None = None
    classes: Path | None = None


@dataclass
class Runtime:
    classifier: MaskedClassifier
    engine: MpsEngine
    preprocessing: Preprocessing
    class_names: list[str] | None


def floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"{text!r} is not a comma-separated list of numbers") from exc


def load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} file {path}: {exc}") from exc


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def build_runtime(args: RuntimeArgs) -> Runtime:
    """Model, engine and preprocessing from the options; the demo's when no model is given."""
    from guard.datasets import read_class_names  # small module; kept local to the one use

    if args.model is None:
        args.model = demo.DEMO_MODEL
        args.preprocessing = args.preprocessing or demo.DEMO_PREPROCESSING
        args.classes = args.classes or demo.DEMO_CLASSES
    base = Preprocessing.from_file(args.preprocessing).model_dump() if args.preprocessing else {}
    overrides = {"scale": args.scale, "mean": floats(args.mean), "std": floats(args.std),
                 "color_mode": args.color_mode, "resize": args.resize}  # fmt: skip
    engine_base = load_json(args.engine_settings, "engine settings") if args.engine_settings else {}
    if not isinstance(engine_base, dict):
        raise ConfigError(f"engine settings file {args.engine_settings} must hold a JSON object")
    engine_overrides = {
        "iters": args.iters, "seed": args.seed, "tree_depth": args.tree_depth,
        "min_box_size": args.min_box_size, "chunk_size": args.chunk_size, "baseline": args.baseline,
        "combination": args.combination, "max_batch_size": args.max_batch_size,
    }  # fmt: skip
    try:
        preprocessing = Preprocessing.model_validate({**base, **_given(overrides)})
    except ValidationError as exc:
        raise ConfigError(f"invalid preprocessing settings: {exc}") from exc
    try:
        settings = EngineSettings.model_validate({**engine_base, **_given(engine_overrides)})
    except ValidationError as exc:
        raise ConfigError(f"invalid engine settings: {exc}") from exc
    try:
        options = ModelOptions(
            layout=args.layout, height=args.height, width=args.width, output=args.output,
            output_kind=args.output_kind, provider=args.provider,
        )  # fmt: skip
    except ValidationError as exc:
        raise ConfigError(f"invalid model options: {exc}") from exc
    class_names = read_class_names(args.classes) if args.classes else None
    classifier = MaskedClassifier(args.model, options)
    engine = MpsEngine(classifier, settings)
    for name, values in (("mean", preprocessing.mean), ("std", preprocessing.std)):
        if values is not None and len(values) not in (1, classifier.spec.channels):
            raise ConfigError(
                f"{len(values)} {name} values given for a {classifier.spec.channels}-channel model"
            )
    if class_names is not None and classifier.spec.num_classes not in (0, len(class_names)):
        raise ConfigError(
            f"{len(class_names)} class names given, the model has {classifier.spec.num_classes} outputs"
        )
    return Runtime(classifier, engine, preprocessing, class_names)


def progress_bar(verb: str) -> Progress:
    """A progress bar with count, rate and ETA on the terminal's stderr (silent when piped)."""
    return Progress(
        TextColumn(f"[bold]{verb}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )


def print_error(message: str) -> None:
    # soft_wrap: one error, one line, whatever the terminal width (and greppable in logs)
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def guarded(command: Callable[..., None]) -> Callable[..., None]:
    """Every command's last line of defence: a guard error is one message and exit 2; anything
    else is an internal fault, reported in one line (its details with GUARD_DEBUG=1), exit 3."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except GuardError as exc:
            raise fatal(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the boundary where every fault is reported
            if os.environ.get("GUARD_DEBUG") == "1":
                raise
            print_error(
                f"internal error ({type(exc).__name__}: {exc}); re-run with GUARD_DEBUG=1 for details"
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return run


def fatal(message: str) -> typer.Exit:
    print_error(message)
    return typer.Exit(EXIT_FATAL)
