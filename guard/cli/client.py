"""``guard client``: ask a running sidecar for the verdict on image files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from guard.cli.common import EXIT_INPUT_ERRORS, out_console, print_error
from guard.numbers import number, p_value

if TYPE_CHECKING:  # grpc loads when the command runs, not for --help
    from guard.transport.grpc.client import GuardClient

Opt = typer.Option


def client(
    images: Annotated[list[Path], typer.Argument(help="image files (PNG, JPEG, ...)")],
    server: Annotated[str, Opt(help="sidecar address host:port")] = "localhost:50051",
    model_name: Annotated[str, Opt(help="served model (default: the server's)")] = "",
    as_json: Annotated[bool, Opt("--json", help="one JSON object per image")] = False,
    timeout: Annotated[float, Opt(help="seconds to wait per image")] = 60.0,
    tls_ca: Annotated[Path | None, Opt(help="PEM CA bundle: connect with TLS")] = None,
    tls_cert: Annotated[Path | None, Opt(help="client certificate (mutual TLS)")] = None,
    tls_key: Annotated[Path | None, Opt(help="client key (mutual TLS)")] = None,
) -> None:
    """Send each image to a running ``guard serve`` and print its verdict."""
    from guard.transport.grpc.client import GuardClient, channel

    target = channel(server, tls_ca=tls_ca, client_cert=tls_cert, client_key=tls_key)
    with GuardClient(target, timeout=timeout) as guard:
        answered = [_ask(guard, path, model_name, as_json=as_json) for path in images]
    if not all(answered):
        raise typer.Exit(EXIT_INPUT_ERRORS)


def _ask(guard: GuardClient, path: Path, model_name: str, *, as_json: bool) -> bool:
    """Print one image's verdict, or report why there is none; whether there is one."""
    import grpc  # only when asking

    try:
        answer = guard.explain(path.read_bytes(), model_name=model_name)
    except OSError as exc:
        print_error(f"{path}: {exc.strerror or exc}")
        return False
    except grpc.RpcError as exc:
        print_error(f"{path}: {exc.code().name}: {exc.details()}")
        return False
    if as_json:
        print(json.dumps({"path": str(path), **_record(answer)}))
    else:
        _print_verdict(path, answer)
    return True


def _print_verdict(path: Path, answer: Any) -> None:
    name = f" {answer.predicted_name!r}" if answer.predicted_name else ""
    verdict = f"FLAGGED ({answer.reason})" if answer.flagged else "ok"
    out_console.print(
        f"{path}: class {answer.predicted_class}{name}, confidence "
        f"{number(answer.confidence)}, MPS {number(100 * answer.mps_area_fraction, 1)}% "
        f"of the pixels, score {number(answer.score)}, p-value {p_value(answer.p_value)}: "
        f"{verdict}",
        highlight=False,
        soft_wrap=True,
    )


def _record(answer: Any) -> dict[str, Any]:
    """The response as JSON values; 64-bit integers as numbers, not the protobuf mapping's
    strings."""
    from google.protobuf.descriptor import FieldDescriptor
    from google.protobuf.json_format import MessageToDict

    record = MessageToDict(
        answer, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    wide = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
    for field in answer.DESCRIPTOR.fields:
        if field.cpp_type in wide and field.label != FieldDescriptor.LABEL_REPEATED:
            record[field.name] = getattr(answer, field.name)
    return record
