"""A float32 ONNX graph rewritten to compute in float16 with float32 inputs and outputs: what TensorRT
11 needs for an FP16 engine (its networks are strongly typed, so precision is the graph's types, and
BuilderFlag.FP16 is gone).

Every float32 tensor the graph computes becomes float16: initializers, Constant nodes, ConstantOfShape
values and Cast(to=float) targets. Inputs are cast to float16 right after they enter and outputs back
to float32 before they leave, so the engine's I/O stays what pack.yaml declares. Operands that ONNX
requires to stay float32 whatever the data type (Resize's roi and scales) are left alone. Needs only
`onnx` (no torch): it runs on the target machine, where the engine is built.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import ExportError

# Operands that stay float32 in a float16 graph: (op_type, input index).
FLOAT32_OPERANDS = {("Resize", 1), ("Resize", 2)}


def _float16_tensor(tensor):
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor)
    if np.abs(array[np.isfinite(array)]).max(initial=0) > 65504:
        raise ExportError(f"tensor '{tensor.name}' has values beyond float16's range (max {np.abs(array).max():g})")
    return numpy_helper.from_array(array.astype(np.float16), tensor.name)


def convert_to_float16(model):
    """A copy of `model` computing in float16, with float32 graph inputs and outputs (see the module)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    keep_float32 = set()
    for node in graph.node:
        for i, name in enumerate(node.input):
            if (node.op_type, i) in FLOAT32_OPERANDS and name:
                keep_float32.add(name)
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT and init.name not in keep_float32:
            graph.initializer[i].CopyFrom(_float16_tensor(init))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                if node.op_type == "Constant" and node.output[0] in keep_float32:
                    continue
                attr.t.CopyFrom(_float16_tensor(attr.t))
        if node.op_type in ("If", "Loop", "Scan"):
            raise ExportError(f"node '{node.name}' ({node.op_type}) has a subgraph: float16 conversion does not "
                              "handle control flow")
    casts_in, renamed = [], {}
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            renamed[inp.name] = f"{inp.name}__fp16"
            casts_in.append(helper.make_node("Cast", [inp.name], [renamed[inp.name]], to=TensorProto.FLOAT16,
                                             name=f"{inp.name}__to_fp16"))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    casts_out = []
    for out in graph.output:
        if out.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = f"{out.name}__fp16"
            for node in graph.node:
                for i, name in enumerate(node.output):
                    if name == out.name:
                        node.output[i] = inner
                for i, name in enumerate(node.input):  # an output also read inside the graph
                    if name == out.name:
                        node.input[i] = inner
            casts_out.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT,
                                              name=f"{out.name}__to_fp32"))
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale float32 annotations; shape inference redoes them
    return model


def write_float16(onnx_path: Path, out_path: Path) -> Path:
    """`onnx_path` converted (convert_to_float16), type-checked, and written to `out_path`."""
    try:
        import onnx
    except ImportError as e:
        raise ExportError(f"an FP16 engine on TensorRT 11 needs the onnx package to convert {onnx_path} "
                          f"(pip install onnx): {e}") from None
    model = convert_to_float16(onnx.load(str(onnx_path)))
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # onnx raises InferenceError and friends
        raise ExportError(f"{onnx_path}: the float16 graph does not type-check: {e}") from None
    onnx.save(model, str(out_path))
    return out_path
