"""Before/after the redesign (issue 17): the speeds the runtime had to keep, measured side by side in one run.

Two worker processes, one per version of edgeflex (`--before REV`, read with `git archive`, and this working
tree), each import their own `edgeflex` and load the same bundles (exported and compiled here once: the
bundle format did not change). The parent asks them in turn, alternating which goes first, for blocks of
timed calls through the public API only (`Runtime.run`, `Runtime.switch`), so a burst of load from elsewhere
hits both alike. Cases:

- FITS (L=720, H=96, 7 channels, cut 60) at batch 1 through `Runtime.run`, on TVM (the fits kernel and the
  batch-1 path) and on ONNX Runtime;
- SN-Net (StarNet s050 -> s100, 32x32, untrained) one stitched config at batch 1, chained over its segments
  and as its fused graph, on TVM and on ONNX Runtime: the chaining overhead is chained / fused;
- `Runtime.switch` between two configs of that SN-Net bundle.

Owns its section of RESULTS.md; changes no library code.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
SECTION = "## Redesign (issue 17): the runtime's speeds before and after, side by side"
SUBPACKAGES = {"runtime": "runtime", "export": "export", "compile": "compile", "kernels": "kernels",
               "devices": "devices", "models": "models"}
SN_CONFIG = "s100.s1b0-s050.s1b0"

WORKER = r'''
import json, sys, time
import numpy as np
import edgeflex as ef

fits, sn = sys.argv[1], sys.argv[2]
rts = {
    "fits_tvm": ef.Runtime(fits, backend="tvm", threads=2),
    "fits_ort": ef.Runtime(fits, threads=2),
    "sn_tvm_chained": ef.Runtime(sn, backend="tvm", fused=False, only=[CONFIG], threads=2),
    "sn_tvm_fused": ef.Runtime(sn, backend="tvm", fused=True, only=[CONFIG], threads=2),
    "sn_ort_chained": ef.Runtime(sn, fused=False, only=[CONFIG], threads=2),
    "sn_ort_fused": ef.Runtime(sn, fused=True, only=[CONFIG], threads=2),
}
switch_rt = ef.Runtime(sn, threads=2)
names = [c.name for c in switch_rt.configs][:2]
rng = np.random.default_rng(0)
xs = {k: rng.standard_normal((1, *rt.inputs[0].shape[1:])).astype(np.float32) for k, rt in rts.items()}
print(json.dumps({"edgeflex": ef.__file__, "out": {k: rt.run(xs[k]).tolist() for k, rt in rts.items()}}),
      flush=True)
clock = time.perf_counter_ns
for line in sys.stdin:
    case, runs = json.loads(line)
    ts = []
    if case == "switch":
        sw = switch_rt.switch
        for i in range(runs):
            t0 = clock(); sw(names[i & 1]); ts.append(clock() - t0)
    else:
        run, x = rts[case].run, xs[case]
        for _ in range(5):
            run(x)
        for _ in range(runs):
            t0 = clock(); run(x); ts.append(clock() - t0)
    print(json.dumps(float(np.median(ts)) / 1e3), flush=True)
'''.replace("CONFIG", repr(SN_CONFIG))

CASES = {                       # case -> (label, calls per block)
    "fits_tvm": ("FITS batch 1, TVM, `Runtime.run`", 400),
    "fits_ort": ("FITS batch 1, ONNX Runtime, `Runtime.run`", 200),
    "sn_tvm_chained": (f"SN-Net {SN_CONFIG} batch 1, TVM, chained", 200),
    "sn_tvm_fused": (f"SN-Net {SN_CONFIG} batch 1, TVM, fused", 200),
    "sn_ort_chained": (f"SN-Net {SN_CONFIG} batch 1, ONNX Runtime, chained", 200),
    "sn_ort_fused": (f"SN-Net {SN_CONFIG} batch 1, ONNX Runtime, fused", 200),
    "switch": ("`Runtime.switch` between two configs", 2000),
}


def package_tree(src: Path, dest: Path) -> Path:
    """An importable `edgeflex` package made of links into the source tree `src` (the layout pyproject.toml
    maps), for a worker's PYTHONPATH: it comes before the editable install's finder."""
    pkg = dest / "edgeflex"
    pkg.mkdir(parents=True)
    for f in (src / "edgeflex").iterdir():
        (pkg / f.name).symlink_to(f)
    for name, folder in SUBPACKAGES.items():
        (pkg / name).symlink_to(src / folder)
    return dest


def make_bundles(tmp: Path) -> tuple[Path, Path]:
    import torch
    from bench_foundation import build_fits

    import edgeflex as ef
    from edgeflex.compile.tvm import compile_bundle
    from edgeflex.export.elastic import export_snnet
    from edgeflex.models.snnet import SNNet
    from edgeflex.models.starnet import starnet

    model, shape = build_fits()
    fits = tmp / "fits.efx"
    ef.export(model, torch.randn(2, *shape), fits)
    compile_bundle(fits, "host")
    torch.manual_seed(0)
    sn_model = SNNet([starnet(v, num_classes=10) for v in ("s050", "s100")], image_size=32).eval()
    sn = tmp / "sn.efx"
    export_snnet(sn_model, torch.randn(2, 3, 32, 32), sn)
    compile_bundle(sn, "host", configs=[SN_CONFIG])
    compile_bundle(sn, "host", configs=[SN_CONFIG], fused=True)
    return fits, sn


class Worker:
    def __init__(self, label: str, pythonpath: Path, fits: Path, sn: Path):
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        self.label = label
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(fits), str(sn)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=pythonpath)
        hello = json.loads(self.proc.stdout.readline())
        self.source, self.out = hello["edgeflex"], hello["out"]

    def block(self, case: str, runs: int) -> float:
        self.proc.stdin.write(json.dumps([case, runs]) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def cpu_flags() -> str:
    from common import cpu_flag_list

    flags = cpu_flag_list() or []
    keep = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "fma", "neon", "asimd")
    return " ".join(f for f in flags if f in keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="ede1395", help="the git revision before the redesign")
    ap.add_argument("--rounds", type=int, default=15, help="blocks per case and version")
    ap.add_argument("--out", type=Path, help="write the section into this RESULTS.md")
    a = ap.parse_args()
    from common import machine_and_run, publish

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ef-redesign-") as td:
        tmp = Path(td)
        before_src = tmp / "before-src"
        before_src.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", a.before], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(before_src, filter="data")
        fits, sn = make_bundles(tmp)
        workers = {"before": Worker("before", package_tree(before_src, tmp / "before-pkg"), fits, sn),
                   "after": Worker("after", package_tree(REPO, tmp / "after-pkg"), fits, sn)}
        for w in workers.values():
            print(f"{w.label}: edgeflex from {w.source}", file=sys.stderr)
        outs = {v: {k: np.array(o) for k, o in w.out.items()} for v, w in workers.items()}
        same = {k: float(np.max(np.abs(outs["before"][k] - outs["after"][k]))) for k in outs["after"]}
        medians: dict[str, dict[str, list[float]]] = {c: {"before": [], "after": []} for c in CASES}
        for r in range(a.rounds):
            for case, (_, runs) in CASES.items():
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for v in order:
                    medians[case][v].append(workers[v].block(case, runs))
            print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
        for w in workers.values():
            w.close()
    us = {c: {v: float(np.median(m)) for v, m in d.items()} for c, d in medians.items()}
    rows = ["| case | before us | after us | after / before |", "|---|---:|---:|---:|"]
    for case, (label, _) in CASES.items():
        b, f = us[case]["before"], us[case]["after"]
        rows.append(f"| {label} | {b:.2f} | {f:.2f} | {f / b:.2f}x |")
    for eng in ("tvm", "ort"):
        ch, fu = f"sn_{eng}_chained", f"sn_{eng}_fused"
        over = {v: us[ch][v] / us[fu][v] - 1 for v in ("before", "after")}
        name = "TVM" if eng == "tvm" else "ONNX Runtime"
        rows.append(f"| SN-Net chaining overhead (chained / fused - 1), {name} | {over['before']:+.1%} | "
                    f"{over['after']:+.1%} | |")
    body = "\n".join([
        f"Before: `git archive {a.before}` (main before the backend interface shrank); after: this tree. "
        "Both load the same bundles in their own worker process; medians over "
        f"{a.rounds} interleaved blocks (block = the calls per case below, each block's median).", "",
        *rows, "",
        "Outputs equal between the versions (max abs difference per case): "
        + ", ".join(f"{k} {v:.1g}" for k, v in same.items()), "",
        *machine_and_run(2, f"- cpu flags (of interest): {cpu_flags()}",
                         "- calls per block: " + ", ".join(f"{c} {n}" for c, (_, n) in CASES.items()),
                         started=started)])
    publish(a.out, SECTION, "bench_redesign", body)


if __name__ == "__main__":
    main()
