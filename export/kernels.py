"""The kernels an ONNX graph runs as, for the kernel-level latency predictor (`devices/kernel_predictor.py`,
nn-Meter's method): fused units as a CPU engine runs them, each with its costs and a standalone graph that
can be timed on the device. Owns detection and graph extraction; timing and fitting live in devices/.

Fusion rules (what ONNX Runtime fuses on CPU): a Conv / MatMul / Gemm / normalisation / DFT / data node
heads a unit and absorbs the elementwise nodes that follow it one by one while each intermediate result has
a single consumer and the absorbed node's other inputs are constants (bias Add, ReLU, Clip, a scale Mul),
or, right after a Conv, an Add of a same-shaped tensor (a residual: ORT's NCHWc Conv adds it in place);
an elementwise node heads a chain that absorbs any elementwise successors (the star op's Mul of two
branches included). Identity/Constant/Dropout run as nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from .costs import (
    _FREE,
    SMALL_OP_FLOPS,
    _flops,
    _numel,
    _pad_flops,
    _setup_flops,
    _shapes,
    _with_shapes,
    op_kind,
)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - data propagation fails on some graphs; plain inference is the fallback
        return shape_inference.infer_shapes(model)


def detect_kernels(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                   *, with_graphs: bool = False) -> list[dict[str, Any]]:
    """The fused kernels of `model` at batch 1 (or `input_shapes`), in graph order.

    Each: {"kind" (one of costs.KINDS, the head node's), "ops" ("Conv+Relu"), "flops", "bytes" (external
    inputs, weights and outputs, once), "weight_bytes" (its constant inputs), "pad_flops", "setup_flops",
    "small" (1 if under SMALL_OP_FLOPS), "key" (kind, ops and every input shape and attribute: equal keys
    are the same kernel), "dims" (the head's shape: `_dims`), "nodes" and "outputs" (its node names and
    output tensors, to find it in ONNX Runtime's profile; name unnamed nodes with `name_nodes` first),
    "producer" (the index of the kernel whose output it reads first, None where it reads only the graph's
    inputs)}; with `with_graphs`, also "graph": the kernel as a standalone ONNX graph (serialised), None
    where one of its inputs is not a float tensor of known shape (it cannot be fed random data), and
    "pair_graph": the producer and the kernel as one such graph (`_pair_graph`; None without a producer)."""
    m = _infer(_with_shapes(model, input_shapes))
    shapes, sizes = _shapes(m)
    infos = {vi.name: vi for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]}
    inits = {t.name: t for t in m.graph.initializer}
    const_nodes = {o: n for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    # an Identity of a weight (torch's shared parameters) is a constant too; the kernel graph keeps it
    for n in m.graph.node:
        if n.op_type in _FREE and n.op_type != "Constant" and n.input and \
                n.input[0] in inits | const_nodes.keys():
            const_nodes.update(dict.fromkeys(n.output, n))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in m.graph.output}

    def constant(name: str) -> bool:
        return not name or name in inits or name in const_nodes

    taken: set[int] = set()
    units: list[list[onnx.NodeProto]] = []
    for node in m.graph.node:
        if id(node) in taken or node.op_type in _FREE:
            continue
        unit, head_kind = [node], op_kind(node, shapes)
        taken.add(id(node))
        while len(unit[-1].output) == 1:
            out = unit[-1].output[0]
            nxt = consumers.get(out, [])
            if len(nxt) != 1 or out in graph_outputs or id(nxt[0]) in taken:
                break
            cand = nxt[0]
            if op_kind(cand, shapes) != "elementwise":
                break
            others = [i for i in cand.input if i != out]
            # a residual Add right after a Conv runs inside it (ORT's NCHWc Conv sums into its output)
            residual = (head_kind in ("conv", "dwconv") and len(unit) == 1 and cand.op_type == "Add"
                        and len(others) == 1 and shapes.get(others[0]) == shapes.get(out))
            if head_kind != "elementwise" and not residual and not all(constant(i) for i in others):
                break
            # every other input must already exist (no node later in the graph feeds it)
            if any(i and i not in inits and i not in const_nodes and i not in infos for i in others):
                break
            unit.append(cand)
            taken.add(id(cand))
        units.append(unit)
    ks = [_describe(u, shapes, sizes, infos, inits, const_nodes, m, with_graphs) for u in units]
    # the kernel whose output each kernel reads first (its producer), and the two as one graph
    made_by = {o: i for i, u in enumerate(units) for n in u for o in n.output if o}
    for j, u in enumerate(units):
        ins = [i for i in _ends(u)[0] if not constant(i)]
        p = next((made_by[i] for i in ins if i in made_by), None)
        ks[j]["producer"] = p
        if with_graphs:
            ks[j]["pair_graph"] = None if p is None else _pair_graph(units[p], u, shapes, infos, inits,
                                                                      const_nodes, m)
    return ks


def _pair_graph(first: list[onnx.NodeProto], second: list[onnx.NodeProto], shapes: dict, infos: dict,
                inits: dict, const_nodes: dict, m: onnx.ModelProto) -> bytes | None:
    """A kernel and its producer as one standalone graph: the second kernel runs on what the first just
    wrote, in the same engine run, as inside its config (the producer's other outputs stay graph outputs)."""
    unit = [*first, *second]
    return _standalone(unit, *_ends(unit), shapes, infos, inits, const_nodes, m)


def _ends(unit: list[onnx.NodeProto]) -> tuple[list[str], list[str]]:
    """A unit's external inputs (in order, once each: weights and constants included) and the outputs no
    node of it reads."""
    produced = {o for n in unit for o in n.output}
    used = {i for n in unit for i in n.input}
    ext_in = list(dict.fromkeys(i for n in unit for i in n.input if i and i not in produced))
    return ext_in, [o for n in unit for o in n.output if o and o not in used]


def _describe(unit: list[onnx.NodeProto], shapes: dict, sizes: dict, infos: dict, inits: dict,
              const_nodes: dict, m: onnx.ModelProto, with_graphs: bool) -> dict[str, Any]:
    head = unit[0]
    kind = op_kind(head, shapes)
    ext_in, outs = _ends(unit)
    flops = pad = setup = 0
    for n in unit:
        k = op_kind(n, shapes)
        ins = [shapes.get(i) if i else None for i in n.input]
        out = shapes.get(n.output[0]) if n.output else None
        f = _flops(n, k, ins, out)
        flops += f
        pad += _pad_flops(n, k, ins, out, f)
        setup += _setup_flops(n, k, ins)
    moved = sum(_numel(shapes.get(t)) * sizes.get(t, 4) for t in [*ext_in, *outs])
    weights = sum(_numel(shapes.get(t)) * sizes.get(t, 4) for t in ext_in if t in inits or t in const_nodes)
    attrs = [(a.name, str(helper.get_attribute_value(a))) for n in unit for a in n.attribute]
    dims = _dims(head, kind, [shapes.get(i) if i else None for i in head.input],
                 shapes.get(head.output[0]) if head.output else None)
    key = f"{kind}|{'+'.join(n.op_type for n in unit)}|{[shapes.get(i) for i in ext_in]}|{attrs}"
    k = {"kind": kind, "ops": "+".join(n.op_type for n in unit), "flops": int(flops), "bytes": int(moved),
         "weight_bytes": int(weights), "pad_flops": int(pad), "setup_flops": int(setup),
         "small": int(0 < flops < SMALL_OP_FLOPS), "key": key, "dims": dims,
         # what ONNX Runtime's profiler names the unit's nodes after (devices/kernel_predictor.in_context)
         "nodes": [n.name for n in unit if n.name], "outputs": [o for n in unit for o in n.output if o]}
    if with_graphs:
        k["graph"] = _standalone(unit, ext_in, outs, shapes, infos, inits, const_nodes, m)
    return k


def _dims(head: onnx.NodeProto, kind: str, ins: list, out: tuple[int, ...] | None) -> list[int]:
    """The head node's shape in the few numbers its kernel's speed depends on: a Conv's [in channels, out
    channels, input pixels, kernel taps, stride], a MatMul/Gemm's [M, K, N], a Transpose's [input elements,
    output elements, contiguous runs it moves] (elements over _transpose_run; a Transpose that is a copy
    has no third number, like the other copies, Reshape and Flatten), else [input elements, output
    elements]; 0 where unknown."""
    x, w = (ins + [None, None])[:2]
    if head.op_type == "Transpose" and x:
        perm = next((list(a.ints) for a in head.attribute if a.name == "perm"), None)
        runs = _numel(x) // max(_transpose_run(list(x), perm), 1)
        return [_numel(x), _numel(out) if out else 0, *([runs] if runs > 1 else [])]
    if kind in ("conv", "dwconv") and x and w and len(x) >= 3 and len(w) >= 3:
        strides = next((list(a.ints) for a in head.attribute if a.name == "strides"), [1])
        return [int(x[1]), int(w[0]), _numel(x[2:]), _numel(w[2:]), int(max(strides or [1]))]
    if kind == "matmul" and x and w and len(w) >= 2:
        trans_b = next((a.i for a in head.attribute if a.name == "transB"), 0)
        k = int(x[-1])
        n = int(w[-2] if trans_b else w[-1])
        return [max(_numel(x) // max(k, 1), 1), k, n]
    return [_numel(x) if x else 0, _numel(out) if out else 0]


def _transpose_run(shape: list[int], perm: list[int] | None) -> int:
    """How many elements a Transpose of `shape` by `perm` moves as one contiguous run: the trailing axes
    (of size > 1) that stay last and in order. A Transpose that only moves axes of size 1 is a copy (its
    run is every element; ORT runs it in a fraction of a real one's time), and two Transposes of equal
    sizes tell apart (issue 22: (1, 96, 1) by [0, 2, 1] took 0.4 µs at 2 threads, (1, 3, 16, 2) by
    [0, 1, 3, 2] 4.0 µs; equal in every other field, the predictor timed both at their median)."""
    perm = list(range(len(shape)))[::-1] if not perm else perm
    if sorted(perm) != list(range(len(shape))):
        return 0
    kept = [a for a in range(len(shape)) if shape[a] > 1]
    moved = [a for a in perm if shape[a] > 1]
    run = 1
    while kept and moved and kept[-1] == moved[-1]:
        run *= int(shape[kept.pop()])
        moved.pop()
    return run


def _standalone(unit: list[onnx.NodeProto], ext_in: list[str], outs: list[str], shapes: dict, infos: dict,
                inits: dict, const_nodes: dict, m: onnx.ModelProto) -> bytes | None:
    inputs, inis, nodes = [], [], []
    for name in ext_in:
        if name in inits:
            inis.append(inits[name])
        elif name in const_nodes:
            n = const_nodes[name]
            nodes.append(n)
            for i in n.input:                       # an Identity's weight, or a Constant's (none)
                if i in inits:
                    inis.append(inits[i])
                elif i in const_nodes:
                    nodes.insert(0, const_nodes[i])
        else:
            vi = infos.get(name)
            if vi is None or shapes.get(name) is None or \
                    vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                return None
            inputs.append(vi)
    outputs = [infos.get(o) or helper.make_empty_tensor_value_info(o) for o in outs]
    g = helper.make_graph([*nodes, *unit], "kernel", inputs, outputs, inis)
    model = helper.make_model(g, opset_imports=list(m.opset_import), ir_version=m.ir_version)
    return model.SerializeToString()


def replicate(graph: bytes, copies: int) -> bytes:
    """A kernel's standalone graph as `copies` independent copies in one graph (inputs, weights, constants
    and outputs suffixed `__c<i>`), so ONNX Runtime runs them one after another in one run, its pool kept
    busy between them as inside a config; each copy has its own inputs and weights, so ORT's
    common-subexpression elimination cannot merge them. (T(copies) - T(1)) / (copies - 1) is then the
    kernel's time without the per-run costs a kernel timed alone pays."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    m = onnx.load_from_string(graph)
    g = m.graph
    out = onnx.GraphProto(name=f"{g.name}_x{copies}")

    def names(c: int, tensor: str) -> str:
        return f"{tensor}__c{c}" if tensor else tensor

    for c in range(copies):
        for vi in g.input:
            v = out.input.add()
            v.CopyFrom(vi)
            v.name = names(c, vi.name)
        for t in g.initializer:
            v = out.initializer.add()
            v.CopyFrom(t)
            v.name = names(c, t.name)
        for n in g.node:
            v = out.node.add()
            v.CopyFrom(n)
            if n.name:
                v.name = names(c, n.name)
            v.input[:] = [names(c, i) for i in n.input]
            v.output[:] = [names(c, o) for o in n.output]
        for vi in g.output:
            v = out.output.add()
            v.CopyFrom(vi)
            v.name = names(c, vi.name)
    m.graph.CopyFrom(out)
    return m.SerializeToString()


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every unnamed node named (`<op>_<index>`, unique), in place: ONNX Runtime's profiler
    reports nodes by name, and names fused unnamed nodes ambiguously ("fused ")."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
    return model


GRAPH_FIELDS = ("graph", "pair_graph")


def without_graphs(k: dict[str, Any]) -> dict[str, Any]:
    """A kernel's description without its standalone graphs (GRAPH_FIELDS)."""
    return {f: v for f, v in k.items() if f not in GRAPH_FIELDS}


def config_kernels(graphs: list[onnx.ModelProto], *, with_graphs: bool = False) -> list[dict[str, Any]]:
    """The kernels of a config that runs `graphs` in order (one engine call each), each tagged with the
    index of its graph (`call`)."""
    out: list[dict[str, Any]] = []
    for i, g in enumerate(graphs):
        ks = detect_kernels(g, with_graphs=with_graphs)
        # producers as indices into the config's list (a kernel's producer is in its own engine call)
        out += [k | {"call": i, "producer": None if k["producer"] is None else len(out) + k["producer"]}
                for k in ks]
    return out




# what a bundle's manifest keeps of each kernel (config["costs"]["kernels"]): the predictor's inputs and
# the names that find it in ONNX Runtime's profile; not its key (long, and equal keys give equal rows)
MANIFEST_FIELDS = ("kind", "ops", "flops", "bytes", "weight_bytes", "pad_flops", "setup_flops", "small",
                   "dims", "call", "producer", "nodes", "outputs")


def manifest_kernels(graphs: list[onnx.ModelProto]) -> list[dict[str, Any]]:
    """The kernels of a config that runs `graphs`, as the manifest stores them (MANIFEST_FIELDS); [] where a
    graph's shapes cannot be inferred (the kernel predictor then does not apply to it)."""
    try:
        ks = config_kernels(graphs)
    except Exception:  # noqa: BLE001 - shape inference fails on some graphs; the predictor then falls back
        return []
    return [{f: k[f] for f in MANIFEST_FIELDS if f in k} for k in ks]


# Shapes drawn by `sample_kernels` (nn-Meter samples each kind's shapes around those of real models):
# log-uniform between the bounds; kernels over MAX_SAMPLE_FLOPS are drawn again (none in edge models).
MAX_SAMPLE_FLOPS = 60_000_000
_SAMPLE_KINDS = ("conv", "dwconv", "matmul", "gemm", "elementwise")


def _log_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _sample_graph(rng: np.random.Generator, kind: str) -> onnx.ModelProto:
    f32 = onnx.TensorProto.FLOAT

    def w(name: str, shape: list[int]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32), name)

    act = rng.choice(["", "Relu", "Clip"])
    inits, nodes = [], []
    if kind in ("conv", "dwconv"):
        c, hw, k = _log_int(rng, 3, 512), _log_int(rng, 4, 224), int(rng.choice([1, 3, 3, 7]))
        co = c if kind == "dwconv" else _log_int(rng, 8, 512)
        stride = int(rng.choice([1, 1, 2]))
        group = c if kind == "dwconv" else 1
        inits += [w("W", [co, c // group, k, k]), w("B", [co])]
        nodes.append(helper.make_node("Conv", ["x", "W", "B"], ["h"], kernel_shape=[k, k], group=group,
                                      strides=[stride, stride], pads=[k // 2] * 4))
        x_shape = [1, c, hw, hw]
    elif kind in ("matmul", "gemm"):
        m, kk, n = int(rng.choice([1, 1, 3, 7, 16])), _log_int(rng, 16, 4096), _log_int(rng, 8, 4096)
        if kind == "gemm":
            inits += [w("W", [n, kk]), w("B", [n])]
            nodes.append(helper.make_node("Gemm", ["x", "W", "B"], ["h"], transB=1))
            x_shape = [m, kk]
        else:
            inits.append(w("W", [kk, n]))
            nodes.append(helper.make_node("MatMul", ["x", "W"], ["h"]))
            x_shape = [1, m, kk]
    else:
        c, hw = _log_int(rng, 8, 512), _log_int(rng, 4, 112)
        x_shape = [1, c, hw, hw]
        nodes.append(helper.make_node(str(rng.choice(["Mul", "Add"])), ["x", "x2"], ["h"]))
        act = ""
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["h"], ["y"]))
    elif act == "Clip":
        inits += [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
        nodes.append(helper.make_node("Clip", ["h", "lo", "hi"], ["y"]))
    else:
        nodes[-1].output[0] = "y"
    inputs = [helper.make_tensor_value_info("x", f32, x_shape)]
    if kind == "elementwise":
        inputs.append(helper.make_tensor_value_info("x2", f32, x_shape))
    g = helper.make_graph(nodes, "sample", inputs, [helper.make_tensor_value_info("y", f32, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def sample_kernels(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """`n` kernels of randomly drawn shapes (conv, depthwise conv, MatMul, Gemm, each with or without ReLU /
    Clip; elementwise Add and Mul), spread evenly over those kinds, each with its standalone "graph"."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    while len(out) < n:
        kind = _SAMPLE_KINDS[len(out) % len(_SAMPLE_KINDS)]
        (k,) = detect_kernels(_sample_graph(rng, kind), with_graphs=True)
        if 0 < k["flops"] <= MAX_SAMPLE_FLOPS:
            out.append(k)
    return out


__all__ = ["GRAPH_FIELDS", "config_kernels", "detect_kernels", "manifest_kernels", "name_nodes", "replicate",
           "sample_kernels", "without_graphs"]
