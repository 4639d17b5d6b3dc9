"""The int8 depthwise convolution (issue 21): StarNet's 7x7 depthwise convs of a QDQ graph as uint8 x int8 ->
int32 with AVX512-VNNI `vpdpbusd`, and the QDQ and residual add around them fused where the graph has them.

ONNX Runtime's QDQ graph of a star block's second depthwise conv and its residual (the first conv has only
the input QDQ; its output goes to the star block, which quantizes it itself):

    v  = dequantize(quantize(t, s, z))                       (the conv's input; the kernel reads v)
    c  = conv_dw(v, dequantize(w_q, s_w)) + bias
    o  = dequantize(quantize(c, s_o, z_o))                   [out_q]
    y  = dequantize(quantize(r + o, s_a, z_a))               [residual r, add_q]

The kernel takes v, which lies on the quantization grid ((q - z) * s in float32), so q = rint(v * (1/s)) + z
exactly (the product is within 255 * 2^-22 of an integer); the integer sums are exact; the epilogue is the
graph's float32 arithmetic in its order: (acc - z * sum(w_q)) * (s * s_w[c]) + bias, then each QDQ as
QuantizeLinear / DequantizeLinear with the division as a multiply by the float32 1/s (a value within a
rounding error of a tie may land one step away), the add in float32.

Layout (lanes are output pixels, as `qconv`): per channel, the quantized plane as bytes, padded with the
zero point; a "quad" of pixel p holds the bytes of pixels p, p+1, p+2, p+3 of its row, 16 of them shuffled
from one 64-byte load (`vpermb` where the target has VBMI). One `vpdpbusd` of 16 consecutive quads
against a broadcast of 4 taps' weights adds 4 kernel columns of one kernel row to 16 output pixels; a
7-wide row is 2 of them (taps 0-3 at offset 0, taps 4-6 and a zero weight at offset 4).
So a 7x7 tap set is 14 instructions per 16 output pixels where float32 needs 49 FMAs. As the float32
kernel (`dwconv`), blocks of R output rows x the vectors of a row stay in registers and each loaded quad
vector feeds every output row of the block it reaches.

x86 (AVX512-VNNI) only: on aarch64 (`sdot`, 4 lanes) and on x86 without VNNI the depthwise convs stay
float32 (`dwconv`). The Relax side is in `qconv` (one rewrite matches the whole QDQ graph).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeflex.kernels.tir import PARALLEL_MACS

V = 16              # int32 lanes of one AVX-512 register: output pixels per vector
MAX_ACC = 16        # accumulator vectors per block (of 32 registers)
CHUNKS = 12         # parallel tasks per image (of channels each): a plane buffer per task, not per channel
MIN_PIXELS = 17     # smaller planes (most taps in the padding) stay on the float32 tap-list kernel


def _q(v: np.ndarray, s: float, z: int) -> np.ndarray:
    """ONNX QuantizeLinear to uint8 in float32, round half to even."""
    return np.clip(np.rint(v.astype(np.float32) / np.float32(s)) + np.float32(z), 0, 255).astype(np.int32)


def _qdq(v: np.ndarray, s: float, z: int) -> np.ndarray:
    return ((_q(v, s, z) - z).astype(np.float32) * np.float32(s)).astype(np.float32)


def qdwconv_reference(x: np.ndarray, w_q: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None,
                      pad: tuple[int, int, int, int], quant: dict[str, Any],
                      residual: np.ndarray | None = None) -> np.ndarray:
    """What the kernel computes, in numpy: x [N, C, H, W] float32 quantized with (s, z), the integer
    depthwise conv of it with w_q [C, 1, KH, KW] int8 less the zero point, times s * w_scale[c], + bias;
    then, as `quant` has them, the output QDQ (s_o, z_o), + residual, the add's QDQ (s_a, z_a)."""
    from edgeflex.kernels.tir.dwconv import dwconv_reference

    s, z = quant["s"], int(quant["z"])
    xq = (_q(x, s, z) - z).astype(np.float64)
    acc = dwconv_reference(xq, w_q.astype(np.float64), None, pad).astype(np.float64)  # exact integers
    y = (acc.astype(np.float32) * (np.float32(s) * w_scale.astype(np.float32)).reshape(1, -1, 1, 1))
    if bias is not None:
        y = y + bias.astype(np.float32).reshape(1, -1, 1, 1)
    y = y.astype(np.float32)
    if quant.get("s_o") is not None:
        y = _qdq(y, quant["s_o"], quant["z_o"])
    if residual is not None:
        y = (residual.astype(np.float32) + y).astype(np.float32)
        if quant.get("s_a") is not None:
            y = _qdq(y, quant["s_a"], quant["z_a"])
    return y


def weight_quads(w_q: np.ndarray) -> np.ndarray:
    """A [C, 1, KH, KW] int8 depthwise weight as the kernel reads it: [C, KH * KQ * 4], each kernel row's
    taps padded with zeros to KQ = ceil(KW / 4) groups of 4."""
    c, _, kh, kw = w_q.shape
    kq = -(-kw // 4)
    out = np.zeros((c, kh, kq * 4), np.int8)
    out[..., :kw] = w_q.reshape(c, kh, kw)
    return out.reshape(c, -1)


def usable(height: int, width: int, pad: tuple[int, int, int, int], kernel: tuple[int, int]) -> bool:
    """Planes the kernel takes: stride 1, output at least MIN_PIXELS pixels."""
    oh = height + pad[0] + pad[2] - kernel[0] + 1
    ow = width + pad[1] + pad[3] - kernel[1] + 1
    return oh >= 1 and ow >= 1 and oh * ow >= MIN_PIXELS


def qdwconv_primfunc(batch: int | None, channels: int, height: int, width: int, kernel: tuple[int, int],
                     pad: tuple[int, int, int, int], quant: dict[str, Any], residual: bool = False,
                     instr: str = "llvm.x86.avx512.vpdpbusd.512") -> Any:
    """The kernel for x [batch, C, H, W] float32 (on the (s, z) grid), w [C, KH * KQ * 4] int8
    (`weight_quads`), ws [C] float32 (s * s_w[c]), wsum [C] int32 (sum of each channel's taps), b [C]
    float32, r (the residual, shaped like y; a one-element placeholder without `residual`) -> y [batch, C,
    OH, OW] float32. `quant`: s, z and, where fused, s_o / z_o (output QDQ) and s_a / z_a (the add's)."""
    from tvm import tirx
    from tvm.script import tirx as T

    C, H, W = channels, height, width
    KH, KW = kernel
    KQ = -(-KW // 4)                                    # 4-tap groups per kernel row
    top, left = pad[0], pad[1]
    HP = H + pad[0] + pad[2]
    OH, OW = HP - KH + 1, W + pad[1] + pad[3] - KW + 1
    if not usable(H, W, pad, kernel):
        raise ValueError(f"qdwconv needs an output plane of >= {MIN_PIXELS} pixels, got {OH}x{OW}")
    NV = -(-OW // V)                                    # vectors per output row (the last one partly junk)
    RB = -(-(NV * V + 4 * (KQ - 1) + 4) // V) * V       # bytes per plane row: every tap group's pixels fit
    PB = HP * RB + 64                                   # + the last 64-byte load's over-read
    WV, OV = min(W, V), min(OW, V)                      # lanes of the quantize and epilogue vectors
    R = max(1, min(OH, MAX_ACC // NV))                  # output rows per block
    NBLK = -(-OH // R)                                  # the last block starts early, ending at row OH
    n_img = tirx.Var("n", "int64") if batch is None else batch
    HW, OHW = H * W, OH * OW
    res_shape, res_size = ((n_img, C, OH, OW), n_img * C * OHW) if residual else ((1,), 1)
    s, z = float(np.float32(quant["s"])), int(quant["z"])
    inv_s = float(np.float32(1.0 / np.float64(s)))
    s_o, z_o = quant.get("s_o"), int(quant.get("z_o") or 0)
    s_a, z_a = quant.get("s_a"), int(quant.get("z_a") or 0)
    parallel = batch is None or batch * C * OHW * KH * KW >= PARALLEL_MACS
    CPT = max(1, C // CHUNKS) if parallel else C        # channels per task (one plane buffer per task)
    TASKS = -(-C // CPT)
    # the quads of 16 pixels from 64 loaded bytes: lane l takes bytes l, l+1, l+2, l+3 (one vpermb)
    QUAD = [lane + k for lane in range(V) for k in range(4)]

    def qdq(v, sc, zp):
        """QuantizeLinear then DequantizeLinear, round half to even, the division as a multiply by the
        float32 reciprocal (a vector division costs more than the rest of the epilogue; the two differ
        only where v / sc lies within a rounding error of a tie: one quantization step, rarely)."""
        inv = float(np.float32(1.0 / np.float64(np.float32(sc))))
        # clamp(rint(v / sc) + zp, 0, 255) - zp, exact in float32 as clamp(rint(v / sc), -zp, 255 - zp)
        q = T.max(T.min(T.nearbyint(v * T.float32(inv)), T.float32(255 - zp)), T.float32(-zp))
        return q * T.float32(sc)

    def epilogue(a, c, ws, wsum, b, rv):
        """(acc - z * sum(w_q)) * s * s_w[c] + bias, then the fused QDQ / residual add."""
        y = T.Cast("float32", a - T.int32(z) * wsum[c]) * ws[c] + b[c]
        if s_o is not None:
            y = qdq(y, float(np.float32(s_o)), z_o)
        if residual:
            y = rv + y
            if s_a is not None:
                y = qdq(y, float(np.float32(s_a)), z_a)
        return y

    @T.macro
    def plane(xf, task, pb):
        """Channel `task`'s plane quantized to bytes, the zero point around it."""
        for q in range(PB // 64):
            for p in T.vectorized(64):
                pb[q * 64 + p] = T.uint8(z)
        for r in range(H):
            for v in range(-(-W // WV)):                   # vectors of WV, the last one overlapping
                for e in T.vectorized(WV):
                    pb[(r + top) * RB + left + T.min(v * WV, W - WV) + e] = T.Cast("uint8", T.max(T.min(
                        T.nearbyint(xf[task * HW + r * W + T.min(v * WV, W - WV) + e] * T.float32(inv_s))
                        + T.float32(z), T.float32(255)), T.float32(0)))

    @T.macro
    def conv(wf, ws, wsum, b, rf, yf, task, pb):
        """Channel `task`: blocks of R output rows, each quad vector (16 pixels x 4 taps, shuffled from one
        64-byte load) used for every output row of the block it feeds."""
        c: T.let = task % C
        for blk in range(NBLK):
            r0: T.let = T.min(blk * R, OH - R)
            acc = T.decl_buffer((R * NV * V,), "int32", scope="local")
            for a in T.unroll(R * NV):
                acc[T.ramp(a * V, 1, V)] = T.broadcast(T.int32(0), V)
            for g in T.unroll(KQ):
                for ii in T.unroll(R + KH - 1):
                    for cv in T.unroll(NV):
                        qv: T.let = T.Shuffle([pb[T.ramp((r0 + ii) * RB + cv * V + g * 4, 1, 64)]], QUAD)
                        for r in T.unroll(R):
                            if ii - r >= 0 and ii - r < KH:
                                acc[T.ramp((r * NV + cv) * V, 1, V)] = T.call_llvm_pure_intrin(
                                    "int32x16", instr, acc[T.ramp((r * NV + cv) * V, 1, V)],
                                    T.reinterpret("uint8x64", qv),
                                    T.reinterpret("int8x64", T.broadcast(T.reinterpret(
                                        "int32", wf[T.ramp((c * KH + ii - r) * KQ * 4 + g * 4, 1, 4)]), V)))
            for r in range(R):
                for v in T.unroll(-(-OW // OV)):              # vectors of OV, the last one overlapping
                    if residual:
                        for e in T.vectorized(OV):
                            yf[task * OHW + (r0 + r) * OW + T.min(v * OV, OW - OV) + e] = epilogue(
                                acc[r * NV * V + T.min(v * OV, OW - OV) + e], c, ws, wsum, b,
                                rf[task * OHW + (r0 + r) * OW + T.min(v * OV, OW - OV) + e])
                    else:
                        for e in T.vectorized(OV):
                            yf[task * OHW + (r0 + r) * OW + T.min(v * OV, OW - OV) + e] = epilogue(
                                acc[r * NV * V + T.min(v * OV, OW - OV) + e], c, ws, wsum, b, None)

    @T.prim_func
    def qdwconv(x_h: T.handle, w_h: T.handle, ws_h: T.handle, wsum_h: T.handle, b_h: T.handle,
                r_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        x = T.match_buffer(x_h, (n_img, C, H, W), "float32")
        w = T.match_buffer(w_h, (C, KH * KQ * 4), "int8")
        ws = T.match_buffer(ws_h, (C,), "float32")
        wsum = T.match_buffer(wsum_h, (C,), "int32")
        b = T.match_buffer(b_h, (C,), "float32")
        res = T.match_buffer(r_h, res_shape, "float32")
        y = T.match_buffer(y_h, (n_img, C, OH, OW), "float32")
        xf = T.decl_buffer((n_img * C * HW,), "float32", data=x.data)
        wf = T.decl_buffer((C * KH * KQ * 4,), "int8", data=w.data)
        rf = T.decl_buffer((res_size,), "float32", data=res.data)
        yf = T.decl_buffer((n_img * C * OHW,), "float32", data=y.data)
        for img in range(n_img):
            if parallel:
                for t in T.parallel(TASKS):
                    pb = T.decl_buffer((PB,), "uint8", scope="local")
                    for i in range(T.min(CPT, C - t * CPT)):
                        plane(xf, img * C + t * CPT + i, pb)
                        conv(wf, ws, wsum, b, rf, yf, img * C + t * CPT + i, pb)
            else:
                pb = T.decl_buffer((PB,), "uint8", scope="local")
                for c in range(C):
                    plane(xf, img * C + c, pb)
                    conv(wf, ws, wsum, b, rf, yf, img * C + c, pb)

    return qdwconv
