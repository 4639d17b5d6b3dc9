"""An ONNX model's bytes read and rewritten at the protobuf wire level, with numpy only (no `onnx` on a
board).

The TensorRT backend needs two things the `onnx` package would give: the graph's input and output names in
order (how the caller's arrays map to TensorRT's named tensors), and the model with its external weights
put back inline (TensorRT's parser reads external data from files; a bundle's weights are handed to a
backend from memory, some derived at load). Only the fields those touch are decoded; every other byte is
copied as it was.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from edgeflex.errors import BundleError

# ModelProto.graph; GraphProto.initializer, .input, .output; ValueInfoProto.name; TensorProto fields.
MODEL_GRAPH = 7
GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT = 5, 11, 12
VALUE_NAME = 1
T_DIMS, T_DTYPE, T_NAME, T_RAW, T_EXTERNAL, T_LOCATION = 1, 2, 8, 9, 13, 14
# The typed value fields a tensor may hold instead of raw_data (float, int32, string, int64, double, uint64).
T_TYPED = {4, 5, 6, 7, 10, 11}
# TensorProto.DataType codes of the numpy dtypes weights come in.
ONNX_DTYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.uint16): 4,
               np.dtype(np.int16): 5, np.dtype(np.int32): 6, np.dtype(np.int64): 7, np.dtype(np.bool_): 9,
               np.dtype(np.float16): 10, np.dtype(np.float64): 11, np.dtype(np.uint32): 12,
               np.dtype(np.uint64): 13}


def _bad(why: str) -> BundleError:
    return BundleError(f"ONNX graph is not a valid model ({why}); re-export the bundle")


def _varint(buf: bytes | memoryview, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _bad("a varint runs past the end")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """Each field of a message: (number, wire type, start of its key, start of its value, end)."""
    i, n = 0, len(buf)
    while i < n:
        start = i
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _varint(buf, i)
        elif wire == 1:
            end = i + 8
        elif wire == 5:
            end = i + 4
        elif wire == 2:
            size, i = _varint(buf, i)
            end = i + size
        else:
            raise _bad(f"wire type {wire} of field {num}")
        if end > n or num == 0:
            raise _bad(f"field {num} runs past the end")
        yield num, wire, start, i, end
        i = end


def _len_field(num: int, payload: bytes) -> bytes:
    return _put_varint(num << 3 | 2) + _put_varint(len(payload)) + payload


def _graph(model: bytes) -> memoryview:
    view = memoryview(model)
    graphs = [view[v:e] for num, wire, _, v, e in fields(view) if num == MODEL_GRAPH and wire == 2]
    if len(graphs) != 1:
        raise _bad(f"{len(graphs)} graphs, expected 1")
    return graphs[0]


def _name(msg: memoryview, num: int) -> str:
    for f, wire, _, v, e in fields(msg):
        if f == num and wire == 2:
            return bytes(msg[v:e]).decode("utf-8", "replace")
    return ""


def graph_io(model: bytes) -> tuple[list[str], list[str]]:
    """(input names, output names) of the model's graph, in order; inputs that are initialisers (older
    exporters list weights as inputs) left out, as ONNX Runtime leaves them out of `get_inputs()`."""
    g = _graph(model)
    inits, ins, outs = set(), [], []
    for num, wire, _, v, e in fields(g):
        if wire != 2:
            continue
        if num == GRAPH_INITIALIZER:
            inits.add(_name(g[v:e], T_NAME))
        elif num == GRAPH_INPUT:
            ins.append(_name(g[v:e], VALUE_NAME))
        elif num == GRAPH_OUTPUT:
            outs.append(_name(g[v:e], VALUE_NAME))
    return [n for n in ins if n not in inits], outs


def external_names(model: bytes) -> list[str]:
    """The graph's initialisers whose data lives outside the model (data_location EXTERNAL)."""
    g = _graph(model)
    out = []
    for num, wire, _, v, e in fields(g):
        if num == GRAPH_INITIALIZER and wire == 2:
            t = g[v:e]
            if any(f == T_LOCATION and w == 0 and _varint(t, fv)[0] == 1 for f, w, _, fv, _ in fields(t)):
                out.append(_name(t, T_NAME))
    return out


def _tensor_inline(t: memoryview, arr: np.ndarray, name: str) -> bytes:
    """One TensorProto with `arr` as its raw_data and its external-data fields dropped; refused in one line
    when `arr` is not the dtype and shape the graph declares."""
    dims, dtype, kept = [], None, bytearray()
    for num, wire, k, v, e in fields(t):
        if num == T_DIMS:
            if wire == 0:
                dims.append(_varint(t, v)[0])
            else:                                       # packed
                j = v
                while j < e:
                    d, j = _varint(t, j)
                    dims.append(d)
        elif num == T_DTYPE and wire == 0:
            dtype = _varint(t, v)[0]
        if num in (T_RAW, T_EXTERNAL, T_LOCATION) or num in T_TYPED:
            continue
        kept += t[k:e]
    a = np.ascontiguousarray(arr)
    if ONNX_DTYPES.get(a.dtype) != dtype or list(a.shape) != dims:
        raise BundleError(f"weight {name!r}: the bundle gives {a.dtype}{list(a.shape)}, the graph declares "
                          f"ONNX type {dtype} {dims}; re-export the bundle")
    raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    return bytes(kept) + _len_field(T_RAW, raw)


def inline_initializers(model: bytes, arrays: dict[str, np.ndarray]) -> bytes:
    """The model with every initialiser named in `arrays` holding those values inline (raw_data), so that a
    reader that cannot take weights from memory (TensorRT's parser and refitter) sees the weights the bundle
    verified. An external initialiser with no array given is a one-line BundleError: nothing reads files."""
    view = memoryview(model)
    out, found = bytearray(), set()
    for num, wire, k, v, e in fields(view):
        if num != MODEL_GRAPH or wire != 2:
            out += view[k:e]
            continue
        g, graph = view[v:e], bytearray()
        for gnum, gwire, gk, gv, ge in fields(g):
            if gnum == GRAPH_INITIALIZER and gwire == 2:
                t = g[gv:ge]
                name = _name(t, T_NAME)
                if name in arrays:
                    graph += _len_field(GRAPH_INITIALIZER, _tensor_inline(t, arrays[name], name))
                    found.add(name)
                    continue
            graph += g[gk:ge]
        out += _len_field(MODEL_GRAPH, bytes(graph))
    result = bytes(out)
    missing = external_names(result)
    if missing:
        raise BundleError(f"graph weight {missing[0]!r} is stored outside the graph and was not supplied "
                          f"from the bundle ({len(missing)} such); re-export the bundle")
    return result
