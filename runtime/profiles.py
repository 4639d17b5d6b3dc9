"""Latency profiles: measure every config of a bundle on the device this runs on, store the result in the
bundle as `profiles/<device>.json` (atomic update, checksummed), read it back.

Measured here, never assumed: p50/p90/p99/mean from timed runs after warm-up (runs added until the
median is stable), throughput, and peak memory from a fresh process per config (resident-size growth).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import numpy as np

from edgeflex.devices import host_info

from .bundle import Bundle, update_bundle
from .errors import BundleError

PROFILE_FORMAT = 1


def profile_path(device: str) -> str:
    return f"profiles/{device}.json"


def _stable_times(fn, *, warmup: int, min_runs: int, max_runs: int, min_seconds: float) -> np.ndarray:
    """Timed runs until the median of the last half agrees with the whole's within 2 % (or max_runs)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if len(times) >= min_runs and time.perf_counter() - start >= min_seconds:
            med, half = np.median(times), np.median(times[len(times) // 2:])
            if abs(half - med) <= 0.02 * med:
                break
    return np.asarray(times)


_MEM_PROBE = """
import sys, numpy as np
import edgeflex as ef

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))

base = rss_kib()
rt = ef.Runtime(sys.argv[1], backend=sys.argv[3], threads=int(sys.argv[4]), config=sys.argv[2],
                only=[sys.argv[2]])
shape = [int(sys.argv[5]) if d is None else d for d in rt.inputs[0].shape]
x = np.random.default_rng(0).standard_normal(shape).astype(rt.inputs[0].dtype)
for _ in range(20):
    rt.run(x)
print(rss_kib() - base)
"""


def _peak_memory_mb(path: str, config: str, backend: str, threads: int, batch: int) -> float:
    """Resident memory (MB) a fresh process gains by loading only `config` and running it 20 times.

    NOTE: ONNX Runtime's arena keeps what a run allocated, so the resident size after warm runs is the
    run's high-water mark; the interpreter and imports are excluded (measured before loading)."""
    out = subprocess.run([sys.executable, "-c", _MEM_PROBE, path, config, backend, str(threads), str(batch)],
                         capture_output=True, text=True, timeout=300, check=True)
    return max(0.0, int(out.stdout.strip().splitlines()[-1]) / 1024.0)


def measure_profile(rt, *, batch: int = 1, warmup: int = 20, min_runs: int = 50, max_runs: int = 20000,
                    min_seconds: float = 0.5, memory: bool = True, progress: bool = True) -> dict[str, Any]:
    """Profile every config of `rt` (an `edgeflex.Runtime`) at `batch`, at each of its thread counts;
    the runtime is left on its config. `configs` holds the stats at the first count, `by_threads` all."""
    from tqdm.auto import tqdm

    shape = [batch if d is None else d for d in rt.inputs[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(rt.inputs[0].dtype)
    extra = [np.random.default_rng(i).standard_normal([batch if d is None else d for d in s.shape])
             .astype(s.dtype) for i, s in enumerate(rt.inputs[1:], start=1)]
    start_config, start_threads = rt.config, rt.threads
    todo = [(t, c.name) for t in rt.thread_counts for c in rt.configs]
    by_threads: dict[str, dict[str, Any]] = {str(t): {} for t in rt.thread_counts}
    for threads, name in tqdm(todo, desc=f"profile {rt.bundle.name}", disable=not progress, leave=False):
        rt.switch(name, threads=threads)
        t = _stable_times(lambda: rt.run(x, *extra), warmup=warmup, min_runs=min_runs, max_runs=max_runs,
                          min_seconds=min_seconds)
        stats = {"p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                 "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean()),
                 "throughput_per_s": float(batch * 1e3 / np.median(t)), "runs": len(t)}
        if memory:
            stats["peak_memory_mb"] = _peak_memory_mb(str(rt.bundle.path), name, rt.backend, threads, batch)
        by_threads[str(threads)][name] = stats
    rt.switch(start_config, threads=start_threads)
    return {"format": PROFILE_FORMAT, "device": rt.device, "obtained": "measured", "batch": batch,
            "env": environment(rt), "configs": by_threads[str(rt.thread_counts[0])],
            "by_threads": by_threads}


def profile_threads(prof: dict[str, Any]) -> list[int]:
    """The thread counts a profile has measurements at."""
    if "by_threads" in prof:
        return sorted(int(t) for t in prof["by_threads"])
    return [prof.get("env", {}).get("threads")] if prof.get("env", {}).get("threads") else []


def profile_at(prof: dict[str, Any], threads: int) -> dict[str, Any] | None:
    """A profile's per-config stats measured at `threads` (None when it has none at that count)."""
    if str(threads) in prof.get("by_threads", {}):
        return prof["by_threads"][str(threads)]
    return prof["configs"] if prof.get("env", {}).get("threads") == threads else None


def environment(rt) -> dict[str, Any]:
    return {"host": host_info(), "backend": rt.backend, "threads": rt.thread_counts[0],
            "thread_counts": list(rt.thread_counts), "fused": rt.fused,
            "versions": {**rt._backend.versions(), "python": platform.python_version()},
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def save_profile(path: str | os.PathLike, profile: dict[str, Any], *, merge: bool = True) -> Bundle:
    """Add or replace `profiles/<device>.json` in the bundle at `path`, atomically.

    With `merge`, measurements the stored profile has at other thread counts are kept when it was taken
    on the same host, backend and batch (so `--threads 2` then `--threads 1` adds up); otherwise replaced."""
    if merge:
        old = load_profile(Bundle.open(path), profile["device"])
        same = old is not None and all(
            old.get("env", {}).get(k) == profile.get("env", {}).get(k) for k in ("host", "backend", "fused")
        ) and old.get("batch") == profile.get("batch")
        if same:
            kept = {str(t): profile_at(old, t) for t in profile_threads(old)}
            new = profile.get("by_threads") or {str(profile["env"]["threads"]): profile["configs"]}
            by_threads = {**kept, **new}
            counts = sorted(int(t) for t in by_threads)
            profile = {**profile, "by_threads": by_threads,
                       "env": {**profile["env"], "thread_counts": counts}}
    data = (json.dumps(profile, indent=1) + "\n").encode()
    return update_bundle(path, {profile_path(profile["device"]): data})


def load_profile(bundle: Bundle, device: str) -> dict[str, Any] | None:
    rel = profile_path(device)
    if rel not in bundle.manifest["files"]:
        return None
    try:
        prof = json.loads(bundle.read(rel))
    except json.JSONDecodeError as e:
        raise BundleError(f"bundle file {rel!r} is not valid JSON ({e}); re-run `edgeflex profile`") from None
    if prof.get("format") != PROFILE_FORMAT or "configs" not in prof:
        raise BundleError(f"bundle file {rel!r} is not an edgeflex profile (format {PROFILE_FORMAT})")
    return prof
