"""The FITS TIR kernel (kernels/tir/fits.py): equal to the NumPy reference on fresh random inputs and weights
at odd sizes (both forms, batch 1 split over cores and batch > 1, narrow and wide tiles, more channels than
one task holds); the "fits" rewrite replaces the imported ONNX lowering by one kernel call, fires on an
exported bundle whose compiled engine equals ONNX Runtime, and leaves other graphs alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgeflex[tvm]'): TVM untested")

import onnxruntime as ort  # noqa: E402

import edgeflex as ef  # noqa: E402
from edgeflex.compile.tvm import _relax_module, compile_bundle, host_target, prepare_onnx  # noqa: E402
from edgeflex.errors import UsageError  # noqa: E402
from edgeflex.kernels import spectral  # noqa: E402
from edgeflex.kernels.tir import RewriteContext, apply  # noqa: E402
from edgeflex.kernels.tir.fits import (  # noqa: E402
    FitsShape,
    SplitPlan,
    build_kernel,
    rewrite_fits,
    run_kernel,
    schedule_for,
    split_kernel_operands,
)
from edgeflex.runtime.bundle import TensorSpec  # noqa: E402

FORMS = ("folded", "lowrank")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _weights(rng: np.random.Generator, seq_len: int, pred_len: int, cut: int) -> spectral.SpectralWeights:
    up = int(cut * (seq_len + pred_len) / seq_len)
    weight = (rng.standard_normal((up, cut)) + 1j * rng.standard_normal((up, cut))) / cut**0.5
    bias = (rng.standard_normal(up) + 1j * rng.standard_normal(up)) * 0.1
    return spectral.SpectralWeights(seq_len, pred_len, weight, bias)


def _x(rng: np.random.Generator, batch: int, seq_len: int, channels: int) -> np.ndarray:
    # An offset and a scale per channel: the normalisation must really remove them.
    scale = rng.uniform(0.5, 4.0, channels)
    return (rng.standard_normal((batch, seq_len, channels)) * scale + rng.uniform(-50, 50, channels)) \
        .astype(np.float32)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seq_len, pred_len, channels, cut, cores", [
    (97, 13, 3, 9, 2),      # odd everything; batch 1 split 2 + 1 channels over two tasks
    (24, 7, 5, 3, 1),       # rank 4 and 31 outputs: narrower than one register / one tail tile
    (50, 11, 11, 26, 2),    # cut at Nyquist (L/2 + 1); 11 channels: two tasks per sample, the last padded
    (720, 96, 7, 60, 2),    # the benchmark's shape (full tiles and a tail tile on both GEMMs)
])
def test_kernel_equals_reference(form: str, seq_len: int, pred_len: int, channels: int, cut: int,
                                 cores: int, rng: np.random.Generator) -> None:
    w = _weights(rng, seq_len, pred_len, cut)
    ops = [o.astype(np.float32) for o in spectral.gemm_operands(w, form)]
    rank = None if form == "folded" else ops[0].shape[1]
    s = schedule_for(seq_len, w.out_len, channels, w.eps * (seq_len - 1) / seq_len, rank, cores=cores)
    lib = build_kernel(s)
    for batch in (1, 5):
        x = _x(rng, batch, seq_len, channels)
        y = run_kernel(lib, s, x, ops)
        assert y.shape == (batch, w.out_len, channels)
        assert _rel(y, spectral.reference(x, w)) <= 1e-4, (form, batch)


@pytest.mark.parametrize("seq_len, pred_len, channels, cut, cores", [
    (720, 96, 7, 60, 2),    # the benchmark's shape: one task holds the sample (the contiguous copy)
    (64, 16, 3, 10, 1),     # the smallest lengths the split takes (L = 4 x 16, L + H = 5 x 16)
    (96, 32, 11, 49, 2),    # cut at Nyquist (L/2 + 1); 11 channels: two tasks per sample, the last padded
    (400, 96, 2, 150, 2),   # 19 bins in a group: 38 coefficients, three vectors of lanes
])
def test_split_kernel_equals_reference(seq_len: int, pred_len: int, channels: int, cut: int, cores: int,
                                       rng: np.random.Generator) -> None:
    """The split (FFT-structured) kernel: its operands reproduce the low-rank map, and the kernel equals the
    NumPy FITS reference at batch 1 and 5."""
    import tvm

    w = _weights(rng, seq_len, pred_len, cut)
    F, W = (o.astype(np.float32) for o in spectral.gemm_operands(w, "lowrank"))
    ops = spectral.split_operands(F, W)
    assert ops is not None
    s = schedule_for(seq_len, w.out_len, channels, w.eps * (seq_len - 1) / seq_len, F.shape[1], cores=cores)
    lib = build_kernel(s, plan=SplitPlan.of(ops))
    for batch in (1, 5):
        x = _x(rng, batch, seq_len, channels)
        args = [tvm.runtime.tensor(a) for a in (x, *split_kernel_operands(ops))]
        y = tvm.runtime.tensor(np.empty((batch, w.out_len, channels), np.float32))
        lib["fits"](*args, y)
        assert _rel(y.numpy(), spectral.reference(x, w)) <= 1e-4, batch


@pytest.mark.parametrize("kernel, seq_len, pred_len, channels, cut", [
    ("folded", 97, 13, 3, 9),       # N * C not whole periods of 16 lanes: the per-channel loop
    ("lowrank", 50, 11, 11, 26),    # two tasks per sample, the last padded: the per-channel loop
    ("split", 720, 96, 7, 60),      # the benchmark's shape: the flat 16-lane loop over the whole sample
    ("split", 64, 16, 3, 10),       # the flat loop, three channels
])
def test_kernels_write_the_centred_series_as_a_second_output(kernel: str, seq_len: int, pred_len: int,
                                                              channels: int, cut: int,
                                                              rng: np.random.Generator) -> None:
    """With `centred` the kernel also writes y - mean (the FITS authors' second output), equal to the
    reference's y minus the input's mean; y itself unchanged."""
    import tvm

    w = _weights(rng, seq_len, pred_len, cut)
    eps = w.eps * (seq_len - 1) / seq_len
    form = "folded" if kernel == "folded" else "lowrank"
    ops = [o.astype(np.float32) for o in spectral.gemm_operands(w, form)]
    rank = None if form == "folded" else ops[0].shape[1]
    s = schedule_for(seq_len, w.out_len, channels, eps, rank, cores=2, centred=True)
    split = spectral.split_operands(*ops) if kernel == "split" else None
    lib = build_kernel(s, plan=None if split is None else SplitPlan.of(split))
    for batch in (1, 5):
        x = _x(rng, batch, seq_len, channels)
        if split is None:
            y, yc = run_kernel(lib, s, x, ops)
        else:
            args = [tvm.runtime.tensor(a) for a in (x, *split_kernel_operands(split))]
            outs = [tvm.runtime.tensor(np.empty((batch, w.out_len, channels), np.float32)) for _ in range(2)]
            lib["fits"](*args, *outs)
            y, yc = (o.numpy() for o in outs)
        want = spectral.reference(x, w)
        assert _rel(y, want) <= 1e-4, batch
        assert _rel(yc, want - x.mean(axis=1, keepdims=True)) <= 1e-4, batch
        np.testing.assert_allclose(yc, y - x.mean(axis=1, keepdims=True), rtol=0, atol=1e-4 * np.abs(x).max())


def test_split_operands_only_for_the_low_rank_form_at_multiples_of_16(rng: np.random.Generator) -> None:
    w = _weights(rng, 64, 16, 10)
    F, W = (o.astype(np.float32) for o in spectral.gemm_operands(w, "lowrank"))
    ops = spectral.split_operands(F, W)
    xc = rng.standard_normal((64, 3))
    rho, mean = np.sqrt((xc ** 2).mean(0)), rng.standard_normal(3)
    want = W.T.astype(np.float64) @ np.vstack([F.T @ xc, rho, mean])
    assert _rel(spectral.split_reference(xc, rho, mean, ops), want) <= 1e-5
    F2 = F.copy()
    F2[3, 5] += 0.1                                       # not the DFT basis: the split does not apply
    assert spectral.split_operands(F2, W) is None
    W2 = W.copy()
    W2[0] += rng.standard_normal(W.shape[1]) * 0.1       # a spectral row outside the inverse DFT's span
    assert spectral.split_operands(F, W2) is None
    (M,) = (o.astype(np.float32) for o in spectral.gemm_operands(w, "folded"))
    folded = spectral.split_operands_from_folded(M)       # the folded matrix factored back
    assert folded is not None and folded.rank == ops.rank
    want = M.T.astype(np.float64) @ np.vstack([xc - xc.mean(0), rho, mean])
    assert _rel(spectral.split_reference(xc - xc.mean(0), rho, mean, folded), want) <= 1e-5
    w3 = _weights(rng, 60, 20, 10)                        # 60 is not a multiple of 16
    assert spectral.split_operands(*(o.astype(np.float32) for o in spectral.gemm_operands(w3, "lowrank"))) \
        is None


def test_static_batch_kernel_and_shape_errors(rng: np.random.Generator) -> None:
    w = _weights(rng, 31, 5, 4)
    ops = [o.astype(np.float32) for o in spectral.gemm_operands(w, "lowrank")]
    s = schedule_for(31, 36, 2, w.eps * 30 / 31, ops[0].shape[1], batch=3, cores=2)
    lib = build_kernel(s)
    x = _x(rng, 3, 31, 2)
    assert _rel(run_kernel(lib, s, x, ops), spectral.reference(x, w)) <= 1e-4
    with pytest.raises(UsageError, match=r"expected \[3, 31, 2\]") as info:
        run_kernel(lib, s, x[:2], ops)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="operands"):
        run_kernel(lib, s, x, ops[::-1])
    with pytest.raises(UsageError, match="positive"):
        schedule_for(0, 36, 2, 1e-5)


# --- the rewrite ---------------------------------------------------------------------------------------

def _imported(model, seq_len: int, channels: int, batch: int | None):
    return _relax_module(prepare_onnx(model.SerializeToString(), {}),
                         [TensorSpec("x", (None, seq_len, channels), "float32")], batch)


def _calls(mod) -> list[str]:
    """The ops (and called functions) of every binding of `main`, in order."""
    names = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            op = getattr(b.value, "op", None)
            name = str(getattr(op, "name", ""))
            if name == "relax.call_tir":
                name = f"call_tir:{b.value.args[0].name_hint}"
            names.append(name)
    return names


@pytest.mark.parametrize("form, L, H, cut, kernel", [
    ("folded", 37, 9, 5, "folded"), ("lowrank", 37, 9, 5, "lowrank"),
    ("lowrank", 64, 16, 5, "lowrank"),          # multiples of 16, but too small for the split to pay
    ("lowrank", 256, 64, 30, "split"), ("folded", 256, 64, 30, "split")])
@pytest.mark.parametrize("batch", [None, 2])
def test_rewrite_puts_one_kernel_call_in_place_of_the_lowering(form: str, L: int, H: int, cut: int,
                                                              kernel: str, batch: int | None,
                                                              rng: np.random.Generator) -> None:
    """Folded or low-rank constants at lengths that are multiples of 16 become the split kernel's where it
    does at most `SPLIT_MAX_SHARE` of the smaller form's multiply-adds."""
    import tvm
    from tvm import relax

    C = 3
    w = _weights(rng, L, H, cut)
    model = spectral.to_onnx(w, form, channels=C)
    mod = _imported(model, L, C, batch)
    assert "relax.matmul" in _calls(mod)
    target = tvm.target.Target(host_target())
    new, applied = apply(mod, RewriteContext(target, "graphs/fits.onnx", {}, batch), only=["fits"])
    assert applied == ["fits"]
    (call,) = _calls(new)                                   # the whole graph is one kernel call
    assert call.startswith(f"call_tir:fits_{kernel}_")
    vm = relax.VirtualMachine(tvm.compile(new, target=target), tvm.cpu(0))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in ((1, 4) if batch is None else (batch,)):
        x = _x(rng, n, L, C)
        y = vm["main"](tvm.runtime.tensor(x)).numpy()
        assert _rel(y, sess.run(None, {"x": x})[0]) <= 1e-4
        assert _rel(y, spectral.reference(x, w)) <= 1e-4


@pytest.mark.parametrize("form, L, H, cut, kernel, batch", [
    ("lowrank", 64, 16, 5, "lowrank", None), ("folded", 37, 9, 5, "folded", 2),
    ("lowrank", 256, 64, 30, "split", None), ("folded", 256, 64, 30, "split", 2)])
def test_rewrite_gives_both_outputs_of_the_authors_fits_from_one_kernel_call(
        form: str, L: int, H: int, cut: int, kernel: str, batch: int | None,
        rng: np.random.Generator) -> None:
    """A graph with the centred second output (y - mean, as `to_onnx` writes it for the FITS authors'
    `low_xy * sqrt(var)`) becomes one call of the kernel that writes both: no op beside it, no kernel
    left unused in the module, both outputs equal to ONNX Runtime's."""
    import tvm
    from tvm import relax

    C = 3
    w = _weights(rng, L, H, cut)
    model = spectral.to_onnx(w, form, channels=C, outputs=[("y0", "y"), ("y1", "centred")])
    mod = _imported(model, L, C, batch)
    target = tvm.target.Target(host_target())
    new, applied = apply(mod, RewriteContext(target, "graphs/fits.onnx", {}, batch), only=["fits"])
    assert applied == ["fits"]
    calls = [c for c in _calls(new) if c]                  # the rest: the tuple's items and the output tuple
    assert len(calls) == 1 and calls[0].startswith(f"call_tir:fits_{kernel}_") and calls[0].endswith("_yc")
    kernels = [gv.name_hint for gv, f in new.functions.items() if not isinstance(f, relax.Function)]
    assert kernels == [calls[0].removeprefix("call_tir:")]
    vm = relax.VirtualMachine(tvm.compile(new, target=target), tvm.cpu(0))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in ((1, 4) if batch is None else (batch,)):
        x = _x(rng, n, L, C)
        got = vm["main"](tvm.runtime.tensor(x))
        want = sess.run(None, {"x": x})
        assert len(got) == 2
        for g, r in zip(got, want):
            assert _rel(g.numpy(), r) <= 1e-4


def test_rewrite_leaves_other_graphs_alone(rng: np.random.Generator) -> None:
    import onnx
    import tvm
    from onnx import numpy_helper
    from tvm import relax

    target = tvm.target.Target(host_target())
    ctx = RewriteContext(target, "graphs/g.onnx", {}, None)
    # A tiny MLP: matmul, add, relu, matmul.
    x = relax.Var("x", relax.TensorType([2, 8], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.matmul(x, relax.const(rng.standard_normal((8, 16)).astype(np.float32))))
            h = bb.emit(relax.op.nn.relu(relax.op.add(h, relax.const(np.ones(16, np.float32)))))
            out = bb.emit_output(relax.op.matmul(h, relax.const(rng.standard_normal((16, 4)).astype("f4"))))
        bb.emit_func_output(out)
    assert rewrite_fits(bb.get(), ctx) is None
    # A FITS graph whose LayerNormalization has a scale other than 1: same ops, not what the kernel computes.
    L, C = 20, 2
    model = spectral.to_onnx(_weights(rng, L, 4, 3), "folded", channels=C)
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    scale = next(t for t in model.graph.initializer if t.name == ln.input[1])
    scale.CopyFrom(numpy_helper.from_array(np.full(L, 2.0, np.float32), scale.name))
    onnx.checker.check_model(model)
    assert rewrite_fits(_imported(model, L, C, None), ctx) is None
    # Not a CPU target: nothing to do.
    assert rewrite_fits(_imported(spectral.to_onnx(_weights(rng, L, 4, 3), "folded", channels=C), L, C, None),
                        RewriteContext(None)) is None


def test_compiled_fits_bundle_runs_the_kernel_and_equals_ort(tmp_path: Path, fits_bundle: Path) -> None:
    path = tmp_path / "fits.efx"
    shutil.copytree(fits_bundle, path)
    form = ef.Bundle.open(path).manifest["export"]["kernels"]["form"]
    if form not in FORMS:
        pytest.skip(f"the exporter chose form {form!r} for the session bundle; TVM takes folded/lowrank only")
    (engine,) = compile_bundle(path, "host")["engines"]
    assert engine["kernels"] == ["fits"]
    (fn,) = engine["kernel_functions"]                  # which FITS kernel: the session bundle is small
    assert fn.startswith(("fits_folded_", "fits_lowrank_", "fits_split_")), fn
    rt, ort_rt = ef.Runtime(path, backend="tvm"), ef.Runtime(path)
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, *rt.inputs[0].shape[1:])).astype(np.float32)
        assert _rel(rt.run(x), ort_rt.run(x)) <= 1e-4
    (plain,) = compile_bundle(path, "host", kernels=False)["engines"]
    assert plain["kernels"] == []


def test_shape_record_names_the_form() -> None:
    assert FitsShape(8, 10, 1, 1e-5).form == "folded"
    assert FitsShape(8, 10, 1, 1e-5, rank=3).operand_shapes() == [(8, 3), (5, 10)]
