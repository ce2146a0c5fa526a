"""Hardening of the sidecar: decoded-image memory and the pixel budget, model outputs that
overflow, bounded echoes of client values, cancellation, TLS files checked before binding,
background work in progress, and verdicts readable by a client built from the official Open
Inference Protocol (the stock ``kserve`` client)."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from guard import demo
from guard.errors import NonFiniteOutputError
from guard.runtime import MaskedClassifier
from guard.service.limits import MAX_REQUEST_ID_CHARS, shown
from guard.transport.grpc.client import GuardClient
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2 as pb
from guard.transport.grpc.server import Sidecar
from tests.certs import make_pki
from tests.serving import (
    LOOPBACK,
    ServeProcess,
    infer_request,
    inference_stub,
    output_arrays,
    parameters,
    running_sidecar,
    scrape,
    value,
    wait_for,
    write_engine_settings,
)

MODEL = "digits_cnn"
INPUT = "image"
LOGITS = "logits"


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A large image that is small when encoded: a few shapes on a plain background."""
    image = Image.new(mode, (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill="black")
    draw.rectangle((0, 0, width // 8, height // 8), fill="grey")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _small_png() -> bytes:
    return (demo.DEMO_IMAGES / "digit3_45.png").read_bytes()


@pytest.fixture(scope="module")
def sidecar() -> Iterator[Sidecar]:
    with running_sidecar() as server:
        yield server


@pytest.fixture(scope="module")
def stub(sidecar: Sidecar):
    return inference_stub(sidecar)


def _requests(sidecar: Sidecar, rpc: str, outcome: str, model: str = MODEL) -> float:
    return value(
        scrape(sidecar.metrics_port),
        "guard_requests_total",
        0.0,
        model=model,
        rpc=rpc,
        outcome=outcome,
    )


# --- 1. decoded-image memory -----------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _burst(port: int, image: bytes, count: int = 8) -> list[object]:
    with GuardClient(f"{LOOPBACK}:{port}", timeout=120) as client:
        barrier = threading.Barrier(count)

        def ask(_: int) -> object:
            barrier.wait()
            return client.explain(image)

        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(ask, range(count)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_a_burst_of_large_images_returns_its_memory() -> None:
    large = _png(4000, 4000)  # 16 Mpx, under the limit; about 70 KB as PNG
    assert len(large) < 500_000
    server = ServeProcess("--port", "0", "--metrics-port", "0", "--no-log-verdicts")
    try:
        pid = server.process.pid
        for _ in range(2):  # the model runtime's arenas grow to the bound of concurrent MPSs
            _burst(server.port, _small_png())
        before = _rss_mb(pid)
        after = []
        for _ in range(3):  # what one burst leaves behind, the next need not reuse
            answers = _burst(server.port, large)
            assert all(a.model_evaluations > 0 for a in answers)  # type: ignore[attr-defined]
            after.append(_rss_mb(pid))
    finally:
        server.process.send_signal(signal.SIGTERM)
        code, log = server.finish()
    assert code == 0, log
    print(f"RSS before {before:.0f} MB, after each burst {[round(a) for a in after]} MB")
    assert max(after) - before < 50, (before, after)


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(sidecar: Sidecar) -> None:
    huge = _png(9000, 9000, "L")
    assert len(huge) < 1_000_000
    with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
        with pytest.raises(grpc.RpcError) as error:
            client.explain(huge)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = error.value.details()
    assert "9000x9000" in message and f"{4096 * 4096}" in message
    assert "--max-image-pixels" in message


def test_the_pixel_limit_is_a_setting() -> None:
    with running_sidecar(max_image_pixels=32 * 32) as server:
        with GuardClient(f"{LOOPBACK}:{server.port}") as client:
            assert client.explain(_png(32, 32)).model_evaluations > 0
            with pytest.raises(grpc.RpcError) as error:
                client.explain(_png(33, 32))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the limit is 1024 pixels" in error.value.details()


def test_decoding_is_bounded_by_the_explain_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from guard.service import guarded_model

    running, most = [0], [0]
    lock = threading.Lock()
    decode = guarded_model.GuardedModel.decode

    def counting(self, data: bytes, **kwargs):  # noqa: ANN001, ANN003, ANN202
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.2)
            return decode(self, data, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(guarded_model.GuardedModel, "decode", counting)
    with running_sidecar(explain_workers=2) as server:
        _burst(server.port, _small_png(), count=6)
    assert most[0] == 2


# --- 2. model outputs that overflow ----------------------------------------------------------


def _overflowing(pixel: tuple[int, int] | None) -> np.ndarray:
    x = np.zeros((1, 1, 32, 32), np.float32)
    if pixel is None:
        x[:] = 1e38
    else:
        x[0, 0, pixel[0], pixel[1]] = 1e38
    return x


def test_the_classifier_refuses_non_finite_outputs(demo_classifier: MaskedClassifier) -> None:
    with pytest.raises(NonFiniteOutputError, match="non-finite outputs"):
        demo_classifier.predict(_overflowing(None))
    fine = demo_classifier.predict(np.zeros((1, 1, 32, 32), np.float32))
    assert np.isfinite(fine.scores).all()


def test_outputs_that_overflow_are_refused_and_counted(
    sidecar: Sidecar, stub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="guard.verdicts")
    before = _requests(sidecar, "ModelInfer", "non_finite_output")
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(infer_request(MODEL, INPUT, _overflowing(None)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == NonFiniteOutputError.MESSAGE
    assert _requests(sidecar, "ModelInfer", "non_finite_output") == before + 1
    with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
        with pytest.raises(grpc.RpcError) as error:
            client.explain(_overflowing(None)[0])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _requests(sidecar, "Explain", "non_finite_output") >= 1
    assert not [r for r in caplog.records if r.name == "guard.verdicts"]


def _strict_json(line: str) -> object:
    def refuse(constant: str) -> object:
        raise AssertionError(f"not JSON: {constant} in {line}")

    return json.loads(line, parse_constant=refuse)


def test_the_predicted_class_is_always_the_returned_outputs_argmax(
    sidecar: Sidecar, stub, caplog: pytest.LogCaptureFixture
) -> None:
    """One pixel at 1e38: either the outputs overflow and the request is refused, or they are
    finite and the verdict's class is their argmax; never NaN in the verdict log."""
    caplog.set_level(logging.INFO, logger="guard.verdicts")
    answered = refused = 0
    for pixel in [(r, c) for r in range(0, 32, 3) for c in range(0, 32, 3)]:
        try:
            response = stub.ModelInfer(infer_request(MODEL, INPUT, _overflowing(pixel)))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, pixel
            assert error.details() == NonFiniteOutputError.MESSAGE
            refused += 1
            continue
        answered += 1
        logits = output_arrays(response)[LOGITS]
        assert np.isfinite(logits).all(), pixel
        found = parameters(response)
        assert found["guard_predicted_class"] == int(np.argmax(logits[0])), pixel
        assert math.isfinite(found["guard_score"]) and math.isfinite(found["guard_p_value"])
    assert answered and refused  # the sweep meets both cases
    lines = [r.getMessage() for r in caplog.records if r.name == "guard.verdicts"]
    assert len(lines) == answered
    for line in lines:
        _strict_json(line)


def test_calibrate_and_audit_skip_and_list_an_item_whose_outputs_overflow(
    tmp_path: Path, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    from guard.cli import app

    x, y = heldout
    x = x[:40].copy()
    x[3] = 1e38
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y[:40])
    runner = CliRunner()
    calibrated = runner.invoke(
        app, ["calibrate", str(path), "--out", str(tmp_path / "cal.json"), "--iters", "2"]
    )
    assert calibrated.exit_code == 0, calibrated.output
    assert f"npz:3: {NonFiniteOutputError.MESSAGE}" in calibrated.output
    report = tmp_path / "audit"
    audited = runner.invoke(
        app,
        ["audit", "--model", str(demo.DEMO_MODEL), "--data", str(path), "--report", str(report),
         "--iters", "2"],
    )  # fmt: skip
    assert audited.exit_code == 0, audited.output
    assert f"npz:3: {NonFiniteOutputError.MESSAGE}" in audited.output


# --- 3. bounded echoes -----------------------------------------------------------------------


def test_shown_truncates_with_the_length() -> None:
    assert shown("abc") == "'abc'"
    long = "x" * 9000
    assert shown(long) == "'" + "x" * 64 + "…' (9000 characters)"
    assert len(shown(long, limit=10)) < 40


def test_request_ids_over_the_limit_are_refused(sidecar: Sidecar, stub) -> None:
    at_limit = "i" * MAX_REQUEST_ID_CHARS
    x = np.zeros((1, 1, 32, 32), np.float32)
    assert stub.ModelInfer(infer_request(MODEL, INPUT, x, id=at_limit)).id == at_limit
    for long in ("i" * (MAX_REQUEST_ID_CHARS + 1), "i" * 1_000_000):
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(infer_request(MODEL, INPUT, x, id=long))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most {MAX_REQUEST_ID_CHARS} characters" in error.value.details()
        assert len(error.value.details()) < 300
        with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
            with pytest.raises(grpc.RpcError) as error:
                client.explain(x[0], request_id=long)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_echoed_client_values_are_truncated(sidecar: Sidecar, stub) -> None:
    name = "m" * 9000
    before = _requests(sidecar, "ModelInfer", "not_found", model="unknown")
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(infer_request(name, INPUT, np.zeros((1, 1, 32, 32), np.float32)))
    # The client sees the server's status, not a trailer too large to read.
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "(9000 characters)" in error.value.details()
    assert len(error.value.details()) < 300
    assert _requests(sidecar, "ModelInfer", "not_found", model="unknown") == before + 1
    x = np.zeros((1, 1, 32, 32), np.float32)
    echoes = [
        infer_request(MODEL, "n" * 9000, x),  # input name
        pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[pb.ModelInferRequest.InferInputTensor(
                name=INPUT, datatype="D" * 9000, shape=[1, 1, 32, 32])],
            raw_input_contents=[x.tobytes()],
        ),  # datatype
        pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[pb.ModelInferRequest.InferInputTensor(
                name=INPUT, datatype="FP32", shape=[1] * 5000)],
            raw_input_contents=[x.tobytes()],
        ),  # shape
        infer_request(
            MODEL, INPUT, x, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(
                name=f"o{i}" + "o" * 100) for i in range(100)]
        ),  # requested outputs
    ]  # fmt: skip
    for request in echoes:
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert len(error.value.details()) < 600, error.value.details()
    with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
        with pytest.raises(grpc.RpcError) as error:
            client.explain(x[0], model_name=name)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(error.value.details()) < 300


# --- 4. cancellation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("slow")
    return write_engine_settings(directory, demo.DEMO_CALIBRATION, iters=200)


@pytest.mark.parametrize("shared", [False, True], ids=["own calls", "shared calls"])
def test_a_cancelled_request_stops_computing_and_counts_as_cancelled(
    slow_engine: Path,
    heldout: tuple[np.ndarray, np.ndarray],
    caplog: pytest.LogCaptureFixture,
    shared: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="guard.verdicts")
    with running_sidecar(
        engine_settings=slow_engine, allow_engine_mismatch=True, share_model_calls=shared
    ) as server:
        stub = inference_stub(server)
        pending = stub.ModelInfer.future(infer_request(MODEL, INPUT, heldout[0][:64]))

        def calls() -> float:
            return value(scrape(server.metrics_port), "guard_model_calls_total", model=MODEL)

        wait_for(lambda: calls() > 0, what="the MPS work to start")
        pending.cancel()
        cancelled_at = time.monotonic()
        wait_for(
            lambda: _requests(server, "ModelInfer", "cancelled") == 1,
            timeout=10,
            what="the request to be counted as cancelled",
        )
        stopped_after = time.monotonic() - cancelled_at
        settled = calls()
        time.sleep(0.5)
        assert calls() == settled  # no model call after the stop
        assert _requests(server, "ModelInfer", "ok") == 0
    assert stopped_after < 5, stopped_after
    assert not [r for r in caplog.records if r.name == "guard.verdicts"]


# --- 5. TLS files checked before binding -----------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["garbage certificate", "garbage key", "garbage client CA", "key of another certificate"],
)
def test_bad_tls_files_are_named_before_binding(tmp_path: Path, case: str) -> None:
    pki = make_pki(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n")
    cert, key, ca = pki.server_cert, pki.server_key, pki.ca
    expected: tuple[str, ...]
    if case == "garbage certificate":
        cert, expected = garbage, (f"TLS certificate {garbage}", "no PEM certificate")
    elif case == "garbage key":
        key, expected = garbage, (f"TLS key {garbage}", "no PEM private key")
    elif case == "garbage client CA":
        ca, expected = garbage, (f"client CA bundle {garbage}", "no PEM certificate")
    else:
        key, expected = pki.client_key, (f"TLS key {pki.client_key}", f"does not match {cert}")
    run = subprocess.run(
        [sys.executable, "-m", "guard", "serve", "--host", LOOPBACK, "--port", "0",
         "--metrics-port", "0", "--tls-cert", str(cert), "--tls-key", str(key),
         "--tls-client-ca", str(ca)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    for part in expected:
        assert part in run.stderr, run.stderr
    assert "cannot listen" not in run.stderr and "Traceback" not in run.stderr


# --- 6. background work in progress ----------------------------------------------------------


def test_background_work_is_visible_and_done_promptly_under_steady_load(
    heldout: tuple[np.ndarray, np.ndarray],
) -> None:
    x = heldout[0][:64]
    with running_sidecar(mode="async", log_verdicts=False) as server:
        stub = inference_stub(server)

        def gauge() -> float:
            return value(
                scrape(server.metrics_port), "guard_background_items_in_progress", model=MODEL
            )

        def checked() -> float:
            samples = scrape(server.metrics_port)
            return value(samples, "guard_checked_predictions_total", model=MODEL)

        assert gauge() == 0
        stop = threading.Event()

        def steady(k: int) -> None:
            i = k
            while not stop.is_set():
                stub.ModelInfer(infer_request(MODEL, INPUT, x[i % 64][None]))
                i += 2
                time.sleep(0.1)

        with ThreadPoolExecutor(2) as pool:
            streams = [pool.submit(steady, k) for k in range(2)]
            try:
                stub.ModelInfer(infer_request(MODEL, INPUT, x[:32]))
                started = time.monotonic()
                seen = []
                while checked() < 32:
                    seen.append(gauge())
                    assert time.monotonic() - started < 15, "32 checks took over 15 s"
                    time.sleep(0.05)
                assert max(seen) > 0
                # Under the same steady stream, later items are checked within seconds too.
                target = checked() + 10
                wait_for(lambda: checked() >= target, timeout=15, what="ten more checks")
            finally:
                stop.set()
                for stream in streams:
                    stream.result(timeout=30)
        wait_for(lambda: gauge() == 0, timeout=30, what="the background to be idle")


# --- 7. verdicts readable by a client built from the official protocol ------------------------


def test_the_stock_kserve_client_reads_every_verdict_figure(
    tmp_path: Path, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    # Not imported here: its protocol module and the guard's cannot share a process.
    assert importlib.util.find_spec("kserve") is not None, "the dev extra installs kserve"
    x = heldout[0][:3]
    inputs = tmp_path / "x.npy"
    np.save(inputs, x)
    with running_sidecar() as server:
        url = f"{LOOPBACK}:{server.port}"
        run = subprocess.run(
            [sys.executable, "-m", "tests.clients.kserve_infer", url, MODEL, str(inputs)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        with GuardClient(url) as client:
            expected = [client.explain(image) for image in x]
    one, batch = json.loads(run.stdout)
    verdict = expected[0]
    found = one["parameters"]
    assert found["guard_status"] == "checked"
    assert found.get("guard_flagged", False) == verdict.flagged
    assert found["guard_predicted_class"] == verdict.predicted_class
    assert found["guard_reason"] == verdict.reason or verdict.reason == ""
    assert float(found["guard_score_text"]) == pytest.approx(verdict.score, rel=1e-12)
    assert float(found["guard_p_value_text"]) == pytest.approx(verdict.p_value, rel=1e-12)
    assert float(found["guard_mps_area_text"]) == pytest.approx(
        verdict.mps_area_fraction, rel=1e-12
    )
    assert batch["outputs"]["guard_flagged"] == [e.flagged for e in expected]
    np.testing.assert_allclose(
        batch["outputs"]["guard_score"], [e.score for e in expected], rtol=1e-6
    )
