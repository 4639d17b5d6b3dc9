"""How much of this machine is free right now, read from the OS: a hint for the budget policy.

`IdleCores()` returns, per call, how many of this process's allowed CPUs were idle on average since the
previous call, from the kernel's per-CPU tick counters (`/proc/stat`, Linux; USER_HZ ticks, usually 10 ms,
so calls less than a few ticks apart return None). `min_interval_s`: a call sooner than that after the last
read returns the last answer without reading (the file read and parse, 10-40 us, would otherwise land inside a
request the policy times; a FITS request is ~20 us). Where the file cannot be read (macOS, Android apps since
Android 8) it always returns None and the policy falls back to probing by trial. `background=True` reads on
a thread of its own every `min_interval_s` and a call returns the latest answer: no request pays for a read
(measured in place: a FITS request that read the file took 17 us more, one in ten 100 us).
"""

from __future__ import annotations

import os
import threading
import time
import weakref


def cpu_ticks(path: str = "/proc/stat") -> list[int] | None:
    """The machine's CPU time so far, all CPUs together, in USER_HZ ticks from /proc/stat's first line:
    [user, nice, system, idle, iowait, irq, softirq, steal]; None where it cannot be read (not Linux)."""
    try:
        with open(path, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return [int(v) for v in fields[1:9]]


class IdleCores:
    def __init__(self, path: str = "/proc/stat", cpus: set[int] | None = None, min_interval_s: float = 0.0,
                 background: bool = False):
        self.path = path
        self.min_interval_s = min_interval_s
        self._read_at = -float("inf")
        self._answer: float | None = None
        if cpus is None and hasattr(os, "sched_getaffinity"):
            cpus = set(os.sched_getaffinity(0))
        self.cpus = cpus
        self._last: dict[int, tuple[int, int]] | None = None
        self.background = background
        if background:
            if min_interval_s <= 0:
                raise ValueError("IdleCores(background=True) needs min_interval_s > 0 (how often to read)")
            self._probe()                                # the first sample: answers start one interval on
            threading.Thread(target=_refresh, args=(weakref.ref(self), min_interval_s), daemon=True,
                             name="edgeflex-idle-cores").start()

    def _read(self) -> dict[int, tuple[int, int]] | None:
        """cpu -> (idle ticks, all ticks) for the allowed CPUs; None if unreadable."""
        try:
            with open(self.path, encoding="ascii") as f:
                lines = f.readlines()
        except OSError:
            return None
        out = {}
        for ln in lines:
            if not ln.startswith("cpu") or not ln[3:4].isdigit():
                continue
            name, *fields = ln.split()
            cpu = int(name[3:])
            if self.cpus is not None and cpu not in self.cpus:
                continue
            ticks = [int(v) for v in fields[:8]]        # user nice system idle iowait irq softirq steal
            if len(ticks) < 5:
                return None
            out[cpu] = (ticks[3] + ticks[4], sum(ticks))
        return out or None

    def __call__(self) -> float | None:
        if self.background:
            return self._answer
        if self.min_interval_s:
            t = time.monotonic()
            if t - self._read_at < self.min_interval_s:
                return self._answer
            self._read_at = t
            self._answer = self._probe()
            return self._answer
        return self._probe()

    def _probe(self) -> float | None:
        now = self._read()
        if now is None:
            return None
        last, self._last = self._last, now
        if last is None or set(last) != set(now):
            return None
        d_idle = sum(now[c][0] - last[c][0] for c in now)
        d_all = sum(now[c][1] - last[c][1] for c in now)
        if d_all < 2 * len(now):                        # under two ticks per CPU: too short to tell
            self._last = last                           # keep accumulating from the older sample
            return None
        return len(now) * d_idle / d_all


def _refresh(ref: weakref.ref, interval_s: float) -> None:
    """`IdleCores(background=True)`'s thread: one read per interval until the reader is gone (a weak
    reference: the thread never keeps it alive)."""
    while True:
        time.sleep(interval_s)
        probe = ref()
        if probe is None:
            return
        answer = probe._probe()
        if answer is not None or probe._last is None:
            probe._answer = answer
        del probe
