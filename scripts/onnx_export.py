"""Write small CNN classifiers as ONNX graphs straight from numpy weights.

The graphs are built with ``onnx.helper`` rather than ``torch.onnx.export`` so that the
demo model, the benchmark models and the test fixtures share one plain, predictable
layout that needs neither torch at runtime nor an exporter's version quirks:

    image [N, C, H, W] -> (Conv 3x3 same + bias -> Relu -> MaxPool 2x2) * k
                       -> Flatten -> (Gemm -> Relu) * (m - 1) -> Gemm -> logits [N, K]

Weights use torch's layouts (Conv ``[out, in, 3, 3]``, Linear ``[out, in]``, applied with
``Gemm(transB=1)``), so a trained torch module's ``state_dict`` arrays drop in unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# IR 8 is the IR version that shipped with opset 17; onnxruntime 1.31 loads it.
IR_VERSION = 8
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
BATCH_DIM = "N"

Dim = int | str
Layer = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class CnnWeights:
    """Weights of a plain CNN: conv stages then dense layers, in torch layouts."""

    convs: tuple[Layer, ...]  # (W [out, in, 3, 3], b [out]) per conv stage
    dense: tuple[Layer, ...]  # (W [out, in], b [out]) per dense layer

    @property
    def in_channels(self) -> int:
        """Number of input channels the first conv expects."""
        return int(self.convs[0][0].shape[1])

    @property
    def num_classes(self) -> int:
        """Width of the final dense layer, i.e. the number of logits."""
        return int(self.dense[-1][0].shape[0])


@dataclass
class GraphPart:
    """Nodes and initializers of a graph fragment, plus the name of its output tensor."""

    nodes: list[onnx.NodeProto]
    initializers: list[TensorProto]
    output: str


def _f32(array: np.ndarray, name: str) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def conv_stack(convs: Sequence[Layer], input_name: str, prefix: str = "") -> GraphPart:
    """Conv(3x3, pad 1) -> Relu -> MaxPool(2x2) for each conv stage."""
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    x = input_name
    for i, (w, b) in enumerate(convs):
        if w.ndim != 4 or w.shape[2:] != (3, 3) or b.shape != (w.shape[0],):
            raise ValueError(
                f"conv {i}: expected W [out, in, 3, 3] and b [out], got {w.shape} and {b.shape}"
            )
        p = f"{prefix}conv{i}"
        inits += [_f32(w, f"{p}.weight"), _f32(b, f"{p}.bias")]
        nodes += [
            helper.make_node(
                "Conv",
                [x, f"{p}.weight", f"{p}.bias"],
                [f"{p}.out"],
                name=p,
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", [f"{p}.out"], [f"{p}.relu"], name=f"{p}.relu"),
            helper.make_node(
                "MaxPool",
                [f"{p}.relu"],
                [f"{p}.pool"],
                name=f"{p}.pool",
                kernel_shape=[2, 2],
                strides=[2, 2],
            ),
        ]
        x = f"{p}.pool"
    return GraphPart(nodes, inits, x)


def dense_head(
    dense: Sequence[Layer], input_name: str, output_name: str = OUTPUT_NAME, prefix: str = ""
) -> GraphPart:
    """Gemm(transB=1) layers with Relu between them; the last Gemm writes ``output_name``."""
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    x = input_name
    for i, (w, b) in enumerate(dense):
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(
                f"dense {i}: expected W [out, in] and b [out], got {w.shape} and {b.shape}"
            )
        p = f"{prefix}fc{i}"
        last = i == len(dense) - 1
        out = output_name if last else f"{p}.out"
        inits += [_f32(w, f"{p}.weight"), _f32(b, f"{p}.bias")]
        nodes.append(
            helper.make_node("Gemm", [x, f"{p}.weight", f"{p}.bias"], [out], name=p, transB=1)
        )
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"{p}.relu"], name=f"{p}.relu"))
            x = f"{p}.relu"
    return GraphPart(nodes, inits, output_name)


def cnn_body(
    weights: CnnWeights, input_name: str, output_name: str = OUTPUT_NAME, prefix: str = ""
) -> GraphPart:
    """The whole CNN (conv stack, Flatten, dense head) from ``input_name`` to ``output_name``."""
    convs = conv_stack(weights.convs, input_name, prefix)
    flat = f"{prefix}flatten"
    head = dense_head(weights.dense, flat, output_name, prefix)
    flatten = helper.make_node("Flatten", [convs.output], [flat], name=flat, axis=1)
    return GraphPart(
        convs.nodes + [flatten] + head.nodes, convs.initializers + head.initializers, output_name
    )


def tensor_info(name: str, shape: Sequence[Dim]) -> onnx.ValueInfoProto:
    """A float32 graph input/output description; string dims are symbolic."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def make_model(
    nodes: Sequence[onnx.NodeProto],
    initializers: Sequence[TensorProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    graph_name: str = "cnn",
) -> onnx.ModelProto:
    """Wrap a graph into a checked opset-17 model at IR version 8."""
    graph = helper.make_graph(
        list(nodes), graph_name, list(inputs), list(outputs), initializer=list(initializers)
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mps-guard"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def build_cnn(weights: CnnWeights, height: int, width: int) -> onnx.ModelProto:
    """The plain CNN as a model: ``image [N, C, H, W]`` -> ``logits [N, K]``."""
    body = cnn_body(weights, INPUT_NAME)
    return make_model(
        body.nodes,
        body.initializers,
        [tensor_info(INPUT_NAME, [BATCH_DIM, weights.in_channels, height, width])],
        [tensor_info(OUTPUT_NAME, [BATCH_DIM, weights.num_classes])],
    )


def save_cnn(weights: CnnWeights, height: int, width: int, path: str | Path) -> Path:
    """Build the plain CNN and write it to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(build_cnn(weights, height, width), str(path))
    return path


def read_cnn_weights(model: onnx.ModelProto | str | Path) -> CnnWeights:
    """Read the conv and dense weights back from a model written by :func:`build_cnn`.

    Conv and Gemm nodes are taken in graph order; their weight and bias inputs must be
    initializers.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load_model(str(model))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs: list[Layer] = []
    dense: list[Layer] = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        w, b = arrays[node.input[1]], arrays[node.input[2]]
        (convs if node.op_type == "Conv" else dense).append((w, b))
    if not convs or not dense:
        raise ValueError("model has no Conv or no Gemm layers; not a plain CNN")
    return CnnWeights(tuple(convs), tuple(dense))
