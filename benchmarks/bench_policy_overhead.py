"""What the tail policy's own bookkeeping costs a request (issue 20): one config, three runtimes in turns.

- `static`: the config pinned (`Runtime.switch`), no budget;
- `tail`: `set_budget(policy="tail")` on a budget where it holds that config (it times one request in
  `every` and hands the observations to the policy on an observed request with room, on one late anyway,
  or when `runtime.HOLD` wait);
- `unobserved`: the same tail policy with its sampling pushed out of reach (it never observes): what the
  adaptive request path costs without the policy's work;
- `base` (with `--base FILE`, a copy of runtime/runtime.py from another revision): the tail policy on that
  revision's Runtime, so a change to the request path is measured beside the one it replaces.

The runtimes take turns in blocks of `--block` requests, the order rotating, for `--rounds` rounds, so the
machine's other load (which moves the p90 of a 20 us FITS request 1.5x within minutes here) falls on all
alike. Each runtime's own engine is also called directly in blocks of its own (`NAME:engine`, the plan's
call, no runtime code): runtimes made alike keep p50 levels up to 0.4 us apart (bench_instances.py), so a
runtime's cost is measured against its own engine, as the median over rounds of its block's p50 minus its
engine block's, with a 95 % interval over the rounds. Reported: p50/p90/p99 and the share within the budget
and within 1.33x / 1.67x of it (a policy's bookkeeping that lands on late requests is free at the budget and
shows beyond it). The policies are created with `os_hint=False, warm_switch=False` (no background threads:
those are measured in bench_switch_cost and the eleventh session's A/B).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import edgeflex as ef
from edgeflex.cli import _threads_arg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_switch_cost import cpu_flags  # noqa: E402
from common import machine_and_run, publish  # noqa: E402

SECTION = "## The tail policy's own cost per request (issue 20)"
ENGINE = ":engine"          # a runtime's engine called directly, in blocks of its own


def runtimes(bundle: Path, config: str, threads: int, budget_ms: float,
             counts: tuple[int, ...] = (2, 1), base: type | None = None) -> dict[str, ef.Runtime]:
    """The three runtimes, engines at `counts` threads (the policy's options: every config at each count,
    as in bench_policy_traces); SystemExit with one line where the policy would not hold `config`."""
    counts = tuple(sorted({threads, *counts}, reverse=True))
    rts = {"static": ef.Runtime(bundle, threads=counts)}
    rts["static"].switch(config, threads=threads)
    for k in ("tail", "unobserved", *(["base"] if base is not None else [])):
        rt = rts[k] = (base if k == "base" else ef.Runtime)(bundle, threads=counts)
        rt.set_budget(ef.Budget(latency_ms=budget_ms), policy="tail", degrade=True, os_hint=False,
                      warm_switch=False)
        if (rt.config, rt.threads) != (config, threads):
            raise SystemExit(f"error: at --budget-ms {budget_ms:g} the tail policy picks {rt.config}@"
                             f"{rt.threads}t, not {config}@{threads}t; expected a budget where it holds "
                             "the config (e.g. 1.5x its idle p50)")
    rts["unobserved"]._free = 1 << 62          # its sampling never comes round: nothing is observed
    rts["unobserved"]._pending = []
    return rts


def observed_next(rt: ef.Runtime) -> Callable[[], bool] | None:
    """A check that says whether `rt`'s next request is one its budget policy observes (this revision: `_free`
    is 0 and no hunt runs, or the hunt's sampling count `_due` is 0; before the fifteenth session no hunts;
    before the fourteenth: `_unobserved`), None without an adaptive budget."""
    if rt.adapter is None:
        return None
    if hasattr(rt, "_hunt"):
        return lambda: rt._free == 0 and (not rt._hunt or rt._due == 0)
    slot = next((k for k in ("_free", "_unobserved") if hasattr(rt, k)), None)
    return None if slot is None else (lambda: getattr(rt, slot) == 0)


def measure(rts: dict[str, ef.Runtime], x: np.ndarray, rounds: int, block: int,
            engines: bool = False, marks: dict[str, list[bool]] | None = None) -> dict[str, np.ndarray]:
    """Per runtime, its requests' latencies (ms) in the order run, `rounds` blocks of `block`; `engines`:
    each runtime's current engine also called directly, in blocks of its own (`NAME:engine`); `marks`:
    filled per adaptive runtime with whether each request was one its policy observed (read before the
    request, outside its timing)."""
    names = [*rts, *([f"{k}{ENGINE}" for k in rts] if engines else [])]
    out: dict[str, list[float]] = {k: [] for k in names}
    pc = time.perf_counter
    args = (x,)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for j in range(len(names)):
                k = names[(r + j) % len(names)]
                lat = out[k]
                if k.endswith(ENGINE):
                    call = rts[k[:-len(ENGINE)]]._plan.call
                    for _ in range(block):
                        t0 = pc()
                        call(args)
                        lat.append(pc() - t0)
                    continue
                rt = rts[k]
                observed = observed_next(rt) if marks is not None else None
                if observed is not None:
                    m = marks.setdefault(k, [])
                    for _ in range(block):
                        m.append(observed())
                        t0 = pc()
                        rt.run_config(x)
                        lat.append(pc() - t0)
                    continue
                for _ in range(block):
                    t0 = pc()
                    rt.run_config(x)
                    lat.append(pc() - t0)
    finally:
        if gc_was:
            gc.enable()
    return {k: np.array(v) * 1e3 for k, v in out.items()}


def over_engine(lat: dict[str, np.ndarray], block: int,
                seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Per runtime with engine blocks: the median over rounds of (its block's p50 - its engine block's p50),
    in us, and a 95 % bootstrap interval over the rounds (the rounds paired, so the machine's slow spells,
    which fall on both blocks of a round alike, drop out)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in lat.items():
        e = lat.get(k + ENGINE)
        if k.endswith(ENGINE) or e is None:
            continue
        d = 1e3 * (np.median(v.reshape(-1, block), axis=1) - np.median(e.reshape(-1, block), axis=1))
        boot = np.median(d[rng.integers(0, len(d), (2000, len(d)))], axis=1)
        out[k] = (float(np.median(d)), *map(float, np.percentile(boot, [2.5, 97.5])))
    return out


def positions(lat: dict[str, np.ndarray], marks: dict[str, list[bool]], budget_ms: float,
              made_late: dict[str, int] | None = None) -> list[str]:
    """Per adaptive runtime: the late share of the requests its policy observed, of the request right after
    each (caches the bookkeeping evicted), and of the others; and the late requests over the others' share
    that the two account for, in points of all requests (what observing costs at the budget). `made_late`
    (per runtime, the policy's count of runs its bookkeeping made late: on time before it, late after) adds
    a column with those in points of all requests, which the load's level moves far less than the shares."""
    made_late = made_late or {}
    rows = ["| runtime | observed: requests, late | the next: late | the others: late | late over the "
            "others' share, points of all requests |"
            + (" made late by the bookkeeping, points of all requests |" if made_late else ""),
            "|---|---:|---:|---:|---:|" + ("---:|" if made_late else "")]
    for k, m in marks.items():
        late = lat[k] > budget_ms
        obs = np.asarray(m, dtype=bool)
        nxt = np.roll(obs, 1)
        nxt[0] = False
        nxt &= ~obs
        rest = ~(obs | nxt)
        base = late[rest].mean() if rest.any() else float("nan")
        share = [late[v].mean() if v.any() else float("nan") for v in (obs, nxt)]
        excess = sum(v.sum() * (sh - base) for v, sh in zip((obs, nxt), share) if v.any()) / len(late)
        pct = [f"{v:.2%}" if v == v else "-" for v in (*share, base)]
        made = f" {100 * made_late[k] / len(late):.3f} |" if k in made_late else (" - |" if made_late else "")
        rows.append(f"| {k} | {obs.sum()}, {pct[0]} | {pct[1]} | {pct[2]} | {100 * excess:+.3f} |{made}")
    return rows


def table(lat: dict[str, np.ndarray], budget_ms: float, block: int | None = None) -> list[str]:
    levels = (1.0, 4 / 3, 5 / 3)
    extra = over_engine(lat, block) if block else {}
    head = ["runtime", "p50 us", "p90 us", "p99 us", *[f"within {m:.2f}x budget" for m in levels],
            *(["p50 over its own engine, us [95 % interval]"] if extra else [])]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for k, v in lat.items():
        p = np.percentile(v, [50, 90, 99]) * 1e3
        shares = [f"{(v <= m * budget_ms).mean():.2%}" for m in levels]
        cell = []
        if extra:
            g = extra.get(k)
            cell = [f"{g[0]:+.2f} [{g[1]:+.2f}, {g[2]:+.2f}]" if g else ""]
        rows.append(f"| {k} | {p[0]:.1f} | {p[1]:.1f} | {p[2]:.1f} | " + " | ".join(shares + cell) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--config", required=True, help="the config the policy should hold (e.g. cut-20)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-ms", type=float, required=True)
    p.add_argument("--rounds", type=int, default=120)
    p.add_argument("--block", type=int, default=1000, help="requests per turn of a runtime")
    p.add_argument("--repeats", type=int, default=2, help="independent measurements (each its own runtimes)")
    p.add_argument("--counts", type=_threads_arg, default="2,1",
                   help="thread counts the runtimes load (the policy's options), e.g. 2,1")
    p.add_argument("--engines", action="store_true",
                   help="also call each runtime's engine directly in blocks of its own, and report each "
                        "runtime's p50 over its own engine's")
    p.add_argument("--base", type=Path, metavar="FILE",
                   help="runtime/runtime.py of another revision: a 'base' runtime plays the tail policy on "
                        "its Runtime (git show REV:runtime/runtime.py > FILE)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    counts = a.counts if isinstance(a.counts, tuple) else (a.counts,)
    for name in ("rounds", "block", "repeats", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name} {getattr(a, name)}: expected an integer >= 1")
    if not a.budget_ms > 0:
        p.error(f"--budget-ms {a.budget_ms:g}: expected a latency budget > 0")
    started = time.perf_counter()
    base = None
    if a.base:
        from bench_policy_traces import base_runtime

        base = base_runtime(a.base)
    body = [f"`{a.config}@{a.threads}t` of `{a.bundle.name}`, budget {a.budget_ms:g} ms, batch 1; the "
            f"runtimes {'and their engines ' if a.engines else ''}in turns of {a.block} requests for "
            f"{a.rounds} rounds, the order rotating; {a.repeats} independent measurements"
            + (f"; `base`: the Runtime of `{a.base}`" if a.base else "") + ".", ""]
    for i in range(a.repeats):
        try:
            rts = runtimes(a.bundle, a.config, a.threads, a.budget_ms, counts, base)
        except ef.EdgeflexError as e:
            p.error(str(e))
        spec = rts["static"].inputs[0]
        x = np.random.default_rng(0).standard_normal([1 if d is None or isinstance(d, str) else d
                                                       for d in spec.shape]).astype(np.float32)
        marks: dict[str, list[bool]] = {}
        first = len(body)
        lat = measure(rts, x, a.rounds, a.block, a.engines, marks)
        tail = rts["tail"].adapter
        made = {k: rt.adapter.bookkeeping["made_late"] for k, rt in rts.items()
                if k in marks and hasattr(rt.adapter, "bookkeeping")}
        seen = "" if base is None else f"; base: one in {rts['base'].adapter.every}"
        body += [f"**Measurement {i + 1}** (the tail policy observed one request in {tail.every}, "
                 f"{tail.switches} switches{seen}):", "", *table(lat, a.budget_ms, a.block), "",
                 "Late requests by position (the policy's observed request, the one after it, the rest):",
                 "", *positions(lat, marks, a.budget_ms, made), ""]
        print("\n".join(body[first:]), flush=True)
    body += machine_and_run(a.threads, f"- cpu flags: {cpu_flags()}", started=started)
    publish(a.out, SECTION, "bench_policy_overhead", "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
