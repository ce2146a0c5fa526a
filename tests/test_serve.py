"""The sidecar over real gRPC on a free port: protocol, verdicts, health, reflection, metrics."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from typer.testing import CliRunner

from guard import demo
from guard.cli import app
from guard.engine import MpsEngine
from guard.runtime import MaskedClassifier
from guard.settings import EngineSettings
from guard.transport.grpc.client import GuardClient, unpack_mask
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2 as pb
from guard.transport.grpc.server import GUARD_SERVICE, INFERENCE_SERVICE, Sidecar
from guard.verdict.artifact import load_artifact, score_prediction
from guard.verdict.detector import SCORE_REASON
from tests.serving import (
    LOOPBACK,
    infer_request,
    inference_stub,
    output_arrays,
    parameters,
    running_sidecar,
    scrape,
    value,
)

MODEL = "digits_cnn"
IMAGES = sorted(demo.DEMO_IMAGES.glob("*.png"))


@pytest.fixture(scope="module")
def sidecar() -> Iterator[Sidecar]:
    with running_sidecar(share_model_calls=True, batch_wait_ms=5) as server:
        yield server


@pytest.fixture(scope="module")
def stub(sidecar: Sidecar):
    return inference_stub(sidecar)


@pytest.fixture(scope="module")
def input_name(sidecar: Sidecar) -> str:
    return sidecar.models[0].classifier.spec.input_name


@pytest.fixture(scope="module")
def reference(heldout: tuple[np.ndarray, np.ndarray]):
    """Verdicts of the first held-out digits computed without the server: engine + artifact."""
    classifier = MaskedClassifier(demo.DEMO_MODEL)
    artifact = load_artifact(demo.DEMO_CALIBRATION, model_sha256=classifier.sha256)
    engine = MpsEngine(classifier, EngineSettings.model_validate(artifact.engine))
    x = heldout[0][:6]
    prediction = classifier.predict(x)
    results = engine.explain_batch(x)
    verdicts = [
        score_prediction(
            artifact,
            mps_area_fraction=r.mps_area_fraction,
            confidence=float(prediction.confidences[i]),
            predicted_class=r.predicted_class,
            margin=float(prediction.margins[i]),
        )
        for i, r in enumerate(results)
    ]
    return x, prediction, results, verdicts


def test_health_readiness_and_metadata(sidecar: Sidecar, stub, input_name: str) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready
    server = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert server.name == "mps-guard" and server.version
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
    assert meta.name == MODEL and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        (input_name, "FP32", [-1, 1, 32, 32])
    ]
    names = [t.name for t in meta.outputs]
    assert names[1:] == ["guard_checked", "guard_flagged", "guard_mps_area", "guard_score", "guard_p_value"]  # fmt: skip
    assert list(meta.outputs[0].shape) == [-1, 10]

    channel = grpc.insecure_channel(f"{LOOPBACK}:{sidecar.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", INFERENCE_SERVICE, GUARD_SERVICE):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(sidecar: Sidecar) -> None:
    channel = grpc.insecure_channel(f"{LOOPBACK}:{sidecar.port}")
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {INFERENCE_SERVICE, GUARD_SERVICE, "grpc.health.v1.Health"} <= services


def test_one_item_gets_the_model_output_and_the_verdict_as_parameters(
    stub, input_name: str, reference
) -> None:
    x, prediction, results, verdicts = reference
    response = stub.ModelInfer(infer_request(MODEL, input_name, x[:1], id="req-1"))
    assert response.id == "req-1" and response.model_name == MODEL
    outputs = output_arrays(response)
    assert list(outputs) == [MaskedClassifier(demo.DEMO_MODEL).spec.output_name]
    np.testing.assert_array_equal(next(iter(outputs.values())), prediction.scores[:1])
    p = parameters(response)
    assert p["guard_status"] == "checked"
    assert p["guard_predicted_class"] == results[0].predicted_class
    assert p["guard_mps_area"] == pytest.approx(results[0].mps_area_fraction)
    assert p["guard_score"] == pytest.approx(verdicts[0].score)
    assert p["guard_p_value"] == pytest.approx(verdicts[0].p_value)
    assert p["guard_flagged"] == verdicts[0].flagged
    assert p["guard_reason"] == verdicts[0].reason
    assert p["guard_model_evaluations"] == results[0].model_evaluations


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_a_batch_gets_verdict_tensors(stub, input_name: str, reference, raw: bool) -> None:
    x, prediction, results, verdicts = reference
    response = stub.ModelInfer(infer_request(MODEL, input_name, x, raw=raw))
    out = output_arrays(response)
    np.testing.assert_allclose(out[prediction_name()], prediction.scores, rtol=1e-6)
    assert out["guard_checked"].tolist() == [True] * len(x)
    assert out["guard_flagged"].tolist() == [v.flagged for v in verdicts]
    np.testing.assert_allclose(out["guard_mps_area"], [r.mps_area_fraction for r in results])
    np.testing.assert_allclose(out["guard_score"], [v.score for v in verdicts], rtol=1e-5)
    np.testing.assert_allclose(out["guard_p_value"], [v.p_value for v in verdicts], rtol=1e-5)
    assert "guard_status" not in parameters(response)


def test_requested_outputs_only(stub, input_name: str, reference) -> None:
    x = reference[0]
    request = infer_request(MODEL, input_name, x[:2])
    request.outputs.add(name="guard_flagged")
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["guard_flagged"]


def prediction_name() -> str:
    return MaskedClassifier(demo.DEMO_MODEL).spec.output_name


def test_guard_service_explains_images_and_tensors(sidecar: Sidecar, reference) -> None:
    x, prediction, results, verdicts = reference
    with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
        answer = client.explain(x[0], include_mask=True, request_id="abc")
        assert answer.request_id == "abc" and answer.model_name == MODEL
        assert answer.predicted_class == results[0].predicted_class
        assert answer.predicted_name == str(results[0].predicted_class)
        assert answer.confidence == pytest.approx(float(prediction.confidences[0]))
        mask = unpack_mask(answer.mask)
        np.testing.assert_array_equal(mask, results[0].mps_mask)
        assert answer.mps_area_fraction == pytest.approx(mask.mean())
        assert answer.p_value == pytest.approx(verdicts[0].p_value)
        assert answer.flagged == verdicts[0].flagged
        assert answer.model_evaluations == results[0].model_evaluations > 0
        assert answer.timings.total_seconds >= answer.timings.explain_seconds > 0

        # An encoded image is decoded and preprocessed as the calibration says.
        png = client.explain(IMAGES[0].read_bytes())
        expected = int(IMAGES[0].name[len("digit")])
        assert png.predicted_class == expected and not png.HasField("mask")


def test_out_of_distribution_noise_is_flagged_far_more_often_than_digits(
    sidecar: Sidecar, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    """Uniform noise is nothing like a digit: the calibrated score flags much of it, while
    held-out digits are flagged at about the calibrated 5%."""
    noise = np.random.default_rng(0).random((16, 1, 32, 32), dtype=np.float32)
    with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
        on_noise = [client.explain(image) for image in noise]
        on_digits = [client.explain(image) for image in heldout[0][:16]]
    assert sum(a.flagged for a in on_noise) >= 6
    assert sum(a.flagged for a in on_digits) <= 2
    detector = load_artifact(demo.DEMO_CALIBRATION).detector
    assert {a.reason for a in on_noise if a.flagged} == {SCORE_REASON[detector.score_kind]}


def test_concurrent_clients_get_the_sequential_verdicts(
    sidecar: Sidecar, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x = heldout[0][:16]
    with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
        sequential = [client.explain(image, include_mask=True) for image in x]
        barrier = threading.Barrier(16)

        def ask(i: int):
            barrier.wait()
            return [client.explain(x[i], include_mask=True) for _ in range(2)]

        with ThreadPoolExecutor(16) as pool:
            parallel = list(pool.map(ask, range(16)))
    for one, answers in zip(sequential, parallel, strict=True):
        for answer in answers:
            for field in ("predicted_class", "mps_area_fraction", "score", "p_value", "flagged"):
                assert getattr(answer, field) == getattr(one, field)
            assert answer.mask.packed_bits == one.mask.packed_bits


def test_inputs_are_checked_once_per_request(
    sidecar: Sidecar, stub, input_name: str, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model runtime's full check (shape, NaN, Inf) runs once per request: the MPS engine
    works on the inputs the prediction has checked."""
    classifier = sidecar.models[0].classifier
    checked: list[int] = []
    check_images = classifier.check_images

    def counted(images: np.ndarray) -> np.ndarray:
        checked.append(len(images))
        return check_images(images)

    monkeypatch.setattr(classifier, "check_images", counted)
    x = reference[0]
    response = stub.ModelInfer(infer_request(MODEL, input_name, x[:2]))
    assert output_arrays(response)["guard_checked"].all()
    with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
        assert client.explain(x[0]).model_evaluations > 0
    assert checked == [2, 1]


def test_metrics_are_scraped_and_parsed(sidecar: Sidecar, stub, input_name: str, reference) -> None:
    before = scrape(sidecar.metrics_port)
    x = reference[0]
    stub.ModelInfer(infer_request(MODEL, input_name, x[:3]))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request("no-such-model", input_name, x[:1]))
    after = scrape(sidecar.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, 0.0, **labels)

    assert delta("guard_requests_total", model=MODEL, rpc="ModelInfer", outcome="ok") == 1
    assert (
        delta("guard_requests_total", model="unknown", rpc="ModelInfer", outcome="not_found") == 1
    )
    assert delta("guard_predictions_total", model=MODEL) == 3
    assert delta("guard_checked_predictions_total", model=MODEL) == 3
    assert delta("guard_mps_area_fraction_count", model=MODEL) == 3
    for stage in ("predict", "explain", "total"):
        assert delta("guard_stage_duration_seconds_count", model=MODEL, stage=stage) == 1
    assert delta("guard_model_evaluations_total", model=MODEL) > 3 * 100
    assert (
        0
        < delta("guard_model_calls_total", model=MODEL)
        < delta("guard_model_evaluations_total", model=MODEL)
    )
    assert value(after, "guard_in_flight_requests") == 0
    assert value(after, "guard_calibration_alpha", model=MODEL) == 0.05
    info = {dict(k)["model"]: dict(k) for k in after["guard_model_info"]}
    assert info[MODEL]["provider"] == "CPUExecutionProvider"
    assert info[MODEL]["score_kind"] == load_artifact(demo.DEMO_CALIBRATION).detector.score_kind
    assert info[MODEL]["mode"] == "sync"
    checked = value(after, "guard_checked_predictions_total", model=MODEL)
    assert value(after, "guard_mps_area_drift_window_items", model=MODEL) == min(checked, 500)
    assert 0 <= value(after, "guard_mps_area_drift", model=MODEL) <= 1
    quantiles = [
        value(after, "guard_calibration_mps_area_quantile", model=MODEL, quantile=q)
        for q in ("0.1", "0.5", "0.9")
    ]
    assert 0 < quantiles[0] <= quantiles[1] <= quantiles[2] <= 1


def test_verdicts_are_logged_as_json_lines(
    stub, input_name: str, reference, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    with caplog.at_level(logging.INFO, logger="guard.verdicts"):
        stub.ModelInfer(infer_request(MODEL, input_name, reference[0][:2], id="logged"))
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "guard.verdicts"]
    assert [(r["request_id"], r["item"]) for r in records] == [("logged", 0), ("logged", 1)]
    assert all(r["event"] == "verdict" and r["model"] == MODEL for r in records)


def test_guard_client_prints_verdicts_and_reports_each_bad_file(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    runner, server = CliRunner(), f"{LOOPBACK}:{sidecar.port}"
    good = demo.DEMO_IMAGES / "digit3_45.png"
    broken, missing = tmp_path / "broken.png", tmp_path / "missing.png"
    broken.write_bytes(b"not an image")
    result = runner.invoke(
        app, ["client", str(broken), str(good), str(missing), "--server", server]
    )
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith(f"{good}: class 3 '3', confidence ")
    assert f"{broken}: INVALID_ARGUMENT" in result.stderr and f"{missing}: " in result.stderr

    result = runner.invoke(app, ["client", str(good), "--server", server, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["path"] == str(good) and record["predicted_class"] == 3
    assert 0 < record["mps_area_fraction"] < 1 and record["model_evaluations"] > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "c.pem"], "give both or neither"),
        (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "needs TLS"),
        (["--tls-ca", "missing-ca.pem"], "cannot read the CA bundle missing-ca.pem"),
    ],
)
def test_guard_client_refuses_incomplete_tls_settings(flags: list[str], message: str) -> None:
    good = demo.DEMO_IMAGES / "digit3_45.png"
    result = CliRunner().invoke(app, ["client", str(good), *flags])
    assert result.exit_code == 2 and message in result.stderr, result.output
