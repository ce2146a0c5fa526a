from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("datatype", "shape", "raw")
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    raw: bytes
    def __init__(self, datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., raw: _Optional[bytes] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("image", "tensor", "model_name", "include_mask", "request_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    tensor: Tensor
    model_name: str
    include_mask: bool
    request_id: str
    def __init__(self, image: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., model_name: _Optional[str] = ..., include_mask: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("predict_seconds", "explain_seconds", "total_seconds")
    PREDICT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    predict_seconds: float
    explain_seconds: float
    total_seconds: float
    def __init__(self, predict_seconds: _Optional[float] = ..., explain_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class Mask(_message.Message):
    __slots__ = ("height", "width", "packed_bits")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    PACKED_BITS_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    packed_bits: bytes
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., packed_bits: _Optional[bytes] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("request_id", "model_name", "predicted_class", "predicted_name", "confidence", "mps_area_fraction", "degenerate", "score", "p_value", "flagged", "reason", "model_evaluations", "model_calls", "timings", "mask", "evidence", "features")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MPS_AREA_FRACTION_FIELD_NUMBER: _ClassVar[int]
    DEGENERATE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CALLS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_name: str
    predicted_class: int
    predicted_name: str
    confidence: float
    mps_area_fraction: float
    degenerate: bool
    score: float
    p_value: float
    flagged: bool
    reason: str
    model_evaluations: int
    model_calls: int
    timings: Timings
    mask: Mask
    evidence: _containers.RepeatedCompositeFieldContainer[Evidence]
    features: _containers.ScalarMap[str, float]
    def __init__(self, request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., predicted_class: _Optional[int] = ..., predicted_name: _Optional[str] = ..., confidence: _Optional[float] = ..., mps_area_fraction: _Optional[float] = ..., degenerate: _Optional[bool] = ..., score: _Optional[float] = ..., p_value: _Optional[float] = ..., flagged: _Optional[bool] = ..., reason: _Optional[str] = ..., model_evaluations: _Optional[int] = ..., model_calls: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., mask: _Optional[_Union[Mask, _Mapping]] = ..., evidence: _Optional[_Iterable[_Union[Evidence, _Mapping]]] = ..., features: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("feature", "contribution")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    feature: str
    contribution: float
    def __init__(self, feature: _Optional[str] = ..., contribution: _Optional[float] = ...) -> None: ...
