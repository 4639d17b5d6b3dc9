"""The int8 star block in one kernel (issue 21): StarNet's `g(act(f1(x)) * f2(x))` as ONNX Runtime's QDQ
graph computes it, with f1, f2 (1x1 convs, C -> H channels) and g (1x1, H -> CO) on the target's int8 dot
product, and the H-wide tensors never stored in float32.

    x_q   = quantize(x, s0, z0)                                  (once, shared by f1 and f2)
    a     = dequantize(quantize(f1(x_q), s1, z1))   [act]        (in registers, per tile)
    b     = dequantize(quantize(f2(x_q), s2, z2))   [act]
    p_q   = quantize(a * b, s3, z3)                              (uint8: the only H-wide tensor stored)
    y     = s3 * s_g[o] * (sum_h wg_q[o, h] * p_q[h]  -  z3 * sum_h wg_q[o, h])  +  bias_g[o]

Every step is the float32 arithmetic of the per-op path (`qconv` then the element-wise QuantizeLinear /
DequantizeLinear / multiply, then `qconv` again), in the same order, so the outputs are the same; what goes
is the traffic: f1's and f2's float32 outputs (2 x H x pixels x 4 bytes) written and read back, the
multiply's float32 output, and g's re-quantization of it, and two of the three kernel launches.

One thread-pool launch per image, three phases with a barrier between: (1) x quantized and laid out with
the 4 channels of each pixel side by side (one int32 per pixel and channel quad); (2) tasks of (pixel
vector, block of hidden channels): f1 and f2 share each loaded x vector, the epilogue quantizes, multiplies
and re-quantizes in registers and packs 4 hidden channels into one int32 per pixel; (3) g over the packed
product, tasks of (pixel tile, output-channel block), as `qconv`'s 1x1 kernel.

The Relax side is in `qconv` (its rewrite fuses a matched star block, so the engine's `kernels` still
says "qconv"); `qstar_reference` is what the kernel computes, in numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeflex.kernels.tir.qconv import ACC_REGISTERS, X86_VNNI

MIN_PIXELS = 16     # the x pass quantizes vectors of 16 pixels (a smaller plane stays on the per-op path)


def _q(v: np.ndarray, s: float, z: int) -> np.ndarray:
    """ONNX QuantizeLinear to uint8, in float32 as the kernel computes it (round half to even)."""
    return np.clip(np.rint(v.astype(np.float32) / np.float32(s)) + np.float32(z), 0, 255).astype(np.int32)


def fold(ws: np.ndarray, b: np.ndarray, wsum: np.ndarray, zq: int,
         s_out: float) -> tuple[np.ndarray, np.ndarray]:
    """A conv's epilogue folded into one multiply-add of its raw int32 sums: (m, c) with
    m * acc + c = ((acc - zq * wsum) * ws + b) / s_out; ws = s_in * s_w[o], zq the stored zero point."""
    ws64 = ws.astype(np.float64)
    m = ws64 / s_out
    c = (b.astype(np.float64) - zq * wsum.astype(np.float64) * ws64) / s_out
    return m.astype(np.float32), c.astype(np.float32)


def _hidden(acc: np.ndarray, m: np.ndarray, c: np.ndarray, z: int, act: tuple | None, s: float) -> np.ndarray:
    """f1's / f2's quantized output less its zero point (the dequantized value in units of s), [act]."""
    d = np.clip(np.rint(acc.astype(np.float32) * m.reshape(1, -1, 1) + c.reshape(1, -1, 1)), -z, 255 - z)
    return d if act is None else np.clip(d, np.float32(act[0] / s), np.float32(act[1] / s))


def qstar_reference(x: np.ndarray, w1: np.ndarray, ws1: np.ndarray, b1: np.ndarray,
                    w2: np.ndarray, ws2: np.ndarray, b2: np.ndarray,
                    wg: np.ndarray, wsg: np.ndarray, bg: np.ndarray, quant: dict[str, Any]) -> np.ndarray:
    """The block in numpy, integer sums exact: x [N, C, H, W] float32; w1, w2 [HID, C] int8 with ws1, ws2 =
    s0 * s_w[h]; wg [CO, HID] int8 with wsg = s3 * s_wg[o]; `quant`: s0..s3, z0..z3, act1 / act2 ((lo, hi)
    clip or None). The requantizations as the kernel does them: acc * m + c (`fold`), rounded."""
    n, c, hh, ww = x.shape
    z0, z1, z2, z3 = (int(quant[k]) for k in ("z0", "z1", "z2", "z3"))
    xq = (_q(x, quant["s0"], z0).reshape(n, c, -1) - z0).astype(np.int64)

    def branch(w, ws, b, s, z, act):
        acc = np.einsum("hc,ncp->nhp", w.astype(np.int64), xq)
        m, cc = fold(ws, b, np.zeros(len(ws), np.int64), 0, s)
        return _hidden(acc, m, cc, z, act, s)

    d1 = branch(w1, ws1, b1, quant["s1"], z1, quant.get("act1"))
    d2 = branch(w2, ws2, b2, quant["s2"], z2, quant.get("act2"))
    m3 = np.float32(np.float64(quant["s1"]) * quant["s2"] / quant["s3"])
    pq = np.clip(np.rint(d1 * d2 * m3 + np.float32(z3)), 0, 255).astype(np.int64) - z3
    acc = np.einsum("oh,nhp->nop", wg.astype(np.int64), pq)
    y = acc.astype(np.float32) * wsg.reshape(1, -1, 1) + bg.reshape(1, -1, 1)
    if quant.get("s4") is not None:
        y = (_q(y, quant["s4"], quant["z4"]) - quant["z4"]).astype(np.float32) * np.float32(quant["s4"])
    return y.reshape(n, -1, hh, ww).astype(np.float32)


def amx_usable(target: Any, channels: int, hidden: int, pixels: int) -> bool:
    """Whether f1 and f2 run on AMX tiles (`tdpbsud`) for this block: an x86 target with amx-int8, hidden
    channels in blocks of 16 and two 16-pixel tiles (measured faster than VNNI at every StarNet-S1 stage,
    even C = 24: a 24-byte K per tile)."""
    if target is None or target.kind.name != "llvm" or not str(target.attrs.get("mtriple", "") or
                                                              "x86_64").startswith("x86_64"):
        return False
    from tvm.target import codegen

    try:
        feats = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    except Exception:  # noqa: BLE001 - an LLVM that cannot list features: no AMX
        return False
    return "amx-int8" in feats and hidden % 16 == 0 and pixels >= 32 and channels % 4 == 0


ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1023, 18, 158


def request_amx() -> str | None:
    """Ask Linux for this process's permission to use AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM;
    without it the first tile instruction kills the process). None when granted, else why not."""
    import ctypes
    import os
    import platform

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"AMX needs Linux on x86_64 (this is {platform.system()} {platform.machine()})"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        return f"the kernel refused AMX tile data (arch_prctl: {os.strerror(ctypes.get_errno())})"
    return None


def amx_g(amx: bool, out_channels: int) -> bool:
    """Whether g runs on AMX tiles too (`tdpbsud`: int8 weights x the uint8 product): with f1 and f2 on AMX
    and two 16-row tiles of output channels or more (the last block overlaps the one before). Fewer (S1's
    stage 1, 24 channels: 32 rows computed for 24, hidden 96 padded to 128) measured slower than VNNI
    (benchmarks/RESULTS.md, issue 21 thread scaling and g on AMX)."""
    return amx and out_channels >= 32


def amx_g_weight(wg: np.ndarray) -> np.ndarray:
    """g's [CO, HID] int8 weight as its AMX A tiles read it: rows of HID zero-padded to a multiple of 64."""
    co, hid = wg.shape
    out = np.zeros((co, -(-hid // 64) * 64), np.int8)
    out[:, :hid] = wg
    return out


def qstar_primfunc(batch: int | None, channels: int, height: int, width: int, hidden: int, out_channels: int,
                   quant: dict[str, Any], family: tuple[int, str, str, int] = X86_VNNI,
                   amx: bool = False) -> Any:
    """The kernel for x [batch, C, H, W] float32, w1, w2 [HID, C] int8, m1, c1,
    m2, c2 [HID] float32 (f1's and f2's epilogues with their output QDQ folded, `fold`: s_out = s1, s2),
    wg [CO, HID] int8, mg, cg [CO] float32 (g's, s_out = 1) -> y [batch, CO, H, W] float32. C and HID
    multiples of 4, H * W >= 16."""
    from tvm import tirx
    from tvm.script import tirx as T

    lanes, instr, adt, shift = family
    C, HID, CO, NP = channels, hidden, out_channels, height * width
    if C % 4 or HID % 4 or NP < MIN_PIXELS:
        raise ValueError(f"qstar needs channels and hidden channels in multiples of 4 and >= {MIN_PIXELS} "
                         f"pixels, got C={C}, HID={HID}, {height}x{width}")
    C4, HQ = C // 4, HID // 4
    # phase 2: one pixel vector, OBA hidden channels of f1 and of f2 (2 * OBA accumulators)
    OBA = next(v for v in (12, 8, 4) if HID % v == 0 or v == 4)
    OBA = min(OBA, HID)
    VA = -(-NP // lanes)                             # pixel vectors (the last overlaps the one before)
    HBLK = -(-HID // OBA)
    # phase 3: as qconv's 1x1 kernel
    pv = max(1, min(4, NP // lanes))
    P = pv * lanes
    TB = -(-NP // P)
    OB = max(1, min(ACC_REGISTERS // pv, CO))
    OBLK = -(-CO // OB)
    XCH = -(-NP // 16)
    n_img = tirx.Var("n", "int64") if batch is None else batch
    s0, s1, s2, s3 = (float(np.float32(quant[k])) for k in ("s0", "s1", "s2", "s3"))
    z0, z1, z2, z3 = (int(quant[k]) for k in ("z0", "z1", "z2", "z3"))
    act1, act2 = quant.get("act1"), quant.get("act2")
    m3 = float(np.float32(np.float64(quant["s1"]) * quant["s2"] / quant["s3"]))
    s4 = None if quant.get("s4") is None else float(np.float32(quant["s4"]))
    z4 = int(quant.get("z4") or 0)
    vec8, vec32 = f"{adt}x{4 * lanes}", f"int32x{lanes}"
    # AMX, f1 / f2: C = A tiles of 16 hidden channels (weight rows) x B tiles of 16 pixels (x as packed
    # above, 4 channels per int32), K in chunks of KCH input channels (the largest multiple of 4 up to 64
    # that divides C: one tile shape, no padding)
    KCH = max(k for k in range(4, 65, 4) if C % k == 0)
    HB16, MT, NKC = HID // 16, -(-NP // 32), C // KCH
    # each task: HG of the HB16 blocks of 16 hidden channels (one tile configuration, and with one K chunk
    # x's B tiles, loaded for all of them), as many as leave 16 tasks or more (2 threads: balanced)
    HG = max(g for g in range(1, HB16 + 1) if HB16 % g == 0 and (MT * (HB16 // g) >= 16 or g == 1))
    HGN = HB16 // HG
    if amx and (family is not X86_VNNI or HID % 16 or NP < 32):
        raise ValueError(f"qstar on AMX needs x86, hidden channels in 16s and >= 32 pixels, got HID={HID}, "
                         f"{NP} pixels")
    # g on AMX: A tiles of 16 output channels x 64 hidden bytes (wg padded to KG), B tiles of 16 hidden
    # quads x 16 pixels read straight from the packed product (its padding quads zeroed); tasks of OT
    # output tiles x 2 pixel tiles (OT * 2 C tiles)
    GAMX = amx_g(amx, CO)
    KG = -(-HID // 64) * 64 if GAMX else HID
    HQP = KG // 4
    OT = 2
    GO, GM = -(-CO // (16 * OT)), -(-NP // 32)

    def tile(op, *args):
        return T.call_llvm_intrin("void", f"llvm.x86.{op}", *args)

    def cast(dtype, e):
        """T.Cast to `dtype`, with as many lanes as `e` has (the AMX epilogue computes 16 at once)."""
        ty = str(e.ty)
        return T.Cast(dtype + ty[ty.index("x"):] if "x" in ty else dtype, e)

    def qbyte(v, s, z):
        """v (float32) quantized as ONNX QuantizeLinear, less the stored shift, the low byte of an int32."""
        q = cast("int32", T.max(T.min(T.nearbyint(v / T.float32(s)) + T.float32(z), T.float32(255)),
                                T.float32(0)))
        return q if shift == 0 else (q - shift) & 255

    def hidden(acc, m, c, h, s, z, act):
        """One hidden channel of f1 / f2: its quantized output less the zero point (exact in float32), [act]
        (clipped in units of s). The two clips as one where their ranges overlap (the same values)."""
        lo, hi = float(-z), float(255 - z)
        if act is not None:
            lo_a = float(np.float32(act[0] / s))
            hi_a = float(np.float32(act[1] / s)) if np.isfinite(act[1]) else hi
            if max(lo, lo_a) <= min(hi, hi_a):
                lo, hi, act = max(lo, lo_a), min(hi, hi_a), None
        d = T.max(T.min(T.nearbyint(cast("float32", acc) * m[h] + c[h]), T.float32(hi)), T.float32(lo))
        if act is None:
            return d
        lo = T.max(d, T.float32(np.float32(act[0] / s)))
        return lo if not np.isfinite(act[1]) else T.min(lo, T.float32(np.float32(act[1] / s)))

    def product(d1, d2):
        """a * b quantized with g's input scale: (d1 * d2) * s1 * s2 / s3 + z3, rounded, saturated."""
        q = cast("int32", T.max(T.min(T.nearbyint(d1 * d2 * T.float32(m3) + T.float32(z3)), T.float32(255)),
                                T.float32(0)))
        return q if shift == 0 else (q - shift) & 255

    def prod(acc1, m1, c1, acc2, m2, c2, h, r, p):
        """Hidden channel h of one pixel (accumulator row r): a * b, quantized with g's input scale."""
        return product(hidden(acc1[r * lanes + p], m1, c1, h, s1, z1, act1),
                       hidden(acc2[r * lanes + p], m2, c2, h, s2, z2, act2))

    def tile_prod(cb, m1, c1, m2, c2, pt, r, h):
        """Hidden channel h (C tile row r) of 16 pixels (pixel tile pt): a * b, quantized (int32 lanes)."""
        return product(hidden(cb[T.ramp(pt * 256 + r * 16, 1, 16)], m1, c1, h, s1, z1, act1),
                       hidden(cb[T.ramp(512 + pt * 256 + r * 16, 1, 16)], m2, c2, h, s2, z2, act2))

    def out_qdq(v):
        """g's output through the graph's QuantizeLinear / DequantizeLinear after it, where fused (s4)."""
        if s4 is None:
            return v
        q = T.max(T.min(T.nearbyint(v / T.float32(s4)) + T.float32(z4), T.float32(255)), T.float32(0))
        return (q - T.float32(z4)) * T.float32(s4)

    def pack(b0, b1, b2, b3):
        return b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)

    def dot(acc, xv, wbuf, idx):
        return T.call_llvm_pure_intrin(vec32, instr, acc, T.reinterpret(vec8, xv), T.reinterpret(
            vec8, T.broadcast(T.reinterpret("int32", wbuf[T.ramp(idx, 1, 4)]), lanes)))

    @T.prim_func
    def qstar(x_h: T.handle, w1_h: T.handle, m1_h: T.handle, c1_h: T.handle, w2_h: T.handle, m2_h: T.handle,
              c2_h: T.handle, wg_h: T.handle, mg_h: T.handle, cg_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        x = T.match_buffer(x_h, (n_img, C, height, width), "float32")
        w1 = T.match_buffer(w1_h, (HID, C), "int8")
        m1 = T.match_buffer(m1_h, (HID,), "float32")
        c1 = T.match_buffer(c1_h, (HID,), "float32")
        w2 = T.match_buffer(w2_h, (HID, C), "int8")
        m2 = T.match_buffer(m2_h, (HID,), "float32")
        c2 = T.match_buffer(c2_h, (HID,), "float32")
        wg = T.match_buffer(wg_h, (CO, KG), "int8")
        mg = T.match_buffer(mg_h, (CO,), "float32")
        cg = T.match_buffer(cg_h, (CO,), "float32")
        y = T.match_buffer(y_h, (n_img, CO, height, width), "float32")
        xf = T.decl_buffer((n_img * C * NP,), "float32", data=x.data)
        yf = T.decl_buffer((n_img * CO * NP,), "float32", data=y.data)
        w1f = T.decl_buffer((HID * C,), "int8", data=w1.data)
        w2f = T.decl_buffer((HID * C,), "int8", data=w2.data)
        wgf = T.decl_buffer((CO * KG,), "int8", data=wg.data)
        xs = T.decl_buffer((C4 * NP,), "int32")
        hs = T.decl_buffer((HQP * NP,), "int32")
        # the AMX tile configurations, loaded by each task: f1 / f2 (bytes 0-63: C tiles 0-3 of 16 x 64
        # bytes, A tiles 4-5 of 16 x KCH, B tiles 6-7 of KCH/4 x 64) and g (64-127: eight 16 x 64 tiles)
        cfg = T.decl_buffer((128,), "uint8")
        if amx:
            for i in range(128):
                cfg[i] = T.uint8(0)
            cfg[0] = T.uint8(1)
            cfg[64] = T.uint8(1)
            for t in range(8):
                cfg[16 + t * 2] = T.uint8(T.if_then_else(t == 4 or t == 5, KCH, 64))
                cfg[48 + t] = T.uint8(T.if_then_else(t >= 6, KCH // 4, 16))
                cfg[80 + t * 2] = T.uint8(64)
                cfg[112 + t] = T.uint8(16)
        for img in range(n_img):
            with T.attr(0, "pragma_parallel_launch_point", 0):
                # a barrier after phases 1 and 2: each reads what every task of the one before wrote
                # (`barrier_when_finish` ends only the statement it wraps)
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    # (1) x quantized, 4 channels of a pixel per int32 (the last chunk overlaps); with g on
                    # AMX, the product's padding quads zeroed (their weights are zero)
                    if HQP > HQ:
                        for task in T.parallel(XCH):
                            p0: T.let = T.min(task * 16, NP - 16)
                            for j in range(HQP - HQ):
                                for e in T.vectorized(16):
                                    hs[(HQ + j) * NP + p0 + e] = 0
                    for task in T.parallel(C4 * XCH):
                      c4: T.let = task // XCH
                      p0: T.let = T.min(task % XCH * 16, NP - 16)
                      for e in T.vectorized(16):
                          xs[c4 * NP + p0 + e] = pack(
                              qbyte(xf[(img * C + c4 * 4) * NP + p0 + e], s0, z0),
                              qbyte(xf[(img * C + c4 * 4 + 1) * NP + p0 + e], s0, z0),
                              qbyte(xf[(img * C + c4 * 4 + 2) * NP + p0 + e], s0, z0),
                              qbyte(xf[(img * C + c4 * 4 + 3) * NP + p0 + e], s0, z0))
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    # (2) f1, f2, their QDQ, [act], the product and its quantization, packed.
                    # AMX: tasks of 16 hidden channels (one A tile of f1, one of f2) x 32 pixels (two B
                    # tiles), four C tiles (rows: hidden channels); the tiles stored, then the epilogue
                    # 16 pixels at a time, 4 hidden channels packed per int32 and stored as one vector
                    if amx:
                        for task in T.parallel(MT * HGN):
                          m0: T.let = T.min(task // HGN * 32, NP - 32)
                          cb = T.decl_buffer((1024,), "int32", scope="local")
                          T.evaluate(tile("ldtilecfg", T.address_of(cfg[0])))
                          if NKC == 1:            # x's two B tiles, loaded once for every hidden block
                              for pt in T.unroll(2):
                                  T.evaluate(tile("tileloadd64", T.uint8(6 + pt),
                                                  T.address_of(xs[m0 + pt * 16]), T.int64(NP * 4)))
                          for hbi in range(HG):
                              hb: T.let = task % HGN * HG + hbi
                              for ct in T.unroll(4):
                                  T.evaluate(tile("tilezero", T.uint8(ct)))
                              for kc in range(NKC):
                                  T.evaluate(tile("tileloadd64", T.uint8(4),
                                                  T.address_of(w1f[hb * 16 * C + kc * KCH]), T.int64(C)))
                                  T.evaluate(tile("tileloadd64", T.uint8(5),
                                                  T.address_of(w2f[hb * 16 * C + kc * KCH]), T.int64(C)))
                                  if NKC > 1:
                                      for pt in T.unroll(2):
                                          T.evaluate(tile("tileloadd64", T.uint8(6 + pt), T.address_of(
                                              xs[kc * (KCH // 4) * NP + m0 + pt * 16]), T.int64(NP * 4)))
                                  for ft in T.unroll(2):
                                      for pt in T.unroll(2):
                                          T.evaluate(tile("tdpbsud", T.uint8(ft * 2 + pt), T.uint8(4 + ft),
                                                          T.uint8(6 + pt)))
                              for ct in T.unroll(4):
                                  T.evaluate(tile("tilestored64", T.uint8(ct), T.address_of(cb[ct * 256]),
                                                  T.int64(64)))
                              for pt in range(2):
                                  for rq in range(4):
                                      hs[T.ramp((hb * 4 + rq) * NP + m0 + pt * 16, 1, 16)] = pack(
                                          tile_prod(cb, m1, c1, m2, c2, pt, rq * 4, hb * 16 + rq * 4),
                                          tile_prod(cb, m1, c1, m2, c2, pt, rq * 4 + 1, hb * 16 + rq * 4 + 1),
                                          tile_prod(cb, m1, c1, m2, c2, pt, rq * 4 + 2, hb * 16 + rq * 4 + 2),
                                          tile_prod(cb, m1, c1, m2, c2, pt, rq * 4 + 3, hb * 16 + rq * 4 + 3))
                          T.evaluate(tile("tilerelease"))
                    if not amx:
                        for task in T.parallel(VA * HBLK):
                          q0: T.let = T.min(task // HBLK * lanes, NP - lanes)
                          h0: T.let = T.min(task % HBLK * OBA, HID - OBA)
                          acc1 = T.decl_buffer((OBA * lanes,), "int32", scope="local")
                          acc2 = T.decl_buffer((OBA * lanes,), "int32", scope="local")
                          for i in T.unroll(OBA):
                              acc1[T.ramp(i * lanes, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                              acc2[T.ramp(i * lanes, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                          for c4 in range(C4):
                              xv: T.let = xs[T.ramp(c4 * NP + q0, 1, lanes)]
                              for r in T.unroll(OBA):
                                  acc1[T.ramp(r * lanes, 1, lanes)] = dot(
                                      acc1[T.ramp(r * lanes, 1, lanes)], xv, w1f, (h0 + r) * C + c4 * 4)
                                  acc2[T.ramp(r * lanes, 1, lanes)] = dot(
                                      acc2[T.ramp(r * lanes, 1, lanes)], xv, w2f, (h0 + r) * C + c4 * 4)
                          for rq in T.unroll(OBA // 4):
                              for p in T.vectorized(lanes):
                                  hs[(h0 // 4 + rq) * NP + q0 + p] = pack(
                                      prod(acc1, m1, c1, acc2, m2, c2, h0 + rq * 4, rq * 4,
                                     p),
                                      prod(acc1, m1, c1, acc2, m2, c2, h0 + rq * 4 + 1,
                                           rq * 4 + 1, p),
                                      prod(acc1, m1, c1, acc2, m2, c2, h0 + rq * 4 + 2,
                                           rq * 4 + 2, p),
                                      prod(acc1, m1, c1, acc2, m2, c2, h0 + rq * 4 + 3,
                                           rq * 4 + 3, p))
                # (3) g on the packed product
                if not GAMX:
                  for task in T.parallel(TB * OBLK):
                      q0: T.let = T.min(task // OBLK * P, NP - P)
                      o0: T.let = T.min(task % OBLK * OB, CO - OB)
                      acc = T.decl_buffer((OB * P,), "int32", scope="local")
                      for i in T.unroll(OB * pv):
                          acc[T.ramp(i * lanes, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                      for hq in range(HQ):
                          for v in T.unroll(pv):
                              hv: T.let = hs[T.ramp(hq * NP + q0 + v * lanes, 1, lanes)]
                              for r in T.unroll(OB):
                                  acc[T.ramp((r * pv + v) * lanes, 1, lanes)] = dot(
                                      acc[T.ramp((r * pv + v) * lanes, 1, lanes)], hv, wgf,
                                      (o0 + r) * HID + hq * 4)
                      for r in T.unroll(OB):
                          for p in T.vectorized(P):
                              yf[(img * CO + o0 + r) * NP + q0 + p] = out_qdq(T.Cast(
                                  "float32", acc[r * P + p]) * mg[o0 + r] + cg[o0 + r])
                if GAMX:
                  for task in T.parallel(GM * GO):
                    p0: T.let = T.min(task // GO * 32, NP - 32)
                    o0: T.let = T.min(task % GO * 16 * OT, CO - 16 * OT)
                    cb = T.decl_buffer((1024,), "int32", scope="local")
                    T.evaluate(tile("ldtilecfg", T.address_of(cfg[64])))
                    for ct in T.unroll(OT * 2):
                        T.evaluate(tile("tilezero", T.uint8(ct)))
                    for kc in range(KG // 64):
                        for ot in T.unroll(OT):
                            T.evaluate(tile("tileloadd64", T.uint8(4 + ot),
                                            T.address_of(wgf[(o0 + ot * 16) * KG + kc * 64]), T.int64(KG)))
                        for pt in T.unroll(2):
                            T.evaluate(tile("tileloadd64", T.uint8(6 + pt),
                                            T.address_of(hs[kc * 16 * NP + p0 + pt * 16]), T.int64(NP * 4)))
                        for ot in T.unroll(OT):
                            for pt in T.unroll(2):
                                T.evaluate(tile("tdpbsud", T.uint8(ot * 2 + pt), T.uint8(4 + ot),
                                                T.uint8(6 + pt)))
                    for ct in T.unroll(OT * 2):
                        T.evaluate(tile("tilestored64", T.uint8(ct), T.address_of(cb[ct * 256]), T.int64(64)))
                    T.evaluate(tile("tilerelease"))
                    for ot in range(OT):
                        for pt in range(2):
                            for r in range(16):
                                for e in T.vectorized(16):
                                    yf[(img * CO + o0 + ot * 16 + r) * NP + p0 + pt * 16 + e] = out_qdq(
                                        T.Cast("float32", cb[(ot * 2 + pt) * 256 + r * 16 + e])
                                        * mg[o0 + ot * 16 + r] + cg[o0 + ot * 16 + r])


    return qstar
