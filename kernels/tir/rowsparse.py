"""DRESS row-sparse matmul as hand-scheduled TIR with the level as a run-time argument, and the Relax rewrite
that puts it into the row-sparse graph (`graphs/main.sparse.onnx`) in place of the ELL ops Relax cannot build.

Owns the prim funcs (linear at any batch, 1x1 conv in NCHW), the blocked ELL layout they read and the rewrite.
Not the ELL form or its NumPy reference (`kernels/rowsparse.py`), nor which kernel a level runs (measured at
export, `export/elastic.py`).

Blocked ELL (`block_ell`): the bundle's ELL [out, kmax] (values, indices; each row sorted by importance) is
cut into blocks of 16 output rows and stored [out/16, kmax, 16]: entry j of 16 neighbouring rows is one
contiguous 64-byte vector, and a level's entries are still a prefix (the first k_s of axis 1). The engine
makes this copy once at load (the rewrite's reshapes of the weights are lifted into `main_transform_params`
by `compile.tvm`), never per call.

One prim func serves every level: it reads k = ell_k[level] at run time and loops over the first k entries.
Schedules (written out, `tirx.is_scheduled`, so nothing re-schedules them):
- batch < `GEMV_MAX_BATCH` (GEMV): per block of 16 rows, one vector accumulator (two, alternating) gets
  values[j, 0:16] * x[index[j, 0:16]], the x values gathered with AVX-512 `vgatherdps` where the target has it
  (else LLVM's scalarised gather): no horizontal sums, no per-row tails.
- the batch schedule (linear, batch >= `GEMV_MAX_BATCH`): x copied once to [batch / 16, in, 16], in 16 x 16
  tiles transposed in registers (64 two-source shuffles, `_transpose16`); per task one ELL block (16 output
  rows) x 16 batch lanes in 16 registers, per entry and row one index, one broadcast value, one aligned load
  and one FMA; the block transposed back the same way into 16-wide stores of y. The copy and the blocks
  share one thread-pool launch, with a barrier between them.
- the pixel schedule (1x1 conv): `RB` output rows x `PV` vectors of 16 pixels accumulate in registers; per
  entry one index, one broadcast value, `PV` loads and FMAs. Rows of more than 16 pixels that are not a
  multiple of 16 (7x7, 14x14) are read from a 64-byte-aligned copy of x padded to whole vectors, made in the
  same thread-pool launch before a barrier: every load then lies in one cache line (unpadded, nearly every
  load of a 49-float row straddled two, and 384->1536 @7x7 at 10 % ran markedly slower for it).
Tasks (blocks of rows) run in parallel when a call has at least `PARALLEL_MACS` multiply-adds
(`PARALLEL_GATHERS` in the GEMV schedule); below that a thread-pool launch costs more than it saves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeflex.kernels.tir import LANES, RewriteContext, register

log = logging.getLogger(__name__)

# LANES (16, from kernels.tir) is also the ELL row block: 16 output rows per blocked entry
RB = 8                      # output rows per register block in the pixel schedule
PV = 2                      # vectors of 16 pixels per register block: RB * PV = 16 accumulators
GEMV_MAX_BATCH = 4          # below this batch, the gather (GEMV) schedule
PARALLEL_MACS = 1 << 17     # multiply-adds per call from which row blocks run on the thread pool ...
PARALLEL_GATHERS = 1 << 14  # ... and in the GEMV schedule, where each one costs a gathered load
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


def blocks(out_f: int) -> int:
    """Blocks of `LANES` output rows (the last one padded)."""
    return -(-out_f // LANES)


def block_ell(vals: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ELL [out, kmax] values and indices -> the kernels' blocked [out/16, kmax, 16] layout (rows padded
    to a multiple of 16 with value 0 at index 0). The NumPy statement of what `blocked_expr` computes."""
    out_f, kmax = vals.shape
    nb = blocks(out_f)

    def one(a: np.ndarray) -> np.ndarray:
        padded = np.zeros((nb * LANES, kmax), a.dtype)
        padded[:out_f] = a
        return np.ascontiguousarray(padded.reshape(nb, LANES, kmax).transpose(0, 2, 1))

    return one(vals), one(idx)


def blocked_expr(expr: Any, out_f: int, kmax: int, dtype: str) -> Any:
    """Relax ops turning an [out, kmax] ELL tensor into the blocked [out/16, kmax, 16] layout (`block_ell`);
    they read only the weight, so `LiftTransformParams` moves them to load time."""
    from tvm import relax

    nb = blocks(out_f)
    if nb * LANES != out_f:
        pad = relax.const(np.zeros((nb * LANES - out_f, kmax), dtype), dtype)
        expr = relax.op.concat([expr, pad], axis=0)
    return relax.op.permute_dims(relax.op.reshape(expr, [nb, LANES, kmax]), [0, 2, 1])


def _level_k(T, ell_k, level, n_levels: int, kmax: int):
    """k of the run-time level, both clamped into range (never reads outside the buffers)."""
    lv = T.min(T.max(level[()], T.int64(0)), T.int64(n_levels - 1))
    return T.min(T.max(ell_k[lv], T.int64(0)), T.int64(kmax))


def _f32x4(imm: int) -> list[int]:
    # two-source mask of AVX-512 `vshuff32x4 imm`: 128-bit lanes 0-1 from the first source, 2-3 the second
    sel = [(imm >> 2 * d) & 3 for d in range(4)]
    return [(0 if d < 2 else LANES) + 4 * sel[d] + e for d in range(4) for e in range(4)]


# Two-source shuffle masks (indices into the 32 lanes of two vectors) of the classic 16 x 16 transpose: the
# x86 instruction each matches, so LLVM emits that one-uop shuffle.
_UNPACKLO_PS = [x for q in range(4) for x in (4 * q, 16 + 4 * q, 4 * q + 1, 17 + 4 * q)]
_UNPACKHI_PS = [x for q in range(4) for x in (4 * q + 2, 18 + 4 * q, 4 * q + 3, 19 + 4 * q)]
_UNPACKLO_PD = [x for q in range(4) for x in (4 * q, 4 * q + 1, 16 + 4 * q, 17 + 4 * q)]
_UNPACKHI_PD = [x for q in range(4) for x in (4 * q + 2, 4 * q + 3, 18 + 4 * q, 19 + 4 * q)]
_EVEN_LANES, _ODD_LANES = _f32x4(0x88), _f32x4(0xDD)


def _transpose16(T, src, dst):
    """dst (a local [256] buffer, 16 rows of 16) = src transposed, in registers: 64 one-uop shuffles in four
    stages (unpck{l,h}ps of row pairs, unpck{l,h}pd, then two rounds of vshuff32x4), where reading src by a
    stride of 16 makes LLVM build each row from scalars or cross-lane permutes. Checked against numpy in
    tests/test_tir_rowsparse.py through the batch schedule, which transposes x in and y out with it."""
    V = LANES
    r = [src[T.Ramp(i * V, 1, V)] for i in range(V)]

    def shuf(a, b, mask):
        return T.Shuffle([a, b], mask)

    t = [None] * V
    for i in range(V // 2):
        t[2 * i] = shuf(r[2 * i], r[2 * i + 1], _UNPACKLO_PS)
        t[2 * i + 1] = shuf(r[2 * i], r[2 * i + 1], _UNPACKHI_PS)
    u = [None] * V
    for k in range(0, V, 4):
        u[k], u[k + 1] = shuf(t[k], t[k + 2], _UNPACKLO_PD), shuf(t[k], t[k + 2], _UNPACKHI_PD)
        u[k + 2], u[k + 3] = shuf(t[k + 1], t[k + 3], _UNPACKLO_PD), shuf(t[k + 1], t[k + 3], _UNPACKHI_PD)
    v = [None] * V
    for h in (0, 8):
        for i in range(h, h + 4):
            v[i], v[i + 4] = shuf(u[i], u[i + 4], _EVEN_LANES), shuf(u[i], u[i + 4], _ODD_LANES)
    for i in range(V // 2):
        row_i, row_i8 = shuf(v[i], v[i + 8], _EVEN_LANES), shuf(v[i], v[i + 8], _ODD_LANES)
        T.buffer_store(dst, row_i, [T.Ramp(i * V, 1, V)])      # statements into the prim func being parsed
        T.buffer_store(dst, row_i8, [T.Ramp((i + 8) * V, 1, V)])


def _pixel_macros(T, NO: int, K: int, W: int):
    """The pixel schedule as TVMScript macros over x [n, in, PP] and y [n, out, P] (P >= W; rows of x
    contiguous and whole vectors: PP = P where P % W == 0, else x is the aligned copy padded to whole
    vectors, `conv1x1_func`'s `pad_rows`), `(rows, chunk)`: `rows` runs every vector of one row block of one
    image, `chunk` one pass of PV vectors of one image through every row block; both through `tile`, which
    accumulates RB rows x nvec vectors starting at vector v0."""
    V = LANES

    def lanes(base):
        return T.Ramp(base, 1, W) if W > 1 else base

    def bcast(value):
        return T.Broadcast(value, W) if W > 1 else value

    @T.macro
    def tile(x, vb, ib, bias, y, n, blk, r0, P, v0, nvec, kk):
        # x's rows are whole vectors: P <= W or P % W == 0 as they are, else the aligned padded copy; no load
        # straddles two cache lines (at 7x7, 49-float rows, nearly all did: the 384->1536 layer at 10 % ran
        # markedly slower for it). The valid lanes of a padded row's last vector are stored one by one.
        acc = T.decl_buffer((RB * PV * W,), "float32", scope="local")
        acc[T.Ramp(0, 1, RB * PV * W)] = T.Broadcast(T.float32(0), RB * PV * W)
        for j in range(kk):
            for r in T.unroll(RB):
                for q in T.unroll(nvec):
                    acc[lanes((r * PV + q) * W)] = acc[lanes((r * PV + q) * W)] + \
                        bcast(vb[blk, j, r0 + r]) * \
                        x[n, T.Cast("int64", ib[blk, j, r0 + r]), lanes((v0 + q) * W)]
        for r in T.unroll(RB):
            if blk * V + r0 + r < NO:
                for q in T.unroll(nvec):
                    if (v0 + q) * W + W <= P:
                        y[n, blk * V + r0 + r, lanes((v0 + q) * W)] = \
                            acc[lanes((r * PV + q) * W)] + bcast(bias[blk * V + r0 + r])
                    else:
                        for lane in range(P % W):
                            y[n, blk * V + r0 + r, (v0 + q) * W + lane] = \
                                acc[(r * PV + q) * W + lane] + bias[blk * V + r0 + r]

    @T.macro
    def rows(x, vb, ib, bias, y, n, task, P, kk):
        # (no `T.let` in a macro: the parser cannot see T there; the expressions are re-stated instead)
        for pc in range((P + W - 1) // W // PV):
            tile(x, vb, ib, bias, y, n, task // (V // RB), task % (V // RB) * RB, P, pc * PV, PV, kk)
        for pr in range((P + W - 1) // W % PV):
            tile(x, vb, ib, bias, y, n, task // (V // RB), task % (V // RB) * RB, P,
                 (P + W - 1) // W // PV * PV + pr, 1, kk)

    @T.macro
    def chunk(x, vb, ib, bias, y, n, pc, P, kk):
        # one pass of PV vectors (pc) through every row block: the x columns it reads stay in L1
        for t in range(blocks(NO) * (V // RB)):
            if pc * PV + PV <= (P + W - 1) // W:
                tile(x, vb, ib, bias, y, n, t // (V // RB), t % (V // RB) * RB, P, pc * PV, PV, kk)
            else:
                tile(x, vb, ib, bias, y, n, t // (V // RB), t % (V // RB) * RB, P, pc * PV,
                     (P + W - 1) // W % PV, kk)

    return rows, chunk


def linear_func(out_f: int, in_f: int, kmax: int, n_levels: int, *, index_dtype: str = "int64",
                target: Any = None):
    """PrimFunc y[b, o] = sum_{j < ell_k[level]} vals[o, j] * x[b, idx[o, j]] + bias[o], reading the
    blocked ELL (`block_ell`).

    Arguments in order: x [batch, in] float32 (batch dynamic), vb [out/16, kmax, 16] float32, ib [out/16,
    kmax, 16] `index_dtype`, ell_k [n_levels] int64, level [] int64, bias [out] float32, y [batch, out]
    float32. An out-of-range level or k is clamped into range."""
    from tvm.script import tirx as T

    _check(out_f, in_f, kmax, n_levels, index_dtype)
    NO, NI, K, L, V = out_f, in_f, kmax, n_levels, LANES
    NB = blocks(out_f)
    NI16 = NI // V                              # whole 16-column blocks of x (the rest copied one by one)
    gather = _has_avx512(target) and in_f < (1 << 31)

    def gathered(x, ib, b, blk, j):
        idx = T.Cast("int32x16", ib[blk, j, T.Ramp(0, 1, V)])
        if gather:
            return T.call_llvm_intrin("float32x16", "llvm.x86.avx512.gather.dps.512",
                                      T.Broadcast(T.float32(0), V), T.address_of(x[b, 0]), idx,
                                      T.int16(-1), T.int32(4))
        return x[b, idx]

    @T.macro
    def to_xt(x, xt, B, c, i0):
        # xt[c, i0 .. i0 + 16, :] = x[16 c .. 16 c + 16, i0 .. i0 + 16]^T: 16 row vectors into a local
        # 16 x 16 tile, transposed in registers (`_transpose16`; rows past the batch are zeros)
        tb = T.decl_buffer((V * V,), "float32", scope="local")
        if c * V + V <= B:
            for b in T.unroll(V):
                tb[T.Ramp(b * V, 1, V)] = x[c * V + b, T.Ramp(i0 * V, 1, V)]
        else:
            for b in T.unroll(V):
                tb[T.Ramp(b * V, 1, V)] = T.if_then_else(c * V + b < B, x[T.min(c * V + b, B - 1),
                                                         T.Ramp(i0 * V, 1, V)], T.Broadcast(T.float32(0), V))
        tt = T.decl_buffer((V * V,), "float32", scope="local")
        _transpose16(T, tb, tt)
        for i in T.unroll(V):
            xt[c, i0 * V + i, T.Ramp(0, 1, V)] = tt[T.Ramp(i * V, 1, V)]

    @T.macro
    def to_xt_tail(x, xt, B, c):
        # the columns past the last whole block of 16, one value at a time
        for i in range(NI16 * V, NI):
            for b in range(V):
                xt[c, i, b] = T.if_then_else(c * V + b < B, x[T.min(c * V + b, B - 1), i], T.float32(0))

    @T.macro
    def batch_block(xt, vb, ib, bias_buf, y, B, blk, c, kk):
        # 16 output rows (one ELL block) x 16 batch lanes in 16 registers; per entry j and row r one index,
        # one broadcast value, one aligned load of xt's row and one FMA; the block transposed in registers
        # (`_transpose16`) so y gets 16-wide row stores
        acc = T.decl_buffer((V * V,), "float32", scope="local")
        for r in T.unroll(V):
            acc[T.Ramp(r * V, 1, V)] = T.Broadcast(T.float32(0), V)
        for j in range(kk):
            for r in T.unroll(V):
                acc[T.Ramp(r * V, 1, V)] = acc[T.Ramp(r * V, 1, V)] + T.Broadcast(vb[blk, j, r], V) * \
                    xt[c, T.Cast("int64", ib[blk, j, r]), T.Ramp(0, 1, V)]
        at = T.decl_buffer((V * V,), "float32", scope="local")
        if blk * V + V <= NO:
            _transpose16(T, acc, at)
        if blk * V + V <= NO and c * V + V <= B:
            for b in T.unroll(V):
                y[c * V + b, T.Ramp(blk * V, 1, V)] = at[T.Ramp(b * V, 1, V)] + \
                    bias_buf[T.Ramp(blk * V, 1, V)]
        elif blk * V + V <= NO:
            for b in range(V):
                if c * V + b < B:
                    y[c * V + b, T.Ramp(blk * V, 1, V)] = at[T.Ramp(b * V, 1, V)] + \
                        bias_buf[T.Ramp(blk * V, 1, V)]
        else:
            for b in range(V):
                if c * V + b < B:
                    for r in range(NO - (NB - 1) * V):
                        y[c * V + b, blk * V + r] = acc[r * V + b] + bias_buf[blk * V + r]

    @T.macro
    def gemv_block(x, vb, ib, bias_buf, y, b, blk, kk):
        acc = T.decl_buffer((2 * V,), "float32", scope="local")
        acc[T.Ramp(0, 1, 2 * V)] = T.Broadcast(T.float32(0), 2 * V)
        for j2 in range(kk // 2):
            for h in T.unroll(2):                 # two accumulators: independent gathers and FMA chains
                acc[T.Ramp(h * V, 1, V)] = acc[T.Ramp(h * V, 1, V)] + \
                    vb[blk, j2 * 2 + h, T.Ramp(0, 1, V)] * gathered(x, ib, b, blk, j2 * 2 + h)
        if kk % 2 == 1:
            acc[T.Ramp(0, 1, V)] = acc[T.Ramp(0, 1, V)] + vb[blk, kk - 1, T.Ramp(0, 1, V)] * \
                gathered(x, ib, b, blk, kk - 1)
        if blk * V + V <= NO:
            y[b, T.Ramp(blk * V, 1, V)] = acc[T.Ramp(0, 1, V)] + acc[T.Ramp(V, 1, V)] + \
                bias_buf[T.Ramp(blk * V, 1, V)]
        else:
            for v in range(NO - (NB - 1) * V):
                y[b, blk * V + v] = acc[v] + acc[V + v] + bias_buf[blk * V + v]

    @T.prim_func(private=True)
    def rowsparse_linear(var_x: T.handle, vb: T.Buffer((NB, K, V), "float32"),
                         ib: T.Buffer((NB, K, V), index_dtype),
                         ell_k: T.Buffer((L,), "int64"), level: T.Buffer((), "int64"),
                         bias_buf: T.Buffer((NO,), "float32"), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int64()
        x = T.match_buffer(var_x, (B, NI), "float32")
        y = T.match_buffer(var_y, (B, NO), "float32")
        kk: T.let = _level_k(T, ell_k, level, L, K)
        if B < GEMV_MAX_BATCH:
            for b in range(B):
                if NB * V * kk >= PARALLEL_GATHERS:
                    for blk in T.parallel(NB):
                        gemv_block(x, vb, ib, bias_buf, y, b, blk, kk)
                else:
                    for blk in range(NB):
                        gemv_block(x, vb, ib, bias_buf, y, b, blk, kk)
        else:
            # x copied once to xt [batch / 16, in, 16] (16 x 16 tiles transposed in registers);
            # tasks of 16 rows x 16 batch lanes; one thread-pool launch for both phases, a barrier between
            # (the pixel schedule this replaced, with a launch per phase and y copied back by one value at
            # a time, spent longer on those than on the arithmetic of a 10 % layer at batch 16)
            nc: T.let = (B + V - 1) // V
            xt = T.decl_buffer((nc, NI, V), "float32")
            if NB * V * kk * nc * V >= PARALLEL_MACS:
                with T.attr(0, "pragma_parallel_launch_point", 0):
                    with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                        for t in T.parallel(nc * NI16):
                            to_xt(x, xt, B, t // NI16, t % NI16)
                    if NI16 * V < NI:
                        with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                            for c in T.parallel(nc):
                                to_xt_tail(x, xt, B, c)
                    for t in T.parallel(NB * nc):
                        batch_block(xt, vb, ib, bias_buf, y, B, t // nc, t % nc, kk)
            else:
                for t in range(nc * NI16):
                    to_xt(x, xt, B, t // NI16, t % NI16)
                if NI16 * V < NI:
                    for c in range(nc):
                        to_xt_tail(x, xt, B, c)
                for t in range(NB * nc):
                    batch_block(xt, vb, ib, bias_buf, y, B, t // nc, t % nc, kk)

    return rowsparse_linear


def conv1x1_func(out_c: int, in_c: int, kmax: int, n_levels: int, pixels: int, *, index_dtype: str = "int64",
                 target: Any = None):
    """PrimFunc of a row-sparse 1x1 conv in NCHW with pixels flattened: y[n, o, p] = bias[o] +
    sum_{j < ell_k[level]} vals[o, j] * x[n, idx[o, j], p], reading the blocked ELL (`block_ell`).
    Arguments: x [batch, in_c, pixels] float32 (batch dynamic), vb, ib, ell_k, level, bias [out_c],
    y [batch, out_c, pixels]. The pixel schedule with the pixels of a channel as the vector (NCHW has them
    contiguous; fewer than 16 pixels: one narrower vector)."""
    from tvm.script import tirx as T

    _check(out_c, in_c, kmax, n_levels, index_dtype)
    if pixels < 1:
        raise ValueError(f"1x1 conv needs pixels >= 1 (H * W), got {pixels}")
    NO, C, K, L, P, V = out_c, in_c, kmax, n_levels, pixels, LANES
    NB, NT = blocks(out_c), blocks(out_c) * (LANES // RB)
    # rows of P floats that are not whole vectors (7x7, 14x14): the kernel reads an aligned copy of x whose
    # rows are padded to whole vectors (`pad_rows`), copied once per call
    padded = P > V and P % V != 0
    PP = -(-P // V) * V if padded else P
    rows, chunk = _pixel_macros(T, NO, K, min(V, P))
    n_vectors = -(-P // min(V, P))
    NPASS = -(-n_vectors // PV)                 # passes of PV vectors over a row of P pixels
    tail = [V - P % V + lane if lane < P % V else V for lane in range(V)]   # the last pixels, then zeros

    @T.macro
    def pad_rows(x, xp, t):
        # row t (image t // C, channel t % C) of x into xp: whole vectors as they are, the last one's
        # P % V pixels shifted down from the row's last full-width window, zeros after them (the padding
        # lanes are computed and never stored: zeros keep them finite and fast)
        for v in T.unroll(P // V):
            xp[t // C, t % C, T.Ramp(v * V, 1, V)] = x[t // C, t % C, T.Ramp(v * V, 1, V)]
        xp[t // C, t % C, T.Ramp(PP - V, 1, V)] = T.Shuffle(
            [x[t // C, t % C, T.Ramp(P - V, 1, V)], T.Broadcast(T.float32(0), V)], tail)

    @T.prim_func(private=True)
    def rowsparse_conv1x1(var_x: T.handle, vb: T.Buffer((NB, K, V), "float32"),
                          ib: T.Buffer((NB, K, V), index_dtype), ell_k: T.Buffer((L,), "int64"),
                          level: T.Buffer((), "int64"), bias_buf: T.Buffer((NO,), "float32"),
                          var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int64()
        x = T.match_buffer(var_x, (B, C, P), "float32")
        y = T.match_buffer(var_y, (B, NO, P), "float32")
        kk: T.let = _level_k(T, ell_k, level, L, K)
        if padded:
            xp = T.decl_buffer((B, C, PP), "float32")
            if NB * V * kk * P * B >= PARALLEL_MACS and B * NPASS >= 2:
                # the copy and the tasks in one thread-pool launch, a barrier between
                with T.attr(0, "pragma_parallel_launch_point", 0):
                    with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                        for t in T.parallel(B * C):
                            pad_rows(x, xp, t)
                    for task in T.parallel(B * NPASS):
                        chunk(xp, vb, ib, bias_buf, y, task // NPASS, task % NPASS, P, kk)
            elif NB * V * kk * P * B >= PARALLEL_MACS:
                with T.attr(0, "pragma_parallel_launch_point", 0):
                    with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                        for t in T.parallel(B * C):
                            pad_rows(x, xp, t)
                    for t in T.parallel(NT):
                        for n in range(B):
                            rows(xp, vb, ib, bias_buf, y, n, t, P, kk)
            else:
                for t in range(B * C):
                    pad_rows(x, xp, t)
                for t in range(NT):
                    for n in range(B):
                        rows(xp, vb, ib, bias_buf, y, n, t, P, kk)
        elif NB * V * kk * P * B >= PARALLEL_MACS and B * NPASS >= 2:
            # tasks = (image, pixel pass): each streams the (contiguous) weights past an x tile held in L1,
            # instead of re-reading x rows at data-dependent places from L2 (faster on 96->384 @14x14,
            # batch 16, 10 %: benchmarks/RESULTS.md, Row-sparse TIR kernel)
            for task in T.parallel(B * NPASS):
                chunk(x, vb, ib, bias_buf, y, task // NPASS, task % NPASS, P, kk)
        elif NB * V * kk * P * B >= PARALLEL_MACS:
            for t in T.parallel(NT):
                for n in range(B):
                    rows(x, vb, ib, bias_buf, y, n, t, P, kk)
        else:
            for t in range(NT):
                for n in range(B):
                    rows(x, vb, ib, bias_buf, y, n, t, P, kk)

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
    after a replaced layer is re-inferred, so later layers (and ops) get static shapes again. The kernels
    read the blocked layout: the reshapes of the ELL weights are in the graph, for `LiftTransformParams`."""
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
            vb = self.builder_.emit(blocked_expr(vals, layer.out_f, layer.kmax, "float32"))
            ib = self.builder_.emit(blocked_expr(idx, layer.out_f, layer.kmax, layer.index_dtype))
            return relax.call_tir(funcs[layer], [x, vb, ib, params[layer.k], level, zero_bias],
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
