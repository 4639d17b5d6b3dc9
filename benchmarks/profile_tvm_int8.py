"""Where StarNet-S1's int8 time goes on TVM (issue 21): the int8 graph `edgeflex quantize` writes, compiled
as `edgeflex compile --backend tvm` does, each kernel call timed from the VM's instrument hook (bytecode
VM: the hook needs it; the engine itself runs compiled), grouped by kind; per op (the star blocks as
`qconv` f1, f2, g and the element-wise QDQ multiply between them, the depthwise convs in float32 with
their QDQ and residual adds element-wise) and fused (`qstar`, and the int8 `qdwconv` with its QDQ and
residual add, built as `edgeflex compile` builds an int8 engine: `compile.tvm.int8_build_target`), side
by side.

Usage: .venv/bin/python benchmarks/profile_tvm_int8.py --threads 1 --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OthersLoad, machine_and_run, publish, timing_parser  # noqa: E402

import edgeflex as ef  # noqa: E402

SECTION = "## int8 on TVM: where StarNet-S1's time goes, per kernel (issue 21)"
KINDS = {"qstar": "fused int8 star blocks (f1, f2, QDQ, multiply, g)", "qconv": "int8 convs (qconv)",
         "qlinear": "int8 linear (head)", "dwconv": "depthwise 7x7 convs (fp32)",
         "qdwconv": "int8 depthwise 7x7 convs (qdwconv; + QDQ, residual adds)",
         "fused": "element-wise QDQ / multiply / residual adds", "vm": "VM allocations and calls",
         "other": "other"}


def _kind(symbol: str) -> str:
    head = symbol.split("_")[0]
    if head in ("qstar", "qconv", "qlinear", "dwconv", "qdwconv", "fused"):
        return head
    return "vm" if symbol.startswith("vm.") else "other"


def build(tmp: Path, calibration: int) -> Path:
    from edgeflex.export.quantize import quantize
    from edgeflex.models.starnet import starnet

    torch.manual_seed(0)
    path = tmp / "s1.efx"
    ef.export(starnet("s1").eval(), torch.randn(1, 3, 224, 224), path, tolerance=1e-3)
    cal = np.random.default_rng(0).standard_normal((calibration, 3, 224, 224)).astype(np.float32)
    quantize(path, {"x": cal}, precisions=["int8"], methods=["minmax"], max_drop=100.0, progress=False)
    return path


def profile(path: Path, threads: int, fuse: bool,
            runs: int) -> tuple[dict[str, float], dict[str, int], float]:
    """{kernel symbol: ms per inference}, {symbol: calls per inference}, median ms of the compiled engine."""
    import tvm
    from tvm import relax

    from edgeflex.compile import tvm as ct
    from edgeflex.kernels import tir
    from edgeflex.kernels.tir import qconv
    from edgeflex.kernels.tir.elementwise import lower_and_schedule
    from edgeflex.kernels.tir.qstar import request_amx
    from edgeflex.runtime.backends.tvm import _configure_threads
    from edgeflex.runtime.plan import build_plans

    request_amx()
    _configure_threads(threads)
    with ef.Bundle.open(path) as b:
        (job,) = ct.collect_graphs(b, configs=["default@int8"])
        inits = build_plans(b, fused=False, only={"default@int8"})["default@int8"].steps[0].initializers
    qconv.FUSE_STAR = qconv.FUSE_DEPTHWISE = fuse
    try:
        model = ct.prepare_onnx(job.data, job.params)
        mod = ct._relax_module(model, job.inputs, 1)
        tgt = tvm.target.Target(ct.host_target(threads))
        mod, _ = tir.apply(mod, tir.RewriteContext(tgt, job.rel, dict(job.params), 1))
        mod, transform = ct._lift_param_transforms(mod, model, job)
        mod = lower_and_schedule(mod, tgt)
        if fuse:            # as `edgeflex compile` builds an int8 engine (512-bit epilogues on AVX-512)
            tgt = ct.int8_build_target(tgt)
    finally:
        qconv.FUSE_STAR = qconv.FUSE_DEPTHWISE = True
    dev = tvm.cpu()
    names = [i.name for i in model.graph.input if i.name in job.params]
    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32), dev)
    out = []
    for mode in ("compiled", "bytecode"):
        vm = relax.VirtualMachine(relax.build(mod, tgt, exec_mode=mode), dev)
        params = [tvm.runtime.tensor(np.ascontiguousarray(inits[n]), dev) for n in names]
        if transform:
            params = list(vm[transform](params))
        for _ in range(10):
            vm["main"](x, *params)
        out.append((vm, params))
    vm, params = out[0]
    wall = []
    for _ in range(runs):
        t0 = time.perf_counter()
        vm["main"](x, *params)
        wall.append(time.perf_counter() - t0)
    vm, params = out[1]
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    start: dict[str, float] = {}

    def hook(_func, symbol, before, _ret, *_args):
        if before:
            start[symbol] = time.perf_counter()
        else:
            spent[symbol] += time.perf_counter() - start[symbol]
            calls[symbol] += 1
        return 0

    vm.set_instrument(hook)
    for _ in range(runs):
        vm["main"](x, *params)
    return ({k: v / runs * 1e3 for k, v in spent.items()}, {k: v // runs for k, v in calls.items()},
            float(np.median(wall)) * 1e3)


def main() -> None:
    p = timing_parser(__doc__, runs_default="40", warmup=10, block=5)
    p.add_argument("--calibration", type=int, default=32)
    p.add_argument("--out", type=Path, help="RESULTS.md to write the section into")
    a = p.parse_args()
    a.runs = a.runs or 40
    started = time.perf_counter()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="ef-prof-int8-") as tmp:
        path = build(Path(tmp), a.calibration)
        with OthersLoad() as load:
            res = {name: profile(path, a.threads, fuse, a.runs) for name, fuse in (("per op", False),
                                                                                   ("fused", True))}
    rows = ["| kind | per op: ms | calls | fused: ms | calls |", "|---|---:|---:|---:|---:|"]
    by_kind = {name: defaultdict(lambda: [0.0, 0]) for name in res}
    for name, (spent, calls, _) in res.items():
        for sym, ms in spent.items():
            by_kind[name][_kind(sym)][0] += ms
            by_kind[name][_kind(sym)][1] += calls[sym]
    for k, label in KINDS.items():
        a_, b_ = by_kind["per op"].get(k, [0.0, 0]), by_kind["fused"].get(k, [0.0, 0])
        if a_[1] or b_[1]:
            rows.append(f"| {label} | {a_[0]:.3f} | {a_[1]} | {b_[0]:.3f} | {b_[1]} |")
    total = {name: sum(v[0] for v in by_kind[name].values()) for name in res}
    rows.append(f"| **sum of the timed calls** | **{total['per op']:.2f}** | | **{total['fused']:.2f}** | |")
    rows.append(f"| compiled engine, median ms per inference | {res['per op'][2]:.2f} | | "
                f"{res['fused'][2]:.2f} | |")
    spent, calls, _ = res["fused"]
    top = sorted(spent, key=lambda s: -spent[s])[:12]
    rows += ["", "The fused engine's costliest kernels (ms per inference, all calls of the function):", "",
             "| kernel | ms | calls |", "|---|---:|---:|",
             *[f"| `{s}` | {spent[s]:.3f} | {calls[s]} |" for s in top]]
    body = "\n".join([
        f"StarNet-S1, 224x224, batch 1, int8 (QDQ, min-max), TVM at {a.threads} thread(s); ms per inference "
        "from the bytecode VM's instrument hook (each call timed, so the sums carry the hook's overhead and "
        "exceed the compiled engine's time):", "", *rows, "",
        f"- others' CPU while profiled: {load.share:.0%}", "",
        *machine_and_run(a.threads, started=started)])
    publish(a.out, SECTION, "profile_tvm_int8", body)


if __name__ == "__main__":
    main()
