"""TVM benchmark (issue 5): edgeflex on TVM (compiled by `edgeflex compile`) vs edgeflex on ONNX Runtime (and,
with --eager, PyTorch eager), same bundle, same input, same threads, interleaved, medians.

Owns the cases, the timing and the report (stdout, and with --out its section of RESULTS.md); it changes no
library code. Untuned by default (`--trials N` tunes each case's graph with MetaSchedule first).
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import edgeflex as ef
from edgeflex.compile.tvm import compile_bundle
from edgeflex.models.fits import FITS
from edgeflex.models.starnet import starnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OthersLoad, command_line, machine_info, time_interleaved, timing_parser, write_section  # noqa: E402

SECTION = "## TVM (issue 5)"


@dataclass(frozen=True)
class Case:
    label: str
    model: str
    batch: int
    runs: int


CASES = (
    Case("FITS L=720 H=96 C=7 cut=60", "fits", 1, 200),
    Case("StarNet-S1 224x224, 1000 classes", "starnet_s1", 1, 20),
)


def build(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "fits":
        return FITS(720, 96, 7, 60).eval(), (720, 7)
    return starnet("s1", num_classes=1000).eval(), (3, 224, 224)


@dataclass
class Result:
    case: Case
    times: dict[str, np.ndarray]
    rel_tvm_ort: float
    compile_s: float
    form: str | None
    others_cpu: float
    load1: float
    kernels: list[str]


def run_case(case: Case, tmp: Path, *, threads: int, warmup: int, block: int, runs: int | None,
             trials: int, eager: bool, kernels: bool) -> Result:
    model, shape = build(case.model)
    x = np.random.default_rng(1).standard_normal((case.batch, *shape)).astype(np.float32)
    print(f"exporting {case.model} ...", file=sys.stderr, flush=True)
    bundle = ef.export(model, torch.from_numpy(x[:1]), tmp / f"{case.model}.efx", threads=threads, n_random=1)
    print(f"compiling {case.model} for this host (trials {trials}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    report = compile_bundle(bundle.path, "host", trials=trials, batch=case.batch if trials else None,
                            threads=threads, kernels=kernels)
    applied = sorted({k for e in report["engines"] for k in e.get("kernels", [])})
    compile_s = time.perf_counter() - t0
    ort = ef.Runtime(bundle.path, threads=threads)
    tvm = ef.Runtime(bundle.path, backend="tvm", threads=threads)
    xt = torch.from_numpy(x)
    torch.set_num_threads(threads)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(xt)

    a, b = tvm.run(x), ort.run(x)
    rel = float(np.abs(a - b).max() / np.abs(b).max())
    n = runs or case.runs
    print(f"timing {case.label} batch {case.batch}: {n} runs each ...", file=sys.stderr, flush=True)
    with OthersLoad() as others:
        contenders = {"tvm": lambda: tvm.run(x), "onnxruntime": lambda: ort.run(x)}
        if eager:
            contenders["eager"] = forward
        times = time_interleaved(contenders, n, warmup, block)
    form = bundle.manifest["export"].get("kernels", {}).get("form")
    return Result(case, times, rel, compile_s, form, others.share, os.getloadavg()[0], applied)


def _ms(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def render(results: list[Result], trials: int, info: dict[str, str], meta: dict[str, str]) -> str:
    tuned = f"{trials} MetaSchedule trials" if trials else "no tuning"
    lines = [f"| case | batch | TVM ({tuned}) median ms | p90 ms | ONNX Runtime median ms | p90 ms "
             "| PyTorch eager median ms | TVM / ORT | TVM vs ORT max rel diff | edgeflex kernels | compile s "
             "| runs each | others' CPU | load 1m |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        t, o = r.times["tvm"], r.times["onnxruntime"]
        e = _ms(np.median(r.times["eager"])) if "eager" in r.times else "-"
        label = r.case.label + (f" (form {r.form})" if r.form else "")
        lines.append(f"| {label} | {r.case.batch} | {_ms(np.median(t))} | {_ms(np.percentile(t, 90))} "
                     f"| {_ms(np.median(o))} | {_ms(np.percentile(o, 90))} | {e} "
                     f"| **{np.median(t) / np.median(o):.2f}x** | {r.rel_tvm_ort:.1e} "
                     f"| {', '.join(r.kernels) or 'none'} | {r.compile_s:.0f} "
                     f"| {len(t)} | {r.others_cpu:.0%} | {r.load1:.2f} |")
    lines += ["", "TVM / ORT above 1 means TVM is slower. 'edgeflex kernels' are the hand-scheduled TIR "
              "kernels (`kernels/tir`) the compiler put in place of the ops they replace; every other op "
              "goes through TVM's default CPU pipeline, which legalizes it to a plain loop nest and "
              "schedules nothing (no tiling, no parallel loop) unless the command shows `--trials`. "
              "`--no-kernels` gives the plain-TVM baseline. Breakdowns: the FITS and StarNet TIR sections.",
              "", "Machine and run:", ""]
    lines += [f"- {k}: {v}" for k, v in {**info, **meta}.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tvm as _tvm

    p = timing_parser(__doc__, warmup=5, block=5,
                      runs_default="per case: " + ", ".join(f"{c.model}: {c.runs}" for c in CASES))
    p.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per case (default 0: untuned)")
    p.add_argument("--eager", action="store_true", help="time PyTorch eager too (its two OpenMP threads "
                   "suffer most from other processes' load: 9 ms idle vs 2.6 s measured here for StarNet-S1)")
    p.add_argument("--no-kernels", action="store_true", help="plain TVM: no edgeflex TIR kernels")
    p.add_argument("--only", choices=[c.model for c in CASES], action="append", help="run only these cases")
    p.add_argument("--out", type=Path, help="write the table into this markdown file's section")
    a = p.parse_args(argv)
    started, date = time.perf_counter(), _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_tvm_") as tmp:
        for case in CASES:
            if a.only and case.model not in a.only:
                continue
            results.append(run_case(case, Path(tmp), threads=a.threads, warmup=a.warmup, block=a.block,
                                    runs=a.runs, trials=a.trials, eager=a.eager,
                                    kernels=not a.no_kernels))
    info = machine_info(a.threads)
    info["versions"] += f", apache-tvm {_tvm.__version__}"
    meta = {"date": date, "command": f"`{command_line()}`",
            "timing": f"interleaved blocks of {a.block} calls, {a.warmup} warm-up calls each; wall time per "
                      "`Runtime.run` (input checks included), per eager forward under torch.inference_mode",
            "total time": f"{time.perf_counter() - started:.0f} s"}
    body = render(results, a.trials, info, meta)
    print(body)
    if a.out:
        write_section(a.out, SECTION, "bench_tvm", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
