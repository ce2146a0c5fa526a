"""PEM files of the TLS options, read with one clear error for both ends."""

from __future__ import annotations

import ssl
from pathlib import Path

from guard.errors import ConfigError


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of ``path``, or ``ConfigError`` naming ``what`` it should have been."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def check_server_files(cert: Path, key: Path, client_ca: Path | None) -> None:
    """``ConfigError`` naming the file and the problem when the server's certificate, key or
    client CA bundle is unusable: not PEM, or the key not the certificate's.

    gRPC reads them only when it binds the port, and then reports any problem as a failure to
    bind; Python's ``ssl`` (OpenSSL) reads them the same way beforehand.
    """
    for path, what in [(cert, "TLS certificate"), (client_ca, "client CA bundle")]:
        if path is None:
            continue
        read_pem(path, f"the {what}")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=path)
        except ssl.SSLError as exc:
            raise ConfigError(f"{what} {path} holds no PEM certificate{_reason(exc)}") from None
    read_pem(key, "the TLS key")

    def encrypted() -> bytes:
        raise ConfigError(f"TLS key {key} is encrypted; give the key without a passphrase")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=encrypted)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"TLS key {key} does not match {cert}") from None
        raise ConfigError(f"TLS key {key} holds no PEM private key{_reason(exc)}") from None


def _reason(error: ssl.SSLError) -> str:
    """OpenSSL's reason in brackets, where it gives one ("" where it says only "PEM lib")."""
    return f" ({error.reason.replace('_', ' ').lower()})" if error.reason else ""
