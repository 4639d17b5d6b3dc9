"""How far the policy benchmark's sampled statics are from the static configs run alone (issue 20).

`bench_policy_traces.py` scores every static (config, threads) from one sweep along the trace
(`tracerun.sweep`: the options take turns of `turn_ms`, the runs that start within `lead_ms` of each switch
left out). A static config never switches, so what the sweep should find is the config run alone.

Two measurements, per bundle:
- *settling*: the options take turns of `--settle-turn-ms` with no load; each run's latency over its turn's
  second-half median, by the time since the switch (how long the runs after a switch stay slow);
- per trace seed, every option played alone over the whole trace (`tracerun.play` with no budget), then the
  trace swept the old way (turns of 4 runs, the first left out: before the tenth session) and the new way;
  each sweep's within-budget share against the option's own. (Plays alone follow each other in time, so a
  slow spell of a shared machine falls on some options only: read the mean over options, not one cell.)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

from edgeflex.devices.loadtrace import LoadPlayer, generate
from edgeflex.runtime import tracerun

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_policy_traces import seed_list, setup  # noqa: E402
from bench_switch_cost import cpu_flags  # noqa: E402
from common import machine_and_run, publish  # noqa: E402

SECTION = "## Budget policies on unseen load traces (issue 20)"


EDGES_MS = (0, 0.5, 1, 2, 5, 10, 20, 50)


def old_sweep(rt, trace, player, x, options, block: int = 4) -> dict[str, dict]:
    """The sweep before the tenth session: turns of `block` runs, the first left out."""
    out = {f"{n}@{t}t": {"latency_ms": []} for n, t in options}
    start, i = time.perf_counter(), 0
    try:
        while time.perf_counter() - start < trace.seconds:
            name, threads = options[i % len(options)]
            i += 1
            rt.switch(name, threads=threads)
            for j in range(block):
                player.set(*trace.state(time.perf_counter() - start))
                t0 = time.perf_counter()
                rt.run(x)
                if j:
                    out[f"{name}@{threads}t"]["latency_ms"].append((time.perf_counter() - t0) * 1e3)
    finally:
        player.set(0, 0)
    return out


def settling(rt, x, options, turn_ms: float, seconds: float) -> dict[int, list[tuple[float, float, int]]]:
    """Per thread count, per interval of EDGES_MS since a switch: (p50, p99, runs) of latency over the turn's
    second-half median."""
    acc = {t: [[] for _ in EDGES_MS] for _, t in options}
    end, i = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        name, threads = options[i % len(options)]
        i += 1
        rt.switch(name, threads=threads)
        switched, rec = time.perf_counter(), []
        while (since := (time.perf_counter() - switched) * 1e3) < turn_ms:
            t0 = time.perf_counter()
            rt.run(x)
            rec.append((since, (time.perf_counter() - t0) * 1e3))
        late_half = [v for s, v in rec if s >= turn_ms / 2]
        if not late_half:
            continue
        settled = float(np.median(late_half))
        for s, v in rec:
            acc[threads][int(np.searchsorted(EDGES_MS, s, side="right")) - 1].append(v / settled)
    return {t: [(float(np.median(v)), float(np.percentile(v, 99)), len(v)) if v else (np.nan, np.nan, 0)
                for v in bins] for t, bins in acc.items()}


def within(rec: dict, budget_ms: float) -> float:
    return float((np.asarray(rec["latency_ms"]) <= budget_ms).mean())


def compare(bundle: Path, seed: int, a: argparse.Namespace, player: LoadPlayer, rts: dict,
            info: dict) -> dict:
    trace = generate(seed, a.seconds, len(os.sched_getaffinity(0)), batch=1)
    budget_ms = trace.budget_ms(info["idle"])
    rt = rts["static"]
    rt.set_budget(None)
    alone = {}
    options = list(info["options"])
    random.Random(seed).shuffle(options)          # machine drift falls on no option in particular
    for name, threads in options:
        rt.switch(name, threads=threads)
        alone[f"{name}@{threads}t"] = within(tracerun.play(rt, trace, player, info["x"]), budget_ms)
    swept = {"4 runs, 1st left out (before)": {
        k: within(v, budget_ms) for k, v in old_sweep(rt, trace, player, info["x"], info["options"]).items()}}
    rec = tracerun.sweep(rt, trace, player, info["x"], info["options"], turn_ms=a.turn_ms, lead_ms=a.lead_ms)
    swept[f"{a.turn_ms:g} ms, first {a.lead_ms:g} ms left out (now)"] = {k: within(v, budget_ms)
                                                                         for k, v in rec.items()}
    return {"seed": seed, "budget_ms": budget_ms, "load": trace.describe(), "alone": alone, "swept": swept}


def table(rows: list[dict], name: str) -> list[str]:
    sweeps = list(rows[0]["swept"])
    lines = [f"**{name}**: within-budget share run alone, and each sweep's minus it, points", "",
             "| seed | budget ms | option | alone | " + " | ".join(f"sweep {s}" for s in sweeps) + " |",
             "|---:|---:|---|---:|" + "---:|" * len(sweeps)]
    for r in rows:
        for k, v in sorted(r["alone"].items(), key=lambda kv: -kv[1]):
            diffs = " | ".join(f"{100 * (r['swept'][s][k] - v):+.2f}" for s in sweeps)
            lines.append(f"| {r['seed']} | {r['budget_ms']:.3f} | {k} | {v:.2%} | {diffs} |")
    for j, s in enumerate(sweeps):
        d = np.array([100 * (r["swept"][s][k] - v) for r in rows for k, v in r["alone"].items()])
        cells = [""] * len(sweeps)
        cells[j] = (f"mean {d.mean():+.2f}, median {np.median(d):+.2f}, mean abs {np.abs(d).mean():.2f}, "
                    f"largest {d[np.argmax(np.abs(d))]:+.2f}")
        lines.append(f"| **{s}** | | all options | | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundles", nargs="+", type=Path, required=True)
    p.add_argument("--seeds", type=seed_list, default="9000-9001")
    p.add_argument("--seconds", type=float, default=6.0, help="length of each trace")
    p.add_argument("--turn-ms", type=float, default=20.0)
    p.add_argument("--lead-ms", type=float, default=5.0)
    p.add_argument("--settle-turn-ms", type=float, default=100.0)
    p.add_argument("--settle-seconds", type=float, default=20.0)
    p.add_argument("--profile-seconds", type=float, default=1.0)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if not 0 <= a.lead_ms < a.turn_ms:
        p.error(f"--lead-ms {a.lead_ms:g}: expected 0 <= lead-ms < --turn-ms ({a.turn_ms:g})")
    a.batch, a.strategies = 1, ()
    started = time.perf_counter()
    body = [f"Each option played alone over each {a.seconds:g} s trace (batch 1, ONNX Runtime, engines at "
            f"(2, 1) threads), then swept; seeds {a.seeds}.", ""]
    with LoadPlayer() as player:
        for bundle in a.bundles:
            rts, info = setup(bundle, a)
            settle = settling(rts["static"], info["x"], info["options"], a.settle_turn_ms, a.settle_seconds)
            spans = " | ".join(f"{lo:g}-{hi:g} ms" for lo, hi in zip(EDGES_MS, EDGES_MS[1:]))
            body += [f"**{bundle.name}, settling** (turns of {a.settle_turn_ms:g} ms, "
                     f"{a.settle_seconds:g} s, no load): latency over the turn's settled median (its second "
                     "half), by ms since the switch, p50 / p99", "", f"| threads | {spans} |",
                     "|---:|" + "---:|" * (len(EDGES_MS) - 1)]
            for t, bins in sorted(settle.items(), reverse=True):
                body.append(f"| {t} | " + " | ".join(f"{m:.2f} / {q:.2f}" for m, q, _ in bins[:-1]) + " |")
            body.append("")
            rows = []
            for seed in a.seeds:
                r = compare(bundle, seed, a, player, rts, info)
                rows.append(r)
                print(f"{bundle.name} seed {seed}: budget {r['budget_ms']:.3f} ms, load {r['load']}",
                      flush=True)
                for k, v in r["alone"].items():
                    print(f"  {k:28s} alone {v:.2%} " + " ".join(f"sweep {s} {r['swept'][s][k]:.2%}"
                                                              for s in r["swept"]), flush=True)
            body += table(rows, bundle.name) + [""]
    body += machine_and_run(2, f"- cpu flags: {cpu_flags()}", started=started)
    publish(a.out, SECTION, "bench_sweep_bias", "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
