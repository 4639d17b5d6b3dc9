"""Boards as a fleet (issue 22): does a profile measured through TVM's RPC tracker on boards agree with one
measured locally on the same CPU, and what the fleet adds in wall time. Two `edgeflex board serve` processes
on this machine (the "boards" are this CPU), a DRESS MLP bundle (four levels) with host TVM engines:
local profile A, remote profile (configs spread over both boards), local profile B, in that order, each at
1 thread; the per-config p50 ratios remote / local say how far a remote measurement is from a local one,
A / B how far two local ones are from each other. Plus the time of one zig-linked `compile --target rpi5`.

Owns its section of RESULTS.md; changes no library code.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import edgeflex as ef
from edgeflex.compile.tvm import compile_bundle
from edgeflex.export.elastic import export_dress
from edgeflex.models.dress import DressModel, build_backbone
from edgeflex.runtime import fleet
from edgeflex.runtime.profiles import measure_profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OthersLoad, machine_and_run, publish  # noqa: E402

SECTION = "## Boards as a fleet (issue 22): remote profiles through TVM's RPC tracker, zig cross-link"
KEY = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str]) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-m", "edgeflex.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    line = p.stdout.readline()
    return p, int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-seconds", type=float, default=1.0, help="per profile, each config")
    ap.add_argument("--out", type=Path, help="write the section into this RESULTS.md")
    a = ap.parse_args()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="edgeflex-bench-fleet-"))
    path = tmp / "mlp.efx"
    torch.manual_seed(0)
    export_dress(DressModel(build_backbone("mlp")).eval(), torch.randn(2, 1, 8, 8), path)
    compile_bundle(path, "host", dress_kernel="dense", batch1=False)
    procs = []
    try:
        tracker, port = _start(["tracker", "--port", str(_free_port())])
        procs.append(tracker)
        for name in ("board-a", "board-b"):
            procs.append(_start(["board", "serve", "--tracker", f"127.0.0.1:{port}", "--key", KEY,
                                 "--name", name, "--port", str(_free_port())])[0])
        fleet.wait_for_boards(("127.0.0.1", port), KEY, 2, timeout_s=120)
        with OthersLoad() as load:
            local_a = measure_profile(ef.Runtime(path, backend="tvm", threads=1), memory=False,
                                      progress=False, min_seconds=a.min_seconds)
            t0 = time.perf_counter()
            remote = fleet.profile_remote(path, ("127.0.0.1", port), KEY, threads=[1],
                                          min_seconds=a.min_seconds)
            remote_s = time.perf_counter() - t0
            local_b = measure_profile(ef.Runtime(path, backend="tvm", threads=1), memory=False,
                                      progress=False, min_seconds=a.min_seconds)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    rows = ["| config | board | local A p50 us | remote p50 us | local B p50 us | remote / A | B / A |",
            "|---|---|---:|---:|---:|---:|---:|"]
    rr, ll = [], []
    for name, r in remote["configs"].items():
        la, lb = local_a["configs"][name]["p50_ms"], local_b["configs"][name]["p50_ms"]
        rr.append(r["p50_ms"] / la)
        ll.append(lb / la)
        rows.append(f"| {name} | {remote['measured_on'][name]} | {la * 1e3:.2f} | {r['p50_ms'] * 1e3:.2f} | "
                    f"{lb * 1e3:.2f} | {rr[-1]:.2f} | {ll[-1]:.2f} |")
    os.environ["EDGEFLEX_LINKER"] = "zig"
    t0 = time.perf_counter()
    rec = compile_bundle(path, "rpi5", dress_kernel="dense", batch1=False)["engines"][0]
    zig_s = time.perf_counter() - t0
    gmean = float(np.exp(np.mean(np.log(rr))))
    body = "\n".join([
        f"DRESS MLP (4 levels), TVM engines for this host, batch 1, 1 thread, `--min-seconds "
        f"{a.min_seconds}` per profile; two boards = two `edgeflex board serve` processes on this machine "
        "registered with `edgeflex tracker` on 127.0.0.1. Order: local A, remote, local B.", "",
        *rows, "",
        f"Remote / local A, geometric mean over configs: **{gmean:.2f}x**; local B / local A: "
        f"{float(np.exp(np.mean(np.log(ll)))):.2f}x. The remote profile (upload of the bundle to both "
        f"boards, configs spread 2 + 2, measured in parallel) took {remote_s:.1f} s wall.", "",
        f"`compile --target rpi5` linked with zig (`{rec['linker']}`, ziglang {rec['linker_version']}, zig "
        f"cache already built): {zig_s:.1f} s for one engine; the first zig link of aarch64 on a fresh cache "
        "took 4 min 40 s wall (52 s CPU) under a load average of ~10 on this machine.", "",
        *machine_and_run(1, f"- others' CPU while timed: {load.share:.0%} (other engineers' jobs)",
                         started=started)])
    publish(a.out, SECTION, "bench_fleet", body)


if __name__ == "__main__":
    main()
