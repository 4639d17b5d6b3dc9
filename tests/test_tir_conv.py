"""The dense KxK and depthwise convolution kernels (`kernels/tir/conv.py`, `dwconv.py`): each equal to
its NumPy reference on fresh random inputs at odd sizes, strides and paddings; the rewrites take conv +
bias + ReLU6 (dense) and conv + bias + residual (depthwise) whole, and leave 1x1 convs alone. Skipped
whole when apache-tvm is not installed."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgeflex[tvm]'): TVM untested")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from edgeflex.compile.tvm import host_target  # noqa: E402
from edgeflex.kernels.tir import RewriteContext  # noqa: E402
from edgeflex.kernels.tir.conv import (  # noqa: E402
    conv_primfunc,
    conv_reference,
    conv_small_primfunc,
    rewrite_conv,
    uses_small_kernel,
)

TARGET = tvm.target.Target(host_target())


@pytest.mark.parametrize("n,c,h,w,o,k,s,pad,relu6,dynamic", [
    (1, 3, 40, 70, 5, 3, 2, (1, 1, 1, 1), True, False),     # rows wider than a tile: whole-row tiles
    (2, 5, 9, 11, 7, 3, 2, (1, 1, 1, 1), False, True),      # narrow output: flat tiles, any batch
    (1, 4, 13, 13, 9, 5, 3, (2, 1, 0, 2), False, False),    # 5x5 stride 3, uneven padding
    (1, 6, 8, 8, 3, 3, 1, (0, 0, 0, 0), True, False),       # stride 1, no padding
    (2, 37, 9, 11, 29, 1, 1, (0, 0, 0, 0), False, True),    # 1x1 stride 1 (an SN-Net stitching layer)
    # the small-output kernel (output channels as the vector, weights transposed):
    (1, 64, 2, 2, 128, 3, 2, (1, 1, 1, 1), False, False),   # S050's last down-sampling at 32x32: 1x1 out
    (2, 7, 4, 3, 21, 3, 2, (1, 1, 1, 1), True, True),       # 2x2 out, odd widths, ReLU6, any batch
    (1, 5, 3, 5, 16, 3, 1, (0, 0, 0, 0), False, False),     # 1x3 out, no padding, one channel block
])
def test_kernel_equals_numpy(n, c, h, w, o, k, s, pad, relu6, dynamic) -> None:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32) * 3
    wt = rng.standard_normal((o, c, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    ref = conv_reference(x, wt, b, s, pad, relu6)
    small = uses_small_kernel(h, w, o, (k, k), (s, s), pad)         # what the rewrite would pick
    make = conv_small_primfunc if small else conv_primfunc
    func = make(None if dynamic else n, c, h, w, o, (k, k), (s, s), pad, relu6)
    mod = tvm.IRModule({"conv": func.with_attr("global_symbol", "conv")})
    kernel = tvm.compile(mod, target=TARGET)["conv"]
    y = tvm.runtime.tensor(np.full(ref.shape, np.nan, np.float32))
    wmat = np.ascontiguousarray(wt.reshape(o, -1).T) if small else wt.reshape(o, -1)
    kernel(*[tvm.runtime.tensor(a) for a in (x, wmat, b)], y)
    assert np.isfinite(y.numpy()).all(), f"seed {seed}: outputs left unwritten"
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                               err_msg=f"seed {seed}")


def _module(kernel: int, relu6: bool) -> tuple[tvm.IRModule, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    wt = rng.standard_normal((8, 3, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal((1, 8, 1, 1)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 3, 17, 17], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.nn.conv2d(x, relax.const(wt), strides=2, padding=kernel // 2),
                                     relax.const(b)))
            if relu6:
                y = bb.emit(relax.op.clip(y, 0, 6))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    return bb.get(), wt, b.reshape(-1)


def test_rewrite_fuses_bias_and_relu6_and_equals_numpy() -> None:
    mod, wt, b = _module(3, relu6=True)
    new = rewrite_conv(mod, RewriteContext(TARGET))
    text = new["main"].script()
    assert "conv_1x3x17x17_o8_k3x3_s2x2_p1-1-1-1_relu6" in text
    assert "R.nn.conv2d" not in text and "R.clip" not in text
    x = np.random.default_rng().standard_normal((1, 3, 17, 17)).astype(np.float32) * 3
    y = relax.VirtualMachine(tvm.compile(new, target=TARGET), tvm.cpu())["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose(y.numpy(), conv_reference(x, wt, b, 2, (1, 1, 1, 1), relu6=True),
                               rtol=1e-4, atol=1e-4)


def test_1x1_convs_are_taken_too() -> None:
    # 1x1 stride 2 and 1x1 stride 1 (what the star rewrite leaves, e.g. an SN-Net stitching layer, which
    # TVM's default legalization ran unscheduled: 4-21 % of a chained config's time at 64-224 px)
    mod, _, _ = _module(1, relu6=False)
    assert rewrite_conv(mod, RewriteContext(TARGET)) is not None
    wt = np.random.default_rng(5).standard_normal((4, 3, 1, 1)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 3, 5, 5], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, relax.const(wt)))
        bb.emit_func_output(out)
    new = rewrite_conv(bb.get(), RewriteContext(TARGET))
    assert new is not None and "R.nn.conv2d" not in new["main"].script()
    xv = np.random.default_rng(6).standard_normal((1, 3, 5, 5)).astype(np.float32)
    y = relax.VirtualMachine(tvm.compile(new, target=TARGET), tvm.cpu())["main"](tvm.runtime.tensor(xv))
    np.testing.assert_allclose(y.numpy(), conv_reference(xv, wt, None, 1, (0, 0, 0, 0), relu6=False),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,c,h,w,k,pad,residual,dynamic", [
    (1, 5, 13, 11, 7, (3, 3, 3, 3), True, False),       # StarNet's 7x7 'same', odd plane
    (2, 3, 4, 3, 7, (3, 3, 3, 3), False, True),         # plane smaller than the kernel, any batch
    (1, 7, 20, 37, 3, (1, 0, 2, 1), True, False),       # uneven padding, wider than a vector
    (1, 3, 31, 40, 7, (3, 3, 3, 3), True, False),       # 3 vectors a row: blocks of 5 rows, the last overlaps
    (2, 9, 1, 1, 7, (3, 3, 3, 3), True, True),          # one pixel: the tap-list schedule, centre tap only
    (1, 6, 2, 2, 7, (3, 3, 3, 3), False, False),        # 2x2: every output sums 4 in-bounds taps
    (1, 4, 4, 4, 3, (1, 0, 2, 1), True, False),         # 16 outputs (the most it takes), uneven padding
])
def test_depthwise_kernel_equals_numpy(n, c, h, w, k, pad, residual, dynamic) -> None:
    from edgeflex.kernels.tir.dwconv import dwconv_primfunc, dwconv_reference

    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    out_shape = dwconv_reference(x, wt, b, pad).shape
    res = rng.standard_normal(out_shape).astype(np.float32) if residual else np.zeros(1, np.float32)
    ref = dwconv_reference(x, wt, b, pad, res if residual else None)
    func = dwconv_primfunc(None if dynamic else n, c, h, w, (k, k), pad, residual)
    mod = tvm.IRModule({"dw": func.with_attr("global_symbol", "dw")})
    y = tvm.runtime.tensor(np.full(ref.shape, np.nan, np.float32))
    args = [tvm.runtime.tensor(a) for a in (x, wt.reshape(c, -1), b, res)]
    tvm.compile(mod, target=TARGET)["dw"](*args, y)
    assert np.isfinite(y.numpy()).all(), f"seed {seed}: outputs left unwritten"
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                               err_msg=f"seed {seed}")


def test_depthwise_rewrite_fuses_the_residual() -> None:
    from edgeflex.kernels.tir.dwconv import dwconv_reference, rewrite_dwconv

    rng = np.random.default_rng(5)
    wt = rng.standard_normal((4, 1, 7, 7)).astype(np.float32)
    b = rng.standard_normal((1, 4, 1, 1)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 4, 9, 9], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.nn.conv2d(x, relax.const(wt), padding=3, groups=4),
                                     relax.const(b)))
            out = bb.emit_output(relax.op.add(x, y))
        bb.emit_func_output(out)
    new = rewrite_dwconv(bb.get(), RewriteContext(TARGET))
    text = new["main"].script()
    assert "dwconv_1x4x9x9_k7x7_p3-3-3-3_residual" in text
    assert "R.add" not in text and "R.nn.conv2d" not in text
    xs = rng.standard_normal((1, 4, 9, 9)).astype(np.float32)
    got = relax.VirtualMachine(tvm.compile(new, target=TARGET), tvm.cpu())["main"](tvm.runtime.tensor(xs))
    np.testing.assert_allclose(got.numpy(), dwconv_reference(xs, wt, b.reshape(-1), (3,) * 4, xs),
                               rtol=1e-4, atol=1e-4)
