"""What every ``guard`` command shares: the runtime built from its options, output, exit codes
and error reporting."""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from guard import demo
from guard.cli.options import RuntimeOptions
from guard.errors import ConfigError, GuardError, describe_validation_error
from guard.settings import EngineSettings, ModelOptions

if TYPE_CHECKING:
    from guard.engine import MpsEngine
    from guard.preprocess import Preprocessing
    from guard.runtime import MaskedClassifier

# Piped output gets a fixed width wide enough for tables instead of rich's 80 columns.
out_console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True)

EXIT_INPUT_ERRORS = 1  # the run finished but some inputs failed
EXIT_FATAL = 2  # nothing could be done (model, settings, data)
EXIT_INTERNAL = 3  # a fault of the guard itself
EXIT_INTERRUPTED = 130


@dataclass
class Runtime:
    classifier: MaskedClassifier
    engine: MpsEngine
    preprocessing: Preprocessing
    class_names: list[str] | None


# The model runtime (onnx, onnxruntime) is imported when a command first runs a model, not for
# ``guard --help``: build_runtime looks these names up on this module, which imports them then.
_RUNTIME = {"MaskedClassifier": "guard.runtime", "MpsEngine": "guard.engine",
            "Preprocessing": "guard.preprocess"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _RUNTIME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_RUNTIME[name]), name)
    globals()[name] = value
    return value


def _runtime(name: str) -> Any:
    """A name of ``_RUNTIME`` as this module holds it (imported on first use; tests replace it)."""
    return getattr(sys.modules[__name__], name)


def load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} file {path}: {exc}") from exc


def build_runtime(options: RuntimeOptions) -> Runtime:
    """Model, engine and preprocessing from the options; the demo's when no model is given."""
    from guard.datasets import read_class_names  # small module; kept local to the one use

    options = _demo_unless_model(options)
    preprocessing = _preprocessing(options)
    settings = _engine_settings(options)
    model_options = _model_options(options)
    class_names = read_class_names(options.classes) if options.classes else None
    classifier = _runtime("MaskedClassifier")(options.model, model_options)
    engine = _runtime("MpsEngine")(classifier, settings)
    _check_fit(classifier, preprocessing, class_names)
    return Runtime(classifier, engine, preprocessing, class_names)


def _demo_unless_model(options: RuntimeOptions) -> RuntimeOptions:
    if options.model is not None:
        return options
    return replace(
        options,
        model=demo.DEMO_MODEL,
        preprocessing=options.preprocessing or demo.DEMO_PREPROCESSING,
        classes=options.classes or demo.DEMO_CLASSES,
    )


def _preprocessing(options: RuntimeOptions) -> Preprocessing:
    preprocessing_type = _runtime("Preprocessing")
    path = options.preprocessing
    base = preprocessing_type.from_file(path).model_dump() if path else {}
    try:
        return preprocessing_type.model_validate({**base, **options.preprocessing_overrides()})
    except ValidationError as exc:
        raise ConfigError(
            describe_validation_error(exc, "invalid preprocessing settings")
        ) from None


def _engine_settings(options: RuntimeOptions) -> EngineSettings:
    path = options.engine_settings
    base = load_json(path, "engine settings") if path else {}
    if not isinstance(base, dict):
        raise ConfigError(f"engine settings file {path} must hold a JSON object")
    try:
        return EngineSettings.model_validate({**base, **options.engine_overrides()})
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "invalid engine settings")) from None


def _model_options(options: RuntimeOptions) -> ModelOptions:
    try:
        return ModelOptions(**options.model_options())
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "invalid model options")) from None


def _check_fit(
    classifier: MaskedClassifier, preprocessing: Preprocessing, class_names: list[str] | None
) -> None:
    """Per-channel values and class names must match the model."""
    spec = classifier.spec
    for name, values in (("mean", preprocessing.mean), ("std", preprocessing.std)):
        if values is not None and len(values) not in (1, spec.channels):
            raise ConfigError(
                f"{len(values)} {name} values given for a {spec.channels}-channel model"
            )
    if class_names is not None and spec.num_classes not in (0, len(class_names)):
        raise ConfigError(
            f"{len(class_names)} class names given, the model has {spec.num_classes} outputs"
        )


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
