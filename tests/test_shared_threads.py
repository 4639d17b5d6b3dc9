"""`Runtime(shared_threads=True)`: every ONNX Runtime session of the process on ORT's one global pool. ORT
sets that pool once per process and then refuses sessions with their own pools, so each check that turns it
on runs in a child process; the parent holds the per-session reference."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import edgeflex as ef

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import edgeflex as ef
    from edgeflex.runtime.backends import onnxruntime as eo

    path, out = sys.argv[1], sys.argv[2]
    x = np.load(out + ".x.npy")
    rt = ef.Runtime(path, threads=2, fused=False, shared_threads=True)
    ys = {}
    for c in rt.configs:
        rt.switch(c.name)
        ys[c.name] = rt.run(x)
    np.savez(out, **ys)
    report = {"pool": eo.shared_threads(), "versions": rt.info()["engine_versions"],
              "chained": max(len(rt.engines(c.name)) for c in rt.configs)}
    again = ef.Runtime(path, threads=2, fused=False)      # same count: joins the shared pool
    again.switch(rt.configs[-1].name)
    report["again_equal"] = bool(np.array_equal(again.run(x), ys[rt.configs[-1].name]))
    report["again_hint"] = "shared_threads=True" in again.fused_reason
    for label, make in [("other_count", lambda: ef.Runtime(path, threads=1)),
                        ("resize", lambda: eo.share_threads(3))]:
        try:
            make()
            report[label] = "no error"
        except ef.UsageError as e:
            report[label] = str(e)
    print(json.dumps(report))
""")


def test_shared_pool_runs_every_chained_config_like_per_session_pools(snnet_bundle, tmp_path: Path) -> None:
    _, path = snnet_bundle
    ref = ef.Runtime(path, threads=2, fused=False)
    x = np.random.default_rng(3).standard_normal((2, *ref.inputs[0].shape[1:])).astype(np.float32)
    out = tmp_path / "child"
    np.save(str(out) + ".x.npy", x)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["pool"] == 2 and report["versions"]["ort_thread_pool"] == "shared, 2 threads"
    assert report["chained"] > 1                                   # really several sessions per config
    ys = np.load(str(out) + ".npz")
    for c in ref.configs:
        ref.switch(c.name)
        np.testing.assert_allclose(ys[c.name], ref.run(x), rtol=1e-5, atol=1e-6, err_msg=c.name)
    assert report["again_equal"] and not report["again_hint"]      # already on the shared pool: no hint
    for label, expected in [("other_count", "shared pool of 2 threads.*threads=2"),
                            ("resize", "already runs ONNX Runtime on one shared pool of 2")]:
        assert "\n" not in report[label]
        assert re.search(expected, report[label]), report[label]


def test_shared_threads_needs_one_count_and_says_so(snnet_bundle) -> None:
    _, path = snnet_bundle
    with pytest.raises(ef.UsageError, match=r"one thread count, not \(2, 1\)"):
        ef.Runtime(path, threads=(2, 1), shared_threads=True)       # refused before touching ORT's pool
    from edgeflex.runtime.backends.onnxruntime import shared_threads

    assert shared_threads() is None                               # this process still has per-session pools
    chained = ef.Runtime(path, threads=2, fused=False)
    assert "shared_threads=True" in chained.fused_reason          # the chained runtime says what would help
    assert "shared_threads" not in ef.Runtime(path, threads=1, fused=False).fused_reason
