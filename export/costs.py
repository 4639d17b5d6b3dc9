"""Operator-level costs of ONNX graphs at batch 1, by kind of operator: FLOPs, bytes moved, node count.

What the latency predictor (`edgeflex.devices.predictor`) reads from a bundle's manifest (`config["costs"]`).
Shapes come from ONNX shape inference with the batch dimension fixed to 1; initialisers give their dims even
when their data is external. Counting rules (one place, so every number can be checked by hand):

- Kinds: conv, dwconv (groups = channels), matmul, elementwise, norm (normalisations, reductions, pools),
  data (movement only), dft, other.
- FLOPs: Conv/ConvTranspose 2 x output elements x (in_channels/groups x kernel); MatMul/Gemm 2 x output
  elements x K (Gemm + bias: + output elements); elementwise 1 per output element; normalisations and
  reductions a few per input element (`_NORM_FLOPS`), windowed pools output elements x window; DFT of a
  power-of-two length n: 5 n log2 n per transform (radix-2 FFT); of any other length what ONNX Runtime
  runs, Bluestein's algorithm: three FFTs of M = the power of two >= 2n - 1, 15 M log2 M per transform,
  plus a chirp set up once per node, counted apart as the kind's `setup_flops` (8 M) because it does not
  grow with the number of transforms (measured on ORT 1.32, one thread either way: n = 720 and 816, both
  M = 2048, cost the same per transform and per call, and smaller n less, as Bluestein predicts and a direct
  DFT does not; benchmarks/RESULTS.md, Latency predictor); data movement 0.
- Bytes: every input (weights included) and every output, each tensor at its own element size, once per node
  that touches it. An upper bound on DRAM traffic: engines fuse nodes and keep tensors in cache.
- Padding waste (`pad_flops`): CPU GEMM kernels block channels by the SIMD width (ONNX Runtime's NCHWc
  convolutions by 16 floats with AVX-512), so a Conv runs as if its output and input channels (per group)
  were rounded up to multiples of `PAD_BLOCK` (input channels under `UNBLOCKED_INPUT` are read unblocked, as
  ORT's NCHW-input first-layer kernel does), and a MatMul/Gemm its K and N: `pad_flops` is the FLOPs of
  that rounding. Measured here, it took the latency predictor's leave-one-out from 74 % to 81 % within
  +-10 % (plain 3x3 CNNs at width 8 run at a fraction of the FLOP rate they reach at width 32;
  benchmarks/RESULTS.md, Latency predictor). 16 is the host's block; other devices' (8 with AVX2, 4 with
  NEON) differ, one of the reasons a transfer is unvalidated.
- Small ops (`small_flops`, `small_nodes`): the FLOPs and the number of nodes with fewer than
  `SMALL_OP_FLOPS` FLOPs. At 2 threads such an op runs on one thread, or pays a fork/join worth more than
  its work; at 1 thread it costs what its FLOPs say. These took the predictor's leave-one-out at 2 threads
  from 79-81 % to 84-87 % within +-10 % on this host (1 thread: unchanged, 89-92 %; benchmarks/RESULTS.md,
  Latency predictor).
- Nodes that no engine runs (Identity, Constant, Dropout: removed at load) are counted apart as `free_nodes`,
  so two exporters of one model give the same costs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import shape_inference

COSTS_VERSION = 2
PAD_BLOCK = 16
UNBLOCKED_INPUT = 8
SMALL_OP_FLOPS = 1_000_000
KINDS = ("conv", "dwconv", "matmul", "elementwise", "norm", "data", "dft", "other")

_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Erf", "Relu",
    "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign",
    "Clip", "Max", "Min", "Mean", "Sum", "Where", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
    "And", "Or", "Not", "Xor", "Sign", "Floor", "Ceil", "Round", "Mod", "Cast", "CastLike", "IsNaN", "IsInf",
    "Sin", "Cos", "Tan", "Atan", "Mish", "ThresholdedRelu", "BitShift", "QuantizeLinear", "DequantizeLinear",
    "Trilu",
}
# FLOPs per element of the largest input (normalisations: mean, variance, scale, shift; softmax: exp, sum,
# div).
_NORM_FLOPS = {
    "BatchNormalization": 2, "LayerNormalization": 5, "InstanceNormalization": 5, "GroupNormalization": 5,
    "RMSNormalization": 4, "SimplifiedLayerNormalization": 4, "SkipLayerNormalization": 6,
    "LpNormalization": 3, "MeanVarianceNormalization": 5, "Softmax": 3, "LogSoftmax": 4, "Hardmax": 1,
    "ReduceSum": 1, "ReduceMean": 1, "ReduceMax": 1, "ReduceMin": 1, "ReduceProd": 1, "ReduceL1": 2,
    "ReduceL2": 2, "ReduceSumSquare": 2, "ReduceLogSum": 1, "ReduceLogSumExp": 2, "ArgMax": 1, "ArgMin": 1,
    "GlobalAveragePool": 1, "GlobalMaxPool": 1, "GlobalLpPool": 2, "CumSum": 1, "TopK": 1,
}
_POOLS = {"AveragePool", "MaxPool", "LpPool"}
_DATA = {
    "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "Squeeze",
    "Unsqueeze", "Flatten", "Expand", "Pad", "Tile", "Identity", "Shape", "Size", "Constant",
    "ConstantOfShape",
    "Range", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth", "ScatterND", "ScatterElements", "Scatter",
    "OneHot", "NonZero", "Compress", "ReverseSequence", "EyeLike", "Dropout",
}
_FREE = {"Identity", "Constant", "Dropout"}
_MATMUL = {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "Einsum"}
_DFT = {"DFT", "STFT"}
_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
             onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4,
             onnx.TensorProto.INT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
             onnx.TensorProto.BOOL: 1, onnx.TensorProto.COMPLEX64: 8}


def _with_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None) -> onnx.ModelProto:
    """A copy whose graph inputs have the batch dimension (the first, when symbolic or unset) fixed to 1, or
    the shapes given in `input_shapes`, and nothing else changed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if input_shapes and vi.name in input_shapes:
            want = input_shapes[vi.name]
            del dims[:]
            for v in want:
                dims.add().dim_value = int(v)
        elif len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    # Outputs are re-inferred: a stale symbolic output shape would otherwise win over the inferred one.
    for vi in m.graph.output:
        vi.type.tensor_type.ClearField("shape")
    del m.graph.value_info[:]
    return m


def _shapes(m: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...] | None], dict[str, int]]:
    """name -> static shape (None where not fully known) and name -> element size in bytes."""
    try:
        inferred = shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 - data propagation fails on some graphs; plain inference is the fallback
        inferred = shape_inference.infer_shapes(m)
    shapes: dict[str, tuple[int, ...] | None] = {}
    sizes: dict[str, int] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        sizes[vi.name] = _ITEMSIZE.get(tt.elem_type, 4)
        if not tt.HasField("shape"):
            shapes[vi.name] = None
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        shapes[vi.name] = None if any(d < 0 for d in dims) else tuple(dims)
    for t in inferred.graph.initializer:
        shapes[t.name] = tuple(t.dims)
        sizes[t.name] = _ITEMSIZE.get(t.data_type, 4)
    for node in inferred.graph.node:               # Constant nodes carry their tensor
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t is not None:
                    shapes[node.output[0]] = tuple(a.t.dims)
                    sizes[node.output[0]] = _ITEMSIZE.get(a.t.data_type, 4)
    return shapes, sizes


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _numel(shape: tuple[int, ...] | None) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape is not None else 0


def op_kind(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...] | None] | None = None) -> str:
    """The kind of `node` (one of KINDS). A Conv whose groups equal its input channels is `dwconv`."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose", "QLinearConv", "ConvInteger"):
        group = _attr(node, "group", 1)
        w = (shapes or {}).get(node.input[1]) if len(node.input) > 1 else None
        if group > 1 and w is not None and len(w) >= 2 and w[1] == 1 and op == "Conv":
            return "dwconv"
        return "conv"
    if op in _MATMUL:
        return "matmul"
    if op in _ELEMENTWISE:
        return "elementwise"
    if op in _NORM_FLOPS or op in _POOLS:
        return "norm"
    if op in _DATA:
        return "data"
    if op in _DFT:
        return "dft"
    return "other"


def _flops(node: onnx.NodeProto, kind: str, ins: list, out: tuple[int, ...] | None) -> int:
    op = node.op_type
    if out is None:
        return 0
    n_out = _numel(out)
    if kind in ("conv", "dwconv"):
        w = ins[1] if len(ins) > 1 else None
        if w is None or len(w) < 3:
            return 0
        if op == "ConvTranspose":                   # w: [in, out/groups, k...]: each input feeds a window
            return 2 * _numel(ins[0]) * int(np.prod(w[1:])) if ins[0] is not None else 0
        bias = n_out if len(node.input) > 2 and node.input[2] else 0
        return 2 * n_out * int(np.prod(w[1:])) + bias
    if kind == "matmul":
        a = ins[0] if ins else None
        if a is None or not a:
            return 0
        if op == "Einsum":
            return 2 * n_out                         # a lower bound: the contraction size is not parsed
        k = a[0] if op == "Gemm" and _attr(node, "transA", 0) else a[-1]
        bias = n_out if op == "Gemm" and len(node.input) > 2 and node.input[2] else 0
        return 2 * n_out * int(k) + bias
    if kind == "elementwise":
        return n_out
    if kind == "norm":
        if op in _POOLS:
            return n_out * int(np.prod(_attr(node, "kernel_shape", [1])))
        biggest = max((_numel(s) for s in ins if s is not None), default=0)
        return _NORM_FLOPS.get(op, 1) * biggest
    if kind == "dft":
        axis = _attr(node, "axis", 1)
        x = ins[0] if ins else None
        if x is None or len(out) < 2 or not -len(x) <= axis < len(x):
            return 0
        n = int(x[axis])                              # the transform length (input side)
        transforms = int(np.prod(out[:-1], dtype=np.int64)) // max(int(out[axis]), 1)
        if n & (n - 1) == 0:
            return int(5 * transforms * n * max(math.log2(n), 1))  # radix-2 FFT
        m = _bluestein_length(n)
        return int(15 * transforms * m * math.log2(m))    # Bluestein: three FFTs of length m per transform
    return 0


def _bluestein_length(n: int) -> int:
    """The FFT length Bluestein's algorithm pads a length-n DFT to: the power of two >= 2n - 1."""
    return 1 << max(2 * n - 2, 1).bit_length()


def _setup_flops(node: onnx.NodeProto, kind: str, ins: list) -> int:
    """Work done once per node whatever the batch: a non-power-of-two DFT's Bluestein chirp (8 M)."""
    if kind != "dft" or not ins or ins[0] is None:
        return 0
    axis = _attr(node, "axis", 1)
    if not -len(ins[0]) <= axis < len(ins[0]):
        return 0
    n = int(ins[0][axis])
    return 0 if n & (n - 1) == 0 else 8 * _bluestein_length(n)


def _pad_flops(node: onnx.NodeProto, kind: str, ins: list, out: tuple[int, ...] | None, flops: int) -> int:
    """The extra FLOPs of running a Conv / MatMul with its channel dimensions rounded up to PAD_BLOCK."""

    def up(v: int) -> int:
        return -(-int(v) // PAD_BLOCK) * PAD_BLOCK

    if kind == "conv" and len(ins) > 1 and ins[1] is not None and len(ins[1]) >= 3:
        co, ci = int(ins[1][0]), int(ins[1][1])
        if min(co, ci) < 1:
            return 0
        padded = flops * up(co) // co
        return (padded * up(ci) // ci if ci >= UNBLOCKED_INPUT else padded) - flops
    if kind == "matmul" and ins and ins[0] and out:
        k = ins[0][0] if node.op_type == "Gemm" and _attr(node, "transA", 0) else ins[0][-1]
        k, n = int(k), int(out[-1])
        return flops * up(k) * up(n) // (k * n) - flops if min(k, n) >= 1 else 0
    return 0


def _empty() -> dict[str, dict[str, int]]:
    return {k: {"flops": 0, "bytes": 0, "nodes": 0, "pad_flops": 0, "setup_flops": 0,
                "small_flops": 0, "small_nodes": 0} for k in KINDS}


def graph_costs(model: onnx.ModelProto,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Costs of one ONNX graph at batch 1 (or at `input_shapes`, name -> full shape, where given).

    Returns {"version", "batch", "per_kind": {kind: {"flops", "bytes", "nodes"}}, "total": {...},
    "weight_bytes", "unresolved_nodes": nodes whose output shape inference could not resolve (their FLOPs
    count as 0), "free_nodes": Identity/Constant/Dropout nodes, not counted}.
    """
    m = _with_shapes(model, input_shapes)
    shapes, sizes = _shapes(m)
    per_kind = _empty()
    unresolved = free = 0
    for node in m.graph.node:
        if node.op_type in _FREE:
            free += 1
            continue
        kind = op_kind(node, shapes)
        ins = [shapes.get(i) if i else None for i in node.input]
        outs = [shapes.get(o) if o else None for o in node.output]
        if node.output and outs[0] is None and kind != "data":
            unresolved += 1
        moved = sum(_numel(s) * sizes.get(n, 4) for n, s in zip(node.input, ins) if n) + \
            sum(_numel(s) * sizes.get(n, 4) for n, s in zip(node.output, outs) if n)
        k = per_kind[kind]
        flops = _flops(node, kind, ins, outs[0] if outs else None)
        k["flops"] += flops
        k["pad_flops"] += _pad_flops(node, kind, ins, outs[0] if outs else None, flops)
        if 0 < flops < SMALL_OP_FLOPS:
            k["small_flops"] += flops
            k["small_nodes"] += 1
        k["setup_flops"] += _setup_flops(node, kind, ins)
        k["bytes"] += int(moved)
        k["nodes"] += 1
    weight_bytes = sum(_numel(tuple(t.dims)) * _ITEMSIZE.get(t.data_type, 4) for t in m.graph.initializer)
    return {"version": COSTS_VERSION, "batch": 1, "per_kind": per_kind, "total": _total(per_kind),
            "weight_bytes": int(weight_bytes), "unresolved_nodes": unresolved, "free_nodes": free}


def _total(per_kind: dict[str, dict[str, int]]) -> dict[str, int]:
    return {f: int(sum(k[f] for k in per_kind.values())) for f in ("flops", "bytes", "nodes")}


def config_costs(graphs: list[onnx.ModelProto]) -> dict[str, Any]:
    """Costs of one config that runs `graphs` in order (one engine call each): the graphs' costs summed, and
    `engine_calls` = len(graphs), and its fused `kernels` (`export.kernels.manifest_kernels`, for the
    kernel-level predictor). This is what goes into the manifest as config["costs"]."""
    if not graphs:
        raise ValueError("config_costs needs at least one graph")
    per_kind = _empty()
    sums = {"weight_bytes": 0, "unresolved_nodes": 0, "free_nodes": 0}
    for g in graphs:
        c = graph_costs(g)
        for kind, v in c["per_kind"].items():
            for f in ("flops", "bytes", "nodes", "pad_flops", "setup_flops", "small_flops", "small_nodes"):
                per_kind[kind][f] += v.get(f, 0)
        for key in sums:
            sums[key] += c[key]
    from .kernels import manifest_kernels  # kernels.py builds on this module's costs

    return {"version": COSTS_VERSION, "batch": 1, "per_kind": per_kind, "total": _total(per_kind), **sums,
            "engine_calls": len(graphs), "kernels": manifest_kernels(graphs)}
