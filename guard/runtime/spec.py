"""What the guard needs to know about a classifier, read from its ONNX graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper

from guard.errors import UnsupportedModelError
from guard.settings import ModelOptions

Layout = Literal["NCHW", "NHWC"]
BatchMode = Literal["dynamic", "made_dynamic", "single"]
_IMAGE_CHANNELS = (1, 3, 4)


@dataclass(frozen=True)
class ModelSpec:
    """The input and output of a single-image classifier, as the guard drives it."""

    input_name: str
    layout: Layout
    channels: int
    height: int
    width: int
    dtype: np.dtype
    output_name: str
    num_classes: int
    fixed_batch: bool  # the graph fixes the batch dimension to 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One input without the batch axis, in the model's layout."""
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)

    @property
    def channel_axis(self) -> int:
        """Channel axis of one input without the batch axis."""
        return 0 if self.layout == "NCHW" else 2


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """Static sizes of a tensor's dimensions, None where symbolic or unknown."""
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Inputs that are fed at run time (older exporters also list initializers as inputs)."""
    initialized = {init.name for init in graph.initializer}
    return [value for value in graph.input if value.name not in initialized]


def _detect_layout(graph: onnx.GraphProto, name: str, dims: list[int | None]) -> Layout | None:
    first, last = dims[1], dims[3]
    if first in _IMAGE_CHANNELS and last not in _IMAGE_CHANNELS:
        return "NCHW"
    if last in _IMAGE_CHANNELS and first not in _IMAGE_CHANNELS:
        return "NHWC"
    # TensorFlow exports often open with a Transpose from NHWC to NCHW.
    for node in graph.node:
        if name in node.input and node.op_type == "Transpose":
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            if perm == [[0, 3, 1, 2]]:
                return "NHWC"
    return None


def inspect_model(model: onnx.ModelProto, options: ModelOptions) -> ModelSpec:
    """Read the input layout, size, batch dimension and output of an image classifier."""
    graph = model.graph
    inputs = graph_inputs(graph)
    if len(inputs) != 1:
        names = ", ".join(v.name for v in inputs) or "none"
        raise UnsupportedModelError(
            f"the model must take exactly one input (an image batch); it takes {len(inputs)}: {names}"
        )
    image = inputs[0]
    dims = _dims(image)
    if len(dims) != 4:
        raise UnsupportedModelError(
            f"input {image.name!r} has rank {len(dims)}; an image classifier takes a rank-4 "
            "batch of images, NCHW or NHWC"
        )
    elem_type = image.type.tensor_type.elem_type
    if elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        raise UnsupportedModelError(
            f"input {image.name!r} has element type "
            f"{onnx.TensorProto.DataType.Name(elem_type)}; a floating-point image is required"
        )
    layout = options.layout if options.layout != "auto" else _detect_layout(graph, image.name, dims)
    if layout is None:
        raise UnsupportedModelError(
            f"cannot tell whether input {image.name!r} with shape {dims} is NCHW or NHWC; "
            "set the layout explicitly"
        )
    c_axis, h_axis, w_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
    channels = dims[c_axis]
    if channels is None:
        raise UnsupportedModelError(f"input {image.name!r} leaves the channel count dynamic")
    height = dims[h_axis] or options.height
    width = dims[w_axis] or options.width
    if height is None or width is None:
        raise UnsupportedModelError(
            f"input {image.name!r} leaves its height/width dynamic ({dims}); set height and width"
        )
    for axis, wanted, setting in (
        (h_axis, options.height, "height"),
        (w_axis, options.width, "width"),
    ):
        if dims[axis] is not None and wanted is not None and dims[axis] != wanted:
            raise UnsupportedModelError(
                f"the model fixes the input {setting} to {dims[axis]}, the settings ask for {wanted}"
            )
    if dims[0] not in (None, 1):
        raise UnsupportedModelError(
            f"input {image.name!r} fixes the batch dimension to {dims[0]}; only 1 or dynamic is supported"
        )

    output = _select_output(graph, options.output)
    out_dims = _dims(output)
    trailing = [d for d in out_dims[2:]]
    num_classes = out_dims[1] if len(out_dims) >= 2 else None
    if (
        len(out_dims) < 2
        or any(d != 1 for d in trailing)
        or (num_classes is not None and num_classes < 2)
    ):
        raise UnsupportedModelError(
            f"output {output.name!r} has shape {out_dims}; a classifier returns scores [N, K] with K >= 2"
        )
    return ModelSpec(
        input_name=image.name,
        layout=layout,
        channels=channels,
        height=height,
        width=width,
        dtype=np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)),
        output_name=output.name,
        num_classes=num_classes or 0,  # 0: only known after the first run
        fixed_batch=dims[0] == 1,
    )


def _select_output(graph: onnx.GraphProto, name: str | None) -> onnx.ValueInfoProto:
    if name is None:
        return graph.output[0]
    for output in graph.output:
        if output.name == name:
            return output
    available = ", ".join(o.name for o in graph.output)
    raise UnsupportedModelError(f"the model has no output {name!r}; its outputs are: {available}")


def ends_in_softmax(graph: onnx.GraphProto, output_name: str) -> bool:
    """Whether the output is produced by a Softmax node, i.e. already probabilities."""
    return any(n.op_type == "Softmax" and output_name in n.output for n in graph.node)
