"""The one timing helper: every latency edgeflex prints, records or decides on is taken here (the profiler,
the exporter's and the compiler's choices, the demo, the benchmarks). No torch.

`times` is the primitive (warm-up, then calls timed one by one); `measure` summarises it; `interleaved`
times several callables taking turns, so that a machine whose speed drifts for seconds at a time slows
every one of them alike instead of whichever happened to be running.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

import numpy as np

from edgeflex.args import check_int, check_real, fail

K = TypeVar("K", bound=Hashable)
Call = Callable[[], object]


def times(fn: Call, *, warmup: int = 10, runs: int = 100) -> np.ndarray:
    """Run fn `warmup` times, then `runs` times timed one by one: the call times in milliseconds."""
    if not callable(fn):
        fail("fn", fn, "a callable taking no arguments")
    check_int("warmup", warmup, 0)
    check_int("runs", runs, 1)
    for _ in range(warmup):
        fn()
    out = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out * 1e3


def stats(ms: np.ndarray) -> dict[str, float]:
    """p50/p90/p99/mean (ms) and the count of a set of call times."""
    ms = np.asarray(ms)
    return {"p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "runs": int(ms.size)}


def measure(fn: Call, *, warmup: int = 10, runs: int = 100) -> dict[str, float]:
    """Run fn `warmup` times, then `runs` times timed one by one; milliseconds p50/p90/p99/mean."""
    return stats(times(fn, warmup=warmup, runs=runs))


def median_ms(fn: Call, *, warmup: int = 5, runs: int = 30) -> float:
    """The median call time in milliseconds (the exporters' quick choices between forms and kernels)."""
    return float(np.median(times(fn, warmup=warmup, runs=runs)))


def interleaved(calls: Mapping[K, tuple[Call | None, Call]], *, rounds: int, runs_per_round: int,
                seconds_per_round: float = 0.0, max_runs_per_round: int | None = None, warmup: int = 10,
                lead: int = 1, shuffle: bool = False,
                on_block: Callable[[], None] | None = None) -> dict[K, np.ndarray]:
    """Time several callables taking turns: the call times (ms) of each key.

    `calls[key] = (setup, call)`. In each of `rounds` rounds every key has one block, in order (or shuffled,
    seeded by the round, with `shuffle`): its `setup` (untimed: a switch of config), `warmup` untimed calls
    in the first round and `lead` in later ones (the caches again, and the other key's thread pool may
    still be spinning on the cores), then timed calls, at least `runs_per_round`, until `seconds_per_round`
    have passed, at most `max_runs_per_round` (default `runs_per_round`). `on_block` is called after each
    block (a progress bar)."""
    check_int("rounds", rounds, 1)
    check_int("runs_per_round", runs_per_round, 1)
    check_real("seconds_per_round", seconds_per_round, 0, lo_open=False)
    check_int("warmup", warmup, 0)
    check_int("lead", lead, 0)
    cap = max(runs_per_round, max_runs_per_round or runs_per_round)
    got: dict[K, list[float]] = {k: [] for k in calls}
    for r in range(rounds):
        order = list(calls)
        if shuffle:
            random.Random(r).shuffle(order)
        for key in order:
            setup, call = calls[key]
            if setup is not None:
                setup()
            for _ in range(warmup if r == 0 else lead):
                call()
            block, start = got[key], time.perf_counter()
            for i in range(cap):
                t0 = time.perf_counter()
                call()
                block.append((time.perf_counter() - t0) * 1e3)
                if i + 1 >= runs_per_round and time.perf_counter() - start >= seconds_per_round:
                    break
            if on_block is not None:
                on_block()
    return {k: np.asarray(v) for k, v in got.items()}
