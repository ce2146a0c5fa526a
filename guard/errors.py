"""One error hierarchy for the whole guard.

Transports map these to their own vocabulary in one place each (CLI exit codes in
``guard.cli.common``, gRPC status codes in ``guard.transport.grpc.status``); anything that
is not a ``GuardError`` is an internal fault.
"""

from __future__ import annotations


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
