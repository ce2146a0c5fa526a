"""Graph surgery: masking before the model and top-1 after it, in one ONNX graph.

The composed graph takes a few images, their baselines, N small boolean keep-masks and, per
mask, the index of its image; it returns N top-1 classes and confidences. So a device receives
images once plus masks, and returns two numbers per mutant:

    x = Where(mask[i], images[index[i]], baselines[index[i]]) -> model -> softmax -> top-1

With one image (the common case) the masks broadcast against it and nothing is gathered.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from guard.errors import UnsupportedModelError
from guard.runtime.spec import ModelSpec

OutputKind = Literal["logits", "probabilities"]

IMAGES = "mps_guard_images"
BASELINES = "mps_guard_baselines"
MASKS = "mps_guard_masks"
IMAGE_INDEX = "mps_guard_image_index"
TOP_CLASS = "mps_guard_top_class"
TOP_CONFIDENCE = "mps_guard_top_confidence"
_MIN_OPSET = 10  # TopK with K as an input


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise UnsupportedModelError("the model imports no default ONNX opset")


def compose_masked_model(
    model: onnx.ModelProto, spec: ModelSpec, output_kind: OutputKind
) -> onnx.ModelProto:
    """The model wrapped between masking and top-1 (see module doc); its own output is kept."""
    if default_opset(model) < _MIN_OPSET:
        raise UnsupportedModelError(
            f"the model uses ONNX opset {default_opset(model)}; opset {_MIN_OPSET} or newer is needed"
        )
    composed = copy.deepcopy(model)
    graph = composed.graph
    elem_type = helper.np_dtype_to_tensor_dtype(spec.dtype)
    image_dims = ["images", *spec.input_shape]
    mask_shape = (
        [-1, 1, spec.height, spec.width]
        if spec.layout == "NCHW"
        else [-1, spec.height, spec.width, 1]
    )

    kept_inputs = [v for v in graph.input if v.name != spec.input_name]
    del graph.input[:]
    graph.input.extend(
        [
            helper.make_tensor_value_info(IMAGES, elem_type, image_dims),
            helper.make_tensor_value_info(BASELINES, elem_type, image_dims),
            helper.make_tensor_value_info(
                MASKS, TensorProto.BOOL, ["mutants", spec.height, spec.width]
            ),
            helper.make_tensor_value_info(IMAGE_INDEX, TensorProto.INT64, ["mutants"]),
            *kept_inputs,
        ]
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(mask_shape, dtype=np.int64), "mps_guard_mask_shape"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "mps_guard_flat"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "mps_guard_k"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "mps_guard_zero"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "mps_guard_one"),
        ]
    )
    before = [
        helper.make_node("Reshape", [MASKS, "mps_guard_mask_shape"], ["mps_guard_mask"]),
        helper.make_node("Shape", [IMAGES], ["mps_guard_images_shape"]),
        helper.make_node(
            "Gather", ["mps_guard_images_shape", "mps_guard_zero"], ["mps_guard_image_count"]
        ),
        helper.make_node("Equal", ["mps_guard_image_count", "mps_guard_one"], ["mps_guard_single"]),
        helper.make_node(
            "If",
            ["mps_guard_single"],
            [spec.input_name],
            then_branch=_masking_branch(elem_type, gather=False),
            else_branch=_masking_branch(elem_type, gather=True),
        ),
    ]
    scores = "mps_guard_scores"
    # Outputs such as [N, K, 1, 1] are flattened to [N, K]; plain [N, K] needs no node.
    output = next(o for o in graph.output if o.name == spec.output_name)
    if len(output.type.tensor_type.shape.dim) == 2:
        scores = spec.output_name
        after = []
    else:
        after = [helper.make_node("Flatten", [spec.output_name], [scores], axis=1)]
    if output_kind == "logits":
        after.append(helper.make_node("Softmax", [scores], ["mps_guard_probabilities"], axis=1))
    else:
        after.append(helper.make_node("Identity", [scores], ["mps_guard_probabilities"]))
    after += [
        helper.make_node(
            "TopK",
            ["mps_guard_probabilities", "mps_guard_k"],
            ["mps_guard_top_p", "mps_guard_top_i"],
            axis=1,
        ),
        helper.make_node("Reshape", ["mps_guard_top_i", "mps_guard_flat"], [TOP_CLASS]),
        helper.make_node(
            "Reshape", ["mps_guard_top_p", "mps_guard_flat"], ["mps_guard_top_p_flat"]
        ),
        helper.make_node("Cast", ["mps_guard_top_p_flat"], [TOP_CONFIDENCE], to=TensorProto.FLOAT),
    ]
    nodes = [*before, *graph.node, *after]
    del graph.node[:]
    graph.node.extend(nodes)

    model_output = next(o for o in graph.output if o.name == spec.output_name)
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(TOP_CLASS, TensorProto.INT64, ["mutants"]),
            helper.make_tensor_value_info(TOP_CONFIDENCE, TensorProto.FLOAT, ["mutants"]),
            model_output,
        ]
    )
    return composed


def _masking_branch(elem_type: int, gather: bool) -> onnx.GraphProto:
    """``Where(mask, images, baselines)`` per mutant: one image broadcasts over all masks;
    several are first gathered to one per mask, which costs two more copies of the batch."""
    suffix = "many" if gather else "one"
    sources, nodes = [IMAGES, BASELINES], []
    if gather:
        sources = ["mps_guard_g_images", "mps_guard_g_baselines"]
        nodes = [
            helper.make_node("Gather", [IMAGES, IMAGE_INDEX], [sources[0]], axis=0),
            helper.make_node("Gather", [BASELINES, IMAGE_INDEX], [sources[1]], axis=0),
        ]
    output = f"mps_guard_masked_{suffix}"
    nodes.append(helper.make_node("Where", ["mps_guard_mask", *sources], [output]))
    return helper.make_graph(
        nodes,
        f"mps_guard_{suffix}_image",
        [],
        [helper.make_tensor_value_info(output, elem_type, None)],
    )


def make_batch_dynamic(model: onnx.ModelProto, spec: ModelSpec) -> onnx.ModelProto:
    """Try to turn a batch dimension fixed to 1 into a symbolic one.

    Marks the input's and outputs' first dimension symbolic, drops stale intermediate shapes,
    and rewrites Reshape targets that hard-code the batch as 1 into 0 ("copy the input's
    dimension"). The result must be checked numerically: some graphs cannot be fixed this way.
    """
    edited = copy.deepcopy(model)
    graph = edited.graph
    for value in [*(v for v in graph.input if v.name == spec.input_name), *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "N"
    del graph.value_info[:]

    initializers = {init.name: init for init in graph.initializer}
    constants = {
        node.output[0]: node
        for node in graph.node
        if node.op_type == "Constant" and any(a.name == "value" for a in node.attribute)
    }
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        if any(a.name == "allowzero" and a.i == 1 for a in node.attribute):
            continue
        target = node.input[1]
        if target in initializers:
            tensor = initializers[target]
        elif target in constants:
            tensor = next(a.t for a in constants[target].attribute if a.name == "value")
        else:
            continue
        shape = numpy_helper.to_array(tensor).copy()
        if shape.ndim == 1 and shape.size >= 2 and shape[0] == 1:
            shape[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))
    return edited
