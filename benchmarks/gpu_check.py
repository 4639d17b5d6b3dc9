"""TVM CUDA engines on a real GPU: compiled here, run there through `Runtime(device="DEVICE:gpu")`.

Two halves, because the GPU machine lent to a session is a different machine with no registry access:

    # here (no GPU): compile the bundles for a catalogue GPU, record the host's ORT outputs, pack TVM's
    # runtime (its 5 MB of runtime libraries, not the 260 MB compiler) and edgeflex as wheels
    .venv/bin/python benchmarks/gpu_check.py prepare --dir .gpu [--bundles B.efx ...]
    # there (python3 with numpy, onnxruntime, torch+CUDA): every config of every bundle on the GPU, its
    # outputs against the host's, latency against ORT on that machine's CPU, StarNet-S1 against torch eager
    python3 benchmarks/gpu_check.py run --dir .gpu --out results.json
    # there, TensorRT only (e.g. a Jetson with JetPack 6: TensorRT 10.3, no TVM runtime needed)
    python3 benchmarks/gpu_check.py tensorrt --dir .gpu --out results.json
    # anywhere: the result as a markdown table
    python3 benchmarks/gpu_check.py report results.json

`run` exits 2 if a bundle does not load on the GPU, 1 if any config's output differs from the host's by
more than --tolerance (relative to the output's largest magnitude). It also says what TensorRT and ONNX
Runtime's GPU providers it found. Both `run` and `tensorrt` run the TensorRT leg: every case on
`Runtime(backend="tensorrt")` (plans built on that GPU at first load, stored in the bundle copies), its
outputs against the host's ONNX Runtime outputs within --trt-tolerance, and its latency; where TensorRT or a
GPU is missing the leg is skipped and the report says why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

TARGET = "nvidia-h100-sxm:gpu"
BATCHES = (1, 16)
PACK = "pack.tar.gz"


def _inputs(rt, batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for spec in rt.inputs:
        shape = [batch if d is None else d for d in spec.shape]
        out.append(rng.standard_normal(shape).astype(spec.dtype))
    return out


def prepare(args: argparse.Namespace) -> None:
    import tvm

    import edgeflex as ef
    from edgeflex.compile.tvm import compile_bundle
    from edgeflex.runtime.bundle import Bundle

    d = Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    (d / "bundles").mkdir(parents=True)
    cases = []
    for src in args.bundles:
        name = Path(src).name
        dst = d / "bundles" / name
        shutil.copytree(src, dst)
        t0 = time.perf_counter()
        # SN-Net: the chained segments and each config's fused graph (both run on the GPU)
        modes = [False, True] if Bundle.open(dst).family == "snnet" else [False]
        for fused in modes:
            compile_bundle(dst, args.target, fused=fused)
        print(f"{name}: compiled for {args.target} in {time.perf_counter() - t0:.1f} s", flush=True)
        for fused in modes:
            rt = ef.Runtime(dst, backend="onnxruntime", fused=fused, threads=2)
            for cfg in [c.name for c in rt.configs]:
                rt.switch(cfg)
                for batch in BATCHES:
                    key = f"{name}|{cfg}|{int(fused)}|{batch}"
                    xs = _inputs(rt, batch, seed=len(cases))
                    ys = rt.run(*xs)
                    ys = list(ys) if isinstance(ys, tuple | list) else [ys]
                    np.savez(d / f"case{len(cases)}.npz", *xs, *ys)
                    cases.append({"key": key, "bundle": name, "config": cfg, "fused": fused, "batch": batch,
                                  "n_in": len(xs), "file": f"case{len(cases)}.npz"})
    (d / "cases.json").write_text(json.dumps({"target": args.target, "cases": cases,
                                              "host": platform.processor() or platform.machine()}, indent=1))
    # TVM's runtime alone: the package without the compiler library (edgeflex loads engines with the
    # runtime; tvm falls back to runtime-only mode when libtvm_compiler.so is absent)
    pkg = Path(tvm.__file__).parent
    with tarfile.open(d / "tvm-runtime.tar.gz", "w:gz") as tar:
        tar.add(pkg, arcname="tvm", filter=lambda ti: None if any(
            part in ("3rdparty", "include", "__pycache__") for part in Path(ti.name).parts)
            or ti.name.endswith("libtvm_compiler.so") else ti)
    wheels = d / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform",
                    "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64", "-d", str(wheels),
                    f"apache-tvm-ffi=={_version('apache-tvm-ffi')}"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(Path(__file__).resolve().parents[1])], check=True)
    # the bundles and cases travel compressed (the engines' embedded CUDA C packs ~4:1)
    with tarfile.open(d / PACK, "w:gz") as tar:
        for p in ["bundles", "cases.json", *(c["file"] for c in cases)]:
            tar.add(d / p, arcname=p)
    for p in ["bundles", *(c["file"] for c in cases)]:
        shutil.rmtree(d / p) if (d / p).is_dir() else (d / p).unlink()
    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    print(f"{len(cases)} cases, {size / 2**20:.1f} MiB in {d}")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _median_ms(fn, runs: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return float(np.median(t) * 1e3)


def _probe() -> dict:
    found: dict = {}
    try:
        import tensorrt

        found["tensorrt"] = tensorrt.__version__
    except ImportError as e:
        found["tensorrt"] = f"not importable ({e})"
    libs = subprocess.run("ldconfig -p | grep -E 'libnvinfer|libnvonnxparser' | head -3", shell=True,
                          capture_output=True, text=True).stdout.strip()
    found["libnvinfer"] = libs or "none on the loader path"
    try:
        import onnxruntime

        found["onnxruntime"] = f"{onnxruntime.__version__}: {onnxruntime.get_available_providers()}"
    except ImportError as e:
        found["onnxruntime"] = str(e)
    smi = subprocess.run("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader",
                         shell=True, capture_output=True, text=True)
    found["gpu"] = smi.stdout.strip() or smi.stderr.strip()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")),
                 "?")
    found["cpu"] = f"{model}, {os.cpu_count()} cores, avx512f={'avx512f' in flags}"
    return found


def _torch_s1(batches, runs: int) -> dict:
    """StarNet-S1 in PyTorch eager on the GPU (random weights: latency does not depend on them), timed like
    the TVM engine: host array in, host array out."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models.starnet import starnet

    m = starnet("s1", num_classes=1000).eval().cuda()
    out = {}
    with torch.inference_mode():
        for b in batches:
            x = np.random.default_rng(0).standard_normal((b, 3, 224, 224)).astype(np.float32)
            out[b] = _median_ms(lambda x=x: m(torch.from_numpy(x).cuda()).cpu().numpy(), runs)
    return out


def _unpacked(args: argparse.Namespace) -> tuple[Path, dict, dict]:
    d = Path(args.dir)
    if (d / PACK).exists() and not (d / "bundles").exists():
        with tarfile.open(d / PACK) as tar:
            tar.extractall(d, filter="data")
    spec = json.loads((d / "cases.json").read_text())
    report = {"probe": _probe(), "target": spec["target"], "cases": [], "python": sys.version.split()[0]}
    for k, v in report["probe"].items():
        print(f"{k}: {v}", flush=True)
    return d, spec, report


def tensorrt_leg(d: Path, spec: dict, args: argparse.Namespace) -> tuple[dict, int]:
    """Every case on TensorRT: (the leg's report, how many cases differ from the host). Skipped, with the
    reason, where TensorRT or a GPU is missing; a bundle that does not build says which and why."""
    import edgeflex as ef
    from edgeflex.errors import BackendUnavailable
    from edgeflex.runtime.backends.tensorrt import TensorRtBackend

    try:
        probe = TensorRtBackend()
    except BackendUnavailable as e:
        print(f"TensorRT leg skipped: {e}", flush=True)
        return {"skipped": str(e)}, 0
    leg: dict = {"versions": {k: v for k, v in probe.versions().items() if not k.startswith("plan ")},
                 "cases": [], "errors": {}}
    runtimes: dict = {}
    bad = 0
    for case in spec["cases"]:
        key = (case["bundle"], case["fused"])
        if key in leg["errors"]:
            continue
        if key not in runtimes:
            t0 = time.perf_counter()
            try:
                rt = ef.Runtime(d / "bundles" / case["bundle"], backend="tensorrt", fused=case["fused"])
            except Exception as e:  # noqa: BLE001 - say which bundle did not build and why, go on
                leg["errors"][key] = f"{type(e).__name__}: {e}"
                print(f"{case['bundle']} fused={case['fused']}: not on TensorRT: {e}", flush=True)
                bad += 1
                continue
            runtimes[key] = rt
            print(f"{case['bundle']} fused={case['fused']}: TensorRT ready in "
                  f"{time.perf_counter() - t0:.1f} s (plans built or loaded)", flush=True)
        rt = runtimes[key]
        z = np.load(d / case["file"])
        arrs = [z[f"arr_{i}"] for i in range(len(z.files))]
        xs, want = arrs[:case["n_in"]], arrs[case["n_in"]:]
        rt.switch(case["config"])
        got = rt.run(*xs)
        got = list(got) if isinstance(got, tuple | list) else [got]
        err = max(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-12))
                  for g, w in zip(got, want))
        ok = err <= args.trt_tolerance and all(np.isfinite(g).all() for g in got)
        bad += not ok
        row = {**case, "rel_err": err, "ok": ok,
               "tensorrt_ms": _median_ms(lambda r=rt, x=xs: r.run(*x), args.runs)}
        leg["cases"].append(row)
        print(f"{case['key']:<44} err {err:.1e} {'ok ' if ok else 'BAD'} "
              f"tensorrt {row['tensorrt_ms']:.3f} ms", flush=True)
    leg["errors"] = {f"{b} fused={f}": v for (b, f), v in leg["errors"].items()}
    leg["plans"] = {f"{b} fused={f}": {k: v for k, v in rt.info()["engine_versions"].items()
                                       if k.startswith("plan ")} for (b, f), rt in runtimes.items()}
    return leg, bad


def run_tensorrt(args: argparse.Namespace) -> int:
    d, spec, report = _unpacked(args)
    report["tensorrt"], bad = tensorrt_leg(d, spec, args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 1 if bad else 0


def run(args: argparse.Namespace) -> int:
    import edgeflex as ef

    d, spec, report = _unpacked(args)
    device = spec["target"]
    runtimes: dict = {}
    bad = 0
    for case in spec["cases"]:
        key = (case["bundle"], case["fused"])
        if key not in runtimes:
            path = d / "bundles" / case["bundle"]
            t0 = time.perf_counter()
            try:
                gpu = ef.Runtime(path, backend="tvm", device=device, fused=case["fused"], allow_native=True)
            except Exception as e:  # noqa: BLE001 - say which bundle did not load, and stop: exit 2
                print(f"{case['bundle']}: could not load on {device}: {type(e).__name__}: {e}", flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps({**report, "load_error": str(e)}, indent=1))
                return 2
            load_s = time.perf_counter() - t0
            cpu = ef.Runtime(path, backend="onnxruntime", fused=case["fused"], threads=os.cpu_count())
            runtimes[key] = (gpu, cpu, load_s)
            print(f"{case['bundle']} fused={case['fused']}: loaded on {device} in {load_s:.1f} s "
                  "(CUDA C compiled for this GPU at load)", flush=True)
        gpu, cpu, load_s = runtimes[key]
        z = np.load(d / case["file"])
        arrs = [z[f"arr_{i}"] for i in range(len(z.files))]
        xs, want = arrs[:case["n_in"]], arrs[case["n_in"]:]
        gpu.switch(case["config"])
        cpu.switch(case["config"])
        got = gpu.run(*xs)
        got = list(got) if isinstance(got, tuple | list) else [got]
        err = max(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-12))
                  for g, w in zip(got, want))
        ok = err <= args.tolerance and all(np.isfinite(g).all() for g in got)
        bad += not ok
        row = {**case, "rel_err": err, "ok": ok,
               "tvm_cuda_ms": _median_ms(lambda g=gpu, x=xs: g.run(*x), args.runs),
               "ort_cpu_ms": _median_ms(lambda c=cpu, x=xs: c.run(*x), max(20, args.runs // 5))}
        report["cases"].append(row)
        print(f"{case['key']:<44} err {err:.1e} {'ok ' if ok else 'BAD'} "
              f"tvm-cuda {row['tvm_cuda_ms']:.3f} ms  ort-cpu({os.cpu_count()}t) {row['ort_cpu_ms']:.3f} ms",
              flush=True)
    if any(c["bundle"].startswith("s1") for c in spec["cases"]):
        try:
            report["torch_eager_cuda_s1_ms"] = _torch_s1(BATCHES, args.runs)
            print(f"torch eager CUDA StarNet-S1 (batch: ms): {report['torch_eager_cuda_s1_ms']}", flush=True)
        except Exception as e:  # noqa: BLE001 - the comparison is extra; say why it is missing
            report["torch_eager_cuda_s1_ms"] = f"failed: {e}"
            print(f"torch eager CUDA S1 failed: {e}", flush=True)
    report["tensorrt"], trt_bad = tensorrt_leg(d, spec, args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{len(report['cases']) - bad}/{len(report['cases'])} cases equal to the host within "
          f"{args.tolerance:g}")
    return 1 if bad or trt_bad else 0


def report(args: argparse.Namespace) -> None:
    """A `run` result (its --out JSON) as the markdown table RESULTS.md shows."""
    r = json.loads(Path(args.json).read_text())
    p = r["probe"]
    print(f"GPU {p['gpu']}; CPU {p['cpu']}; Python {r['python']}; target {r['target']}\n")
    print("| bundle | config | chained/fused | batch | max rel err vs host ORT | TVM CUDA ms | "
          "ORT CPU ms | ORT CPU / TVM CUDA |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for c in r["cases"]:
        mode = "fused" if c["fused"] else ("chained" if c["bundle"].startswith("snnet") else "-")
        print(f"| {c['bundle'].removesuffix('.efx')} | {c['config']} | {mode} | {c['batch']} | "
              f"{c['rel_err']:.1e} | {c['tvm_cuda_ms']:.3f} | {c['ort_cpu_ms']:.3f} | "
              f"{c['ort_cpu_ms'] / c['tvm_cuda_ms']:.2f}x |")
    eager = r.get("torch_eager_cuda_s1_ms")
    if isinstance(eager, dict):
        print("\nPyTorch eager CUDA, StarNet-S1 (same host-in, host-out timing): "
              + ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in eager.items()))
    t = r.get("tensorrt")
    if t is None:
        print("\nTensorRT: this result predates the TensorRT leg")
    elif "skipped" in t:
        print(f"\nTensorRT: not run ({t['skipped']})")
    else:
        print(f"\nTensorRT {t['versions']}\n")
        print("| bundle | config | chained/fused | batch | max rel err vs host ORT | TensorRT ms |")
        print("|---|---|---|---:|---:|---:|")
        for c in t["cases"]:
            mode = "fused" if c["fused"] else ("chained" if c["bundle"].startswith("snnet") else "-")
            print(f"| {c['bundle'].removesuffix('.efx')} | {c['config']} | {mode} | {c['batch']} | "
                  f"{c['rel_err']:.1e} | {c['tensorrt_ms']:.3f} |")
        for where, e in t["errors"].items():
            print(f"\nNot on TensorRT: {where}: {e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--dir", default=".gpu")
    a.add_argument("--target", default=TARGET)
    a.add_argument("--bundles", nargs="+", required=True)
    b = sub.add_parser("run")
    b.add_argument("--dir", default=".gpu")
    b.add_argument("--out")
    b.add_argument("--runs", type=int, default=200)
    b.add_argument("--tolerance", type=float, default=1e-4)
    # TensorRT picks its own kernels (TF32 is on by default for fp32 on Ampere and later): a looser bound
    b.add_argument("--trt-tolerance", type=float, default=1e-2)
    t = sub.add_parser("tensorrt")
    t.add_argument("--dir", default=".gpu")
    t.add_argument("--out")
    t.add_argument("--runs", type=int, default=200)
    t.add_argument("--trt-tolerance", type=float, default=1e-2)
    c = sub.add_parser("report")
    c.add_argument("json")
    args = p.parse_args()
    if args.cmd == "report":
        report(args)
        return 0
    if args.cmd == "prepare":
        prepare(args)
        return 0
    return run_tensorrt(args) if args.cmd == "tensorrt" else run(args)


if __name__ == "__main__":
    sys.exit(main())
