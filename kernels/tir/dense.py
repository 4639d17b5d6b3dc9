"""A classifier head (x [N, K] @ W [K, O] + bias, K-major weights as the ONNX Gemm/MatMul import gives them)
as one hand-scheduled TVM kernel, and the Relax rewrite ("dense") that puts it in place of matmul [+ bias].
Only 2-D x and a [K, O] float32 weight of static shape; everything else is left to TVM.

For StarNet-S1's 192 -> 1000 head TVM's default legalization runs one unvectorised thread (as long as a whole
14x14 star op: benchmarks/RESULTS.md, TVM kernels for StarNet); here the outputs are split into blocks of
vectors, one task each.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeflex.kernels.tir import RewriteContext, register
from edgeflex.kernels.tir.match import Matcher, batch_of, op_name, outermost, rewrite_matches, stacked, static

VECTOR = 16         # outputs per vector: one AVX-512 register of float32
BLOCK = 8           # vectors accumulated at once


def dense_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """x [N, K] @ w [K, O] (+ b [O])."""
    y = x.astype(np.float64) @ w.astype(np.float64)
    return (y if b is None else y + b).astype(np.float32)


def dense_primfunc(batch: int | None, depth: int, outputs: int) -> Any:
    """The kernel for x [batch, depth] (batch None: any batch), w [depth, outputs], b [outputs] -> y [batch,
    outputs]. Scheduled by hand (`tirx.is_scheduled`): parallel over (row, block of outputs), the last block
    starting early so that it ends at the edge."""
    from tvm import tirx
    from tvm.script import tirx as T

    K, OUT = depth, outputs
    P = min(VECTOR, OUT)
    VB = max(1, min(BLOCK, OUT // P))
    OBK = VB * P
    oblocks = -(-OUT // OBK)
    n_img = tirx.Var("n", "int64") if batch is None else batch

    @T.prim_func
    def dense(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        x = T.match_buffer(x_h, (n_img, K), "float32")
        w = T.match_buffer(w_h, (K, OUT), "float32")
        b = T.match_buffer(b_h, (OUT,), "float32")
        y = T.match_buffer(y_h, (n_img, OUT), "float32")
        for task in T.parallel(n_img * oblocks):
            row: T.let = task // oblocks
            o0: T.let = T.min(task % oblocks * OBK, OUT - OBK)
            acc = T.decl_buffer((VB, P), "float32", scope="local")
            for v in T.unroll(VB):
                for s in T.vectorized(P):
                    acc[v, s] = b[o0 + v * P + s]
            for k in range(K):
                for v in T.unroll(VB):
                    for s in T.vectorized(P):
                        acc[v, s] = acc[v, s] + x[row, k] * w[k, o0 + v * P + s]
            for v in T.unroll(VB):
                for s in T.vectorized(P):
                    y[row, o0 + v * P + s] = acc[v, s]

    return dense


def _matmul(m: Matcher, expr: Any) -> tuple[Any, Any] | None:
    """(x, w) when `expr` is matmul(x [N, K], w [K, O]) in float32 with a static w."""
    call = m.definition(expr)
    if op_name(call) != "relax.matmul":
        return None
    x, w = call.args
    tx, tw = getattr(x, "ty", None), getattr(w, "ty", None)
    if tx is None or tw is None or tx.ndim != 2 or tw.ndim != 2 or tx.dtype != "float32" \
            or tw.dtype != "float32" or not static(tw.shape) or not static(list(tx.shape)[1:]) \
            or int(tx.shape[1]) != int(tw.shape[0]) or call.attrs.out_dtype not in ("", "float32", None):
        return None
    return x, w


def _bias(b: Any, outputs: int) -> bool:
    ty = getattr(b, "ty", None)
    return (ty is not None and getattr(ty, "shape", None) is not None and static(ty.shape)
            and ty.dtype == "float32" and [int(v) for v in ty.shape] in ([outputs], [1, outputs]))


@register("dense")
def rewrite_dense(mod: Any, ctx: RewriteContext) -> Any:
    """Every 2-D matmul with a [K, O] weight of static shape [+ bias] of `mod` as one call of the kernel. CPU
    (llvm) targets only; None when there is none."""
    return rewrite_matches(mod, ctx, _find, _lower)


def _find(func: Any) -> dict[Any, tuple[Any, Any, Any]]:
    """{variable: (x, w, bias or None)}, the bias add taken in when there is one."""
    m = Matcher(func)
    hits, inner = {}, []
    for var in m.value:
        mm, bias, call = _matmul(m, var), None, m.definition(var)
        if mm is None and op_name(call) == "relax.add":
            for a, b in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                mm = _matmul(m, a)
                if mm is not None and _bias(b, int(mm[1].ty.shape[1])):
                    bias = b
                    inner.append(a)
                    break
                mm = None
        if mm is not None:
            hits[var] = (*mm, bias)
    return outermost(hits, inner)


def _lower(var: Any, hit: tuple[Any, Any, Any]) -> tuple[str, Any, list[Any]]:
    x, w, bias = hit
    batch = batch_of(x.ty.shape)
    k, o = (int(v) for v in w.ty.shape)
    name = f"dense_{'n' if batch is None else batch}x{k}_o{o}"
    return name, lambda: dense_primfunc(batch, k, o), [x, w, stacked([bias], [o], None)]
