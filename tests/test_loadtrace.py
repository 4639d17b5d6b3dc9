"""Load traces for the budget policy: reproducible from a seed, inside the documented ranges, parsed specs."""

import time

import numpy as np
import pytest

from edgeflex.devices import loadtrace as lt
from edgeflex.errors import UsageError


def test_same_seed_same_trace_other_seed_other_trace():
    a, b, c = lt.generate(7, 20, 2), lt.generate(7, 20, 2), lt.generate(8, 20, 2)
    assert a == b and a.describe() == b.describe()
    assert a != c
    ts = np.linspace(0, 20, 2001)
    assert [a.state(t) for t in ts] == [b.state(t) for t in ts]


@pytest.mark.parametrize("cores", [1, 2, 4])
def test_generated_traces_stay_in_their_ranges(cores):
    kinds, batches, us, periods = set(), set(), [], []
    for seed in range(60):
        tr = lt.generate(seed, 15.0, cores)
        assert tr.seconds == pytest.approx(15.0)
        assert tr.batch in lt.BATCHES and 0 <= tr.budget_u <= 1
        batches.add(tr.batch)
        us.append(tr.budget_u)
        for p in tr.phases:
            assert 0 < p.seconds <= lt.PHASE_S[1] and 0 <= p.alu + p.mem <= cores
            assert 0 <= p.duty <= 1 and (p.duty_end is None or 0 <= p.duty_end <= 1)
            kinds.add("idle" if p.alu + p.mem == 0 else "alu" if not p.mem else "mem" if not p.alu else "mix")
            if p.duty < 1:
                periods.append(p.period_s)
                assert lt.PERIOD_S[0] <= p.period_s <= lt.PERIOD_S[1]
        for t in np.linspace(0, 15, 301):
            alu, mem = tr.state(t)
            assert 0 <= alu + mem <= cores
    assert {"idle", "alu", "mem"} <= kinds and (cores == 1 or "mix" in kinds)
    assert batches > {1} and min(us) < 0.1 and max(us) > 0.9       # tight and loose budgets both drawn
    assert min(periods) < 0.3 and max(periods) > 2                   # sub-second and multi-second cycles


def test_duty_cycle_and_drift_are_what_the_phase_says():
    p = lt.Phase(10.0, alu=1, duty=0.25, period_s=0.4)
    on = np.mean([p.active(t) for t in np.linspace(0, 10, 10001)])
    assert on == pytest.approx(0.25, abs=0.01)
    drift = lt.Phase(10.0, alu=1, duty=0.0, duty_end=1.0, period_s=0.1)
    ts = np.linspace(0, 10, 10001)
    first, last = (np.mean([drift.active(t) for t in half]) for half in (ts[:5000], ts[5000:]))
    assert first == pytest.approx(0.25, abs=0.03) and last == pytest.approx(0.75, abs=0.03)


def test_budget_spans_tight_to_loose():
    idle = {"small": 0.2, "mid": 0.3, "big": 0.5}
    tight = lt.LoadTrace((lt.Phase(1.0),), 2, budget_u=0.0).budget_ms(idle)
    loose = lt.LoadTrace((lt.Phase(1.0),), 2, budget_u=1.0).budget_ms(idle)
    assert tight == pytest.approx(0.24) and loose == pytest.approx(0.8)
    with pytest.raises(UsageError, match="idle latencies"):
        lt.LoadTrace((lt.Phase(1.0),), 2).budget_ms([])


def test_parse_spec_reads_phases_and_seeds_and_refuses_nonsense():
    tr = lt.parse_spec("idle:4,alu1:6,mem1x0.5/0.2:5,alu1+mem1:2,alu2x0.2-0.9/1:3", cores=2)
    assert [p.seconds for p in tr.phases] == [4, 6, 5, 2, 3] and tr.seconds == 20
    assert tr.state(1.0) == (0, 0) and tr.state(5.0) == (1, 0) and tr.state(16.5) == (1, 1)
    assert tr.state(10.05) == (0, 1) and tr.state(10.15) == (0, 0)      # 50 % of 0.2 s periods
    assert tr.phases[4].duty_end == 0.9
    assert lt.parse_spec("seed:3:12", cores=2) == lt.generate(3, 12, 2, batch=1)
    for bad in ("alu1", "cpu1:3", "seed:x", "alu3:2", "idle:0"):
        with pytest.raises(UsageError, match="--load|cores|seconds"):
            lt.parse_spec(bad, cores=2)


def test_player_runs_and_stops_the_hogs():
    import os

    core = sorted(os.sched_getaffinity(0))[-1]
    with lt.LoadPlayer([core]) as player:
        proc = player.alu_procs[0]

        def cpu_s() -> float:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = cpu_s()
        time.sleep(0.2)
        assert cpu_s() - before < 0.03                      # stopped
        player.set(1, 0)
        time.sleep(0.3)
        player.set(0, 0)
        ran = cpu_s() - before
        assert ran > 0.05                                   # it ran while continued
        time.sleep(0.2)
        assert cpu_s() - before - ran < 0.03                # and stopped again
        player.set(0, 1)                                    # the memory hog, on the same core
        assert player.on == (0, 1)
    with lt.LoadPlayer([core], mem=False) as player, pytest.raises(UsageError, match="memory hogs"):
        player.set(0, 1)
