"""``guard serve`` as a process: settings from flags and environment, start-up failures, TLS,
and SIGTERM draining in-flight requests."""

from __future__ import annotations

import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard import demo
from guard.cli.serve import _settings
from guard.errors import ConfigError
from guard.transport.grpc.client import GuardClient, channel
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2 as pb
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.certs import make_pki
from tests.fixtures.models import nhwc_model
from tests.serving import (
    LOOPBACK,
    ServeProcess,
    running_sidecar,
    scrape,
    value,
    wait_for,
    write_engine_settings,
)

ZERO = np.zeros((1, 32, 32), np.float32)


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARD_PORT", "7000")
    monkeypatch.setenv("GUARD_MODE", "async")
    monkeypatch.setenv("GUARD_SAMPLE_RATE", "0.25")
    settings = _settings({"port": 7001})
    assert (settings.port, settings.mode, settings.sample_rate) == (7001, "async", 0.25)
    monkeypatch.setenv("GUARD_MODE", "sometimes")
    with pytest.raises(ConfigError, match="mode"):
        _settings({})


def test_serves_under_the_name_from_the_environment() -> None:
    server = ServeProcess("--port", "0", "--metrics-port", "0", env={"GUARD_MODEL_NAME": "digits"})
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"{LOOPBACK}:{server.port}"))
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name="digits")).name == "digits"
    finally:
        server.process.send_signal(signal.SIGTERM)
        code, _ = server.finish()
    assert code == 0


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("broken")
    corrupt = directory / "corrupt.json"
    corrupt.write_text("{not json")
    return {
        "corrupt": corrupt,
        "other_model": nhwc_model(directory),
        "missing": directory / "missing.onnx",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{missing}", "--calibration", "{demo_calibration}"], "cannot read model file"),
        (["--calibration", "{corrupt}"], "is not valid JSON"),
        (["--model", "{other_model}"], "a calibration is required with a model"),
        (["--model", "{other_model}", "--calibration", "{demo_calibration}"], "sha256"),
        (["--mode", "sometimes"], "mode: must be one of 'sync' or 'async' (got 'sometimes')"),
        (["--port", "{busy_port}"], "cannot listen on"),
        (["--tls-cert", "{demo_calibration}"], "tls_cert and tls_key go together"),
    ],
    ids=[
        "missing model",
        "corrupt calibration",
        "no calibration",
        "model mismatch",
        "bad mode",
        "port in use",
        "half TLS",
    ],  # fmt: skip
)
def test_a_bad_start_stops_with_one_clear_message(
    broken_files: dict[str, Path], args: list[str], message: str
) -> None:
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        values = {
            **{k: str(v) for k, v in broken_files.items()},
            "demo_calibration": str(demo.DEMO_CALIBRATION),
            "busy_port": str(busy.getsockname()[1]),
        }
        run = subprocess.run(
            [sys.executable, "-m", "guard", "serve", "--host", LOOPBACK, "--metrics-port", "0",
             *(a.format(**values) for a in args)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert message in run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.count("error:") == 1


def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path: Path) -> None:
    slow = write_engine_settings(tmp_path, demo.DEMO_CALIBRATION, iters=300)
    server = ServeProcess(
        "--port", "0", "--metrics-port", "0", "--engine-settings", str(slow),
        "--allow-engine-mismatch", "--share-model-calls", "--grace-seconds", "60",
    )  # fmt: skip
    try:
        answers: list[object] = []
        with GuardClient(f"{LOOPBACK}:{server.port}") as client:
            barrier = threading.Barrier(4)

            def ask(i: int) -> object:
                barrier.wait()
                return client.explain(ZERO + i / 10)

            with ThreadPoolExecutor(4) as pool:
                pending = [pool.submit(ask, i) for i in range(4)]
                wait_for(
                    lambda: value(scrape(server.metrics_port), "guard_in_flight_requests") >= 4,
                    what="four requests in flight",
                )
                server.process.send_signal(signal.SIGTERM)
                answers = [p.result(timeout=120) for p in pending]
        assert all(a.model_evaluations > 0 for a in answers)  # type: ignore[attr-defined]
        code, log = server.finish()
    finally:
        server.kill()
    assert code == 0, log
    assert "SIGTERM: draining in-flight requests" in log and "stopped" in log
    # The requests were still running when the signal came: their verdicts follow it.
    draining = log.index("draining in-flight requests")
    assert log.count('"event": "verdict"', draining) == 4, log


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with running_sidecar(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    ) as sidecar:
        target = f"localhost:{sidecar.port}"
        trusted = channel(
            target, tls_ca=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key
        )
        health = health_pb2_grpc.HealthStub(trusted)
        assert health.Check(health_pb2.HealthCheckRequest()).status == 1  # SERVING
        with GuardClient(trusted) as client:  # closes the channel
            assert client.explain(ZERO).model_evaluations > 0
        for untrusted in (
            channel(target, tls_ca=pki.ca),  # no client certificate
            grpc.insecure_channel(target),  # no TLS at all
        ):
            with (
                GuardClient(untrusted, timeout=10) as client,
                pytest.raises(grpc.RpcError) as error,
            ):
                client.explain(ZERO)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    with running_sidecar(tls_cert=pki.server_cert, tls_key=pki.server_key) as sidecar:
        with GuardClient(channel(f"localhost:{sidecar.port}", tls_ca=pki.ca)) as client:
            assert client.explain(ZERO).model_evaluations > 0
