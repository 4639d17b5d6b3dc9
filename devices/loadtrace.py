"""Seeded, reproducible load traces for judging a budget policy on loads it was never tuned on, and a player
that makes them happen on this machine.

A `LoadTrace` is a list of `Phase`s back to back: in each, `alu` busy-loop hogs and `mem` memory-bandwidth
hogs (each pinned to its own core, from the last core down) run a duty cycle: on for `duty` of every
`period_s` (1.0: all the time), the duty drifting linearly from `duty` to `duty_end` over the phase (a
slow drift). `generate(seed, ...)` draws one: phases of 0.3 s to tens of seconds, 0..all cores, periods
from sub-second to seconds, short all-core bursts, drifts; and the request side too: a budget position
`budget_u` in [0, 1] (`budget_ms` maps it onto tight..loose multiples of the configs' idle latencies) and
a batch size. The same seed gives the same trace on every machine (numpy's PCG64 generator).

`parse_spec` reads a hand-written trace (`edgeflex trace --load`): `idle:4,alu1:6,idle:3,mem1x0.5/0.2:5`
(kind, cores, optional duty/period, `:` seconds), or `seed:N[:SECONDS]` for a generated one.
`LoadPlayer` runs the hogs (child processes of this interpreter, stopped and continued by signal).
Board side: numpy and the standard library only.
"""

from __future__ import annotations

import bisect
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np

from edgeflex.errors import UsageError

# Hog programs. The memory hog streams 64 MiB buffers (beyond any last-level cache of the boards we
# target), so it takes memory bandwidth and evicts caches rather than ALU time.
# Each asks the kernel to kill it when its parent dies (Linux prctl PR_SET_PDEATHSIG), so a player killed
# without its cleanup leaves no hog behind, running or stopped; then says it is ready (the player stops it
# only after that, so the request holds and the memory hog's buffers are allocated before any trace runs).
_START = ("import ctypes, os, sys\ntry:\n    ctypes.CDLL(None).prctl(1, 9)\n"
          "except (OSError, AttributeError):\n    pass\nos.sched_setaffinity(0, {int(sys.argv[1])})\n")
_READY = "print('ready', flush=True)\n"
ALU_HOG = _START + _READY + "while True:\n    pass\n"
MEM_HOG = (_START + "import numpy as np\na = np.ones(1 << 23); b = np.empty_like(a)\n" + _READY
           + "while True:\n    np.copyto(b, a); np.copyto(a, b)\n")

# What `generate` draws from (documented ranges; tests check the traces stay inside them).
PHASE_S = (0.3, 20.0)          # phase length, log-uniform
PERIOD_S = (0.05, 5.0)         # duty-cycle period, log-uniform
BURST_S = (0.1, 0.6)           # an all-core ALU burst
BATCHES = (1, 1, 1, 4, 16)     # batch 1 most often


@dataclass(frozen=True)
class Phase:
    seconds: float
    alu: int = 0                # busy-loop hogs
    mem: int = 0                # memory-bandwidth hogs
    duty: float = 1.0           # share of each period the hogs run, at the phase's start
    period_s: float = 1.0
    duty_end: float | None = None   # duty at the phase's end (None: constant): a slow drift

    def active(self, t: float) -> bool:
        """Whether the hogs run `t` seconds into the phase."""
        if self.alu + self.mem == 0:
            return False
        end = self.duty if self.duty_end is None else self.duty_end
        d = self.duty + (end - self.duty) * min(max(t / self.seconds, 0.0), 1.0)
        return d >= 1.0 or (t % self.period_s) < d * self.period_s

    def describe(self) -> str:
        if self.alu + self.mem == 0:
            return f"idle:{self.seconds:g}"
        kinds = [f"alu{self.alu}"] * bool(self.alu) + [f"mem{self.mem}"] * bool(self.mem)
        duty = "" if self.duty >= 1 and self.duty_end is None else (
            f"x{self.duty:.2g}" + (f"-{self.duty_end:.2g}" if self.duty_end is not None else "")
            + f"/{self.period_s:.3g}")
        return "+".join(kinds) + duty + f":{self.seconds:.3g}"


@dataclass(frozen=True)
class LoadTrace:
    phases: tuple[Phase, ...]
    cores: int
    seed: int | None = None
    budget_u: float = 0.5       # 0: tightest budget, 1: loosest (see budget_ms)
    batch: int = 1
    _starts: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        if not self.phases:
            raise UsageError("a load trace needs at least one phase")
        for p in self.phases:
            if p.alu < 0 or p.mem < 0 or p.alu + p.mem > self.cores:
                raise UsageError(f"phase {p.describe()!r} needs {p.alu + p.mem} cores; this trace has "
                                 f"{self.cores}: give at most that many hogs per phase")
            if not (p.seconds > 0 and p.period_s > 0 and 0 <= p.duty <= 1
                    and (p.duty_end is None or 0 <= p.duty_end <= 1)):
                raise UsageError(f"phase {p.describe()!r}: expected seconds > 0, period > 0, duty in [0, 1]")
        object.__setattr__(self, "_starts", tuple(float(v) for v in np.cumsum([0.0] + [p.seconds
                                                                                      for p in self.phases])))

    @property
    def seconds(self) -> float:
        return self._starts[-1]

    def phase_at(self, t: float) -> int:
        """Index of the phase running `t` seconds into the trace (the last one past the end)."""
        return min(bisect.bisect_right(self._starts, t) - 1, len(self.phases) - 1)   # per request: no numpy

    def state(self, t: float) -> tuple[int, int]:
        """(ALU hogs, memory hogs) running `t` seconds into the trace."""
        i = self.phase_at(t)
        p = self.phases[i]
        return (p.alu, p.mem) if p.active(t - self._starts[i]) else (0, 0)

    def budget_ms(self, idle_ms: list[float] | dict[str, float]) -> float:
        """The trace's latency budget given the configs' idle latencies (their best p90s): log-uniformly
        between 1.2 x the fastest's (tight: only the fastest fits) and 1.6 x the slowest's (loose)."""
        v = np.asarray(list(idle_ms.values()) if isinstance(idle_ms, dict) else idle_ms, dtype=float)
        if v.size == 0 or not np.all(v > 0):
            raise UsageError("budget_ms needs the configs' idle latencies (> 0 ms); got none or one <= 0")
        lo, hi = 1.2 * v.min(), 1.6 * v.max()
        return float(lo * (hi / lo) ** self.budget_u)

    def describe(self) -> str:
        return ",".join(p.describe() for p in self.phases)


def generate(seed: int, seconds: float = 15.0, cores: int | None = None, *, batch: int | None = None
             ) -> LoadTrace:
    """A random load trace of `seconds` (phases cut to fit) on `cores` (default: this process's), from
    `seed` alone. `batch` fixes the batch size (default: drawn, 1 most often)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be an integer >= 0, got {seed!r}")
    if not seconds > 0:
        raise UsageError(f"seconds must be > 0, got {seconds!r}")
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    if cores < 1:
        raise UsageError(f"cores must be >= 1, got {cores}")
    rng = np.random.default_rng(int(seed))

    def logu(lo_hi: tuple[float, float]) -> float:
        return float(np.exp(rng.uniform(np.log(lo_hi[0]), np.log(lo_hi[1]))))

    phases: list[Phase] = []
    left = float(seconds)
    while left > 1e-9:
        kind = rng.choice(["idle", "alu", "mem", "mixed", "burst", "drift"], p=[.2, .25, .15, .1, .1, .2])
        if kind == "burst":
            dur = min(logu(BURST_S), left)
            phases.append(Phase(dur, alu=cores))
        else:
            dur = min(logu(PHASE_S), left)
            if kind == "idle":
                phases.append(Phase(dur))
            else:
                if kind == "mixed" and cores >= 2:          # both kinds at once, on separate cores
                    n = int(rng.integers(2, cores + 1))
                    alu = int(rng.integers(1, n))
                else:
                    n = int(rng.integers(1, cores + 1))
                    alu = 0 if kind == "mem" else n
                mem = n - alu
                steady = rng.random() < 0.4
                duty = 1.0 if steady and kind != "drift" else float(rng.uniform(0.1, 0.95))
                end = float(rng.uniform(0.0, 1.0)) if kind == "drift" else None
                phases.append(Phase(dur, alu=alu, mem=mem, duty=duty, period_s=logu(PERIOD_S), duty_end=end))
        left -= dur
    b = batch if batch is not None else int(rng.choice(BATCHES))
    return LoadTrace(tuple(phases), cores, seed=int(seed), budget_u=float(rng.uniform()), batch=b)


_PHASE = re.compile(r"^(idle|(?:alu|mem)\d*(?:\+(?:alu|mem)\d*)?)"
                    r"(?:x([\d.]+)(?:-([\d.]+))?/([\d.]+))?:([\d.]+)$")


def parse_spec(spec: str, cores: int | None = None) -> LoadTrace:
    """A trace from `seed:N[:SECONDS]` or phases `KIND[xDUTY[-END]/PERIOD]:SECONDS,...` where KIND is
    idle, aluN, memN or aluN+memM (N cores, default 1), e.g. `idle:4,alu1:6,mem1x0.5/0.2:5`."""
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    spec = spec.strip()
    expected = ("expected seed:N[:SECONDS] or phases like idle:4,alu1:6,mem1x0.5/0.2:5 "
                "(KIND[xDUTY[-END]/PERIOD]:SECONDS; KIND idle, aluN, memN, aluN+memM)")
    if spec.startswith("seed:"):
        parts = spec.split(":")
        try:
            seed = int(parts[1])
            seconds = float(parts[2]) if len(parts) > 2 else 15.0
        except (ValueError, IndexError):
            raise UsageError(f"--load {spec!r}: {expected}") from None
        if len(parts) > 3:
            raise UsageError(f"--load {spec!r}: {expected}")
        return generate(seed, seconds, cores, batch=1)
    phases = []
    for item in spec.split(","):
        m = _PHASE.match(item.strip())
        if m is None:
            raise UsageError(f"--load {spec!r}: cannot read {item!r}; {expected}")
        kinds, duty, end, period, secs = m.groups()
        alu = mem = 0
        if kinds != "idle":
            for k in kinds.split("+"):
                n = int(k[3:] or 1)
                alu, mem = (alu + n, mem) if k.startswith("alu") else (alu, mem + n)
        phases.append(Phase(float(secs), alu=alu, mem=mem, duty=float(duty) if duty else 1.0,
                            period_s=float(period) if period else 1.0,
                            duty_end=float(end) if end else None))
    return LoadTrace(tuple(phases), cores)


class LoadPlayer:
    """The hogs of a trace as child processes, one ALU and one memory hog per core, stopped until
    `set(alu, mem)` continues the first `alu` ALU hogs (last core first) and `mem` memory hogs (on the
    cores after those). `close()` ends them; use as a context manager."""

    def __init__(self, cores: list[int] | None = None, mem: bool = True):
        self.cores = sorted(cores if cores is not None else os.sched_getaffinity(0), reverse=True)
        self.alu_procs = [self._start(ALU_HOG, c) for c in self.cores]
        self.mem_procs = [self._start(MEM_HOG, c) for c in self.cores] if mem else []
        self.on = (0, 0)

    @staticmethod
    def _start(code: str, core: int) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", code, str(core)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE)
        if p.stdout.readline().strip() != b"ready":
            p.kill()
            p.wait()
            raise UsageError(f"a load hog for core {core} did not start (exit status {p.returncode})")
        p.send_signal(signal.SIGSTOP)
        return p

    def set(self, alu: int, mem: int) -> None:
        if (alu, mem) == self.on:
            return
        if mem and not self.mem_procs:
            raise UsageError("this LoadPlayer has no memory hogs (mem=False)")
        for i, p in enumerate(self.alu_procs):
            p.send_signal(signal.SIGCONT if i < alu else signal.SIGSTOP)
        for i, p in enumerate(self.mem_procs):          # on the cores after the ALU hogs'
            p.send_signal(signal.SIGCONT if alu <= i < alu + mem else signal.SIGSTOP)
        self.on = (alu, mem)

    def cpu_seconds(self) -> float:
        """CPU time the hogs have used so far (user + system, from /proc; 0 where unreadable)."""
        total = 0
        for p in self.alu_procs + self.mem_procs:
            try:
                with open(f"/proc/{p.pid}/stat", encoding="ascii") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        for p in self.alu_procs + self.mem_procs:
            p.kill()
            p.wait()
            p.stdout.close()
        self.alu_procs, self.mem_procs = [], []

    def __enter__(self) -> LoadPlayer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
