"""Sidecar behaviour by settings: async and sampling, shared model calls, deadlines, the
concurrency limit, and a second model with another layout."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from guard import demo
from guard.cli import app
from guard.transport.grpc.client import GuardClient
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2 as pb
from tests.fixtures.models import nhwc_model
from tests.serving import (
    LOOPBACK,
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


def _input_name(sidecar) -> str:
    return sidecar.models[0].classifier.spec.input_name


def test_async_answers_at_once_and_checks_in_the_background(
    heldout: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    x = heldout[0][:4]
    with caplog.at_level(logging.INFO, logger="guard.verdicts"):
        with running_sidecar(mode="async", queue_size=16) as sidecar:
            stub = inference_stub(sidecar)
            one = stub.ModelInfer(infer_request(MODEL, _input_name(sidecar), x[:1], id="a1"))
            assert parameters(one) == {"guard_status": "queued"}
            batch = stub.ModelInfer(infer_request(MODEL, _input_name(sidecar), x[1:], id="a2"))
            out = output_arrays(batch)
            assert not out["guard_checked"].any() and np.isnan(out["guard_score"]).all()

            def checked() -> float:
                return value(
                    scrape(sidecar.metrics_port), "guard_checked_predictions_total", model=MODEL
                )

            wait_for(lambda: checked() == 4, what="4 background checks")
            samples = scrape(sidecar.metrics_port)
            assert value(samples, "guard_queue_depth", model=MODEL) == 0
            assert value(samples, "guard_queue_capacity", model=MODEL) == 16
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "guard.verdicts"]
    assert sorted((r["request_id"], r["item"]) for r in records) == [
        ("a1", 0), ("a2", 0), ("a2", 1), ("a2", 2)
    ]  # fmt: skip


def test_a_full_background_queue_skips_items_and_counts_them(
    heldout: tuple[np.ndarray, np.ndarray], slow_engine: Path
) -> None:
    x = heldout[0][:32]
    with running_sidecar(
        mode="async",
        queue_size=1,
        max_batch_items=1,
        engine_settings=slow_engine,
        allow_engine_mismatch=True,
    ) as sidecar:
        stub = inference_stub(sidecar)
        started = time.perf_counter()
        response = stub.ModelInfer(infer_request(MODEL, _input_name(sidecar), x))
        answered = time.perf_counter() - started
        checked = output_arrays(response)["guard_checked"]
        assert not checked.any()
        samples = scrape(sidecar.metrics_port)
        skipped = value(samples, "guard_skipped_checks_total", model=MODEL, reason="queue_full")
        # 32 items into a queue of one: most are dropped, and the request did not wait for
        # them (each check takes seconds).
        assert 20 <= skipped <= 31
        assert answered < 5.0
        wait_for(
            lambda: (
                value(scrape(sidecar.metrics_port), "guard_checked_predictions_total", model=MODEL)
                == 32 - skipped
            ),
            timeout=60,
            what="the queued items' checks",
        )


def test_sampling_rate_zero_checks_nothing() -> None:
    with running_sidecar(sample_rate=0.0) as sidecar:
        stub = inference_stub(sidecar)
        response = stub.ModelInfer(
            infer_request(MODEL, _input_name(sidecar), np.zeros((3, 1, 32, 32), np.float32))
        )
        assert not output_arrays(response)["guard_checked"].any()
        samples = scrape(sidecar.metrics_port)
        assert value(samples, "guard_skipped_checks_total", model=MODEL, reason="not_sampled") == 3
        assert value(samples, "guard_checked_predictions_total", model=MODEL) == 0
        assert value(samples, "guard_predictions_total", model=MODEL) == 3


def test_half_sampling_checks_about_half() -> None:
    with running_sidecar(sample_rate=0.5) as sidecar:
        stub = inference_stub(sidecar)
        response = stub.ModelInfer(
            infer_request(MODEL, _input_name(sidecar), np.zeros((40, 1, 32, 32), np.float32)),
        )
        assert 8 <= output_arrays(response)["guard_checked"].sum() <= 32


def test_concurrent_requests_share_model_calls(heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x = heldout[0][:8]
    with running_sidecar(
        share_model_calls=True, batch_wait_ms=1000, max_batch_items=8, explain_workers=1
    ) as sidecar:
        barrier = threading.Barrier(8)
        with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:

            def ask(image: np.ndarray):
                barrier.wait()
                return client.explain(image)

            with ThreadPoolExecutor(8) as pool:
                shared = list(pool.map(ask, x))
        samples = scrape(sidecar.metrics_port)
        batches = value(samples, "guard_explain_batch_items_count", model=MODEL)
        items = value(samples, "guard_explain_batch_items_sum", model=MODEL)
        calls = value(samples, "guard_model_calls_total", model=MODEL)
    with running_sidecar(share_model_calls=False) as sidecar:
        with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
            alone = [client.explain(image) for image in x]
        alone_calls = value(scrape(sidecar.metrics_port), "guard_model_calls_total", model=MODEL)
    assert items == 8 and batches <= 2  # all eight arrive within the wait, but CI is slow
    assert calls < alone_calls / 2  # the eight MPSs shared most of their model calls
    for a, b in zip(shared, alone, strict=True):
        assert (a.mps_area_fraction, a.score, a.flagged) == (
            b.mps_area_fraction,
            b.score,
            b.flagged,
        )


@pytest.fixture(scope="module")
def slow_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Engine settings that make each MPS take seconds (many runs), allowed as a mismatch."""
    directory = tmp_path_factory.mktemp("slow")
    return write_engine_settings(directory, demo.DEMO_CALIBRATION, iters=1000)


def test_client_deadline_is_honoured(
    slow_engine: Path, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    with running_sidecar(engine_settings=slow_engine, allow_engine_mismatch=True) as sidecar:
        # Long enough to reach the server on a slow machine, far shorter than the MPS of a
        # digit (seconds here).
        with GuardClient(f"{LOOPBACK}:{sidecar.port}", timeout=1.0) as client:
            with pytest.raises(grpc.RpcError) as error:
                client.explain(heldout[0][0])
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(
            lambda: (
                value(
                    scrape(sidecar.metrics_port),
                    "guard_skipped_checks_total",
                    model=MODEL,
                    reason="deadline",
                )
                == 1
            ),
            what="the abandoned check to be counted",
        )


def test_past_the_concurrency_limit_requests_are_refused(slow_engine: Path) -> None:
    with running_sidecar(
        engine_settings=slow_engine, allow_engine_mismatch=True, max_concurrency=1
    ) as sidecar:
        barrier = threading.Barrier(4)
        with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:

            def ask(i: int) -> str:
                barrier.wait()
                try:
                    client.explain(np.zeros((1, 32, 32), np.float32))
                    return "ok"
                except grpc.RpcError as exc:
                    assert "limit of 1 concurrent requests" in exc.details()
                    return exc.code().name

            with ThreadPoolExecutor(4) as pool:
                outcomes = list(pool.map(ask, range(4)))
        assert outcomes.count("ok") >= 1 and outcomes.count("RESOURCE_EXHAUSTED") >= 1
        samples = scrape(sidecar.metrics_port)
        refused = value(
            samples,
            "guard_requests_total",
            model=MODEL,
            rpc="Explain",
            outcome="resource_exhausted",
        )
        assert refused == outcomes.count("RESOURCE_EXHAUSTED")


@pytest.fixture(scope="module")
def nhwc_served(tmp_path_factory: pytest.TempPathFactory, heldout: tuple[np.ndarray, np.ndarray]):
    """An NHWC model (another layout than the demo's) with its own calibration."""
    directory = tmp_path_factory.mktemp("nhwc")
    model = nhwc_model(directory)
    x, y = heldout
    data = directory / "heldout.npz"
    np.savez(data, x=x[:240].transpose(0, 2, 3, 1), y=y[:240])
    calibration = directory / "calibration.json"
    result = CliRunner().invoke(
        app,
        ["calibrate", str(data), "--model", str(model), "--out", str(calibration),
         "--iters", "6", "--score", "msp"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return model, calibration, x[240:244].transpose(0, 2, 3, 1)


def test_a_model_with_another_layout(nhwc_served) -> None:
    model, calibration, x = nhwc_served
    with running_sidecar(model=model, calibration=calibration, model_name="nhwc") as sidecar:
        spec = sidecar.models[0].classifier.spec
        assert spec.layout == "NHWC"
        stub = inference_stub(sidecar)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="nhwc"))
        assert list(meta.inputs[0].shape) == [-1, 32, 32, 1]
        response = stub.ModelInfer(infer_request("nhwc", spec.input_name, x))
        out = output_arrays(response)
        assert out["guard_checked"].all()
        with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
            answers = [client.explain(image, model_name="nhwc") for image in x]
        np.testing.assert_allclose(out["guard_score"], [a.score for a in answers], rtol=1e-5)
        np.testing.assert_allclose(out["guard_mps_area"], [a.mps_area_fraction for a in answers])
