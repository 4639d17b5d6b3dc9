"""`edgeflex trace` run as a user would (a subprocess) on a real exported SN-Net bundle: a short load trace,
its table and PNG, and one-line errors for bad arguments."""

import subprocess
import sys

import pytest
from conftest import copy_profiled

import edgeflex as ef


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeflex", *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=300)


@pytest.fixture(scope="module")
def profiled(profiled_snnet, tmp_path_factory):
    return copy_profiled(profiled_snnet, tmp_path_factory, "trace")


def test_trace_plays_a_load_and_writes_table_and_png(profiled, tmp_path):
    png = tmp_path / "t.png"
    budget = ef.Runtime(profiled, threads=1).latency_profile()["configs"]["s100"]["p90_ms"] * 1.5
    r = cli("trace", profiled, "--budget-ms", budget, "--load", "idle:0.4,alu1:0.4", "--threads", "1",
            "--out", png, "--turn", "0.2")          # the three take turns of 0.2 s: four turns each
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("load idle:0.4,alu1:0.4 (0.8 s)")
    rows = [ln for ln in lines if ln.startswith(("adaptive (tail)", "static best", "static smallest"))]
    assert len(rows) == 3
    shares = []
    for row in rows:
        requests, within = row.split(")")[-1].split()[:2]
        assert int(requests) > 10 and 0 <= float(within.rstrip("%")) <= 100
        shares.append(float(within.rstrip("%")))
    # the adaptive minus the static best, with its spread over the four turns
    gap = next(ln for ln in lines if ln.startswith("adaptive minus static best:"))
    points = float(gap.split(":")[1].split()[0])
    lo, hi = (float(v) for v in gap.split("[")[1].split("]")[0].split(","))
    assert points == pytest.approx(shares[0] - shares[1], abs=0.02) and lo <= hi
    assert "over the 4 turns" in gap
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--load", "alu9:2"], "needs 9 cores"),
    (["--load", "cpu1:2"], "cannot read 'cpu1:2'"),
    (["--load", "idle:1", "--out", "x.jpg"], "expected a .png"),
    (["--load", "idle:1", "--budget-ms", "-1"], "budget-ms"),
    (["--load", "idle:1", "--turn", "-1"], "--turn -1: expected 0"),
    (["--load", "idle:1", "--turn", "nan"], "--turn nan: expected 0"),
])
def test_trace_refuses_bad_arguments_in_one_line(profiled, args, message):
    base = {"--budget-ms": "1.0"}
    argv = ["trace", profiled, *args] + [v for k, v in base.items() for v in (k, v) if k not in args]
    r = cli(*argv)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_trace_without_a_profile_says_to_profile(snnet_bundle, tmp_path):
    r = cli("trace", snnet_bundle[1], "--budget-ms", 1.0, "--load", "idle:0.2", "--threads", "1",
            "--out", tmp_path / "t.png")
    assert r.returncode == 2 and "edgeflex profile" in r.stderr
