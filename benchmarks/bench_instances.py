"""Do runtimes of one bundle, pinned to one config, differ among themselves? (issue 20)

`--instances` Runtimes of one bundle are made the same way and pinned to one (config, threads). They play in
rounds: in each round every instance plays one turn of `--turn` seconds, the order rotating, with the
`--alu` / `--mem` hogs on during each turn (`devices.loadtrace.LoadPlayer`, as in the trace benchmark).
Per instance: the mean over rounds of its turns' p50 and of its share within `--budget-ms`.

Whether the instances differ beyond the turn-to-turn noise is a permutation test: under "instance makes no
difference", the instances' labels are exchangeable within a round, so the spread of the instance means
(their variance) is compared with the same spread after shuffling the labels within every round
(`--permutations` times). A small p says an instance keeps its own level from round to round: then two
strategies played on two runtimes differ by that much before either decides anything.
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

SECTION = "## Runtimes of one config, compared among themselves (issue 20)"


def play_rounds(rts: list, x: np.ndarray, player: LoadPlayer | None, alu: int, mem: int, rounds: int,
                turn_s: float, budget_ms: float | None, rest_s: float = 0.02, progress=None) -> dict:
    """-> {"p50": (rounds, instances) ms, "within": (rounds, instances) share or None, "n": requests}."""
    pc = time.perf_counter
    k = len(rts)
    p50 = np.zeros((rounds, k))
    within = np.zeros((rounds, k))
    n = np.zeros((rounds, k), dtype=int)
    for r in range(rounds):
        for i in [(r + j) % k for j in range(k)]:
            rt = rts[i]
            if player is not None:
                player.set(alu, mem)
            lat = []
            end = pc() + turn_s
            while pc() < end:
                t0 = pc()
                rt.run(x)
                lat.append(pc() - t0)
            if player is not None:
                player.set(0, 0)
            time.sleep(rest_s)
            v = np.array(lat) * 1e3
            p50[r, i], n[r, i] = np.median(v), len(v)
            within[r, i] = (v <= budget_ms).mean() if budget_ms is not None else np.nan
            if progress is not None:
                progress.update()
    return {"p50": p50, "within": within if budget_ms is not None else None, "n": n}


def instance_effect(values: np.ndarray, permutations: int = 2000, seed: int = 0) -> tuple[float, float]:
    """values: (rounds, instances). -> (spread of the instance means, max - min; p of a spread of their
    variance at least this large with the labels shuffled within each round)."""
    means = values.mean(0)
    observed = means.var()
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.repeat(values[None], permutations, axis=0), axis=2)
    null = shuffled.mean(1).var(1)
    p = (1 + (null >= observed - 1e-15).sum()) / (1 + permutations)
    return float(means.max() - means.min()), float(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--instances", type=int, default=4, help="runtimes made alike (>= 2)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--turn", type=float, default=0.25, help="seconds per turn")
    p.add_argument("--alu", type=int, default=0, help="ALU hogs during each turn")
    p.add_argument("--mem", type=int, default=0, help="memory hogs during each turn")
    p.add_argument("--budget-ms", type=float, help="also the share of requests within this budget")
    p.add_argument("--permutations", type=int, default=2000)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    for name, least in (("threads", 1), ("instances", 2), ("rounds", 2), ("permutations", 100)):
        if getattr(a, name) < least:
            p.error(f"--{name} {getattr(a, name)}: expected an integer >= {least}")
    if a.alu < 0 or a.mem < 0:
        p.error(f"--alu {a.alu} --mem {a.mem}: expected hog counts >= 0")
    if not 0 < a.turn < 3600:
        p.error(f"--turn {a.turn:g}: expected seconds > 0")
    if a.budget_ms is not None and not 0 < a.budget_ms < float("inf"):
        p.error(f"--budget-ms {a.budget_ms:g}: expected milliseconds > 0")
    started = time.perf_counter()
    try:
        rts = [ef.Runtime(a.bundle, threads=a.threads) for _ in range(a.instances)]
        for rt in rts:
            rt.switch(a.config)
    except ef.EdgeflexError as e:
        p.error(str(e))
    spec = rts[0].inputs[0]
    x = np.random.default_rng(0).standard_normal([1 if d is None or isinstance(d, str) else d
                                                   for d in spec.shape]).astype(np.float32)
    for rt in rts:                                   # warm: first runs allocate
        for _ in range(20):
            rt.run(x)
    from edgeflex.runtime.progress import bar

    progress = bar(a.rounds * a.instances, "turns", unit="turn")
    try:
        with LoadPlayer() as player:
            res = play_rounds(rts, x, player, a.alu, a.mem, a.rounds, a.turn, a.budget_ms, progress=progress)
    finally:
        progress.close()
    spread_p50, p_p50 = instance_effect(res["p50"], a.permutations)
    budget = f"; budget {a.budget_ms:g} ms" if a.budget_ms is not None else ""
    lines = [f"`{a.config}@{a.threads}t` of `{a.bundle.name}`, {a.instances} runtimes made alike, "
             f"{a.rounds} rounds of one {a.turn:g} s turn each (order rotating), {a.alu} ALU and {a.mem} "
             f"memory hog(s) on during each turn{budget}:", "",
             "| runtime | mean p50 ms | p50 range over rounds | " + (
                 "mean within budget | within range over rounds | " if res["within"] is not None else "")
             + "requests |", "|---:|---:|---|" + ("---:|---|" if res["within"] is not None else "") + "---:|"]
    for i in range(a.instances):
        v = res["p50"][:, i]
        row = f"| {i} | {v.mean():.4f} | {v.min():.4f}-{v.max():.4f} | "
        if res["within"] is not None:
            w = 100 * res["within"][:, i]
            row += f"{w.mean():.2f}% | {w.min():.2f}-{w.max():.2f}% | "
        lines.append(row + f"{int(res['n'][:, i].sum())} |")
    lines += ["", f"- p50: the runtimes' means {spread_p50 * 1e3:.1f} us apart (max - min); labels shuffled "
                  f"within rounds give a spread at least this large with p = {p_p50:.4f}"]
    if res["within"] is not None:
        spread_w, p_w = instance_effect(100 * res["within"], a.permutations)
        lines.append(f"- within budget: the runtimes' means {spread_w:.2f} points apart; p = {p_w:.4f}")
    lines += ["", *machine_and_run(a.threads, f"- cpu flags: {cpu_flags()}", started=started)]
    publish(a.out, SECTION, "bench_instances", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
