"""`ef.Runtime` on a FITS bundle: what it reports, and the one-line InputError for every kind of bad input.

Also the errors for unknown backends and devices, and the single error base class.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

import edgeflex as ef

# The session bundle's FITS (tests/conftest.py: FITS_SHAPE); checked against the model in `rt`.
SEQ_LEN, PRED_LEN, CHANNELS = 24, 8, 3


@pytest.fixture(scope="module")
def rt(fits_bundle: Path, fits_model) -> ef.Runtime:
    assert (fits_model.seq_len, fits_model.pred_len, fits_model.channels) == (SEQ_LEN, PRED_LEN, CHANNELS)
    return ef.Runtime(fits_bundle, threads=1)


def _x(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, SEQ_LEN, CHANNELS)).astype(np.float32)


def test_inputs_outputs_configs(rt: ef.Runtime) -> None:
    (spec,) = rt.inputs
    assert (spec.name, spec.shape, spec.dtype) == ("x", (None, SEQ_LEN, CHANNELS), "float32")
    (out,) = rt.outputs
    assert (out.name, out.shape, out.dtype) == ("y", (None, SEQ_LEN + PRED_LEN, CHANNELS), "float32")
    assert [c.name for c in rt.configs] == ["default"] and rt.config == "default"
    rt.inputs.clear()                    # a copy: the runtime's own list is not touched
    assert len(rt.inputs) == 1


def test_info(rt: ef.Runtime, fits_bundle: Path) -> None:
    info = rt.info()
    assert set(info) == {"name", "path", "family", "backend", "backend_reason", "device", "threads", "config",
                         "inputs", "outputs", "configs", "export", "tools", "engine_versions", "fused",
                         "fused_reason", "thread_counts", "unavailable"}
    assert info["unavailable"] == {}                    # an fp32-only bundle: every config loads
    assert info["thread_counts"] == [1] and info["backend_reason"] == "asked for"
    assert info["fused"] is False and info["fused_reason"] == "no fused graphs in the bundle"
    assert info["path"] == str(fits_bundle) and info["family"] == "fits"
    assert (info["backend"], info["device"], info["threads"], info["config"]) == ("onnxruntime", "host", 1,
                                                                                 "default")
    assert info["inputs"] == [f"x [batch, {SEQ_LEN}, {CHANNELS}] float32"]
    assert info["engine_versions"] == {"onnxruntime": onnxruntime.__version__}
    assert info["export"]["validation"]["max_rel_err"] <= 1e-4


def test_run_matches_torch(rt: ef.Runtime, fits_model) -> None:
    x = _x(3)
    with torch.no_grad():
        want = fits_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(rt.run(x), want, rtol=0, atol=1e-5)


def _bad(rt: ef.Runtime, *arrays, match: str | None = None) -> str:
    with pytest.raises(ef.InputError) as info:
        rt.run(*arrays)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert "'x'" in msg or "x [batch" in msg, msg
    if match:
        assert match in msg, msg
    return msg


def test_float64_is_refused_with_the_cast(rt: ef.Runtime) -> None:
    _bad(rt, _x().astype(np.float64), match="astype(np.float32)")


def test_wrong_shape(rt: ef.Runtime) -> None:
    _bad(rt, np.zeros((2, SEQ_LEN + 1, CHANNELS), np.float32), match="shape")
    _bad(rt, np.zeros((2, SEQ_LEN, CHANNELS + 1), np.float32), match="shape")


def test_wrong_ndim(rt: ef.Runtime) -> None:
    _bad(rt, np.zeros((SEQ_LEN, CHANNELS), np.float32), match="shape")
    _bad(rt, np.zeros((1, 1, SEQ_LEN, CHANNELS), np.float32), match="shape")
    _bad(rt, np.ones((), np.float32), match="shape")


def test_wrong_number_of_inputs(rt: ef.Runtime) -> None:
    _bad(rt, _x(), _x(), match="got 2")
    _bad(rt, match="got 0")


def test_list_instead_of_ndarray(rt: ef.Runtime) -> None:
    _bad(rt, _x().tolist(), match="np.asarray")
    _bad(rt, torch.from_numpy(_x()), match="Tensor")


@pytest.mark.parametrize("value, kind", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_non_finite(rt: ef.Runtime, value: float, kind: str) -> None:
    x = _x()
    x[1, 5, 2] = value
    msg = _bad(rt, x, match="finite")
    assert f"1 {kind}" in msg and "(1, 5, 2)" in msg


def test_empty_batch(rt: ef.Runtime) -> None:
    _bad(rt, np.zeros((0, SEQ_LEN, CHANNELS), np.float32), match="empty batch")


def test_large_finite_values_are_accepted(rt: ef.Runtime) -> None:
    x = np.full((2, SEQ_LEN, CHANNELS), 3e38, np.float32)
    assert np.isfinite(x).all()
    with np.errstate(over="ignore"):
        assert not np.isfinite(x.sum())           # the fast check's sum overflows...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y = rt.run(x)                             # ...but the values are finite, so they run
    assert y.shape == (2, SEQ_LEN + PRED_LEN, CHANNELS)


def test_large_finite_values_raise_no_warning(rt: ef.Runtime) -> None:
    x = np.full((2, SEQ_LEN, CHANNELS), 3e38, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rt.run(x)


def test_non_contiguous_input(rt: ef.Runtime) -> None:
    base = np.random.default_rng(3).standard_normal((2, CHANNELS, SEQ_LEN)).astype(np.float32)
    x = base.transpose(0, 2, 1)
    assert x.shape == (2, SEQ_LEN, CHANNELS) and not x.flags.c_contiguous
    np.testing.assert_array_equal(rt.run(x), rt.run(np.ascontiguousarray(x)))
    sliced = _x(4)[::2]
    assert not sliced.flags.c_contiguous
    np.testing.assert_array_equal(rt.run(sliced), rt.run(sliced.copy()))


def test_unknown_backend(fits_bundle: Path) -> None:
    with pytest.raises(ef.BackendUnavailable, match="'nope'") as info:
        ef.Runtime(fits_bundle, backend="nope")
    assert "onnxruntime" in str(info.value)


@pytest.mark.parametrize("backend", ["tvm", "tensorrt"])
def test_planned_backend_says_what_is_available(fits_bundle: Path, backend: str) -> None:
    with pytest.raises(ef.BackendUnavailable, match="onnxruntime") as info:
        ef.Runtime(fits_bundle, backend=backend)
    assert backend in str(info.value) and "\n" not in str(info.value)


def test_unknown_device(fits_bundle: Path) -> None:
    with pytest.raises(ef.DeviceError, match="'jetson-nano-9000'") as info:
        ef.Runtime(fits_bundle, device="jetson-nano-9000")
    assert "host" in str(info.value)


def test_gpu_device_on_onnxruntime_needs_its_cuda_provider(fits_bundle: Path) -> None:
    """`device="DEVICE:gpu"` runs ORT on its CUDA provider or not at all: never silently on the CPU."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(ef.BackendUnavailable, match="no CUDA execution provider") as info:
        ef.Runtime(fits_bundle, device="jetson-orin-nano-8gb:gpu")
    assert "onnxruntime-gpu" in str(info.value) and "\n" not in str(info.value)
    assert ef.Runtime(fits_bundle, device="jetson-orin-nano-8gb").device == "jetson-orin-nano-8gb"  # its CPU


def test_unknown_config(fits_bundle: Path) -> None:
    with pytest.raises(ef.BundleError, match="'small'"):
        ef.Runtime(fits_bundle, config="small")


def test_one_error_base() -> None:
    for err in (ef.BundleError, ef.InputError, ef.BackendUnavailable, ef.DeviceError, ef.ExportError):
        assert issubclass(err, ef.EdgeflexError), err
    assert issubclass(ef.EdgeflexError, Exception)


def test_one_error_base_catches_each_failure(fits_bundle: Path, rt: ef.Runtime) -> None:
    calls = [lambda: ef.Runtime(fits_bundle, backend="tvm"), lambda: ef.Runtime(fits_bundle, device="x"),
             lambda: ef.Runtime(fits_bundle.parent / "missing.efx"), lambda: rt.run(_x().astype(np.float64))]
    for call in calls:
        with pytest.raises(ef.EdgeflexError):
            call()


def test_bad_threads_is_an_edgeflex_error(fits_bundle: Path) -> None:
    with pytest.raises(ef.EdgeflexError, match="threads"):
        ef.Runtime(fits_bundle, threads=0)


@pytest.mark.parametrize("n", [63, 64, 5040, (1 << 16) - 1, 1 << 16])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_check_at_every_size_and_extreme(n: int, dtype) -> None:
    # the check is a dot product below 64 Ki elements and another one above: finite values at the type's
    # limits must pass without a warning, and one NaN / inf anywhere must be caught
    from edgeflex.runtime.checks import _all_finite

    big = np.full(n, np.finfo(dtype).max, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _all_finite(big) and _all_finite(-big) and _all_finite(np.full(n, np.finfo(dtype).tiny, dtype))
        for bad in (np.nan, np.inf, -np.inf):
            for where in (0, n // 2, n - 1):
                for base in (big, np.zeros(n, dtype)):
                    y = base.copy()
                    y[where] = bad
                    assert not _all_finite(y), (bad, where)


def test_engines_names_what_a_config_runs_and_refuses_what_was_not_loaded(snnet_bundle) -> None:
    _, path = snnet_bundle
    rt = ef.Runtime(path, fused=False, threads=1)
    assert rt.engines() == rt.engines(rt.config)
    for c in rt.configs:
        assert len(rt.engines(c.name)) == len(c.segments)
    firsts = {}
    for c in rt.configs:                   # configs that start on the same segment share its engine
        first = rt.engines(c.name)[0]
        assert firsts.setdefault(c.segments[0], first) is first
    only = ef.Runtime(path, fused=False, threads=1, only=[rt.configs[0].name])
    with pytest.raises(ef.UsageError, match="was not loaded"):
        only.engines(rt.configs[1].name)
    with pytest.raises(ef.BundleError, match="no config 'nope'"):
        only.engines("nope")
    with pytest.raises(ef.UsageError, match="threads=2 was not loaded"):
        only.engines(threads=2)


def test_inputs_with_different_batch_sizes_are_refused_in_one_line(tmp_path: Path) -> None:
    # a two-input model whose inputs meet in one Add: ORT itself failed deep in that node
    class TwoIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(5, 7), torch.nn.Linear(3, 7)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    ef.export(TwoIn().eval(), (torch.randn(2, 5), torch.randn(2, 3)), tmp_path / "two.efx")
    two = ef.Runtime(tmp_path / "two.efx")
    with pytest.raises(ef.InputError, match=r"^expected one batch size for every input, got 'x0' 2, 'x1' 3$"):
        two.run(np.zeros((2, 5), np.float32), np.zeros((3, 3), np.float32))
    assert two.run(np.zeros((3, 5), np.float32), np.zeros((3, 3), np.float32)).shape == (3, 7)
