"""benchmarks/policy_replay.py: the tail policy replayed over recorded latencies, on a small synthetic
recording (no engine, no hogs)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

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


@pytest.mark.parametrize("spec,why", [("9-3", "the range is empty"), ("abc", "expected N or N-M")])
def test_the_trace_benchmark_refuses_a_bad_seed_range_in_one_line(spec, why, capsys):
    bench = pytest.importorskip("bench_policy_traces")
    assert bench.seed_list("") == [] and bench.seed_list("5-7") == [5, 6, 7]
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
