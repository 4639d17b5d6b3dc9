"""The classifier-head kernel (`kernels/tir/dense.py`): equal to its NumPy reference on fresh random inputs at
odd sizes; its rewrite takes matmul + bias whole and leaves batched (3-D) matmuls alone. Skipped whole when
apache-tvm is not installed."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgeflex[tvm]'): TVM untested")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from edgeflex.compile.tvm import host_target  # noqa: E402
from edgeflex.kernels.tir import RewriteContext  # noqa: E402
from edgeflex.kernels.tir.dense import dense_primfunc, dense_reference, rewrite_dense  # noqa: E402

TARGET = tvm.target.Target(host_target())


@pytest.mark.parametrize("n,k,o,dynamic", [(1, 192, 1000, False), (3, 13, 7, True), (2, 5, 131, False)])
def test_kernel_equals_numpy(n: int, k: int, o: int, dynamic: bool) -> None:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((n, k), (k, o), (o,)))
    mod = tvm.IRModule({"dense": dense_primfunc(None if dynamic else n, k, o).with_attr("global_symbol",
                                                                                        "dense")})
    y = tvm.runtime.tensor(np.full((n, o), np.nan, np.float32))
    tvm.compile(mod, target=TARGET)["dense"](*[tvm.runtime.tensor(a) for a in (x, w, b)], y)
    np.testing.assert_allclose(y.numpy(), dense_reference(x, w, b), rtol=1e-4, atol=1e-4,
                               err_msg=f"seed {seed}")


def _head(rows: list[int]) -> tuple[tvm.IRModule, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((12, 37)).astype(np.float32), rng.standard_normal(37).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([*rows, 12], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.matmul(x, relax.const(w)), relax.const(b)))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    return bb.get(), w, b


def test_rewrite_takes_the_bias_and_equals_numpy() -> None:
    mod, w, b = _head([2])
    new = rewrite_dense(mod, RewriteContext(TARGET))
    text = new["main"].script()
    assert "dense_2x12_o37" in text and "R.matmul" not in text and "R.add" not in text
    x = np.random.default_rng().standard_normal((2, 12)).astype(np.float32)
    y = relax.VirtualMachine(tvm.compile(new, target=TARGET), tvm.cpu())["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose(y.numpy(), np.maximum(dense_reference(x, w, b), 0), rtol=1e-4, atol=1e-4)


def test_batched_matmul_is_left_alone() -> None:
    mod, _, _ = _head([2, 3])                           # x [2, 3, 12] @ w: not a classifier head
    assert rewrite_dense(mod, RewriteContext(TARGET)) is None
