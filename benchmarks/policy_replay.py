"""Replay recorded latencies through the tail policy: a trace-driven simulation for developing it (issue 20).

`record` plays one load trace per seed (`devices.loadtrace.generate`, the hogs running) and samples every
static (config, threads) along it in turns (`tracerun.sweep`), as `bench_policy_traces.py` does; it saves
each option's latencies with their times, the budget and the policy's options (`.npz`, no pickle).
`replay` runs `TailGuard`s over the recordings, with no engine: the config the policy chose at simulated
time t takes its next recorded latency at or after t, and time moves on by it. It emulates the runtime's
sampling (one run in `every` observed, the others' late ones reported, a burst clamps the count), a warm
switch's first run (+5 % of the target's median, +2 us: benchmarks/RESULTS.md, "Switch costs"), and the
OS's idle cores from the trace's hogs. It does not emulate the bookkeeping's own cost in the runs that pay
for it, nor how a run's latency depends on the run before it (a recording's samples of one config are
spread along the trace, so their hiccups are less clustered than a config's own runs are).

The same recordings through two versions of the policy (`--policy FILE`, a copy of runtime/tailpolicy.py,
e.g. `git show REV:runtime/tailpolicy.py > old.py`) compare their decisions free of the machine's noise;
only a real run (`bench_policy_traces.py`) judges the policy. Seeds replayed here are seeds seen.

    python benchmarks/policy_replay.py record --bundle B.efx --seeds 5000-5019 --dir /tmp/rec
    python benchmarks/policy_replay.py replay --dir /tmp/rec [--policy old.py --policy runtime/tailpolicy.py]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np

WARM_SWITCH = (0.05, 0.002)         # a warm switch's first run: + 5 % of the median, + 2 us (ms)


def record(bundle: Path, seed: int, out: Path, seconds: float) -> None:
    import edgeflex as ef
    from edgeflex.devices.loadtrace import LoadPlayer, generate
    from edgeflex.runtime import tracerun
    from edgeflex.runtime.profiles import profile_at

    rt = ef.Runtime(bundle, threads=(2, 1))
    prof = rt.latency_profile()
    if prof is None:
        raise SystemExit(f"{bundle}: no profile measured on this host; run `edgeflex profile {bundle} "
                         "--threads 2,1` first")
    idle = {c.name: min(profile_at(prof, t)[c.name]["p90_ms"] for t in (2, 1)) for c in rt.configs}
    cores = len(os.sched_getaffinity(0))
    trace = generate(seed, seconds, cores, batch=1)
    budget = trace.budget_ms(idle)
    shape = [1 if d is None else d for d in rt.inputs[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    options = [(c.name, t) for t in (2, 1) for c in rt.configs]
    with LoadPlayer() as player:
        rec = tracerun.sweep(rt, trace, player, x, options)
    rt.set_budget(ef.Budget(latency_ms=budget), policy="tail", degrade=True)
    g = rt.adapter
    meta = {"budget": budget, "seed": seed, "seconds": seconds, "cores": cores,
            "quality": {c.name: c.quality["value"] for c in rt.configs},
            "higher": rt.configs[0].quality.get("direction", "higher") == "higher",
            "options": [[o.key, o.rank, o.p50_ms, o.tail_ms, o.threads] for o in g.opts.values()],
            "state": [list(trace.state(t)) for t in np.arange(0, seconds, 0.01)]}
    rt.set_budget(None)
    arrays = {}
    for k, v in rec.items():
        arrays["t|" + k], arrays["l|" + k] = v["t"], v["latency_ms"]
    np.savez(out, meta=json.dumps(meta), **arrays)


def load_policy(path: str) -> types.ModuleType:
    """A copy of runtime/tailpolicy.py as a module of its own (relative imports resolve in the package)."""
    name = f"edgeflex.runtime._replayed{len(sys.modules)}"
    mod = types.ModuleType(name)
    mod.__package__, mod.__file__ = "edgeflex.runtime", path
    sys.modules[name] = mod
    exec(compile(Path(path).read_text(), path, "exec"), mod.__dict__)
    return mod


def replay(mod: types.ModuleType, rec, obs_cost_us: float = 3.0, req_cost_us: float = 0.3) -> dict:
    from edgeflex.runtime.policy import Budget

    meta = json.loads(str(rec["meta"]))
    budget, state, cores = meta["budget"], meta["state"], float(meta.get("cores", 2))
    now = [0.0]

    def idle_cores() -> float:          # the cores the trace's hogs leave free (the recording machine's)
        alu, mem = state[min(int(now[0] / 0.01), len(state) - 1)]
        return max(0.0, cores - alu - mem)

    opts = [mod.Option(k, r, p50, tail, t) for k, r, p50, tail, t in meta["options"]]
    g = mod.TailGuard(opts, Budget(latency_ms=budget), idle_cores=idle_cores)
    g.overhead_ms = obs_cost_us / 1e3
    # every recorded option, whether or not the policy keeps it (the statics are judged over all of them)
    times = {o.key: rec["t|" + o.key] for o in opts}
    lats = {o.key: rec["l|" + o.key] for o in opts}
    median = {k: float(np.median(v)) for k, v in lats.items()}
    at = dict.fromkeys(times, -1)
    reports = hasattr(g, "late_request")
    skip, n, t, last = 0, 0, 0.0, None
    lat, cfg = [], []
    while t < meta.get("seconds", 10.0):
        now[0] = t
        key = g.current
        ts = times[key]
        i, j = int(np.searchsorted(ts, t)), at[key] + 1
        if not (i <= j < len(ts) and ts[j] - t < 0.05):    # the next sample of this config, near t
            j = min(i, len(ts) - 1)
        at[key] = j
        ms = float(lats[key][j]) + req_cost_us / 1e3
        if last is not None and last != key:
            ms += WARM_SWITCH[0] * median[key] + WARM_SWITCH[1]
        last = key
        n += 1
        lat.append(ms)
        cfg.append(key)
        t += ms / 1e3
        if skip:
            skip -= 1
            if reports and ms > budget:
                g.late_request(key, n, ms)
        else:
            skip = g.every - 1
            if reports:
                g.observe(key, ms, n)
            else:
                g.observe(key, ms)
            t += obs_cost_us / 1e6
        skip = min(skip, g.every - 1)
    lat = np.array(lat)
    quality = meta["quality"]
    q = float(np.mean([quality[c.rpartition("@")[0]] for c in cfg]))
    within = float(np.mean(lat <= budget))
    static = {k: float(np.mean(v <= budget)) for k, v in lats.items()}
    match = [quality[k.rpartition("@")[0]] for k in static if static[k] >= within]
    best = (max(match) if meta["higher"] else min(match)) if match else None
    c3 = best is None or (q >= best - 1e-12 if meta["higher"] else q <= best + 1e-12)
    c1 = max(static.values()) < 0.995 or within >= 0.99
    return {"within": within, "quality": q, "c1": c1, "c3": c3, "switches": g.switches,
            "best_static_within": max(static.values()), "runs": Counter(cfg).most_common(3)}


def seeds_of(spec: str) -> list[int]:
    """`5000-5019`, `5000` or a comma-separated list of those (`13003,13013,7000-7002`): the seeds, in order,
    each once (an argparse type: a bad spec is a one-line usage error)."""
    seeds: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            got = list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"seeds {spec!r}: expected N, N-M or a comma-separated list of "
                                             "those, e.g. 5000-5019 or 13003,13013") from None
        if not got:
            raise argparse.ArgumentTypeError(f"seeds {spec!r}: the range {part.strip()!r} is empty (expected "
                                             "N-M with M >= N)")
        seeds += [s for s in got if s not in seeds]
    return seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="play traces and record every static option's latencies")
    r.add_argument("--bundle", type=Path, required=True)
    r.add_argument("--seeds", type=seeds_of, required=True, help="e.g. 5000-5019")
    r.add_argument("--seconds", type=float, default=10.0)
    r.add_argument("--dir", type=Path, required=True)
    s = sub.add_parser("replay", help="replay recordings through one or more versions of the policy")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--policy", action="append", help="a copy of tailpolicy.py (default: this one)")
    a = p.parse_args(argv)
    if a.cmd == "record":
        a.dir.mkdir(parents=True, exist_ok=True)
        for seed in a.seeds:
            out = a.dir / f"{a.bundle.stem}-{seed}.npz"
            record(a.bundle, seed, out, a.seconds)
            print("recorded", out, flush=True)
        return 0
    files = sorted(a.dir.glob("*.npz"))
    if not files:
        raise SystemExit(f"no recordings (*.npz) in {a.dir}")
    policies = a.policy or [str(Path(__file__).resolve().parents[1] / "runtime" / "tailpolicy.py")]
    mods = [load_policy(f) for f in policies]
    for path, mod in zip(policies, mods):
        rows = [(f.stem, replay(mod, np.load(f))) for f in files]
        for f, res in rows:
            print(f"{Path(path).name:16s} {f:28s} within {res['within']:.3%} quality {res['quality']:.4f} "
                  f"c1 {res['c1']!s:5} c3 {res['c3']!s:5} switches {res['switches']:4d} "
                  f"best static {res['best_static_within']:.2%}")
        w = np.array([res["within"] for _, res in rows])
        print(f"{Path(path).name:16s} {len(rows)} recordings: within mean {w.mean():.3%}, min {w.min():.3%}; "
              f"c1 {sum(res['c1'] for _, res in rows)}, c3 {sum(res['c3'] for _, res in rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
