"""A budget policy from measured quantities (issue 20): `TailGuard` holds a stated tail (by default
p99 <= budget: at most `late_share` = 1 % of requests late) whenever some config can, before quality.

What it measures, and what it decides from it:

- **Is the current config breaking the stated tail?** A binomial test on its own recent runs: k late runs
  within the last m (m spanning back to each earlier late run) are evidence when P(X >= k | m,
  late_share) < `alpha` (1e-3). Two late runs in a row break a 1 % tail at once; one late run in a
  hundred never does. No window length, margin or count of late runs to tune: they follow from the
  stated share.
- **How slow is this thread count now?** S = (the recent runs' (1 - late_share) quantile) / (the current
  config's profiled p50); with fewer runs than 1 / late_share the quantile is their maximum, so a short
  record errs slow. Every candidate's tail is then predicted as its profiled p50 x S of its thread count
  x its own correction (the ratio of what a trial of it showed to what was predicted; a config that
  slows more than the others under this load learns it). Before any run, S is the profile's own tail
  ratio, p99 / p50, pooled per thread count (the median over its configs): a profile's p99 is a few runs
  out of hundreds, and one slow spell of a shared machine moves one config's but not the median.
- **What a move costs.** Any move whose outcome is predicted (up in quality, or onto a thread count not
  measured since its last `1 / late_share` runs... i.e. stale) is a *trial*: it may fail and cost late
  requests. Trials spend a *late allowance*: it grows by `late_share / 2` per request (half of what the
  stated tail allows: the other half is for the load's surprises) and shrinks by one per late request;
  a trial starts only when the allowance covers what failed trials have cost so far on average (late
  requests from the switch to the way back, the switch's cold runs included). A stable machine pays for
  no trials; a load that keeps changing gets as many as the tail can afford.
- **Down moves are not trials**: when the current config breaks the tail, the policy moves to the
  best-ranked candidate predicted to hold it (a stale thread count is predicted at the current count's
  slowdown, unless the allowance pays for trying it as if idle), else to the fastest predicted.

`guarantee=False` lifts the allowance: trials whenever a better config is predicted to fit (quality
first). Pure logic over latencies (no clock, no engine), like `policy.Adapter`, so tests drive it exactly.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeflex.errors import UsageError

from .policy import Budget, BudgetError


@dataclass(frozen=True)
class Option:
    """One (config, thread count) the policy may run: quality rank (higher is better), profiled p50 and
    tail (the p99 the budget is judged on) in ms at that thread count."""

    key: str
    rank: float
    p50_ms: float
    tail_ms: float
    threads: int = 0


def binom_sf(k: int, m: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(m, p)."""
    if k <= 0:
        return 1.0
    if k > m:
        return 0.0
    return float(max(0.0, 1.0 - sum(math.comb(m, i) * p**i * (1 - p) ** (m - i) for i in range(k))))


class TailGuard:
    """`TailGuard(options, budget, late_share=0.01, alpha=1e-3, guarantee=True, idle_cores=None)`;
    `observe(key, latency_ms)` -> the key to switch to, or None. See the module docstring."""

    def __init__(self, options: list[Option], budget: Budget, *, late_share: float = 0.01,
                 alpha: float = 1e-3, guarantee: bool = True,
                 idle_cores: Callable[[], float | None] | None = None):
        if budget.latency_ms is None:
            raise UsageError("TailGuard needs a latency budget (Budget(latency_ms=...))")
        if not 0 < late_share < 0.5:
            raise UsageError(f"late_share must be in (0, 0.5) (the share of requests allowed late), got "
                             f"{late_share!r}")
        if not 0 < alpha < 0.5:
            raise UsageError(f"alpha must be in (0, 0.5) (the test's false-alarm level), got {alpha!r}")
        if not options:
            raise BudgetError("no config has a latency profile on this device; run `edgeflex profile` first")
        self.opts = {o.key: o for o in options}
        if len(self.opts) != len(options):
            raise UsageError("options repeat a config at one thread count")
        self.budget = budget.latency_ms
        self.q, self.alpha, self.guarantee = late_share, alpha, guarantee
        self.window = math.ceil(1 / late_share)        # runs in which the stated tail is observable
        self.idle_cores = idle_cores
        counts = {o.threads for o in options}
        self._idle_s = {t: float(np.median([o.tail_ms / o.p50_ms for o in options if o.threads == t]))
                        for t in counts}                # the profile's p99 / p50, pooled per count
        self.slowdowns: dict[int, float] = dict(self._idle_s)
        self._measured_at: dict[int, int] = dict.fromkeys(counts, 0)   # run count of each S's last update
        self.correction: dict[str, float] = dict.fromkeys(self.opts, 1.0)
        self._runs = 0
        self.allowance = 2.0                            # one trial's worth (the first trial cost's guess)
        self.trial_costs: list[int] = []                # late runs each failed trial cost
        self._set_trial_cost()
        self._regrow = late_share / 2                   # allowance per request: half the stated share
        self._fade_every = 10 * self.window
        self._trial_every = max(1, self.window // 4)
        self.switches = 0
        self.probes = {"tried": 0, "kept": 0}
        first = self._best(lambda o: o.p50_ms * self._idle_s[o.threads])
        self.fits = first is not None
        self.current = (first or self._fastest(lambda o: o.p50_ms)).key
        self._enter(self.current, trial=None)
        self._lock = threading.Lock()

    # --- predictions -------------------------------------------------------------------------------------

    def _stale(self, threads: int) -> bool:
        return self._runs - self._measured_at[threads] > self.window

    def predict(self, o: Option, *, idle_if_stale: bool = False) -> float:
        """o's tail under the load measured now (ms)."""
        cur = self.opts[self.current]
        if o.threads == cur.threads or not self._stale(o.threads):
            s = self.slowdowns[o.threads]
        else:                                       # not seen lately: as this count, or idle on trial
            s = self._idle_s[o.threads] if idle_if_stale else self.slowdowns[cur.threads]
        return o.p50_ms * s * self.correction[o.key]

    def _best(self, tail: Callable[[Option], float]) -> Option | None:
        ok = [o for o in self.opts.values() if tail(o) <= self.budget]
        return max(ok, key=lambda o: (o.rank, -tail(o))) if ok else None

    def _fastest(self, tail: Callable[[Option], float]) -> Option:
        return min(self.opts.values(), key=tail)

    @property
    def slowdown(self) -> float:
        return self.slowdowns[self.opts[self.current].threads]

    def _set_trial_cost(self) -> None:
        """Late requests a failed trial costs, as measured (2 before any: the test's two in a row); the
        allowance is capped at two trials' worth, so a long quiet spell does not pay for a burst of them."""
        self.trial_cost = float(np.mean(self.trial_costs)) if self.trial_costs else 2.0
        self._cap = max(2 * self.trial_cost, 1.0)

    # --- observing ---------------------------------------------------------------------------------------

    def _enter(self, key: str, trial: dict | None) -> None:
        self.current = key
        self._threads = self.opts[key].threads
        self._recent: deque[float] = deque(maxlen=self.window)
        self._late_at: deque[int] = deque()          # indices (run counts) of late runs of this stint
        self._stint = 0
        self._trial = trial

    def observe(self, config: str, latency_ms: float) -> str | None:
        # the hot path (every request; a FITS config runs in ~20 us): plain attribute arithmetic only
        with self._lock:
            if config != self.current:
                return None                          # a run that started before the last switch
            runs = self._runs = self._runs + 1
            stint = self._stint = self._stint + 1
            late = latency_ms > self.budget
            allowance = self.allowance + self._regrow - late
            self.allowance = self._cap if allowance > self._cap else -self._cap if allowance < -self._cap \
                else allowance
            if stint > 1 or not self.switches:          # a switch's first run measures the switch
                self._recent.append(latency_ms)
            self._measured_at[self._threads] = runs
            if runs % self._fade_every == 0:              # corrections fade: loads change
                self.correction = {k: 1 + (c - 1) / 2 for k, c in self.correction.items()}
            if late:
                if self._trial is not None:
                    self._trial["late"] += 1
                self._late_at.append(runs)
                while self._late_at and runs - self._late_at[0] >= self.window:
                    self._late_at.popleft()
                if self._breaks_tail():
                    return self._leave()
            elif self._trial is not None and stint >= self.window:
                self._trial_kept()
            if stint % self._trial_every == 0:
                return self._maybe_trial()
            return None

    def _measure(self) -> None:
        """The current thread count's slowdown from the current config's recent runs (at decisions only:
        a quantile per run would cost more than a sub-millisecond run can spare)."""
        if self._recent:
            cur = self.opts[self.current]
            self.slowdowns[cur.threads] = self._quantile() / cur.p50_ms

    def _quantile(self) -> float:
        r = np.fromiter(self._recent, float)
        if len(r) < self.window:
            return float(r.max())
        return float(np.quantile(r, 1 - self.q))

    def _breaks_tail(self) -> bool:
        """k late runs within the last m, m back to each earlier late run: P(X >= k) < alpha?"""
        lates = list(self._late_at)
        for i, start in enumerate(lates):
            k, m = len(lates) - i, self._runs - start + 1
            if binom_sf(k, m, self.q) < self.alpha:
                return True
        return False

    # --- moving ------------------------------------------------------------------------------------------

    def _leave(self) -> str | None:
        """The current config breaks the tail: down to the best predicted to hold it."""
        cur = self.opts[self.current]
        trial = self._trial
        self._measure()
        if trial is not None:                        # a failed trial: learn its cost and its error
            self.trial_costs.append(trial["late"])
            self._set_trial_cost()
            seen = self.slowdowns[cur.threads] * self.correction[cur.key]
            if trial["predicted"] > 0:
                self.correction[cur.key] = max(1.0, self.correction[cur.key] * seen
                                               / max(trial["predicted"] / cur.p50_ms, 1e-9))
        others = [o for o in self.opts.values() if o.key != cur.key]
        tail = self.predict
        target = self._best(lambda o: tail(o) if o.key != cur.key else math.inf)
        trial_target = None
        if self._affords() and any(self._stale(o.threads) for o in others):
            idle = self._best(lambda o: self.predict(o, idle_if_stale=True) if o.key != cur.key
                              else math.inf)
            if idle is not None and self._stale(idle.threads) \
                    and (target is None or idle.rank > target.rank):
                trial_target = idle
        if trial_target is not None:
            return self._switch(trial_target, trial=True)
        if target is None:
            target = self._fastest(lambda o: tail(o) if o.key != cur.key else math.inf)
            if tail(target) >= tail(cur):
                self._late_at.clear()                 # nothing is faster: stay, and judge afresh
                return None
        return self._switch(target, trial=False)

    def _affords(self) -> bool:
        return not self.guarantee or self.allowance >= self.trial_cost

    def _maybe_trial(self) -> str | None:
        """Up in quality, or onto a stale thread count, when predicted to hold the tail and affordable."""
        if self._trial is not None or self._stint < self.window // 4 or not self._affords():
            return None
        self._measure()
        cur = self.opts[self.current]
        free = self.idle_cores() if self.idle_cores is not None else None

        here = self.predict(cur)

        def tail(o: Option) -> float:                 # better, or as good and faster (another count)
            if o.rank < cur.rank or o.key == cur.key:
                return math.inf
            stale = o.threads != cur.threads and self._stale(o.threads)
            if stale and free is not None and free < 0.75 * max(0, o.threads - cur.threads):
                return math.inf                       # the OS says its extra cores are busy
            t = self.predict(o, idle_if_stale=stale and free is not None)
            return t if o.rank > cur.rank or t < here else math.inf

        target = self._best(tail)
        if target is None:
            return None
        return self._switch(target, trial=True)

    def _trial_kept(self) -> None:
        self.probes["kept"] += 1
        self.correction[self.current] = max(1.0, (1 + self.correction[self.current]) / 2)
        self._trial = None

    def _switch(self, target: Option, *, trial: bool) -> str | None:
        if target.key == self.current:
            return None
        if trial:
            self.probes["tried"] += 1
        predicted = self.predict(target, idle_if_stale=trial)
        self.switches += 1
        self._enter(target.key, {"late": 0, "predicted": predicted} if trial else None)
        return target.key
