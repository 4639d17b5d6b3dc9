"""Depthwise KxK stride-1 convolutions (StarNet's two 7x7 per block) as one hand-scheduled TVM kernel on
NCHW, bias and an optional residual add fused, and the Relax rewrite ("dwconv") that puts it in place of
conv2d(groups=C) [+ bias] [+ residual]. Other strides and channel multipliers are left to TVM.

Per channel the kernel copies the plane into a zero-bordered local buffer whose rows are padded to whole
vectors (so no tap needs a bounds check), then accumulates blocks of R output rows x the vectors of a row in
registers. Each vector of the plane is loaded once per kernel column and used for every output row of the
block it feeds (up to KH of them): ~0.4 loads per multiply-add at 56x56 instead of one, faster than the
tap-by-tap schedule it replaced on every StarNet-S1 plane, 7x7 to 56x56 (benchmarks/RESULTS.md, TVM kernels
for StarNet).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeflex.kernels.tir import PARALLEL_MACS, RewriteContext, register
from edgeflex.kernels.tir.match import (
    Matcher,
    batch_of,
    op_name,
    outermost,
    padding4,
    rewrite_matches,
    stacked,
)

VECTOR = 16         # output pixels per vector: one AVX-512 register of float32
MAX_ACC = 16        # accumulator vectors per block (of 32 registers): R output rows x the vectors of a row
SMALL_PIXELS = 16   # up to this many output pixels per plane: the tap-list schedule (see dwconv_primfunc)


def dwconv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pad: tuple[int, ...],
                     residual: np.ndarray | None = None) -> np.ndarray:
    """Depthwise stride-1 conv of x [N, C, H, W] with w [C, 1, KH, KW], pad (top, left, bottom, right)."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2:]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])))
    oh, ow = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    y = np.zeros((n, c, oh, ow))
    for i in range(kh):
        for j in range(kw):
            y += w[None, :, 0, i, j, None, None] * xp[:, :, i:i + oh, j:j + ow]
    if b is not None:
        y += b[None, :, None, None]
    if residual is not None:
        y += residual
    return y.astype(np.float32)


def dwconv_primfunc(batch: int | None, channels: int, height: int, width: int, kernel: tuple[int, int],
                    pad: tuple[int, int, int, int], residual: bool) -> Any:
    """The kernel for x [batch, C, H, W] (batch None: any batch), w [C, KH*KW], b [C] (and with `residual`
    a tensor shaped like the output, added) -> y [batch, C, OH, OW]. Scheduled by hand
    (`tirx.is_scheduled`): parallel over (image, channel)."""
    from tvm import tirx
    from tvm.script import tirx as T

    C, H, W = channels, height, width
    KH, KW = kernel
    top, left = pad[0], pad[1]
    HP, WPAD = H + pad[0] + pad[2], W + pad[1] + pad[3]
    OH, OW = HP - KH + 1, WPAD - KW + 1
    V = VECTOR
    NV = -(-OW // V)                                    # vectors per output row (the last one partly junk)
    WPP = -(-(NV * V + KW - 1) // V) * V                # plane row pitch: every tap's vector lies inside
    R = max(1, min(OH, MAX_ACC // NV))                  # output rows per block
    NBLK = -(-OH // R)                                  # the last block starts early, ending at row OH
    n_img = tirx.Var("n", "int64") if batch is None else batch
    HW, OHW = H * W, OH * OW
    # Without a residual the kernel takes a one-element placeholder in its place (never read).
    res_shape, res_size = ((n_img, C, OH, OW), n_img * C * OHW) if residual else ((1,), 1)
    # Small planes (the last stages of a small input: 1x1, 2x2, 4x4 under a 7x7 kernel): most taps fall in
    # the padding, and the vector schedule spent far longer there on a thread-pool launch and zeroed planes
    # than on a few hundred multiply-adds. There each output sums only its in-bounds taps, one channel after
    # another on the calling thread (the taps are known at compile time: the loops unroll to a fixed list).
    small = OHW <= SMALL_PIXELS

    @T.macro
    def tap_list(xf, w, b, rf, yf, task):
        c: T.let = task % C
        for oh in T.unroll(OH):
            for ow in T.unroll(OW):
                acc = T.decl_buffer((1,), "float32", scope="local")
                acc[0] = b[c]
                for kh in range(T.max(0, top - oh), T.min(KH, H + top - oh)):
                    for kw in range(T.max(0, left - ow), T.min(KW, W + left - ow)):
                        acc[0] = acc[0] + w[c, kh * KW + kw] * \
                            xf[task * HW + (oh + kh - top) * W + ow + kw - left]
                if residual:
                    yf[task * OHW + oh * OW + ow] = acc[0] + rf[task * OHW + oh * OW + ow]
                else:
                    yf[task * OHW + oh * OW + ow] = acc[0]

    @T.macro
    def plane_task(xf, w, b, rf, yf, task):
        c: T.let = task % C
        plane = T.decl_buffer((HP * WPP,), "float32", scope="local")
        for q in range(HP * WPP // V):
            for s in T.vectorized(V):
                plane[q * V + s] = T.float32(0)
        for r in range(H):
            for s in T.vectorized(W):
                plane[(r + top) * WPP + left + s] = xf[task * HW + r * W + s]
        for blk in range(NBLK):
            r0: T.let = T.min(blk * R, OH - R)
            acc = T.decl_buffer((R * NV, V), "float32", scope="local")
            row = T.decl_buffer((V,), "float32", scope="local")
            for a in T.unroll(R * NV):
                for s in T.vectorized(V):
                    acc[a, s] = b[c]
            for j in T.unroll(KW):
                for ii in T.unroll(R + KH - 1):            # plane rows the block reads
                    for cv in T.unroll(NV):
                        for s in T.vectorized(V):
                            row[s] = plane[(r0 + ii) * WPP + cv * V + j + s]
                        for r in T.unroll(R):              # every output row this plane row feeds
                            if ii - r >= 0 and ii - r < KH:
                                for s in T.vectorized(V):
                                    acc[r * NV + cv, s] = acc[r * NV + cv, s] + \
                                        w[c, (ii - r) * KW + j] * row[s]
            for r in range(R):
                for s in T.vectorized(OW):
                    if residual:
                        yf[task * OHW + (r0 + r) * OW + s] = acc[r * NV + s // V, s % V] + \
                            rf[task * OHW + (r0 + r) * OW + s]
                    else:
                        yf[task * OHW + (r0 + r) * OW + s] = acc[r * NV + s // V, s % V]

    @T.prim_func
    def dwconv(x_h: T.handle, w_h: T.handle, b_h: T.handle, r_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        x = T.match_buffer(x_h, (n_img, C, H, W), "float32")
        w = T.match_buffer(w_h, (C, KH * KW), "float32")
        b = T.match_buffer(b_h, (C,), "float32")
        res = T.match_buffer(r_h, res_shape, "float32")
        y = T.match_buffer(y_h, (n_img, C, OH, OW), "float32")
        xf = T.decl_buffer((n_img * C * HW,), "float32", data=x.data)
        rf = T.decl_buffer((res_size,), "float32", data=res.data)
        yf = T.decl_buffer((n_img * C * OHW,), "float32", data=y.data)
        if small:
            for task in range(n_img * C):
                tap_list(xf, w, b, rf, yf, task)
        elif n_img * C * OHW * KH * KW >= PARALLEL_MACS:
            for task in T.parallel(n_img * C):
                plane_task(xf, w, b, rf, yf, task)
        else:
            for task in range(n_img * C):
                plane_task(xf, w, b, rf, yf, task)

    return dwconv


def _is_depthwise(call: Any) -> bool:
    """Groups == input channels == output channels, stride 1."""
    a = call.attrs
    c_in, c_out = int(call.args[0].ty.shape[1]), int(call.args[1].ty.shape[0])
    return (int(a.groups) == c_in == c_out and tuple(int(v) for v in a.strides) == (1, 1)
            and int(call.args[1].ty.shape[1]) == 1)


@register("dwconv")
def rewrite_dwconv(mod: Any, ctx: RewriteContext) -> Any:
    """Every depthwise stride-1 conv2d [+ bias] [+ residual add] of `mod` as one call of the kernel. CPU
    (llvm) targets only; None when there is none."""
    return rewrite_matches(mod, ctx, _find, _lower)


def _find(func: Any) -> dict[Any, tuple[Any, Any, Any]]:
    """{variable: (conv2d call, bias or None, residual or None)}, the outermost match of each conv."""
    m = Matcher(func)
    hits, inner = {}, []
    for var in m.value:
        conv, resid = m.conv_bias(var, _is_depthwise), None
        add = m.definition(var)
        if conv is None and op_name(add) == "relax.add":
            for a, r in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
                conv = m.conv_bias(a, _is_depthwise)
                if conv is not None and _same_shape(r, var):
                    resid = r
                    inner.append(a)
                    break
                conv = None
        if conv is None:
            continue
        hits[var] = (*conv, resid)
        if conv[1] is not None:
            inner.extend(m.definition(inner[-1] if resid is not None else var).args)
    return outermost(hits, inner)


def _lower(var: Any, hit: tuple[Any, Any, Any]) -> tuple[str, Any, list[Any]]:
    call, bias, resid = hit
    x, w = call.args
    batch = batch_of(x.ty.shape)
    c, h, wd = (int(v) for v in list(x.ty.shape)[1:])
    kh, kw = (int(v) for v in list(w.ty.shape)[2:])
    pad = padding4(call.attrs.padding)
    name = (f"dwconv_{'n' if batch is None else batch}x{c}x{h}x{wd}_k{kh}x{kw}_p{'-'.join(map(str, pad))}"
            f"{'_residual' if resid is not None else ''}")
    args = [x, stacked([w], [c], kh * kw), stacked([bias], [c], None),
            resid if resid is not None else _placeholder()]
    return name, lambda: dwconv_primfunc(batch, c, h, wd, (kh, kw), pad, resid is not None), args


def _placeholder() -> Any:
    from tvm import relax

    return relax.const(np.zeros((1,), np.float32))


def _same_shape(a: Any, b: Any) -> bool:
    """`a` and `b` are tensors of one dtype and the same shape (symbolic dims by name)."""
    ta, tb = getattr(a, "ty", None), getattr(b, "ty", None)
    if getattr(ta, "shape", None) is None or getattr(tb, "shape", None) is None:
        return False
    return ta.dtype == tb.dtype and str(ta.shape) == str(tb.shape)
