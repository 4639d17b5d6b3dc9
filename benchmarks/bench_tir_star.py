"""StarNet on TVM with edgeflex's hand-scheduled kernels (issue 5): the fused star op, the dense 3x3 convs,
the depthwise 7x7 convs and the head (`kernels/tir/`), against TVM without them, ONNX Runtime and eager; one
StarNet block at S1's stage-1 widths and the whole StarNet-S1 at 224x224, batch 1, interleaved, medians.

Owns the cases, the timing, the per-kernel breakdown of the TVM engine and the report (stdout, and with
--out its section of RESULTS.md); it changes no library code. `--trials N` also tunes what the kernels
leave to TVM with MetaSchedule (records kept in the bundle).
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import edgeflex as ef
from edgeflex.compile.tvm import compile_bundle
from edgeflex.models.starnet import Block, starnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OthersLoad, command_line, machine_info, publish, time_interleaved, timing_parser  # noqa: E402

SECTION = "## TVM kernels for StarNet: star op, 3x3 and depthwise convs (issue 5)"


@dataclass(frozen=True)
class Case:
    label: str
    key: str
    shape: tuple[int, ...]
    runs: int


CASES = (
    Case("one StarNet block, S1 stage 1 (C=24, r=4, 56x56)", "block", (24, 56, 56), 200),
    Case("StarNet-S1 224x224, 1000 classes", "s1", (3, 224, 224), 60),
)


def build(key: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Block(24, 4) if key == "block" else starnet("s1", num_classes=1000)
    with torch.no_grad():                       # trained-like non-zero biases and BatchNorm statistics
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.05)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@dataclass
class Result:
    case: Case
    times: dict[str, np.ndarray]
    rel: dict[str, float]
    compile_s: dict[str, float]
    kernels: list[str]
    ops: list[tuple[str, int, float]] = field(default_factory=list)
    others_cpu: float = float("nan")
    load1: float = float("nan")
    tuned: dict | None = None
    macs: float = float("nan")


def fma_peak_gmacs(threads: int, runs: int = 30) -> float:
    """The fastest multiply-add rate this machine reaches on one well-shaped kernel: ONNX Runtime's (MLAS)
    1x1 conv 384 -> 1536 channels on [16, 384, 7, 7] (462 M multiply-adds, compute bound), median of
    `runs`; GMAC/s. The roofline the cases are held against."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((1536, 384, 1, 1)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "peak",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 384, 7, 7])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((16, 384, 7, 7)).astype(np.float32)
    ts = []
    for i in range(runs + 5):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        if i >= 5:
            ts.append(time.perf_counter() - t0)
    return 16 * 1536 * 384 * 49 / float(np.median(ts)) / 1e9


def per_kernel_ms(library: str, x: np.ndarray, reps: int) -> list[tuple[str, int, float]]:
    """(kernel, calls per inference, median ms per call) for each function the engine's VM calls: every call
    of one inference is re-run `reps` times on its own arguments and timed (its output is rewritten with
    the same values)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(library), tvm.cpu())
    times: dict[str, list[float]] = defaultdict(list)

    def instrument(func, symbol, before, ret, *args):
        if before and not str(symbol).startswith("vm.builtin"):
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                func(*args)
                ts.append(time.perf_counter() - t0)
            times[str(symbol)].append(float(np.median(ts)) * 1e3)
        return 0

    xt = tvm.runtime.tensor(x)
    vm["main"](xt)
    vm.set_instrument(instrument)
    vm["main"](xt)
    return sorted(((k, len(v), float(np.median(v))) for k, v in times.items()), key=lambda r: -r[1] * r[2])


def run_case(case: Case, tmp: Path, *, threads: int, warmup: int, block: int, runs: int | None,
             trials: int, reps: int) -> Result:
    model = build(case.key)
    x = np.random.default_rng(1).standard_normal((1, *case.shape)).astype(np.float32)
    print(f"exporting {case.key} ...", file=sys.stderr, flush=True)
    bundle = ef.export(model, torch.from_numpy(x), tmp / f"{case.key}.efx", threads=threads, n_random=1)
    plain = tmp / f"{case.key}-plain.efx"
    shutil.copytree(bundle.path, plain)
    compile_s, libs = {}, {}
    variants = (("tvm plain", plain, False, 0), ("tvm kernels", bundle.path, True, trials))
    for label, path, kernels, n in variants:
        print(f"compiling {case.key}: {label} (trials {n}) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        report = compile_bundle(path, "host", kernels=kernels, batch=1, threads=threads, trials=n)
        compile_s[label] = time.perf_counter() - t0
        (engine,) = report["engines"]
        libs[label] = (Path(path) / engine["library"], engine)
    engines = {label: ef.Runtime(path, backend="tvm", threads=threads)
               for label, path in (("tvm kernels", bundle.path), ("tvm plain", plain))}
    ort = ef.Runtime(bundle.path, threads=threads)
    xt = torch.from_numpy(x)
    torch.set_num_threads(threads)

    def eager() -> torch.Tensor:
        with torch.inference_mode():
            return model(xt)

    ref = ort.run(x)
    rel = {label: float(np.abs(rt.run(x) - ref).max() / np.abs(ref).max()) for label, rt in engines.items()}
    rel["eager"] = float(np.abs(eager().numpy() - ref).max() / np.abs(ref).max())
    n = runs or case.runs
    print(f"timing {case.label}: {n} runs each ...", file=sys.stderr, flush=True)
    with OthersLoad() as others:
        contenders = {**{k: (lambda rt=rt: rt.run(x)) for k, rt in engines.items()},
                      "onnxruntime": lambda: ort.run(x), "eager": eager}
        times = time_interleaved(contenders, n, warmup, block)
    print(f"per-kernel breakdown of {case.key} ...", file=sys.stderr, flush=True)
    library, engine = libs["tvm kernels"]
    ops = per_kernel_ms(str(library), x, reps)
    per_kind = bundle.configs[0].costs["per_kind"]
    macs = sum(per_kind[k]["flops"] for k in ("conv", "dwconv", "matmul")) / 2
    return Result(case, times, rel, compile_s, engine["kernels"], ops, others.share, os.getloadavg()[0],
                  engine.get("tuning"), macs)


def _ms(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _kind(symbol: str) -> str:
    kinds = (("star_", "star op (edgeflex)"), ("dwconv_", "depthwise 7x7 (edgeflex)"),
             ("conv_", "dense 3x3 stride 2 (edgeflex)"), ("dense_", "classifier head (edgeflex)"))
    for prefix, kind in kinds:
        if symbol.startswith(prefix):
            return kind
    return "TVM default: " + symbol.rstrip("0123456789")


def roofline(results: list[Result], peak: float) -> list[str]:
    """What the goal (TVM <= 0.8x ORT) asks of the machine: each case's multiply-adds at the measured peak."""
    lines = [f"Roofline: the fastest multiply-add rate measured on this machine in this run is **{peak:.0f} "
             "GMAC/s** (ONNX Runtime's 1x1 conv 384 -> 1536 on [16, 384, 7, 7], compute bound; "
             "`fma_peak_gmacs`). At that rate:", "",
             "| case | multiply-adds (M) | at peak, ms | ORT ms | at peak / ORT "
             "| rate TVM <= 0.8x ORT needs |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        ort_ms = float(np.median(r.times["onnxruntime"]))
        floor = r.macs / peak / 1e6
        need = r.macs / (0.8 * ort_ms * 1e-3) / 1e9
        lines.append(f"| {r.case.label} | {r.macs / 1e6:.0f} | {_ms(floor)} | {_ms(ort_ms)} | "
                     f"{floor / ort_ms:.2f}x | {need:.0f} GMAC/s = **{need / peak:.0%} of peak** |")
    return lines + [""]


def render(results: list[Result], trials: int, reps: int, info: dict[str, str], meta: dict[str, str],
           peak: float) -> str:
    order = ("tvm kernels", "tvm plain", "onnxruntime", "eager")
    lines = ["| case | " + " | ".join(f"{c} median ms (p90)" for c in order)
             + " | TVM kernels / ORT | TVM plain / ORT | TVM kernels / eager | max rel diff vs ORT "
               "(kernels, plain, eager) | kernels applied | compile s (kernels, plain) | runs each "
               "| others' CPU | load 1m |",
             "|---|" + "---:|" * (len(order) + 9)]
    for r in results:
        med = {k: float(np.median(r.times[k])) for k in order}
        cells = " | ".join(f"{_ms(med[k])} ({_ms(float(np.percentile(r.times[k], 90)))})" for k in order)
        lines.append(f"| {r.case.label} | {cells} | **{med['tvm kernels'] / med['onnxruntime']:.2f}x** "
                     f"| {med['tvm plain'] / med['onnxruntime']:.1f}x "
                     f"| {med['tvm kernels'] / med['eager']:.2f}x "
                     f"| {r.rel['tvm kernels']:.0e}, {r.rel['tvm plain']:.0e}, {r.rel['eager']:.0e} "
                     f"| {', '.join(r.kernels) or '-'} "
                     f"| {r.compile_s['tvm kernels']:.0f}, {r.compile_s['tvm plain']:.0f} "
                     f"| {len(r.times['onnxruntime'])} | {r.others_cpu:.0%} | {r.load1:.2f} |")
    tuned = f"MetaSchedule, {trials} trials" if trials else "untuned"
    lines += ["", "TVM kernels: edgeflex's TIR kernels in place of the ops they replace, the rest of the "
              f"graph by TVM's default CPU pipeline ({tuned}). TVM plain: the same compile without them "
              "(`edgeflex compile --no-kernels`). Ratios above 1: slower than the reference.", ""]
    for r in results:
        total = sum(n * ms for _, n, ms in r.ops)
        kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for sym, n, ms in r.ops:
            kinds[_kind(sym)][0] += n
            kinds[_kind(sym)][1] += n * ms
        e2e = float(np.median(r.times["tvm kernels"]))
        lines += [f"Where the TVM-kernels engine's time goes, {r.case.label}: each kernel call of one "
                  f"inference re-run {reps}x on its own arguments, median; sum {_ms(total)} ms vs {_ms(e2e)} "
                  "ms end to end. Taken after the timing, under whatever load the machine had then: read "
                  "the shares, not the sum.", "",
                  "| kernel kind | calls | ms | share |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {n} | {_ms(ms)} | {ms / total:.0%} |"
                  for k, (n, ms) in sorted(kinds.items(), key=lambda kv: -kv[1][1])]
        lines += ["", "| kernel | calls | ms per call |", "|---|---:|---:|"]
        lines += [f"| `{sym}` | {n} | {_ms(ms)} |" for sym, n, ms in r.ops[:12]]
        lines.append("")
    lines += roofline(results, peak)
    lines += ["Machine and run:", ""]
    lines += [f"- {k}: {v}" for k, v in {**info, **meta}.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tvm as _tvm

    p = timing_parser(__doc__, warmup=5, block=5,
                      runs_default="per case: " + ", ".join(f"{c.key}: {c.runs}" for c in CASES))
    p.add_argument("--reps", type=int, default=20, help="re-runs of each kernel call for the breakdown")
    p.add_argument("--trials", type=int, default=0, help="MetaSchedule trials for what the kernels leave "
                   "(default 0: untuned)")
    p.add_argument("--only", choices=[c.key for c in CASES], action="append", help="run only these cases")
    p.add_argument("--out", type=Path, help="write the section into this markdown file")
    a = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    started, date = time.perf_counter(), _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_tir_star_") as tmp:
        for case in CASES:
            if a.only and case.key not in a.only:
                continue
            results.append(run_case(case, Path(tmp), threads=a.threads, warmup=a.warmup, block=a.block,
                                    runs=a.runs, trials=a.trials, reps=a.reps))
    peak = fma_peak_gmacs(a.threads)
    info = machine_info(a.threads)
    info["versions"] += f", apache-tvm {_tvm.__version__}"
    meta = {"date": date, "command": f"`{command_line()}`",
            "timing": f"interleaved blocks of {a.block} calls, {a.warmup} warm-up calls each; wall time per "
                      "`Runtime.run` (input checks included), per eager forward under torch.inference_mode; "
                      "TVM_NUM_THREADS set to the threads",
            "total time": f"{time.perf_counter() - started:.0f} s"}
    publish(a.out, SECTION, "bench_tir_star", render(results, a.trials, a.reps, info, meta, peak))
    return 0


if __name__ == "__main__":
    sys.exit(main())
