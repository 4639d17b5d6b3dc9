"""The TVM backend: `edgeflex compile` for this host (outputs equal ONNX Runtime and PyTorch), cross-compiled
aarch64 and CUDA artifacts (architecture and entry points of the shared object), the native-code trust rule,
and the engine's checksum. Skipped whole when apache-tvm is not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgeflex[tvm]'): TVM untested")

import edgeflex as ef  # noqa: E402
from edgeflex.cli import main as cli  # noqa: E402
from edgeflex.compile.tvm import (  # noqa: E402
    compile_bundle,
    cuda_ahead_check,
    find_nvcc,
    prepare_onnx,
    resolve_target,
)
from edgeflex.runtime.backends.tvm import TvmBackend, compiled_targets  # noqa: E402
from edgeflex.runtime.bundle import Bundle, update_bundle  # noqa: E402

CROSS = "aarch64-linux-gnu-g++"
needs_cross = pytest.mark.skipif(shutil.which(CROSS) is None, reason=f"{CROSS} not installed (Debian: "
                                 "apt-get install g++-aarch64-linux-gnu)")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _x(spec: ef.TensorSpec, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *spec.shape[1:])).astype(np.float32)


@pytest.fixture(scope="module")
def fits_tvm(tmp_path_factory, fits_bundle: Path) -> Path:
    """The session FITS bundle, copied and compiled for this host through the CLI."""
    path = tmp_path_factory.mktemp("tvm") / "fits.efx"
    shutil.copytree(fits_bundle, path)
    assert cli(["compile", str(path), "--backend", "tvm", "--target", "host"]) == 0
    return path


@pytest.fixture(scope="module")
def starnet_tvm(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    from edgeflex.models.starnet import starnet

    torch.manual_seed(0)
    model = starnet("s050", num_classes=10).eval()
    path = tmp_path_factory.mktemp("tvm") / "s050.efx"
    ef.export(model, torch.randn(1, 3, 32, 32), path, n_random=1)
    compile_bundle(path, "host")
    return model, path


def test_fits_on_tvm_equals_ort_and_pytorch(fits_tvm: Path, fits_model) -> None:
    rt, ort = ef.Runtime(fits_tvm, backend="tvm"), ef.Runtime(fits_tvm)
    assert rt.backend == "tvm" and rt.info()["engine_versions"]["target"] == "host"
    for n in (1, 5):                                    # one library, any batch size
        x = _x(rt.inputs[0], n, seed=n)
        y = rt.run(x)
        assert _rel(y, ort.run(x)) <= 1e-4
        with torch.no_grad():
            assert _rel(y, fits_model(torch.from_numpy(x)).numpy()) <= 1e-4


def test_runs_from_several_threads_each_get_their_own_answer(fits_tvm: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rt, ort = ef.Runtime(fits_tvm, backend="tvm"), ef.Runtime(fits_tvm)
    xs = [_x(rt.inputs[0], 1 + i % 3, seed=i) for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        ys = list(pool.map(rt.run, xs))
    for x, y in zip(xs, ys):
        assert _rel(y, ort.run(x)) <= 1e-4


def test_several_thread_counts_are_refused_on_tvm(fits_tvm: Path) -> None:
    # TVM's thread pool is process-wide: engines at 1 and 2 threads in one process would both run at one
    with pytest.raises(ef.UsageError, match="one thread count for the whole process.*onnxruntime"):
        ef.Runtime(fits_tvm, backend="tvm", threads=(2, 1))


def test_outputs_are_the_callers_and_inputs_are_not_kept(fits_tvm: Path) -> None:
    rt = ef.Runtime(fits_tvm, backend="tvm")
    x1, x2 = _x(rt.inputs[0], 2, seed=1), _x(rt.inputs[0], 2, seed=2)
    y1 = rt.run(x1)
    kept, x2_before = y1.copy(), x2.copy()
    y2 = rt.run(x2)                                     # same shapes: the same staging buffer, a fresh output
    np.testing.assert_array_equal(y1, kept)             # the first answer was not overwritten
    np.testing.assert_array_equal(x2, x2_before)        # the caller's input is copied, never written
    assert not np.may_share_memory(y1, y2) and not np.array_equal(y1, y2)
    x1[...] = 0                                         # changing an input after the run changes nothing
    np.testing.assert_array_equal(y1, kept)


def test_starnet_on_tvm_equals_ort_and_pytorch(starnet_tvm) -> None:
    model, path = starnet_tvm
    rt = ef.Runtime(path, backend="tvm")
    x = _x(rt.inputs[0], 2)
    y = rt.run(x)
    assert _rel(y, ef.Runtime(path).run(x)) <= 1e-4
    with torch.no_grad():
        assert _rel(y, model(torch.from_numpy(x)).numpy()) <= 1e-4


def test_dress_levels_share_one_library_with_each_levels_weights(tmp_path: Path) -> None:
    from edgeflex.export.elastic import export_dress
    from edgeflex.models.dress import DressModel, build_backbone

    torch.manual_seed(0)
    model = DressModel(build_backbone("mlp")).eval()
    path = export_dress(model, torch.randn(2, 1, 8, 8), tmp_path / "mlp.efx").path
    (engine,) = compile_bundle(path, "host", dress_kernel="dense")["engines"]  # each level's masked weights
    assert engine["params"] and len(engine["used_by"]) == len(Bundle.open(path).configs)
    assert engine["batch"] is None and engine["batch1"]["library"].endswith(".b1.so")   # + batch 1's own
    rt, ort = ef.Runtime(path, backend="tvm", dress_kernel="dense"), ef.Runtime(path, dress_kernel="dense")
    eng = rt.engines()[0]
    assert eng._fn1 is not None
    assert all(a is b for a, b in zip(eng._params, eng._params1))   # one copy of the weights, not two
    x, x1 = _x(rt.inputs[0], 3), _x(rt.inputs[0], 1, seed=1)
    outs = []
    for c in rt.configs:
        rt.switch(c.name)
        ort.switch(c.name)
        outs.append(rt.run(x))
        assert _rel(outs[-1], ort.run(x)) <= 1e-4, c.name
        assert _rel(rt.run(x1), ort.run(x1)) <= 1e-4, c.name          # the batch-1 library
    assert not np.allclose(outs[0], outs[-1])           # the levels really run different weights


@pytest.mark.slow
def test_snnet_segments_take_the_bundle_weights_as_parameters(tmp_path: Path, snnet_bundle) -> None:
    _, src = snnet_bundle
    path = tmp_path / "sn.efx"
    shutil.copytree(src, path)
    configs = Bundle.open(path).configs
    config = next(c.name for c in configs if any(s.startswith("stitch.") for s in c.segments))
    report = compile_bundle(path, "host", configs=[config])
    assert len(report["engines"]) == len(Bundle.open(path).config(config).segments)
    assert all(e["params"] for e in report["engines"])  # weights come from weights.bin, not the library
    # the stitching layer (a lone 1x1 conv) runs the conv kernel, not TVM's unscheduled default
    stitches = [e for e in report["engines"] if e["graph"].startswith("graphs/stitch.")]
    assert stitches and all("conv" in e["kernels"] for e in stitches), [(e["graph"], e["kernels"])
                                                                       for e in report["engines"]]
    rt, ort = ef.Runtime(path, backend="tvm", only=[config]), ef.Runtime(path, only=[config])
    x = _x(rt.inputs[0], 3)
    y = rt.run(x)                               # the segments hand each other TVM tensors
    assert _rel(y, ort.run(x)) <= 1e-4
    x1 = _x(rt.inputs[0], 1, seed=2)            # batch 1: each segment's batch-1 library
    engines = rt.engines()
    assert len(engines) > 1 and all(e._fn1 is not None for e in engines)
    assert _rel(rt.run(x1), ort.run(x1)) <= 1e-4
    # batch 1 takes the chain's batch-1 path (the first engine's own checks and staging): the same answer
    # as each engine's own run on numpy arrays, and the same one-line errors as ONNX Runtime
    assert engines[0].batch1(None, last=False) is not None
    general = [x1]
    for e in engines:
        general = e.run(general)
    np.testing.assert_array_equal(rt.run(x1), general[0])
    y1 = rt.run(x1)
    kept1 = y1.copy()
    rt.run(x1 + 1)
    np.testing.assert_array_equal(y1, kept1)
    for bad in (x1.astype(np.float64), x1[..., :-1], np.where(x1 > 1, np.nan, x1).astype(np.float32)):
        with pytest.raises(ef.InputError) as tvm_err:
            rt.run(bad)
        with pytest.raises(ef.InputError) as ort_err:
            ort.run(bad)
        assert str(tvm_err.value) == str(ort_err.value)
    kept = y.copy()
    y2 = rt.run(_x(rt.inputs[0], 3, seed=1))
    np.testing.assert_array_equal(y, kept)      # the next run wrote nothing the first one returned
    assert not np.array_equal(y2, kept)
    with pytest.raises(ef.BackendUnavailable, match="edgeflex compile") as info:
        ef.Runtime(path, backend="tvm")                 # the other configs' segments were not compiled
    assert "\n" not in str(info.value)


def test_an_uncompiled_bundle_says_how_to_compile(fits_bundle: Path) -> None:
    with pytest.raises(ef.BackendUnavailable, match="edgeflex compile") as info:
        ef.Runtime(fits_bundle, backend="tvm")
    assert "\n" not in str(info.value)


def _elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF"
    assert int.from_bytes(data[16:18], "little") == 3, "not a shared object (e_type != ET_DYN)"
    return int.from_bytes(data[18:20], "little")


def _dynamic_symbols(path: Path) -> set[str]:
    nm = shutil.which("aarch64-linux-gnu-nm") or shutil.which("nm")
    if nm is None:
        pytest.skip("no nm to list the library's symbols")
    out = subprocess.run([nm, "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True)
    return {ln.split()[-1] for ln in out.stdout.splitlines() if ln.strip()}


@needs_cross
def test_aarch64_cross_compile_is_an_arm64_library_with_vm_entry_points(tmp_path, fits_tvm: Path) -> None:
    path = tmp_path / "fits.efx"
    shutil.copytree(fits_tvm, path)
    report = compile_bundle(path, "rpi5")
    (engine,) = report["engines"]
    assert engine["target"]["mtriple"] == "aarch64-linux-gnu" and engine["target"]["mcpu"] == "cortex-a76"
    lib = path / engine["library"]
    assert engine["library"] == "engines/tvm/rpi5/main.so"
    assert _elf_machine(lib.read_bytes()) == 183        # EM_AARCH64
    symbols = _dynamic_symbols(lib)
    # The Relax VM's bytecode and constants, and one exported function per compiled kernel.
    assert "__tvm_ffi__library_bin" in symbols
    assert {s for s in symbols if s.startswith("__tvm_ffi_")} == set(engine["elf"]["symbols"])
    kernel = "fits" if engine["kernels"] == ["fits"] else "matmul"  # edgeflex's FITS kernel, or TVM's GEMMs
    assert any(s.startswith(f"__tvm_ffi_{kernel}") for s in symbols), sorted(symbols)
    Bundle.open(path)                                   # listed and checksummed like every bundle file
    with pytest.raises(ef.BackendUnavailable, match="aarch64") as info:  # arm64 code here: refused, not run
        TvmBackend().open(Bundle.open(path), device="rpi5")
    assert "\n" not in str(info.value)


@needs_cross
def test_jetson_gpu_target_is_cuda_with_an_aarch64_host(tmp_path: Path, fits_tvm: Path) -> None:
    target = resolve_target("jetson-orin-nano:gpu")
    assert target.target["kind"] == "cuda" and target.target["arch"] == "sm_87"
    assert target.target["host"]["mcpu"] == "cortex-a78ae" and target.linker == CROSS
    path = tmp_path / "fits.efx"
    shutil.copytree(fits_tvm, path)
    try:
        report = compile_bundle(path, "jetson-orin-nano:gpu")
    except ef.BackendUnavailable as e:                  # a TVM build or machine without CUDA codegen
        assert "\n" not in str(e) and ("CUDA" in str(e) or "nvcc" in str(e))
        pytest.skip(f"CUDA code generation unavailable here: {e}")
    (engine,) = report["engines"]
    assert "cuda" in engine["modules"] and engine["unit"] == "gpu"
    with Bundle.open(path) as b:        # what `quantize` tells the user to compile again, as compile names it
        assert compiled_targets(b) == ["host", "jetson-orin-nano-8gb:gpu"]
    # This wheel embeds CUDA C (compiled by NVRTC/nvcc when loaded on the GPU), or ahead-of-time device code.
    assert engine["cuda_device_code"] in ("source", "ptx", "cubin", "fatbin")
    assert _elf_machine((path / engine["library"]).read_bytes()) == 183
    check = engine["cuda_check"]                        # the CUDA C compiled for sm_87 here, by nvcc
    if find_nvcc() is None:
        assert "nvcc not found" in check["skipped"]
    else:
        assert check["arch"] == "sm_87" and check["kernels"] >= 1 and check["cubin_bytes"] > 0, check
    # `device="DEVICE:gpu"` loads a GPU's engines; arm64 host code is refused here before anything loads
    with pytest.raises(ef.BackendUnavailable, match="aarch64") as info:
        ef.Runtime(path, backend="tvm", device="jetson-orin-nano-8gb:gpu")
    assert "\n" not in str(info.value)
    with pytest.raises(ef.BackendUnavailable, match="no TVM engines for target 'jetson-orin-nano-8gb'"):
        ef.Runtime(path, backend="tvm", device="jetson-orin-nano-8gb")      # the CPU's: not compiled


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda*)")
def test_cuda_c_that_does_not_build_fails_the_compile_in_one_line() -> None:
    class Module:                                       # stands in for a compiled module's CUDA import
        kind, imports = "cuda", []

        def inspect_source(self, fmt: str) -> str:
            return 'extern "C" __global__ void k(float* x) { x[0] = undeclared_name; }'

    target = resolve_target("jetson-orin-nano:gpu")
    with pytest.raises(ef.BackendUnavailable, match="does not compile for sm_87") as info:
        cuda_ahead_check(Module(), target, "graphs/main.onnx")
    assert "\n" not in str(info.value) and "undeclared_name" in str(info.value)


def test_gpu_engines_for_this_architecture_need_a_cuda_gpu(tmp_path: Path, fits_tvm: Path) -> None:
    """An x86-64 data-centre GPU target compiles here; loading it needs TVM's CUDA runtime and a GPU. Where
    there is none (CI), the refusal is one line naming what is missing; on a GPU machine the engine runs
    and equals ONNX Runtime (benchmarks/gpu_check.py checks every config there)."""
    path = tmp_path / "fits.efx"
    shutil.copytree(fits_tvm, path)
    try:
        (engine,) = compile_bundle(path, "nvidia-h100-sxm:gpu")["engines"]
    except ef.BackendUnavailable as e:
        pytest.skip(f"CUDA code generation unavailable here: {e}")
    assert engine["unit"] == "gpu" and engine["library"].startswith("engines/tvm/nvidia-h100-sxm-gpu/")
    assert _elf_machine((path / engine["library"]).read_bytes()) == 62
    shape = (2, *Bundle.open(path).inputs[0].shape[1:])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    try:
        rt = ef.Runtime(path, backend="tvm", device="nvidia-h100-sxm:gpu")
    except ef.BackendUnavailable as e:
        assert "\n" not in str(e) and ("CUDA" in str(e) or "GPU" in str(e)), e
        return
    want = ef.Runtime(path).run(x)
    np.testing.assert_allclose(rt.run(x), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def _rewrite_engine_json(path: Path, change) -> None:
    rel = "engines/tvm/host/main.json"
    meta = json.loads((path / rel).read_text())
    change(meta)
    update_bundle(path, {rel: (json.dumps(meta, indent=1) + "\n").encode()})


def test_native_code_from_another_user_needs_allow_native(tmp_path: Path, fits_tvm: Path) -> None:
    path = tmp_path / "fits.efx"
    shutil.copytree(fits_tvm, path)

    def other_user(meta: dict) -> None:
        meta["created_by"] = {"uid": meta["created_by"]["uid"] + 4242, "user": "mallory",
                              "machine": "elsewhere"}

    _rewrite_engine_json(path, other_user)             # checksums valid: only the trust rule refuses it
    with pytest.raises(ef.BundleError, match="allow_native") as info:
        ef.Runtime(path, backend="tvm")
    assert "mallory" in str(info.value) and "\n" not in str(info.value)
    x = _x(ef.Runtime(path).inputs[0], 2)
    assert _rel(ef.Runtime(path, backend="tvm", allow_native=True).run(x), ef.Runtime(path).run(x)) <= 1e-4


def test_engine_library_is_checksummed(tmp_path: Path, fits_tvm: Path) -> None:
    path = tmp_path / "fits.efx"
    shutil.copytree(fits_tvm, path)
    bundle = Bundle.open(path)                          # opened (verified) first ...
    lib = path / "engines/tvm/host/main.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))                        # ... then the library changes under it
    with pytest.raises(ef.BundleError, match="main.so"):
        ef.Runtime(bundle, backend="tvm")
    with pytest.raises(ef.BundleError, match="main.so"):
        ef.Runtime(path, backend="tvm")


def test_host_engines_compiled_for_another_cpu_are_refused(tmp_path: Path, fits_tvm: Path) -> None:
    path = tmp_path / "fits.efx"
    shutil.copytree(fits_tvm, path)
    _rewrite_engine_json(path, lambda meta: meta["host"].update(mcpu="some-other-cpu"))
    with pytest.raises(ef.BackendUnavailable, match="some-other-cpu") as info:
        ef.Runtime(path, backend="tvm")
    assert "compile --target host" in str(info.value)


def test_dft_form_is_refused_with_the_fix(fits_model) -> None:
    from edgeflex.kernels import spectral
    from edgeflex.models.fits import spectral_weights

    graph = spectral.to_onnx(spectral_weights(fits_model), "dft", channels=fits_model.channels)
    with pytest.raises(ef.BackendUnavailable, match="DFT") as info:
        prepare_onnx(graph.SerializeToString(), {})
    assert "lowrank" in str(info.value)


def test_unknown_target_lists_the_known_ones() -> None:
    with pytest.raises(ef.DeviceError, match="rpi5"):
        resolve_target("jetson-nano-9000")
    assert resolve_target("jetson-agx-orin").name == "jetson-agx-orin-64gb"


def test_backend_auto_runs_what_compile_measured_faster(tmp_path: Path, fits_tvm: Path,
                                                         fits_bundle: Path) -> None:
    """`edgeflex compile --target host` times TVM against ONNX Runtime; `backend="auto"` runs the faster,
    and ONNX Runtime wherever that measurement is missing, stale, from another CPU or for another device."""
    path = tmp_path / "fits.efx"
    shutil.copytree(fits_tvm, path)
    rel = "engines/tvm/host/choices/backend.json"
    choice = json.loads((path / rel).read_text())
    assert choice["faster"] in ("tvm", "onnxruntime") and choice["p25_us"]
    assert all(v["tvm"] > 0 and v["onnxruntime"] > 0 for v in choice["p25_us"].values())
    rt = ef.Runtime(path, backend="auto")
    assert rt.backend == choice["faster"] and "measured by `edgeflex compile`" in rt.backend_reason
    assert rt.info()["backend_reason"] == rt.backend_reason
    x = np.random.default_rng(0).standard_normal((2, *rt.inputs[0].shape[1:])).astype(np.float32)
    np.testing.assert_allclose(rt.run(x), ef.Runtime(path).run(x), rtol=1e-4, atol=1e-5)
    assert ef.Runtime(path, backend="auto", device="rpi5").backend == "onnxruntime"

    def rewrite(change) -> ef.Runtime:
        data = dict(choice)
        change(data)
        update_bundle(path, {rel: (json.dumps(data) + "\n").encode()})
        return ef.Runtime(path, backend="auto")

    for change, why in ((lambda d: d.update(faster="tvm", stale=True), "changed since"),
                        (lambda d: d.update(faster="tvm", host={"arch": "aarch64", "mcpu": "cortex-a76"}),
                         "measured on aarch64")):
        rt = rewrite(change)
        assert rt.backend == "onnxruntime" and why in rt.backend_reason, rt.backend_reason
    rt = ef.Runtime(fits_bundle, backend="auto")                 # never compiled: nothing measured
    assert rt.backend == "onnxruntime" and "no TVM engines measured" in rt.backend_reason


def test_engine_copies_an_output_that_aliases_its_input() -> None:
    # The engine hands the VM's outputs over as numpy views; a graph that returns its input (or a view of
    # it) would hand back the engine's staging buffer, which the next call overwrites: those are copied.
    import tvm
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R

    from edgeflex.runtime.backends.tvm import TvmEngine

    @I.ir_module
    class Mod:
        @R.function
        def same(x: R.Tensor((2, 3), "float32")):
            return x

        @R.function
        def views(x: R.Tensor((2, 3), "float32")):
            y = R.reshape(x, (3, 2))
            z = R.add(x, x)
            return (y, z)

    vm = relax.VirtualMachine(tvm.compile(Mod, target="llvm"), tvm.cpu())
    spec = ef.TensorSpec("x", (2, 3), "float32")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    same = TvmEngine(vm["same"], tvm.cpu(), [], [spec], [spec], None, "same")
    (y,) = same.run([x])
    assert not np.shares_memory(y, same._stages[0][0])
    y_kept = y.copy()
    same.run([x + 10])
    np.testing.assert_array_equal(y, y_kept)
    views = TvmEngine(vm["views"], tvm.cpu(), [], [spec],
                      [ef.TensorSpec("y", (3, 2), "float32"), spec], None, "views")
    y, z = views.run([x])
    np.testing.assert_array_equal(y, x.reshape(3, 2))
    np.testing.assert_array_equal(z, 2 * x)
    assert not np.shares_memory(y, views._stages[0][0]) and not np.shares_memory(z, views._stages[0][0])
    # chained (the backend's composed plan): the first engine hands the next its output tensor; one that is
    # its staging buffer is copied (64-byte aligned, as compiled code assumes) before the lock is let go,
    # so the next run, which overwrites the staging buffer, changes nothing already handed out
    chain = TvmBackend.compose(None, [same, views])
    y, z = chain([x])
    chain([x + 100])
    np.testing.assert_array_equal(y, x.reshape(3, 2))
    np.testing.assert_array_equal(z, 2 * x)
    assert y.ctypes.data % 64 == 0


def test_batch1_fast_path_checks_what_the_general_path_checks(fits_tvm: Path) -> None:
    # Runtime.run at batch 1 on a one-input CPU engine takes the engine's fast path (its own checks, staging
    # buffer and batch-1 library call): every bad input must still get the general path's one-line error,
    # and every input the general path takes must still run, with the same answer.
    import warnings

    rt, ort = ef.Runtime(fits_tvm, backend="tvm"), ef.Runtime(fits_tvm)
    spec = rt.inputs[0]
    x = _x(spec, 1, seed=7)
    (engine,) = rt.engines()
    (general,) = engine.run([x])                        # the general path, same engine
    taken = []
    run1 = engine.batch1(lambda arrays: taken.append(arrays) or "general", last=True)
    assert run1 is not None and not hasattr(ort.engines()[0], "batch1")
    assert isinstance(run1([x]), np.ndarray) and not taken
    assert run1([x[:, :-1]]) == "general" and len(taken) == 1
    y = rt.run(x)
    np.testing.assert_array_equal(y, general)
    assert _rel(y, ort.run(x)) <= 1e-4
    bad = {"float64": x.astype(np.float64), "shape": x[:, :-1], "ndim": x[0], "list": x.tolist(),
           "more channels": np.concatenate([x, x], axis=2)}
    for kind, value in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
        z = x.copy()
        z[0, 3, 1] = value
        bad[kind] = z
    for what, a in bad.items():
        with pytest.raises(ef.InputError) as tvm_err:
            rt.run(a)
        with pytest.raises(ef.InputError) as ort_err:
            ort.run(a)
        assert str(tvm_err.value) == str(ort_err.value), what
    # taken as they are by the general path: a non-contiguous view, an ndarray subclass, huge finite values
    base = np.ascontiguousarray(_x(spec, 1, seed=8).transpose(0, 2, 1))
    view = base.transpose(0, 2, 1)
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(rt.run(view), rt.run(np.ascontiguousarray(view)))

    class Sub(np.ndarray):
        pass

    np.testing.assert_array_equal(rt.run(x.view(Sub)), y)
    huge = np.full_like(x, 3e38)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # the fast check's dot must not overflow either
        assert rt.run(huge).shape == y.shape
    # fresh outputs, the caller's input neither kept nor written
    x_before, kept = x.copy(), y.copy()
    y2 = rt.run(x + 1)
    np.testing.assert_array_equal(y, kept)
    np.testing.assert_array_equal(x, x_before)
    assert not np.may_share_memory(y, y2)


def test_batch1_check_accepts_exactly_what_check_inputs_accepts() -> None:
    # the fast path's predicate against check_inputs, across dtypes, sizes on either side of the dot's
    # range (63 and 64 elements) and bad values: it may turn down more (then check_inputs decides), never less
    from edgeflex.runtime.checks import batch1_check, check_inputs

    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64", "float16", "int64"):
        for shape in ((None, 7, 9), (1, 64), (None, 63), (1,)):
            spec = ef.TensorSpec("x", shape, dtype)
            got = batch1_check(spec)
            assert got is not None
            one, ok = got
            assert one == (1, *shape[1:])
            cases = [rng.standard_normal(one).astype(dtype), np.zeros((2, *one[1:]), dtype),
                     np.zeros(one, "float32" if dtype != "float32" else "float64"), np.zeros(one[1:], dtype)]
            if np.dtype(dtype).kind == "f":
                for value in (np.nan, np.inf):
                    z = np.zeros(one, dtype)
                    z.flat[-1] = value
                    cases.append(z)
            assert ok(cases[0]) and not ok(cases[1])    # batch 1 taken; batch 2 left to the general path
            for a in cases:
                try:
                    check_inputs([spec], [a])
                    passes = True
                except ef.InputError:
                    passes = False
                assert passes or not ok(a), (dtype, shape, a.shape, a.dtype)
                assert passes == ok(a) or a.shape[0] != 1, (dtype, shape, a.shape, a.dtype)
    # a spec with an open dimension besides the batch has no one batch-1 shape
    assert batch1_check(ef.TensorSpec("x", (None, None, 3), "float32")) is None
    assert batch1_check(ef.TensorSpec("x", (4, 3), "float32")) is None


_LAUNCHER_PROBE = r'''
import ctypes, os, sys
import tvm
from edgeflex.runtime.backends.tvm import _LAMBDA, _configure_threads

lib = tvm.base._LOADED_LIBS["tvm_runtime"]
libc = ctypes.CDLL(None)
libc.malloc_usable_size.restype = ctypes.c_size_t
libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
lib.TVMBackendParallelLaunch.argtypes = [_LAMBDA, ctypes.c_void_p, ctypes.c_int]
seen = {}

def task(task_id, penv, cdata):          # TVMParallelGroupEnv: {void* sync_handle; int32 num_task}
    seen[task_id] = ctypes.cast(penv, ctypes.POINTER(ctypes.c_void_p))[0]
    return 0

cb = _LAMBDA(task)
cores = len(os.sched_getaffinity(0))
for n in (1, cores):                     # the runtime's first engine at 1 thread, a later one at every core
    _configure_threads(n)
    seen.clear()
    assert lib.TVMBackendParallelLaunch(cb, None, 0) == 0
    # the barrier counters: one per task, 64 bytes apart (TVM's kSyncStride)
    print(n, libc.malloc_usable_size(seen[0]))
'''


def test_the_tvm_launcher_holds_a_barrier_counter_for_every_core_after_a_first_run_at_one_thread(
        tmp_path: Path) -> None:
    """TVM sizes a thread's barrier counters at its first parallel launch and does not grow them for a
    count one higher: after a run at 1 thread, a run at 2 used a counter past the 64 bytes allocated
    (inside glibc's 8 bytes of slack). `_configure_threads` sizes them for every core first. (In a fresh
    process: this one's launcher is sized already.)"""
    import os

    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: TVM runs no thread pool")
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    if not libc.startswith("glibc"):
        pytest.skip("malloc_usable_size needs glibc")
    script = tmp_path / "probe.py"
    script.write_text(_LAUNCHER_PROBE)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [tuple(int(v) for v in line.split()) for line in out.stdout.split("\n") if line.strip()]
    assert [n for n, _ in rows] == [1, cores]
    assert all(usable >= cores * 64 for _, usable in rows), rows


class _LastStepGRU(torch.nn.Module):
    """A user's GRU regressor: ONNX Runtime runs its GRU node, TVM 0.27's ONNX frontend has no GRU."""

    def __init__(self):
        super().__init__()
        self.gru = torch.nn.GRU(4, 8, batch_first=True)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x):
        h, _ = self.gru(x)
        return self.out(h[:, -1])


def test_compiling_an_op_tvm_cannot_import_fails_in_one_line_and_leaves_the_bundle(tmp_path, capsys):
    path = tmp_path / "gru.efx"
    ef.export(_LastStepGRU().eval(), torch.randn(2, 10, 4), path)
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert cli(["compile", str(path), "--target", "host"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeflex: error: TVM ") and "GRU" in err[-1] and "graphs/main.onnx" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert ef.Runtime(path).run(np.ones((1, 10, 4), np.float32)).shape == (1, 1)


def test_backend_auto_runs_onnx_runtime_while_tvm_engines_miss_configs_added_after_compile(
        tmp_path: Path, fits_tvm: Path, capsys) -> None:
    # `quantize` after `compile` adds configs without engines: auto chose TVM and refused the whole bundle
    path = tmp_path / "fits.efx"
    shutil.copytree(fits_tvm, path)
    rel = "engines/tvm/host/choices/backend.json"
    choice = json.loads((path / rel).read_text())
    update_bundle(path, {rel: (json.dumps({**choice, "faster": "tvm"}) + "\n").encode()})
    assert ef.Runtime(path, backend="auto").backend == "tvm"
    spec = ef.Runtime(path).inputs[0]
    np.savez(tmp_path / "cal.npz", x=_x(spec, 64))
    assert cli(["quantize", str(path), "--calibration", str(tmp_path / "cal.npz"), "--precision", "int8",
                "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"run `edgeflex compile {path} --target host` before running it with --backend tvm" in out
    added = [c.name for c in ef.Runtime(path).configs if c.name.endswith("@int8")]
    assert added
    rt = ef.Runtime(path, backend="auto")
    assert rt.backend == "onnxruntime" and "do not cover config(s)" in rt.backend_reason
    assert all(name in rt.backend_reason for name in added[:3]), rt.backend_reason
    for name in added:
        rt.switch(name)
        assert rt.run(_x(spec, 2)).shape[0] == 2


def test_compiled_targets_name_each_engine_folder_as_compile_takes_it(tmp_path: Path, fits_tvm: Path) -> None:
    # a GPU's folder is DEVICE-gpu; `edgeflex compile --target` takes DEVICE:gpu (quantize's hint names it)
    path = tmp_path / "fits.efx"
    shutil.copytree(fits_tvm, path)
    record = json.loads((path / "engines/tvm/host/main.json").read_text())
    gpu = "engines/tvm/jetson-orin-nano-8gb-gpu"
    update_bundle(path, {f"{gpu}/main.json": json.dumps({**record, "unit": "gpu",
                                                          "library": f"{gpu}/main.so"}).encode(),
                         f"{gpu}/main.so": (path / record["library"]).read_bytes()})
    with Bundle.open(path) as b:
        assert compiled_targets(b) == ["host", "jetson-orin-nano-8gb:gpu"]
