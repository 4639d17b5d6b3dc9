"""What the TIR kernels' Relax rewrites share: reading a function's bindings back from a variable (conv2d
[+ bias], ReLU6 in the forms the ONNX importer leaves), stacking weights (folded when constant), rebinding
variables to kernel calls, and the frame of a rewrite (`rewrite_matches`). No kernels here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgeflex.kernels.tir import RewriteContext


def op_name(expr: Any) -> str:
    """The Relax operator `expr` calls ("relax.add", ...), "" when it is not an operator call."""
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return ""


def scalar(expr: Any) -> float | None:
    """The value of a one-element constant, else None."""
    import tvm

    if isinstance(expr, tvm.ir.Constant) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    return None


def static(shape: Any) -> bool:
    """Every dimension of `shape` is a known integer."""
    from tvm import tirx

    return shape is not None and all(isinstance(v, tirx.IntImm) for v in shape)



class Matcher:
    """One Relax function's bindings, and the patterns the kernels look for in them, followed back from a
    variable through the values bound to it: conv2d [+ bias], ReLU6 in its import forms."""

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
        if op_name(call) == "relax.add":
            for conv, b in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                if op_name(self.definition(conv)) == "relax.nn.conv2d" and self._channel_vector(b, conv):
                    call, bias = self.definition(conv), b
                    break
            else:
                return None
        if op_name(call) != "relax.nn.conv2d":
            return None
        a, w = call.attrs, call.args[1].ty
        if (a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW"
                or w.dtype != "float32" or call.args[0].ty.dtype != "float32" or not static(w.shape)
                or tuple(int(v) for v in a.dilation) != (1, 1) or not accept(call)):
            return None
        return call, bias

    def _channel_vector(self, b: Any, conv: Any) -> bool:
        """`b` is a per-output-channel bias of `conv`: shape (1, K, 1, 1) or (K, 1, 1)."""
        ty, out = getattr(b, "ty", None), getattr(conv, "ty", None)
        if ty is None or out is None or not static(getattr(ty, "shape", None)) or out.ndim != 4 \
                or not static(list(out.shape)[1:2]):
            return False
        shape, k = [int(v) for v in ty.shape], int(out.shape[1])
        return ty.dtype == "float32" and shape in ([1, k, 1, 1], [k, 1, 1])

    def relu6(self, expr: Any) -> Any:
        """The tensor clipped to [0, 6] by `expr` (clip, or max then min in either order), else None."""
        call = self.definition(expr)
        if op_name(call) == "relax.clip":
            lo, hi = (scalar(a) if not hasattr(a, "value") else float(a.value) for a in call.args[1:3])
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
        name = op_name(call)
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
            bound = scalar(s)
            if bound is not None:
                return kind, t, bound
        return None, None, None


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


def transposed(expr: Any) -> Any:
    """A [rows, cols] weight expression (`stacked`'s) transposed: a new constant when it is one, else a
    permute_dims that the compile lifts with the other weight transforms into the load-time function."""
    import tvm
    from tvm import relax

    if isinstance(expr, tvm.ir.Constant):
        return relax.const(np.ascontiguousarray(expr.value.numpy().T), "float32")
    return relax.op.permute_dims(expr, [1, 0])


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


def rewrite_matches(mod: Any, ctx: RewriteContext, find: Callable[[Any], dict[Any, Any]],
                    lower: Callable[[Any, Any], tuple[str, Callable[[], Any], list[Any]]],
                    fold: bool = True) -> Any:
    """The frame of every rewrite here: on CPU (llvm) targets, fold constants, `find(function)` -> {variable:
    match} in each Relax function, `lower(variable, match)` -> (kernel name, prim func maker, call args),
    each kernel added once, each variable bound to a call_tir of it, dead bindings removed. None when
    nothing matched (the module is left untouched). `fold=False` matches the module as it is (folding would
    turn an int8 weight's dequantize into a float32 constant)."""
    from tvm import relax

    if ctx.target is None or ctx.target.kind.name != "llvm":
        return None
    try:
        folded = relax.transform.FoldConstant()(mod) if fold else mod
    except Exception:  # noqa: BLE001 - e.g. dynamic gathers it cannot legalize: match the graph unfolded
        folded = mod
    found = {gv: hits for gv, f in folded.functions.items()
             if isinstance(f, relax.Function) and (hits := find(f))}
    if not found:
        return None
    bb = relax.BlockBuilder(folded)
    kernels: dict[str, Any] = {}
    for gv, hits in found.items():
        new_values = {}
        for var, hit in hits.items():
            name, make, args = lower(var, hit)
            if name not in kernels:
                kernels[name] = bb.add_func(make().with_attr("global_symbol", name), name)
            new_values[var] = relax.call_tir(kernels[name], args, var.ty)
        bb.update_func(gv, replace_bindings(bb.get(), folded[gv], new_values))
    return relax.transform.DeadCodeElimination()(bb.get())


def outermost(hits: dict[Any, Any], inner: Any) -> dict[Any, Any]:
    """`hits` without the variables in `inner` (those a larger match of the same rewrite swallowed)."""
    return {v: h for v, h in hits.items() if not any(v.same_as(i) for i in inner)}


def batch_of(shape: Any) -> int | None:
    """The static batch (first dimension) of a Relax shape, None when symbolic."""
    import tvm

    return int(shape[0]) if isinstance(shape[0], tvm.tirx.IntImm) else None


def padding4(pad: Any) -> tuple[int, int, int, int]:
    """conv2d padding as (top, left, bottom, right)."""
    p = tuple(int(v) for v in pad)
    return p * 4 if len(p) == 1 else (p * 2 if len(p) == 2 else p)
