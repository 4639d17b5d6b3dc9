"""int8 arithmetic on TVM (issue 21): the QDQ graphs `ef.quantize` writes, compiled with edgeflex's int8
kernels (`kernels/tir/qconv.py`: uint8 x int8 -> int32 with AVX512-VNNI `vpdpbusd`, aarch64 `sdot`), run
on TVM against ONNX Runtime's int8 and the fp32 model; int8 on TVM is refused where the CPU or the engine
lacks the instruction.

Tolerances: against ONNX Runtime's int8 run of the same graph, 2 % of the largest |output| (both compute
the same integer sums; they differ only where a value sits on a rounding tie or a float32 product rounds
the other way before QuantizeLinear); against the fp32 model, test_quantize's INT8_TOL.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dress_mlp_int8

import edgeflex as ef
from edgeflex.devices.precision import tvm_int8_refusal
from edgeflex.errors import DeviceError

sys.path.insert(0, str(Path(__file__).parent))
from test_quantize import INT8_TOL, _export_quantized, _images, _probe, _rel, _torch  # noqa: E402

pytest.importorskip("tvm")
VS_ORT = 0.02
needs_int8 = pytest.mark.skipif(tvm_int8_refusal() is not None,
                                reason=f"{tvm_int8_refusal()}: TVM int8 is refused on this machine")


def _compile_int8(path: Path, configs: list[str], **kw) -> dict:
    from edgeflex.compile.tvm import compile_bundle

    return compile_bundle(path, "host", configs=configs, batch1=False, **kw)


def _ort_vs_tvm(path: Path, config: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ort = ef.Runtime(path, threads=1, only=[config])
    tvm = ef.Runtime(path, backend="tvm", threads=1, only=[config])
    assert tvm.backend == "tvm" and tvm.config == config
    return ort.run(x), tvm.run(x)


@pytest.fixture(scope="module")
def starnet_int8(tmp_path_factory):
    """edgeflex's StarNet s050 (32x32, 10 classes), quantised to int8 and compiled for this host."""
    from edgeflex.models.starnet import starnet

    torch.manual_seed(0)
    model = starnet("s050", num_classes=10).eval()
    path = _export_quantized(model, tmp_path_factory.mktemp("tq"), precisions=("int8",))
    report = _compile_int8(path, ["default@int8"]) if tvm_int8_refusal() is None else None
    return model, path, report


@needs_int8
def test_edgeflex_starnet_int8_runs_on_tvm_with_int8_kernels_and_matches_ort_and_pytorch(starnet_int8):
    model, path, report = starnet_int8
    (engine,) = report["engines"]
    assert "qconv" in engine["kernels"]
    fns = engine["kernel_functions"]
    # the 1x1 convs, the 3x3 stride-2 down-sampling convs and the head's linear layer all became int8
    assert any(f.startswith("qconv_x86") and "_k1x1_" in f for f in fns)
    assert any(f.startswith("qconv_x86") and "_k3x3_s2" in f for f in fns)
    assert any(f.startswith("qlinear_x86") for f in fns)
    # the star blocks (f1, f2, the multiply, g) of planes of 16 pixels and more are one fused kernel each
    assert sum(f.startswith(("qstar_x86", "qstar_amx")) for f in fns) >= 2
    x = _probe()
    ort, tvm = _ort_vs_tvm(path, "default@int8", x)
    assert _rel(tvm, ort) < VS_ORT
    assert _rel(tvm, _torch(model, x)) < INT8_TOL


@needs_int8
def test_the_int8_engine_at_two_threads_gives_the_one_thread_outputs(starnet_int8):
    """The compiled int8 engine run by the runtime at 2 threads gives the 1-thread outputs: at least 90 % of
    the logits bit for bit, the rest within 10 % of the largest |logit| (the missing barriers this guards
    against changed 646 of 1000 StarNet-S1 logits and nearly every value of the stem conv).

    Why not every logit exactly: one CI run (a fresh 2-core Xeon VM) saw 1 of these 30 logits differ by 5
    output steps in one of five 2-thread runs; over 40,000 runs here (under load, pinned to one core, with
    malloc perturbed, inside the whole suite) never did, so the cause is unknown. The kernels themselves
    are held to bit-exact 2-thread outputs in `test_the_int8_kernels_give_the_same_bytes_at_two_threads_
    as_at_one`."""
    _, path, _ = starnet_int8
    x = _probe()
    two = ef.Runtime(path, backend="tvm", threads=2, only=["default@int8"])
    y2 = [two.run(x) for _ in range(5)]
    one = ef.Runtime(path, backend="tvm", threads=1, only=["default@int8"])   # the pool back at 1 thread
    y1 = one.run(x)
    for y in y2:
        assert y.shape == y1.shape
        same = float(np.mean(y == y1))
        assert same >= 0.9, f"only {same:.0%} of the 2-thread logits equal the 1-thread ones"
        assert _rel(y, y1) <= 0.1


def _vnni_host() -> bool:
    """This host's TVM target has AVX512-VNNI (the int8 depthwise kernel is x86 only)."""
    import tvm

    from edgeflex.compile.tvm import host_target
    from edgeflex.kernels.tir.qconv import X86_VNNI, qdot_instruction

    return qdot_instruction(tvm.target.Target(host_target(1))) is X86_VNNI and tvm_int8_refusal() is None


@needs_int8
def test_the_compiled_library_computes_with_vpdpbusd(starnet_int8):
    """The rewrite produced int8 arithmetic: the library's machine code has the VNNI dot product."""
    _, path, report = starnet_int8
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) not installed: cannot disassemble the library")
    (engine,) = report["engines"]
    with ef.Bundle.open(path) as b:
        so = path.parent / "lib.so"
        so.write_bytes(b.read(engine["library"]))
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True,
                         text=True, check=True).stdout
    assert asm.count("vpdpbusd") >= 8


def test_the_int8_rewrite_needs_the_instruction_and_uses_sdot_on_the_boards() -> None:
    """Which targets get the int8 kernels: VNNI x86 and dotprod aarch64 (the catalogue's rpi5 Cortex-A76,
    compiled here only: its code has `sdot`), not an x86 without AVX512-VNNI nor an aarch64 without
    dotprod (those are refused at run time instead)."""
    import tvm

    from edgeflex.compile.tvm import resolve_target
    from edgeflex.kernels.tir.qconv import qconv_primfunc, qdot_instruction

    def target(**t):
        return tvm.target.Target({"kind": "llvm", **t})

    vnni = qdot_instruction(target(mtriple="x86_64-linux-gnu", mcpu="sapphirerapids"))
    assert vnni is not None and vnni[1].endswith("vpdpbusd.512")
    assert qdot_instruction(target(mtriple="x86_64-linux-gnu", mcpu="znver3")) is None
    assert qdot_instruction(target(mtriple="x86_64-linux-gnu", mcpu="skylake")) is None
    assert qdot_instruction(target(mtriple="aarch64-linux-gnu", mcpu="cortex-a53")) is None
    rpi5 = tvm.target.Target(resolve_target("rpi5").target)
    family = qdot_instruction(rpi5)
    assert family is not None and "sdot" in family[1]
    lib = tvm.compile(tvm.IRModule({"main": qconv_primfunc(1, 24, 8, 8, 32, (1, 1), (1, 1), (0, 0, 0, 0),
                                                           0.02, 131, family)}), target=rpi5)
    assert "sdot" in lib.mod.inspect_source("asm")
    # a stem conv (rows of 16 positions and more: the vectorized quantize-and-lay-out) on the board too
    lib = tvm.compile(tvm.IRModule({"main": qconv_primfunc(1, 8, 32, 32, 16, (3, 3), (2, 2), (1, 1, 1, 1),
                                                           0.02, 131, family)}), target=rpi5)
    assert "sdot" in lib.mod.inspect_source("asm")
    from edgeflex.kernels.tir.qstar import qstar_primfunc

    quant = {"s0": 0.02, "z0": 131, "s1": 0.05, "z1": 0, "s2": 0.04, "z2": 120, "s3": 0.1, "z3": 3}
    lib = tvm.compile(tvm.IRModule({"main": qstar_primfunc(1, 16, 6, 6, 64, 16, quant, family)}), target=rpi5)
    assert lib.mod.inspect_source("asm").count("sdot") >= 3


@pytest.mark.parametrize("shape", [(32, 8, 8, 48, 1, 1, 0), (13, 9, 11, 17, 3, 2, 1),
                                   (16, 7, 7, 40, 1, 1, 0),
                                   # rows of 16 positions and more: quantized and laid out in one pass
                                   (12, 22, 36, 20, 3, 2, 1), (6, 18, 17, 12, 3, 1, 1)])
def test_the_int8_kernel_matches_its_integer_reference(shape) -> None:
    """The kernel alone, on this host's target, against numpy: the zero-point-corrected integer conv."""
    import tvm

    from edgeflex.compile.tvm import host_target
    from edgeflex.kernels.tir.qconv import qconv_primfunc, qconv_reference, qdot_instruction

    tgt = tvm.target.Target(host_target(1))
    family = qdot_instruction(tgt)
    if family is None or tvm_int8_refusal() is not None:
        pytest.skip("this CPU has no VNNI / dotprod: the int8 kernel cannot run here")
    c, h, w, co, k, stride, pad = shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wq = rng.integers(-127, 128, (co, c, k, k)).astype(np.int8)
    ws = rng.uniform(1e-3, 1e-2, co).astype(np.float32)
    bias = rng.standard_normal(co).astype(np.float32)
    c4 = -(-c // 4)
    packed = np.zeros((co, k, k, c4 * 4), np.int8)
    packed[..., :c] = wq.transpose(0, 2, 3, 1)
    ref = qconv_reference(x, wq, ws, 0.02, 131, bias, stride, (pad,) * 4)
    lib = tvm.compile(tvm.IRModule({"main": qconv_primfunc(1, c, h, w, co, (k, k), (stride, stride),
                                                           (pad,) * 4, 0.02, 131, family)}), target=tgt)
    y = tvm.runtime.empty(ref.shape, "float32")
    args = [packed.reshape(co, -1), (ws * np.float32(0.02)).astype(np.float32),
            wq.astype(np.int32).reshape(co, -1).sum(1).astype(np.int32), bias]
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, *args)], y)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _star_case(shape, act, rng):
    """Random int8 weights, scales and biases of a star block; its reference output and the kernel's
    arguments (weights laid out for AMX when `amx`)."""
    from edgeflex.kernels.tir.qstar import fold, qstar_reference

    c, h, w, hid, co = shape
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    w1, w2 = (rng.integers(-127, 128, (hid, c)).astype(np.int8) for _ in range(2))
    wg = rng.integers(-127, 128, (co, hid)).astype(np.int8)
    ws1, ws2 = (rng.uniform(2e-5, 6e-5, hid).astype(np.float32) for _ in range(2))
    wsg = rng.uniform(1e-4, 4e-4, co).astype(np.float32)
    b1, b2 = (rng.standard_normal(hid).astype(np.float32) for _ in range(2))
    bg = rng.standard_normal(co).astype(np.float32)
    # calibrated-looking scales (not round numbers, whose products would put many values on exact ties)
    quant = {"s0": 0.0307, "z0": 120, "s1": 0.0213, "z1": 0 if act else 97, "s2": 0.0291, "z2": 131,
             "s3": 0.0197, "z3": 7, "act1": act}
    if act is None:                     # g's output through the graph's QDQ after it, in the kernel
        quant.update(s4=0.0731, z4=125)
    ref = qstar_reference(x, w1, ws1, b1, w2, ws2, b2, wg, wsg, bg, quant)

    def rowsum(a):
        return a.astype(np.int32).sum(1).astype(np.int32)

    def args(amx_layout, g_layout=lambda a: a):
        z0 = quant["z0"]
        return [x, amx_layout(w1), *fold(ws1, b1, rowsum(w1), z0, quant["s1"]), amx_layout(w2),
                *fold(ws2, b2, rowsum(w2), z0, quant["s2"]), g_layout(wg),
                *fold(wsg, bg, rowsum(wg), quant["z3"], 1.0)]

    return quant, ref, args


def _run_star(shape, quant, args, tgt, family, amx=False):
    import tvm

    from edgeflex.kernels.tir.qstar import qstar_primfunc

    c, h, w, hid, co = shape
    lib = tvm.compile(tvm.IRModule({"main": qstar_primfunc(1, c, h, w, hid, co, quant, family, amx=amx)}),
                      target=tgt)
    y = tvm.runtime.empty((1, co, h, w), "float32")
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


def _close_to_reference(y, ref) -> None:
    # the same integer sums; the requantizations' float32 steps as numpy's, but a fused multiply-add may
    # move a value across a rounding tie (one quantization step of one hidden channel: well under 1 %)
    d = np.abs(y - ref)
    assert d.max() < 0.01 * np.abs(ref).max()
    assert np.mean(d <= 1e-5 * np.abs(ref).max()) > 0.97


@pytest.mark.parametrize("shape,act", [((16, 6, 6, 64, 16), None), ((24, 5, 7, 96, 20), (0.0, 6.0)),
                                       ((8, 4, 4, 32, 8), (0.0, float("inf")))])
def test_the_fused_int8_star_kernel_matches_its_integer_reference(shape, act) -> None:
    """The star block's kernel alone (f1, f2, their QDQ, act, the product re-quantized, g) against numpy's
    integer arithmetic, zero points non-zero, on this host's target (VNNI)."""
    import tvm

    from edgeflex.compile.tvm import host_target
    from edgeflex.kernels.tir.qconv import qdot_instruction

    tgt = tvm.target.Target(host_target(1))
    family = qdot_instruction(tgt)
    if family is None or tvm_int8_refusal() is not None:
        pytest.skip("this CPU has no VNNI / dotprod: the int8 kernel cannot run here")
    quant, ref, args = _star_case(shape, act, np.random.default_rng(2))
    _close_to_reference(_run_star(shape, quant, args(lambda a: a), tgt, family), ref)


@pytest.mark.parametrize("shape", [(24, 8, 8, 96, 24), (96, 7, 7, 384, 96), (48, 6, 9, 192, 40),
                                   (16, 6, 6, 96, 36), (16, 6, 6, 64, 12)])
def test_the_star_kernels_amx_phase_matches_the_reference_and_is_refused_without_amx(shape) -> None:
    """f1 and f2 on AMX tiles (tdpbusd; 64-channel rows, zero-padded where C < 64; the last 32-pixel tile
    overlapping the one before), and g too where it has 32 output channels or more (tdpbsud; hidden rows
    zero-padded to 64s: 96 -> 128; output blocks of 32, the last overlapping; CO 24 and 12: g on VNNI),
    where this CPU has amx_int8 and Linux grants the tile state; a target without amx-int8 is not given
    the AMX kernel."""
    import tvm

    from edgeflex.compile.tvm import host_target
    from edgeflex.devices.precision import cpu_flags
    from edgeflex.kernels.tir.qconv import X86_VNNI
    from edgeflex.kernels.tir.qstar import (
        amx_g,
        amx_g_weight,
        amx_usable,
        qstar_primfunc,
        request_amx,
    )

    icelake = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "icelake-server"})
    assert not amx_usable(icelake, 96, 384, 196)
    # without AMX the whole block (g included) compiles to VNNI, no tile instruction
    quant = {"s0": 0.02, "z0": 131, "s1": 0.05, "z1": 0, "s2": 0.04, "z2": 120, "s3": 0.1, "z3": 3}
    asm = tvm.compile(tvm.IRModule({"main": qstar_primfunc(1, 96, 7, 7, 384, 96, quant, X86_VNNI,
                                                           amx=amx_usable(icelake, 96, 384, 49))}),
                      target=icelake).mod.inspect_source("asm")
    assert "vpdpbusd" in asm and "tdpb" not in asm and "ldtilecfg" not in asm
    tgt = tvm.target.Target(host_target(1))
    if "amx_int8" not in cpu_flags() or not amx_usable(tgt, *shape[:1], shape[3], shape[1] * shape[2]):
        pytest.skip("this CPU (or its LLVM target) has no AMX-INT8")
    why = request_amx()
    if why is not None:
        pytest.skip(why)
    quant, ref, args = _star_case(shape, (0.0, 6.0), np.random.default_rng(3))
    g_layout = amx_g_weight if amx_g(True, shape[4]) else (lambda a: a)
    _close_to_reference(_run_star(shape, quant, args(lambda a: a, g_layout), tgt, X86_VNNI, amx=True), ref)


class _threads:
    """TVM's thread pool at `n` threads inside the block, 1 after (the pool is one per process)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        from edgeflex.runtime.backends.tvm import _configure_threads

        _configure_threads(self.n)

    def __exit__(self, *exc):
        from edgeflex.runtime.backends.tvm import _configure_threads

        _configure_threads(1)


def test_the_int8_kernels_give_the_same_bytes_at_two_threads_as_at_one() -> None:
    """Every pass of a multi-pass kernel (the conv's quantize, its lay-out and its dot products; the star
    block's quantize, f1 / f2 and g) reads what all tasks of the pass before wrote: a barrier between them.
    At 2 threads the outputs equal the 1-thread run's, bit for bit, on 20 repeated calls (without the
    barriers the 2-thread stem conv differed in almost every output)."""
    import tvm

    from edgeflex.compile.tvm import host_target
    from edgeflex.kernels.tir.qconv import qconv_primfunc, qdot_instruction
    from edgeflex.kernels.tir.qstar import amx_g_weight, amx_usable, qstar_primfunc, request_amx

    tgt = tvm.target.Target(host_target(2))
    family = qdot_instruction(tgt)
    if family is None or tvm_int8_refusal() is not None:
        pytest.skip("this CPU has no VNNI / dotprod: the int8 kernel cannot run here")
    rng = np.random.default_rng(5)
    cases = []
    for c, h, co, k, stride, pad in ((3, 96, 16, 3, 2, 1), (13, 40, 24, 3, 2, 1)):   # fused / plain lay-out
        x = rng.standard_normal((1, c, h, h)).astype(np.float32)
        c4, oh = -(-c // 4), (h + 2 * pad - k) // stride + 1
        w = rng.integers(-127, 128, (co, k * k * c4 * 4)).astype(np.int8)
        args = [x, w, rng.uniform(1e-4, 1e-3, co).astype(np.float32),
                w.astype(np.int32).sum(1).astype(np.int32), rng.standard_normal(co).astype(np.float32)]
        cases.append((qconv_primfunc(1, c, h, h, co, (k, k), (stride, stride), (pad,) * 4, 0.02, 131,
                                     family), args, (1, co, oh, oh)))
    amx = amx_usable(tgt, 24, 96, 28 * 28) and request_amx() is None
    for use_amx in (False, True) if amx else (False,):
        shape = (24, 28, 28, 96, 48)            # on AMX: f1, f2 and g
        quant, _, star_args = _star_case(shape, (0.0, 6.0), np.random.default_rng(6))
        cases.append((qstar_primfunc(1, *shape, quant, family, amx=use_amx),
                      star_args(lambda a: a, *((amx_g_weight,) if use_amx else ())),
                      (1, 48, 28, 28)))
    for func, args, out_shape in cases:
        lib = tvm.compile(tvm.IRModule({"main": func}), target=tgt)
        ins = [tvm.runtime.tensor(a) for a in args]
        y = tvm.runtime.empty(out_shape, "float32")
        lib["main"](*ins, y)
        one = y.numpy()
        with _threads(2):
            for _ in range(20):
                lib["main"](*ins, y)
                np.testing.assert_array_equal(y.numpy(), one)


@pytest.mark.parametrize("shape,fused", [((24, 20, 20, 7, 3), False), ((24, 20, 20, 7, 3), True),
                                         ((96, 14, 14, 7, 3), True), ((16, 7, 7, 7, 3), False),
                                         ((5, 9, 23, 7, 3), True), ((6, 12, 19, 5, 1), True),
                                         ((8, 6, 40, 3, 0), False)])
def test_the_int8_depthwise_kernel_matches_its_reference(shape, fused) -> None:
    """The int8 depthwise kernel alone (vpdpbusd on quads of 4 taps; rows of 1, 2 and 3 vectors; 7x7, 5x5
    and 3x3 kernels, padded and not) against numpy's integer conv: the input on its quantization grid
    (a DequantizeLinear's output, as in the graph), non-zero zero points; `fused`: the output QDQ, a
    residual add and the sum's QDQ in the epilogue."""
    import tvm

    from edgeflex.compile.tvm import host_target
    from edgeflex.kernels.tir.qdwconv import qdwconv_primfunc, qdwconv_reference, weight_quads

    if not _vnni_host():
        pytest.skip("this CPU has no AVX512-VNNI: the int8 depthwise kernel cannot run here")
    c, h, w, k, pad = shape
    rng = np.random.default_rng(4)
    quant = {"s": 0.0307, "z": 120}
    x = ((rng.integers(0, 256, (1, c, h, w)) - 120).astype(np.float32) * np.float32(0.0307))
    wq = rng.integers(-127, 128, (c, 1, k, k)).astype(np.int8)
    wsc = rng.uniform(1e-4, 4e-4, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    r = rng.standard_normal((1, c, oh, ow)).astype(np.float32) if fused else None
    if fused:
        quant.update(s_o=0.0213, z_o=97, s_a=0.0291, z_a=131)
    ref = qdwconv_reference(x, wq, wsc, bias, (pad,) * 4, quant, r)
    lib = tvm.compile(tvm.IRModule({"main": qdwconv_primfunc(1, c, h, w, (k, k), (pad,) * 4, quant,
                                                             residual=fused)}),
                      target=tvm.target.Target(host_target(1)))
    y = tvm.runtime.empty(ref.shape, "float32")
    args = [x, weight_quads(wq), (wsc * np.float32(0.0307)).astype(np.float32),
            wq.astype(np.int32).reshape(c, -1).sum(1).astype(np.int32), bias,
            r if fused else np.zeros(1, np.float32)]
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    _close_to_reference(y.numpy(), ref)


def test_the_int8_depthwise_kernel_compiles_for_vnni_without_vbmi_and_not_for_the_boards() -> None:
    """A VNNI x86 without VBMI (Cascade Lake) gets the same kernel (its quad shuffle lowered without
    vpermb) and it computes the same here; an aarch64 target (sdot) keeps its depthwise convs in float32
    (the rewrite adds the int8 depthwise match for x86 VNNI only)."""
    import tvm

    from edgeflex.compile.tvm import resolve_target
    from edgeflex.kernels.tir.qconv import X86_VNNI, qdot_instruction
    from edgeflex.kernels.tir.qdwconv import qdwconv_primfunc

    assert qdot_instruction(tvm.target.Target(resolve_target("rpi5").target)) is not X86_VNNI
    clx = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"})
    assert qdot_instruction(clx) is X86_VNNI
    lib = tvm.compile(tvm.IRModule({"main": qdwconv_primfunc(1, 8, 9, 9, (7, 7), (3,) * 4,
                                                             {"s": 0.05, "z": 7})}), target=clx)
    asm = lib.mod.inspect_source("asm")
    assert "vpdpbusd" in asm and "vpermb" not in asm
    if not _vnni_host():
        return
    rng = np.random.default_rng(5)
    x = ((rng.integers(0, 256, (1, 8, 9, 9)) - 7).astype(np.float32) * np.float32(0.05))
    wq = rng.integers(-127, 128, (8, 1, 7, 7)).astype(np.int8)
    from edgeflex.kernels.tir.qdwconv import qdwconv_reference, weight_quads

    ref = qdwconv_reference(x, wq, np.full(8, 1e-3, np.float32), None, (3,) * 4, {"s": 0.05, "z": 7})
    y = tvm.runtime.empty(ref.shape, "float32")
    lib["main"](*[tvm.runtime.tensor(a) for a in (
        x, weight_quads(wq), np.full(8, np.float32(1e-3) * np.float32(0.05), np.float32),
        wq.astype(np.int32).reshape(8, -1).sum(1).astype(np.int32), np.zeros(8, np.float32),
        np.zeros(1, np.float32))], y)
    _close_to_reference(y.numpy(), ref)


class _DepthwiseResidual(torch.nn.Module):
    """A stem conv, then StarNet's depthwise pattern without the star: y = x + dw1(x), z = dw2(y) + bias;
    the output is z at every 4th pixel, flattened (an error in the convs is not washed out by later
    layers; a 2-d output, as `quantize` measures it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, 2, 1)
        self.dw1 = torch.nn.Conv2d(16, 16, 7, 1, 3, groups=16)
        self.dw2 = torch.nn.Conv2d(16, 16, 7, 1, 3, groups=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.dw2(x + self.dw1(x))[:, :, ::4, ::4].flatten(1)


@needs_int8
def test_int8_depthwise_convs_on_tvm_match_ort_on_the_qdq_graph(tmp_path) -> None:
    """The QDQ graph of two depthwise convs (one with its output QDQ, the residual add and the sum's QDQ
    fused, one reading the sum's dequantized values) on TVM's int8 kernel against ONNX Runtime's int8 run
    of the same graph, at the tolerance of the whole-model tests, and the kernels are the int8 ones."""
    if not _vnni_host():
        pytest.skip("this CPU has no AVX512-VNNI: depthwise convs stay float32 here")
    torch.manual_seed(2)
    model = _DepthwiseResidual().eval()
    path = _export_quantized(model, tmp_path, precisions=("int8",))
    fns = _compile_int8(path, ["default@int8"])["engines"][0]["kernel_functions"]
    assert sum(f.startswith("qdwconv_x86_16x16x16_k7x7") for f in fns) == 2
    assert not any(f.startswith("dwconv_") for f in fns)
    x = _probe()
    ort, tvm = _ort_vs_tvm(path, "default@int8", x)
    assert _rel(tvm, ort) < VS_ORT
    assert _rel(tvm, _torch(model, x)) < INT8_TOL


@needs_int8
def test_the_authors_starnet_int8_on_tvm_matches_ort_and_their_pytorch(tmp_path) -> None:
    from authors_starnet import StarNet as AuthorsStarNet

    torch.manual_seed(1)
    model = AuthorsStarNet(16, [1, 1, 2, 1], 3, num_classes=10).eval()
    path = _export_quantized(model, tmp_path, precisions=("int8",))
    report = _compile_int8(path, ["default@int8"])
    assert "qconv" in report["engines"][0]["kernels"]
    fns = report["engines"][0]["kernel_functions"]
    assert any(f.startswith(("qstar_x86", "qstar_amx")) for f in fns)
    if _vnni_host():
        assert any(f.startswith("qdwconv_x86_") and "_res_" in f for f in fns)
    x = _probe()
    ort, tvm = _ort_vs_tvm(path, "default@int8", x)
    assert _rel(tvm, ort) < VS_ORT
    assert _rel(tvm, _torch(model, x)) < INT8_TOL


@needs_int8
def test_dress_int8_levels_run_their_linear_layers_as_int8_on_tvm(tmp_path) -> None:
    model, path, x = dress_mlp_int8(tmp_path)
    levels = ["density-100@int8", "density-25@int8"]
    report = _compile_int8(path, levels)
    assert all("qconv" in e["kernels"] and any(f.startswith("qlinear") for f in e["kernel_functions"])
               for e in report["engines"])
    for name in levels:
        ort, tvm = _ort_vs_tvm(path, name, x[:4])
        assert _rel(tvm, ort) < VS_ORT, name
        model.set_level(["density-100", "density-50", "density-25", "density-10"].index(name.split("@")[0]))
        assert _rel(tvm, _torch(model, x[:4])) < INT8_TOL, name


@needs_int8
def test_snnet_int8_configs_run_on_tvm(snnet_bundle, tmp_path) -> None:
    from edgeflex.export.quantize import quantize

    model, shared = snnet_bundle
    path = tmp_path / "sn.efx"
    shutil.copytree(shared, path)
    xs, ys = _images(32)
    quantize(path, {"x": xs, "y": ys}, precisions=["int8"], methods=["minmax"], progress=False,
             max_drop=100.0)
    with ef.Bundle.open(path) as b:
        fp32 = [c.name for c in b.configs if c.precision == "fp32"]
    names = [fp32[0], fp32[-1]]                 # an anchor and a stitched config
    _compile_int8(path, [f"{n}@int8" for n in names])
    x = _probe()
    for name in names:
        ort, tvm = _ort_vs_tvm(path, f"{name}@int8", x)
        assert _rel(tvm, ort) < VS_ORT, name
        model.set_config(name)
        assert _rel(tvm, _torch(model, x)) < INT8_TOL, name


def test_int8_on_tvm_is_refused_in_one_line_where_the_cpu_lacks_the_instruction(monkeypatch) -> None:
    assert tvm_int8_refusal({"avx512_vnni", "avx2"}, "x86_64") is None
    assert tvm_int8_refusal({"asimddp"}, "aarch64") is None
    # an AMD EPYC without AVX512-VNNI (Zen 3), an older Arm core
    for flags, arch in (({"avx2", "fma"}, "x86_64"), ({"avx_vnni", "avx2"}, "x86_64"),
                        ({"asimd"}, "aarch64")):
        why = tvm_int8_refusal(flags, arch)
        assert why is not None and "emulated" in why and "\n" not in why
    from edgeflex.devices import precision
    from edgeflex.runtime.backends.tvm import TvmBackend

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    why = TvmBackend().precision_refusal("int8")
    assert "avx512_vnni" in why and "onnxruntime" in why


@needs_int8
def test_an_engine_compiled_without_the_int8_kernels_is_refused(starnet_int8, tmp_path) -> None:
    _, shared, _ = starnet_int8
    path = tmp_path / "m.efx"
    shutil.copytree(shared, path)
    _compile_int8(path, ["default@int8"], kernels=False)
    with pytest.raises(DeviceError, match="without edgeflex's int8 kernels") as e:
        ef.Runtime(path, backend="tvm", threads=1, config="default@int8")
    assert "\n" not in str(e.value)


@needs_int8
def test_an_amx_engine_is_refused_in_one_line_where_the_cpu_has_no_amx(starnet_int8, monkeypatch) -> None:
    """An engine compiled here with AMX-INT8 star blocks, loaded where the CPU lacks amx_int8 (same
    VNNI): refused by name, never run (a tile instruction there would kill the process)."""
    _, path, report = starnet_int8
    if not any(f.startswith("qstar_amx") for f in report["engines"][0]["kernel_functions"]):
        pytest.skip("this host's target has no amx-int8: its star blocks use VNNI")
    from edgeflex.devices import precision

    flags = precision.cpu_flags() - {"amx_int8"}
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    with pytest.raises(DeviceError, match="AMX-INT8 tiles, but this CPU has no amx_int8") as e:
        ef.Runtime(path, backend="tvm", threads=1, config="default@int8")
    assert "\n" not in str(e.value)
