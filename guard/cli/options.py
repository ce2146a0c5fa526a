"""Options declared once.

``RuntimeOptions`` holds the model, preprocessing and engine options of every command that runs
a model; ``with_runtime_options`` puts them into a command's signature. ``settings_options``
makes a command's options from a settings class (one per field, help and default from the field).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from rich.markup import escape

from guard.errors import ConfigError
from guard.settings import FAST_PRESET, EngineSettings

Option = typer.Option
Command = Callable[..., None]


def _described(model: type[BaseModel], name: str) -> str:
    """A field's description as help text (escaped: help is rendered as rich markup)."""
    return escape(model.model_fields[name].description or "")


def _choices(annotation: Any) -> str:
    return "[" + "|".join(str(value) for value in typing.get_args(annotation)) + "]"


# Options that calibrate and audit share besides the runtime's.
DATA_HELP = "ImageFolder directory, path,label CSV, or .npz with x and y"
BatchItemsOpt = Annotated[int, Option(help="images explained together (share model calls)")]


@dataclass(frozen=True)
class RuntimeOptions:
    """The model, preprocessing and engine options as given (None: not given, so a settings
    file's value or the default applies). Each field is one option of every command that runs
    a model; field order is help order."""

    # The model and how to read it.
    model: Annotated[
        Path | None, Option(help="ONNX classifier (default: the bundled demo model)")
    ] = None
    preprocessing: Annotated[Path | None, Option(help="JSON preprocessing settings")] = None
    scale: Annotated[float | None, Option(help="multiplies 8-bit pixels (default 1/255)")] = None
    mean: Annotated[
        str | None, Option(help="per-channel mean after scaling, e.g. 0.485,0.456,0.406")
    ] = None
    std: Annotated[str | None, Option(help="per-channel std after scaling")] = None
    color_mode: Annotated[str | None, Option(help="decode images as L, RGB or RGBA")] = None
    resize: Annotated[str | None, Option(help="nearest, bilinear or bicubic")] = None
    resize_shorter: Annotated[
        int | None,
        Option(help="first resize the shorter side to N pixels, keeping the aspect ratio "
               "(ImageNet: 256 for a 224 model), then cut the centre"),
    ] = None  # fmt: skip
    center_crop: Annotated[
        str | None,
        Option(metavar="HxW", help="cut HxW pixels (or N: NxN) from the centre, after "
               "--resize-shorter (default there: the model's input size)"),
    ] = None  # fmt: skip
    layout: Annotated[str, Option(help="auto, NCHW or NHWC")] = "auto"
    height: Annotated[
        int | None, Option(help="input height where the model leaves it dynamic")
    ] = None  # fmt: skip
    width: Annotated[
        int | None, Option(help="input width where the model leaves it dynamic")
    ] = None  # fmt: skip
    output: Annotated[str | None, Option(help="model output to read (default: the first)")] = None
    output_kind: Annotated[str, Option(help="auto, logits or probabilities")] = "auto"
    provider: Annotated[str, Option(help="auto (CUDA when available), cpu or cuda")] = "auto"
    # The engine.
    engine_settings: Annotated[Path | None, Option(help="JSON engine settings")] = None
    fast: Annotated[
        bool | None,
        Option("--fast", help="the fast preset: "
               + ", ".join(f"{k} {v}" for k, v in FAST_PRESET.items())
               + " (at most 15% of the default's model evaluations per MPS); other options "
               "given still apply"),
    ] = None  # fmt: skip
    iters: Annotated[int | None, Option(help="responsibility runs (default 20)")] = None
    seed: Annotated[int | None, Option(help="seed shared by every image (default 0)")] = None
    tree_depth: Annotated[int | None, Option(help="default 10")] = None
    min_box_size: Annotated[int | None, Option(help="default 10 pixels")] = None
    chunk_size: Annotated[int | None, Option(help="default 10 pixels")] = None
    baseline: Annotated[str | None, Option(help="0, per-channel 'a,b,c', or blur[:SIGMA]")] = None
    combination: Annotated[str | None, Option(help="multiplicative or additive")] = None
    max_batch_size: Annotated[int | None, Option(help="most mutants per model call (512)")] = None
    empty_mps: Annotated[
        bool | None, Option("--empty-mps", help=_described(EngineSettings, "empty_mps"))
    ] = None
    random_stream: Annotated[
        str | None,
        Option(
            metavar=_choices(EngineSettings.model_fields["random_stream"].annotation),
            help=_described(EngineSettings, "random_stream"),
        ),
    ] = None
    # What the model's outputs are called.
    classes: Annotated[Path | None, Option(help="class names: JSON list or one per line")] = None

    def engine_overrides(self) -> dict[str, Any]:
        """The engine options given, by EngineSettings field (``--fast``: the preset's, under
        the options given one by one)."""
        preset = FAST_PRESET if self.fast else {}
        return {**preset, **self._given(*ENGINE_OPTIONS)}

    def preprocessing_overrides(self) -> dict[str, Any]:
        """The preprocessing options given, by Preprocessing field."""
        lists = {"mean": floats(self.mean), "std": floats(self.std)}
        given = {name: value for name, value in lists.items() if value is not None}
        if self.center_crop is not None:
            given["center_crop"] = crop_size(self.center_crop)
        return {**self._given("scale", "color_mode", "resize", "resize_shorter"), **given}

    def model_options(self) -> dict[str, Any]:
        """How to read the model, by ModelOptions field."""
        return {name: getattr(self, name) for name in MODEL_OPTIONS}

    def _given(self, *names: str) -> dict[str, Any]:
        return {name: value for name in names if (value := getattr(self, name)) is not None}


ENGINE_OPTIONS = ("iters", "seed", "tree_depth", "min_box_size", "chunk_size", "baseline",
                  "combination", "max_batch_size", "empty_mps", "random_stream")  # fmt: skip
MODEL_OPTIONS = ("layout", "height", "width", "output", "output_kind", "provider")


def crop_size(text: str) -> tuple[int, int]:
    """``HxW`` (or ``N`` for NxN) as (height, width)."""
    parts = text.lower().split("x")
    try:
        sizes = tuple(int(part) for part in parts)
    except ValueError:
        sizes = ()
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise ConfigError(f"--center-crop {text!r}: expected HxW (e.g. 224x224) or N, positive")
    return sizes[0], sizes[1]


def floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"{text!r} is not a comma-separated list of numbers") from exc


def with_runtime_options(*, exclude: tuple[str, ...] = ()) -> Callable[[Command], Command]:
    """Give a command every ``RuntimeOptions`` option (but ``exclude``) in place of its
    parameter annotated ``RuntimeOptions``, which receives them as one object."""

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        [slot] = [p for p in signature.parameters.values() if p.annotation is RuntimeOptions]
        hints = typing.get_type_hints(RuntimeOptions, include_extras=True)
        shared = [f for f in dataclasses.fields(RuntimeOptions) if f.name not in exclude]
        expanded = [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                              annotation=hints[f.name])
            for f in shared
        ]  # fmt: skip

        @functools.wraps(command)
        def run(**kwargs: Any) -> None:
            given = {f.name: kwargs.pop(f.name) for f in shared if f.name in kwargs}
            command(**kwargs, **{slot.name: RuntimeOptions(**given)})

        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():  # keyword-only: any order of defaults
            own = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)]
            parameters.extend(expanded if parameter is slot else own)
        _set_signature(run, parameters)
        return run

    return decorate


def settings_options(settings: type[BaseModel]) -> Callable[[Command], Command]:
    """Give a command one option per field of ``settings``: ``--field-name`` (``--x/--no-x``
    for a flag), of the field's type, with its description as help and its default as the
    default shown. The command receives the options given on the command line, and only those,
    as a dict: what is not given is left to the settings class (environment, default)."""

    def decorate(command: Command) -> Command:
        parameters = [
            _settings_parameter(name, field) for name, field in settings.model_fields.items()
        ]
        if any(p.name == "ctx" for p in parameters):
            raise TypeError(
                f"{settings.__name__} has a field 'ctx', the name of the command context"
            )

        @functools.wraps(command)
        def run(ctx: typer.Context, **options: Any) -> None:
            command(_from_command_line(ctx, options))

        context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        _set_signature(run, [context, *parameters])
        return run

    return decorate


def _settings_parameter(name: str, field: Any) -> inspect.Parameter:
    """One option of a pydantic field."""
    value_type, metavar = _option_type(field.annotation)
    flag = "--" + name.replace("_", "-")
    declaration = f"{flag}/--no-{flag[2:]}" if value_type is bool else flag
    default = field.get_default(call_default_factory=True)
    if default is PydanticUndefined:
        default = None
    if default is None:
        value_type = value_type | None
    option = Option(declaration, metavar=metavar, help=escape(field.description or ""))
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[value_type, option],
    )


def _option_type(annotation: Any) -> tuple[Any, str | None]:
    """The type an option parses a field's annotation as, and a metavar for a choice.

    A choice (``Literal``) is parsed as text and validated by the settings class, so that a
    wrong value is reported like any other invalid setting."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else str
    if typing.get_origin(annotation) is Literal:
        return str, _choices(annotation)
    return (annotation, None) if annotation in (bool, int, float, str, Path) else (str, None)


def _from_command_line(ctx: typer.Context, options: dict[str, Any]) -> dict[str, Any]:
    sources = {name: ctx.get_parameter_source(name) for name in options}
    return {
        name: value
        for name, value in options.items()
        if sources[name] is not None and sources[name].name != "DEFAULT"
    }


def _set_signature(function: Callable[..., Any], parameters: list[inspect.Parameter]) -> None:
    """What typer reads a command's options from: its signature and annotations."""
    function.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    function.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
