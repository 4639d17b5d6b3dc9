"""Foundation benchmark (issue 2): PyTorch eager vs edgeflex on ONNX Runtime, same threads, same input.

Owns the cases, the interleaved timing and the markdown report (stdout, and with --out its section of
RESULTS.md); it changes no library code. Latency does not depend on trained values: models are seeded.
"""

from __future__ import annotations

import datetime as _dt
import os
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
from edgeflex.models.fits import FITS
from edgeflex.models.starnet import starnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OthersLoad, command_line, machine_info, publish, time_interleaved, timing_parser  # noqa: E402

SECTION = "## Foundation (issue 2): PyTorch eager vs edgeflex on ONNX Runtime"
FITS_HYPER = {"seq_len": 720, "pred_len": 96, "channels": 7, "cut_freq": 60, "individual": False}
STARNET_VARIANT = "s1"


@dataclass(frozen=True)
class Case:
    """One row of the table. `target`: the issue's expected eager/edgeflex median ratio, if it sets one."""

    label: str
    model: str
    batch: int
    runs: int
    target: float | None = None


CASES = (
    Case("FITS L=720 H=96 C=7 cut=60", "fits", 1, 300, target=3.0),
    Case("FITS L=720 H=96 C=7 cut=60", "fits", 256, 150),
    Case("StarNet-S1 224x224, 1000 classes", "starnet_s1", 1, 150, target=1.5),
)


def build_fits() -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    h = FITS_HYPER
    model = FITS(h["seq_len"], h["pred_len"], h["channels"], h["cut_freq"], individual=h["individual"])
    return model.eval(), (h["seq_len"], h["channels"])


def build_starnet_s1() -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return starnet(STARNET_VARIANT, num_classes=1000).eval(), (3, 224, 224)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[int, ...]]]] = {
    "fits": build_fits,
    "starnet_s1": build_starnet_s1,
}


@dataclass
class Result:
    case: Case
    eager_ms: np.ndarray
    edgeflex_ms: np.ndarray
    session_ms: np.ndarray
    max_abs_diff: float
    max_rel_diff: float
    others_cpu: float
    load1: float

    @property
    def ratio(self) -> float:
        return float(np.median(self.eager_ms) / np.median(self.edgeflex_ms))


# --- measurement -------------------------------------------------------------------------------------------

def run_case(case: Case, model: torch.nn.Module, sample_shape: tuple[int, ...], runtime: ef.Runtime, *,
             threads: int, runs: int, warmup: int, block: int) -> Result:
    """Time eager PyTorch and the edgeflex runtime on the same seeded input, and compare their outputs.

    Also times the runtime's own ORT session called directly, to show what edgeflex's checks cost.
    """
    x = np.random.default_rng(1).standard_normal((case.batch, *sample_shape)).astype(np.float32)
    xt = torch.from_numpy(x)
    torch.set_num_threads(threads)

    def eager() -> torch.Tensor:
        with torch.inference_mode():
            return model(xt)

    def edgeflex() -> np.ndarray:
        return runtime.run(x)

    # NOTE: private on purpose: the very session the runtime holds, without edgeflex's input checks.
    session, feed = runtime._plan.engines[0].session, {runtime.inputs[0].name: x}

    def ort_session() -> list:
        return session.run(None, feed)

    ref, got = eager().numpy().astype(np.float64), edgeflex()
    diff = float(np.max(np.abs(got - ref)))
    with OthersLoad() as others:
        times = time_interleaved({"eager": eager, "edgeflex": edgeflex, "ort_session": ort_session},
                                 runs, warmup, block)
    rel = diff / max(float(np.max(np.abs(ref))), 1e-30)
    return Result(case, times["eager"], times["edgeflex"], times["ort_session"], diff, rel, others.share,
                  os.getloadavg()[0])


# --- report ------------------------------------------------------------------------------------------------

def _ms(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def render(results: list[Result], forms: dict[str, Any], info: dict[str, str], meta: dict[str, str]) -> str:
    """The generated part of the section: table, expectations, FITS form choice, machine, command."""
    lines = [
        ("| case | batch | eager median ms | eager p90 ms | edgeflex median ms | edgeflex p90 ms "
         "| eager / edgeflex | bare ORT session median ms | max abs diff (rel) | runs each "
         "| others' CPU | load 1m |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        e, x = r.eager_ms, r.edgeflex_ms
        lines.append(
            f"| {r.case.label} | {r.case.batch} | {_ms(np.median(e))} | {_ms(np.percentile(e, 90))} "
            f"| {_ms(np.median(x))} | {_ms(np.percentile(x, 90))} | **{r.ratio:.2f}x** "
            f"| {_ms(np.median(r.session_ms))} "
            f"| {r.max_abs_diff:.2e} ({r.max_rel_diff:.1e}) | {len(e)} | {r.others_cpu:.0%} "
            f"| {r.load1:.2f} |")
    lines += ["", "Expectations of the issue (eager median / edgeflex median):", ""]
    for r in results:
        if r.case.target is not None:
            verdict = "met" if r.ratio >= r.case.target else "NOT met"
            lines.append(f"- {r.case.label}, batch {r.case.batch}: >= {r.case.target:g}x expected, "
                         f"{r.ratio:.2f}x measured: **{verdict}**")
    if forms:
        k = forms
        cands = "; ".join(f"{form}: " + ", ".join(f"{key.removesuffix('_us')} {v:g}" for key, v in m.items())
                          for form, m in k["measured"].items())
        lines += ["", (f"FITS spectral form chosen by the exporter: **{k['form']}** (engine {k['engine']}, "
                       f"threads {k['threads']}; rule: {k['rule']}). Candidates as the exporter measured "
                       f"them, median us per call: {cands}.")]
    lines += ["", "Machine and run:", ""]
    lines += [f"- {key}: {val}" for key, val in {**info, **meta}.items()]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = timing_parser(__doc__, warmup=20, block=10, runs_default="per case: " + ", ".join(
        f"{c.model} b{c.batch}: {c.runs}" for c in CASES))
    p.add_argument("--out", type=Path, default=None,
                   help="write the table into this markdown file's section (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.warmup < 10 or args.block < 1 or (args.runs is not None and args.runs < 1):
        p.error("need --threads >= 1, --warmup >= 10, --block >= 1, --runs >= 1")

    started, load_start = time.perf_counter(), os.getloadavg()
    date = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    results: list[Result] = []
    forms: dict[str, Any] = {}
    export_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_foundation_") as tmp:
        built: dict[str, tuple[torch.nn.Module, tuple[int, ...], ef.Runtime]] = {}
        for case in CASES:
            if case.model not in built:
                model, shape = MODELS[case.model]()
                print(f"exporting {case.model} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                example = torch.from_numpy(
                    np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32))
                bundle = ef.export(model, example, Path(tmp) / f"{case.model}.efx", threads=args.threads)
                export_s[case.model] = time.perf_counter() - t0
                if "kernels" in bundle.manifest["export"]:
                    forms = bundle.manifest["export"]["kernels"]
                built[case.model] = (model, shape, ef.Runtime(bundle, threads=args.threads))
            model, shape, rt = built[case.model]
            runs = args.runs or case.runs
            print(f"timing {case.label} batch {case.batch}: {runs} runs each ...", file=sys.stderr,
                  flush=True)
            results.append(run_case(case, model, shape, rt, threads=args.threads, runs=runs,
                                    warmup=args.warmup, block=args.block))

    load_end = os.getloadavg()
    meta = {
        "method": (f"{args.warmup} warm-up calls each, then timed calls in alternating blocks of "
                   f"{args.block} (order rotated each round, one untimed call at each block start), "
                   "time.perf_counter per call; eager = torch.inference_mode() model(x); "
                   "edgeflex = ef.Runtime(bundle).run(x) (input checks included); "
                   "bare ORT session = that runtime's InferenceSession.run, no checks; "
                   "same float32 input for all; max abs diff = edgeflex vs eager output"),
        "load average (1, 5, 15 min)": (f"{', '.join(f'{v:.2f}' for v in load_start)} at start, "
                                        f"{', '.join(f'{v:.2f}' for v in load_end)} at end; "
                                        "'others' CPU' = share of all CPUs used by other processes "
                                        "while that case was timed"),
        "export time (s, incl. validation)": ", ".join(f"{k} {v:.1f}" for k, v in export_s.items()),
        "date (UTC)": date,
        "command": f"`{command_line()}`",
        "wall time": f"{time.perf_counter() - started:.0f} s",
    }
    body = render(results, forms, machine_info(args.threads), meta)
    publish(args.out, SECTION, "bench_foundation", body)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
