"""Budgets and the policy that keeps a runtime inside one: pick the best-quality config whose profiled
latency (and memory, energy) fits with a safety margin, then watch observed latencies and re-select when
the device slows down or recovers, with hysteresis so it does not flap.

Pure logic over profiles (dicts of numbers): no engine, no clock of its own, so tests drive it exactly.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeflex.args import check_int, check_real
from edgeflex.errors import UsageError


class BudgetError(UsageError):
    """No config fits the budget (and the caller did not ask to degrade)."""


@dataclass(frozen=True)
class Budget:
    """Per-request limits: latency (ms, judged on p90), memory (MB of peak RSS), energy (mJ). Any subset."""

    latency_ms: float | None = None
    memory_mb: float | None = None
    energy_mj: float | None = None

    def __post_init__(self):
        for name in ("latency_ms", "memory_mb", "energy_mj"):
            check_real(f"Budget {name}", getattr(self, name), 0, none=True)
        if self.latency_ms is None and self.memory_mb is None and self.energy_mj is None:
            raise UsageError("an empty Budget: give latency_ms, memory_mb and/or energy_mj")

    def describe(self) -> str:
        parts = [f"{v:g} {u}" for v, u in ((self.latency_ms, "ms"), (self.memory_mb, "MB"),
                                           (self.energy_mj, "mJ")) if v is not None]
        return ", ".join(parts)


@dataclass(frozen=True)
class Candidate:
    """What the policy knows of one config: quality (higher is better after `rank`), profiled latency.

    `threads` > 0 makes the thread count part of the choice (a runtime with engines at several counts):
    the candidate's `key` is then `name@<threads>t`; 0 (one count) keeps the plain config name."""

    name: str
    rank: float                 # quality oriented so that higher is better (-MSE for 'lower' metrics)
    p90_ms: float
    memory_mb: float | None = None
    energy_mj: float | None = None
    threads: int = 0

    @property
    def key(self) -> str:
        return candidate_key(self.name, self.threads)


def candidate_key(name: str, threads: int = 0) -> str:
    return f"{name}@{threads}t" if threads else name


def candidates(configs, profile: dict[str, dict], power_w: float | None = None,
               tail: str = "p90", threads: int = 0) -> list[Candidate]:
    """Candidates from bundle configs and a profile's per-config stats. Energy = p50 x device power when
    the device description gives one; quality missing -> FLOPs stand in (bigger assumed better).
    `tail` ("p90" or "p99") is the profiled percentile the budget is judged on (kept in `p90_ms`);
    `threads` tags them with the thread count the profile was measured at (see `Candidate`)."""
    out = []
    for c in configs:
        stats = profile.get(c.name)
        if stats is None:
            continue
        q = c.quality or {}
        if "value" in q:
            rank = q["value"] if q.get("direction", "higher") == "higher" else -q["value"]
        else:
            rank = float(c.flops or 0)
        energy = stats["p50_ms"] * power_w if power_w else stats.get("energy_mj")
        out.append(Candidate(c.name, float(rank), float(stats[f"{tail}_ms"]), stats.get("peak_memory_mb"),
                             energy, threads))
    return out


Slowdown = float | dict[int, float]


def _slow(c: Candidate, slowdown: Slowdown) -> float:
    """The slowdown that applies to `c`: one for all, or one per thread count (1.0 where never observed)."""
    return slowdown.get(c.threads, 1.0) if isinstance(slowdown, dict) else slowdown


def fits(c: Candidate, b: Budget, margin: float, slowdown: Slowdown = 1.0) -> bool:
    slowdown = _slow(c, slowdown)
    if b.latency_ms is not None and c.p90_ms * slowdown > margin * b.latency_ms:
        return False
    if b.memory_mb is not None and (c.memory_mb is None or c.memory_mb > b.memory_mb):
        return False
    if b.energy_mj is not None and (c.energy_mj is None or c.energy_mj * slowdown > margin * b.energy_mj):
        return False
    return True


def choose(cands: list[Candidate], b: Budget, *, margin: float = 0.85, slowdown: Slowdown = 1.0,
           degrade: bool = False) -> tuple[Candidate, bool]:
    """The best-ranked candidate that fits (ties: the faster); (smallest, False) if none fits and `degrade`.

    Raises BudgetError naming the budget and the closest config when nothing fits and not `degrade`."""
    if not cands:
        raise BudgetError("no config has a latency profile on this device; run `edgeflex profile` first")
    if b.energy_mj is not None and all(c.energy_mj is None for c in cands):
        raise BudgetError("energy budget given but this device has no power figure to estimate energy; "
                          "drop energy_mj or describe the device's power")
    ok = [c for c in cands if fits(c, b, margin, slowdown)]
    if ok:   # ties (one config at several thread counts): the faster under the slowdown observed
        return max(ok, key=lambda c: (c.rank, -c.p90_ms * _slow(c, slowdown))), True
    smallest = min(cands, key=lambda c: c.p90_ms * _slow(c, slowdown))
    if degrade:
        return smallest, False
    s = _slow(smallest, slowdown)
    raise BudgetError(f"no config fits the budget {b.describe()} (with margin {margin:g}, slowdown "
                      f"{s:.2f}x): the fastest, {smallest.key!r}, has p90 "
                      f"{smallest.p90_ms * s:.3f} ms; raise the budget or pass degrade=True")


# With the OS hint: after n probes in a row failed although the cores looked free, the next waits
# 2**n - 1 windows (capped at n = 5: 31 windows), so a slow spell no co-runner explains costs few probes.
MAX_HINTED_BACKOFF = 5


# Late runs a window needs before `late_share` plans on its tail. Two late runs in a window of 100 are
# chance for a config that is late 0.5 % of the time (OS noise on an idle host: 9 % of its windows have 2 or
# more); with 3 the share of such windows falls to 1.4 %, while a busy loop on the other core (5-7 % late)
# still shows 3 or more in 88-97 % of them. Each false alarm moved the budget trace's idle runtime down a
# config, where the up-switch hysteresis can hold it for a whole slow spell (benchmarks/RESULTS.md, Budgets).
TAIL_MIN_LATE = 3
# Flap guard (Adapter._hold_after_leaving): a config left for being late within UP_RECENT windows of
# being entered by an up-switch is held back, up_after windows doubling to at most UP_HOLD_MAX. Measured
# here with the hog never running, in a slow spell: without it the runtime went s100 -> s050 -> s100 31
# times a minute (s100 was late 1.3 % of the time, in bursts of 3).
UP_RECENT = 50
UP_HOLD_MAX = 64


class Adapter:
    """Online re-selection from observed latencies.

    Slowdown s = (window p90 of the current config) / (its profiled p90). The current config is kept while
    s * p90 fits `margin_hi` * budget; when it does not, switch down at once to the best config that fits
    at s. Switch up only when a better config fits `margin_lo` (< margin_hi) * budget at s, and `up_after`
    consecutive windows agreed: the gap between the two margins and the wait are the hysteresis.

    Down is fast, up is slow: `fast_down` consecutive runs over the latency budget end the window early
    (their smallest latency sets the slowdown), so a sudden slowdown costs a few late requests, not a
    window of them. 0 turns it off. A config left for lateness soon after an up-switch into it is held
    back from the next up-switches for up_after windows, doubling with each such flap (`UP_HOLD_MAX`).

    Thread counts (candidates with `threads` > 0): load slows engines at different thread counts
    differently (a co-running process on one core slows a 2-thread engine, not a 1-thread one), so the
    slowdown is kept per thread count, from the runs observed at that count. A count not run for a while
    has a stale slowdown; when a better candidate at another count is held back only by that, the adapter
    *probes* it: switches to it on trial, and goes back after `probe_late` late runs (a failed probe costs
    about that many late requests) or keeps it after a clean window. Probes wait `probe_after` runs
    (default 2 windows), doubling after each failure up to 4x that, reset by a success.
    `late_share` (e.g. 0.02): a window with more than that share of runs over the latency budget, and at
    least TAIL_MIN_LATE of them, sets the slowdown from its (1 - late_share) quantile instead of
    `percentile`: a config whose p90 fits but whose tail misses the budget too often (2 threads with a busy
    loop on one core: 5-7 % late) is left, as the budget is judged per request. None: the percentile alone.
    `idle_cores` (e.g. `devices.load.IdleCores()`), asked every `hint_every` runs (default a quarter
    window: at a hog's end the 1-thread runtime learns of the free core within ~25 runs, not ~100; each ask
    reads and parses /proc/stat, too dear for every run), tells how many cores were idle:
    where it answers, a probe goes ahead as soon as the extra threads' cores are free (0.75 of a core
    each) and never while they are busy; probes that fail although the cores look free back off
    (`MAX_HINTED_BACKOFF`); where it returns None, the timer above decides.
    """

    def __init__(self, cands: list[Candidate], budget: Budget, *, window: int = 32, margin_hi: float = 0.9,
                 margin_lo: float = 0.7, up_after: int = 3, degrade: bool = False, percentile: float = 90,
                 fast_down: int = 3, probe_after: int | None = None, probe_late: int = 2,
                 idle_cores: Callable[[], float | None] | None = None, late_share: float | None = None,
                 hint_every: int | None = None):
        window = check_int("window", window, 1)     # 0: an empty window whose percentile is an IndexError
        if fast_down < 0:
            raise UsageError(f"fast_down must be >= 0 (late runs in a row; 0: windows only), got {fast_down}")
        if not 0 < margin_lo <= margin_hi <= 1:
            raise UsageError(f"need 0 < margin_lo <= margin_hi <= 1, got {margin_lo} and {margin_hi}")
        if probe_late < 1:
            raise UsageError(f"probe_late must be >= 1 (late runs that end a probe), got {probe_late}")
        if late_share is not None and not 0 < late_share < 1:
            raise UsageError(f"late_share must be a share in (0, 1) or None, got {late_share!r}")
        self.late_share = late_share
        self.hint_every = hint_every if hint_every is not None else max(1, window // 4)
        if self.hint_every < 1:
            raise UsageError(f"hint_every must be >= 1 (runs between OS hints), got {hint_every}")
        self.cands = {c.key: c for c in cands}
        if len(self.cands) != len(cands):
            raise UsageError("candidates repeat a config at one thread count")
        self.budget, self.degrade = budget, degrade
        self.margin_hi, self.margin_lo, self.up_after = margin_hi, margin_lo, up_after
        self.slowdowns: dict[int, float] = {c.threads: 1.0 for c in cands}
        first, self.fits = choose(cands, budget, margin=margin_hi, degrade=degrade)
        self.current = first.key
        self._window: deque[float] = deque(maxlen=window)
        self.percentile = percentile
        self._agree = 0
        self.fast_down = fast_down
        self._late: list[float] = []
        self.probe_base = probe_after if probe_after is not None else 2 * window
        self.probe_late = probe_late
        self._probe_every = self.probe_base
        self._since_probe = 0
        self._probe: dict | None = None          # {"back": key, "runs": [...], "late": [...]} while on trial
        self.probes = {"tried": 0, "kept": 0}
        self.idle_cores = idle_cores
        self._hinted = False
        self._fails = 0                          # probes failed in a row although the OS said free
        self._over_before = False                # the last window left the margin with no late run
        self._runs = 0                           # runs observed (each of the then current candidate)
        self._entered_up: dict[str, int] = {}    # key -> run count when an up-switch entered it
        self._hold: dict[str, int] = {}          # key -> windows the last flap held it back
        self._held_until: dict[str, int] = {}    # key -> run count before which no up-switch enters it
        self._lock = threading.Lock()

    @property
    def slowdown(self) -> float:
        """The slowdown observed at the current config's thread count."""
        return self.slowdowns[self.cands[self.current].threads]

    def observe(self, config: str, latency_ms: float) -> str | None:
        """Record one run of candidate `config` (its key); returns the key to switch to, or None to stay.
        Thread-safe."""
        with self._lock:
            if config != self.current:
                return None                      # a run that started before the last switch
            self._runs += 1
            if self._probe is not None:
                return self._on_trial(latency_ms)
            self._window.append(latency_ms)
            limit = self.budget.latency_ms
            if self.fast_down and limit is not None:
                self._late = self._late + [latency_ms] if latency_ms > limit else []
                if len(self._late) >= self.fast_down:
                    self._set_slowdown(min(self._late))
                    self._late = []
                    self._window.clear()
                    return self._decide()
            if len(self._window) < self._window.maxlen:
                return self._maybe_probe()
            q = self.percentile
            late = sum(1 for v in self._window if v > limit) if limit is not None else 0
            if self.late_share is not None and limit is not None:
                if late > self.late_share * len(self._window) and late >= TAIL_MIN_LATE:
                    q = max(q, 100 * (1 - self.late_share))
            self._set_slowdown(float(np.percentile(self._window, q)))
            self._window.clear()
            self._late = []
            return self._decide(window_late=late) or self._maybe_probe()

    def _set_slowdown(self, latency_ms: float) -> None:
        cur = self.cands[self.current]
        self.slowdowns[cur.threads] = max(latency_ms / cur.p90_ms, 1e-3)

    def _decide(self, window_late: int | None = None) -> str | None:
        """Re-select after a window (`window_late`: how many of its runs were over the latency budget),
        a fast-down or a trial. A window whose percentile leaves the margin while none of its runs was late
        moves down only if the window before did too: the margin is a proxy for lateness, and one window's
        p90 of a config at the margin's edge crosses it by chance (this VM's slow spells)."""
        cur = self.cands[self.current]
        cands = list(self.cands.values())
        over = not fits(cur, self.budget, self.margin_hi, self.slowdowns)
        if over and window_late == 0 and not self._over_before:
            self._over_before = True
            self._agree = 0
            return None
        self._over_before = over and window_late == 0
        if over:
            best, self.fits = choose(cands, self.budget, margin=self.margin_hi, slowdown=self.slowdowns,
                                     degrade=True)
            self._agree = 0
            self._hold_after_leaving(cur.key)
            return self._switch(best.key)
        up = [c for c in cands if c.rank > cur.rank and fits(c, self.budget, self.margin_lo, self.slowdowns)
              and self._runs >= self._held_until.get(c.key, 0)]
        if not up:
            self._agree = 0
            return None
        self._agree += 1
        if self._agree < self.up_after:
            return None
        self._agree = 0
        target = max(up, key=lambda c: (c.rank, -c.p90_ms * _slow(c, self.slowdowns))).key
        self._entered_up[target] = self._runs
        return self._switch(target)

    def _hold_after_leaving(self, key: str) -> None:
        """Flap guard: a config left for being late within UP_RECENT windows of an up-switch into it was
        judged on a slowdown that did not hold (its own tail, a slow spell: the window p90 of a smaller
        config says little about a larger one's tail); going back up to it waits up_after windows the first
        time, doubling with each such return up to UP_HOLD_MAX windows. Kept a while, the hold resets."""
        w = self._window.maxlen
        entered = self._entered_up.pop(key, None)
        if entered is None or self._runs - entered > UP_RECENT * w:
            self._hold[key] = 0
            return
        self._hold[key] = min(max(self.up_after, 2 * self._hold.get(key, 0)), UP_HOLD_MAX)
        self._held_until[key] = self._runs + self._hold[key] * w

    def _maybe_probe(self) -> str | None:
        """Try a better candidate at another thread count whose stale slowdown alone holds it back."""
        if len(self.slowdowns) < 2 or self.budget.latency_ms is None:
            return None
        self._since_probe += 1
        free = None
        if self.idle_cores is not None and self._since_probe % self.hint_every == 0:
            free = self.idle_cores()
            self._hinted = self._hinted or free is not None
        if free is None and (self._hinted or self._since_probe < self._probe_every):
            return None                          # once the OS has answered, its answer decides
        cur = self.cands[self.current]
        here = self.slowdown                     # the hypothesis: the other count is as loaded as this one
        held = [c for c in self.cands.values() if c.threads != cur.threads and c.rank > cur.rank
                and fits(c, self.budget, self.margin_lo, here)
                and not fits(c, self.budget, self.margin_lo, self.slowdowns)]
        if not held:
            self._since_probe = 0
            return None
        target = max(held, key=lambda c: (c.rank, -c.p90_ms))
        need = target.threads - cur.threads
        if free is not None and need > 0:
            if free < 0.75 * need:
                self._fails = 0                  # busy: a co-runner; when it leaves, probe at once
                return None
            if self._since_probe < self._window.maxlen * (2**self._fails - 1):
                return None                      # free but the last probes failed (a slow spell): back off
        elif self._since_probe < self._probe_every:
            return None
        self._since_probe = 0
        self._probe = {"back": self.current, "runs": [], "late": []}
        self.probes["tried"] += 1
        self._window.clear()
        self._late = []
        return self._switch(target.key)

    def _on_trial(self, latency_ms: float) -> str | None:
        probe = self._probe
        probe["runs"].append(latency_ms)
        if latency_ms > self.budget.latency_ms:
            probe["late"].append(latency_ms)
        if len(probe["late"]) >= self.probe_late:
            self._set_slowdown(min(probe["late"]))
            self._probe = None
            self._probe_every = min(2 * self._probe_every, 4 * self.probe_base)
            self._fails = min(self._fails + 1, MAX_HINTED_BACKOFF)
            return self._switch(probe["back"])
        if len(probe["runs"]) < self._window.maxlen:
            return None
        self._set_slowdown(float(np.percentile(probe["runs"], self.percentile)))
        self._probe = None
        self._probe_every = self.probe_base
        self._fails = 0
        self.probes["kept"] += 1
        return self._decide()

    def _switch(self, key: str) -> str | None:
        if key == self.current:
            return None
        self.current = key
        self._over_before = False
        self._since_probe = 0
        return key
