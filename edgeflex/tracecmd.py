"""`edgeflex trace BUNDLE --budget-ms X --load SPEC`: play a load trace against a bundle and show what each
strategy does under it: the adaptive policy, the static best config (what `set_budget(adapt=False)` picks)
and the smallest config, each over the same trace. The strategies take turns over it in `--turn` seconds
of trace time (0.5 s; the order rotating; 0: each plays the whole trace, one after the other), so that what
else runs on the machine falls on all alike: with turns of 2 s two plays of one policy on the same trace
landed 0.22-0.30 points apart at the median on a shared 2-core machine, with 0.5 s 0.05-0.23
(benchmarks/RESULTS.md, "Twelfth session"). The runs in the first 5 ms of each turn after the first are left
out for every strategy (cold after the others' turn, which a runtime serving its own load never meets).
Prints the within-budget share and mean quality per strategy and writes a PNG of latency, budget, config
and load over time.

The load is `devices.loadtrace`'s: `seed:N[:SECONDS]` draws a random trace, or phases such as
`idle:4,alu1:6,idle:3,mem1x0.5/0.2:5` (docs/budgets.md, "Load traces"). The hogs are child processes of
this command, pinned to cores from the last one down, ended when it ends.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from edgeflex.errors import EdgeflexError, UsageError

TURN_LEAD_S = 0.005     # runs this soon after a turn begins are left out (as bench_policy_traces' --lead-ms)
MIN_TURNS = 4           # turns needed for the spread between them to say anything (a bootstrap over fewer
                        # resamples 3 values or fewer)


def add_trace_parser(sub) -> None:
    """The `trace` subcommand's arguments (called from edgeflex.cli.parser)."""
    from edgeflex.cli import POSITIVE_REAL, _threads_arg

    t = sub.add_parser("trace", help="play a load trace against a bundle; plot latency, budget, config, load")
    t.add_argument("bundle")
    t.add_argument("--budget-ms", type=POSITIVE_REAL, required=True, help="latency budget per request (ms)")
    t.add_argument("--load", required=True,
                   help="seed:N[:SECONDS] (a random trace) or phases KIND[xDUTY[-END]/PERIOD]:SECONDS,... "
                        "with KIND idle, aluN, memN or aluN+memM, e.g. idle:4,alu1:6,idle:3,mem1x0.5/0.2:5")
    t.add_argument("--policy", choices=("tail", "window"), default="tail",
                   help="tail: hold p99 <= budget before quality (default); window: the windowed policy")
    t.add_argument("--threads", type=_threads_arg,
                   help="engine thread counts, e.g. 2,1 (default: the usable cores and 1; profile each)")
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--out", default="trace.png", help="the PNG to write (default trace.png)")
    t.add_argument("--no-static", action="store_true", help="the adaptive strategy only")
    t.add_argument("--turn", type=float, default=0.5,
                   help="seconds of trace per turn of a strategy, the order rotating (default 0.5; 0: each "
                        "strategy plays the whole trace, one after the other)")
    t.set_defaults(fn=cmd_trace)


def cmd_trace(a: argparse.Namespace) -> int:
    import edgeflex as ef
    from edgeflex.devices.loadtrace import LoadPlayer, parse_spec
    from edgeflex.runtime import tracerun
    from edgeflex.runtime.progress import bar

    try:
        import matplotlib
    except ModuleNotFoundError:
        raise EdgeflexError("edgeflex trace needs matplotlib for its plot, which is not installed: "
                            "pip install 'edgeflex[bench]'") from None
    if a.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {a.batch}")
    if not (a.turn == 0 or 0.05 <= a.turn < float("inf")):
        raise UsageError(f"--turn {a.turn:g}: expected 0 (whole trace per strategy) or seconds >= 0.05")
    out = Path(a.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {a.out!r}: expected a .png path")
    if not out.parent.is_dir():
        raise UsageError(f"--out {a.out!r}: the directory {str(out.parent)!r} does not exist")
    cores = len(os.sched_getaffinity(0))
    trace = parse_spec(a.load, cores)
    threads = a.threads if a.threads is not None else ((cores, 1) if cores > 1 else 1)
    rt = ef.Runtime(a.bundle, threads=threads)
    budget = ef.Budget(latency_ms=a.budget_ms)
    value = {c.name: float((c.quality or {}).get("value", c.flops or 0)) for c in rt.configs}
    metric = (rt.configs[0].quality or {}).get("metric", "quality")
    x = np.random.default_rng(0).standard_normal([a.batch if d is None else d for d in rt.inputs[0].shape]
                                                 ).astype(rt.inputs[0].dtype)
    strategies = {f"adaptive ({a.policy})": None}
    if not a.no_static:
        static_rt = ef.Runtime(a.bundle, threads=threads)
        best = static_rt.set_budget(budget, adapt=False, degrade=True)
        best_t = static_rt.threads
        prof = static_rt.latency_profile()["configs"]
        smallest = min(prof, key=lambda n: prof[n]["p50_ms"])
        static_rt.set_budget(None)
        strategies[f"static best ({best}@{best_t}t)"] = (best, best_t)
        strategies[f"static smallest ({smallest})"] = (smallest, static_rt.thread_counts[0])
    spans = tracerun.turns(trace.seconds, a.turn)
    parts: dict[str, list] = {name: [] for name in strategies}
    names = list(strategies)
    progress = bar(len(spans) * len(names), "trace", unit="turn")
    rt.set_budget(budget, policy=a.policy, degrade=True)
    try:
        with LoadPlayer() as player:
            for i, span in enumerate(spans):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    fixed = strategies[name]
                    if fixed is not None:
                        static_rt.switch(fixed[0], threads=fixed[1])
                    rec = tracerun.play(rt if fixed is None else static_rt, trace, player, x, span=span)
                    # after the first turn: the runs just after the others' turn left out, for all alike
                    parts[name].append(tracerun.trim(rec, span[0] + TURN_LEAD_S) if i else rec)
                    progress.update()
    finally:
        progress.close()
        rt.set_budget(None)
    records = {name: tracerun.concat(p) for name, p in parts.items()}
    rows = []
    for name, rec in records.items():
        names = [k.split("@")[0] for k in rec["config"]]
        within = float((rec["latency_ms"] <= a.budget_ms).mean()) if len(names) else float("nan")
        q = float(np.mean([value[n] for n in names])) if names else float("nan")
        switches = sum(p != n for p, n in zip(rec["config"], rec["config"][1:]))
        top = ", ".join(f"{k} {c / len(names):.0%}" for k, c in Counter(rec["config"]).most_common(3))
        rows.append((name, len(names), within, q, switches, top))
    print(f"load {trace.describe()} ({trace.seconds:g} s), budget {a.budget_ms:g} ms, batch {a.batch}")
    w = max(len(r[0]) for r in rows)
    print(f"{'strategy':{w}}  requests  within  {metric:>8}  switches  configs run")
    for name, n, within, q, switches, top in rows:
        print(f"{name:{w}}  {n:8d}  {within:6.2%}  {q:8.4f}  {switches:8d}  {top}")
    if len(strategies) > 1 and len(spans) >= MIN_TURNS:
        # one play is one sample of how the machine treated each turn: the difference's spread over the turns
        # (resampled alike for both, so the load, which fell on both in a turn, drops out)
        adaptive, best = list(strategies)[:2]
        counts = {k: tracerun.chunk_counts(parts[k], a.budget_ms) for k in (adaptive, best)}
        gap, lo, hi = tracerun.paired_gaps(counts[best], {adaptive: counts[adaptive]}, seed=0)[adaptive]
        print(f"adaptive minus static best: {gap:+.2f} points within budget, 95 % interval [{lo:+.2f}, "
              f"{hi:+.2f}] over the {len(spans)} turns (a difference inside it is this machine's noise "
              "between turns, not the strategies')")
    matplotlib.use("Agg")
    plot(records, trace, a.budget_ms, value, metric, rows, out)
    print(f"wrote {out}")
    return 0


def plot(records: dict, trace, budget_ms: float, value: dict, metric: str, rows: list, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(records), 1, figsize=(11, 2.8 * len(records)), sharex=True, squeeze=False)
    for ax, (name, rec), row in zip(axes[:, 0], records.items(), rows):
        t, lat = rec["t"], rec["latency_ms"]
        most = max(rec["threads"], default=1)
        for threads, colour in ((most, "tab:blue"), (1, "tab:orange")) if most > 1 else ((1, "tab:orange"),):
            m = rec["threads"] == threads
            if m.any():
                ax.scatter(t[m], lat[m], s=1, alpha=0.4, color=colour, label=f"latency, {threads} thread(s)")
        ax.axhline(budget_ms, color="red", lw=1, label="budget")
        grid = np.linspace(0, trace.seconds, 2000)
        load = np.array([sum(trace.state(v)) for v in grid])
        mem = np.array([trace.state(v)[1] for v in grid])
        top = budget_ms * 3
        ax.fill_between(grid, 0, top * load / max(trace.cores, 1), color="grey", alpha=0.15, step="post",
                        label="hogs running (share of cores)")
        if mem.any():
            ax.fill_between(grid, 0, top * mem / max(trace.cores, 1), color="purple", alpha=0.15, step="post",
                            label="of which memory hogs")
        ax.set_ylim(0, top)
        ax.set_ylabel("ms")
        ax2 = ax.twinx()
        ax2.plot(t, [value[k.split("@")[0]] for k in rec["config"]], color="green", lw=0.8)
        ax2.set_ylabel(f"{metric} of config", color="green")
        ax.set_title(f"{name}: {row[2]:.2%} within budget, mean {metric} {row[3]:.4f}, {row[4]} switches",
                     fontsize=9)
        ax.legend(loc="upper left", fontsize=7, markerscale=6)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    # atomic: a temp file beside it, renamed over it (a failed write leaves the old plot or none)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
