"""Latency levels per turn under a steady hog, and the CPU our request thread ran on (issue 20).

One config, pinned, played in turns of `--turn` seconds: at each turn's start the `--alu` / `--mem` hogs start
(`devices.loadtrace.LoadPlayer`, pinned from the last core down), at its end they stop, as the trace
benchmark's turns do. Per turn: p50 and p90, requests, and which CPU the calling thread was on (read from
/proc/thread-self/stat every `--probe-every` requests, a read of ~20 us outside the timed call). Levels that
change from turn to turn while the thread stays on one CPU are not our threads' placement inside this machine.
Linux only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import edgeflex as ef
from edgeflex.devices.loadtrace import LoadPlayer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_switch_cost import cpu_flags  # noqa: E402
from common import machine_and_run, publish  # noqa: E402

SECTION = "## Latency levels per turn under a steady hog (issue 20)"


def current_cpu() -> int:
    """The CPU the calling thread last ran on (field 39 of /proc/thread-self/stat)."""
    with open("/proc/thread-self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])


def play_turns(rt: ef.Runtime, x: np.ndarray, player: LoadPlayer | None, alu: int, mem: int, turns: int,
               turn_s: float, probe_every: int, rest_s: float = 0.05) -> list[dict]:
    pc = time.perf_counter
    out = []
    for _ in range(turns):
        if player is not None:
            player.set(alu, mem)
        lat, cpus = [], []
        end = pc() + turn_s
        while pc() < end:
            t0 = pc()
            rt.run(x)
            lat.append(pc() - t0)
            if len(lat) % probe_every == 0:
                cpus.append(current_cpu())
        if player is not None:
            player.set(0, 0)
        time.sleep(rest_s)
        v = np.array(lat) * 1e3
        out.append({"p50": float(np.median(v)), "p90": float(np.percentile(v, 90)), "n": len(v),
                    "cpus": np.bincount(cpus, minlength=1).tolist() if cpus else []})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--alu", type=int, default=1, help="ALU hogs during each turn")
    p.add_argument("--mem", type=int, default=0, help="memory hogs during each turn")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--turn", type=float, default=0.5, help="seconds per turn")
    p.add_argument("--probe-every", type=int, default=50)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    for name in ("threads", "turns", "probe_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: expected an integer >= 1")
    if a.alu < 0 or a.mem < 0:
        p.error(f"--alu {a.alu} --mem {a.mem}: expected hog counts >= 0")
    if not 0 < a.turn < 3600:
        p.error(f"--turn {a.turn:g}: expected seconds > 0")
    started = time.perf_counter()
    try:
        rt = ef.Runtime(a.bundle, threads=a.threads)
        rt.switch(a.config)
    except ef.EdgeflexError as e:
        p.error(str(e))
    spec = rt.inputs[0]
    x = np.random.default_rng(0).standard_normal([1 if d is None or isinstance(d, str) else d
                                                   for d in spec.shape]).astype(np.float32)
    with LoadPlayer() as player:
        rows = play_turns(rt, x, player, a.alu, a.mem, a.turns, a.turn, a.probe_every)
    body = [f"`{a.config}@{a.threads}t` of `{a.bundle.name}`, {a.turns} turns of {a.turn:g} s, {a.alu} ALU "
            f"and {a.mem} memory hog(s) on during each turn (off for 50 ms between turns):", "",
            "| turn | p50 ms | p90 ms | requests | calling thread's CPU (probes per CPU) |",
            "|---:|---:|---:|---:|---|"]
    for i, r in enumerate(rows):
        where = ", ".join(f"cpu{c}: {n}" for c, n in enumerate(r["cpus"]) if n)
        body.append(f"| {i} | {r['p50']:.3f} | {r['p90']:.3f} | {r['n']} | {where} |")
    body += ["", *machine_and_run(a.threads, f"- cpu flags: {cpu_flags()}", started=started)]
    publish(a.out, SECTION, "bench_turn_levels", "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
