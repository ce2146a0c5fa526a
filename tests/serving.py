"""Helpers for the sidecar tests: a real server on a free loopback port, requests, scrapes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from guard import demo
from guard.service.settings import ServeSettings
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2 as pb
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from guard.transport.grpc.server import Sidecar

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def running_sidecar(**settings: Any) -> Iterator[Sidecar]:
    """An in-process sidecar on free loopback ports, stopped (and drained) on exit."""
    values = {
        "model": demo.DEMO_MODEL,
        "calibration": demo.DEMO_CALIBRATION,
        "host": LOOPBACK,
        "port": 0,
        "metrics_port": 0,
        "log_verdicts": True,
        **settings,
    }
    sidecar = Sidecar(ServeSettings(**values))
    sidecar.start()
    try:
        yield sidecar
    finally:
        sidecar.stop(grace=5)


def inference_stub(sidecar: Sidecar) -> pb_grpc.GRPCInferenceServiceStub:
    channel = grpc.insecure_channel(f"{LOOPBACK}:{sidecar.port}")
    return pb_grpc.GRPCInferenceServiceStub(channel)


def infer_request(
    model_name: str, input_name: str, images: np.ndarray, *, raw: bool = True, **fields: Any
) -> pb.ModelInferRequest:
    """A ModelInfer request carrying ``images`` as FP32, raw or as typed contents."""
    images = np.asarray(images, dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=input_name, datatype="FP32", shape=list(images.shape)
    )
    request = pb.ModelInferRequest(model_name=model_name, **fields)
    if raw:
        request.raw_input_contents.append(images.tobytes())
    else:
        tensor.contents.fp32_contents.extend(images.ravel().tolist())
    request.inputs.append(tensor)
    return request


def output_arrays(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "BOOL": np.bool_, "INT64": np.int64}
    return {
        meta.name: np.frombuffer(data, dtype=dtypes[meta.datatype]).reshape(list(meta.shape))
        for meta, data in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def parameters(response: pb.ModelInferResponse) -> dict[str, Any]:
    return {
        key: getattr(value, value.WhichOneof("parameter_choice"))
        for key, value in response.parameters.items()
    }


def scrape(metrics_port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of the /metrics page, parsed by prometheus-client's own parser:
    {sample name: {sorted label pairs: value}}."""
    url = f"http://{LOOPBACK}:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def value(samples: dict, name: str, default: float | None = None, **labels: str) -> float:
    """The sample ``name{labels}``; a missing one fails the test unless ``default`` is given."""
    found = samples.get(name, {}).get(tuple(sorted(labels.items())))
    if found is None:
        if default is None:
            raise AssertionError(
                f"no sample {name}{labels} (series: {sorted(samples.get(name, {}))})"
            )
        return default
    return found


def wait_for(condition: Any, timeout: float = 20.0, what: str = "condition") -> None:
    ends = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > ends:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def write_engine_settings(directory: Path, calibration: Path, **changes: Any) -> Path:
    """The calibration's engine settings with ``changes``, as a JSON file."""
    engine = json.loads(calibration.read_text())["engine"]
    path = directory / "engine.json"
    path.write_text(json.dumps({**engine, **changes}))
    return path


_SERVING = re.compile(r"guard: serving .* on .*:(\d+), metrics on :(\d+)/metrics")


class ServeProcess:
    """``guard serve`` as a child process on free ports (read from its start-up line)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "guard", "serve", "--host", LOOPBACK, *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self.port = self.metrics_port = 0
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            match = _SERVING.search(line)
            if match:
                self.port, self.metrics_port = int(match[1]), int(match[2])
                break
        if not self.port:
            self.process.wait(timeout=30)
            self.process.stderr.close()
            raise RuntimeError("guard serve did not start:\n" + "".join(self.lines))
        # Keep reading: a child whose stderr pipe fills up would block on its next log line.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        """Wait for the exit; the exit code and everything it wrote to stderr."""
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        self._close()
        return self.process.returncode, "".join(self.lines)

    def _close(self) -> None:
        if self.process.stderr is not None and not self._reader.is_alive():
            self.process.stderr.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
            self._reader.join(timeout=10)
        self._close()
