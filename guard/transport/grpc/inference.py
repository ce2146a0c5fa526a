"""The Open Inference Protocol servicer (``inference.GRPCInferenceService``).

ModelInfer answers with the model's output unchanged and adds the guard's verdicts: as
response parameters when the request holds one item, and as extra output tensors (one value
per item) when it holds several or asks for them by name. Each figure parameter (score,
p-value, MPS area) comes twice: as ``double_param``, which only Triton's version of the
protocol has, and as ``<name>_text`` in a ``string_param``, which every client can read. See
README "The sidecar".
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from guard import __version__
from guard.errors import InvalidInputError
from guard.service.cancellation import stop_when
from guard.service.data_plane import DataPlane, Inference
from guard.service.guarded_model import VERSION, Check, ModelMetadata
from guard.service.limits import check_request_id, shown, shown_list
from guard.transport.grpc import tensors
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2 as pb
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from guard.transport.grpc.status import Servicer, client_gone, deadline_of, rpc

# The verdict tensors: name -> (datatype, value of a checked item, value of an unchecked one).
# A checked item without an MPS (explain "flagged", neither flagged nor sampled) has area NaN.
GUARD_OUTPUTS: dict[str, tuple[str, Callable[[Check], Any], Any]] = {
    "guard_checked": ("BOOL", lambda check: True, False),
    "guard_flagged": ("BOOL", lambda check: check.flagged, False),
    "guard_mps_area": ("FP32", lambda check: _or_nan(check.mps_area_fraction), np.nan),
    "guard_score": ("FP32", lambda check: check.score, np.nan),
    "guard_p_value": ("FP32", lambda check: check.p_value, np.nan),
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer, Servicer):
    def __init__(self, plane: DataPlane, ready: Callable[[], bool]) -> None:
        self.plane = plane
        self.metrics = plane.metrics
        self._ready = ready

    def model_label(self, request: Any) -> str:
        return self.plane.label(
            getattr(request, "model_name", None) or getattr(request, "name", "")
        )

    @rpc("ServerLive")
    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self._ready())

    @rpc("ModelReady")
    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> Any:
        self.plane.metadata(request.name, request.version)
        return pb.ModelReadyResponse(ready=self._ready())

    @rpc("ServerMetadata")
    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> Any:
        return pb.ServerMetadataResponse(name="mps-guard", version=__version__, extensions=[])

    @rpc("ModelMetadata")
    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext) -> Any:
        return metadata_response(self.plane.metadata(request.name, request.version))

    @rpc("ModelInfer", heavy=True)
    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> Any:
        with self.plane.admitted():
            model = self.plane.metadata(request.model_name, request.model_version)
            images = input_images(request, model, max_items=self.plane.settings.max_request_items)
            requested = requested_outputs(request, model)
            request_id = check_request_id(request.id) or uuid.uuid4().hex
            deadline = deadline_of(context)
            with stop_when(client_gone(context, deadline)):
                inference = self.plane.infer(
                    model, images, request_id=request_id, deadline=deadline
                )
        return infer_response(inference, model, request_id, requested)


# -- conversions ------------------------------------------------------------------------------


def metadata_response(model: ModelMetadata) -> pb.ModelMetadataResponse:
    meta = pb.ModelMetadataResponse.TensorMetadata
    outputs = [
        meta(name=model.output_name, datatype="FP32", shape=[-1, model.num_classes]),
        *(
            meta(name=name, datatype=datatype, shape=[-1])
            for name, (datatype, _, _) in GUARD_OUTPUTS.items()
        ),
    ]
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=list(model.versions),
        platform=model.platform,
        inputs=[
            meta(
                name=model.input_name,
                datatype=tensors.datatype_of(model.input_dtype),
                shape=[-1, *model.input_shape],
            )
        ],
        outputs=outputs,
    )


def input_images(
    request: pb.ModelInferRequest, model: ModelMetadata, *, max_items: int
) -> np.ndarray:
    """The batch of a ModelInfer request: its one input, named as the model's."""
    if len(request.inputs) != 1:
        raise InvalidInputError(
            f"the model takes exactly one input, {model.input_name!r}; the request has "
            f"{len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.name != model.input_name:
        raise InvalidInputError(
            f"unknown input {shown(tensor.name)}; the model's input is {model.input_name!r}"
        )
    raw_count = len(request.raw_input_contents)
    if raw_count and tensors.has_typed_contents(tensor):
        raise InvalidInputError(
            "the request mixes raw_input_contents with typed contents; use one or the other"
        )
    if raw_count > 1:
        raise InvalidInputError(
            f"raw_input_contents holds {raw_count} entries for 1 input; send exactly one"
        )
    return tensors.decode_array(
        tensor.name,
        tensor.datatype,
        tensor.shape,
        request.raw_input_contents[0] if raw_count else tensor.contents,
        dtype=model.input_dtype,
        item_shape=model.input_shape,
        max_items=max_items,
    )


def requested_outputs(request: pb.ModelInferRequest, model: ModelMetadata) -> list[str]:
    """The outputs a request names (none: the default ones), each one the model has."""
    requested = [o.name for o in request.outputs]
    known = (model.output_name, *GUARD_OUTPUTS)
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise InvalidInputError(
            f"unknown output(s) {shown_list(unknown)}; this model has {', '.join(known)}"
        )
    return requested


def infer_response(
    inference: Inference, model: ModelMetadata, request_id: str, requested: list[str]
) -> pb.ModelInferResponse:
    """The model's output as it is, and the verdicts: as parameters for one item, as tensors
    for several (or when asked for by name)."""
    items = len(inference.status)
    arrays = {model.output_name: inference.prediction.scores}
    if items > 1 or any(name in GUARD_OUTPUTS for name in requested):
        arrays.update(_guard_outputs(inference))
    names = requested or list(arrays)
    response = pb.ModelInferResponse(model_name=model.name, model_version=VERSION, id=request_id)
    for name in names:
        meta, data = tensors.encode_output(name, arrays[name])
        response.outputs.append(meta)
        response.raw_output_contents.append(data)
    if items == 1:
        _set_verdict_parameters(response.parameters, inference)
    return response


def _guard_outputs(inference: Inference) -> dict[str, np.ndarray]:
    """One value per item of each verdict tensor; unchecked items get the empty value."""
    return {
        name: np.array(
            [empty if c is None else value(c) for c in inference.checks],
            dtype=tensors.DATATYPES[datatype],
        )
        for name, (datatype, value, empty) in GUARD_OUTPUTS.items()
    }


def _set_verdict_parameters(parameters: Any, inference: Inference) -> None:
    """The verdict of a one-item request as ``guard_*`` response parameters."""
    parameters["guard_status"].string_param = inference.status[0]
    check = inference.checks[0]
    if check is None:
        return
    parameters["guard_flagged"].bool_param = check.flagged
    parameters["guard_reason"].string_param = check.reason
    _set_figure(parameters, "guard_score", check.score)
    _set_figure(parameters, "guard_p_value", check.p_value)
    if check.mps_area_fraction is not None:  # absent where no MPS was computed
        _set_figure(parameters, "guard_mps_area", check.mps_area_fraction)
        parameters["guard_degenerate"].bool_param = bool(check.degenerate)
    parameters["guard_predicted_class"].int64_param = check.predicted_class
    parameters["guard_model_evaluations"].int64_param = check.model_evaluations


def _set_figure(parameters: Any, name: str, value: float) -> None:
    """A verdict figure as ``double_param`` (Triton's extension of the protocol) and as
    ``<name>_text``, a ``string_param`` with the number in decimal (shortest round-trip form),
    which a client built from the official protocol, whose parameters hold only bool, int64
    and string values, can read."""
    parameters[name].double_param = value
    parameters[f"{name}_text"].string_param = repr(float(value))


def _or_nan(value: float | None) -> float:
    return np.nan if value is None else value
