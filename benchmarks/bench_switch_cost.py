"""Switch costs (issue 20): what a switch of config (or thread count) costs on the next runs, at 1 and 2
threads, on ONNX Runtime and TVM, plain and with the target warmed first (`Runtime.switch(warm=True)`).

For each engine setting and each ordered pair of configs (the fastest and the slowest config, and on ORT the
same config at the other thread count), repeated `--reps` times in alternation of the two modes: run A
back to back `--lead` times, switch to B, time B's next `--after` runs, then `--tail` more whose median is
B's steady latency. A switch's cost is the next runs' excess over that steady latency; a warmed switch also
spends its warm-up run (off the request path when the runtime warms in the background: `set_budget(
warm_switch=True)`). TVM's thread pool is one per process, so each TVM thread count runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import edgeflex as ef

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _busy_jiffies, cpu_flag_list, machine_and_run, publish  # noqa: E402


def _cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (the per-setting measurements)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

SECTION = "## Switch costs (issue 20): what a switch costs on the next runs"


def cpu_flags() -> str:
    want = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16")
    flags = cpu_flag_list()
    if flags is None:
        return "unknown"
    return " ".join(f for f in want if f in flags) or "none of " + ", ".join(want)


def measure(rt: ef.Runtime, pairs: list[tuple[tuple[str, int], tuple[str, int]]], x: np.ndarray, *,
            reps: int, lead: int, after: int, tail: int) -> list[dict]:
    """Per pair and mode: the excess (ms) of B's first run and of its first `after` runs together over B's
    steady median, medians over the reps; the warm-up run's own time."""
    out = []
    for (a, ta), (b, tb) in pairs:
        res = {m: {"first": [], "total": [], "steady": [], "warm_ms": []} for m in ("plain", "warm")}
        for r in range(reps):
            for mode in (("plain", "warm") if r % 2 == 0 else ("warm", "plain")):
                rt.switch(a, threads=ta)
                for _ in range(lead):
                    rt.run(x)
                t0 = time.perf_counter()
                rt.switch(b, threads=tb, warm=mode == "warm")
                warm = (time.perf_counter() - t0) * 1e3
                lat = []
                for _ in range(after + tail):
                    t0 = time.perf_counter()
                    rt.run(x)
                    lat.append((time.perf_counter() - t0) * 1e3)
                steady = float(np.median(lat[after:]))
                first = np.array(lat[:after]) - steady
                d = res[mode]
                d["first"].append(first[0])
                d["total"].append(first.sum())
                d["steady"].append(steady)
                d["warm_ms"].append(warm)
        for mode, d in res.items():
            out.append({"from": f"{a}@{ta}t", "to": f"{b}@{tb}t", "mode": mode,
                        **{k: float(np.median(v)) for k, v in d.items()}})
    return out


def run_setting(bundle: Path, backend: str, threads: tuple[int, ...], a: argparse.Namespace) -> list[dict]:
    rt = ef.Runtime(bundle, backend=backend, threads=threads if len(threads) > 1 else threads[0],
                    allow_native=True)
    x = np.random.default_rng(0).standard_normal([1 if d is None else d for d in rt.inputs[0].shape]
                                                 ).astype(np.float32)
    # idle latencies of the configs at the first count, to pick the fastest and the slowest
    t = threads[0]
    speed = {}
    for c in rt.configs:
        rt.switch(c.name, threads=t)
        for _ in range(20):
            rt.run(x)
        ts = []
        for _ in range(50):
            t0 = time.perf_counter()
            rt.run(x)
            ts.append(time.perf_counter() - t0)
        speed[c.name] = float(np.median(ts))
    small, large = min(speed, key=speed.get), max(speed, key=speed.get)
    pairs = [((small, t), (large, t)), ((large, t), (small, t))]
    if len(threads) > 1:
        pairs += [((large, threads[0]), (large, threads[1])), ((large, threads[1]), (large, threads[0]))]
    rows = measure(rt, pairs, x, reps=a.reps, lead=a.lead, after=a.after, tail=a.tail)
    for r in rows:
        r.update(backend=backend, threads="+".join(map(str, threads)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", type=Path, nargs="+",
                   help="elastic bundles (TVM rows need `edgeflex compile` first, else skipped saying why)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--lead", type=int, default=30, help="runs of the config switched from")
    p.add_argument("--after", type=int, default=8, help="runs after the switch whose excess is the cost")
    p.add_argument("--tail", type=int, default=30, help="runs after those: the steady latency")
    p.add_argument("--backends", default="onnxruntime,tvm")
    p.add_argument("--child", help=argparse.SUPPRESS)       # "backend:threads": one setting, JSON out
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.child:
        backend, t = a.child.split(":")
        print(json.dumps(run_setting(a.bundles[0], backend, tuple(int(v) for v in t.split("+")), a)))
        return 0
    started = time.perf_counter()
    settings = []
    for backend in a.backends.split(","):
        settings += [(backend, "1"), (backend, "2")]
        if backend == "onnxruntime":                    # per-session pools: both counts in one runtime
            settings.append((backend, "2+1"))
    rows, skipped = [], []
    own0, busy0 = _cpu_seconds(), _busy_jiffies()
    for bundle in a.bundles:
        for backend, t in settings:
            cmd = [sys.executable, __file__, str(bundle), "--child", f"{backend}:{t}", "--reps",
                   str(a.reps), "--lead", str(a.lead), "--after", str(a.after), "--tail", str(a.tail)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                skipped.append(f"{bundle.name}, {backend} at {t} threads: "
                               f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            for r in json.loads(done.stdout.strip().splitlines()[-1]):
                rows.append({**r, "bundle": bundle.name})
    busy1 = _busy_jiffies()
    tick = os.sysconf("SC_CLK_TCK")
    others = (busy1[0] - busy0[0]) / tick - (_cpu_seconds() - own0)
    others /= max((busy1[1] - busy0[1]) / tick, 1e-9)
    lines = ["| bundle | backend | engines at threads | switch | mode | B steady ms | 1st run excess ms "
             f"| excess of {a.after} runs ms | warm-up run ms |", "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        warm = f"{r['warm_ms']:.3f}" if r["mode"] == "warm" else "-"
        lines.append(f"| {r['bundle']} | {r['backend']} | {r['threads']} | {r['from']} -> {r['to']} | "
                     f"{r['mode']} | "
                     f"{r['steady']:.3f} | {r['first']:+.3f} | {r['total']:+.3f} | {warm} |")
    body = "\n".join([
        f"Batch 1: per switch, B's next {a.after} runs against B's steady median "
        f"(the median of the {a.tail} runs after them), after {a.lead} runs of A; medians over {a.reps} "
        "repetitions, the two modes alternating. *plain*: `rt.switch(B)`; *warm*: `rt.switch(B, warm=True)` "
        "(one run of B on the last input first; its time is the last column).", "", *lines, "",
        *[f"Not measured: {s}" for s in skipped], "",
        *machine_and_run(os.cpu_count() or 1, f"- cpu flags: {cpu_flags()}",
                         f"- other processes' share of the CPU during the run (this benchmark's children not "
                         f"counted): {max(others, 0):.0%} (other engineers' jobs share this machine)",
                         started=started)])
    publish(a.out, SECTION, "bench_switch_cost", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
