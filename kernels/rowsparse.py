"""Row-sparse nested weights (DRESS): every row keeps the same number of non-zeros at each level, and a
sparser level's non-zeros are a prefix of a denser one's once each row is sorted by importance.

Owns the storage (2-bit level codes packed four to a byte beside the dense weight), the ELL form
(per-row values + column indices, sorted by importance, the level picking a prefix), the NumPy
reference and the ONNX lowering whose level is a run-time input. No torch.
"""

from __future__ import annotations

import numpy as np

CODE_BITS = 2            # up to four nested levels per weight
MAX_LEVELS = 1 << CODE_BITS


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes in [0, 4) of any shape -> flat uint8, four codes a byte (the bundle's storage)."""
    flat = np.ascontiguousarray(codes, dtype=np.uint8).ravel()
    if flat.size and flat.max() >= MAX_LEVELS:
        raise ValueError(f"level codes must be < {MAX_LEVELS} to pack in {CODE_BITS} bits, got {flat.max()}")
    flat = np.concatenate([flat, np.zeros(-flat.size % 4, np.uint8)]).reshape(-1, 4)
    return (flat[:, 0] | flat[:, 1] << 2 | flat[:, 2] << 4 | flat[:, 3] << 6).astype(np.uint8)


def unpack_codes(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    p = np.asarray(packed, dtype=np.uint8)
    flat = np.stack([p & 3, p >> 2 & 3, p >> 4 & 3, p >> 6 & 3], axis=1).ravel()
    return flat[: int(np.prod(shape))].reshape(shape)


def masked(weight: np.ndarray, codes: np.ndarray, level: int) -> np.ndarray:
    """The dense weight at `level`: elements whose code is below the level are zero."""
    return np.where(codes >= level, weight, 0).astype(weight.dtype)


def row_counts(codes: np.ndarray, n_levels: int) -> np.ndarray:
    """Non-zeros per row at each level, [n_levels]; raises if rows disagree (not row-balanced)."""
    rows = codes.reshape(codes.shape[0], -1)
    counts = np.stack([(rows >= s).sum(axis=1) for s in range(n_levels)])      # [levels, out]
    if (counts != counts[:, :1]).any():
        raise ValueError("level codes are not row-balanced: rows keep different numbers of weights")
    return counts[:, 0]


def to_ell(weight: np.ndarray, codes: np.ndarray, n_levels: int,
           max_level_dense: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ELL of a [out, in] weight: values and column indices [out, k_max] sorted so that every level's
    non-zeros are a prefix, and k per level. Columns beyond the densest level `max_level_dense` are cut.
    Indices use the narrowest unsigned type that fits."""
    w2 = weight.reshape(weight.shape[0], -1)
    c2 = codes.reshape(codes.shape[0], -1)
    k = row_counts(c2, n_levels)
    order = np.argsort(-c2.astype(np.int16), axis=1, kind="stable")[:, : k[max_level_dense]]
    vals = np.take_along_axis(w2, order, axis=1)
    itype = np.uint8 if w2.shape[1] <= 256 else np.uint16 if w2.shape[1] <= 65536 else np.int64
    return vals, order.astype(itype), k.astype(np.int64)


def ell_tensors(weight_name: str, w: np.ndarray, codes: np.ndarray, n_levels: int) -> dict[str, np.ndarray]:
    """The ELL tensors a row-sparse graph names for one weight, derived at load from the stored dense weight
    and its codes (`<weight>.ell_values`, `.ell_index` as int64 for ONNX Gather, `.ell_k`)."""
    vals, idx, k = to_ell(w, codes, n_levels)
    return {f"{weight_name}.ell_values": vals.astype(np.float32),
            f"{weight_name}.ell_index": idx.astype(np.int64),
            f"{weight_name}.ell_k": k}


def ell_reference(x: np.ndarray, vals: np.ndarray, idx: np.ndarray, k: np.ndarray, level: int,
                  bias: np.ndarray | None = None) -> np.ndarray:
    """y[b, o] = sum_{j < k[level]} vals[o, j] * x[b, idx[o, j]] (+ bias): the slow, obvious loop."""
    kk = int(k[level])
    y = np.zeros((x.shape[0], vals.shape[0]), dtype=np.float64)
    for o in range(vals.shape[0]):
        y[:, o] = x[:, idx[o, :kk].astype(np.int64)] @ vals[o, :kk]
    if bias is not None:
        y += bias
    return y.astype(np.float32)


def linear_onnx(vals: np.ndarray, idx: np.ndarray, k: np.ndarray, in_features: int,
                bias: np.ndarray | None = None, *, input_name: str = "x", level_name: str = "level",
                output_name: str = "y"):
    """ONNX model (opset 17): y = rowsparse(x [batch, in]) at the run-time `level` (int64 scalar).

    One graph serves every level: the level picks k, k slices the importance-sorted ELL prefix.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out_f, in_f = vals.shape[0], in_features
    inits = [numpy_helper.from_array(vals.astype(np.float32), "ell_values"),
             numpy_helper.from_array(idx.astype(np.int64), "ell_index"),
             numpy_helper.from_array(k.astype(np.int64), "ell_k"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2")]
    nodes = [
        helper.make_node("Reshape", [level_name, "one"], ["level1"]),
        helper.make_node("Gather", ["ell_k", "level1"], ["k1"]),                      # [1]
        helper.make_node("Slice", ["ell_values", "zero", "k1", "one"], ["vals_k"]),  # [out, k]
        helper.make_node("Slice", ["ell_index", "zero", "k1", "one"], ["idx_k"]),    # [out, k]
        helper.make_node("Gather", [input_name, "idx_k"], ["xg"], axis=1),           # [B, out, k]
        helper.make_node("Mul", ["xg", "vals_k"], ["prod"]),
        helper.make_node("ReduceSum", ["prod", "axis2"], ["acc"], keepdims=0),       # [B, out]
    ]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "bias"))
        nodes.append(helper.make_node("Add", ["acc", "bias"], [output_name]))
    else:
        nodes.append(helper.make_node("Identity", ["acc"], [output_name]))
    graph = helper.make_graph(
        nodes, "rowsparse_linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", in_f]),
         helper.make_tensor_value_info(level_name, TensorProto.INT64, [])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", out_f])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
