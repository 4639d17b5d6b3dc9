"""DRESS row-sparse matmul as hand-scheduled TIR with the level as a run-time argument, and the Relax rewrite
that puts it into the row-sparse graph (`graphs/main.sparse.onnx`) in place of the ELL ops Relax cannot build.

Owns the prim funcs (linear at any batch, 1x1 conv in NCHW) and the rewrite. Not the ELL form or its NumPy
reference (`kernels/rowsparse.py`), nor which kernel a level runs (measured at export, `export/elastic.py`).

One prim func serves every level: it reads k = ell_k[level] at run time and loops over the first k entries of
each importance-sorted ELL row. Schedules (written out, `tirx.is_scheduled`, so nothing re-schedules them):
- batch < `GEMV_MAX_BATCH` (GEMV, memory bound): per output row, a vector accumulator over ELL chunks of 16,
  the x values gathered with AVX-512 `vgatherdps` where the target has it (else LLVM's scalarised gather).
- larger batch: x copied once to [in, batch] (batch padded to 16) so each ELL entry loads a contiguous batch
  vector; `ROWS` output rows accumulate together (independent FMA chains), vectorised over the batch.
- 1x1 conv: the same with the pixels of a channel as the vector (no copy: NCHW already has them contiguous).
Output rows run in parallel when a call has at least `PARALLEL_MACS` multiply-adds (thread start-up costs
more than it saves below that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from edgeflex.kernels.tir import RewriteContext, register

log = logging.getLogger(__name__)

LANES = 16                  # float32 lanes of an AVX-512 register; the vector width of every schedule
ROWS = 4                    # output rows accumulated together in the batch / conv schedules
GEMV_MAX_BATCH = 4          # below this batch, the per-row GEMV schedule
PARALLEL_MACS = 1 << 20     # multiply-adds per call from which output rows run on the thread pool
INDEX_DTYPES = ("uint8", "uint16", "int32", "int64")
LEVEL_DTYPE = "int64"


def _has_avx512(target: Any) -> bool:
    if target is None or target.kind.name != "llvm":
        return False
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features("avx512f", target))
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe: take the portable schedule
        return False


def _check(out_f: int, in_f: int, kmax: int, n_levels: int, index_dtype: str) -> None:
    if min(out_f, in_f, kmax, n_levels) < 1 or kmax > in_f:
        raise ValueError(f"row-sparse kernel needs out, in, kmax, levels >= 1 and kmax <= in, got "
                         f"out={out_f}, in={in_f}, kmax={kmax}, levels={n_levels}")
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"ELL index dtype {index_dtype!r} is not supported; expected one of {INDEX_DTYPES}")


def linear_func(out_f: int, in_f: int, kmax: int, n_levels: int, *, index_dtype: str = "int64",
                target: Any = None):
    """PrimFunc y[b, o] = sum_{j < ell_k[level]} vals[o, j] * x[b, idx[o, j]] + bias[o].

    Arguments in order: x [batch, in] float32 (batch dynamic), vals [out, kmax] float32, idx [out, kmax]
    `index_dtype`, ell_k [n_levels] int64, level [] int64, bias [out] float32, y [batch, out] float32.
    An out-of-range level or k is clamped into range (never reads outside the buffers)."""
    from tvm.script import tirx as T

    _check(out_f, in_f, kmax, n_levels, index_dtype)
    NO, NI, K, L, V, R = out_f, in_f, kmax, n_levels, LANES, ROWS
    gather = _has_avx512(target) and in_f < (1 << 31)

    @T.macro
    def gemv_row(x, vals, idx, bias_buf, y, b, o, kk):
        nv = kk // V
        acc = T.decl_buffer((2 * V,), "float32", scope="local")
        acc[T.Ramp(0, 1, 2 * V)] = T.Broadcast(T.float32(0), 2 * V)
        for j0 in range(nv):
            h = (j0 % 2) * V                      # two accumulators: half the FMA chain length
            if gather:
                acc[T.Ramp(h, 1, V)] = acc[T.Ramp(h, 1, V)] + vals[o, T.Ramp(j0 * V, 1, V)] * \
                    T.call_llvm_intrin("float32x16", "llvm.x86.avx512.gather.dps.512",
                                       T.Broadcast(T.float32(0), V), T.address_of(x[b, 0]),
                                       T.Cast("int32x16", idx[o, T.Ramp(j0 * V, 1, V)]), T.int16(-1),
                                       T.int32(4))
            else:
                for v in T.vectorized(V):
                    acc[h + v] = acc[h + v] + vals[o, j0 * V + v] * x[b, T.Cast("int32", idx[o, j0 * V + v])]
        s = T.decl_buffer((1,), "float32", scope="local")
        s[0] = T.float32(0)
        for j in range(kk - nv * V):
            s[0] = s[0] + vals[o, nv * V + j] * x[b, T.Cast("int32", idx[o, nv * V + j])]
        t = T.decl_buffer((V,), "float32", scope="local")
        t[T.Ramp(0, 1, V)] = acc[T.Ramp(0, 1, V)] + acc[T.Ramp(V, 1, V)]
        t[T.Ramp(0, 1, 8)] = t[T.Ramp(0, 1, 8)] + t[T.Ramp(8, 1, 8)]
        t[T.Ramp(0, 1, 4)] = t[T.Ramp(0, 1, 4)] + t[T.Ramp(4, 1, 4)]
        y[b, o] = s[0] + (t[0] + t[1]) + (t[2] + t[3]) + bias_buf[o]

    @T.macro
    def batch_rows(xt, vals, idx, bias_buf, y, B, b0, o, nr, kk):
        # rows o .. o+nr (nr <= R, static), batch lanes b0 .. b0+V of the padded [in, Bp] copy
        acc = T.decl_buffer((R * V,), "float32", scope="local")
        acc[T.Ramp(0, 1, R * V)] = T.Broadcast(T.float32(0), R * V)
        for j in range(kk):
            for r in T.unroll(nr):
                acc[T.Ramp(r * V, 1, V)] = acc[T.Ramp(r * V, 1, V)] + T.Broadcast(vals[o + r, j], V) * \
                    xt[T.Cast("int64", idx[o + r, j]), T.Ramp(b0, 1, V)]
        for r in T.unroll(nr):
            for v in range(V):
                if b0 + v < B:
                    y[b0 + v, o + r] = acc[r * V + v] + bias_buf[o + r]

    @T.prim_func(private=True)
    def rowsparse_linear(var_x: T.handle, vals: T.Buffer((NO, K), "float32"),
                         idx: T.Buffer((NO, K), index_dtype),
                         ell_k: T.Buffer((L,), "int64"), level: T.Buffer((), "int64"),
                         bias_buf: T.Buffer((NO,), "float32"), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int64()
        x = T.match_buffer(var_x, (B, NI), "float32")
        y = T.match_buffer(var_y, (B, NO), "float32")
        lv = T.min(T.max(level[()], T.int64(0)), T.int64(L - 1))
        kk = T.min(T.max(ell_k[lv], T.int64(0)), T.int64(K))
        par = NO * kk * B >= PARALLEL_MACS
        if B < GEMV_MAX_BATCH:
            for b in range(B):
                if par:
                    for o in T.parallel(NO):
                        gemv_row(x, vals, idx, bias_buf, y, b, o, kk)
                else:
                    for o in range(NO):
                        gemv_row(x, vals, idx, bias_buf, y, b, o, kk)
        else:
            xt = T.decl_buffer((NI, (B + V - 1) // V * V), "float32")
            for i, b in T.grid(NI, (B + V - 1) // V * V):
                xt[i, b] = T.if_then_else(b < B, x[T.min(b, B - 1), i], T.float32(0))
            if par:
                for og in T.parallel(NO // R):
                    for b0 in range((B + V - 1) // V):
                        batch_rows(xt, vals, idx, bias_buf, y, B, b0 * V, og * R, R, kk)
            else:
                for og in range(NO // R):
                    for b0 in range((B + V - 1) // V):
                        batch_rows(xt, vals, idx, bias_buf, y, B, b0 * V, og * R, R, kk)
            for b0 in range((B + V - 1) // V):
                batch_rows(xt, vals, idx, bias_buf, y, B, b0 * V, NO // R * R, NO % R, kk)

    return rowsparse_linear



def conv1x1_func(out_c: int, in_c: int, kmax: int, n_levels: int, pixels: int, *, index_dtype: str = "int64",
                 target: Any = None):
    """PrimFunc of a row-sparse 1x1 conv in NCHW with pixels flattened: y[n, o, p] = bias[o] +
    sum_{j < ell_k[level]} vals[o, j] * x[n, idx[o, j], p]. Arguments: x [batch, in_c, pixels] float32
    (batch dynamic), vals, idx, ell_k, level, bias [out_c], y [batch, out_c, pixels]. `ROWS` output
    channels accumulate together over `LANES` pixels (the last chunk narrower when pixels % 16 != 0)."""
    from tvm.script import tirx as T

    _check(out_c, in_c, kmax, n_levels, index_dtype)
    if pixels < 1:
        raise ValueError(f"1x1 conv needs pixels >= 1 (H * W), got {pixels}")
    NO, C, K, L, P, V, R = out_c, in_c, kmax, n_levels, pixels, LANES, ROWS
    NP, TAIL = P // V, P % V

    def lanes(base, w):                 # w consecutive elements from base (a scalar index when w == 1)
        return T.Ramp(base, 1, w) if w > 1 else base

    def bcast(value, w):
        return T.Broadcast(value, w) if w > 1 else value

    @T.macro
    def rows(x, vals, idx, bias_buf, y, n, o, nr, p0, w, kk):
        # output channels o .. o+nr (static nr <= R), pixels p0 .. p0+w (static w <= V)
        acc = T.decl_buffer((R * V,), "float32", scope="local")
        acc[T.Ramp(0, 1, R * V)] = T.Broadcast(T.float32(0), R * V)
        for j in range(kk):
            for r in T.unroll(nr):
                acc[lanes(r * V, w)] = acc[lanes(r * V, w)] + bcast(vals[o + r, j], w) * \
                    x[n, T.Cast("int64", idx[o + r, j]), lanes(p0, w)]
        for r in T.unroll(nr):
            y[n, o + r, lanes(p0, w)] = acc[lanes(r * V, w)] + bcast(bias_buf[o + r], w)

    @T.macro
    def all_pixels(x, vals, idx, bias_buf, y, n, o, nr, kk):
        for pc in range(NP):
            rows(x, vals, idx, bias_buf, y, n, o, nr, pc * V, V, kk)
        if TAIL > 0:
            rows(x, vals, idx, bias_buf, y, n, o, nr, NP * V, TAIL, kk)

    @T.prim_func(private=True)
    def rowsparse_conv1x1(var_x: T.handle, vals: T.Buffer((NO, K), "float32"),
                          idx: T.Buffer((NO, K), index_dtype), ell_k: T.Buffer((L,), "int64"),
                          level: T.Buffer((), "int64"), bias_buf: T.Buffer((NO,), "float32"),
                          var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int64()
        x = T.match_buffer(var_x, (B, C, P), "float32")
        y = T.match_buffer(var_y, (B, NO, P), "float32")
        lv = T.min(T.max(level[()], T.int64(0)), T.int64(L - 1))
        kk = T.min(T.max(ell_k[lv], T.int64(0)), T.int64(K))
        for n in range(B):
            if NO * kk * P >= PARALLEL_MACS:
                for og in T.parallel(NO // R):
                    all_pixels(x, vals, idx, bias_buf, y, n, og * R, R, kk)
            else:
                for og in range(NO // R):
                    all_pixels(x, vals, idx, bias_buf, y, n, og * R, R, kk)
            if NO % R > 0:
                all_pixels(x, vals, idx, bias_buf, y, n, NO // R * R, NO % R, kk)

    return rowsparse_conv1x1

# --- the Relax rewrite -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EllLayer:
    """One row-sparse layer found in a graph: the names of its ELL parameters (as Relax names them)."""

    values: str
    index: str
    k: str
    out_f: int
    in_f: int
    kmax: int
    n_levels: int
    index_dtype: str


def _ell_layer(x, vals, idx, params: dict[str, Any]) -> EllLayer | None:
    """The layer if `vals` and `idx` are the `<w>.ell_values` / `.ell_index` parameters of one weight whose
    `<w>.ell_k` is also a parameter, and x is [batch, in] float32."""
    from tvm import relax

    if not (isinstance(vals, relax.Var) and isinstance(idx, relax.Var)):
        return None
    stem = vals.name.removesuffix("_ell_values")
    if stem == vals.name or idx.name != f"{stem}_ell_index" or f"{stem}_ell_k" not in params:
        return None
    k = params[f"{stem}_ell_k"]
    vs, ids, ks, xs = (v.ty for v in (vals, idx, k, x))
    try:
        (out_f, kmax), (n_levels,) = [int(d) for d in vs.shape], [int(d) for d in ks.shape]
        in_f = int(xs.shape[1])
        ok = [int(d) for d in ids.shape] == [out_f, kmax] and xs.ndim == 2
    except (TypeError, AttributeError, ValueError):
        return None                                     # a symbolic or unknown shape: not this layer
    if not ok or vs.dtype != "float32" or xs.dtype != "float32" or ks.dtype != "int64" \
            or ids.dtype not in INDEX_DTYPES:
        return None
    return EllLayer(vals.name, idx.name, k.name, out_f, in_f, kmax, n_levels, ids.dtype)


def _param_of(expr, values: dict, op: str):
    """The parameter `op(param, ...)` reads, following `values` (var -> bound value); else None."""
    from tvm import relax

    while isinstance(expr, relax.Var) and expr in values:
        expr = values[expr]
    if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == op:
        return expr.args[0]
    return None


def _ell_match(value, values: dict):
    """(x, vals, idx) if `value` is the importer's form of one ELL layer:
    sum(multiply(take(x, I, axis=1), dynamic_strided_slice(vals)), axis=[2]) where I is
    dynamic_strided_slice(idx), possibly behind the importer's negative-index fix-up where(less, add, I)."""
    from tvm import relax

    def bound(e):
        while isinstance(e, relax.Var) and e in values:
            e = values[e]
        return e

    def op_name(e):
        return getattr(e.op, "name", "") if isinstance(e, relax.Call) else ""

    if op_name(value) != "relax.sum" or value.attrs.axis is None or value.attrs.keepdims \
            or [int(a) for a in value.attrs.axis] != [2]:
        return None
    prod = bound(value.args[0])
    if op_name(prod) != "relax.multiply":
        return None
    take, vals = bound(prod.args[0]), _param_of(prod.args[1], values, "relax.dynamic_strided_slice")
    if op_name(take) != "relax.take" or vals is None or int(take.attrs.axis) != 1:
        return None
    ind = bound(take.args[1])
    if op_name(ind) == "relax.where":
        ind = ind.args[2]
    idx = _param_of(ind, values, "relax.dynamic_strided_slice")
    return None if idx is None else (take.args[0], vals, idx)


def rewrite_module(mod, target: Any, level_name: str = "level"):
    """`mod` with every row-sparse ELL subgraph of the imported DRESS graph replaced by one call_tir of
    `linear_func`, and the names of the weights replaced (empty: `mod` unchanged).

    The subgraph is what Relax's ONNX importer makes of `export.elastic._sparse_variant`'s ops (see
    `_ell_match`): its level-dependent slices have data-dependent shapes, which Relax cannot build, and
    leave every later tensor without a shape. The kernel takes the whole ELL tensors, `<w>_ell_k` and the
    graph's `level` input instead; the slices' shape arithmetic is left dead and removed, and every binding
    after a replaced layer is re-inferred, so later layers (and ops) get static shapes again."""
    import numpy as np
    import tvm
    from tvm import relax

    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, []
    main = mod["main"]
    params = {p.name: p for p in main.params}
    level = params.get(level_name)
    lt = None if level is None else level.ty
    if not isinstance(lt, relax.TensorType) or lt.dtype != LEVEL_DTYPE or lt.ndim != 0:
        return mod, []
    replaced: list[str] = []
    funcs: dict[EllLayer, Any] = {}

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.values: dict = {}

        def _kernel_call(self, value):
            found = _ell_match(value, self.values)
            if found is None:
                return None
            x, vals, idx = (self.visit_expr(e) for e in found)
            layer = _ell_layer(x, vals, idx, params)
            if layer is None:
                return None
            if layer not in funcs:
                fn = linear_func(layer.out_f, layer.in_f, layer.kmax, layer.n_levels,
                                 index_dtype=layer.index_dtype, target=target)
                stem = layer.values.removesuffix("_ell_values")
                funcs[layer] = self.builder_.add_func(fn, f"rowsparse_{stem}")
            replaced.append(layer.values.removesuffix("_ell_values"))
            zero_bias = relax.const(np.zeros(layer.out_f, np.float32))
            return relax.call_tir(funcs[layer], [x, vals, idx, params[layer.k], level, zero_bias],
                                  out_ty=relax.TensorType([x.ty.shape[0], layer.out_f], "float32"))

        def visit_var_binding_(self, binding):
            self.values[binding.var] = binding.value
            new = self._kernel_call(binding.value)
            if new is None:
                new = self.visit_expr(binding.value)
                if isinstance(new, relax.Call) and isinstance(new.op, tvm.ir.Op) and replaced:
                    new = relax.Call(new.op, new.args, new.attrs, new.ty_args)   # re-infer its type
            if isinstance(binding.var, relax.DataflowVar):
                var = self.builder_.emit(new, name_hint=binding.var.name)
            else:
                var = self.builder_.emit_output(new, name_hint=binding.var.name)
            self.set_var_remap(binding.var, var)

    rw = _Rewriter(mod)
    new_main = rw.visit_expr(main)
    if not replaced:
        return mod, []
    out = rw.builder_.get()
    out["main"] = new_main
    out = relax.transform.DeadCodeElimination(["main"])(out)
    return out, replaced


@register("rowsparse")
def rowsparse(mod, ctx: RewriteContext):
    """The DRESS row-sparse graph's ELL layers as `linear_func` calls (None: no such layer in `mod`)."""
    new, layers = rewrite_module(mod, ctx.target)
    if not layers:
        return None
    log.info("rowsparse: %d ELL layer(s) of %s as TIR kernels: %s", len(layers), ctx.graph or "graph",
             ", ".join(layers))
    return new
