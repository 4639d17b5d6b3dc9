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
from typing import Any

import numpy as np

from edgeflex.args import check_bool, check_int, check_path, check_real, fail
from edgeflex.devices import host_info, path_name
from edgeflex.devices.load import cpu_ticks
from edgeflex.devices.measure import interleaved
from edgeflex.errors import BundleError, EdgeflexError

from .bundle import Bundle, model_id, update_bundle
from .progress import bar as progress_bar
from .schema import PROFILE, load_json

PROFILE_FORMAT = 1
PROFILE_ROUNDS = 12     # interleaved rounds of every (config, thread count): see measure_profile
# A run over STALL_X x its config's median is a stall of the machine (the core taken: another process, the
# hypervisor), not the config. Where more than STALL_SHARE of a count's runs are, its p99s are the stalls':
# a profile measured during one (sixteenth session) had p99 8.9-9.7 ms on every SN-Net config, p50 0.2-0.5 ms,
# and nothing looked like it fit a budget under ~9 ms
STALL_X, STALL_SHARE = 10.0, 0.005
STEAL_SHARE = 0.01      # ... or where the hypervisor took more than this share of the CPUs' time


def profile_path(device: str) -> str:
    return f"profiles/{path_name(device)}.json"


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
                    min_seconds: float = 0.5, memory: bool = True, progress: bool = True,
                    rounds: int = PROFILE_ROUNDS) -> dict[str, Any]:
    """Profile every config of `rt` (an `edgeflex.Runtime`) at `batch`, at each of its thread counts;
    the runtime is left on its config. `configs` holds the stats at the first count, `by_threads` all.

    Interleaved: `rounds` rounds, each running every (config, thread count) in a shuffled order for
    `min_seconds / rounds` (and at least `min_runs / rounds` runs); the stats pool all rounds. A machine
    whose speed drifts for seconds at a time (a shared VM's slow spells) then slows every config
    alike instead of whichever was being measured: the predictor's leave-one-out at 2 threads went from
    40-79 % (6 rounds of 50 ms) to 79-81 % (24 of 12.5 ms) within +-10 % on such a machine
    (benchmarks/RESULTS.md, Latency predictor)."""

    from .runtime import Runtime  # here: runtime.py imports this module

    if not isinstance(rt, Runtime):
        fail("rt", rt, "an edgeflex.Runtime")
    check_int("batch", batch, 1)
    check_int("warmup", warmup, 0)
    check_int("min_runs", min_runs, 1)
    check_int("max_runs", max_runs, 1)
    check_real("min_seconds", min_seconds, 0, lo_open=False)
    check_bool("memory", memory)
    check_bool("progress", progress)
    check_int("rounds", rounds, 1)
    shape = [batch if d is None else d for d in rt.inputs[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(rt.inputs[0].dtype)
    extra = [np.random.default_rng(i).standard_normal([batch if d is None else d for d in s.shape])
             .astype(s.dtype) for i, s in enumerate(rt.inputs[1:], start=1)]
    start_config, start_threads = rt.config, rt.threads
    # the configs it loaded (Runtime(only=...), or configs the device would only emulate, are left out)
    todo = [(t, name) for t in rt.thread_counts for name in rt.loaded]
    calls = {(t, name): (lambda t=t, name=name: rt.switch(name, threads=t), lambda: rt.run(x, *extra))
             for t, name in todo}
    bar = progress_bar(rounds * len(todo), f"profile {rt.bundle.name}", show=progress, leave=False)
    cpu0 = cpu_ticks()
    times = interleaved(calls, rounds=rounds, runs_per_round=max(1, -(-min_runs // rounds)),
                        seconds_per_round=min_seconds / rounds, max_runs_per_round=max(1, max_runs // rounds),
                        warmup=warmup, lead=2, shuffle=True, on_block=lambda: bar.update(1))
    bar.close()
    cpu1 = cpu_ticks()
    by_threads: dict[str, dict[str, Any]] = {str(t): {} for t in rt.thread_counts}
    over: dict[str, list[np.ndarray]] = {str(t): [] for t in rt.thread_counts}
    for (threads, name), got in times.items():
        t = np.asarray(got)
        over[str(threads)].append(t[t > STALL_X * np.median(t)])
        stats = {"p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                 "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean()),
                 "throughput_per_s": float(batch * 1e3 / np.median(t)), "runs": len(t), "rounds": rounds}
        if memory:
            stats["peak_memory_mb"] = _peak_memory_mb(str(rt.bundle.path), name, rt.backend, threads, batch)
        by_threads[str(threads)][name] = stats
    rt.switch(start_config, threads=start_threads)
    runs = {t: sum(v["runs"] for v in stats.values()) for t, stats in by_threads.items()}
    stalls = {t: {"share": round(sum(len(a) for a in v) / max(runs[t], 1), 5),
                  "max_ms": round(float(max((a.max() for a in v if len(a)), default=0.0)), 4)}
              for t, v in over.items()}
    # the share of the CPUs' time the hypervisor gave other guests meanwhile (steal)
    steal = None
    if cpu0 is not None and cpu1 is not None and sum(cpu1) > sum(cpu0):
        steal = round((cpu1[7] - cpu0[7]) / (sum(cpu1) - sum(cpu0)), 4)
    return {"format": PROFILE_FORMAT, "device": rt.device, "obtained": "measured", "batch": batch,
            "model": model_id(rt.bundle.manifest),
            "env": environment(rt), "configs": by_threads[str(rt.thread_counts[0])],
            "by_threads": by_threads, "stalls": {"over_x_median": STALL_X, "by_threads": stalls,
                                                 "steal_share": steal}}


def stall_warning(prof: dict[str, Any]) -> str | None:
    """One line where the machine stalled while `prof` was measured: at a thread count more than
    STALL_SHARE of the runs took over STALL_X x their config's median (its p99s are the stalls', not the
    configs'), or the hypervisor took over STEAL_SHARE of the CPUs' time; None otherwise (and for profiles
    measured before edgeflex counted stalls)."""
    st = prof.get("stalls")
    if not isinstance(st, dict):
        return None
    x = st.get("over_x_median", STALL_X)
    parts = [f"at {t} thread(s) {100 * v['share']:.2g} % of runs took over {x:g}x their config's median (up "
             f"to {v['max_ms']:.3g} ms)" for t, v in sorted((st.get("by_threads") or {}).items())
             if v.get("share", 0) > STALL_SHARE]
    steal = st.get("steal_share")
    if steal is not None and steal > STEAL_SHARE:
        parts.append(f"the hypervisor took {100 * steal:.2g} % of the CPUs' time")
    if not parts:
        return None
    return ("the machine stalled while profiling: " + "; ".join(parts) + ": the p99s are the stalls', not "
            "the configs' (budget policies plan on them); profile again when the machine is quieter")


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
    on the same host, backend and batch (so `--threads 2` then `--threads 1` adds up); otherwise replaced.
    The merge reads the stored profile under the writer lock, so two profilers at once lose nothing. A
    profile measured on another model than the one now at `path` (re-exported meanwhile) is refused."""
    check_path("path", path)
    if not isinstance(profile, dict) or not {"device", "configs", "env"} <= set(profile):
        fail("profile", profile, "a profile dict from measure_profile (device, configs, env)")
    check_bool("merge", merge)

    def files(current: Bundle) -> dict[str, bytes]:
        prof = profile
        old = load_profile(current, prof["device"]) if merge else None
        same = old is not None and all(
            old.get("env", {}).get(k) == prof.get("env", {}).get(k) for k in ("host", "backend", "fused")
        ) and old.get("batch") == prof.get("batch")
        if same:
            kept = {str(t): profile_at(old, t) for t in profile_threads(old)}
            new = prof.get("by_threads") or {str(prof["env"]["threads"]): prof["configs"]}
            by_threads = {**kept, **new}
            counts = sorted(int(t) for t in by_threads)
            prof = {**prof, "by_threads": by_threads, "env": {**prof["env"], "thread_counts": counts}}
        return {profile_path(prof["device"]): (json.dumps(prof, indent=1) + "\n").encode()}

    return update_bundle(path, files, model=profile.get("model"))


def load_profiles(bundle: Bundle) -> dict[str, dict[str, Any]]:
    """Every latency profile stored in `bundle`, by device file name (read once: a `Runtime` keeps them)."""
    return {rel: _read_profile(bundle, rel) for rel in bundle.manifest["files"]
            if rel.startswith("profiles/") and rel.endswith(".json") and not rel.startswith(KERNEL_MODELS)}


# Kernel-level latency models (devices/kernel_predictor.py), one per device: kernels and configs timed on
# that device, fitted; with them `Runtime.query` predicts configs from their kernels (config costs).
KERNEL_MODELS = "profiles/kernels/"


def kernel_model_path(device: str) -> str:
    return f"{KERNEL_MODELS}{path_name(device)}.json"


def save_kernel_model(path: str | os.PathLike, model: dict[str, Any]) -> Bundle:
    """Add or replace the kernel-level latency model of `model["device"]` in the bundle at `path`,
    atomically (`KernelPredictor.to_json()`, fitted on kernels and configs timed on that device)."""
    from edgeflex.devices.kernel_predictor import KernelPredictor

    check_path("path", path)
    if not isinstance(model, dict):
        fail("model", model, "a kernel-level latency model (KernelPredictor.to_json())")
    KernelPredictor.from_json(model)            # refuses what is not one (one line naming what is wrong)
    data = (json.dumps(model) + "\n").encode()
    return update_bundle(path, {kernel_model_path(str(model["device"])): data})


def load_kernel_models(bundle: Bundle) -> dict[str, Any]:
    """The bundle's kernel-level latency models (KernelPredictor), by file name (kernel_model_path)."""
    from edgeflex.devices.kernel_predictor import KernelPredictor

    out = {}
    for rel in bundle.manifest["files"]:
        if rel.startswith(KERNEL_MODELS) and rel.endswith(".json"):
            d = load_json(f"bundle file {rel!r}", bundle.read(rel),
                          "store the model again (save_kernel_model)")
            try:
                out[rel] = KernelPredictor.from_json(d)
            except EdgeflexError as e:
                raise BundleError(f"bundle file {rel!r}: {e}; store the model again (save_kernel_model)") \
                    from None
    return out


def load_profile(bundle: Bundle, device: str) -> dict[str, Any] | None:
    rel = profile_path(device)
    return _read_profile(bundle, rel) if rel in bundle.manifest["files"] else None


def _read_profile(bundle: Bundle, rel: str) -> dict[str, Any]:
    return load_json(f"bundle file {rel!r}", bundle.read(rel), "re-run `edgeflex profile`", PROFILE)
