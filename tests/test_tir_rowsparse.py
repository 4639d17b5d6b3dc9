"""The DRESS row-sparse TIR kernels (`kernels/tir/rowsparse.py`) equal the NumPy reference at every level
from one compiled function, and the Relax rewrite puts them into a DRESS bundle's row-sparse graph so that
the bundle runs end to end on TVM."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import edgeflex as ef  # noqa: E402
from edgeflex.kernels.rowsparse import ell_reference, to_ell  # noqa: E402
from edgeflex.kernels.tir import RewriteContext  # noqa: E402
from edgeflex.kernels.tir import rowsparse as rs  # noqa: E402
from edgeflex.models.dress import row_codes  # noqa: E402

IN, OUT, LEVELS = 37, 29, 4                 # odd sizes: vector tails everywhere


def _target(portable: bool = False):
    import tvm

    from edgeflex.compile.tvm import host_target

    t = host_target(threads=1)
    return tvm.target.Target({**t, "mcpu": "x86-64"} if portable else t)


def _build(fn, target):
    import tvm

    return tvm.tirx.build(tvm.IRModule({"main": fn.with_attr("global_symbol", "main")}), target=target)


def _ell(seed: int, out_f: int = OUT, in_f: int = IN):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    codes = row_codes(torch.from_numpy(w)).numpy()
    vals, idx, k = to_ell(w, codes, LEVELS)
    return rng, vals, idx, k, rng.standard_normal(out_f).astype(np.float32)


def _call(lib, *arrays, out_shape):
    import tvm

    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32), dev)
    lib["main"](*[tvm.runtime.tensor(np.require(a, requirements="C"), dev) for a in arrays], y)
    return y.numpy()


@pytest.mark.parametrize("portable", [False, True], ids=["host", "no-avx512"])
@pytest.mark.parametrize("index_dtype", ["narrow", "int64"])
def test_linear_equals_reference_at_every_level_from_one_function(portable: bool, index_dtype: str) -> None:
    rng, vals, idx, k, bias = _ell(seed=3 + portable)
    assert len(set(k)) == LEVELS                               # four different prefix lengths
    idx = idx if index_dtype == "narrow" else idx.astype(np.int64)
    lib = _build(rs.linear_func(OUT, IN, vals.shape[1], LEVELS, index_dtype=str(idx.dtype),
                                target=_target(portable)), _target(portable))
    for batch in (1, 3, 4, 16, 17, 40):        # GEMV, GEMV x3, batch schedule: 1 chunk of 16, 2, 3 padded
        x = rng.standard_normal((batch, IN)).astype(np.float32)
        outs = []
        for level in range(LEVELS):
            y = _call(lib, x, *rs.block_ell(vals, idx), k, np.array(level, np.int64), bias,
                      out_shape=(batch, OUT))
            ref = ell_reference(x, vals, idx, k, level, bias)
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5, err_msg=f"batch {batch} level {level}")
            outs.append(y)
        assert not np.allclose(outs[0], outs[-1])              # the level really changes what runs


def test_linear_batch_schedule_on_the_thread_pool_equals_reference() -> None:
    # large enough for the batch schedule's one parallel launch (transpose, barrier, row blocks) at the
    # dense levels and its serial loops at the sparse ones; odd sizes: a column tail, a partial row block,
    # a partial batch chunk. The row blocks read rows of x's copy that other threads wrote: the copy must
    # end at a barrier (a race here can pass by chance, so the generated code is checked for it too).
    out_f, in_f = 203, 301
    rng, vals, idx, k, bias = _ell(seed=11, out_f=out_f, in_f=in_f)
    assert rs.blocks(out_f) * 16 * k[0] * 32 >= rs.PARALLEL_MACS > rs.blocks(out_f) * 16 * k[-1] * 16
    target = _target(False)
    fn = rs.linear_func(out_f, in_f, vals.shape[1], LEVELS, index_dtype=str(idx.dtype), target=target)
    lib = _build(fn, target)
    ir = lib.inspect_source("ll")
    # two barriers: after the 16-column tiles and after the column tail
    assert ir.count("load ptr, ptr @__TVMBackendParallelBarrier") == 2
    for batch in (5, 16, 23, 32):
        for level in range(LEVELS):
            x = rng.standard_normal((batch, in_f)).astype(np.float32)     # fresh: no stale copy of x can pass
            y = _call(lib, x, *rs.block_ell(vals, idx), k, np.array(level, np.int64), bias,
                      out_shape=(batch, out_f))
            np.testing.assert_allclose(y, ell_reference(x, vals, idx, k, level, bias), rtol=1e-4, atol=1e-4,
                                       err_msg=f"batch {batch} level {level}")


def test_out_of_range_level_is_clamped_not_read_out_of_bounds() -> None:
    rng, vals, idx, k, bias = _ell(seed=5)
    lib = _build(rs.linear_func(OUT, IN, vals.shape[1], LEVELS, index_dtype=str(idx.dtype), target=_target()),
                 _target())
    x = rng.standard_normal((1, IN)).astype(np.float32)
    y = _call(lib, x, *rs.block_ell(vals, idx), k, np.array(LEVELS + 7, np.int64), bias, out_shape=(1, OUT))
    np.testing.assert_allclose(y, ell_reference(x, vals, idx, k, LEVELS - 1, bias), rtol=1e-5, atol=1e-5)


def _conv_reference(x, vals, idx, k, level, bias):
    w = np.zeros((vals.shape[0], x.shape[1]))
    for o in range(vals.shape[0]):
        w[o, idx[o, :k[level]]] = vals[o, :k[level]]
    return np.einsum("oc,ncp->nop", w, x) + bias[None, :, None]


@pytest.mark.parametrize("pixels", [49, 16, 5, 196])
def test_conv1x1_equals_numpy_at_every_level(pixels: int) -> None:
    rng, vals, idx, k, bias = _ell(seed=pixels)
    lib = _build(rs.conv1x1_func(OUT, IN, vals.shape[1], LEVELS, pixels, index_dtype=str(idx.dtype),
                                 target=_target()), _target())
    for batch in (1, 2):
        x = rng.standard_normal((batch, IN, pixels)).astype(np.float32)
        for level in range(LEVELS):
            y = _call(lib, x, *rs.block_ell(vals, idx), k, np.array(level, np.int64), bias,
                      out_shape=(batch, OUT, pixels))
            np.testing.assert_allclose(y, _conv_reference(x, vals, idx, k, level, bias), rtol=1e-5, atol=1e-5,
                                       err_msg=f"batch {batch} level {level}")


def test_bad_arguments_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match="index dtype 'float32'.*expected one of"):
        rs.linear_func(4, 8, 8, 2, index_dtype="float32")
    with pytest.raises(ValueError, match="kmax <= in"):
        rs.linear_func(4, 8, 9, 2)
    with pytest.raises(ValueError, match="pixels >= 1"):
        rs.conv1x1_func(4, 8, 8, 2, 0)


@pytest.fixture(scope="module")
def dress_bundle(tmp_path_factory) -> tuple[Path, list]:
    from edgeflex.compile.tvm import collect_graphs
    from edgeflex.export.elastic import export_dress
    from edgeflex.models.dress import DressModel, build_backbone
    from edgeflex.runtime.bundle import Bundle

    torch.manual_seed(0)
    model = DressModel(build_backbone("mlp")).eval()
    path = export_dress(model, torch.randn(2, 1, 8, 8), tmp_path_factory.mktemp("dress") / "mlp.efx").path
    b = Bundle.open(path)
    return path, [collect_graphs(b, dress_kernel=k)[0] for k in ("sparse", "dense")]


def test_rewrite_fires_on_the_dress_sparse_graph_and_not_on_the_dense_one(dress_bundle) -> None:
    from edgeflex.compile.tvm import _relax_module, prepare_onnx
    from edgeflex.kernels import tir

    path, (sparse, dense) = dress_bundle
    assert "rowsparse" in tir.rewrites()
    mods = {j.rel: _relax_module(prepare_onnx(j.data, j.params), j.inputs, None) for j in (sparse, dense)}
    new, layers = rs.rewrite_module(mods[sparse.rel], _target())
    derived = ef.Runtime(path).bundle.manifest["segments"]["main.sparse"]["derived_ell"]
    assert layers == [w.replace(".", "_") for w in derived]
    text = new.script()
    assert len(re.findall(r"R\.call_tir\((?:cls\.)?rowsparse_", text)) == len(derived)
    assert "dynamic_strided_slice" not in text and "R.take(" not in text
    assert rs.rowsparse(mods[dense.rel], RewriteContext(_target(), dense.rel)) is None


def test_rewrites_run_in_a_fixed_order_and_per_op_ones_survive_the_sparse_graph(dress_bundle) -> None:
    import importlib

    from edgeflex.compile.tvm import _relax_module, prepare_onnx
    from edgeflex.kernels import tir

    for name in reversed(tir.ORDER):                   # whatever was imported first, the order is ORDER's
        importlib.import_module(f"edgeflex.kernels.tir.{name}")
    assert list(tir.rewrites())[:len(tir.ORDER)] == list(tir.ORDER)
    _, (sparse, _) = dress_bundle
    mod = _relax_module(prepare_onnx(sparse.data, sparse.params), sparse.inputs, None)
    ctx = RewriteContext(_target(), sparse.rel, dict(sparse.params))
    # the per-op rewrites alone on the un-rewritten sparse graph (dynamic gathers): no crash, no match
    _, applied = tir.apply(mod, ctx, only=["conv", "dwconv", "star"])
    assert applied == []
    _, applied = tir.apply(mod, ctx)
    assert applied[0] == "rowsparse"


def test_dress_sparse_bundle_runs_every_level_on_tvm_from_one_engine(dress_bundle, tmp_path: Path) -> None:
    import shutil

    from edgeflex.compile.tvm import compile_bundle

    src, _ = dress_bundle
    path = Path(shutil.copytree(src, tmp_path / "mlp.efx"))
    (engine,) = compile_bundle(path, "host", dress_kernel="sparse")["engines"]
    assert "rowsparse" in engine["kernels"] and engine["inputs"] == ["x", "level"]
    assert engine["transform_params"] == "main_transform_params"       # blocked ELL made once, at load
    rt = ef.Runtime(path, backend="tvm", dress_kernel="sparse")
    ort = ef.Runtime(path, dress_kernel="sparse")
    x = np.random.default_rng(7).standard_normal((3, 1, 8, 8)).astype(np.float32)
    outs = []
    for c in rt.configs:
        rt.switch(c.name)
        ort.switch(c.name)
        outs.append(rt.run(x))
        np.testing.assert_allclose(outs[-1], ort.run(x), rtol=1e-4, atol=1e-5, err_msg=c.name)
    assert not np.allclose(outs[0], outs[-1])
    assert len({id(rt.engines(c.name)[0]) for c in rt.configs}) == 1    # one library serves all levels


def test_compile_measures_each_level_on_tvm_and_the_runtime_runs_the_faster_kernel(dress_bundle,
                                                                                   tmp_path: Path) -> None:
    import shutil

    from edgeflex.compile.tvm import compile_bundle

    src, _ = dress_bundle
    path = Path(shutil.copytree(src, tmp_path / "mlp.efx"))
    report = compile_bundle(path, "host")                    # no --dress-kernel: both, then measured
    assert sorted(e["graph"] for e in report["engines"]) == ["graphs/main.onnx", "graphs/main.sparse.onnx"]
    levels = report["dress_kernels"]["levels"]
    rt = ef.Runtime(path, backend="tvm")
    assert set(levels) == {c.name for c in rt.configs}
    x = np.random.default_rng(2).standard_normal((1, 1, 8, 8)).astype(np.float32)
    ort = ef.Runtime(path)
    for c in rt.configs:
        us = levels[c.name]["median_us"]
        assert set(us) == {"dense", "sparse"} and min(us.values()) > 0
        assert levels[c.name]["kernel"] == min(us, key=us.get)
        sparse = rt.graphs(c.name) == ("graphs/main.sparse.onnx",)   # the level a run-time input
        assert sparse == (levels[c.name]["kernel"] == "sparse"), c.name
        rt.switch(c.name)
        ort.switch(c.name)
        np.testing.assert_allclose(rt.run(x), ort.run(x), rtol=1e-4, atol=1e-5, err_msg=c.name)
    # a later compile of one kernel only marks the measurement stale: every level runs what is compiled
    report = compile_bundle(path, "host", dress_kernel="dense")
    assert report["dress_kernels"]["stale"] and report["dress_kernels"]["levels"] == {}
    again = ef.Runtime(path, backend="tvm", dress_kernel=None)
    exported = {c.name: c.kind.kernel for c in again.configs}
    graph = {"dense": "graphs/main.onnx", "sparse": "graphs/main.sparse.onnx"}
    assert all(again.graphs(n) == (graph[k],) for n, k in exported.items())


@pytest.mark.parametrize("pixels", [20, 49])
def test_conv1x1_padded_rows_on_the_thread_pool_equal_numpy(pixels: int) -> None:
    # rows of pixels that are not whole vectors run on an aligned copy of x padded to whole vectors (copy,
    # barrier, then the tasks, in one launch): large enough for the parallel paths at the dense levels
    # (tasks over pixel passes at 49 pixels, over row blocks at 20: one pass) and the serial one at 10 %
    out_c, in_c = 203, 101
    rng, vals, idx, k, bias = _ell(seed=pixels + 1, out_f=out_c, in_f=in_c)
    assert rs.blocks(out_c) * 16 * k[0] * pixels >= rs.PARALLEL_MACS > rs.blocks(out_c) * 16 * k[-1] * pixels
    target = _target(False)
    lib = _build(rs.conv1x1_func(out_c, in_c, vals.shape[1], LEVELS, pixels, index_dtype=str(idx.dtype),
                                 target=target), target)
    assert lib.inspect_source("ll").count("load ptr, ptr @__TVMBackendParallelBarrier") == 2   # one a path
    for batch in (1, 3):
        for level in range(LEVELS):
            x = rng.standard_normal((batch, in_c, pixels)).astype(np.float32)
            y = _call(lib, x, *rs.block_ell(vals, idx), k, np.array(level, np.int64), bias,
                      out_shape=(batch, out_c, pixels))
            np.testing.assert_allclose(y, _conv_reference(x, vals, idx, k, level, bias), rtol=1e-4, atol=1e-4,
                                       err_msg=f"batch {batch} level {level}")
