"""The FITS spectral kernel as one hand-scheduled TVM function (normalise -> spectral GEMM(s) ->
de-normalise), and the Relax rewrite ("fits") that puts it in place of the ops the ONNX `folded` /
`lowrank` lowering of `kernels.spectral.to_onnx` becomes once imported.

Owns the kernel (`fits_primfunc`), a way to run it on NumPy arrays (`run_kernel`, for tests and benchmarks)
and the rewrite. Not the maths: the reference and the GEMM operands are `kernels.spectral`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeflex.errors import UsageError
from edgeflex.kernels.tir import LANES, RewriteContext, register

ACC_VECTORS = 24    # accumulator registers per GEMM tile (of 32): the rest hold the B row and a broadcast
MAX_GROUP = 8       # channels per task at most


@dataclass(frozen=True)
class FitsShape:
    """What one kernel is specialised on: x [batch, seq_len, channels] -> y [batch, out_len, channels];
    `rank` None for the folded form (one [seq_len + 2, out_len] operand), else the low-rank form's inner
    size (operands [seq_len, rank] and [rank + 2, out_len]); `eps` as the graph adds it to the population
    variance; `batch` None for any batch. `group`: channels per task when batch > 1, `group_one`: at batch
    1 (fewer channels per task split one sample over several cores; all of them in one task runs it
    without a parallel launch). `centred`: the kernel also writes y - mean ([batch, out_len, channels]), the
    FITS authors' second output `low_xy * sqrt(var)`, from the mean it already holds."""

    seq_len: int
    out_len: int
    channels: int
    eps: float
    rank: int | None = None
    batch: int | None = None
    group: int = MAX_GROUP
    group_one: int = MAX_GROUP
    centred: bool = False

    @property
    def form(self) -> str:
        return "folded" if self.rank is None else "lowrank"

    def operand_shapes(self) -> list[tuple[int, int]]:
        L, N = self.seq_len, self.out_len
        return [(L + 2, N)] if self.rank is None else [(L, self.rank), (self.rank + 2, N)]


def schedule_for(seq_len: int, out_len: int, channels: int, eps: float, rank: int | None = None, *,
                 batch: int | None = None, cores: int = 1, split_one: bool = False,
                 centred: bool = False) -> FitsShape:
    """The tiling this file uses for a shape on a CPU with `cores` cores: at batch > 1 one task per sample
    (at most MAX_GROUP channels each); at batch 1 the same single task (no parallel launch), or with
    `split_one` the channels split over the cores.

    NOTE: split_one is off because it measured slower: FITS L=720 C=7 lowrank at batch 1 ran faster in one
    task than split over the 2 cores of a shared host whose other core is mostly busy with other processes
    (benchmarks/bench_tir_fits.py times both). With free cores the split may win."""
    if min(seq_len, out_len, channels) < 1 or (rank is not None and rank < 1) or cores < 1:
        raise UsageError(f"FITS kernel shape must be positive: seq_len {seq_len}, out_len {out_len}, "
                         f"channels {channels}, rank {rank}, cores {cores}")
    group = min(MAX_GROUP, channels)
    one = min(group, -(-channels // cores)) if split_one else group
    return FitsShape(seq_len, out_len, channels, float(eps), rank, batch, group, one, centred)


def _vectors(group: int) -> int:
    """AVX-512 registers of columns per tile row: group x vectors accumulators fill ACC_VECTORS."""
    return max(1, min(6, ACC_VECTORS // group))


# How a GEMM tile stores its [cb, columns] result: into y[b, oo + col * os, c0 + cc] (the kernel's output),
# into out[oo + col, cc] (a scratch of columns x channels), or into out[cc, oo + col] (rows x columns).
TO_Y, COLS, ROWS = 0, 1, 2
SPLIT_MAX_SHARE = 0.7   # the split kernel only below this share of the folded / low-rank multiply-adds


def _gemm_macros(C: int):
    """The register-tiled GEMM both FITS kernels are built of: out (as `mode` says) = sum over k of
    A[ka + k * ks, cc] * Bm[kb + k, col], for cb broadcast rows cc and the columns vectorised, tiles of cb
    rows x up to 6 AVX-512 registers accumulated in registers over the whole inner dimension (`_vectors`);
    the column tail is a tile ending at the edge (`_column_tiles`). `C`: channels of y (stores past it
    are dropped: a last group with fewer channels repeats its last one)."""
    from tvm.script import tirx as T

    @T.macro
    def tile(A, Bm, out, kdim, j0, nvec, width, b, c0, cb, mode, ka, ks, kb, oo, os, at):
        # NOTE: the accumulators are two "global" buffers of rows, each under TVM's 1024-byte stack limit, so
        # they become stack allocas that LLVM keeps in registers. A bigger or "local" buffer becomes a heap
        # workspace, kept in registers only while LLVM can prove it does not alias the arguments: not once
        # the entry function is inlined into a VM library with other functions (much slower there).
        acc = T.decl_buffer(((cb + 1) // 2, nvec, width), "float32")
        acc2 = T.decl_buffer((max(1, cb // 2), nvec, width), "float32")
        tmp = T.decl_buffer((cb, nvec * width), "float32")
        for cc in T.unroll((cb + 1) // 2):
            for q in T.unroll(nvec):
                for v in T.vectorized(width):
                    acc[cc, q, v] = T.float32(0)
                    acc2[T.min(cc, max(1, cb // 2) - 1), q, v] = T.float32(0)
        for k in range(kdim):
            for cc in T.unroll((cb + 1) // 2):
                for q in T.unroll(nvec):
                    for v in T.vectorized(width):
                        if at:
                            acc[cc, q, v] = (acc[cc, q, v]
                                             + A[cc, ka + k * ks] * Bm[kb + k, j0 + q * width + v])
                        else:
                            acc[cc, q, v] = (acc[cc, q, v]
                                             + A[ka + k * ks, cc] * Bm[kb + k, j0 + q * width + v])
            if cb > 1:
                for cc in T.unroll(cb // 2):
                    for q in T.unroll(nvec):
                        for v in T.vectorized(width):
                            if at:
                                acc2[cc, q, v] = (acc2[cc, q, v] + A[(cb + 1) // 2 + cc, ka + k * ks]
                                                  * Bm[kb + k, j0 + q * width + v])
                            else:
                                acc2[cc, q, v] = (acc2[cc, q, v] + A[ka + k * ks, (cb + 1) // 2 + cc]
                                                  * Bm[kb + k, j0 + q * width + v])
        # NOTE: through a scratch row-major copy: read back lane by lane, the accumulators would not stay in
        # registers (LLVM's SROA gives up and spills them inside the k loop).
        for cc in T.unroll((cb + 1) // 2):
            for q in T.unroll(nvec):
                for v in T.vectorized(width):
                    tmp[cc, q * width + v] = acc[cc, q, v]
        if cb > 1:
            for cc in T.unroll(cb // 2):
                for q in T.unroll(nvec):
                    for v in T.vectorized(width):
                        tmp[(cb + 1) // 2 + cc, q * width + v] = acc2[cc, q, v]
        if mode == TO_Y:
            for v in range(nvec * width):
                for cc in T.unroll(cb):
                    if c0 + cc < C:
                        out[b, oo + (j0 + v) * os, c0 + cc] = tmp[cc, v]
        elif mode == COLS:
            for v in range(nvec * width):
                for cc in T.vectorized(cb):
                    out[oo + j0 + v, cc] = tmp[cc, v]
        else:
            for cc in T.unroll(cb):
                for q in T.unroll(nvec):
                    for v in T.vectorized(width):
                        out[cc, oo + j0 + q * width + v] = tmp[cc, q * width + v]

    @T.macro
    def gemm(A, Bm, out, kdim, ndim, b, c0, cb, mode, ka, ks, kb, oo, os, at):
        for jt in range(_column_tiles(ndim, _vectors(cb))[0]):
            tile(A, Bm, out, kdim, jt * (_vectors(cb) * LANES), _vectors(cb), LANES, b, c0, cb, mode,
                 ka, ks, kb, oo, os, at)
        if _column_tiles(ndim, _vectors(cb))[2] > 0:
            tile(A, Bm, out, kdim, _column_tiles(ndim, _vectors(cb))[1], _column_tiles(ndim, _vectors(cb))[2],
                 LANES, b, c0, cb, mode, ka, ks, kb, oo, os, at)
        if _column_tiles(ndim, _vectors(cb))[4] > 0:
            tile(A, Bm, out, kdim, _column_tiles(ndim, _vectors(cb))[3], 1, LANES, b, c0, cb, mode,
                 ka, ks, kb, oo, os, at)
        if _column_tiles(ndim, _vectors(cb))[5] > 0:
            tile(A, Bm, out, kdim, 0, 1, ndim, b, c0, cb, mode, ka, ks, kb, oo, os, at)

    return gemm


def _centre_macro(L: int, C: int, nb: Any):
    """`centre(x, xa, st, b, c0, cb)`: channels c0 .. c0 + cb of sample b copied into xa [L, cb] (a last
    group with fewer channels repeats the last one), st[0] = their mean, xa centred, st[1] = the sum of
    squares of the centred values. All of a sample's channels in one task: the sample is one flat run of
    L * C floats, copied, summed and centred 16 lanes at a time; V = lcm(C, 16) / 16 vectors cover whole
    periods of the channel pattern, so every lane keeps one channel and the sums fold back per channel."""
    import math

    from tvm.script import tirx as T

    V = C // math.gcd(C, LANES)
    flat = (L * C) % (V * LANES) == 0 and V * LANES * 4 <= 512
    NI = L * C // (V * LANES)

    @T.macro
    def centre(x, xa, st, b, c0, cb):
        for cc in T.vectorized(cb):
            st[0, cc] = T.float32(0)
            st[1, cc] = T.float32(0)
        if cb == C and flat:
            xf = T.decl_buffer((L * C,), "float32", data=xa.data)
            xs = T.decl_buffer((nb * (L * C),), "float32", data=x.data)
            sa = T.decl_buffer((V, LANES), "float32")
            pm = T.decl_buffer((V, LANES), "float32")
            for j in T.unroll(V):
                for v in T.vectorized(LANES):
                    sa[j, v] = T.float32(0)
            for i in range(NI):
                for j in T.unroll(V):
                    for v in T.vectorized(LANES):
                        xf[(i * V + j) * LANES + v] = xs[b * (L * C) + (i * V + j) * LANES + v]
                        sa[j, v] = sa[j, v] + xs[b * (L * C) + (i * V + j) * LANES + v]
            for j in range(V):
                for v in range(LANES):
                    st[0, (j * LANES + v) % C] = st[0, (j * LANES + v) % C] + sa[j, v]
            for cc in T.vectorized(cb):
                st[0, cc] = st[0, cc] * T.float32(1.0 / L)
            for j in range(V):
                for v in range(LANES):
                    pm[j, v] = st[0, (j * LANES + v) % C]
                    sa[j, v] = T.float32(0)
            for i in range(NI):
                for j in T.unroll(V):
                    for v in T.vectorized(LANES):
                        xf[(i * V + j) * LANES + v] = xf[(i * V + j) * LANES + v] - pm[j, v]
                        sa[j, v] = sa[j, v] + xf[(i * V + j) * LANES + v] * xf[(i * V + j) * LANES + v]
            for j in range(V):
                for v in range(LANES):
                    st[1, (j * LANES + v) % C] = st[1, (j * LANES + v) % C] + sa[j, v]
        else:
            for l_ in range(L):
                for cc in T.unroll(cb):
                    xa[l_, cc] = x[b, l_, T.min(c0 + cc, C - 1)]
            for l_ in range(L):
                for cc in T.vectorized(cb):
                    st[0, cc] = st[0, cc] + xa[l_, cc]
            for cc in T.vectorized(cb):
                st[0, cc] = st[0, cc] * T.float32(1.0 / L)
            for l_ in range(L):
                for cc in T.vectorized(cb):
                    xa[l_, cc] = xa[l_, cc] - st[0, cc]
                    st[1, cc] = st[1, cc] + xa[l_, cc] * xa[l_, cc]

    return centre


def _centred_macro(N: int, C: int, nb: Any):
    """`centred(y, yc, st, b, c0, cb)`: yc = y - mean (st[0]) for channels c0 .. c0 + cb of sample b, read
    back from the y the task just wrote (float32 y minus the float32 mean, as the ONNX graph's Sub). With
    all of a sample's channels in the task, the sample is one flat run of N * C floats, done 16 lanes at a
    time with the channel pattern of `_centre_macro` (V vectors cover whole periods of it)."""
    import math

    from tvm.script import tirx as T

    V = C // math.gcd(C, LANES)
    flat = (N * C) % (V * LANES) == 0 and V * LANES * 4 <= 512
    NI = N * C // (V * LANES)

    @T.macro
    def centred(y, yc, st, b, c0, cb):
        if cb == C and flat:
            yf = T.decl_buffer((nb * (N * C),), "float32", data=y.data)
            ycf = T.decl_buffer((nb * (N * C),), "float32", data=yc.data)
            pm = T.decl_buffer((V, LANES), "float32")
            for j in range(V):
                for v in range(LANES):
                    pm[j, v] = st[0, (j * LANES + v) % C]
            for i in range(NI):
                for j in T.unroll(V):
                    for v in T.vectorized(LANES):
                        ycf[b * (N * C) + (i * V + j) * LANES + v] = \
                            yf[b * (N * C) + (i * V + j) * LANES + v] - pm[j, v]
        else:
            for n in range(N):
                for cc in T.unroll(cb):
                    if c0 + cc < C:
                        yc[b, n, c0 + cc] = y[b, n, c0 + cc] - st[0, cc]

    return centred


def fits_primfunc(s: FitsShape) -> Any:
    """The kernel for one `FitsShape`: arguments x, the GEMM operands (as `operand_shapes`), y (and yc =
    y - mean when `s.centred`).

    One task per (sample, channel group), run in parallel: copy the group's channels of the sample into a
    [seq_len, group] scratch, mean and population variance per channel, centre; low-rank form: the first GEMM
    into [rank, group]; then the last GEMM with two extra rows holding rho = sqrt(var + eps) and the mean (the
    de-normalisation rides in the GEMM, as in the ONNX graph), written once to y. GEMM tiles: the group's
    rows x up to 6 AVX-512 registers of columns (`_vectors`), accumulated in registers over the whole inner
    dimension; the column tail is a tile ending at the edge (`_column_tiles`). A last group with fewer
    channels repeats the last channel and does not store it. Batch 1 with one group runs without a
    parallel launch; `batch` None: the batch is a runtime value (one library for every batch)."""
    from tvm import tirx
    from tvm.script import tirx as T

    L, N, C = s.seq_len, s.out_len, s.channels
    R = s.rank or 0
    K = L + 2 if s.rank is None else R + 2
    lowrank = s.rank is not None
    CB, CB1 = s.group, s.group_one
    G, G1 = -(-C // CB), -(-C // CB1)
    nb = tirx.Var("batch", "int64") if s.batch is None else s.batch
    inv_len, eps = 1.0 / L, s.eps

    gemm = _gemm_macros(C)
    centre = _centre_macro(L, C, nb)
    centred, with_centred = _centred_macro(N, C, nb), s.centred

    @T.macro
    def task(x, F, W, y, yc, b, c0, cb):
        xa = T.decl_buffer((L, cb), "float32")
        a = T.decl_buffer((K, cb), "float32")
        st = T.decl_buffer((2, cb), "float32")
        centre(x, xa, st, b, c0, cb)
        for cc in T.vectorized(cb):
            a[K - 2, cc] = T.sqrt(st[1, cc] * T.float32(inv_len) + T.float32(eps))
            a[K - 1, cc] = st[0, cc]
        if lowrank:
            gemm(xa, F, a, L, R, b, c0, cb, COLS, 0, 1, 0, 0, 1, False)
        else:
            for l_ in range(L):
                for cc in T.vectorized(cb):
                    a[l_, cc] = xa[l_, cc]
        gemm(a, W, y, K, N, b, c0, cb, TO_Y, 0, 1, 0, 0, 1, False)
        if with_centred:
            centred(y, yc, st, b, c0, cb)

    @T.macro
    def tasks(x, F, W, y, yc):
        if nb == 1:
            if G1 == 1:
                task(x, F, W, y, yc, 0, 0, CB1)
            else:
                for t in T.parallel(G1):
                    task(x, F, W, y, yc, 0, t * CB1, CB1)
        else:
            for t in T.parallel(nb * G):
                task(x, F, W, y, yc, t // G, t % G * CB, CB)

    if lowrank and with_centred:
        @T.prim_func
        def fits(x_h: T.handle, f_h: T.handle, w_h: T.handle, y_h: T.handle, yc_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            x = T.match_buffer(x_h, (nb, L, C), "float32")
            F = T.match_buffer(f_h, (L, R), "float32")
            W = T.match_buffer(w_h, (K, N), "float32")
            y = T.match_buffer(y_h, (nb, N, C), "float32")
            yc = T.match_buffer(yc_h, (nb, N, C), "float32")
            tasks(x, F, W, y, yc)
    elif lowrank:
        @T.prim_func
        def fits(x_h: T.handle, f_h: T.handle, w_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            x = T.match_buffer(x_h, (nb, L, C), "float32")
            F = T.match_buffer(f_h, (L, R), "float32")
            W = T.match_buffer(w_h, (K, N), "float32")
            y = T.match_buffer(y_h, (nb, N, C), "float32")
            tasks(x, F, W, y, None)
    elif with_centred:
        @T.prim_func
        def fits(x_h: T.handle, w_h: T.handle, y_h: T.handle, yc_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            x = T.match_buffer(x_h, (nb, L, C), "float32")
            W = T.match_buffer(w_h, (K, N), "float32")
            y = T.match_buffer(y_h, (nb, N, C), "float32")
            yc = T.match_buffer(yc_h, (nb, N, C), "float32")
            tasks(x, None, W, y, yc)
    else:
        @T.prim_func
        def fits(x_h: T.handle, w_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            x = T.match_buffer(x_h, (nb, L, C), "float32")
            W = T.match_buffer(w_h, (K, N), "float32")
            y = T.match_buffer(y_h, (nb, N, C), "float32")
            tasks(x, None, W, y, None)

    return fits


@dataclass(frozen=True)
class SplitPlan:
    """What the split kernel is specialised on beyond `FitsShape` (from `spectral.SplitOperands`): the
    operand sizes. Which rows each group reads and writes reaches the kernel as data (its `pos` and `pairs`
    arguments), or follows from the layout (a forward group g reads D rows 2g - 1 and 2g)."""

    lanes: int                                   # Bc's lanes per group (a multiple of 16)
    k2: int                                      # 2 * up: u's length

    @staticmethod
    def of(ops: Any) -> SplitPlan:
        return SplitPlan(int(ops.Bc.shape[2]), int(ops.U.shape[1]))


def fits_split_primfunc(s: FitsShape, plan: SplitPlan) -> Any:
    """The FITS kernel on the split operands (`spectral.split_operands`): arguments x, DT [P, P] (D
    transposed), Bc [groups * 2Q, lanes], pos [groups, lanes], U [R + 1, 2up], Tw [2up, 2 * Q2], pairs
    [P/2 + 1, 2] (first row and rows of each pair of inverse bin groups), E [P2 + 1, P2] (its last row
    ones: the mean), y (and yc = y - mean when `s.centred`). Per task (sample, channel group), as
    `fits_primfunc`: the group's channels copied to [L, cb], mean and variance, centred; then every stage
    is a register-tiled GEMM of `_gemm_macros`: A (P-point DFTs of the Q residues), B (per bin group, the
    twiddled sums into the R coefficients, scattered to their low-rank rows), U (the complex layer and
    bias), C (per pair of output bin groups, twiddles into Z), D (per p, the P2-point inverse DFT plus the
    mean, written to y[b, Q2 * q + p])"""
    from tvm import tirx
    from tvm.script import tirx as T

    from edgeflex.kernels.spectral import SPLIT

    L, N, C, R = s.seq_len, s.out_len, s.channels, s.rank
    P, Q, Q2 = SPLIT, s.seq_len // SPLIT, s.out_len // SPLIT
    NG, LN, K2 = SPLIT // 2 + 1, plan.lanes, plan.k2
    CB, CB1 = s.group, s.group_one
    G, G1 = -(-C // CB), -(-C // CB1)
    nb = tirx.Var("batch", "int64") if s.batch is None else s.batch
    inv_len, eps = 1.0 / L, s.eps
    NP = P // 2 + 1                     # pairs of inverse bin groups
    gemm = _gemm_macros(C)
    centre = _centre_macro(L, C, nb)
    centred, with_centred = _centred_macro(N, C, nb), s.centred

    @T.macro
    def task(x, DT, Bc, pos, U, Tw, pairs, E, y, yc, b, c0, cb):
        xa = T.decl_buffer((L, cb), "float32")
        xv = T.decl_buffer((P, Q * cb), "float32", data=xa.data)
        ar = T.decl_buffer((P, Q * cb), "float32")
        av = T.decl_buffer((P * Q, cb), "float32", data=ar.data)
        bo = T.decl_buffer((cb, NG * LN), "float32")
        a = T.decl_buffer((R + 1, cb), "float32")
        u = T.decl_buffer((cb, K2), "float32")
        z = T.decl_buffer((cb, (P + 1) * Q2), "float32")
        st = T.decl_buffer((2, cb), "float32")
        centre(x, xa, st, b, c0, cb)
        for cc in T.vectorized(cb):
            a[R, cc] = T.sqrt(st[1, cc] * T.float32(inv_len) + T.float32(eps))
        # A: ar[rho, r * cb + cc] = sum_m D[rho, m] x[Q m + r, cc], in two halves of P/2 rows.
        # NOTE: one tile of all P rows measured slower inside a VM library (benchmarks/RESULTS.md, FITS TIR
        # kernel): there LLVM inlines the kernel into its caller and loses the arguments' noalias, and the
        # P-row tile's accumulators no longer stay in registers; P/2 rows, like the other stages' cb, do.
        dt2 = T.decl_buffer((P, P), "float32", data=DT.data, elem_offset=P // 2)
        ar2 = T.decl_buffer((P, Q * cb), "float32", data=ar.data, elem_offset=P // 2 * Q * cb)
        gemm(DT, xv, ar, P, Q * cb, b, c0, P // 2, ROWS, 0, 1, 0, 0, 1, False)
        gemm(dt2, xv, ar2, P, Q * cb, b, c0, P // 2, ROWS, 0, 1, 0, 0, 1, False)
        # B: per bin group g, the group's coefficients (lanes) from its cos and sin rows of ar (the rows
        # 2g - 1 and 2g; the groups of bins 0 and P/2 have a cos row only)
        for g in range(NG):
            gemm(av, Bc, bo, T.Select(T.Or(g == 0, g == NG - 1), Q, 2 * Q), LN, b, c0, cb, ROWS,
                 T.max(2 * g - 1, 0) * Q, 1, g * 2 * Q, g * LN, 1, False)
        for g in range(NG):
            for lane in range(LN):
                if pos[g, lane] >= 0:
                    for cc in T.vectorized(cb):
                        a[pos[g, lane], cc] = bo[cc, g * LN + lane]
        # U: u = U^T [coefficients; rho]
        gemm(a, U, u, R + 1, K2, b, c0, cb, ROWS, 0, 1, 0, 0, 1, False)
        # C: per pair i of output bin groups, its twiddled bins summed into z rows: pairs 0 and 1 (bins
        # k = 0 and P/2 mod P) one row of Q2 (their sines vanish), pair i > 1 two rows (2i - 2, 2i - 1)
        for i in range(2):
            gemm(u, Tw, z, pairs[i, 1], Q2, b, c0, cb, ROWS, pairs[i, 0], 1, pairs[i, 0], i * Q2, 1, True)
        for i in range(NP - 2):
            gemm(u, Tw, z, pairs[i + 2, 1], 2 * Q2, b, c0, cb, ROWS, pairs[i + 2, 0], 1, pairs[i + 2, 0],
                 (2 * i + 2) * Q2, 1, True)
        for p in range(Q2):
            for cc in T.vectorized(cb):
                z[cc, P * Q2 + p] = st[0, cc]
        # D: y[b, Q2 q + p] = sum_r E[r, q] z[r * Q2 + p] (+ the mean row), q vectorised
        for p in range(Q2):
            gemm(z, E, y, P + 1, P, b, c0, cb, TO_Y, p, Q2, 0, p, Q2, True)
        if with_centred:
            centred(y, yc, st, b, c0, cb)

    @T.macro
    def tasks(x, DT, Bc, pos, U, Tw, pairs, E, y, yc):
        if nb == 1:
            if G1 == 1:
                task(x, DT, Bc, pos, U, Tw, pairs, E, y, yc, 0, 0, CB1)
            else:
                for t in T.parallel(G1):
                    task(x, DT, Bc, pos, U, Tw, pairs, E, y, yc, 0, t * CB1, CB1)
        else:
            for t in T.parallel(nb * G):
                task(x, DT, Bc, pos, U, Tw, pairs, E, y, yc, t // G, t % G * CB, CB)

    if with_centred:
        @T.prim_func
        def fits(x_h: T.handle, dt_h: T.handle, bc_h: T.handle, pos_h: T.handle, u_h: T.handle,
                 tw_h: T.handle, pairs_h: T.handle, e_h: T.handle, y_h: T.handle, yc_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            x = T.match_buffer(x_h, (nb, L, C), "float32")
            DT = T.match_buffer(dt_h, (P, P), "float32")
            Bc = T.match_buffer(bc_h, (NG * 2 * Q, LN), "float32")
            pos = T.match_buffer(pos_h, (NG, LN), "int32")
            U = T.match_buffer(u_h, (R + 1, K2), "float32")
            Tw = T.match_buffer(tw_h, (K2, 2 * Q2), "float32")
            pairs = T.match_buffer(pairs_h, (NP, 2), "int32")
            E = T.match_buffer(e_h, (P + 1, P), "float32")
            y = T.match_buffer(y_h, (nb, N, C), "float32")
            yc = T.match_buffer(yc_h, (nb, N, C), "float32")
            tasks(x, DT, Bc, pos, U, Tw, pairs, E, y, yc)
    else:
        @T.prim_func
        def fits(x_h: T.handle, dt_h: T.handle, bc_h: T.handle, pos_h: T.handle, u_h: T.handle,
                 tw_h: T.handle, pairs_h: T.handle, e_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            x = T.match_buffer(x_h, (nb, L, C), "float32")
            DT = T.match_buffer(dt_h, (P, P), "float32")
            Bc = T.match_buffer(bc_h, (NG * 2 * Q, LN), "float32")
            pos = T.match_buffer(pos_h, (NG, LN), "int32")
            U = T.match_buffer(u_h, (R + 1, K2), "float32")
            Tw = T.match_buffer(tw_h, (K2, 2 * Q2), "float32")
            pairs = T.match_buffer(pairs_h, (NP, 2), "int32")
            E = T.match_buffer(e_h, (P + 1, P), "float32")
            y = T.match_buffer(y_h, (nb, N, C), "float32")
            tasks(x, DT, Bc, pos, U, Tw, pairs, E, y, None)

    return fits


def split_kernel_operands(ops: Any) -> list[np.ndarray]:
    """The split kernel's operand arrays (float32, in argument order after x) from `SplitOperands`."""
    P = ops.D.shape[0]
    E = np.concatenate([ops.E, np.ones((1, P))])
    f32 = [np.ascontiguousarray(a, dtype=np.float32) for a in
           (ops.D.T, ops.Bc.reshape(-1, ops.Bc.shape[2]), ops.U, ops.T, E)]
    pairs = np.array([ops.group_off, ops.group_len], dtype=np.int32).T.copy()
    return [*f32[:2], np.ascontiguousarray(ops.pos, dtype=np.int32), *f32[2:4], pairs, f32[4]]


def _column_tiles(ndim: int, vectors: int) -> tuple[int, int, int, int, int, int]:
    """How a GEMM covers `ndim` output columns with tiles of whole registers: (full tiles of `vectors`
    registers; start and registers of up to two more tiles, which end at the edge and may recompute a few
    columns of the tile before; the width of the only tile when ndim is narrower than one register)."""
    if ndim < LANES:
        return 0, 0, 0, 0, 0, ndim
    full, rest = divmod(ndim, vectors * LANES)
    if rest == 0:
        return full, 0, 0, 0, 0, 0
    if full:
        tail = -(-rest // LANES)
        return full, ndim - tail * LANES, tail, 0, 0, 0
    if ndim % LANES == 0:
        return 0, 0, ndim // LANES, 0, 0, 0
    return 0, 0, ndim // LANES, ndim - LANES, 1, 0


def build_kernel(s: FitsShape, target: Any = None, plan: SplitPlan | None = None) -> Any:
    """The kernel compiled alone (entry `fits`), for `run_kernel`; with `plan`, the split kernel (its
    arguments: x, `split_kernel_operands`, y); target default: this host."""
    import tvm

    if target is None:      # this host: LLVM's own CPU and triple (the kernels use its vector units)
        from tvm.target import codegen
        target = {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()),
                  "mtriple": str(codegen.llvm_get_system_triple())}
    fn = fits_primfunc(s) if plan is None else fits_split_primfunc(s, plan)
    mod = tvm.IRModule({"fits": fn.with_attr("global_symbol", "fits")})
    return tvm.compile(mod, target=tvm.target.Target(target))


def run_kernel(lib: Any, s: FitsShape, x: np.ndarray,
               operands: list[np.ndarray]) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """y = kernel(x, *operands) on NumPy arrays (float32; shapes checked against `s`); (y, y - mean) for a
    kernel with the `centred` output."""
    import tvm

    L, N, C = s.seq_len, s.out_len, s.channels
    if x.ndim != 3 or x.shape[1:] != (L, C) or (s.batch is not None and x.shape[0] != s.batch):
        raise UsageError(f"FITS kernel input is {x.shape}, expected [{s.batch or 'batch'}, {L}, {C}]")
    shapes = s.operand_shapes()
    if [tuple(o.shape) for o in operands] != shapes:
        raise UsageError(f"FITS kernel ({s.form}) operands are {[o.shape for o in operands]}, "
                         f"expected {shapes}")
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a, dtype=np.float32), dev) for a in (x, *operands)]
    outs = [tvm.runtime.tensor(np.empty((x.shape[0], N, C), np.float32), dev) for _ in range(1 + s.centred)]
    lib["fits"](*args, *outs)
    return (outs[0].numpy(), outs[1].numpy()) if s.centred else outs[0].numpy()


# --- the Relax rewrite ------------------------------------------------------------------------------------

def _pattern(lowrank: bool) -> tuple[Any, dict[str, Any]]:
    """The Relax ops `to_onnx(form='folded' | 'lowrank')` becomes after `prepare_onnx` and the ONNX importer
    (LayerNormalization expanded), as a dataflow pattern; returns the root and the named sub-patterns."""
    from tvm.relax.dpl import is_const, is_op, is_tuple, wildcard

    p = {"x": wildcard(), "eps": is_const(), "one_a": is_const(), "one_b": is_const(), "scale": is_const(),
         "shift": is_const(), "w": wildcard()}
    p["xt"] = is_op("relax.permute_dims")(p["x"])
    p["mean"] = is_op("relax.mean")(p["xt"])
    d = is_op("relax.subtract")(p["xt"], p["mean"])
    p["var"] = is_op("relax.mean")(is_op("relax.multiply")(d, d))
    inv = is_op("relax.divide")(p["one_a"], is_op("relax.sqrt")(is_op("relax.add")(p["var"], p["eps"])))
    h = is_op("relax.add")(is_op("relax.multiply")(is_op("relax.multiply")(d, inv), p["scale"]), p["shift"])
    if lowrank:
        p["f"] = wildcard()
        h = is_op("relax.matmul")(h, p["f"])
    rho = is_op("relax.divide")(p["one_b"], inv)
    p["cat"] = is_op("relax.concat")(is_tuple([is_op("relax.multiply")(h, rho), rho, p["mean"]]))
    p["y"] = is_op("relax.permute_dims")(is_op("relax.matmul")(p["cat"], p["w"]))
    return p["y"], p


def _static_shape(expr: Any) -> tuple[int, ...] | None:
    """The static shape of a float32 tensor expression, None if not float32 or not static."""
    from tvm import tirx

    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if getattr(ty, "dtype", None) != "float32" or shape is None or not hasattr(shape, "values"):
        return None
    if not all(isinstance(v, tirx.IntImm) for v in shape.values):
        return None
    return tuple(int(v) for v in shape.values)


def _const_value(expr: Any) -> np.ndarray:
    return expr.value.numpy()


def _match_shape(m: dict[Any, Any], p: dict[str, Any], lowrank: bool) -> FitsShape | None:
    """The kernel shape of one match, after checking what the pattern cannot say (axes, constants, shapes);
    None when the match is not a FITS spectral block this kernel computes."""
    from tvm import tirx

    def axes(name: str) -> list[int]:
        return [int(a) for a in m[p[name]].attrs.axes]

    y = m[p["y"]]
    x_ty = m[p["x"]].ty
    shape = getattr(x_ty, "shape", None)
    if getattr(x_ty, "dtype", None) != "float32" or not hasattr(shape, "values") or len(shape.values) != 3:
        return None
    n, L, C = shape.values
    if not isinstance(L, tirx.IntImm) or not isinstance(C, tirx.IntImm):
        return None
    L, C = int(L), int(C)
    out_perm = [int(a) for a in y.attrs.axes]
    if axes("xt") != [0, 2, 1] or out_perm != [0, 2, 1] or L < 2:
        return None
    for name in ("mean", "var"):
        call = m[p[name]]
        if [int(a) % 3 for a in call.attrs.axis] != [2] or not call.attrs.keepdims:
            return None
    if int(m[p["cat"]].attrs.axis) % 3 != 2:
        return None
    ones = [_const_value(m[p[k]]) for k in ("one_a", "one_b")]
    scale, shift, eps = (_const_value(m[p[k]]) for k in ("scale", "shift", "eps"))
    if (any(o.size != 1 or float(o.reshape(())) != 1.0 for o in ones) or eps.size != 1
            or scale.shape != (L,) or shift.shape != (L,) or np.any(scale != 1) or np.any(shift != 0)):
        return None
    rank = None
    k = L
    if lowrank:
        f = _static_shape(m[p["f"]])
        if f is None or len(f) != 2 or f[0] != L:
            return None
        rank = k = f[1]
    w = _static_shape(m[p["w"]])
    if w is None or len(w) != 2 or w[0] != k + 2:
        return None
    y_shape = y.ty.shape.values
    if len(y_shape) != 3 or not all(isinstance(v, tirx.IntImm) for v in y_shape[1:]) \
            or (int(y_shape[1]), int(y_shape[2])) != (w[1], C):
        return None
    batch = int(n) if isinstance(n, tirx.IntImm) else None
    return FitsShape(L, w[1], C, float(eps.reshape(())), rank, batch)


def _split_operands(f: Any, w: Any) -> Any:
    """The split form's operands when the GEMM operands are constants of the graph (a plain FITS bundle,
    either form: `f` None for the folded one) and are what those forms hold (`spectral.split_operands` and
    `split_operands_from_folded` check); else None: operands the runtime hands over at load (elastic FITS
    levels) keep the low-rank or folded kernel."""
    import tvm

    from edgeflex.kernels import spectral

    if not isinstance(w, tvm.ir.Constant):
        return None
    if f is None:                                   # the folded form: its one matrix factored back first
        ops = spectral.split_operands_from_folded(_const_value(w))
    elif isinstance(f, tvm.ir.Constant):
        ops = spectral.split_operands(_const_value(f), _const_value(w))
    else:
        return None
    if ops is None:
        return None
    # NOTE: its five stages cost more per multiply-add than one GEMM: measured (2 threads, batch 1 and 64)
    # it lost at 0.79x the smaller form's multiply-adds (L 96, cut 20) and won from 0.57x (L 208, cut 30)
    L, n, r = ops.seq_len, ops.out_len, ops.rank
    smaller = min(L * n, L * r + (r + 2) * n)
    return ops if spectral.split_macs(ops) <= SPLIT_MAX_SHARE * smaller else None


def _cores(target: Any) -> int:
    try:
        return max(1, int(target.attrs["num-cores"]))
    except (KeyError, TypeError, ValueError):
        return 1


def _add_kernel(bb: Any, kernels: dict[Any, Any], s: FitsShape, plan: SplitPlan | None) -> Any:
    """The GlobalVar of the kernel for (shape, split plan), added to `bb`'s module on first use."""
    key = (s, plan)
    if key not in kernels:
        form = s.form if plan is None else "split"
        name = (f"fits_{form}_{'n' if s.batch is None else s.batch}x{s.seq_len}x{s.channels}"
                f"_h{s.out_len}" + (f"_r{s.rank}" if s.rank else "") + ("_yc" if s.centred else ""))
        fn = fits_primfunc(s) if plan is None else fits_split_primfunc(s, plan)
        kernels[key] = bb.add_func(fn.with_attr("global_symbol", name), name)
    return kernels[key]


@register("fits")
def rewrite_fits(mod: Any, ctx: RewriteContext) -> Any:
    """Every FITS spectral block of `mod` (the imported `folded` or `lowrank` ONNX lowering: transpose,
    mean / variance, normalise, GEMM(s), de-normalise in the last GEMM, transpose) as one call of the kernel.
    Folded or low-rank operands that are graph constants, at lengths that are multiples of 16, become the
    split kernel's (`fits_split_primfunc`, faster than the low-rank kernel: benchmarks/RESULTS.md, FITS TIR
    kernel); otherwise the GEMM operands (constants or engine parameters) are passed as they are. A block
    whose output also feeds the centred series (`to_onnx`'s "centred" output: transpose back, subtract the
    normalisation's mean, transpose) then gets the kernel that writes both (`_fold_centred`). CPU (llvm)
    targets only; None when no block matches (an `individual` FITS, whose graph works channel-first, does
    not)."""
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    if ctx.target is None or ctx.target.kind.name != "llvm":
        return None
    cores = _cores(ctx.target)
    bb = relax.BlockBuilder(mod)
    kernels: dict[Any, Any] = {}
    for lowrank in (True, False):
        root, p = _pattern(lowrank)

        def rewriter(orig: Any, m: dict[Any, Any], p: dict[str, Any] = p, lowrank: bool = lowrank) -> Any:
            found = _match_shape(m, p, lowrank)
            if found is None:
                return orig
            split = _split_operands(m[p["f"]] if lowrank else None, m[p["w"]])
            # the split kernel's shape carries its rank (the folded form has none of its own)
            rank = found.rank if split is None else split.rank
            s = schedule_for(found.seq_len, found.out_len, found.channels, found.eps, rank,
                             batch=found.batch, cores=cores)
            gv = _add_kernel(bb, kernels, s, None if split is None else SplitPlan.of(split))
            if split is not None:
                args = [m[p["x"]], *(relax.const(a) for a in split_kernel_operands(split))]
            else:
                args = [m[p["x"]], *([m[p["f"]]] if lowrank else []), m[p["w"]]]
            return relax.call_tir(gv, args, orig.ty)

        for gv, func in list(bb.get().functions.items()):
            if not isinstance(func, relax.Function):
                continue
            n_before = len(kernels)
            new = rewrite_call(root, rewriter, func)
            if len(kernels) > n_before or not new.same_as(func):
                bb.update_func(gv, new)
    if not kernels:
        return None
    _fold_centred(bb, kernels)
    return relax.transform.DeadCodeElimination()(bb.get())


def _fold_centred(bb: Any, kernels: dict[Any, Any]) -> None:
    """Where a kernel call's y feeds the centred series y - mean as `to_onnx` writes it (permute y back to
    channel-major, subtract the mean of the permuted input, permute), call instead the kernel that writes
    both (`FitsShape.centred`): the four ops, and the normalisation's mean they kept alive, go. NOTE: the
    four small ops cost about as much as the whole kernel at FITS L=720 C=7 batch 1 (benchmarks/RESULTS.md,
    FITS as its authors write it). Kernels no call uses any more are removed from the module."""
    from tvm import relax
    from tvm.relax.dpl import PatternContext, is_op, rewrite_bindings, wildcard

    by_gv = {gv: key for key, gv in kernels.items()}
    with PatternContext() as pctx:
        # NOTE: a graph pattern (PatternContext) matches bound variables: `is_const` leaves never matched when
        # tried, so the leaves are wildcards and the rewriter checks the kernel call, its input and the axes
        y, x = wildcard(), wildcard()
        xt = is_op("relax.permute_dims")(x)
        mean = is_op("relax.mean")(xt)
        back = is_op("relax.permute_dims")(y)
        cen = is_op("relax.permute_dims")(is_op("relax.subtract")(back, mean))

    def perm(m: dict[Any, Any], b: dict[Any, Any], pat: Any) -> list[int]:
        return [int(a) for a in b[m[pat]].attrs.axes]

    def rewriter(m: dict[Any, Any], b: dict[Any, Any]) -> dict[Any, Any]:
        call = b.get(m[y])
        if call is None or getattr(call.op, "name", "") != "relax.call_tir" or call.args[0] not in by_gv:
            return {}
        s, plan = by_gv[call.args[0]]
        args = list(call.args[1].fields)
        mean_call = b[m[mean]]
        if (s.centred or not args[0].same_as(m[x]) or perm(m, b, xt) != [0, 2, 1]
                or perm(m, b, back) != [0, 2, 1] or perm(m, b, cen) != [0, 2, 1]
                or [int(a) % 3 for a in mean_call.attrs.axis] != [2] or not mean_call.attrs.keepdims):
            return {}
        both = _add_kernel(bb, kernels, dataclasses.replace(s, centred=True), plan)
        new = relax.call_tir(both, args, [call.ty, call.ty])
        return {m[y]: relax.TupleGetItem(new, 0), m[cen]: relax.TupleGetItem(new, 1)}

    for gv, func in list(bb.get().functions.items()):
        if isinstance(func, relax.Function):
            new = rewrite_bindings(pctx, rewriter, func)
            if not new.same_as(func):
                bb.update_func(gv, new)
    mod = bb.get()
    used = {str(n) for f in mod.functions.values() if isinstance(f, relax.Function)
            for n in _called(f)}
    for key, gv in list(kernels.items()):
        if gv.name_hint not in used:
            del mod[gv]
            del kernels[key]


def _called(func: Any) -> set[str]:
    """Names of the GlobalVars a Relax function calls with call_tir."""
    from tvm import relax

    names: set[str] = set()

    def visit(e: Any) -> None:
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir":
            names.add(e.args[0].name_hint)

    relax.analysis.post_order_visit(func.body, visit)
    return names
