"""Timing a callable the way every latency edgeflex prints is obtained: warm-up, then a median of many.

No torch; used by the CLI demo, the benchmarks and (later) the profiler.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def measure(fn: Callable[[], object], *, warmup: int = 10, runs: int = 100) -> dict[str, float]:
    """Run fn `warmup` times, then `runs` times timed one by one; milliseconds p50/p90/p99/mean."""
    from edgeflex.args import check_int, fail

    if not callable(fn):
        fail("fn", fn, "a callable taking no arguments")
    check_int("warmup", warmup, 0)
    check_int("runs", runs, 1)
    for _ in range(warmup):
        fn()
    times = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t
    times *= 1e3
    return {"p50_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
            "p99_ms": float(np.percentile(times, 99)), "mean_ms": float(times.mean()), "runs": runs}
