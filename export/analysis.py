"""Static costs of an ONNX graph at batch 1: FLOPs of the compute-heavy ops and bytes of the weights.

Counted ops: Conv, MatMul, Gemm (2 FLOPs per multiply-accumulate), DFT (5 n log2 n per transform).
Elementwise ops are left out: they move bytes, they do not dominate FLOPs. No torch.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference


def param_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initialisers (the weights and folded constants)."""
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def _fix_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") or not d.HasField("dim_value"):
                d.dim_value = 1
    return m


def flops(model: onnx.ModelProto) -> int:
    """FLOPs of one sample (batch 1) through Conv/MatMul/Gemm/DFT nodes, from inferred shapes."""
    m = shape_inference.infer_shapes(_fix_batch(model), data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = tuple(dims)
    for t in m.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    total = 0
    for node in m.graph.node:
        ins = [shapes.get(i, ()) for i in node.input]
        out = shapes.get(node.output[0], ()) if node.output else ()
        if node.op_type == "Conv" and len(ins) >= 2 and out:
            w = ins[1]                                     # [out_ch, in_ch/groups, kh, kw]
            total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("MatMul", "Gemm") and len(ins) >= 2 and out and ins[0]:
            k = ins[0][-1]
            if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
                k = ins[0][0]
            total += 2 * int(np.prod(out)) * k
        elif node.op_type == "DFT" and out:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            n = max(out[axis], 2)
            total += int(5 * np.prod(out[:-1]) * math.log2(n))
    return int(total)
