"""Dense KxK convolutions (StarNet's stem and down-sampling 3x3 stride-2 convs) as one hand-scheduled TVM
kernel on NCHW, with the bias and an optional ReLU6 fused, and the Relax rewrite ("conv") that puts it in
place of conv2d [+ bias] [+ ReLU6]; 1x1 convs too, where the star op (rewritten first) has not taken them.

The kernel first splits the (zero-padded) input by stride phase (space to depth, one pass, the size of
the input), so that every tap of a tile of output pixels is a contiguous vector; then the [Cout x
C*KH*KW] GEMM runs on it tile by tile, register-blocked over output channels; im2col is never written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeflex.kernels.tir import LANES, PARALLEL_MACS, RewriteContext, register
from edgeflex.kernels.tir.match import (
    Matcher,
    batch_of,
    outermost,
    padding4,
    rewrite_matches,
    stacked,
    transposed,
)

PIXELS = 32         # output pixels per tile: two AVX-512 vectors of float32
OUT_BLOCK = 12      # output channels accumulated at once: 12 x 2 = 24 vector registers (faster than 6 on
                    # S1's strided convs: benchmarks/RESULTS.md, TVM kernels for StarNet)
SMALL_PIXELS = 4    # up to this many output pixels per image: `conv_small_primfunc`


def conv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, pad: tuple[int, ...],
                   relu6: bool = False) -> np.ndarray:
    """NCHW conv2d (groups 1) of x [N, C, H, W] with w [O, C, KH, KW], pad (top, left, bottom, right)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])))
    oh, ow = (xp.shape[2] - kh) // stride + 1, (xp.shape[3] - kw) // stride + 1
    y = np.zeros((n, o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
            y += np.einsum("oc,ncpq->nopq", w[:, :, i, j], patch)
    if b is not None:
        y += b[None, :, None, None]
    return (np.clip(y, 0, 6) if relu6 else y).astype(np.float32)


def conv_primfunc(batch: int | None, channels: int, height: int, width: int, out_channels: int,
                  kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int, int, int],
                  relu6: bool) -> Any:
    """The kernel for x [batch, channels, height, width] (batch None: any batch), w [out_channels,
    channels*KH*KW] (OIHW flattened), b [out_channels] -> y [batch, out_channels, OH, OW]. Scheduled by hand
    (`tirx.is_scheduled`): per image, parallel over (pixel tile, channel block); tails by overlapping the
    last tile / block. NOTE: pixels are computed on the phase grid, WG - OW columns wider than the output
    (those few are computed and dropped)."""
    from tvm import tirx
    from tvm.script import tirx as T

    C, H, W, CO = channels, height, width, out_channels
    KH, KW = kernel
    SH, SW = stride
    # The input split by stride phase (space to depth) on a grid of HG x WG: tap (i, j) of output pixel q
    # (flat on that grid) reads phase (i % SH, j % SW) at q + (i // SH) * WG + j // SW, contiguous in q.
    OH, OW, HG, WG = phase_grid(H, W, kernel, stride, pad)
    K, HW, GRID = C * KH * KW, H * W, OH * WG
    # Rows at least a tile wide: tiles never cross an output row, so every tile is stored whole (a vector
    # store); narrower outputs tile the flat grid and store only the pixels inside the output.
    rows = OW >= PIXELS
    P = PIXELS if rows else min(PIXELS, GRID)
    OB = min(OUT_BLOCK, CO)
    per_row = -(-OW // P)
    tiles, oblocks = (OH * per_row if rows else -(-GRID // P)), -(-CO // OB)
    n_img = tirx.Var("n", "int64") if batch is None else batch
    top, left = pad[0], pad[1]
    lo, hi = (0.0, 6.0) if relu6 else (float(np.finfo(np.float32).min), float(np.finfo(np.float32).max))

    @T.prim_func
    def conv(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        x = T.match_buffer(x_h, (n_img, C, H, W), "float32")
        w = T.match_buffer(w_h, (CO, K), "float32")
        b = T.match_buffer(b_h, (CO,), "float32")
        y = T.match_buffer(y_h, (n_img, CO, OH, OW), "float32")
        xf = T.decl_buffer((n_img * C * HW,), "float32", data=x.data)
        yf = T.decl_buffer((n_img * CO * OH * OW,), "float32", data=y.data)
        xs = T.decl_buffer((C * SH * SW * HG * WG + WG,), "float32")
        for img in range(n_img):
            for g in range(WG):
                xs[C * SH * SW * HG * WG + g] = T.float32(0)
            # one thread-pool launch per image for both loops, a barrier between (two launches cost more)
            with T.attr(0, "pragma_parallel_launch_point", 0):
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    for row in T.parallel(C * SH * SW * HG):
                        c: T.let = row // (SH * SW * HG)
                        ph: T.let = row // (SW * HG) % SH
                        pw: T.let = row // HG % SW
                        ih: T.let = row % HG * SH + ph - top
                        for g in range(WG):
                            iw: T.let = g * SW + pw - left
                            xs[row * WG + g] = T.if_then_else(
                                0 <= ih and ih < H and 0 <= iw and iw < W,
                                xf[(img * C + c) * HW + ih * W + iw], T.float32(0))
                for task in T.parallel(tiles * oblocks):
                    t: T.let = task // oblocks
                    q0: T.let = T.if_then_else(rows, t // per_row * WG + T.min(t % per_row * P, OW - P),
                                               T.min(t * P, GRID - P))
                    o0: T.let = T.min(task % oblocks * OB, CO - OB)
                    acc = T.decl_buffer((OB, P), "float32", scope="local")
                    for r in T.unroll(OB):
                        for p in T.vectorized(P):
                            acc[r, p] = b[o0 + r]
                    for c in range(C):
                        for i in T.unroll(KH):
                            for j in T.unroll(KW):
                                src: T.let = (((c * SH + i % SH) * SW + j % SW) * HG * WG + q0
                                              + i // SH * WG + j // SW)
                                for r in T.unroll(OB):
                                    for p in T.vectorized(P):
                                        acc[r, p] = acc[r, p] + w[o0 + r, (c * KH + i) * KW + j] * xs[src + p]
                    if rows:
                        for r in T.unroll(OB):
                            for p in T.vectorized(P):
                                yf[((img * CO + o0 + r) * OH + q0 // WG) * OW + q0 % WG + p] = \
                                    T.min(T.max(acc[r, p], T.float32(lo)), T.float32(hi))
                    else:
                        for r in T.unroll(OB):
                            for p in range(P):
                                if (q0 + p) % WG < OW:
                                    yf[((img * CO + o0 + r) * OH + (q0 + p) // WG) * OW + (q0 + p) % WG] = \
                                        T.min(T.max(acc[r, p], T.float32(lo)), T.float32(hi))

    return conv


def out_size(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
             pad: tuple[int, int, int, int]) -> tuple[int, int]:
    return ((height + pad[0] + pad[2] - kernel[0]) // stride[0] + 1,
            (width + pad[1] + pad[3] - kernel[1]) // stride[1] + 1)


def phase_grid(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
               pad: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """(OH, OW, HG, WG): the output size and the stride-phase grid the conv kernels compute on (each phase
    of the padded input HG x WG, so every tap of an output pixel is a fixed offset on that grid)."""
    oh, ow = out_size(height, width, kernel, stride, pad)
    return oh, ow, oh + (kernel[0] - 1) // stride[0], ow + (kernel[1] - 1) // stride[1]


def uses_small_kernel(height: int, width: int, out_channels: int, kernel: tuple[int, int],
                      stride: tuple[int, int], pad: tuple[int, int, int, int]) -> bool:
    """Whether the rewrite runs this conv with `conv_small_primfunc`: at most SMALL_PIXELS output pixels
    (the last down-sampling of a small input: 2x2 -> 1x1), where `conv_primfunc`'s vectors over pixels are
    1-4 lanes wide, and at least one vector of output channels."""
    oh, ow = out_size(height, width, kernel, stride, pad)
    return oh * ow <= SMALL_PIXELS and out_channels >= LANES


def conv_small_primfunc(batch: int | None, channels: int, height: int, width: int, out_channels: int,
                        kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int, int, int],
                        relu6: bool) -> Any:
    """The conv for a few output pixels, vectorised over output channels: x [batch, C, H, W], wt [C*KH*KW,
    out_channels] (the OIHW weights flattened and transposed, once at load), b [out_channels] -> y. Per task
    (image, block of 16 output channels) every output pixel sums only its in-bounds taps (known at compile
    time), one broadcast input value per 16-wide multiply-add. The last block starts early (overlaps)."""
    from tvm import tirx
    from tvm.script import tirx as T

    C, H, W, CO, V = channels, height, width, out_channels, LANES
    KH, KW = kernel
    SH, SW = stride
    OH, OW = out_size(H, W, kernel, stride, pad)
    if not uses_small_kernel(H, W, CO, kernel, stride, pad):
        raise ValueError(f"the small conv kernel needs <= {SMALL_PIXELS} output pixels and >= {LANES} "
                         f"output channels, got {OH}x{OW} and {CO}")
    top, left = pad[0], pad[1]
    OHW, OBK = OH * OW, -(-CO // V)
    n_img = tirx.Var("n", "int64") if batch is None else batch
    macs = OHW * CO * C * KH * KW               # per image
    lo, hi = (0.0, 6.0) if relu6 else (float(np.finfo(np.float32).min), float(np.finfo(np.float32).max))

    @T.macro
    def block(x, wt, b, yf, task):
        img: T.let = task // OBK
        o0: T.let = T.min(task % OBK * V, CO - V)
        acc = T.decl_buffer((OHW * V,), "float32", scope="local")
        for p in T.unroll(OHW):
            acc[T.Ramp(p * V, 1, V)] = b[T.Ramp(o0, 1, V)]
            for i in range(T.max(0, top - p // OW * SH), T.min(KH, H + top - p // OW * SH)):
                for j in range(T.max(0, left - p % OW * SW), T.min(KW, W + left - p % OW * SW)):
                    for c in range(C):
                        acc[T.Ramp(p * V, 1, V)] = acc[T.Ramp(p * V, 1, V)] + \
                            wt[(c * KH + i) * KW + j, T.Ramp(o0, 1, V)] * \
                            T.Broadcast(x[img, c, p // OW * SH + i - top, p % OW * SW + j - left], V)
            for v in range(V):
                yf[((img * CO + o0 + v) * OHW) + p] = T.min(T.max(acc[p * V + v], T.float32(lo)),
                                                            T.float32(hi))

    @T.prim_func
    def conv_small(x_h: T.handle, wt_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        x = T.match_buffer(x_h, (n_img, C, H, W), "float32")
        wt = T.match_buffer(wt_h, (C * KH * KW, CO), "float32")
        b = T.match_buffer(b_h, (CO,), "float32")
        y = T.match_buffer(y_h, (n_img, CO, OH, OW), "float32")
        yf = T.decl_buffer((n_img * CO * OHW,), "float32", data=y.data)
        if n_img * macs >= PARALLEL_MACS:                 # decided per call: the batch may be dynamic
            for task in T.parallel(n_img * OBK):
                block(x, wt, b, yf, task)
        else:
            for task in range(n_img * OBK):
                block(x, wt, b, yf, task)

    return conv_small


def _is_dense_kxk(call: Any) -> bool:
    """A groups-1 conv (1x1 ones too: the star rewrite, which runs first, has taken those of star blocks;
    what is left, e.g. an SN-Net stitching layer, TVM's default legalization runs unscheduled)."""
    return int(call.attrs.groups) == 1


@register("conv")
def rewrite_conv(mod: Any, ctx: RewriteContext) -> Any:
    """Every dense KxK conv2d [+ bias] [+ ReLU6] of `mod` as one call of the kernel. CPU (llvm) targets
    only; None when there is none."""
    return rewrite_matches(mod, ctx, _find, _lower)


def _find(func: Any) -> dict[Any, tuple[Any, Any, bool]]:
    """{variable: (conv2d call, bias or None, ReLU6 fused)}, the outermost match of each conv."""
    m = Matcher(func)
    hits, inner = {}, set()
    for var in m.value:
        clipped = m.relu6(var)
        conv = m.conv_bias(clipped if clipped is not None else var, _is_dense_kxk)
        if conv is None:
            continue
        hits[var] = (*conv, clipped is not None)
        if clipped is not None:
            inner.add(clipped)
        if conv[1] is not None:
            inner.update(m.definition(clipped if clipped is not None else var).args)
    return outermost(hits, inner)


def _lower(var: Any, hit: tuple[Any, Any, bool]) -> tuple[str, Any, list[Any]]:
    call, bias, relu6 = hit
    x, w = call.args
    batch = batch_of(x.ty.shape)
    c, h, wd = (int(v) for v in list(x.ty.shape)[1:])
    co, _, kh, kw = (int(v) for v in w.ty.shape)
    stride = tuple(int(v) for v in call.attrs.strides)
    pad = padding4(call.attrs.padding)
    name = (f"conv_{'n' if batch is None else batch}x{c}x{h}x{wd}_o{co}_k{kh}x{kw}_s{stride[0]}x{stride[1]}"
            f"_p{'-'.join(map(str, pad))}{'_relu6' if relu6 else ''}")
    wmat, bvec = stacked([w], [co], c * kh * kw), stacked([bias], [co], None)
    if uses_small_kernel(h, wd, co, (kh, kw), stride, pad):
        make = conv_small_primfunc
        return name + "_small", lambda: make(batch, c, h, wd, co, (kh, kw), stride, pad, relu6), \
            [x, transposed(wmat), bvec]
    return name, lambda: conv_primfunc(batch, c, h, wd, co, (kh, kw), stride, pad, relu6), [x, wmat, bvec]
