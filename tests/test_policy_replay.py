"""benchmarks/policy_replay.py: the tail policy replayed over recorded latencies, on a small synthetic
recording (no engine, no hogs); the trace benchmark's arguments; `tracerun.sweep` on a real SN-Net bundle."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import edgeflex as ef

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
policy_replay = pytest.importorskip("policy_replay")


def _recording(path: Path, slow_after: float) -> Path:
    """Two configs at one thread count over 2 s: big (0.4 ms) and small (0.2 ms) against a 0.5 ms budget;
    from `slow_after` seconds on, every run takes 1.5x as long (big is then late, small is not)."""
    arrays = {}
    for key, p50 in (("big@1t", 0.4), ("small@1t", 0.2)):
        t = np.arange(0.0, 2.0, 1e-4)
        noise = np.random.default_rng(len(key)).lognormal(0.0, 0.03, len(t))
        arrays["t|" + key] = t
        arrays["l|" + key] = p50 * noise * np.where(t >= slow_after, 1.5, 1.0)
    meta = {"budget": 0.5, "seed": 0, "seconds": 2.0, "quality": {"big": 0.9, "small": 0.8}, "higher": True,
            "options": [["big@1t", 0.9, 0.4, 0.44, 1], ["small@1t", 0.8, 0.2, 0.22, 1]],
            "state": [[0, 0]] * 200}
    np.savez(path, meta=json.dumps(meta), **arrays)
    return path


def test_the_replayed_policy_stays_on_the_best_config_while_it_holds_and_leaves_when_it_does_not(tmp_path):
    mod = policy_replay.load_policy(str(ROOT / "runtime" / "tailpolicy.py"))
    quiet = policy_replay.replay(mod, np.load(_recording(tmp_path / "quiet.npz", slow_after=9.0)))
    assert quiet["within"] == 1.0 and quiet["quality"] == pytest.approx(0.9) and quiet["switches"] == 0
    slow = policy_replay.replay(mod, np.load(_recording(tmp_path / "slow.npz", slow_after=1.0)))
    # big is late from 1 s on: the policy leaves it within a few late runs and holds the stated tail
    assert slow["switches"] >= 1 and slow["within"] >= 0.99 and slow["c1"]
    assert 0.8 < slow["quality"] < 0.9


def test_replay_of_an_empty_folder_fails_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no recordings"):
        policy_replay.main(["replay", "--dir", str(tmp_path)])


@pytest.mark.parametrize("spec", ["abc", "5019-5000"])
def test_a_bad_seed_range_is_a_one_line_usage_error(spec, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        policy_replay.main(["record", "--bundle", str(tmp_path / "b.efx"), "--seeds", spec, "--dir",
                            str(tmp_path)])
    assert e.value.code == 2 and "seeds" in capsys.readouterr().err


@pytest.mark.parametrize("spec,why", [("9-3", "the range '9-3' is empty"), ("abc", "expected N, N-M"),
                                      ("5,x", "expected N, N-M"), ("5,", "expected N, N-M")])
def test_the_trace_benchmark_refuses_a_bad_seed_range_in_one_line(spec, why, capsys):
    bench = pytest.importorskip("bench_policy_traces")
    assert bench.seed_list("") == [] and bench.seed_list("5-7") == [5, 6, 7]
    assert bench.seed_list("13003,13013,7-8,13003") == [13003, 13013, 7, 8]     # a list, each seed once
    with pytest.raises(SystemExit) as e:
        bench.main(["--bundles", "x.efx", "--test-seeds", spec])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--test-seeds" in err and why in err and "Traceback" not in err


def test_the_trace_benchmark_plays_copies_of_one_policy_and_reports_how_far_they_agree(capsys):
    bench = pytest.importorskip("bench_policy_traces")
    assert bench.strategy_list("tail,tail#2") == ("tail", "tail#2")
    assert bench.policy_of("tail#2") == "tail" and bench.policy_of("window") == "window"
    for spec in ("tail,tail", "greedy", "tail#2#3", ""):
        with pytest.raises(SystemExit) as e:
            bench.main(["--bundles", "x.efx", "--strategies", spec])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--strategies" in err and "expected" in err

    def run(within, c3=True):
        return {"within": within, "quality": 0.9, "switches": 0, "c1": True, "c2": True, "c3": c3}

    results = [{"strategies": {"tail": run(0.990), "tail#2": run(0.985), "window": run(0.9)}},
               {"strategies": {"tail": run(0.995), "tail#2": run(0.995, c3=False), "window": run(0.9)}}]
    lines = bench.copies(results, ("tail", "tail#2", "window"))
    assert len(lines) == 1      # only the two copies of tail are compared
    assert "met on 2 and 1" in lines[0] and "agree on all three on 1" in lines[0]
    assert "per criterion 2 / 2 / 1" in lines[0] and "0.50 (max)" in lines[0]
    assert "holds 0" not in lines[0]        # no chunks kept (older JSON): no interval
    # with the chunks kept: on how many traces the interval of the copies' difference holds 0
    same, apart = [[990, 1000]] * 8, [[999, 1000]] * 8
    results[0]["chunks"] = {"tail": same, "tail#2": same}
    results[1]["chunks"] = {"tail": same, "tail#2": apart}
    for i, r in enumerate(results):
        r["seed"] = i
    line = bench.copies(results, ("tail", "tail#2"))[0]
    assert "holds 0 on 1 of 2 traces" in line


class _Spy:
    """A real Runtime, with the time of each switch and of each run's start written down."""

    def __init__(self, rt):
        self.rt, self.turns = rt, []

    def switch(self, name, threads):
        self.rt.switch(name, threads=threads)
        self.turns.append((f"{name}@{threads}t", time.perf_counter(), []))

    def run(self, x):
        self.turns[-1][2].append(time.perf_counter())
        return self.rt.run(x)

    @property
    def threads(self):
        return self.rt.threads

    def run_config(self, x):
        self.turns[-1][2].append(time.perf_counter())
        return self.rt.run_config(x)


def test_the_sweep_samples_each_static_config_warm_leaving_out_the_runs_just_after_a_switch(snnet_bundle):
    """A static config never switches: the sweep keeps only runs that start `lead_ms` or more after its
    turn's switch (before, turns of 4 runs kept runs 2-4, a fraction of a millisecond after the switch)."""
    from edgeflex.devices.loadtrace import parse_spec
    from edgeflex.runtime import tracerun

    rt = ef.Runtime(snnet_bundle[1], threads=1)
    x = np.random.default_rng(0).standard_normal((1, *rt.inputs[0].shape[1:])).astype(np.float32)
    spy = _Spy(rt)
    options = [("s050", 1), ("s100", 1)]
    out = tracerun.sweep(spy, parse_spec("idle:0.3"), None, x, options, turn_ms=8.0, lead_ms=3.0)
    assert set(out) == {"s050@1t", "s100@1t"}
    assert len(spy.turns) >= 10 and [k for k, _, _ in spy.turns[:4]] == ["s050@1t", "s100@1t"] * 2
    for key in out:
        offsets = [1e3 * (r - t0) for k, t0, runs in spy.turns if k == key for r in runs]
        kept = len(out[key]["latency_ms"])
        # the sweep times its own `since` just before the spy's run starts: within a fraction of a ms
        assert sum(o >= 3.2 for o in offsets) <= kept <= sum(o >= 2.8 for o in offsets)
        assert 0 < kept < len(offsets)
        assert np.all(np.diff(out[key]["t"]) >= 0) and out[key]["t"][-1] < 0.3
    for _, t0, runs in spy.turns[:-1]:      # a turn ends once turn_ms have passed (the last: with the trace)
        assert 1e3 * (runs[-1] - t0) < 8.0 + 5.0
    with pytest.raises(ValueError, match="lead_ms"):
        tracerun.sweep(spy, parse_spec("idle:0.1"), None, x, options, turn_ms=5.0, lead_ms=5.0)


def test_the_trace_benchmark_refuses_a_lead_longer_than_a_turn_in_one_line(capsys):
    bench = pytest.importorskip("bench_policy_traces")
    with pytest.raises(SystemExit) as e:
        bench.main(["--bundles", "x.efx", "--turn-ms", "5", "--lead-ms", "6"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--lead-ms" in err and "expected" in err


def test_alone_plays_each_static_config_over_the_whole_stretch_one_after_another(snnet_bundle):
    """What a static config meets: each option runs the whole stretch by itself (no turns), from
    options[first] on, its first lead_ms left out."""
    from edgeflex.devices.loadtrace import parse_spec
    from edgeflex.runtime import tracerun

    rt = ef.Runtime(snnet_bundle[1], threads=1)
    x = np.random.default_rng(0).standard_normal((1, *rt.inputs[0].shape[1:])).astype(np.float32)
    spy = _Spy(rt)
    options = [("s050", 1), ("s100", 1)]
    out = tracerun.alone(spy, parse_spec("idle:0.4"), None, x, options, span=(0.2, 0.35), lead_ms=20.0,
                         first=1)
    assert list(out) == ["s050@1t", "s100@1t"]                      # in the options' order
    assert [k for k, _, _ in spy.turns] == ["s100@1t", "s050@1t"]   # played from options[first] on, once each
    for key, t0, runs in spy.turns:
        assert 0.13 < runs[-1] - t0 < 0.17                          # the whole 0.15 s stretch, alone
        t = out[key]["t"]
        assert len(t) == len(out[key]["latency_ms"]) > 10
        assert t.min() >= 0.2 + 0.020 and t.max() < 0.35            # its first 20 ms left out
        assert len(t) < len(runs)


def test_trim_leaves_out_a_plays_first_runs_in_every_field_alike():
    """The runs after other strategies' turn: left out of each field of a play record, lists and arrays,
    keeping the rest aligned (a config list one longer than the latencies would shift every run's config)."""
    from edgeflex.runtime import tracerun

    rec = {"t": np.array([0.50, 0.502, 0.51, 0.6]), "latency_ms": np.array([9.0, 8.0, 1.0, 2.0]),
           "config": ["a@1t", "b@1t", "c@2t", "d@2t"], "threads": np.array([1, 1, 2, 2]),
           "load": np.array([[0, 0], [1, 0], [1, 1], [0, 1]])}
    out = tracerun.trim(rec, 0.505)
    assert out["config"] == ["c@2t", "d@2t"]
    assert out["latency_ms"].tolist() == [1.0, 2.0] and out["threads"].tolist() == [2, 2]
    assert out["load"].tolist() == [[1, 1], [0, 1]] and out["t"].tolist() == [0.51, 0.6]
    assert tracerun.trim(rec, 0.0)["config"] == rec["config"]
    assert tracerun.trim(rec, 1.0)["latency_ms"].size == 0


def test_turns_cover_the_trace_in_spans_of_the_turn_and_zero_means_one_span():
    """The spans the trace benchmark's chunks and `edgeflex trace --turn` play: back to back, the last
    shorter."""
    from edgeflex.runtime import tracerun

    assert tracerun.turns(1.2, 0.5) == [(0.0, 0.5), (0.5, 1.0), (1.0, 1.2)]
    assert tracerun.turns(1.0, 0.5) == [(0.0, 0.5), (0.5, 1.0)]
    assert tracerun.turns(0.8, 0) == [(0.0, 0.8)]
    # phases summed in floating point: no sliver of a turn at the end (it held no run, an empty chunk)
    spans = tracerun.turns(1.0 + 1e-12, 0.5)
    assert len(spans) == 2 and spans[-1][1] == 1.0 + 1e-12
    assert tracerun.turns(0.3, 0.5) == [(0.0, 0.3)]


def test_the_sweep_bias_table_puts_each_sweeps_difference_from_alone_in_its_own_column(capsys):
    bias = pytest.importorskip("bench_sweep_bias")
    rows = [{"seed": 1, "budget_ms": 0.3, "alone": {"a@1t": 0.99, "b@2t": 0.50},
             "swept": {"old": {"a@1t": 0.90, "b@2t": 0.98}, "new": {"a@1t": 0.99, "b@2t": 0.60}}}]
    lines = bias.table(rows, "sn.efx")
    rows_out = [[c.strip() for c in ln.split("|")[1:-1]] for ln in lines if ln.startswith("| ")][1:]
    assert rows_out[0] == ["1", "0.300", "a@1t", "99.00%", "-9.00", "+0.00"]
    assert rows_out[1] == ["1", "0.300", "b@2t", "50.00%", "+48.00", "+10.00"]
    cells = {r[0]: r[1:] for r in rows_out}
    assert cells["**old**"][3].startswith("mean +19.50") and "largest +48.00" in cells["**old**"][3]
    assert cells["**old**"][4] == "" and cells["**new**"][3] == ""
    assert cells["**new**"][4].startswith("mean +5.00") and "mean abs 5.00" in cells["**new**"][4]
    with pytest.raises(SystemExit) as e:
        bias.main(["--bundles", "x.efx", "--turn-ms", "5", "--lead-ms", "5"])
    assert e.value.code == 2 and "--lead-ms" in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_trace_benchmark_runs_end_to_end_and_pools_repeated_plays(snnet_bundle, tmp_path, capsys):
    """bench_policy_traces.main on the small SN-Net, a 0.4 s trace in 0.2 s chunks, played twice: every static
    (config, threads) and the policy have samples and shares; the report says the plays were pooled; the
    control `fixed` ran the static best alone, never switching. `--repeats 0` is refused in one line."""
    import shutil

    bench = pytest.importorskip("bench_policy_traces")
    with pytest.raises(SystemExit) as e:
        bench.main(["--bundles", "x.efx", "--repeats", "0"])
    assert e.value.code == 2 and "--repeats 0: expected" in capsys.readouterr().err
    bundle = tmp_path / "sn.efx"
    shutil.copytree(snnet_bundle[1], bundle)
    out, js = tmp_path / "R.md", tmp_path / "r.json"
    assert bench.main(["--bundles", str(bundle), "--seconds", "0.4", "--chunk", "0.2", "--repeats", "2",
                       "--train-seeds", "", "--test-seeds", "5", "--profile-seconds", "0.02",
                       "--strategies", "tail,fixed", "--pinned", "--json", str(js), "--out", str(out)]) == 0
    r = json.loads(js.read_text())["results"]["sn.efx"]["test"][0]
    assert r["seed"] == 5 and set(r["strategies"]) == {"tail", "fixed"}
    fixed = r["strategies"]["fixed"]
    assert set(fixed["runs_by_config"]) == {r["static_best"]} and fixed["switches"] == 0
    assert "sampling" not in fixed and isinstance(fixed["c2"], bool)
    assert len(r["static"]) == 2 * len(ef.Runtime(bundle, threads=1).configs)     # every config at 2 and 1
    assert all(v["samples"] > 0 and 0 <= v["within"] <= 1 for v in r["static"].values())
    assert r["strategies"]["tail"]["requests"] > 0
    report = out.read_text()
    assert "played 2 times (pooled per strategy)" in report
    # per chunk (2 chunks x 2 plays) the runs within budget and the runs: they add up to the shares above
    ch = r["chunks"]
    assert len(ch["tail"]) == 4 and sum(n for _, n in ch["tail"]) == r["strategies"]["tail"]["requests"]
    for k, v in r["static"].items():
        got = ch["static"][k]
        assert len(got) == 4 and sum(n for _, n in got) == v["samples"]
        assert sum(w for w, _ in got) / v["samples"] == pytest.approx(v["within"])
    assert "95 % interval" in report and "beyond noise" in report
    # the static best also played on the policy's own runtime, per chunk like the rest
    assert 0 <= r["pinned"]["tail"] <= 1 and len(ch["tail:pinned"]) == 4
    assert "on tail's runtime" in report and "on the static runtime" in report
    assert "- fixed (the static best on a runtime of its own, no policy): criterion 2 as stated met" in report


def test_pinned_sets_the_policy_aside_for_a_turn_and_gives_it_back_as_it_was(profiled_snnet):
    """tracerun.pinned: inside, the runtime runs the named config with no policy (the policy sees none of
    those runs); after, the policy, its config, its sampling count and its pending observation are back."""
    from edgeflex.runtime import tracerun

    rt = ef.Runtime(profiled_snnet, threads=1)
    names = [c.name for c in rt.configs]
    rt.set_budget(ef.Budget(latency_ms=1000.0), policy="tail")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for _ in range(30):
        rt.run(x)
    guard = rt.adapter
    before = (rt.config, guard._runs, rt._free, rt._pending)
    other = next(n for n in names if n != rt.config)
    with tracerun.pinned(rt, other, 1) as pinned_rt:
        assert pinned_rt.adapter is None
        for _ in range(20):
            assert pinned_rt.run_config(x)[0] == other
    assert rt.adapter is guard and (rt.config, guard._runs, rt._free, rt._pending) == before
    rt.run(x)
    assert guard._runs >= before[1]          # the policy goes on observing its own config


def test_a_gap_is_a_miss_beyond_noise_only_where_its_whole_interval_misses():
    """tracerun.paired_gaps resamples a trace's chunks alike for all; beyond_noise marks criterion 2
    missed only when the whole interval of the share minus the static best's lies under -0.3 points,
    criterion 3 when a better static is above over its whole interval."""
    from edgeflex.runtime import tracerun

    bench = pytest.importorskip("bench_policy_traces")
    same = [[990, 1000]] * 12
    g, lo, hi = tracerun.paired_gaps(same, {"b": same}, seed=1)["b"]
    assert g == 0 and lo == hi == 0
    # b is 2 points better in every chunk: the gap is +2 with no spread; a chunk-to-chunk spread widens it
    better = [[1000, 1000]] * 6 + [[995, 1000]] * 6
    worse = [[980, 1000]] * 6 + [[975, 1000]] * 6
    g, lo, hi = tracerun.paired_gaps(worse, {"b": better}, seed=1)["b"]
    assert g == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    noisy = [[1000, 1000], [960, 1000]] * 6
    g, lo, hi = tracerun.paired_gaps(same, {"b": noisy}, seed=1)["b"]
    assert g == pytest.approx(-1.0) and lo < -1.5 and hi > -0.5

    def result(policy, best, other, other_quality):
        count = lambda c: sum(w for w, _ in c) / sum(n for _, n in c)     # noqa: E731
        return {"seed": 3, "static_best": "big@2t",
                "strategies": {"tail": {"within": count(policy), "quality": 0.8}},
                "static": {"big@2t": {"within": count(best), "quality": 0.9},
                           "mid@1t": {"within": count(other), "quality": other_quality}},
                "chunks": {"tail": policy, "static": {"big@2t": best, "mid@1t": other}}}

    # 2 points under the static best in every chunk: a miss of criterion 2 beyond noise, and of criterion 3
    # (the static best is of better quality, its share above over the whole interval)
    b = bench.beyond_noise(result(worse, better, worse, 0.7), "tail", higher=True)
    assert b["gap"][0] == pytest.approx(-2.0) and not b["c2"] and not b["c3"]
    # 1 point under on average, but as noisy as that: within noise
    b = bench.beyond_noise(result(noisy, same, worse, 0.7), "tail", higher=True)
    assert b["gap"][0] == pytest.approx(-1.0) and b["c2"]
    # a static of better quality (0.85 > 0.8) clearly above the policy's share: criterion 3 missed; of worse
    # quality, or lower is better: not
    assert not bench.beyond_noise(result(worse, worse, better, 0.85), "tail", higher=True)["c3"]
    assert bench.beyond_noise(result(worse, worse, better, 0.75), "tail", higher=True)["c3"]
    assert bench.beyond_noise(result(worse, worse, better, 0.85), "tail", higher=False)["c3"]
    assert bench.beyond_noise({"seed": 1, "chunks": None}, "tail", higher=True) is None


def test_the_trace_benchmark_plays_another_revisions_runtime_beside_this_ones(snnet_bundle, tmp_path, capsys):
    """`--base FILE` with strategy `base`: the tail policy on FILE's Runtime (a copy of runtime/runtime.py),
    scored like any strategy; each without the other, a missing file or one without a Runtime: one line."""
    import shutil

    bench = pytest.importorskip("bench_policy_traces")
    for argv, why in ((["--strategies", "tail,base"], "go together"),
                      (["--strategies", "tail", "--base", "b.py"], "go together"),
                      (["--strategies", "tail,bas"], "'base' (with --base)")):
        with pytest.raises(SystemExit) as e:
            bench.main(["--bundles", "x.efx", *argv])
        assert e.value.code == 2 and why in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such file"):
        bench.base_runtime(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(SystemExit, match="defines no Runtime class"):
        bench.base_runtime(tmp_path / "empty.py")
    base = tmp_path / "base_runtime.py"
    from edgeflex.runtime import runtime as this

    shutil.copy(this.__file__, base)
    cls = bench.base_runtime(base)
    assert cls is not ef.Runtime and cls.__name__ == "Runtime"
    bundle = tmp_path / "sn.efx"
    shutil.copytree(snnet_bundle[1], bundle)
    js = tmp_path / "r.json"
    assert bench.main(["--bundles", str(bundle), "--seconds", "0.3", "--chunk", "0.3", "--train-seeds", "",
                       "--test-seeds", "5", "--profile-seconds", "0.02", "--strategies", "tail,base",
                       "--base", str(base), "--json", str(js), "--out", str(tmp_path / "R.md")]) == 0
    r = json.loads(js.read_text())["results"]["sn.efx"]["test"][0]
    assert set(r["strategies"]) == {"tail", "base"}
    assert r["strategies"]["base"]["requests"] > 0 and "sampling" in r["strategies"]["base"]
