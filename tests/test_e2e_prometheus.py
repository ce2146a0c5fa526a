"""End to end: ``guard serve`` on the demo model and a real Prometheus (Debian's package)
scraping it over loopback every second, with deploy/prometheus's rules loaded. Traffic with
inputs the guard flags (blank images) drives the flag-rate alert and, being unlike the
calibration data, the exchangeability martingale's; everything is read back through
Prometheus's HTTP API.

The project's alerts wait minutes (``for:``) before firing, so they are checked as pending;
a copy of them with ``for: 2s`` (label copy="e2e") is loaded beside them to see them fire.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from guard import demo
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2 as pb
from tests.prometheus_tools import DEPLOY, prometheus_bin
from tests.serving import LOOPBACK, ServeProcess, infer_request, inference_stub
from tests.test_deploy import dashboard_queries

MODEL = "digits_cnn"
RULES = DEPLOY / "prometheus" / "rules.yaml"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
# Plain HTTP to loopback, never through a proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _short_for_copy(path: Path) -> dict[str, Any]:
    """The alerts of ``path`` with ``for: 2s`` and the label copy="e2e", in their own group."""
    groups = yaml.safe_load(path.read_text())["groups"]
    for group in groups:
        group["name"] += ".e2e"
        for rule in group["rules"]:
            rule["for"] = "2s"
            rule["labels"] = {**rule.get("labels", {}), "copy": "e2e"}
    return {"groups": groups}


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    ends = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > ends:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, endpoint: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with _HTTP.open(f"{self.url}/api/v1/{endpoint}{query}", timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def alerts(self, name: str, copy: bool = False) -> list[dict[str, Any]]:
        return [
            alert
            for alert in self.api("alerts")["alerts"]
            if alert["labels"]["alertname"] == name
            and (alert["labels"].get("copy") == "e2e") == copy
        ]

    def alert_state(self, name: str, copy: bool = False) -> str:
        states = {alert["state"] for alert in self.alerts(name, copy)}
        return "firing" if "firing" in states else "pending" if states else "inactive"


@pytest.fixture
def guard_serve() -> Iterator[ServeProcess]:
    server = ServeProcess("--port", "0", "--metrics-port", "0", env={"GUARD_LOG_VERDICTS": "0"})
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def prometheus(guard_serve: ServeProcess, tmp_path: Path) -> Iterator[Prometheus]:
    bin_dir = prometheus_bin()
    copies = tmp_path / "alerts-e2e.yaml"
    copies.write_text(yaml.safe_dump(_short_for_copy(ALERTS)))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES), str(ALERTS), str(copies)],
        "scrape_configs": [
            {
                "job_name": "guard",
                "static_configs": [{"targets": [f"{LOOPBACK}:{guard_serve.metrics_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                str(bin_dir / "prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--log.level=warn",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://{LOOPBACK}:{port}", process, log)
    try:

        def ready() -> bool:
            assert process.poll() is None, f"prometheus exited:\n{log.read_text()}"
            try:
                with _HTTP.open(f"{server.url}/-/ready", timeout=2) as answer:
                    return answer.status == 200
            except OSError:
                return False

        wait_until(ready, 30, "Prometheus to be ready")
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _blank_and_digits(rounds: int) -> Iterator[np.ndarray]:
    """Batches of 8 held-out digits (mostly passed) and 8 blank images (flagged)."""
    digits = np.load(demo.DEMO_HELDOUT, allow_pickle=False)["x"].astype(np.float32)
    blank = np.zeros((4, *digits.shape[1:]), np.float32)
    grey = np.full((4, *digits.shape[1:]), 0.5, np.float32)
    for i in range(rounds):
        yield np.concatenate([digits[8 * i : 8 * i + 8], blank, grey])


def test_guard_metrics_rules_and_alerts_in_a_real_prometheus(
    guard_serve: ServeProcess, prometheus: Prometheus
) -> None:
    started = time.monotonic()
    wait_until(
        lambda: prometheus.query('up{job="guard"} == 1'), 20, "the guard target to be scraped"
    )

    # Traffic until the short copy of the flag-rate alert fires (bounded).
    stub = inference_stub(guard_serve)
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10)
    input_name = metadata.inputs[0].name
    first_request = time.monotonic()
    fired_after = None
    for batch in _blank_and_digits(rounds=40):
        response = stub.ModelInfer(infer_request(MODEL, input_name, batch), timeout=30)
        assert response.model_name == MODEL
        if prometheus.alert_state("GuardFlagRateHigh", copy=True) == "firing":
            fired_after = time.monotonic() - first_request
            break
        time.sleep(0.5)
    assert fired_after is not None, "GuardFlagRateHigh (for: 2s copy) never fired"

    # Ingested: the guard's series, with the served model's facts.
    (info,) = prometheus.query(f'guard_model_info{{model="{MODEL}"}}')
    calibrated = json.loads(demo.DEMO_CALIBRATION.read_text())["detector"]["score"]["kind"]
    assert info["metric"]["score_kind"] == calibrated and info["metric"]["mode"] == "sync"
    assert info["metric"]["provider"].endswith("ExecutionProvider")
    checked = float(prometheus.query("sum(guard_checked_predictions_total)")[0]["value"][1])
    flagged = float(prometheus.query("sum(guard_flagged_predictions_total)")[0]["value"][1])
    assert checked >= 16 and flagged >= 8

    # Every rule evaluates without error, and the recording rules give the expected values.
    groups = prometheus.api("rules")["groups"]
    assert {g["name"] for g in groups} >= {"guard.recording", "guard.alerts"}
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))

    def recorded(expr: str) -> dict[str, float]:
        return {
            json.dumps(sample["metric"], sort_keys=True): float(sample["value"][1])
            for sample in prometheus.query(expr)
        }

    assert list(recorded("model:guard_calibration_alpha:max").values()) == [0.05]
    (flag_rate,) = recorded(f'model:guard_flag_rate:ratio10m{{model="{MODEL}"}}').values()
    assert 0.3 <= flag_rate <= 1.0, flag_rate
    assert len(recorded("model:guard_mps_area_fraction:quantile5m")) == 3
    assert len(recorded('model_stage:guard_stage_duration_seconds:quantile5m{stage="explain"}')) == 3  # fmt: skip
    assert list(recorded("model:guard_skipped_checks_unplanned:ratio_rate5m").values()) == [0.0]
    assert recorded('model_outcome:guard_requests:rate5m{outcome="ok"}')

    # The flag-rate alert: pending with the project's for: 10m, firing in the short copy,
    # with the description's value and the calibrated alpha filled in by a live query.
    assert prometheus.alert_state("GuardFlagRateHigh") == "pending"
    (alert,) = prometheus.alerts("GuardFlagRateHigh", copy=True)
    assert alert["labels"]["model"] == MODEL and alert["labels"]["severity"] == "page"
    assert "false-alarm rate of 5%" in alert["annotations"]["description"]
    for quiet in ("GuardErrorRatioHigh", "GuardChecksSkipped", "GuardTargetDown"):
        assert prometheus.alert_state(quiet, copy=True) == "inactive", quiet

    # Half the traffic is blank: not exchangeable with the calibration data. The martingale
    # passes 1/delta = 20 and the exchangeability alert fires (it reads the maximum of the
    # last 6 hours, with no for:, so the project's rule and its copy agree).
    wait_until(
        lambda: prometheus.alert_state("GuardCalibrationNotExchangeable", copy=True) == "firing",
        20,
        "GuardCalibrationNotExchangeable (for: 2s copy) to fire",
    )
    (martingale,) = recorded(f'model:guard_calibration_martingale:avg{{model="{MODEL}"}}').values()
    assert martingale >= 20
    assert prometheus.alert_state("GuardCalibrationNotExchangeable") == "firing"
    (alert,) = prometheus.alerts("GuardCalibrationNotExchangeable", copy=True)
    assert "false-alarm guarantee no longer holds" in alert["annotations"]["description"]

    # Every dashboard query runs on the real series and shows data.
    for panel, expr in dashboard_queries().items():
        assert prometheus.query(expr), f"{panel} shows no data: {expr}"

    # The containers' health probe sees the sidecar serving.
    probe = subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--address", f"{LOOPBACK}:{guard_serve.port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "serving", probe.stderr

    # SIGTERM: the sidecar drains and exits 0; the target goes down and the alert follows.
    guard_serve.process.send_signal(signal.SIGTERM)
    code, log = guard_serve.finish(timeout=40)
    assert code == 0, log
    wait_until(
        lambda: prometheus.alert_state("GuardTargetDown", copy=True) == "firing",
        20,
        "GuardTargetDown to fire after the sidecar stopped",
    )
    assert prometheus.alert_state("GuardTargetDown") == "pending"
    print(
        f"\ne2e: GuardFlagRateHigh (for: 2s) firing {fired_after:.1f} s after the first "
        f"request; whole run {time.monotonic() - started:.1f} s; flag rate {flag_rate:.2f}; "
        f"martingale {martingale:.3g}"
    )
