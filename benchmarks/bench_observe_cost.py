"""What one observation costs the tail policy's bookkeeping, warm and between engine runs (issue 20).

A Runtime with a latency budget and `policy="tail"`; its policy (`TailGuard`) is handed made-up latencies of
its current config (the profile's p50, a half-normal spread of 15 %, 3 % of them tripled) directly, and each
`observe` call is timed: back to back (its data warm in the caches), then with `--between` real engine runs
before each call, as the runtime's sampling spaces them (the engine's run evicts the policy's data). The
policy's decisions (every half window) are among the calls timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import edgeflex as ef

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_switch_cost import cpu_flags  # noqa: E402
from common import machine_and_run, publish  # noqa: E402

SECTION = "## What one observation costs the tail policy (issue 20)"


def observe_costs(rt: ef.Runtime, calls: int, between: int, seed: int = 0) -> np.ndarray:
    """Microseconds per `observe` call, `between` engine runs before each."""
    g = rt.adapter
    rng = np.random.default_rng(seed)
    p50 = g.opts[g.current].p50_ms
    x = np.zeros([1 if d is None or isinstance(d, str) else d for d in rt.inputs[0].shape],
                 dtype=rt.inputs[0].dtype)
    pc = time.perf_counter
    out = np.empty(calls)
    for i in range(calls):
        for _ in range(between):
            rt.run(x)
        lat = p50 * (1 + abs(rng.normal(0, 0.15))) * (3 if rng.random() < 0.03 else 1)
        t0 = pc()
        g.observe(g.current, lat)
        out[i] = pc() - t0
    return out * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--budget-ms", type=float, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--between", type=int, default=45, help="engine runs before each timed call")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.calls < 10 or a.between < 0:
        p.error(f"--calls {a.calls} --between {a.between}: expected calls >= 10 and between >= 0")
    if not 0 < a.budget_ms < float("inf"):
        p.error(f"--budget-ms {a.budget_ms:g}: expected milliseconds > 0")
    started = time.perf_counter()
    try:
        rt = ef.Runtime(a.bundle, threads=a.threads)
        rt.set_budget(ef.Budget(latency_ms=a.budget_ms), policy="tail", degrade=True)
    except ef.EdgeflexError as e:
        p.error(str(e))
    rows = [("back to back", observe_costs(rt, a.calls, 0)),
            (f"after {a.between} engine runs each", observe_costs(rt, a.calls, a.between, seed=1))]
    body = [f"`{a.bundle.name}`, budget {a.budget_ms:g} ms, {a.threads} thread(s), the policy on "
            f"`{rt.adapter.current}` ({len(rt.adapter.opts)} options), {a.calls} timed `observe` calls each:",
            "", "| calls | mean us | p50 us | p90 us | p99 us | max us |", "|---|---:|---:|---:|---:|---:|"]
    for name, c in rows:
        body.append(f"| {name} | {c.mean():.2f} | {np.median(c):.2f} | {np.percentile(c, 90):.2f} | "
                    f"{np.percentile(c, 99):.2f} | {c.max():.1f} |")
    body += ["", *machine_and_run(a.threads, f"- cpu flags: {cpu_flags()}", started=started)]
    publish(a.out, SECTION, "bench_observe_cost", "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
