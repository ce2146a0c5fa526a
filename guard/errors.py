"""One error hierarchy for the whole guard.

Transports map these to their own vocabulary in one place each (CLI exit codes in
``guard.cli.common``, gRPC status codes in ``guard.transport.grpc.status``); anything that
is not a ``GuardError`` is an internal fault.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


class GuardError(Exception):
    """Base of every error the guard raises on purpose; the message is meant for users."""


class ModelLoadError(GuardError):
    """The model file is missing, unreadable or not valid ONNX."""


class UnsupportedModelError(GuardError):
    """The model is valid ONNX but not a single-image-input classifier the guard can drive."""


class InvalidInputError(GuardError):
    """An input has the wrong shape, non-finite values, or cannot be decoded."""


class ConfigError(GuardError):
    """A setting or settings file is invalid."""


class ModelRuntimeError(GuardError):
    """onnxruntime failed while running the model (after it loaded)."""


class UnknownModelError(GuardError):
    """A request names a model (or version) this server does not serve."""


class OverloadedError(GuardError):
    """The server is at its limit of concurrent requests; the client may retry later."""


class DeadlineExceededError(GuardError):
    """The client's deadline passed before the work was done."""


class UnavailableError(GuardError):
    """The server is shutting down; the client may retry (on another replica)."""


class RequestCancelledError(GuardError):
    """The client cancelled the request (or went away): the work for it stopped."""


class NonFiniteOutputError(InvalidInputError):
    """The model produced NaN or Inf outputs for an input (an input it cannot handle).

    An ``InvalidInputError``, so transports answer it as they answer any bad input (gRPC:
    INVALID_ARGUMENT) and offline runs skip and list the item; its own class lets the service
    count it under its own outcome.
    """

    MESSAGE = "the model produced non-finite outputs for this input"

    def __init__(self, message: str = MESSAGE) -> None:
        super().__init__(message)


def describe_validation_error(exc: ValidationError, what: str) -> str:
    """One line naming each bad field and what it must be, e.g.
    ``engine settings: iters: must be >= 1 (got 0)``, instead of pydantic's multi-line dump."""
    parts = []
    for error in exc.errors(include_url=False):
        where = _location(error.get("loc", ()))
        problem = _problem(error)
        if where and error.get("type") != "missing":
            problem += f" (got {_shown(error.get('input'))})"
        parts.append(f"{where}: {problem}" if where else problem)
    return f"{what}: " + "; ".join(parts) if parts else f"{what}: invalid"


_CONSTRAINTS = {
    "greater_than": ("must be > {gt}", "gt"),
    "greater_than_equal": ("must be >= {ge}", "ge"),
    "less_than": ("must be < {lt}", "lt"),
    "less_than_equal": ("must be <= {le}", "le"),
    "too_short": ("must have at least {min_length} item(s)", "min_length"),
    "too_long": ("must have at most {max_length} item(s)", "max_length"),
    "literal_error": ("must be one of {expected}", "expected"),
    "enum": ("must be one of {expected}", "expected"),
}
_KINDS = {
    "finite_number": "must be a finite number",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "extra_forbidden": "unknown setting",
    "missing": "is required",
}


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _problem(error: Any) -> str:
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    if kind in _CONSTRAINTS and _CONSTRAINTS[kind][1] in ctx:
        template, name = _CONSTRAINTS[kind]
        return template.format(**{name: ctx[name]})
    if kind in _KINDS:
        return _KINDS[kind]
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        message = str(ctx["error"])
    else:
        message = str(error.get("msg", "invalid"))
    message = " ".join(message.split())  # one line
    return message[:1].lower() + message[1:]


def _shown(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."
