"""Tensors of both protocols <-> numpy arrays, with every check a request's tensor deserves.

Datatype names and the typed-contents field of each are the Open Inference Protocol's
(KServe v2); guard.v1 tensors use the same names and carry raw bytes. Inputs come as raw
bytes (little-endian, row-major) or as typed contents, never both in one request. Outputs
are always sent raw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from guard.errors import InvalidInputError
from guard.service.limits import shown
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2 as pb

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# Which InferTensorContents field holds each datatype (FP16 has none: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_ALL_FIELDS = sorted(set(_CONTENTS_FIELD.values()) | {"bytes_contents"})


def datatype_of(dtype: np.dtype) -> str:
    """The protocol's name of a numpy dtype."""
    for name, candidate in DATATYPES.items():
        if np.dtype(dtype) == candidate:
            return name
    raise ValueError(f"no Open Inference Protocol datatype for {dtype}")


def decode_array(
    name: str,
    datatype: str,
    shape: Sequence[int],
    data: bytes | pb.InferTensorContents,
    *,
    dtype: np.dtype,
    item_shape: Sequence[int],
    max_items: int,
) -> np.ndarray:
    """The batch [N, *item_shape] a tensor carries, checked against what the model takes
    (``dtype``, ``item_shape``) and what the server takes (``max_items``).

    ``data`` is the tensor's raw little-endian bytes, or its typed contents. The values are
    not checked here: ``GuardedModel.predict`` does that, once per request.
    """
    expected_datatype = datatype_of(dtype)
    if datatype != expected_datatype:
        raise InvalidInputError(
            f"input {shown(name)} has datatype {shown(datatype, quoted=False) or '(none)'}; "
            f"the model takes {expected_datatype}"
        )
    shape = list(shape)
    expected = ", ".join(map(str, item_shape))
    if len(shape) != len(item_shape) + 1 or shape[1:] != list(item_shape) or shape[0] < 1:
        raise InvalidInputError(
            f"input {shown(name)} has shape {shown(shape)}; the model takes [N, {expected}] "
            "with N >= 1"
        )
    if shape[0] > max_items:
        raise InvalidInputError(
            f"input {name!r} holds {shape[0]} items; this server takes at most {max_items} "
            "per request"
        )
    count = math.prod(shape)
    wire = DATATYPES[datatype]  # little-endian, as the protocol sends it
    if isinstance(data, bytes):
        if len(data) == 0:
            raise InvalidInputError(f"input {name!r} has no data (empty raw contents)")
        if len(data) != count * wire.itemsize:
            raise InvalidInputError(
                f"input {name!r}: raw contents hold {len(data)} bytes; shape {shape} of "
                f"{datatype} needs {count * wire.itemsize}"
            )
        return np.frombuffer(data, dtype=wire).reshape(shape)
    field = _CONTENTS_FIELD.get(datatype)
    others = [f for f in _ALL_FIELDS if f != field and len(getattr(data, f))]
    if others:
        raise InvalidInputError(
            f"input {name!r} of datatype {datatype} carries values in {', '.join(others)}; "
            f"use {f'contents.{field}' if field else 'raw_input_contents'}"
        )
    values = getattr(data, field) if field else ()
    if len(values) == 0:
        raise InvalidInputError(
            f"input {name!r} has no data: send raw_input_contents or contents.{field or '(raw only)'}"
        )
    if len(values) != count:
        raise InvalidInputError(
            f"input {name!r}: contents hold {len(values)} values; shape {shape} needs {count}"
        )
    return np.asarray(values, dtype=wire).reshape(shape)


def has_typed_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> bool:
    return any(len(getattr(tensor.contents, f)) for f in _ALL_FIELDS)


def encode_output(
    name: str, array: np.ndarray
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """An output's metadata and its raw little-endian bytes."""
    datatype = datatype_of(array.dtype)
    data = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
    meta = pb.ModelInferResponse.InferOutputTensor(
        name=name, datatype=datatype, shape=list(array.shape)
    )
    return meta, data
