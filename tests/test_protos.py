"""The protocol foundation: committed stubs up to date, wire round-trips, a real gRPC call."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from guard.transport.grpc.generated.guard.v1 import guard_pb2, guard_pb2_grpc
from guard.transport.grpc.generated.inference import (
    grpc_predict_v2_pb2 as pb,
)
from guard.transport.grpc.generated.inference import (
    grpc_predict_v2_pb2_grpc as pb_grpc,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "generate_protos.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("generate_protos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_up_to_date():
    problems = _load_script().check()
    assert problems == [], "run python scripts/generate_protos.py:\n" + "\n".join(problems)


def test_check_command_fails_on_stale_stubs(tmp_path):
    script = _load_script()
    stale = tmp_path / "generated"
    shutil.copytree(script.GENERATED, stale, ignore=shutil.ignore_patterns("__pycache__"))
    target = stale / "inference" / "grpc_predict_v2_pb2.py"
    target.write_text(target.read_text() + "\n# edited by hand\n")
    (stale / "inference" / "leftover_pb2.py").write_text("")
    problems = script.check(generated=stale)
    assert any(p.startswith("differs: inference/grpc_predict_v2_pb2.py") for p in problems)
    assert any("leftover_pb2.py" in p for p in problems)

    # The command line itself: exit 0 on the committed tree.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_wire_field_numbers_match_open_inference_protocol():
    request = pb.ModelInferRequest.DESCRIPTOR
    numbers = {f.name: f.number for f in request.fields}
    assert numbers == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    }
    response = {f.name: f.number for f in pb.ModelInferResponse.DESCRIPTOR.fields}
    assert response["outputs"] == 5 and response["raw_output_contents"] == 6
    tensor = {f.name: f.number for f in pb.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields}
    assert tensor == {"name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5}
    contents = {f.name: f.number for f in pb.InferTensorContents.DESCRIPTOR.fields}
    assert contents["fp32_contents"] == 6 and contents["bytes_contents"] == 8
    param = {f.name: f.number for f in pb.InferParameter.DESCRIPTOR.fields}
    assert param == {
        "bool_param": 1,
        "int64_param": 2,
        "string_param": 3,
        "double_param": 4,
        "uint64_param": 5,
    }
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    }


def test_model_infer_request_with_fp32_raw_contents_round_trips():
    image = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="demo", id="req-1")
    request.parameters["sample"].bool_param = True
    request.inputs.add(name="input", datatype="FP32", shape=list(image.shape))
    request.outputs.add(name="logits")
    request.raw_input_contents.append(image.astype("<f4").tobytes())

    decoded = pb.ModelInferRequest.FromString(request.SerializeToString())

    assert decoded == request
    assert decoded.model_name == "demo" and decoded.id == "req-1"
    assert decoded.parameters["sample"].WhichOneof("parameter_choice") == "bool_param"
    (tensor,) = decoded.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("input", "FP32", [1, 1, 32, 32])
    restored = np.frombuffer(decoded.raw_input_contents[0], dtype="<f4").reshape(tensor.shape)
    np.testing.assert_array_equal(restored, image)


def test_explain_messages_round_trip():
    request = guard_pb2.ExplainRequest(
        tensor=guard_pb2.Tensor(datatype="FP32", shape=[1, 32, 32], raw=b"\0" * 4096),
        model_name="demo",
        include_mask=True,
        request_id="r",
    )
    assert request.WhichOneof("input") == "tensor"
    assert guard_pb2.ExplainRequest.FromString(request.SerializeToString()) == request

    mask = np.zeros((32, 32), dtype=bool)
    mask[4:9, 10:12] = True
    response = guard_pb2.ExplainResponse(
        predicted_class=3,
        flagged=True,
        reason="low_p_value",
        timings=guard_pb2.Timings(total_seconds=0.25),
        mask=guard_pb2.Mask(height=32, width=32, packed_bits=np.packbits(mask).tobytes()),
    )
    decoded = guard_pb2.ExplainResponse.FromString(response.SerializeToString())
    bits = np.unpackbits(np.frombuffer(decoded.mask.packed_bits, dtype=np.uint8))
    unpacked = bits[: decoded.mask.height * decoded.mask.width]
    np.testing.assert_array_equal(unpacked.reshape(32, 32).astype(bool), mask)
    assert guard_pb2_grpc.GuardServiceStub is not None


class _LiveServicer(pb_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)


def test_real_server_answers_server_live():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    try:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_LiveServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        assert port > 0
        server.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=5)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live is True
            # An RPC the test servicer does not implement: the generated base says so.
            with pytest.raises(grpc.RpcError) as error:
                stub.ServerReady(pb.ServerReadyRequest(), timeout=5)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None).wait(timeout=5)
