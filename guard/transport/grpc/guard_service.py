"""The guard's own servicer (``guard.v1.GuardService``): one image in, the full verdict out."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import numpy as np

from guard.errors import InvalidInputError
from guard.service.cancellation import stop_when
from guard.service.data_plane import DataPlane, Timings
from guard.service.guarded_model import Check, ModelMetadata
from guard.service.limits import check_request_id
from guard.transport.grpc import tensors
from guard.transport.grpc.generated.guard.v1 import guard_pb2 as pb
from guard.transport.grpc.generated.guard.v1 import guard_pb2_grpc as pb_grpc
from guard.transport.grpc.status import Servicer, client_gone, deadline_of, rpc


class GuardServicer(pb_grpc.GuardServiceServicer, Servicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.metrics = plane.metrics

    def _model_name(self, request: pb.ExplainRequest) -> str:
        # An empty name is the server's default model.
        return request.model_name or self.plane.default_name

    def model_label(self, request: Any) -> str:
        return self.plane.label(self._model_name(request))

    @rpc("Explain", heavy=True)
    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> Any:
        with self.plane.admitted():
            model = self.plane.metadata(self._model_name(request))
            image = explain_input(request, model)
            request_id = check_request_id(request.request_id) or uuid.uuid4().hex
            deadline = deadline_of(context)
            with stop_when(client_gone(context, deadline)):
                check, timings = self.plane.explain(
                    model, image, request_id=request_id, deadline=deadline
                )
        return explain_response(check, timings, model, request_id, request.include_mask)


# -- conversions ------------------------------------------------------------------------------


def explain_input(request: pb.ExplainRequest, model: ModelMetadata) -> np.ndarray | bytes:
    """The request's encoded image, or its tensor as one model input."""
    match request.WhichOneof("input"):
        case "image":
            if not request.image:
                raise InvalidInputError("image: no bytes")
            return request.image
        case "tensor":
            return _one_item(request.tensor, model)
        case _:
            raise InvalidInputError("the request has no input: set image or tensor")


def _one_item(tensor: pb.Tensor, model: ModelMetadata) -> np.ndarray:
    """A guard.v1 tensor (with or without a batch axis of 1) as one model input."""
    shape = list(tensor.shape)
    if len(shape) == len(model.input_shape):
        shape = [1, *shape]
    batch = tensors.decode_array(
        "tensor",
        tensor.datatype,
        shape,
        tensor.raw,
        dtype=model.input_dtype,
        item_shape=model.input_shape,
        max_items=1,
    )
    return batch[0]


def explain_response(
    check: Check, timings: Timings, model: ModelMetadata, request_id: str, include_mask: bool
) -> pb.ExplainResponse:
    response = pb.ExplainResponse(
        request_id=request_id,
        model_name=model.name,
        predicted_class=check.predicted_class,
        predicted_name=check.predicted_name,
        confidence=check.confidence,
        # Explain computes every MPS: the area and mask are always there.
        mps_area_fraction=check.mps_area_fraction or 0.0,
        degenerate=bool(check.degenerate),
        score=check.score,
        p_value=check.p_value,
        flagged=check.flagged,
        reason="" if check.reason == "ok" else check.reason,
        model_evaluations=check.model_evaluations,
        model_calls=check.model_calls,
        timings=pb.Timings(
            predict_seconds=timings.predict_seconds,
            explain_seconds=timings.explain_seconds,
            total_seconds=timings.total_seconds,
        ),
        evidence=[pb.Evidence(feature=term, contribution=value) for term, value in check.evidence],
        features=dict(check.features),
    )
    if include_mask and check.mps_mask is not None:
        mask = check.mps_mask
        response.mask.CopyFrom(
            pb.Mask(
                height=mask.shape[0],
                width=mask.shape[1],
                packed_bits=np.packbits(mask.ravel()).tobytes(),
            )
        )
    return response
