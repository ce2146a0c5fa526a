"""Bad requests get the right status code and a message that says what was wrong; the server
keeps serving (every case is followed by a good request)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from guard.transport.grpc.client import GuardClient
from guard.transport.grpc.generated.guard.v1 import guard_pb2
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2 as pb
from guard.transport.grpc.server import Sidecar
from tests.serving import LOOPBACK, infer_request, inference_stub, running_sidecar

MODEL = "digits_cnn"
MAX_MESSAGE = 64 * 1024
INVALID, NOT_FOUND, EXHAUSTED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


@pytest.fixture(scope="module")
def sidecar() -> Iterator[Sidecar]:
    with running_sidecar(max_message_bytes=MAX_MESSAGE, max_request_items=8) as server:
        yield server


@pytest.fixture(scope="module")
def name(sidecar: Sidecar) -> str:
    return sidecar.models[0].classifier.spec.input_name


def _good(name: str) -> pb.ModelInferRequest:
    return infer_request(MODEL, name, np.full((1, 1, 32, 32), 0.5, np.float32))


def _with(
    change: Callable[[pb.ModelInferRequest, str], None],
) -> Callable[[str], pb.ModelInferRequest]:
    def build(name: str) -> pb.ModelInferRequest:
        request = _good(name)
        change(request, name)
        return request

    return build


def _datatype(request: pb.ModelInferRequest, name: str) -> None:
    request.inputs[0].datatype = "INT32"


def _shape(request: pb.ModelInferRequest, name: str) -> None:
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([1, 1, 16, 64])


def _values(fill: float) -> Callable[[pb.ModelInferRequest, str], None]:
    def change(request: pb.ModelInferRequest, name: str) -> None:
        request.raw_input_contents[0] = np.full((1, 1, 32, 32), fill, np.float32).tobytes()

    return change


def _empty_raw(request: pb.ModelInferRequest, name: str) -> None:
    request.raw_input_contents[0] = b""


def _no_data(request: pb.ModelInferRequest, name: str) -> None:
    del request.raw_input_contents[:]


def _short_raw(request: pb.ModelInferRequest, name: str) -> None:
    request.raw_input_contents[0] = request.raw_input_contents[0][:100]


def _mixed(request: pb.ModelInferRequest, name: str) -> None:
    request.inputs[0].contents.fp32_contents.extend([0.5] * 1024)


def _wrong_typed_field(request: pb.ModelInferRequest, name: str) -> None:
    del request.raw_input_contents[:]
    request.inputs[0].contents.int_contents.extend([0] * 1024)


def _two_inputs(request: pb.ModelInferRequest, name: str) -> None:
    request.inputs.append(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])


def _input_name(request: pb.ModelInferRequest, name: str) -> None:
    request.inputs[0].name = "pixels"


def _output(request: pb.ModelInferRequest, name: str) -> None:
    request.outputs.add(name="logits_of_another_model")


def _model(request: pb.ModelInferRequest, name: str) -> None:
    request.model_name = "resnet50"


def _version(request: pb.ModelInferRequest, name: str) -> None:
    request.model_version = "7"


def _too_many_items(name: str) -> pb.ModelInferRequest:
    return infer_request(MODEL, name, np.zeros((9, 1, 32, 32), np.float32), raw=False)


def _oversized(name: str) -> pb.ModelInferRequest:
    return infer_request(MODEL, name, np.zeros((20, 1, 32, 32), np.float32))  # 80 KiB > 64 KiB


CASES = {
    "wrong datatype": (_with(_datatype), INVALID, "datatype INT32; the model takes FP32"),
    "wrong shape": (_with(_shape), INVALID, "shape [1, 1, 16, 64]"),
    "NaN": (_with(_values(np.nan)), INVALID, "NaN or Inf"),
    "Inf": (_with(_values(np.inf)), INVALID, "NaN or Inf"),
    "empty raw payload": (_with(_empty_raw), INVALID, "no data"),
    "no payload": (_with(_no_data), INVALID, "no data"),
    "truncated raw payload": (_with(_short_raw), INVALID, "hold 100 bytes"),
    "raw and typed mixed": (_with(_mixed), INVALID, "mixes raw_input_contents with typed"),
    "typed field of another type": (_with(_wrong_typed_field), INVALID, "int_contents"),
    "two inputs": (_with(_two_inputs), INVALID, "exactly one input"),
    "unknown input name": (_with(_input_name), INVALID, "unknown input 'pixels'"),
    "unknown output": (_with(_output), INVALID, "unknown output(s) 'logits_of_another_model'"),
    "unknown model": (_with(_model), NOT_FOUND, "unknown model 'resnet50'"),
    "unknown version": (_with(_version), NOT_FOUND, "no version '7'"),
    "too many items": (_too_many_items, INVALID, "at most 8 per request"),
    "oversized payload": (_oversized, EXHAUSTED, "larger than max"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_infer_request(sidecar: Sidecar, name: str, case: str) -> None:
    build, code, message = CASES[case]
    stub = inference_stub(sidecar)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(build(name))
    assert error.value.code() == code
    assert message in error.value.details()
    good = stub.ModelInfer(_good(name))
    assert good.parameters["guard_status"].string_param == "checked"


EXPLAIN_CASES = {
    "undecodable image bytes": (
        guard_pb2.ExplainRequest(image=b"\x89PNG not really"),
        INVALID,
        "cannot decode image",
    ),
    "no input": (guard_pb2.ExplainRequest(), INVALID, "no input"),
    "tensor of the wrong shape": (
        guard_pb2.ExplainRequest(
            tensor=guard_pb2.Tensor(datatype="FP32", shape=[3, 8, 8], raw=bytes(3 * 64 * 4))
        ),
        INVALID,
        "shape [1, 3, 8, 8]",
    ),
    "unknown model": (
        guard_pb2.ExplainRequest(model_name="resnet50", image=b"x"),
        NOT_FOUND,
        "unknown model",
    ),
}


@pytest.mark.parametrize("case", list(EXPLAIN_CASES))
def test_bad_explain_request(sidecar: Sidecar, case: str) -> None:
    request, code, message = EXPLAIN_CASES[case]
    with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
        with pytest.raises(grpc.RpcError) as error:
            client._stub.Explain(request, timeout=30)
        assert error.value.code() == code
        assert message in error.value.details()
        assert client.explain(np.zeros((1, 32, 32), np.float32)).model_evaluations > 0


def test_unexpected_errors_are_internal_and_logged_in_full(
    sidecar: Sidecar, name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = sidecar.models[0]

    def broken(images: np.ndarray) -> None:
        raise ZeroDivisionError("secret internal detail")

    monkeypatch.setattr(model.classifier, "predict", broken)
    stub = inference_stub(sidecar)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(_good(name))
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.value.details() and "reference" in error.value.details()
    logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert logged and logged[-1].exc_info is not None
    assert "secret internal detail" in str(logged[-1].exc_info[1])
    monkeypatch.undo()
    assert stub.ModelInfer(_good(name)).parameters["guard_status"].string_param == "checked"
