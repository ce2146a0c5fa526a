"""``guard serve``: the gRPC sidecar, until SIGTERM (or Ctrl-C) drains and stops it."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from guard import demo
from guard.errors import ConfigError
from guard.service.settings import ServeSettings

Opt = typer.Option
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def serve(
    model: Annotated[Path | None, Opt(help="ONNX classifier (default: the bundled demo)")] = None,
    calibration: Annotated[
        Path | None, Opt(help="calibration JSON from guard calibrate (needed with --model)")
    ] = None,
    model_name: Annotated[str | None, Opt(help="name clients use (default: file stem)")] = None,
    host: Annotated[str | None, Opt(help="bind address [0.0.0.0]")] = None,
    port: Annotated[int | None, Opt(help="gRPC port; 0 picks a free one [50051]")] = None,
    metrics_port: Annotated[int | None, Opt(help="Prometheus /metrics port [9464]")] = None,
    mode: Annotated[str | None, Opt(help="sync (verdict in the response) or async [sync]")] = None,
    sample_rate: Annotated[float | None, Opt(help="share of items checked, 0-1 [1]")] = None,
    queue_size: Annotated[int | None, Opt(help="background queue of async mode [256]")] = None,
    share_model_calls: Annotated[
        bool | None, Opt(help="concurrent requests share model calls [on CUDA only]")
    ] = None,
    batch_wait_ms: Annotated[float | None, Opt(help="longest wait to share a batch [2]")] = None,
    max_batch_items: Annotated[int | None, Opt(help="most items explained together [32]")] = None,
    explain_workers: Annotated[
        int | None, Opt(help="MPSs computed at once (shared batches or own requests) [2]")
    ] = None,
    max_concurrency: Annotated[
        int | None, Opt(help="requests at once; more get RESOURCE_EXHAUSTED [64]")
    ] = None,
    max_request_items: Annotated[int | None, Opt(help="most items per request [64]")] = None,
    max_message_bytes: Annotated[int | None, Opt(help="largest message [16 MiB]")] = None,
    grace_seconds: Annotated[float | None, Opt(help="drain time on SIGTERM [30]")] = None,
    drift_window: Annotated[int | None, Opt(help="recent areas compared for drift [500]")] = None,
    engine_settings: Annotated[
        Path | None, Opt(help="JSON engine settings instead of the calibration's")
    ] = None,
    allow_engine_mismatch: Annotated[
        bool | None, Opt(help="accept engine settings that differ from the calibration's")
    ] = None,
    allow_model_mismatch: Annotated[
        bool | None, Opt(help="accept a model whose sha256 differs from the calibration's")
    ] = None,
    provider: Annotated[str | None, Opt(help="auto, cpu or cuda [auto]")] = None,
    tls_cert: Annotated[Path | None, Opt(help="PEM certificate chain: serve TLS")] = None,
    tls_key: Annotated[Path | None, Opt(help="PEM private key of --tls-cert")] = None,
    tls_client_ca: Annotated[
        Path | None, Opt(help="PEM CA bundle: require client certificates (mutual TLS)")
    ] = None,
    log_level: Annotated[str | None, Opt(help="debug, info, warning or error [info]")] = None,
    log_verdicts: Annotated[bool | None, Opt(help="a JSON log line per verdict [yes]")] = None,
) -> None:
    """Serve a guarded classifier over gRPC (Open Inference Protocol and guard.v1), with
    Prometheus metrics. Every option can also be set as GUARD_<OPTION> in the environment."""
    given = {k: v for k, v in locals().items() if v is not None}
    # The stop signals are blocked in this thread and every thread started from here on, and
    # taken by sigwait below: one arriving during start-up waits for it, none interrupts a
    # thread holding a lock.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    from guard.transport.grpc.server import Sidecar  # grpc is imported only to serve

    settings = _settings(given)
    _configure_logging(settings.log_level)
    sidecar = Sidecar(settings)
    sidecar.start()
    print(
        f"guard: serving {', '.join(m.name for m in sidecar.models)} on "
        f"{settings.host}:{sidecar.port}, metrics on :{sidecar.metrics_port}/metrics",
        file=sys.stderr,
        flush=True,
    )
    received = signal.sigwait(_STOP_SIGNALS)
    for signum in _STOP_SIGNALS:  # a second signal ends the process at once
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    logging.getLogger(__name__).info(
        "%s: draining in-flight requests (up to %.0f s)",
        signal.Signals(received).name,
        settings.grace_seconds,
    )
    sidecar.stop()


def _settings(given: dict[str, Any]) -> ServeSettings:
    try:
        settings = ServeSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid serve settings: {problems}") from None
    if settings.model is None:  # neither flag nor environment: the bundled demo
        calibration = settings.calibration or demo.DEMO_CALIBRATION
        return settings.model_copy(update={"model": demo.DEMO_MODEL, "calibration": calibration})
    return settings


def _configure_logging(level: str) -> None:
    """Plain log lines on stderr; verdicts as bare JSON objects, one per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    verdicts = logging.getLogger("guard.verdicts")
    json_handler = logging.StreamHandler(sys.stderr)
    json_handler.setFormatter(logging.Formatter("%(message)s"))
    verdicts.handlers[:] = [json_handler]
    verdicts.propagate = False
    verdicts.setLevel(logging.INFO)  # --no-log-verdicts turns them off, not the log level
