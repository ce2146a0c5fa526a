"""``guard serve``: the gRPC sidecar, until SIGTERM (or Ctrl-C) drains and stops it."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from pydantic import ValidationError

from guard import demo
from guard.cli.options import settings_options
from guard.errors import ConfigError, describe_validation_error
from guard.service.settings import ServeSettings

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@settings_options(ServeSettings)
def serve(given: dict[str, Any]) -> None:
    """Serve a guarded classifier over gRPC (Open Inference Protocol and guard.v1), with
    Prometheus metrics. Every option can also be set as GUARD_<OPTION> in the environment."""
    _serve(_settings(given))


def _serve(settings: ServeSettings) -> None:
    """Start the sidecar, wait for a stop signal, drain."""
    # The stop signals are blocked in this thread and every thread started from here on, and
    # taken by sigwait below: one arriving during start-up waits for it, none interrupts a
    # thread holding a lock.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    from guard.transport.grpc.server import Sidecar  # grpc is imported only to serve

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
    """The settings from the options given, then the environment (GUARD_*), then the defaults;
    the bundled demo when none names a model."""
    try:
        settings = ServeSettings(**given)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "invalid serve settings")) from None
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
