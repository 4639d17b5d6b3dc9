"""int8 arithmetic for the QDQ graphs `edgeflex quantize` writes (issue 21): dense convolutions (1x1 and
KxK, any stride) and linear layers computed as uint8 activations x int8 weights -> int32 with the target's
dot-product instruction, and the Relax rewrite ("qconv") that puts the kernel in place of what TVM's ONNX
importer makes of ORT's QDQ pattern:

    conv2d(dequantize(quantize(x, s, zp)), dequantize(w_q, s_w, 0)) [+ bias]      (x float32, w_q int8)

The kernel takes x in float32 and quantizes it itself (round half to even, saturate, as ONNX
QuantizeLinear), so `quantize(x)` disappears when every user of it is rewritten; its output is the conv's
float32 value (the int32 sums, zero-point corrected, times s * s_w[o], + bias), which the graph's own
QuantizeLinear / DequantizeLinear that follow round as before.

    y[o, q] = s * s_w[o] * (sum_k w_q[o, k] * x_q[k, q]  -  zp * sum_k w_q[o, k])  +  bias[o]

Instructions: x86 `vpdpbusd` (AVX512-VNNI; 16 lanes of 4 u8 x s8 products), aarch64 `sdot` (+dotprod; 4
lanes of 4 s8 x s8 products: the activations are stored as x_q - 128 and the zero point moves with them).
Lanes are output pixels: the quantize pass writes, per group of 4 input channels, the 4 channels of each
pixel side by side (and, for a strided conv, the input split by stride phase as the fp32 conv kernel does,
so each tap of a tile of pixels is one contiguous run); each weight quad is broadcast to every lane. A
target with neither instruction is not rewritten (the runtime refuses int8 there: `qdot_instruction`).

A StarNet star block (f1 and f2 on one quantized input, their QDQ, [act], the multiply, its QDQ and g,
optionally g's output QDQ) is matched here too and becomes one `kernels.tir.qstar` kernel instead of three
of these (`_star_blocks`).
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from edgeflex.kernels.tir import RewriteContext, register
from edgeflex.kernels.tir.match import batch_of, op_name, padding4

# (lanes, int32 dot instruction, activation storage dtype, shift of the stored activation) per family.
X86_VNNI = (16, "llvm.x86.avx512.vpdpbusd.512", "uint8", 0)
ARM_SDOT = (4, "llvm.aarch64.neon.sdot.v4i32.v16i8", "int8", 128)
ACC_REGISTERS = 24      # int32 accumulator vectors held at once (of 32 AVX-512 / NEON registers)
FUSE_STAR = True        # star blocks as one kernel (`qstar`); False: per op (for side-by-side timings)
FUSE_DEPTHWISE = True   # depthwise convs as int8 kernels (`qdwconv`, x86); False: float32 (`dwconv`)


def qdot_instruction(target: Any) -> tuple[int, str, str, int] | None:
    """The dot-product family `target` (a tvm.target.Target) has, or None: x86 with AVX512-VNNI, aarch64
    with dotprod (the catalogue's Cortex-A76 / A78AE; `+dotprod` in its attributes)."""
    if target is None or target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or "")
    from tvm.target import codegen

    try:
        feats = {str(f) for f in codegen.llvm_get_cpu_features(target)} if hasattr(
            codegen, "llvm_get_cpu_features") else set()
    except Exception:  # noqa: BLE001 - an LLVM that cannot answer: decide from the attributes below
        feats = set()
    attrs = " ".join(str(a) for a in target.attrs.get("mattr", []) or [])
    cpu = str(target.attrs.get("mcpu", "") or "")
    if triple.startswith("aarch64"):
        if "dotprod" in feats or "+dotprod" in attrs or cpu in DOTPROD_CPUS:
            return ARM_SDOT
        return None
    if "avx512vnni" in feats or "+avx512vnni" in attrs or (not feats and cpu in VNNI_CPUS):
        return X86_VNNI
    return None


# LLVM CPU names with the instruction, for an LLVM that cannot list a target's features.
DOTPROD_CPUS = ("cortex-a55", "cortex-a76", "cortex-a77", "cortex-a78", "cortex-a78ae", "cortex-x1",
                "neoverse-n1", "neoverse-v1", "neoverse-n2", "apple-m1")
VNNI_CPUS = ("cascadelake", "cooperlake", "icelake-server", "icelake-client", "tigerlake", "sapphirerapids",
             "emeraldrapids", "graniterapids", "znver4", "znver5")


def qconv_reference(x: np.ndarray, w_q: np.ndarray, w_scale: np.ndarray, s: float, zp: int,
                    bias: np.ndarray | None, stride: int, pad: tuple[int, ...]) -> np.ndarray:
    """What the kernel computes, in numpy: x quantized as ONNX QuantizeLinear (uint8), the integer conv
    with the zero point subtracted, times s * w_scale[o], + bias."""
    from edgeflex.kernels.tir.conv import conv_reference

    xq = np.clip(np.rint(x / np.float32(s)) + zp, 0, 255) - zp
    y = conv_reference(xq.astype(np.float64), w_q.astype(np.float64), None, stride, pad)
    y = y.astype(np.float64) * (s * w_scale.reshape(1, -1, 1, 1))
    return (y + (0 if bias is None else bias.reshape(1, -1, 1, 1))).astype(np.float32)


def qconv_primfunc(batch: int | None, channels: int, height: int, width: int, out_channels: int,
                   kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int, int, int],
                   scale: float, zero_point: int, family: tuple[int, str, str, int] = X86_VNNI,
                   linear: bool = False) -> Any:
    """The kernel for x [batch, C, H, W] float32, w [CO, KH*KW*C4*4] int8 (OHWI, input channels padded to
    C4 = ceil(C/4) quads), wsum [CO] int32 (sum of each row of w), ws [CO] float32 (s * s_w[o]),
    b [CO] float32 -> y [batch, CO, OH, OW] float32. Scheduled by hand: per image, the quantize pass, then
    parallel over (pixel tile, output-channel block); the last tile / block overlaps the one before.
    `linear`: a linear layer, x [batch, C] -> y [batch, CO] (a 1x1 conv of one pixel per image)."""
    from tvm import tirx
    from tvm.script import tirx as T

    from edgeflex.kernels.tir.conv import phase_grid

    lanes, instr, adt, shift = family
    C, H, W, CO = channels, height, width, out_channels
    KH, KW = kernel
    SH, SW = stride
    OH, OW, HG, WG = phase_grid(H, W, kernel, stride, pad)
    C4, TAPS, PH = -(-C // 4), KH * KW, SH * SW
    GRID = OH * WG                                   # pixels computed: the phase grid's first OH rows
    # pixel vectors per tile: as many as fit a row (rows: every tile stored whole, as vectors), else tiles
    # over the flat grid, stored pixel by pixel where they leave the output
    pv = max(1, min(4, OW // lanes)) if OW >= lanes else max(1, min(4, -(-GRID // lanes)))
    P = pv * lanes
    rows = OW >= P
    whole = rows or (WG == OW and GRID >= P)         # every tile's pixels are output pixels, in order
    per_row = -(-OW // P)
    tiles = OH * per_row if rows else -(-GRID // P)
    OB = max(1, min(ACC_REGISTERS // pv, CO))
    oblocks = -(-CO // OB)
    PLANE = HG * WG
    XS = C4 * PH * PLANE * 4 + P * 4 + 4 * (KW - 1)  # + the reads of a tail tile past the grid
    n_img = tirx.Var("n", "int64") if batch is None else batch
    CHW = C * H * W
    x_shape = (n_img, C) if linear else (n_img, C, H, W)
    y_shape = (n_img, CO) if linear else (n_img, CO, OH, OW)
    QCHUNKS = -(-CHW // 16)
    top, left = pad[0], pad[1]
    zq = zero_point - shift                           # the stored zero point
    s = float(np.float32(scale))
    vec8, vec32 = f"{adt}x{4 * lanes}", f"int32x{lanes}"

    # the vectorized quantize-and-lay-out (16 positions of a phase row per vector): rows of 16 and more,
    # strides 1 and 2, an image row of 16 and more
    fused_layout = WG >= 16 and SW in (1, 2) and W >= 16 and not linear
    HPP, WPP = HG * SH, WG * SW + 32                 # the padded copy (+ the last vector's over-read)

    def row16(xp, i):
        """16 positions of a phase row, every SW-th byte from i, each as the low byte of an int32."""
        if SW == 1:
            return T.Cast("int32x16", T.reinterpret("uint8x16", xp[T.ramp(i, 1, 16)]))
        return T.Cast("int32x16", T.reinterpret("uint16x16", xp[T.ramp(i, 1, 32)]) & T.uint16(255))

    def pack4(b0, b1, b2, b3):
        return b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)

    @T.prim_func
    def qconv(x_h: T.handle, w_h: T.handle, ws_h: T.handle, wsum_h: T.handle, b_h: T.handle,
              y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        x = T.match_buffer(x_h, x_shape, "float32")
        w = T.match_buffer(w_h, (CO, TAPS * C4 * 4), "int8")
        ws = T.match_buffer(ws_h, (CO,), "float32")
        wsum = T.match_buffer(wsum_h, (CO,), "int32")
        b = T.match_buffer(b_h, (CO,), "float32")
        y = T.match_buffer(y_h, y_shape, "float32")
        xf = T.decl_buffer((n_img * C * H * W,), "float32", data=x.data)
        yf = T.decl_buffer((n_img * CO * OH * OW,), "float32", data=y.data)
        wf = T.decl_buffer((CO * TAPS * C4 * 4,), "int8", data=w.data)
        xs = T.decl_buffer((XS,), adt)
        xs32 = T.decl_buffer((XS // 4,), "int32", data=xs.data)
        xq = T.decl_buffer((CHW if not fused_layout else 16,), adt)
        xp = T.decl_buffer((C4 * 4 * HPP * WPP if fused_layout else 16,), adt)
        for img in range(n_img):
            for g in range(XS - C4 * PH * PLANE * 4):
                xs[C4 * PH * PLANE * 4 + g] = T.Cast(adt, zq)
            with T.attr(0, "pragma_parallel_launch_point", 0):
                # a barrier after each pass: every pass reads what the tasks of the one before wrote (one
                # thread-pool launch per image; `barrier_when_finish` ends only the statement it wraps)
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    if fused_layout:
                        # (a) quantize into a padded copy: HPP x WPP per channel, the image at (top, left),
                        # the zero point around it (rows: contiguous vectors, the last one overlapping)
                        for task in T.parallel(C4 * 4 * HPP):
                            c: T.let = task // HPP
                            ih: T.let = task % HPP - top
                            if c < C and 0 <= ih and ih < H:
                                for cv in range(-(-W // 16)):
                                    for e in T.vectorized(16):
                                        xp[task * WPP + left + T.min(cv * 16, W - 16) + e] = T.Cast(
                                            adt, T.max(T.min(T.nearbyint(xf[img * CHW + (c * H + ih) * W
                                                                            + T.min(cv * 16, W - 16) + e]
                                                                         / T.float32(s))
                                                             + T.float32(zero_point), T.float32(255)),
                                                       T.float32(0)) - T.float32(shift))
                                for e in range(left):
                                    xp[task * WPP + e] = T.Cast(adt, zq)
                                for e in range(WPP - left - W):
                                    xp[task * WPP + left + W + e] = T.Cast(adt, zq)
                            else:
                                for e in T.vectorized(WPP):
                                    xp[task * WPP + e] = T.Cast(adt, zq)
                    if not fused_layout:
                        # quantize, one vector of 16 at a time over the image (the last chunk overlaps)
                        for chunk in T.parallel(QCHUNKS):
                            i0: T.let = T.min(chunk * 16, CHW - 16)
                            for e in T.vectorized(16):
                                xq[i0 + e] = T.Cast(adt, T.max(T.min(T.nearbyint(
                                    xf[img * CHW + i0 + e] / T.float32(s)) + T.float32(zero_point),
                                    T.float32(255)), T.float32(0)) - T.float32(shift))
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    if fused_layout:
                        # (b) lay out: 16 positions of a phase row from one contiguous load per channel
                        # (stride 2: 32 bytes read as 16 uint16, the low byte kept), 4 channels per int32
                        for r in T.parallel(C4 * PH * HG):
                            c4: T.let = r // (PH * HG)
                            hp: T.let = r % HG * SH + r // (SW * HG) % SH
                            pw: T.let = r // HG % SW
                            for gc in range(-(-WG // 16)):
                                g0: T.let = T.min(gc * 16, WG - 16)
                                xs32[T.ramp(r * WG + g0, 1, 16)] = pack4(
                                    row16(xp, ((c4 * 4) * HPP + hp) * WPP + g0 * SW + pw),
                                    row16(xp, ((c4 * 4 + 1) * HPP + hp) * WPP + g0 * SW + pw),
                                    row16(xp, ((c4 * 4 + 2) * HPP + hp) * WPP + g0 * SW + pw),
                                    row16(xp, ((c4 * 4 + 3) * HPP + hp) * WPP + g0 * SW + pw))
                    if not fused_layout:
                        # lay out: xs[((c4 * PH + phase) * HG + row) * WG + col][4 channels] (channels past C
                        # repeat channel C-1: their weights are 0), padding at the zero point
                        for r in T.parallel(C4 * PH * HG):
                            c4: T.let = r // (PH * HG)
                            ph: T.let = r // (SW * HG) % SH
                            pw: T.let = r // HG % SW
                            ih: T.let = r % HG * SH + ph - top
                            for g in range(WG):
                                for lane in T.unroll(4):
                                    xs[(r * WG + g) * 4 + lane] = T.if_then_else(
                                        0 <= ih and ih < H and 0 <= g * SW + pw - left
                                        and g * SW + pw - left < W,
                                        xq[(T.min(c4 * 4 + lane, C - 1) * H + ih) * W + g * SW + pw - left],
                                        T.Cast(adt, zq))
                for task in T.parallel(tiles * oblocks):
                    t: T.let = task // oblocks
                    q0: T.let = T.if_then_else(rows, t // per_row * WG + T.min(t % per_row * P, OW - P),
                                               T.if_then_else(whole, T.min(t * P, GRID - P), t * P))
                    o0: T.let = T.min(task % oblocks * OB, CO - OB)
                    # where a whole tile's first pixel lands in the output plane
                    out0: T.let = T.if_then_else(rows, t // per_row * OW + T.min(t % per_row * P, OW - P),
                                                 q0)
                    acc = T.decl_buffer((OB * P,), "int32", scope="local")
                    for i in T.unroll(OB * pv):
                        acc[T.ramp(i * lanes, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                    for c4 in range(C4):
                        for i in T.unroll(KH):
                            for j in T.unroll(KW):
                                src: T.let = ((c4 * PH + i % SH * SW + j % SW) * PLANE + q0
                                              + i // SH * WG + j // SW) * 4
                                for v in T.unroll(pv):
                                    xv: T.let = T.reinterpret(vec32, xs[T.ramp(src + v * 4 * lanes, 1,
                                                                                4 * lanes)])
                                    for r in T.unroll(OB):
                                        acc[T.ramp((r * pv + v) * lanes, 1, lanes)] = \
                                            T.call_llvm_pure_intrin(
                                                vec32, instr, acc[T.ramp((r * pv + v) * lanes, 1, lanes)],
                                                T.reinterpret(vec8, xv),
                                                T.reinterpret(vec8, T.broadcast(T.reinterpret(
                                                    "int32", wf[T.ramp(
                                                        (o0 + r) * (TAPS * C4 * 4) + (i * KW + j) * C4 * 4
                                                        + c4 * 4, 1, 4)]), lanes)))
                    for r in T.unroll(OB):
                        if whole:
                            for p in T.vectorized(P):
                                yf[(img * CO + o0 + r) * OH * OW + out0 + p] = T.Cast(
                                    "float32", acc[r * P + p] - zq * wsum[o0 + r]) * ws[o0 + r] \
                                    + b[o0 + r]
                        else:
                            for p in range(P):
                                if q0 + p < GRID and (q0 + p) % WG < OW:
                                    yf[((img * CO + o0 + r) * OH + (q0 + p) // WG) * OW + (q0 + p) % WG] \
                                        = T.Cast("float32", acc[r * P + p] - zq * wsum[o0 + r]) \
                                        * ws[o0 + r] + b[o0 + r]


    return qconv


# --- the Relax rewrite ----------------------------------------------------------------------------------

def _const(expr: Any) -> np.ndarray | None:
    import tvm

    return expr.value.numpy() if isinstance(expr, tvm.ir.Constant) else None


class _QMatch:
    """One matched int8 conv or linear layer: the float32 input, its quantize scale / zero point, the int8
    weight and its per-channel scale (expressions), the bias (or None), the conv2d / matmul call."""

    def __init__(self, x, s, zp, w, w_scale, bias, conv):
        self.x, self.s, self.zp, self.w, self.w_scale, self.bias, self.conv = x, s, zp, w, w_scale, bias, conv
        self.linear = self.transposed = False


def _bias_vector(b: Any, out: Any, hit: _QMatch) -> bool:
    """`b` adds one float32 value per output channel to `out`: (1, O, 1, 1) / (O, 1, 1) for a conv,
    (O,) / (1, O) for a linear layer."""
    from edgeflex.kernels.tir.match import static

    ty = getattr(b, "ty", None)
    if ty is None or getattr(ty, "dtype", None) != "float32" or not static(getattr(ty, "shape", None)):
        return False
    shape, o = [int(v) for v in ty.shape], int(out.ty.shape[1])
    return shape in (([o], [1, o]) if hit.linear else ([1, o, 1, 1], [o, 1, 1]))


def _uint8_qdq(m: Any, expr: Any) -> tuple[Any, float, float, Any] | None:
    """(x, s, zp, quantized) when `expr` is dequantize(quantized = quantize(x, s, zp)) to uint8 with one
    scalar scale and zero point, the same in both (ONNX's QDQ pair around an activation); else None."""
    from edgeflex.kernels.tir.match import scalar

    dq = m.definition(expr)
    if op_name(dq) != "relax.dequantize":
        return None
    q = m.definition(dq.args[0])
    if op_name(q) != "relax.quantize" or str(q.attrs.out_dtype) != "uint8":
        return None
    s, zp = scalar(dq.args[1]), scalar(dq.args[2])
    if s is None or zp is None or (scalar(q.args[1]), scalar(q.args[2])) != (s, zp):
        return None
    return q.args[0], s, zp, dq.args[0]


class _Readers:
    """Who reads each variable of a function (`Matcher` `m`, `uses`: references per variable): `only_user`
    and `qdq_after`, shared by the star-block and depthwise matches."""

    def __init__(self, m: Any, uses: dict[Any, int]):
        from tvm import relax

        self.m, self.uses = m, uses
        self.users: dict[Any, list[Any]] = {}
        for v, value in m.value.items():
            seen: set = set()
            relax.analysis.post_order_visit(value, lambda e, seen=seen: isinstance(e, relax.Var)
                                            and seen.add(e))
            for u in seen:
                self.users.setdefault(u, []).append(v)

    def only_user(self, var: Any) -> Any:
        """The one variable whose value reads `var` (once), else None."""
        us = self.users.get(var, [])
        return us[0] if len(us) == 1 and self.uses.get(var, 0) == 1 else None

    def qdq_after(self, var: Any) -> tuple[Any, tuple[float, int]] | None:
        """(the dequantize's variable, (s, zp)) when `var`'s only reader is a uint8 quantize whose only
        reader is a dequantize with the same scalar scale and zero point."""
        from edgeflex.kernels.tir.match import scalar

        q = self.only_user(var)
        dq = self.only_user(q) if q is not None else None
        if dq is None:
            return None
        qv, dqv = self.m.definition(q), self.m.definition(dq)
        if op_name(qv) != "relax.quantize" or op_name(dqv) != "relax.dequantize" \
                or str(qv.attrs.out_dtype) != "uint8" or not dqv.args[0].same_as(q):
            return None
        sz = (scalar(qv.args[1]), scalar(qv.args[2]))
        if None in sz or sz != (scalar(dqv.args[1]), scalar(dqv.args[2])):
            return None
        return dq, (sz[0], int(sz[1]))


def _find(func: Any, family: tuple) -> dict[Any, _QMatch]:
    """{variable: match} for every `conv2d(dequantize(quantize(x)), dequantize(w_q)) [+ bias]` in `func`
    with an int8 weight whose zero point is 0, groups 1 and dilation 1 (depthwise convs stay float32)."""
    from tvm import relax

    from edgeflex.kernels.tir.match import Matcher, static

    m = Matcher(func)
    uses: dict[Any, int] = {}
    for value in m.value.values():
        relax.analysis.post_order_visit(value, lambda e: isinstance(e, relax.Var) and uses.__setitem__(
            e, uses.get(e, 0) + 1))
    hits: dict[Any, _QMatch] = {}

    def act(expr: Any, ndim: int) -> tuple[Any, float, int] | None:
        """(x, s, zp) when `expr` is dequantize(quantize(x, s, zp)) of a float32 x with `ndim` dims
        (static but for the batch, at least 16 values an image), uint8, scalar s and zp."""
        found = _uint8_qdq(m, expr)
        if found is None:
            return None
        x, s, zp, _ = found
        if x.ty.dtype != "float32" or x.ty.ndim != ndim or not static(list(x.ty.shape)[1:]) \
                or int(np.prod([int(d) for d in list(x.ty.shape)[1:]])) < 16:
            return None
        return x, s, int(zp)

    def weight(expr: Any, axis: int) -> tuple[Any, Any] | None:
        """(w_q, scale) when `expr` is dequantize(w_q) of an int8 weight, zero point 0, the scale one
        value or one per output channel (`axis`)."""
        dq = m.definition(expr)
        if op_name(dq) != "relax.dequantize":
            return None
        w, w_scale, w_zp = dq.args
        zw = _const(w_zp)
        if w.ty.dtype != "int8" or zw is None or np.any(zw != 0) or not static(w.ty.shape):
            return None
        sc = _const(w_scale)
        if int(dq.attrs.axis) % w.ty.ndim != axis and (sc is None or sc.size != 1):
            return None             # a scale per input channel or tap: not one per output channel
        return w, w_scale

    def conv_match(call: Any) -> _QMatch | None:
        if op_name(call) != "relax.nn.conv2d":
            return None
        a = call.attrs
        if (a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW"
                or int(a.groups) != 1 or tuple(int(v) for v in a.dilation) != (1, 1)):
            return None
        xa, wa = act(call.args[0], 4), weight(call.args[1], 0)
        if xa is None or wa is None:
            return None
        return _QMatch(xa[0], xa[1], xa[2], wa[0], wa[1], None, call)

    def linear_match(call: Any) -> _QMatch | None:
        """matmul(dq(q(x)), permute_dims(dq(w_q [O, K]))) (ONNX Gemm, transB) or matmul(dq(q(x)),
        dq(w_q [K, O])) (MatMul), x [N, K]: the weight as a [O, K, 1, 1] conv's."""
        if op_name(call) != "relax.matmul":
            return None
        xa = act(call.args[0], 2)
        b = m.definition(call.args[1])
        if xa is None:
            return None
        if op_name(b) == "relax.permute_dims" and [int(v) for v in b.attrs.axes] == [1, 0]:
            wa, transposed = weight(b.args[0], 0), False
        else:
            wa, transposed = weight(call.args[1], 1), True
        if wa is None or wa[0].ty.ndim != 2:
            return None
        hit = _QMatch(xa[0], xa[1], xa[2], wa[0], wa[1], None, call)
        hit.linear, hit.transposed = True, transposed
        return hit

    def match(call: Any) -> _QMatch | None:
        return conv_match(call) or linear_match(call)

    for var, value in m.value.items():
        if op_name(value) == "relax.add":
            for c, bexpr in ((value.args[0], value.args[1]), (value.args[1], value.args[0])):
                hit = match(m.definition(c))
                if hit is not None and uses.get(c, 0) == 1 and _bias_vector(bexpr, c, hit):
                    hit.bias = bexpr
                    hits[var] = hit
                    break
        hit = match(value)
        if hit is not None and var not in hits:
            hits[var] = hit
    # a conv whose add took it is computed by the add's kernel
    for hit in list(hits.values()):
        if hit.bias is not None:
            for v2, h2 in list(hits.items()):
                if h2.bias is None and h2.conv.same_as(hit.conv):
                    del hits[v2]
    readers = _Readers(m, uses)
    hits = _star_blocks(m, uses, hits, readers) if FUSE_STAR else hits
    return _depthwise(m, uses, hits, readers) if family is X86_VNNI and FUSE_DEPTHWISE else hits


class _StarMatch:
    """g(act(f1(x)) * f2(x)) with f1, f2, g int8 1x1 convs (`_QMatch`es) and the QDQ of f1's and f2's
    outputs: (scale, zero point, act) each, act a (lo, hi) clip or None."""

    def __init__(self, f1: _QMatch, f2: _QMatch, g: _QMatch, side1: tuple, side2: tuple):
        self.f1, self.f2, self.g, self.side1, self.side2 = f1, f2, g, side1, side2
        self.out_q: tuple[float, int] | None = None     # g's output QDQ (scale, zero point), when fused


def _star_blocks(m: Any, uses: dict[Any, int], hits: dict[Any, Any],
                 readers: _Readers) -> dict[Any, Any]:
    """`hits` with every star block's three convs replaced by one `_StarMatch` under g's variable: g's
    input is multiply(A, B), each of A and B [ReLU / ReLU6 of] dequantize(quantize(c)) of a 1x1 conv c,
    both convs reading the same quantized x, each intermediate used once (`kernels.tir.qstar`)."""
    from edgeflex.kernels.tir.match import static
    from edgeflex.kernels.tir.qstar import MIN_PIXELS

    def plain_1x1(hit: Any) -> bool:
        if not isinstance(hit, _QMatch) or hit.linear:
            return False
        a = hit.conv.attrs
        return ([int(v) for v in hit.w.ty.shape][2:] == [1, 1] and tuple(int(v) for v in a.strides)
                == (1, 1) and padding4(a.padding) == (0, 0, 0, 0))

    def side(expr: Any) -> tuple[Any, tuple] | None:
        act = None
        inner = m.relu6(expr)
        if inner is not None:
            act = (0.0, 6.0)
        elif op_name(m.definition(expr)) == "relax.nn.relu":
            inner, act = m.definition(expr).args[0], (0.0, float("inf"))
        else:
            inner = expr
        if act is not None and uses.get(inner, 0) != 1:
            return None
        found = _uint8_qdq(m, inner)
        if found is None or uses.get(found[3], 0) != 1:
            return None
        c, s, zp, _ = found
        if c not in hits or uses.get(c, 0) != 1 or not plain_1x1(hits[c]):
            return None
        return c, (s, int(zp), act)

    out = dict(hits)
    for var, g in hits.items():
        if not plain_1x1(g) or var not in out:
            continue
        mul = m.definition(g.x)
        if op_name(mul) != "relax.multiply" or uses.get(g.x, 0) != 1:
            continue
        a, b = side(mul.args[0]), side(mul.args[1])
        if a is None or b is None or a[0].same_as(b[0]) or a[0] not in out or b[0] not in out:
            continue
        f1, f2 = hits[a[0]], hits[b[0]]
        shape = list(f1.x.ty.shape)[1:]
        c, hid = int(f1.w.ty.shape[1]), int(f1.w.ty.shape[0])
        if (not f1.x.same_as(f2.x) or (f1.s, f1.zp) != (f2.s, f2.zp) or not static(shape)
                or [int(v) for v in f2.w.ty.shape] != [int(v) for v in f1.w.ty.shape]
                or int(g.w.ty.shape[1]) != hid or c % 4 or hid % 4
                or int(shape[1]) * int(shape[2]) < MIN_PIXELS):
            continue
        del out[a[0]], out[b[0]]
        out[var] = _StarMatch(f1, f2, g, a[1], b[1])
        # the graph's QuantizeLinear / DequantizeLinear of g's output, when nothing else reads it: in the
        # kernel's epilogue (one pass over the block's output fewer)
        oq = readers.qdq_after(var)
        if oq is not None and oq[0] not in out:
            out[oq[0]] = out.pop(var)
            out[oq[0]].out_q = oq[1]
    return out


class _DwMatch:
    """One int8 depthwise conv (`kernels.tir.qdwconv`): its input (the DequantizeLinear's output, on the
    (s, zp) grid), the int8 weight and its scale, the bias, the conv2d call, and what the kernel fuses
    after it: the output QDQ, the residual add and the add's QDQ (None where it does not)."""

    def __init__(self, x, s, zp, w, w_scale, bias, conv):
        self.x, self.s, self.zp, self.w, self.w_scale, self.bias, self.conv = x, s, zp, w, w_scale, bias, conv
        self.out_q: tuple[float, int] | None = None
        self.residual: Any = None
        self.add_q: tuple[float, int] | None = None


def _depthwise(m: Any, uses: dict[Any, int], hits: dict[Any, Any],
               readers: _Readers) -> dict[Any, Any]:
    """`hits` plus every `conv2d(dequantize(quantize(t)), dequantize(w_q), groups=C) [+ bias]` of stride 1
    whose plane `qdwconv` takes, and after it, where each intermediate has no other reader, the chain
    StarNet's QDQ graph has: quantize / dequantize of the output, + a residual, quantize / dequantize of the
    sum. A hit whose input was the sum before its QuantizeLinear reads the DequantizeLinear's output instead
    (the same values: re-quantizing them with the same scale gives back the same bytes)."""
    from tvm import relax

    from edgeflex.kernels.tir.match import static
    from edgeflex.kernels.tir.qdwconv import usable

    only_user, qdq_after = readers.only_user, readers.qdq_after
    out = dict(hits)
    taken = set(out)
    for var, call in m.value.items():
        if op_name(call) != "relax.nn.conv2d":
            continue
        a = call.attrs
        xin, wdq = call.args
        if (a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW"
                or tuple(int(v) for v in a.strides) != (1, 1) or tuple(int(v) for v in a.dilation) != (1, 1)
                or not isinstance(xin, relax.Var) or xin.ty.ndim != 4 or not static(list(xin.ty.shape)[1:])):
            continue
        c, h, w = (int(v) for v in list(xin.ty.shape)[1:])
        wshape = [int(v) for v in wdq.ty.shape] if static(getattr(wdq.ty, "shape", None)) else []
        if int(a.groups) != c or len(wshape) != 4 or wshape[:2] != [c, 1]:
            continue
        if not usable(h, w, padding4(a.padding), (wshape[2], wshape[3])):
            continue
        qx = _uint8_qdq(m, xin)
        dq = m.definition(wdq)
        if qx is None or op_name(dq) != "relax.dequantize" or dq.args[0].ty.dtype != "int8":
            continue
        zw, sc = _const(dq.args[2]), _const(dq.args[1])
        if zw is None or np.any(zw != 0) or (int(dq.attrs.axis) % 4 != 0 and (sc is None or sc.size != 1)):
            continue
        hit = _DwMatch(xin, qx[1], int(qx[2]), dq.args[0], dq.args[1], None, call)
        end = var
        user = only_user(var)
        if user is not None and op_name(m.definition(user)) == "relax.add":
            add = m.definition(user)
            other = add.args[1] if add.args[0].same_as(var) else add.args[0]
            ty = getattr(other, "ty", None)
            if (ty is not None and ty.dtype == "float32" and static(getattr(ty, "shape", None))
                    and [int(v) for v in ty.shape] in ([1, c, 1, 1], [c, 1, 1])):
                hit.bias, end = other, user
        # the residual's chain: output QDQ, + residual, the sum's QDQ (StarNet's second depthwise conv)
        oq = qdq_after(end)
        add_var = only_user(oq[0]) if oq is not None else None
        if add_var is not None and op_name(m.definition(add_var)) == "relax.add":
            add = m.definition(add_var)
            other = add.args[1] if add.args[0].same_as(oq[0]) else add.args[0]
            if (not other.same_as(oq[0]) and isinstance(other, relax.Var) and other.ty.dtype == "float32"
                    and str(other.ty.shape) == str(add_var.ty.shape) == str(end.ty.shape)):
                hit.out_q, hit.residual, end = oq[1], other, add_var
                aq = qdq_after(add_var)
                if aq is not None and _reread(out, add_var, *aq):
                    hit.add_q, end = aq[1], aq[0]
        if end in taken:
            continue
        out[end] = hit
        taken.add(end)
    return out


def _reread(hits: dict[Any, Any], var: Any, dq: Any, sz: tuple[float, int]) -> bool:
    """Move the int8 conv hits that quantize `var` (a residual sum) to read `dq`, its dequantized values
    (the same bytes once re-quantized with the same scale), so that the sum's QDQ can go into the depthwise
    kernel; False (nothing moved) when one of them quantizes it differently."""
    subs = [sub for h in hits.values() for sub in ((h.f1, h.f2) if isinstance(h, _StarMatch) else (h,))
            if isinstance(sub, _QMatch) and sub.x.same_as(var)]
    if any((sub.s, int(sub.zp)) != sz for sub in subs):
        return False
    for sub in subs:
        sub.x = dq
    return True


def _weight_args(w_expr: Any, w_scale: Any, s: float, co: int, c: int, kh: int, kw: int) -> list[Any]:
    """An int8 conv weight [co, c, kh, kw] as the kernels take it: packed [co, kh*kw*c4*4] (OHWI, input
    channels padded to quads), its row sums (int32) and s * s_w[o] (float32); constants when the weight
    is one, else Relax ops that the compile lifts into the load-time transform."""
    from tvm import relax

    c4 = -(-c // 4)
    wc = _const(w_expr)
    if wc is not None:
        packed = np.zeros((co, kh, kw, c4 * 4), np.int8)
        packed[..., :c] = wc.transpose(0, 2, 3, 1)
        w_arg = relax.const(packed.reshape(co, -1), "int8")
        wsum = relax.const(wc.astype(np.int32).reshape(co, -1).sum(1).astype(np.int32), "int32")
    else:
        t = relax.op.permute_dims(w_expr, [0, 2, 3, 1])
        if c4 * 4 != c:
            t = relax.op.nn.pad(t, [0, 0, 0, 0, 0, 0, 0, c4 * 4 - c])
        w_arg = relax.op.reshape(t, [co, kh * kw * c4 * 4])
        wsum = relax.op.sum(relax.op.astype(w_expr, "int32"), axis=[1, 2, 3])
    sc = _const(w_scale)
    if sc is not None:
        ws = relax.const((np.broadcast_to(sc.reshape(-1), (co,)).astype(np.float64) * s)
                         .astype(np.float32), "float32")
    else:
        ws = relax.op.multiply(relax.op.broadcast_to(relax.op.reshape(w_scale, [-1]), [co]),
                               relax.const(np.float32(s), "float32"))
    return [w_arg, ws, wsum]


def _bias_arg(bias: Any, co: int) -> Any:
    from tvm import relax

    if bias is None:
        return relax.const(np.zeros(co, np.float32), "float32")
    bc = _const(bias)
    return relax.const(bc.reshape(co).astype(np.float32)) if bc is not None else relax.op.reshape(bias, [co])


def _fold_args(ws: Any, bias: Any, wsum: Any, co: int, zq: int, s_out: float) -> list[Any]:
    """(m, c) of `qstar.fold` for one conv of a star block: numpy when its weights are constants, else
    Relax ops (lifted into the load-time transform with the weights')."""
    from tvm import relax

    from edgeflex.kernels.tir.qstar import fold

    b = _bias_arg(bias, co)
    consts = [_const(e) for e in (ws, b, wsum)]
    if all(v is not None for v in consts):
        return [relax.const(v, "float32") for v in fold(consts[0].reshape(co), consts[1].reshape(co),
                                                         consts[2].reshape(co), zq, s_out)]
    inv = relax.const(np.float32(1.0 / s_out), "float32")
    m = relax.op.multiply(ws, inv)
    zws = relax.op.multiply(ws, relax.const(np.float32(zq), "float32"))
    c = relax.op.multiply(relax.op.subtract(b, relax.op.multiply(relax.op.astype(wsum, "float32"), zws)), inv)
    return [m, c]


def _amx_g_weight_arg(w_arg: Any, co: int, hid: int) -> Any:
    """g's packed [co, hid] int8 weight as `qstar.amx_g_weight` lays it out (rows zero-padded to 64s)."""
    from tvm import relax

    from edgeflex.kernels.tir.qstar import amx_g_weight

    wc = _const(w_arg)
    if wc is not None:
        return relax.const(amx_g_weight(wc.reshape(co, hid)), "int8")
    kg = -(-hid // 64) * 64
    return w_arg if kg == hid else relax.op.nn.pad(w_arg, [0, 0, 0, kg - hid])


def _lower_star(match: _StarMatch, ctx: RewriteContext, family: tuple) -> tuple[str, Any, list[Any]]:
    from edgeflex.kernels.tir.qstar import amx_g, amx_usable, qstar_primfunc

    f1, f2, g = match.f1, match.f2, match.g
    batch = batch_of(f1.x.ty.shape)
    c, h, w = (int(v) for v in list(f1.x.ty.shape)[1:])
    hid, co = int(f1.w.ty.shape[0]), int(g.w.ty.shape[0])
    quant = {"s0": f1.s, "z0": f1.zp, "s1": match.side1[0], "z1": match.side1[1], "act1": match.side1[2],
             "s2": match.side2[0], "z2": match.side2[1], "act2": match.side2[2], "s3": g.s, "z3": g.zp}
    if match.out_q is not None:
        quant["s4"], quant["z4"] = match.out_q
    amx = family is X86_VNNI and amx_usable(ctx.target, c, hid, h * w)
    key = zlib.crc32(repr(sorted(quant.items())).encode())
    name = (f"qstar_{'amx' if amx else 'x86' if family is X86_VNNI else 'arm'}_{c}x{h}x{w}_h{hid}_o{co}"
            f"_b{batch or 'n'}_{key % 10**8}")
    shift = family[3]
    args = [f1.x]
    for hit, s_out in ((f1, match.side1[0]), (f2, match.side2[0])):
        w_arg, ws, wsum = _weight_args(hit.w, hit.w_scale, hit.s, hid, c, 1, 1)
        args += [w_arg,
                 *_fold_args(ws, hit.bias, wsum, hid, f1.zp - shift, s_out)]
    w_arg, ws, wsum = _weight_args(g.w, g.w_scale, g.s, co, hid, 1, 1)
    args += [_amx_g_weight_arg(w_arg, co, hid) if amx_g(amx, co) else w_arg,
             *_fold_args(ws, g.bias, wsum, co, g.zp - shift, 1.0)]

    def make():
        return qstar_primfunc(batch, c, h, w, hid, co, quant, family, amx=amx)

    return name, make, args


def _lower_dw(match: _DwMatch) -> tuple[str, Any, list[Any]]:
    from tvm import relax

    from edgeflex.kernels.tir.qdwconv import qdwconv_primfunc, weight_quads

    batch = batch_of(match.x.ty.shape)
    c, h, w = (int(v) for v in list(match.x.ty.shape)[1:])
    kh, kw = (int(v) for v in list(match.w.ty.shape)[2:])
    kq = -(-kw // 4)
    pad = padding4(match.conv.attrs.padding)
    quant: dict[str, Any] = {"s": match.s, "z": match.zp}
    if match.out_q is not None:
        quant["s_o"], quant["z_o"] = match.out_q
    if match.add_q is not None:
        quant["s_a"], quant["z_a"] = match.add_q
    residual = match.residual is not None
    key = zlib.crc32(repr(sorted(quant.items())).encode())
    name = (f"qdwconv_x86_{c}x{h}x{w}_k{kh}x{kw}_p{''.join(map(str, pad))}_b{batch or 'n'}"
            f"{'_res' if residual else ''}_{key % 10**8}")
    _, ws, wsum = _weight_args(match.w, match.w_scale, match.s, c, 1, kh, kw)
    wc = _const(match.w)
    if wc is not None:
        w_arg = relax.const(weight_quads(wc), "int8")
    else:
        t = relax.op.reshape(match.w, [c, kh, kw])
        if kq * 4 != kw:
            t = relax.op.nn.pad(t, [0, 0, 0, 0, 0, kq * 4 - kw])
        w_arg = relax.op.reshape(t, [c, kh * kq * 4])
    r = match.residual if residual else relax.const(np.zeros((1,), np.float32))

    def make():
        return qdwconv_primfunc(batch, c, h, w, (kh, kw), pad, quant, residual=residual)

    return name, make, [match.x, w_arg, ws, wsum, _bias_arg(match.bias, c), r]


def _lower(match: _QMatch, ctx: RewriteContext, family: tuple) -> tuple[str, Any, list[Any]]:
    from tvm import relax

    if isinstance(match, _StarMatch):
        return _lower_star(match, ctx, family)
    if isinstance(match, _DwMatch):
        return _lower_dw(match)
    call = match.conv
    batch = batch_of(match.x.ty.shape)
    w_expr = match.w
    if match.linear:
        c = int(match.x.ty.shape[1])
        h = w = kh = kw = 1
        stride, pad = (1, 1), (0, 0, 0, 0)
        co = int(match.w.ty.shape[1 if match.transposed else 0])
        if _const(w_expr) is not None:
            wn = _const(w_expr)
            w_expr = relax.const((wn.T if match.transposed else wn).reshape(co, c, 1, 1).copy(), "int8")
        else:
            w_expr = relax.op.reshape(relax.op.permute_dims(w_expr, [1, 0]) if match.transposed else w_expr,
                                      [co, c, 1, 1])
        kind = "qlinear"
    else:
        a = call.attrs
        c, h, w = (int(v) for v in list(match.x.ty.shape)[1:])
        co, _, kh, kw = (int(v) for v in match.w.ty.shape)
        stride = tuple(int(v) for v in a.strides)
        pad = padding4(a.padding)
        kind = "qconv"
    name = (f"{kind}_{'x86' if family is X86_VNNI else 'arm'}_{c}x{h}x{w}_o{co}_k{kh}x{kw}_s{stride[0]}"
            f"_p{''.join(map(str, pad))}_b{batch or 'n'}_{abs(hash((match.s, match.zp))) % 10**8}")
    w_arg, ws, wsum = _weight_args(w_expr, match.w_scale, match.s, co, c, kh, kw)
    b = _bias_arg(match.bias, co)

    def make():
        return qconv_primfunc(batch, c, h, w, co, (kh, kw), stride, pad, match.s, match.zp, family,
                              linear=match.linear)

    return name, make, [match.x, w_arg, ws, wsum, b]


@register("qconv")
def rewrite_qconv(mod: Any, ctx: RewriteContext) -> Any:
    """conv2d on dequantized uint8 activations and int8 weights -> the int8 kernel (see the module doc);
    None when the target has no dot-product instruction or the module no such conv."""
    from edgeflex.kernels.tir.match import rewrite_matches

    family = qdot_instruction(ctx.target)
    if family is None:
        return None
    return rewrite_matches(mod, ctx, lambda f: _find(f, family), lambda _v, hit: _lower(hit, ctx, family),
                           fold=False)
