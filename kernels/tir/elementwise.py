"""A CPU schedule for the element-wise functions left around the int8 kernels (issue 21): the
QuantizeLinear / DequantizeLinear pairs of a QDQ graph, the star op's multiply between them, the residual
adds. Unscheduled, TVM builds them as one scalar loop on one core (and its QuantizeLinear rounds with a
libm call per element). Here each is inlined into one loop nest, its innermost loop vectorized and the
rest run on the thread pool.

Not a rewrite (it registers none): `edgeflex compile` applies `lower_and_schedule` to a module the int8
rewrite changed, after the Relax ops are legalized and fused.
"""

from __future__ import annotations

from typing import Any

from edgeflex.kernels.tir import LANES

MIN_PARALLEL = 4096     # elements from which a function runs on the thread pool (below: one core)


def _rule():
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class Elementwise(CPUScheduleRule):
        """Functions whose blocks are all spatial (after inlining): vectorized inside, parallel outside."""

        def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
            if not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            infos = try_inline(sch, infos)
            if len(infos) != 1 or any(k != "S" for k in infos[0].dom_kind()):
                return None
            block = infos[0].block_rv
            loops = sch.get_loops(block)
            if not loops:
                return None
            # the innermost loop split by a vector that divides it (a vector across rows would gather
            # and scatter: TVM does not simplify the fused loop's div / mod indices), the rest fused
            # into one parallel loop
            last = sch.get(loops[-1]).extent
            width = next((v for v in (LANES, LANES // 2, LANES // 4) if hasattr(last, "value")
                          and int(last) % v == 0), None)
            total = 1
            for lp in loops:
                ext = sch.get(lp).extent
                total = total * int(ext) if hasattr(ext, "value") and total is not None else None
            if width is not None:
                outer_last, inner = sch.split(loops[-1], [None, width])
                sch.vectorize(inner)
                loops = [*loops[:-1], outer_last]
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            if total is None or total >= MIN_PARALLEL:
                sch.parallel(fused)
            return sch

    return Elementwise()


def _legalize_quantize(bb: Any, call: Any) -> Any:
    """relax.quantize with a scalar scale and zero point as ONNX QuantizeLinear computes it: x / scale
    rounded half to even (`nearbyint`, one vector instruction), + zero point, saturated. TVM's own
    legalization rounds half away from zero (`round`, which LLVM turns into a libm call per element)."""
    import tvm
    from tvm import te, tirx

    x, s, zp = call.args
    default = tvm.ir.Op.get("relax.quantize").get_attr("FLegalize")
    if not all(isinstance(a, tvm.ir.Constant) and a.value.numpy().size == 1 for a in (s, zp)):
        return default(bb, call)
    scale = float(s.value.numpy().reshape(()))
    zero = float(zp.value.numpy().reshape(()))
    dtype = str(call.attrs.out_dtype)
    lo, hi = (0.0, 255.0) if dtype == "uint8" else (-128.0, 127.0)

    def quantize(x):
        return te.compute(x.shape, lambda *i: tirx.Cast(dtype, tirx.max(tirx.min(
            tirx.nearbyint(x(*i) / tirx.const(scale, "float32")) + tirx.const(zero, "float32"),
            tirx.const(hi, "float32")), tirx.const(lo, "float32"))), name="quantized")

    return bb.call_te(quantize, x, primfunc_name_hint="quantize")


def lower_and_schedule(mod: Any, target: Any) -> Any:
    """`mod` legalized and fused (Relax's zero pipeline, as before tuning; QuantizeLinear rounding half
    to even, as ONNX Runtime does), its element-wise functions scheduled for the CPU; the hand-written
    kernels (`tirx.is_scheduled`) are left as they are."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    with target:
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                        relax.transform.LegalizeOps(
                                            customize_legalize_map={"relax.quantize": _legalize_quantize}),
                                        relax.transform.CanonicalizeBindings(),
                                        relax.get_pipeline("zero")])(mod)
        return dl.ApplyDefaultSchedule(_rule())(mod)
