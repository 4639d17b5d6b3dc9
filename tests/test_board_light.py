"""The board side needs numpy and onnxruntime only (issue 16, item 3).

`edgeflex info/run/profile/query/devices` run in a fresh interpreter where torch, onnx, onnxscript, tqdm,
scikit-learn, statsmodels and TVM cannot be imported (a `sitecustomize.py` on PYTHONPATH puts a finder in
front of `sys.meta_path` that refuses them), on a bundle exported beforehand here, and must answer
correctly; `export`, `train`, `compile` and `demo` must say in one line which extra to install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeflex as ef
from edgeflex.runtime.profiles import load_profile

BLOCKED = ("torch", "onnx", "onnxscript", "tqdm", "sklearn", "statsmodels", "tvm", "tvm_ffi")

SITECUSTOMIZE = f'''
import sys

class _Unimportable:
    """Refuses the workstation-side modules, as on a board where they are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Unimportable())
'''


@pytest.fixture(scope="module")
def board(tmp_path_factory, fits_bundle: Path):
    """(run, bundle copy, work dir): `run(*argv)` is `python -m edgeflex ...` with the modules refused."""
    d = tmp_path_factory.mktemp("board")
    (d / "site").mkdir()
    (d / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    bundle = d / "fits.efx"
    shutil.copytree(fits_bundle, bundle)               # `profile` writes into it
    env = {**os.environ, "PYTHONPATH": str(d / "site")}

    def run(*argv, code: str | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "edgeflex", *map(str, argv)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)

    return run, bundle, d


def test_the_harness_refuses_every_workstation_module(board) -> None:
    run, _, _ = board
    for name in BLOCKED:
        r = run(code=f"import {name}")
        assert r.returncode == 1 and f"No module named '{name}'" in r.stderr, (name, r.stderr)
    # and the board side imports without them
    r = run(code="import edgeflex, edgeflex.runtime, edgeflex.devices, edgeflex.cli, "
                 "edgeflex.compile.tvm; print(edgeflex.__version__)")
    assert r.returncode == 0 and r.stdout == f"{ef.__version__}\n", r.stderr


def test_info_run_profile_query_devices_work_without_them(board) -> None:
    run, bundle, d = board
    rt = ef.Runtime(bundle)
    # info
    r = run("info", bundle, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["inputs"] == [s.describe() for s in rt.inputs] and info["backend"] == "onnxruntime"
    assert [c["name"] for c in info["configs"]] == [c.name for c in rt.configs]
    r = run("info", bundle)
    assert r.returncode == 0 and r.stdout.startswith(f"bundle   {rt.bundle.name}"), r.stderr
    # run: the output file holds what the runtime computes in this (full) process
    x = np.random.default_rng(0).standard_normal((3, 24, 3)).astype(np.float32)
    np.save(d / "x.npy", x)
    r = run("run", bundle, "--input", d / "x.npy", "--output", d / "y.npy", "--threads", "1")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(d / "y.npy"), rt.run(x), rtol=1e-5, atol=1e-6)
    assert f"shape {list(rt.run(x).shape)}" in r.stdout
    # profile (the peak-memory probe's own subprocess inherits the refusals too)
    r = run("profile", bundle, "--min-seconds", "0.05", "--threads", "1")
    assert r.returncode == 0, r.stderr
    prof = load_profile(ef.Bundle.open(bundle), "host")
    assert prof is not None and set(prof["configs"]) == {c.name for c in rt.configs}
    for stats in prof["configs"].values():
        assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] and stats["peak_memory_mb"] >= 0
    # query: everything fits a generous budget, nothing fits one far below the measured p90
    p90 = max(s["p90_ms"] for s in prof["configs"].values())
    r = run("query", bundle, "--latency-ms", 1000 * p90, "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert [h["name"] for h in json.loads(r.stdout)["configs"]] == [c.name for c in rt.configs]
    r = run("query", bundle, "--latency-ms", p90 / 1000, "--threads", "1")
    assert r.returncode == 1 and "no config fits" in r.stdout and r.stderr == ""
    # devices: the catalogue and this host
    r = run("devices", "--no-measure", "--json")
    assert r.returncode == 0 and "rpi5" in json.loads(r.stdout), r.stderr


@pytest.mark.parametrize(("argv", "module", "extra"), [
    (["export", "--model", "fits", "--out", "{d}/e.efx"], "torch", "export"),
    (["demo", "--out", "{d}/demo"], "torch", "export"),
    (["train", "fits", "--csv", "{d}/s.csv", "--lookback", "8", "--horizon", "2", "--out", "{d}/e.efx"],
     "torch", "export"),
    (["compile", "{bundle}"], "tvm", "tvm")])
def test_workstation_verbs_name_the_extra(board, argv, module, extra) -> None:
    run, bundle, d = board
    r = run(*[a.format(d=d, bundle=bundle) for a in argv])
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"edgeflex: error: edgeflex {argv[0]} needs {module}, which is not installed: "
                        f"pip install 'edgeflex[{extra}]'\n")
    assert not (d / "e.efx").exists() and not (d / "demo").exists()
