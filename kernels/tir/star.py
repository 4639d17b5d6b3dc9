"""The StarNet star op as one hand-scheduled TVM kernel: g(ReLU6(f1(x)) * f2(x)) with f1, f2, g 1x1 convs
(+ biases) on NCHW, and the Relax rewrite that puts it in place of those ops in an imported StarNet.

Owns the kernel (`star_primfunc`), its NumPy reference (`star_reference`) and the rewrite ("star"). The
kernel never writes the r*C-wide intermediate at full size: per tile of pixels it runs one GEMM with the
stacked [f1; f2] weights, applies clip(a, 0, 6) * b into a tile-sized local buffer, then the g GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeflex.kernels.tir import RewriteContext, register

PIXELS = 32         # pixels per tile: two AVX-512 vectors of float32
HIDDEN_BLOCK = 4    # rows of f1 (and as many of f2) accumulated at once: 2 x 4 x 2 = 16 vector registers
OUT_BLOCK = 6       # rows of g accumulated at once: 6 x 2 = 12 vector registers


def star_reference(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
                   wg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """g(clip(f1(x), 0, 6) * f2(x)) for x [N, C, H, W], w1/w2 [rC, C], wg [Cout, rC], biases per row."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w).astype(np.float64)
    a = np.einsum("jc,ncp->njp", w1, flat) + b1[None, :, None]
    b = np.einsum("jc,ncp->njp", w2, flat) + b2[None, :, None]
    y = np.einsum("oj,njp->nop", wg, np.clip(a, 0.0, 6.0) * b) + bg[None, :, None]
    return y.reshape(n, wg.shape[0], h, w).astype(np.float32)


def star_primfunc(batch: int | None, channels: int, hidden: int, out_channels: int, height: int,
                  width: int) -> Any:
    """The kernel for x [batch, channels, height, width] (batch None: any batch), stacked w12 [2*hidden,
    channels] (f1's rows then f2's), b12 [2*hidden], wg [out_channels, hidden], bg [out_channels] -> y
    [batch, out_channels, height, width]. Scheduled by hand (`tirx.is_scheduled`): parallel over (image,
    pixel tile), vectorised over the tile's pixels, register-blocked over output rows.

    NOTE: tails are not predicated: the last pixel tile (and the last row block) starts early so that it
    ends at the edge, recomputing a few values the previous tile already wrote, with the same result."""
    from tvm import tirx
    from tvm.script import tirx as T

    C, R, CO, HW = channels, hidden, out_channels, height * width
    n_img = tirx.Var("n", "int64") if batch is None else batch
    P = min(PIXELS, HW)
    J = min(HIDDEN_BLOCK, R)
    OB = min(OUT_BLOCK, CO)
    tiles, jblocks, oblocks = -(-HW // P), -(-R // J), -(-CO // OB)

    @T.prim_func
    def star(x_h: T.handle, w12_h: T.handle, b12_h: T.handle, wg_h: T.handle, bg_h: T.handle,
             y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        x = T.match_buffer(x_h, (n_img, C, height, width), "float32")
        w12 = T.match_buffer(w12_h, (2 * R, C), "float32")
        b12 = T.match_buffer(b12_h, (2 * R,), "float32")
        wg = T.match_buffer(wg_h, (CO, R), "float32")
        bg = T.match_buffer(bg_h, (CO,), "float32")
        y = T.match_buffer(y_h, (n_img, CO, height, width), "float32")
        xf = T.decl_buffer((n_img * C * HW,), "float32", data=x.data)
        yf = T.decl_buffer((n_img * CO * HW,), "float32", data=y.data)
        for task in T.parallel(n_img * tiles):
            img: T.let = task // tiles
            p0: T.let = T.min(task % tiles * P, HW - P)
            mid = T.decl_buffer((R, P), "float32", scope="local")
            for jb in range(jblocks):
                j0: T.let = T.min(jb * J, R - J)
                acc = T.decl_buffer((2 * J, P), "float32", scope="local")
                for k in T.unroll(J):
                    for p in T.vectorized(P):
                        acc[k, p] = b12[j0 + k]
                        acc[J + k, p] = b12[R + j0 + k]
                for c in range(C):
                    row: T.let = (img * C + c) * HW + p0
                    for k in T.unroll(J):
                        for p in T.vectorized(P):
                            acc[k, p] = acc[k, p] + w12[j0 + k, c] * xf[row + p]
                            acc[J + k, p] = acc[J + k, p] + w12[R + j0 + k, c] * xf[row + p]
                for k in T.unroll(J):
                    for p in T.vectorized(P):
                        mid[j0 + k, p] = T.min(T.max(acc[k, p], T.float32(0)), T.float32(6)) * acc[J + k, p]
            for ob in range(oblocks):
                o0: T.let = T.min(ob * OB, CO - OB)
                acc2 = T.decl_buffer((OB, P), "float32", scope="local")
                for k in T.unroll(OB):
                    for p in T.vectorized(P):
                        acc2[k, p] = bg[o0 + k]
                for j in range(R):
                    for k in T.unroll(OB):
                        for p in T.vectorized(P):
                            acc2[k, p] = acc2[k, p] + wg[o0 + k, j] * mid[j, p]
                for k in T.unroll(OB):
                    for p in T.vectorized(P):
                        yf[(img * CO + o0 + k) * HW + p0 + p] = acc2[k, p]

    return star


# --- the Relax rewrite ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StarMatch:
    """One star op found in a Relax function: the binding it replaces (g's output, bias included), its input
    and the weights / biases of f1, f2, g (a bias is None when the graph has no add for it)."""

    out: Any
    x: Any
    w1: Any
    b1: Any
    w2: Any
    b2: Any
    wg: Any
    bg: Any


def _op_name(expr: Any) -> str:
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return ""


def _scalar(expr: Any) -> float | None:
    import tvm

    if isinstance(expr, tvm.ir.Constant) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    return None


class Matcher:
    """Walks one Relax function's bindings back from each 1x1 conv: conv(g) [+ bias] <- multiply <- (clip
    to [0, 6] <- conv(f1) [+ bias], conv(f2) [+ bias]), f1 and f2 reading the same tensor."""

    def __init__(self, func: Any):
        from tvm import relax

        self.value: dict[Any, Any] = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    self.value[b.var] = b.value

    def definition(self, expr: Any) -> Any:
        """The value bound to `expr` if it is a variable of this function, else `expr`."""
        return self.value.get(expr, expr)

    def conv_bias(self, expr: Any, accept: Any) -> tuple[Any, Any] | None:
        """(conv2d call, bias or None) when `expr` is a float32 NCHW/OIHW conv2d with static weight shape
        that `accept(call)` takes, optionally + a per-channel bias."""
        call, bias = self.definition(expr), None
        if _op_name(call) == "relax.add":
            for conv, b in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                if _op_name(self.definition(conv)) == "relax.nn.conv2d" and self._channel_vector(b, conv):
                    call, bias = self.definition(conv), b
                    break
            else:
                return None
        if _op_name(call) != "relax.nn.conv2d":
            return None
        a, w = call.attrs, call.args[1].ty
        if (a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW"
                or w.dtype != "float32" or call.args[0].ty.dtype != "float32" or not _static(w.shape)
                or tuple(int(v) for v in a.dilation) != (1, 1) or not accept(call)):
            return None
        return call, bias

    def _conv1x1(self, expr: Any) -> tuple[Any, Any, Any] | None:
        """(input, weight, bias or None) when `expr` is a 1x1 stride-1 dense conv2d, optionally + bias."""
        found = self.conv_bias(expr, _is_1x1)
        return None if found is None else (found[0].args[0], found[0].args[1], found[1])

    def _channel_vector(self, b: Any, conv: Any) -> bool:
        """`b` is a per-output-channel bias of `conv`: shape (1, K, 1, 1) or (K, 1, 1)."""
        ty, out = getattr(b, "ty", None), getattr(conv, "ty", None)
        if ty is None or out is None or not _static(getattr(ty, "shape", None)) or out.ndim != 4 \
                or not _static(list(out.shape)[1:2]):
            return False
        shape, k = [int(v) for v in ty.shape], int(out.shape[1])
        return ty.dtype == "float32" and shape in ([1, k, 1, 1], [k, 1, 1])

    def relu6(self, expr: Any) -> Any:
        """The tensor clipped to [0, 6] by `expr` (clip, or max then min in either order), else None."""
        call = self.definition(expr)
        if _op_name(call) == "relax.clip":
            lo, hi = (_scalar(a) if not hasattr(a, "value") else float(a.value) for a in call.args[1:3])
            return call.args[0] if (lo, hi) == (0.0, 6.0) else None
        bounds, inner = {}, call
        for _ in range(2):
            kind, arg, bound = self._minmax(inner)
            if kind is None or kind in bounds:
                return None
            bounds[kind], inner = bound, arg
        return inner if bounds == {"maximum": 0.0, "minimum": 6.0} else None

    def _minmax(self, expr: Any) -> tuple[str | None, Any, float | None]:
        """("maximum" | "minimum", tensor, scalar bound) for R.maximum / R.minimum or their legalized
        call_tir (the ONNX importer's Clip), else (None, None, None)."""
        call = self.definition(expr)
        name = _op_name(call)
        if name in ("relax.maximum", "relax.minimum"):
            kind, args = name.split(".")[1], list(call.args)
        elif name == "relax.call_tir":
            kind = str(call.args[0].name_hint).rstrip("0123456789")
            args = list(call.args[1].fields)
            if kind not in ("maximum", "minimum") or len(args) != 2:
                return None, None, None
        else:
            return None, None, None
        for t, s in ((args[0], args[1]), (args[1], args[0])):
            bound = _scalar(s)
            if bound is not None:
                return kind, t, bound
        return None, None, None

    def match(self, var: Any) -> StarMatch | None:
        g = self._conv1x1(var)
        if g is None:
            return None
        prod, wg, bg = g
        mul = self.definition(prod)
        if _op_name(mul) != "relax.multiply":
            return None
        for left, right in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
            clipped = self.relu6(left)
            f1 = self._conv1x1(clipped) if clipped is not None else None
            f2 = self._conv1x1(right)
            if f1 is None or f2 is None or not f1[0].same_as(f2[0]):
                continue
            (x, w1, b1), (_, w2, b2) = f1, f2
            if not _static(list(x.ty.shape)[1:]) or int(w1.ty.shape[0]) != int(w2.ty.shape[0]):
                continue
            return StarMatch(var, x, w1, b1, w2, b2, wg, bg)
        return None


def _is_1x1(call: Any) -> bool:
    a = call.attrs
    return (tuple(int(v) for v in a.strides) == (1, 1) and not any(int(v) for v in a.padding)
            and int(a.groups) == 1 and [int(v) for v in call.args[1].ty.shape][2:] == [1, 1])


def _static(shape: Any) -> bool:
    from tvm import tirx

    return shape is not None and all(isinstance(v, tirx.IntImm) for v in shape)


def find_star_ops(func: Any) -> list[StarMatch]:
    """Every star op in a Relax function, in binding order."""
    from tvm import relax

    m = Matcher(func)
    found = [s for v in m.value if isinstance(v, relax.Var) and (s := m.match(v)) is not None]
    # g's conv alone matches too when a bias add follows it: keep the match that takes the bias in.
    inner = {a for s in found if s.bg is not None for a in m.definition(s.out).args}
    return [s for s in found if not any(s.out.same_as(a) for a in inner)]


def stacked(parts: list[Any], rows: list[int], cols: int | None) -> Any:
    """The weights (or biases, cols None) of `parts` as one [sum(rows), cols] (or [sum(rows)]) tensor: a new
    constant when every part is one (folded at compile time), else Relax ops run in the graph."""
    import tvm
    from tvm import relax

    def shape(r: int) -> list[int]:
        return [r] if cols is None else [r, cols]

    if all(p is None or isinstance(p, tvm.ir.Constant) for p in parts):
        arrays = [np.zeros(shape(r), np.float32) if p is None else p.value.numpy().reshape(shape(r))
                  for p, r in zip(parts, rows)]
        return relax.const(np.ascontiguousarray(np.concatenate(arrays)), "float32")
    exprs = [relax.const(np.zeros(shape(r), np.float32)) if p is None else relax.op.reshape(p, shape(r))
             for p, r in zip(parts, rows)]
    return exprs[0] if len(exprs) == 1 else relax.op.concat(exprs, axis=0)


@register("star")
def rewrite_star(mod: Any, ctx: RewriteContext) -> Any:
    """Every StarNet star op of `mod` (1x1 f1, f2, ReLU6 * , 1x1 g, biases) as one call of the fused kernel.
    CPU (llvm) targets only; None when the module has no star op."""
    import tvm
    from tvm import relax

    if ctx.target is None or ctx.target.kind.name != "llvm":
        return None
    folded = relax.transform.FoldConstant()(mod)
    found = {gv: find_star_ops(f) for gv, f in folded.functions.items() if isinstance(f, relax.Function)}
    if not any(found.values()):
        return None
    bb = relax.BlockBuilder(folded)
    kernels: dict[tuple, Any] = {}
    for gv, matches in found.items():
        if not matches:
            continue
        new_values = {}
        for s in matches:
            n, c, h, w = s.x.ty.shape
            r, co = int(s.w1.ty.shape[0]), int(s.wg.ty.shape[0])
            batch = int(n) if isinstance(n, tvm.tirx.IntImm) else None
            key = (batch, int(c), r, co, int(h), int(w))
            if key not in kernels:
                name = f"star_{'n' if batch is None else batch}x{int(c)}x{int(h)}x{int(w)}_r{r}_o{co}"
                kernels[key] = bb.add_func(star_primfunc(*key).with_attr("global_symbol", name), name)
            args = [s.x, stacked([s.w1, s.w2], [r, r], int(c)), stacked([s.b1, s.b2], [r, r], None),
                    stacked([s.wg], [co], r), stacked([s.bg], [co], None)]
            new_values[s.out] = relax.call_tir(kernels[key], args, s.out.ty)
        bb.update_func(gv, replace_bindings(bb.get(), folded[gv], new_values))
    return relax.transform.DeadCodeElimination()(bb.get())


def _replacer():
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Replace(PyExprMutator):
        """Re-emits each binding whose variable is in `new_values` with its new value."""

        def __init__(self, mod: Any, new_values: dict[Any, Any]):
            super().__init__(mod)
            self.new_values = new_values

        def visit_var_binding_(self, binding: Any) -> None:
            value = self.new_values.get(binding.var)
            if value is None:
                return super().visit_var_binding_(binding)
            value = self.visit_expr(value)
            if isinstance(binding.var, relax.DataflowVar):
                new = self.builder_.emit(value, name_hint=binding.var.name)
            else:
                new = self.builder_.emit_output(value, name_hint=binding.var.name)
            self.set_var_remap(binding.var, new)

    return Replace


def replace_bindings(mod: Any, func: Any, new_values: dict[Any, Any]) -> Any:
    """`func` (a function of `mod`) with each binding whose variable is in `new_values` bound to its new
    value instead; the bindings that feed only the old values are left for dead-code elimination."""
    return _replacer()(mod, new_values).visit_expr(func)
