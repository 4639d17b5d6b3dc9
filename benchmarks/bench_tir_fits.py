"""FITS TIR kernel benchmark (issue 5): FITS L=720 H=96 C=7 at batch 1 and 256, interleaved: PyTorch eager,
the bundle on ONNX Runtime, on TVM with the "fits" kernel, on TVM without kernels (`--no-kernels`), and the
kernel's own compiled function called directly; plus this machine's memory bandwidth, measured here, and
the batch-256 floor it implies.

Owns the cases, the bandwidth measurement and its section of RESULTS.md; it changes no library code.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import edgeflex as ef
from edgeflex.compile.tvm import compile_bundle, host_target
from edgeflex.kernels import spectral
from edgeflex.kernels.tir.fits import (
    FitsShape,
    SplitPlan,
    build_kernel,
    schedule_for,
    split_kernel_operands,
)
from edgeflex.models.fits import spectral_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import FITS_HYPER, build_fits  # noqa: E402
from common import OthersLoad, command_line, machine_info, publish, time_interleaved, timing_parser  # noqa: E402

SECTION = "## FITS TIR kernel (issue 5): one fused TVM function vs eager, ORT, plain TVM"
BATCHES = {1: 400, 256: 30}                     # batch -> timed runs per contender
STREAM_FLOATS = 64 * 2**20                      # 256 MiB per array: 8x this machine's 32 MiB L3


# --- memory bandwidth ------------------------------------------------------------------------------------

def _triad(threads: int) -> Callable[[], None]:
    """a = b + 3 c over STREAM_FLOATS float32, compiled by TVM for this host: parallel over `threads`,
    AVX-512 vectors (the same compiler, target and thread pool as the kernel)."""
    import tvm
    from tvm.script import tirx as T

    n = STREAM_FLOATS

    @T.prim_func
    def triad(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32"), c: T.Buffer((n,), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for i in T.parallel(n // 1024):
            for j in range(64):
                for v in T.vectorized(16):
                    k = i * 1024 + j * 16 + v
                    a[k] = b[k] + T.float32(3) * c[k]

    lib = tvm.compile(tvm.IRModule({"triad": triad.with_attr("global_symbol", "triad")}),
                      target=tvm.target.Target(host_target(threads)))
    dev = tvm.cpu(0)
    a, b, c = (tvm.runtime.tensor(np.full(n, i, np.float32), dev) for i in (0.0, 1.0, 2.0))
    fn = lib["triad"]
    return lambda: fn(a, b, c)


def measure_bandwidth(threads: int, repeats: int = 7) -> dict[str, float]:
    """GB/s by STREAM's accounting (bytes the loop names, no write-allocate): numpy copy (one thread) and a
    TVM triad on `threads` threads, each the best of `repeats` passes over arrays 8x the L3 cache."""
    src = np.ones(STREAM_FLOATS, np.float32)
    dst = np.empty_like(src)
    triad = _triad(threads)
    best = {"numpy copy, 1 thread": np.inf, f"TVM triad, {threads} threads": np.inf}
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best["numpy copy, 1 thread"] = min(best["numpy copy, 1 thread"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        triad()
        best[f"TVM triad, {threads} threads"] = min(best[f"TVM triad, {threads} threads"],
                                                   time.perf_counter() - t0)
    moved = {"numpy copy, 1 thread": 2 * 4 * STREAM_FLOATS,
             f"TVM triad, {threads} threads": 3 * 4 * STREAM_FLOATS}
    return {k: moved[k] / t / 1e9 for k, t in best.items()}


# --- the cases -------------------------------------------------------------------------------------------

@dataclass
class Setup:
    model: torch.nn.Module
    form: str
    ort: ef.Runtime
    tvm_kernel: ef.Runtime
    tvm_plain: ef.Runtime
    kernels: list[str]
    operands: dict[str, list[np.ndarray]]
    compile_s: dict[str, float]
    split: Any = None               # spectral.SplitOperands when the engine runs the split kernel

    @property
    def engine_form(self) -> str:
        """The kernel form the TVM engine runs: the split one for a plain low-rank bundle."""
        return "split" if self.split is not None else self.form


def setup(tmp: Path, threads: int) -> Setup:
    model, shape = build_fits()
    example = torch.from_numpy(np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32))
    print("exporting FITS ...", file=sys.stderr, flush=True)
    bundle = ef.export(model, example, tmp / "fits.efx", threads=threads)
    form = bundle.manifest["export"]["kernels"]["form"]
    if form not in ("folded", "lowrank"):
        raise SystemExit(f"the exporter chose FITS form {form!r}; TVM compiles folded/lowrank only")
    plain = tmp / "fits_plain.efx"
    shutil.copytree(bundle.path, plain)
    compile_s = {}
    print("compiling for TVM, with and without kernels ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    (engine,) = compile_bundle(bundle.path, "host", threads=threads)["engines"]
    compile_s["kernel"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compile_bundle(plain, "host", threads=threads, kernels=False)
    compile_s["plain"] = time.perf_counter() - t0
    w = spectral_weights(model)
    operands = {f: [o.astype(np.float32) for o in spectral.gemm_operands(w, f)]
                for f in ("folded", "lowrank")}
    split = spectral.split_operands(*operands["lowrank"]) if form == "lowrank" else None
    return Setup(model, form, ef.Runtime(bundle.path, threads=threads),
                 ef.Runtime(bundle.path, backend="tvm", threads=threads),
                 ef.Runtime(plain, backend="tvm", threads=threads), engine["kernels"], operands, compile_s,
                 split)


def _kernel_call(s: FitsShape, ops: list[np.ndarray], x: np.ndarray,
                 plan: SplitPlan | None = None) -> Callable[[], Any]:
    """The kernel's compiled function alone, inputs and output already TVM tensors (no VM, no copies); with
    `plan`, the split kernel on its operands (`split_kernel_operands`)."""
    import tvm

    lib = build_kernel(s, plan=plan)
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(a, dev) for a in (x, *ops)]
    y = tvm.runtime.tensor(np.empty((x.shape[0], s.out_len, s.channels), np.float32), dev)
    fn = lib["fits"]
    return lambda: fn(*args, y)


def _split_call(s: FitsShape, ops: Any, x: np.ndarray) -> Callable[[], Any]:
    """The split kernel alone (what the engine runs for a plain FITS bundle), on `SplitOperands` `ops`."""
    return _kernel_call(s, split_kernel_operands(ops), x, SplitPlan.of(ops))


@dataclass
class Result:
    batch: int
    times: dict[str, np.ndarray]
    rel: dict[str, float]
    others_cpu: float
    load1: float


def parallel_speedup(st: Setup, threads: int, batch: int = 256, runs: int = 10) -> float:
    """The kernel alone at `batch` on `threads` pool threads vs one (best of `runs` each, alternating): how
    many cores this process really had (other processes share this machine). Leaves `threads` set."""
    import tvm

    h = FITS_HYPER
    L, C = h["seq_len"], h["channels"]
    eps = spectral_weights(st.model).eps * (L - 1) / L
    rank = st.operands["lowrank"][0].shape[1] if st.form == "lowrank" else None
    x = np.random.default_rng(0).standard_normal((batch, L, C)).astype(np.float32)
    shape = schedule_for(L, L + h["pred_len"], C, eps, rank, cores=threads)
    call = (_split_call(shape, st.split, x) if st.split is not None
            else _kernel_call(shape, st.operands[st.form], x))
    config = tvm.get_global_func("runtime.config_threadpool")
    cpus = [str(c) for c in sorted(os.sched_getaffinity(0))]
    best = {1: np.inf, threads: np.inf}
    for _ in range(runs):
        for n in best:
            config(-3, n, cpus)
            call()
            t0 = time.perf_counter()
            call()
            best[n] = min(best[n], time.perf_counter() - t0)
    return float(best[1] / best[threads])


def run_batch(st: Setup, batch: int, threads: int, runs: int, warmup: int, block: int) -> Result:
    import tvm

    h = FITS_HYPER
    L, H, C = h["seq_len"], h["pred_len"], h["channels"]
    x = np.random.default_rng(batch).standard_normal((batch, L, C)).astype(np.float32)
    xt = torch.from_numpy(x)
    torch.set_num_threads(threads)

    def eager() -> torch.Tensor:
        with torch.inference_mode():
            return st.model(xt)

    def eager_1t() -> torch.Tensor:
        # NOTE: one OpenMP thread: two stall for a scheduler slice at every op barrier whenever other
        # processes hold a core (32 ms instead of 0.1 ms per call seen here); switching costs 0.2 us.
        torch.set_num_threads(1)
        try:
            return eager()
        finally:
            torch.set_num_threads(threads)

    # NOTE: private on purpose: the engine the runtime holds, called without the runtime's input checks and
    # numpy <-> TVM copies (inputs converted once): what the Relax VM itself costs around the kernel.
    engine = st.tvm_kernel._plan.engines[0]
    x_dev = tvm.runtime.tensor(x, tvm.cpu(0))
    vm_fn, vm_params = engine._entry(batch == 1)          # the batch-1 library at batch 1, as the runtime
    eps = spectral_weights(st.model).eps * (L - 1) / L
    rank = {"folded": None, "lowrank": st.operands["lowrank"][0].shape[1]}
    contenders: dict[str, Callable[[], Any]] = {
        "eager": eager,
        "eager_1t": eager_1t,
        "onnxruntime": lambda: st.ort.run(x),
        "tvm_kernel": lambda: st.tvm_kernel.run(x),
        "tvm_plain": lambda: st.tvm_plain.run(x),
        "tvm_kernel_general": lambda: engine.run([x]),
        "vm_call": lambda: vm_fn(x_dev, *vm_params),
    }
    if st.split is not None:
        s = schedule_for(L, L + H, C, eps, rank["lowrank"], cores=threads)
        contenders["kernel_split"] = _split_call(s, st.split, x)
    for form in ("lowrank", "folded"):
        s = schedule_for(L, L + H, C, eps, rank[form], cores=threads)
        contenders[f"kernel_{form}"] = _kernel_call(s, st.operands[form], x)
        if batch == 1 and form == st.form:
            split = schedule_for(L, L + H, C, eps, rank[form], cores=threads, split_one=True)
            if split != s:
                contenders[f"kernel_{form}_split"] = _kernel_call(split, st.operands[form], x)
    ref = st.ort.run(x)
    rel = {"tvm_kernel": float(np.abs(st.tvm_kernel.run(x) - ref).max() / np.abs(ref).max()),
           "tvm_plain": float(np.abs(st.tvm_plain.run(x) - ref).max() / np.abs(ref).max())}
    with torch.no_grad():
        rel["eager"] = float(np.abs(eager().numpy() - ref).max() / np.abs(ref).max())
    print(f"timing batch {batch}: {runs} runs each of {', '.join(contenders)} ...", file=sys.stderr,
          flush=True)
    with OthersLoad() as others:
        times = time_interleaved(contenders, runs, warmup, block)
    return Result(batch, times, rel, others.share, os.getloadavg()[0])


# --- report ----------------------------------------------------------------------------------------------

LABELS = {
    "eager": "PyTorch eager, {threads} threads",
    "eager_1t": "PyTorch eager, 1 thread",
    "onnxruntime": "ORT (`Runtime.run`)",
    "tvm_kernel": "TVM + fits kernel (`Runtime.run`)",
    "tvm_plain": "TVM, no kernels (`Runtime.run`)",
    "tvm_kernel_general": "TVM + fits kernel, the general path (`Engine.run`: check_inputs + staged call)",
    "vm_call": "TVM + fits kernel, bare VM call",
    "kernel_split": "kernel alone, split (the engine's)",
    "kernel_lowrank": "kernel alone, lowrank",
    "kernel_folded": "kernel alone, folded",
    "kernel_lowrank_split": "kernel alone, lowrank, batch 1 split over cores",
    "kernel_folded_split": "kernel alone, folded, batch 1 split over cores",
}


def _ms(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def bytes_moved(batch: int, operands: list[np.ndarray]) -> int:
    """What the kernel must read and write at least: x, y and the GEMM operands, float32."""
    h = FITS_HYPER
    x, y = h["seq_len"] * h["channels"], (h["seq_len"] + h["pred_len"]) * h["channels"]
    return 4 * batch * (x + y) + sum(o.nbytes for o in operands)


def render(st: Setup, results: list[Result], bw: dict[str, float], threads: int, speedup: float,
           info: dict[str, str], meta: dict[str, str]) -> str:
    best_bw = max(bw.values())
    lines = [f"| batch | contender | median ms | p90 ms | eager {threads}t / this | eager 1t / this "
             "| ORT / this | runs | others' CPU | load 1m |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        e, e1, o = (np.median(r.times[k]) for k in ("eager", "eager_1t", "onnxruntime"))
        for name, t in r.times.items():
            med = np.median(t)
            lines.append(f"| {r.batch} | {LABELS[name].format(threads=threads)} | {_ms(med)} "
                         f"| {_ms(np.percentile(t, 90))} | {e / med:.1f}x | {e1 / med:.1f}x | {o / med:.2f}x "
                         f"| {len(t)} | {r.others_cpu:.0%} | {r.load1:.2f} |")
    lines += ["", "Reading it:", ""]
    for r in results:
        med = {k: float(np.median(v)) for k, v in r.times.items()}
        form = st.engine_form
        k, kern, vm = med["tvm_kernel"], med[f"kernel_{form}"], med["vm_call"]
        dl, e, o = med["tvm_kernel_general"], med["eager"], med["onnxruntime"]
        lines.append(f"- batch {r.batch}: TVM with the kernel {_ms(k)} ms through `Runtime.run`: "
                     f"**{e / k:.1f}x** eager ({threads} threads), {med['eager_1t'] / k:.1f}x eager "
                     f"(1 thread), **{o / k:.2f}x** ORT, {med['tvm_plain'] / k:.1f}x TVM without kernels. "
                     f"The kernel alone ({form}) takes {_ms(kern)} ms, the bare VM call {_ms(vm)} ms: the "
                     f"VM costs {_ms(vm - kern)} ms and the runtime's checks and numpy <-> TVM copies "
                     f"{_ms(k - vm)} ms per call; the general path (`check_inputs` and the engine's "
                     f"staged call: what `Runtime.run` takes at batches other than 1) takes {_ms(dl)} ms "
                     f"({e / dl:.1f}x eager, {o / dl:.2f}x ORT). "
                     f"Max rel diff vs ORT: kernel {r.rel['tvm_kernel']:.1e}, no kernels "
                     f"{r.rel['tvm_plain']:.1e}, eager {r.rel['eager']:.1e}.")
        if r.batch == 1:
            # Judged against the faster eager: two OpenMP threads stall now and then on this shared machine.
            best = min(e, med["eager_1t"])
            verdict = "met" if best / k >= 10 else "NOT met"
            lines.append(f"  Goal >= 10x eager at batch 1, against the faster eager ({_ms(best)} ms): "
                         f"{best / k:.1f}x through `Runtime.run`, **{verdict}**; the general path "
                         f"{best / dl:.1f}x, the kernel alone {best / kern:.1f}x.")
        else:
            ops = split_kernel_operands(st.split) if form == "split" else st.operands[form]
            need = bytes_moved(r.batch, ops)
            floor = need / best_bw / 1e6
            verdict = "met" if kern / floor <= 3 else "NOT met"
            per_channel = (spectral.split_macs(st.split) if form == "split"
                           else sum(o.size for o in st.operands[form]))
            macs = r.batch * FITS_HYPER["channels"] * per_channel
            lines.append(f"  Memory-bandwidth floor: {need / 1e6:.1f} MB (x, y, {form} operands) at "
                         f"{best_bw:.1f} GB/s = {_ms(floor)} ms. The kernel alone is **{kern / floor:.1f}x** "
                         f"the floor (goal within 3x: **{verdict}**), `Runtime.run` {k / floor:.1f}x, the "
                         f"general path {dl / floor:.1f}x. The kernel is bound by arithmetic, not "
                         f"memory: {macs / 1e6:.0f} M multiply-adds at {macs / kern / 1e6:.0f} GMAC/s.")
            one = next((q for q in results if q.batch == 1), None)
            if one is not None:
                serial = r.batch * float(np.median(one.times[f"kernel_{form}"]))
                lines.append(f"  Cores the kernel really had while timed: {r.batch} x its batch-1 time / its "
                             f"batch-{r.batch} time = **{serial / kern:.2f}** ({threads} = all {threads} "
                             f"free); in a separate probe after the timings, {threads} pool threads ran it "
                             f"{speedup:.2f}x faster than one. On {threads} free cores the kernel would take "
                             f"about {_ms(serial / threads)} ms, {serial / threads / floor:.1f}x the floor.")
    lines += ["", ("Memory bandwidth measured in the same run, STREAM accounting (bytes named by the loop, "
                   "no write-allocate), best of 7 passes over 256 MiB arrays (8x the L3): "
                   + "; ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items())
                   + f". The floor uses the best, {best_bw:.1f} GB/s.")]
    lines += ["", f"Bundle form: **{st.form}** (exporter's choice), run by the **{st.engine_form}** kernel; "
              f"engine kernels: {st.kernels}; compile s: "
              + ", ".join(f"{k} {v:.1f}" for k, v in st.compile_s.items()) + ".", "",
              "Machine and run:", ""]
    lines += [f"- {k}: {v}" for k, v in {**info, **meta}.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tvm as _tvm

    p = timing_parser(__doc__, warmup=10, block=10,
                      runs_default=", ".join(f"batch {b}: {n}" for b, n in BATCHES.items()))
    p.add_argument("--batch", type=int, choices=sorted(BATCHES), action="append",
                   help="only these batches")
    p.add_argument("--out", type=Path, help="write the section into this markdown file "
                   "(benchmarks/RESULTS.md)")
    a = p.parse_args(argv)
    started, date = time.perf_counter(), _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench_tir_fits_") as tmp:
        st = setup(Path(tmp), a.threads)
        print("measuring memory bandwidth ...", file=sys.stderr, flush=True)
        bw = measure_bandwidth(a.threads)
        results = [run_batch(st, b, a.threads, a.runs or n, a.warmup, a.block)
                   for b, n in BATCHES.items() if not a.batch or b in a.batch]
        speedup = parallel_speedup(st, a.threads) if a.threads > 1 else 1.0
    info = machine_info(a.threads)
    info["versions"] += f", apache-tvm {_tvm.__version__}"
    info["threads"] += "; TVM thread pool the same (runtime.config_threadpool)"
    meta = {"date (UTC)": date, "command": f"`{command_line()}`",
            "timing": (f"interleaved blocks of {a.block} calls, {a.warmup} warm-up calls each, order "
                       "rotated; wall time per call (time.perf_counter); `Runtime.run` includes input checks "
                       "and the numpy <-> TVM copies; eager under torch.inference_mode"),
            "load average (1 min)": f"{load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end",
            "wall time": f"{time.perf_counter() - started:.0f} s"}
    publish(a.out, SECTION, "bench_tir_fits", render(st, results, bw, a.threads, speedup, info, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
