"""The fused StarNet star op as a TVM kernel (`kernels/tir/star.py`): the kernel equals its NumPy reference on
fresh random inputs at odd sizes; the Relax rewrite finds every star op of an exported StarNet, the engine
compiled with it equals ONNX Runtime, weights given as parameters work, and graphs without the pattern are
left alone. Skipped whole when apache-tvm is not installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgeflex[tvm]'): TVM untested")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

import edgeflex as ef  # noqa: E402
from edgeflex.compile.tvm import (  # noqa: E402
    _relax_module,  # noqa: E402
    collect_graphs,
    compile_bundle,
    host_target,
    prepare_onnx,
)
from edgeflex.kernels.tir import RewriteContext, rewrites  # noqa: E402
from edgeflex.kernels.tir.star import find_star_ops, rewrite_star, star_primfunc, star_reference  # noqa: E402
from edgeflex.runtime.bundle import Bundle  # noqa: E402

TARGET = tvm.target.Target(host_target())


def _rng() -> tuple[np.random.Generator, int]:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    return np.random.default_rng(seed), seed


def _weights(rng: np.random.Generator, c: int, r: int, co: int) -> list[np.ndarray]:
    """w1, b1, w2, b2, wg, bg as float32."""
    shapes = [(r, c), (r,), (r, c), (r,), (co, r), (co,)]
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("n,c,r,co,h,w,dynamic,small", [
    (1, 13, 39, 13, 9, 9, False, False),    # odd everything; 81 pixels: the last tile overlaps
    (2, 5, 15, 7, 3, 5, True, False),       # fewer pixels than a tile, C != Cout, any batch
    (3, 24, 96, 24, 7, 7, False, False),    # StarNet-S1 stage-1 widths at 7x7 (49 pixels)
    (1, 3, 2, 1, 1, 1, False, False),       # one pixel, fewer rows than a register block
    # the small-map kernel (channels as the vector, weights transposed):
    (1, 128, 384, 128, 1, 1, False, True),  # StarNet-S050's last stage at a 32x32 input: one pixel
    (2, 13, 40, 21, 2, 2, True, True),      # 2x2, odd widths: the last hidden and output blocks overlap
    (1, 9, 16, 17, 2, 4, False, True),      # 8 pixels (the most it takes), one hidden block
])
def test_kernel_equals_numpy(n: int, c: int, r: int, co: int, h: int, w: int, dynamic: bool,
                             small: bool) -> None:
    from edgeflex.kernels.tir.star import star_small_primfunc, uses_small_kernel

    assert uses_small_kernel(c, r, co, h, w) == small       # what the rewrite would pick
    rng, seed = _rng()
    x = rng.standard_normal((n, c, h, w)).astype(np.float32) * 2
    w1, b1, w2, b2, wg, bg = _weights(rng, c, r, co)
    w12, wgo = np.concatenate([w1, w2]), wg
    if small:
        w12, wgo = np.ascontiguousarray(w12.T), np.ascontiguousarray(wg.T)
    make = star_small_primfunc if small else star_primfunc
    func = make(None if dynamic else n, c, r, co, h, w).with_attr("global_symbol", "star")
    kernel = tvm.compile(tvm.IRModule({"star": func}), target=TARGET)["star"]
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.full((n, co, h, w), np.nan, np.float32), dev)
    kernel(*[tvm.runtime.tensor(a, dev) for a in (x, w12, np.concatenate([b1, b2]), wgo, bg)], y)
    ref = star_reference(x, w1, b1, w2, b2, wg, bg)
    assert np.isfinite(y.numpy()).all(), f"seed {seed}: outputs left unwritten"
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                               err_msg=f"seed {seed}")


def _bundle(tmp_path: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """StarNet-S050 with random (non-zero) biases, exported at 24x24."""
    from edgeflex.models.starnet import starnet

    torch.manual_seed(seed)
    model = starnet("s050", num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    bundle = ef.export(model, torch.randn(1, 3, 24, 24), tmp_path / "s050.efx", n_random=1)
    return model, bundle.path


def test_rewrite_replaces_every_star_op_and_the_engine_equals_ort(tmp_path: Path) -> None:
    model, path = _bundle(tmp_path)
    (job,) = collect_graphs(Bundle.open(path))
    mod = _relax_module(prepare_onnx(job.data, job.params), job.inputs, None)
    blocks = sum(model.stages[i].__len__() - 1 for i in range(4))
    assert len(find_star_ops(relax.transform.FoldConstant()(mod)["main"])) == blocks == 6
    new = rewrite_star(mod, RewriteContext(TARGET))
    text = new["main"].script()
    assert text.count("star_") >= blocks and "R.multiply" not in text

    report = compile_bundle(path, "host")
    assert sorted(report["engines"][0]["kernels"]) == ["conv", "dense", "dwconv", "star"]
    rt, ort = ef.Runtime(path, backend="tvm"), ef.Runtime(path)
    rng, seed = _rng()
    x = rng.standard_normal((2, 3, 24, 24)).astype(np.float32)
    y, ref = rt.run(x), ort.run(x)
    assert float(np.abs(y - ref).max() / np.abs(ref).max()) <= 1e-4, f"seed {seed}"


def _star_function(weights_as_params: bool, relu6: bool = True) -> tuple[tvm.IRModule, list[np.ndarray]]:
    """A Relax star op written by hand (C=6, r=3, 5x7): weights as function parameters or as constants."""
    rng = np.random.default_rng(1)
    c, r = 6, 3
    w1, b1, w2, b2, wg, bg = _weights(rng, c, r * c, c)
    conv_w = [w1.reshape(r * c, c, 1, 1), w2.reshape(r * c, c, 1, 1), wg.reshape(c, r * c, 1, 1)]
    biases = [b.reshape(1, -1, 1, 1) for b in (b1, b2, bg)]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, c, 5, 7], "float32"))
    params = [relax.Var(f"w{i}", relax.TensorType(list(a.shape), "float32")) for i, a in enumerate(conv_w)]
    ws = params if weights_as_params else [relax.const(a) for a in conv_w]
    with bb.function("main", [x, *params] if weights_as_params else [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.add(relax.op.nn.conv2d(x, ws[0]), relax.const(biases[0])))
            b = bb.emit(relax.op.add(relax.op.nn.conv2d(x, ws[1]), relax.const(biases[1])))
            act = relax.op.clip(a, 0, 6) if relu6 else relax.op.nn.relu(a)
            m = bb.emit(relax.op.multiply(bb.emit(act), b))
            out = bb.emit_output(relax.op.add(relax.op.nn.conv2d(m, ws[2]), relax.const(biases[2])))
        bb.emit_func_output(out)
    return bb.get(), [w1, b1, w2, b2, wg, bg, *conv_w]


@pytest.mark.parametrize("weights_as_params", [False, True])
def test_rewrite_on_a_hand_written_block_equals_numpy(weights_as_params: bool) -> None:
    mod, (w1, b1, w2, b2, wg, bg, *conv_w) = _star_function(weights_as_params)
    new = rewrite_star(mod, RewriteContext(TARGET))
    assert new is not None and "R.multiply" not in new["main"].script()
    vm = relax.VirtualMachine(tvm.compile(new, target=TARGET), tvm.cpu())
    rng, seed = _rng()
    x = rng.standard_normal((1, 6, 5, 7)).astype(np.float32)
    args = [x, *conv_w] if weights_as_params else [x]
    y = vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    ref = star_reference(x, w1, b1, w2, b2, wg, bg)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=f"seed {seed}")


def test_graphs_without_the_pattern_are_left_alone() -> None:
    mod, _ = _star_function(False, relu6=False)         # ReLU instead of ReLU6: not a star op
    assert rewrite_star(mod, RewriteContext(TARGET)) is None
    star, _ = _star_function(False)
    assert rewrite_star(star, RewriteContext(tvm.target.Target("cuda"))) is None   # a CPU kernel only
    assert "star" in rewrites()
