"""Bundles run for real on an emulated Raspberry Pi 5 (`edgeflex.devices.board`: arm64 Debian + aarch64 TVM
under QEMU, CPU model Cortex-A76): FITS, StarNet, DRESS (dense and row-sparse kernels) and a segmented SN-Net
config are exported here, compiled for `rpi5` (cross-linked aarch64) and for this host, and the board's
`Runtime(backend="tvm", device="rpi5")` outputs must equal ONNX Runtime's and host TVM's. Skipped when the
board is not built (`make board-test` builds it). Emulated timings mean nothing and are not measured."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgeflex[tvm]'): board untested")

import edgeflex as ef  # noqa: E402
from edgeflex.compile.tvm import compile_bundle  # noqa: E402
from edgeflex.devices.board import Board  # noqa: E402

BOARD = Board(Path(__file__).resolve().parents[1] / ".board")
WHY = BOARD.why_not_ready()
pytestmark = pytest.mark.skipif(WHY is not None, reason=str(WHY))
TOL = 1e-4


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _outputs(rt: ef.Runtime, xs: list[np.ndarray], configs: list[str]) -> dict[str, np.ndarray]:
    outs = {}
    for config in configs:
        rt.switch(config)
        y = rt.run(*xs)
        for i, a in enumerate(y if isinstance(y, tuple) else (y,)):
            outs[f"{config}/{i}"] = a
    return outs


def _bundles(tmp: Path, fits_bundle: Path, snnet_bundle, make_fits) -> dict[str, tuple[Path, list[str] | None,
                                                                                      dict]]:
    """name -> (bundle path, configs to compile and run (None: all), Runtime/compile options)."""
    from edgeflex.export.elastic import export_dress
    from edgeflex.models.dress import DressModel, build_backbone
    from edgeflex.models.starnet import starnet

    shutil.copytree(fits_bundle, tmp / "fits.efx")
    # lengths that are multiples of 16: the split (FFT-structured) FITS kernel, on arm64 too
    ef.export(make_fits(256, 64, 3, 30, seed=2), torch.randn(2, 256, 3), tmp / "fits-split.efx")
    torch.manual_seed(0)
    ef.export(starnet("s050", num_classes=10).eval(), torch.randn(1, 3, 32, 32), tmp / "s050.efx", n_random=1)
    torch.manual_seed(0)
    export_dress(DressModel(build_backbone("mlp")).eval(), torch.randn(2, 1, 8, 8), tmp / "mlp.efx")
    _, sn = snnet_bundle
    shutil.copytree(sn, tmp / "sn.efx")
    stitched = next(c.name for c in ef.Bundle.open(tmp / "sn.efx").configs
                    if any(s.startswith("stitch.") for s in c.segments))
    return {"fits": (tmp / "fits.efx", None, {}), "fits-split": (tmp / "fits-split.efx", None, {}),
            "starnet-s050": (tmp / "s050.efx", None, {}),
            "dress-mlp": (tmp / "mlp.efx", None, {}),
            "dress-mlp-sparse": (tmp / "mlp.efx", None, {"dress_kernel": "sparse"}),
            "snnet-stitched": (tmp / "sn.efx", [stitched], {})}


@pytest.fixture(scope="module")
def board_run(tmp_path_factory, fits_bundle: Path, snnet_bundle, make_fits):
    """Everything compiled for host and rpi5, the host references, and one board run over all bundles."""
    tmp = tmp_path_factory.mktemp("board")
    spec = {"device": "rpi5", "cases": {}}
    host, kernels = {}, {}
    t0 = time.perf_counter()
    for name, (path, configs, opts) in _bundles(tmp, fits_bundle, snnet_bundle, make_fits).items():
        compile_bundle(path, "host", configs=configs, **opts)
        engines = compile_bundle(path, "rpi5", configs=configs, **opts)["engines"]
        kernels[name] = sorted({k for e in engines for k in e["kernels"]}
                               | {"fits (split)" for e in engines for f in e["kernel_functions"]
                                  if f.startswith("fits_split_")})
        ort = ef.Runtime(path, threads=1, only=configs, **opts)
        tvm = ef.Runtime(path, backend="tvm", threads=1, only=configs, **opts)
        names = configs or [c.name for c in ort.configs]
        rng = np.random.default_rng(7)
        xs = [rng.standard_normal((3, *s.shape[1:])).astype(np.float32) for s in ort.inputs]
        np.savez(tmp / f"{name}.in.npz", **{f"x{i}": x for i, x in enumerate(xs)})
        host[name] = {"ort": _outputs(ort, xs, names), "tvm-host": _outputs(tvm, xs, names)}
        spec["cases"][name] = {"bundle": str(path), "inputs": str(tmp / f"{name}.in.npz"), "configs": configs,
                               "options": opts, "out": str(tmp / f"{name}.board.npz")}
    (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
    t1 = time.perf_counter()
    report = BOARD.run_cases(tmp / "spec.json", timeout=600)
    report["seconds"] = {"host": t1 - t0, "board": time.perf_counter() - t1}
    report["kernels"] = kernels
    board = {}
    for name, case in spec["cases"].items():
        with np.load(case["out"]) as z:
            board[name] = {k: z[k] for k in z.files}
    return report, host, board


def test_board_is_an_arm64_cortex_a76(board_run) -> None:
    report, _, _ = board_run
    assert report["machine"] == "aarch64"
    # QEMU's cortex-a76 model: Armv8.2 dot product and fp16, no SVE (QEMU's default `max` CPU has SVE).
    assert {"asimd", "asimddp", "fphp", "asimdhp", "atomics"} <= set(report["hwcaps"])
    assert "sve" not in report["hwcaps"]
    print(f"\nboard: {report['machine']} python {report['python']} numpy {report['numpy']}, hwcaps "
          f"{' '.join(report['hwcaps'])} (LLVM host cpu under QEMU: {report['llvm_cpu']}); host export + "
          f"compile + references {report['seconds']['host']:.0f} s, board run "
          f"{report['seconds']['board']:.0f} s (emulated: not a latency)")


def test_board_runtime_needs_neither_torch_nor_onnxruntime(board_run) -> None:
    report, _, _ = board_run
    assert report["imported"] == []           # not installed on the board: an import would have failed too


def test_board_refuses_native_code_from_another_machine_without_allow_native(board_run) -> None:
    report, _, _ = board_run
    for name, case in report["cases"].items():
        msg = case["refused_without_allow_native"]
        assert msg is not None and "another machine" in msg and "allow_native" in msg, name
        assert case["engine_versions"]["target"] == "rpi5"


def test_board_fits_at_multiples_of_16_runs_the_split_kernel(board_run) -> None:
    report, _, _ = board_run
    assert "fits (split)" in report["kernels"]["fits-split"]
    assert "fits (split)" not in report["kernels"]["fits"]          # L = 24: the low-rank kernel


@pytest.mark.parametrize("name", ["fits", "fits-split", "starnet-s050", "dress-mlp", "dress-mlp-sparse",
                                  "snnet-stitched"])
def test_board_outputs_equal_host_onnxruntime_and_tvm(board_run, name: str) -> None:
    report, host, board = board_run
    ort, tvm, arm = host[name]["ort"], host[name]["tvm-host"], board[name]
    assert set(arm) == set(ort) and arm
    worst = {"ort": 0.0, "tvm-host": 0.0}
    for key in sorted(ort):
        assert arm[key].shape == ort[key].shape and arm[key].dtype == ort[key].dtype, key
        worst["ort"] = max(worst["ort"], _rel(arm[key], ort[key]))
        worst["tvm-host"] = max(worst["tvm-host"], _rel(arm[key], tvm[key]))
    print(f"\nboard rpi5 vs host, {name} ({len(arm)} outputs, TIR kernels: "
          f"{', '.join(report['kernels'][name]) or 'none'}): max rel diff vs ORT {worst['ort']:.2e}, "
          f"vs TVM-host {worst['tvm-host']:.2e}")
    assert worst["ort"] <= TOL and worst["tvm-host"] <= TOL
    if name.startswith("dress-mlp"):          # the levels really ran different weights on the board
        outs = [arm[k] for k in sorted(arm)]
        assert not np.allclose(outs[0], outs[-1])
