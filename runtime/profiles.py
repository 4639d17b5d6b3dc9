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
    """Profile every config of `rt` (an `edgeflex.Runtime`) at `batch`; the runtime is left on its config."""
    from tqdm.auto import tqdm

    shape = [batch if d is None else d for d in rt.inputs[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(rt.inputs[0].dtype)
    extra = [np.random.default_rng(i).standard_normal([batch if d is None else d for d in s.shape])
             .astype(s.dtype) for i, s in enumerate(rt.inputs[1:], start=1)]
    start_config, out = rt.config, {}
    for c in tqdm(rt.configs, desc=f"profile {rt.bundle.name}", disable=not progress, leave=False):
        rt.switch(c.name)
        t = _stable_times(lambda: rt.run(x, *extra), warmup=warmup, min_runs=min_runs, max_runs=max_runs,
                          min_seconds=min_seconds)
        out[c.name] = {"p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                       "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean()),
                       "throughput_per_s": float(batch * 1e3 / np.median(t)), "runs": len(t)}
        if memory:
            out[c.name]["peak_memory_mb"] = _peak_memory_mb(str(rt.bundle.path), c.name, rt.backend,
                                                            rt.threads, batch)
    rt.switch(start_config)
    return {"format": PROFILE_FORMAT, "device": rt.device, "obtained": "measured", "batch": batch,
            "env": environment(rt), "configs": out}


def environment(rt) -> dict[str, Any]:
    return {"host": host_info(), "backend": rt.backend, "threads": rt.threads, "fused": rt.fused,
            "versions": {**rt._backend.versions(), "python": platform.python_version()},
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def save_profile(path: str | os.PathLike, profile: dict[str, Any]) -> Bundle:
    """Add or replace `profiles/<device>.json` in the bundle at `path`, atomically."""
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
