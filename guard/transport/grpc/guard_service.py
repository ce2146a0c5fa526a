"""The guard's own servicer (``guard.v1.GuardService``): one image in, the full verdict out."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import numpy as np

from guard.errors import InvalidInputError
from guard.service.data_plane import DataPlane
from guard.transport.grpc import tensors
from guard.transport.grpc.generated.guard.v1 import guard_pb2 as pb
from guard.transport.grpc.generated.guard.v1 import guard_pb2_grpc as pb_grpc
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2 as oip
from guard.transport.grpc.status import Servicer, deadline_of, rpc


class GuardServicer(pb_grpc.GuardServiceServicer, Servicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.metrics = plane.metrics

    def _model_name(self, request: pb.ExplainRequest) -> str:
        # An empty name is the server's default model: its first.
        return request.model_name or self.plane.models[0].name

    def model_label(self, request: Any) -> str:
        return self.plane.label(self._model_name(request))

    @rpc("Explain", heavy=True)
    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> Any:
        with self.plane.admitted():
            model = self.plane.model(self._model_name(request))
            image: np.ndarray | bytes
            if request.WhichOneof("input") == "image":
                image = request.image
                if not image:
                    raise InvalidInputError("image: no bytes")
            elif request.WhichOneof("input") == "tensor":
                image = self._tensor(request.tensor, model.classifier.spec)
            else:
                raise InvalidInputError("the request has no input: set image or tensor")
            request_id = request.request_id or uuid.uuid4().hex
            model, check, timings = self.plane.explain(
                model.name, image, request_id=request_id, deadline=deadline_of(context)
            )
        response = pb.ExplainResponse(
            request_id=request_id,
            model_name=model.name,
            predicted_class=check.predicted_class,
            predicted_name=check.predicted_name,
            confidence=check.confidence,
            mps_area_fraction=check.mps_area_fraction,
            degenerate=check.degenerate,
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
        )
        if request.include_mask:
            mask = check.mps_mask
            response.mask.CopyFrom(
                pb.Mask(
                    height=mask.shape[0],
                    width=mask.shape[1],
                    packed_bits=np.packbits(mask.ravel()).tobytes(),
                )
            )
        return response

    def _tensor(self, tensor: pb.Tensor, spec: Any) -> np.ndarray:
        """A guard.v1 tensor (with or without a batch axis of 1) as one model input."""
        shape = list(tensor.shape)
        if len(shape) == len(spec.input_shape):
            shape = [1, *shape]
        as_oip = oip.ModelInferRequest.InferInputTensor(
            name="tensor", datatype=tensor.datatype, shape=shape
        )
        batch = tensors.decode_input(
            as_oip,
            tensor.raw,
            datatype=tensors.datatype_of(spec.dtype),
            item_shape=spec.input_shape,
            max_items=1,
        )
        return batch[0]
