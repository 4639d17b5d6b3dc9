"""Why the kernel-level predictor times each kernel after its producer (issue 22): along the convs of plain
CNNs (`bench_predictor._cnn`), the convs timed alone and summed, against the first conv alone plus each
conv after its producer (T(pair) - T(producer alone), the two as one graph), against the convs as one
graph, at 1 and 2 threads, on ONNX Runtime with the Runtime's session settings. Times the graphs here
(a quiet machine: nothing else running).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from edgeflex.devices.measure import measure
from edgeflex.runtime.backends.onnxruntime import session_options

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predictor import _cnn, _torchscript, cpu_flags
from common import OthersLoad, machine_and_run, write_section

SECTION = "## Kernel-level predictor: the convs of a CNN after their producers (issue 22)"
CNNS = ((8, 32), (16, 64), (24, 96))


def _time(module: nn.Module, x: torch.Tensor, threads: int, rounds: int, runs: int) -> float:
    """Median over `rounds` of the p50 (µs) of `runs` runs of `module` exported to ONNX."""
    sess = ort.InferenceSession(_torchscript(module, x), session_options(ort, threads),
                                providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return float(np.median([measure(lambda: sess.run(None, feed), warmup=20, runs=runs)["p50_ms"] * 1e3
                            for _ in range(rounds)]))


def cnn_rows(width: int, size: int, threads: int, rounds: int, runs: int) -> list:
    torch.manual_seed(0)
    net = _cnn(width).eval()
    convs = [nn.Sequential(net[2 * i], net[2 * i + 1]) for i in range(4)]
    ins = [torch.randn(1, 3, size, size)]
    with torch.no_grad():
        for c in convs:
            ins.append(c(ins[-1]))
    alone = [_time(convs[i], ins[i], threads, rounds, runs) for i in range(4)]
    pairs = [_time(nn.Sequential(convs[i - 1], convs[i]), ins[i - 1], threads, rounds, runs)
             for i in range(1, 4)]
    after = [alone[0]] + [pairs[i - 1] - alone[i - 1] for i in range(1, 4)]
    whole = _time(nn.Sequential(*convs), ins[0], threads, rounds, runs)
    return [f"cnn-w{width}-{size}", threads, sum(alone), sum(after), whole,
            "/".join(f"{a:.0f}" for a in alone), "/".join(f"{a:.0f}" for a in after)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per graph (the median of their p50s)")
    ap.add_argument("--runs", type=int, default=300, help="runs per round")
    ap.add_argument("--out", type=Path, help="RESULTS.md to write this benchmark's section into")
    a = ap.parse_args()
    if a.rounds < 1 or a.runs < 1:
        ap.error("--rounds and --runs must be at least 1")
    t0 = time.perf_counter()
    rows = []
    with OthersLoad() as others:
        for width, size in CNNS:
            for threads in (1, 2):
                rows.append(cnn_rows(width, size, threads, a.rounds, a.runs))
                print(rows[-1], flush=True)
    lines = ["Along the four convs of each CNN (the graph of the convs only), µs: the convs timed alone, "
             "summed; the first conv alone plus each conv after its producer (T(pair) - T(producer alone), "
             "the two as one graph: what `edgeflex profile --kernels` times); the four convs as one graph. "
             f"Each: the median of {a.rounds} rounds' p50 of {a.runs} runs.", "",
             "| CNN | threads | convs alone, summed | first alone + each after its producer | the convs as "
             "one graph | each alone | each after its producer |",
             "|---|---:|---:|---:|---:|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]} | {r[6]} |" for r in rows]
    lines += ["", *machine_and_run("1 and 2", f"- CPU flags: {cpu_flags()}",
                                   f"- others' CPU while timing: {others.share:.0%}", started=t0)]
    body = "\n".join(lines)
    print(body)
    if a.out:
        write_section(a.out, SECTION, "pred_pairs", body)


if __name__ == "__main__":
    main()
