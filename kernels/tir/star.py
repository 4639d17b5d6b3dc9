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

from edgeflex.kernels.tir import LANES, PARALLEL_MACS, RewriteContext, register
from edgeflex.kernels.tir.match import (
    Matcher,
    batch_of,
    op_name,
    rewrite_matches,
    stacked,
    static,
    transposed,
)

PIXELS = 32         # pixels per tile: two AVX-512 vectors of float32
HIDDEN_BLOCK = 4    # rows of f1 (and as many of f2) accumulated at once: 2 x 4 x 2 = 16 vector registers
OUT_BLOCK = 6       # rows of g accumulated at once: 6 x 2 = 12 vector registers
SMALL_PIXELS = 8    # up to this many pixels per image: the channel-vector kernel (`star_small_primfunc`)


def star_reference(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
                   wg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """g(clip(f1(x), 0, 6) * f2(x)) for x [N, C, H, W], w1/w2 [rC, C], wg [Cout, rC], biases per row."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w).astype(np.float64)
    a = np.einsum("jc,ncp->njp", w1, flat) + b1[None, :, None]
    b = np.einsum("jc,ncp->njp", w2, flat) + b2[None, :, None]
    y = np.einsum("oj,njp->nop", wg, np.clip(a, 0.0, 6.0) * b) + bg[None, :, None]
    return y.reshape(n, wg.shape[0], h, w).astype(np.float32)


def _macs(channels: int, hidden: int, out_channels: int, pixels: int) -> int:
    """Multiply-adds of one image's star op: f1 and f2, then g."""
    return pixels * (2 * hidden * channels + out_channels * hidden)


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

    # NOTE (all kernels here): "op_pattern" 8 (opaque) keeps Relax's FuseOps from fusing neighbours into a
    # hand-scheduled function; `x: T.let = ...` binds a value (a plain `x = ...` in this TVMScript declares
    # a mutable scalar, which TVM allocated on the heap per parallel task: much slower kernels).
    C, R, CO, HW = channels, hidden, out_channels, height * width
    n_img = tirx.Var("n", "int64") if batch is None else batch
    P = min(PIXELS, HW)
    J = min(HIDDEN_BLOCK, R)
    OB = min(OUT_BLOCK, CO)
    tiles, jblocks, oblocks = -(-HW // P), -(-R // J), -(-CO // OB)

    @T.macro
    def tile_task(xf, w12, b12, wg, bg, yf, task):
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
        if n_img * _macs(C, R, CO, HW) >= PARALLEL_MACS:
            for task in T.parallel(n_img * tiles):
                tile_task(xf, w12, b12, wg, bg, yf, task)
        else:
            for task in range(n_img * tiles):
                tile_task(xf, w12, b12, wg, bg, yf, task)

    return star


def uses_small_kernel(channels: int, hidden: int, out_channels: int, height: int, width: int) -> bool:
    """Whether the rewrite runs this star op with `star_small_primfunc`: a feature map of at most
    SMALL_PIXELS pixels (the last stages of a small input: 1x1, 2x2), where `star_primfunc`'s vectors over
    pixels would be 1-4 lanes wide (in effect scalar code, slow even for a 128-channel 1x1 star op), and at
    least one vector of hidden and output rows."""
    return height * width <= SMALL_PIXELS and hidden >= LANES and out_channels >= LANES


def star_small_primfunc(batch: int | None, channels: int, hidden: int, out_channels: int, height: int,
                        width: int) -> Any:
    """The star op for a small feature map, vectorised over channels instead of pixels: x [batch, channels,
    H, W], w12t [channels, 2*hidden] (f1's columns then f2's: the stacked weights transposed, once at load),
    b12 [2*hidden], wgt [hidden, out_channels], bg [out_channels] -> y [batch, out_channels, H, W].
    Two phases: per block of 16 hidden rows, ReLU6(f1) * f2 for every pixel (one broadcast of x[c, p] per
    16-wide multiply-add) into a workspace; then per block of 16 output rows, g. Above PARALLEL_MACS
    both run in one thread-pool launch with a barrier between (a 1x1 star op with 128 channels reads 590 KB
    of weights: two cores read them faster than one). Tails: the last block starts early (overlaps)."""
    from tvm import tirx
    from tvm.script import tirx as T

    C, R, CO, HW, V = channels, hidden, out_channels, height * width, LANES
    if not uses_small_kernel(C, R, CO, height, width):
        raise ValueError(f"the small star kernel needs <= {SMALL_PIXELS} pixels and >= {LANES} hidden and "
                         f"output rows, got {HW} pixels, hidden {R}, out {CO}")
    n_img = tirx.Var("n", "int64") if batch is None else batch
    JB, OBK = -(-R // V), -(-CO // V)

    @T.macro
    def hidden_block(xf, w12t, b12, mid, img, jb):
        j0: T.let = T.min(jb * V, R - V)
        acc = T.decl_buffer((2 * HW * V,), "float32", scope="local")
        for p in T.unroll(HW):
            acc[T.Ramp(p * V, 1, V)] = b12[T.Ramp(j0, 1, V)]
            acc[T.Ramp((HW + p) * V, 1, V)] = b12[T.Ramp(R + j0, 1, V)]
        for c in range(C):
            for p in T.unroll(HW):
                acc[T.Ramp(p * V, 1, V)] = acc[T.Ramp(p * V, 1, V)] + w12t[c, T.Ramp(j0, 1, V)] * \
                    T.Broadcast(xf[(img * C + c) * HW + p], V)
                acc[T.Ramp((HW + p) * V, 1, V)] = acc[T.Ramp((HW + p) * V, 1, V)] + \
                    w12t[c, T.Ramp(R + j0, 1, V)] * T.Broadcast(xf[(img * C + c) * HW + p], V)
        for p in T.unroll(HW):
            mid[img, p, T.Ramp(j0, 1, V)] = T.min(T.max(acc[T.Ramp(p * V, 1, V)], T.Broadcast(
                T.float32(0), V)), T.Broadcast(T.float32(6), V)) * acc[T.Ramp((HW + p) * V, 1, V)]

    @T.macro
    def out_block(mid, wgt, bg, yf, img, ob):
        o0: T.let = T.min(ob * V, CO - V)
        acc = T.decl_buffer((HW * V,), "float32", scope="local")
        for p in T.unroll(HW):
            acc[T.Ramp(p * V, 1, V)] = bg[T.Ramp(o0, 1, V)]
        for j in range(R):
            for p in T.unroll(HW):
                acc[T.Ramp(p * V, 1, V)] = acc[T.Ramp(p * V, 1, V)] + wgt[j, T.Ramp(o0, 1, V)] * \
                    T.Broadcast(mid[img, p, j], V)
        for p in T.unroll(HW):
            for v in range(V):
                yf[(img * CO + o0 + v) * HW + p] = acc[p * V + v]

    @T.prim_func
    def star_small(x_h: T.handle, w12t_h: T.handle, b12_h: T.handle, wgt_h: T.handle, bg_h: T.handle,
                   y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        x = T.match_buffer(x_h, (n_img, C, height, width), "float32")
        w12t = T.match_buffer(w12t_h, (C, 2 * R), "float32")
        b12 = T.match_buffer(b12_h, (2 * R,), "float32")
        wgt = T.match_buffer(wgt_h, (R, CO), "float32")
        bg = T.match_buffer(bg_h, (CO,), "float32")
        y = T.match_buffer(y_h, (n_img, CO, height, width), "float32")
        xf = T.decl_buffer((n_img * C * HW,), "float32", data=x.data)
        yf = T.decl_buffer((n_img * CO * HW,), "float32", data=y.data)
        mid = T.decl_buffer((n_img, HW, R), "float32")
        if n_img * _macs(C, R, CO, HW) >= PARALLEL_MACS:  # decided per call: the batch may be dynamic
            with T.attr(0, "pragma_parallel_launch_point", 0):
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    for t in T.parallel(n_img * JB):
                        hidden_block(xf, w12t, b12, mid, t // JB, t % JB)
                for t in T.parallel(n_img * OBK):
                    out_block(mid, wgt, bg, yf, t // OBK, t % OBK)
        else:
            for t in range(n_img * JB):
                hidden_block(xf, w12t, b12, mid, t // JB, t % JB)
            for t in range(n_img * OBK):
                out_block(mid, wgt, bg, yf, t // OBK, t % OBK)

    return star_small


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


class StarMatcher(Matcher):
    """Walks back from each 1x1 conv: conv(g) [+ bias] <- multiply <- (clip to [0, 6] <- conv(f1) [+ bias],
    conv(f2) [+ bias]), f1 and f2 reading the same tensor."""

    def _conv1x1(self, expr: Any) -> tuple[Any, Any, Any] | None:
        """(input, weight, bias or None) when `expr` is a 1x1 stride-1 dense conv2d, optionally + bias."""
        found = self.conv_bias(expr, _is_1x1)
        return None if found is None else (found[0].args[0], found[0].args[1], found[1])

    def match(self, var: Any) -> StarMatch | None:
        g = self._conv1x1(var)
        if g is None:
            return None
        prod, wg, bg = g
        mul = self.definition(prod)
        if op_name(mul) != "relax.multiply":
            return None
        for left, right in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
            clipped = self.relu6(left)
            f1 = self._conv1x1(clipped) if clipped is not None else None
            f2 = self._conv1x1(right)
            if f1 is None or f2 is None or not f1[0].same_as(f2[0]):
                continue
            (x, w1, b1), (_, w2, b2) = f1, f2
            if not static(list(x.ty.shape)[1:]) or int(w1.ty.shape[0]) != int(w2.ty.shape[0]):
                continue
            return StarMatch(var, x, w1, b1, w2, b2, wg, bg)
        return None


def _is_1x1(call: Any) -> bool:
    a = call.attrs
    return (tuple(int(v) for v in a.strides) == (1, 1) and not any(int(v) for v in a.padding)
            and int(a.groups) == 1 and [int(v) for v in call.args[1].ty.shape][2:] == [1, 1])


def find_star_ops(func: Any) -> list[StarMatch]:
    """Every star op in a Relax function, in binding order."""
    from tvm import relax

    m = StarMatcher(func)
    found = [s for v in m.value if isinstance(v, relax.Var) and (s := m.match(v)) is not None]
    # g's conv alone matches too when a bias add follows it: keep the match that takes the bias in.
    inner = {a for s in found if s.bg is not None for a in m.definition(s.out).args}
    return [s for s in found if not any(s.out.same_as(a) for a in inner)]


@register("star")
def rewrite_star(mod: Any, ctx: RewriteContext) -> Any:
    """Every StarNet star op of `mod` (1x1 f1, f2, ReLU6 * , 1x1 g, biases) as one call of the fused kernel.
    CPU (llvm) targets only; None when the module has no star op."""
    return rewrite_matches(mod, ctx, lambda f: {s.out: s for s in find_star_ops(f)}, _lower)


def _lower(var: Any, s: StarMatch) -> tuple[str, Any, list[Any]]:
    batch = batch_of(s.x.ty.shape)
    c, h, w = (int(v) for v in list(s.x.ty.shape)[1:])
    r, co = int(s.w1.ty.shape[0]), int(s.wg.ty.shape[0])
    name = f"star_{'n' if batch is None else batch}x{c}x{h}x{w}_r{r}_o{co}"
    w12, wg = stacked([s.w1, s.w2], [r, r], c), stacked([s.wg], [co], r)
    b12, bg = stacked([s.b1, s.b2], [r, r], None), stacked([s.bg], [co], None)
    if uses_small_kernel(c, r, co, h, w):
        args = [s.x, transposed(w12), b12, transposed(wg), bg]
        return name + "_small", lambda: star_small_primfunc(batch, c, r, co, h, w), args
    return name, lambda: star_primfunc(batch, c, r, co, h, w), [s.x, w12, b12, wg, bg]
