"""Play a load trace (`devices.loadtrace`) against a runtime and score strategies on it: the shared core of
`edgeflex trace` and benchmarks/bench_policy_traces.py.

`play` sends requests back to back for the trace's length while a `LoadPlayer` runs the trace's hogs, and
records per request: time, latency, the config (and thread count) it ran, the hogs running. `alone` plays
each static config over the same stretch of the trace, one after another: what a static config meets.
`sweep` is the cheap approximation: one play of the trace for every static config at once, the (config,
threads) options taking turns of `turn_ms`, the runs that start in the first `lead_ms` after each switch
left out (the first milliseconds after a switch are slower: cold caches and pools; turns of 4 runs with the
first left out, before the tenth session, kept only those), so each is sampled all along the trace.

`oracle` is the hindsight ceiling: per load segment (a phase with its hogs on, or off), the best-quality
static config that was within budget on >= `target` of that segment's samples (else the one most often
within), weighted by the segment's share of the trace. Board side: numpy only.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from typing import Any

import numpy as np

from edgeflex.devices.loadtrace import LoadPlayer, LoadTrace

DRAWS = 2000        # bootstrap resamples of a trace's turns (`paired_gaps`)


def play(rt, trace: LoadTrace, player: LoadPlayer | None, x: np.ndarray, *,
         span: tuple[float, float] | None = None) -> dict:
    """Requests back to back through the trace (or the part `span` = (from, to) seconds of it), the hogs
    following it. The runtime decides (a budget set on it adapts; none: its config stays)."""
    lo, hi = span if span is not None else (0.0, trace.seconds)
    ts, lat, cfg, thr, alu, mem = [], [], [], [], [], []
    gc_was = gc.isenabled()
    gc.disable()            # no collector pause inside a timed request (sweep does the same): as timeit
    start = time.perf_counter() - lo
    try:
        while (now := time.perf_counter() - start) < hi:
            state = trace.state(now)
            if player is not None:
                player.set(*state)
            threads = rt.threads
            t0 = time.perf_counter()
            name, _ = rt.run_config(x)
            lat.append((time.perf_counter() - t0) * 1e3)
            ts.append(now)
            cfg.append(f"{name}@{threads}t")
            thr.append(threads)
            alu.append(state[0])
            mem.append(state[1])
    finally:
        if gc_was:
            gc.enable()
        if player is not None:
            player.set(0, 0)
    return {"t": np.array(ts), "latency_ms": np.array(lat), "config": cfg, "threads": np.array(thr),
            "load": np.stack([np.array(alu, dtype=int), np.array(mem, dtype=int)], axis=1)}


@contextmanager
def pinned(rt, name: str, threads: int, *, wait_s: float = 1.0):
    """`rt` runs config `name` at `threads` with its budget policy set aside for a while: the static config
    played on the adaptive strategy's own runtime (its own engine sessions), so that the two compare on one
    instance. Runtimes made alike keep persistent p50 levels of their own, about 2 % apart on a 19 us FITS
    config (benchmarks/bench_instances.py): a static config measured on another runtime differs by that
    before the policy decides anything. The policy sees none of these runs; it, its config, its sampling
    count and any observation it has not had yet are back afterwards. A warm-up switch in flight is let
    finish first (`wait_s` at most), so that it cannot land while the policy is away."""
    end = time.perf_counter() + wait_s
    while getattr(rt, "_warm_target", None) is not None and time.perf_counter() < end:
        time.sleep(0.0005)
    keys = [k for k in ("_adapter", "_plan", "_pending", "_free", "_hunt", "_due") if hasattr(rt, k)]
    saved = [getattr(rt, k) for k in keys]
    rt._adapter, rt._pending = None, []
    rt._plan = rt._loaded(name, threads)
    try:
        yield rt
    finally:
        for k, v in zip(keys, saved, strict=True):
            setattr(rt, k, v)


def sweep(rt, trace: LoadTrace, player: LoadPlayer | None, x: np.ndarray, options: list[tuple[str, int]],
          *, turn_ms: float = 20.0, lead_ms: float = 5.0,
          span: tuple[float, float] | None = None) -> dict[str, dict]:
    """Every static option sampled along the same trace (or its `span`): option -> {"t", "latency_ms"}; in
    turns of `turn_ms` (at least one kept run each), runs starting within `lead_ms` of the switch left out."""
    if not 0 <= lead_ms < turn_ms:
        raise ValueError(f"sweep: expected 0 <= lead_ms < turn_ms, got lead_ms={lead_ms}, turn_ms={turn_ms}")
    lo, hi = span if span is not None else (0.0, trace.seconds)
    out = {f"{n}@{t}t": {"t": [], "latency_ms": []} for n, t in options}
    gc_was = gc.isenabled()
    gc.disable()
    start = time.perf_counter() - lo
    i = int(lo * 1e3 / turn_ms)     # a span goes on with the turns where the previous one left them
    try:
        while (now := time.perf_counter() - start) < hi:
            name, threads = options[i % len(options)]
            i += 1
            rt.switch(name, threads=threads)
            rec = out[f"{name}@{threads}t"]
            switched, kept = time.perf_counter(), False
            while (now := time.perf_counter() - start) < hi:
                since = (time.perf_counter() - switched) * 1e3
                if since >= turn_ms and kept:
                    break
                if player is not None:
                    player.set(*trace.state(now))
                t0 = time.perf_counter()
                rt.run(x)
                if since >= lead_ms:
                    rec["latency_ms"].append((time.perf_counter() - t0) * 1e3)
                    rec["t"].append(now)
                    kept = True
    finally:
        if gc_was:
            gc.enable()
        if player is not None:
            player.set(0, 0)
    return {k: {"t": np.array(v["t"]), "latency_ms": np.array(v["latency_ms"])} for k, v in out.items()}


def alone(rt, trace: LoadTrace, player: LoadPlayer | None, x: np.ndarray, options: list[tuple[str, int]],
          *, span: tuple[float, float] | None = None, lead_ms: float = 5.0,
          first: int = 0) -> dict[str, dict]:
    """Every static option played alone over the same stretch of the trace (`span`, default all of it), one
    after another from `options[first]` on: option -> {"t", "latency_ms"}, the runs that start within
    `lead_ms` of the option's switch left out. The stretch is replayed once per option, so this takes
    len(options) times as long as `play`; unlike `sweep`, each option runs as a static config does, for the
    whole stretch. In a sweep each engine's workers sleep between turns (most likely getting the scheduler's
    credit for sleeping): under a one-core hog, 2-thread configs swept held a budget far more often than run
    alone (benchmarks/RESULTS.md, "Tenth session: the statics sampled warm")."""
    if not 0 <= lead_ms:
        raise ValueError(f"alone: expected lead_ms >= 0, got {lead_ms}")
    lo = span[0] if span is not None else 0.0
    out = {}
    for k in range(len(options)):
        name, threads = options[(first + k) % len(options)]
        rt.switch(name, threads=threads)
        rec = play(rt, trace, player, x, span=span)
        rec = trim(rec, lo + lead_ms / 1e3)
        out[f"{name}@{threads}t"] = {"t": rec["t"], "latency_ms": rec["latency_ms"]}
    return {f"{n}@{t}t": out[f"{n}@{t}t"] for n, t in options}


def turns(seconds: float, turn_s: float) -> list[tuple[float, float]]:
    """The (from, to) spans of `turn_s` seconds that strategies taking turns over a trace of `seconds` play
    (the last one shorter); `turn_s` 0: the whole trace as one span."""
    edges = [0.0] if turn_s == 0 else np.arange(0.0, seconds, turn_s).tolist()
    if len(edges) > 1 and seconds - edges[-1] < 1e-6:
        edges.pop()         # a trace of 6.000000001 s (phases summed in floating point): no sliver of a turn
    edges.append(seconds)
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def trim(rec: dict, since: float) -> dict:
    """A `play` record without the runs that started before `since` seconds of trace time: the runs after a
    turn of other strategies (their engines' caches cold again, their pools asleep), which a runtime left to
    run its own load never meets, are left out for every strategy alike (`alone` leaves out the same lead)."""
    keep = rec["t"] >= since
    idx = np.flatnonzero(keep)
    return {k: [v[i] for i in idx] if isinstance(v, list) else v[keep] for k, v in rec.items()}


def concat(parts: list[dict]) -> dict:
    """Records of consecutive spans (`play` or one option of `sweep`) as one."""
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        out[k] = [v for p in vals for v in p] if isinstance(vals[0], list) else np.concatenate(vals)
    return out


def segments(trace: LoadTrace, t: np.ndarray) -> np.ndarray:
    """A segment id per time: phase index x 2 + whether its hogs run then."""
    return np.array([2 * trace.phase_at(v) + (sum(trace.state(v)) > 0) for v in t], dtype=int)


def oracle(trace: LoadTrace, statics: dict[str, dict], quality: dict[str, float], budget_ms: float,
           target: float = 0.99) -> dict[str, Any]:
    """The hindsight oracle over the static samples (see the module docstring); quality is rank-oriented
    (higher is better). Segment weights: the share of the trace's time in each (a fine time grid)."""
    grid = np.linspace(0, trace.seconds, 4001)[:-1]
    seg_grid = segments(trace, grid)
    ids, counts = np.unique(seg_grid, return_counts=True)
    seg_of = {k: segments(trace, v["t"]) for k, v in statics.items()}
    within, qual, used = 0.0, 0.0, 0.0
    picks = {}
    for sid, n in zip(ids, counts):
        w = n / len(grid)
        stats = {}
        for k, v in statics.items():
            m = seg_of[k] == sid
            if m.sum() >= 3:
                stats[k] = float((v["latency_ms"][m] <= budget_ms).mean())
        if not stats:
            continue
        ok = [k for k, s in stats.items() if s >= target]
        pick = max(ok, key=lambda k: (quality[k], stats[k])) if ok else max(stats, key=lambda k: stats[k])
        picks[int(sid)] = pick
        within += w * stats[pick]
        qual += w * quality[pick]
        used += w
    nan = float("nan")
    return {"within": within / used if used else nan, "quality": qual / used if used else nan, "picks": picks}


def chunk_counts(parts: list[dict], budget_ms: float) -> list[list[int]]:
    """Per turn played (`play` records, or one option's of `alone`): [runs within the budget, runs], the unit
    `paired_gaps` resamples."""
    return [[int((np.asarray(p["latency_ms"]) <= budget_ms).sum()), len(p["latency_ms"])] for p in parts]


def paired_gaps(a, others: dict, *, seed: int, draws: int = DRAWS, level: float = 0.95) -> dict:
    """Each of `others`' within-budget share minus a's, in points, with a bootstrap interval over the turns
    all of them played: the same turns resampled for every strategy (a turn's load falls on all alike, so
    pairing takes the load out of the difference; what is left is how the machine treated each one: on a
    shared 2-core guest a config's median moved up to 1.6x from one half-second turn to the next, no load
    played). a, others' values: `chunk_counts` lists of equal length. -> name -> (gap, low, high)."""
    ka, na = np.asarray(a, dtype=float).T
    idx = np.random.default_rng(seed).integers(0, len(ka), size=(draws, len(ka)))
    base = ka[idx].sum(1) / np.maximum(na[idx].sum(1), 1)
    tail = 50 * (1 - level)
    out = {}
    for name, b in others.items():
        kb, nb = np.asarray(b, dtype=float).T
        d = 100 * (kb[idx].sum(1) / np.maximum(nb[idx].sum(1), 1) - base)
        out[name] = (100 * (kb.sum() / max(nb.sum(), 1) - ka.sum() / max(na.sum(), 1)),
                     float(np.percentile(d, tail)), float(np.percentile(d, 100 - tail)))
    return out
