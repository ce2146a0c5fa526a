"""PEM files of the TLS options, read with one clear error for both ends."""

from __future__ import annotations

from pathlib import Path

from guard.errors import ConfigError


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of ``path``, or ``ConfigError`` naming ``what`` it should have been."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
