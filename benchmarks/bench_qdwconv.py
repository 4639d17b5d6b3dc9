"""The int8 depthwise kernel alone (issue 21): `kernels/tir/qdwconv.py` against the float32 depthwise kernel
(`kernels/tir/dwconv.py`) on StarNet-S1's four 7x7 planes, each kernel compiled for this host and timed
with TVM's time_evaluator (best of `--repeat` means of `--number` calls, 1 thread unless said), the int8
kernel as the first depthwise conv of a block (input QDQ only) and as the second (its output QDQ, the
residual add and the sum's QDQ in the epilogue), built for the int8 engine's target
(`compile.tvm.int8_build_target`) and for the plain host target. Outputs are checked against the numpy
reference before timing.

Usage: .venv/bin/python benchmarks/bench_qdwconv.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(24, 56, 56), (48, 28, 28), (96, 14, 14), (192, 7, 7)]        # StarNet-S1 at 224x224


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--number", type=int, default=50)
    p.add_argument("--repeat", type=int, default=15)
    a = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    import tvm

    from edgeflex.compile.tvm import host_target, int8_build_target
    from edgeflex.kernels.tir.dwconv import dwconv_primfunc
    from edgeflex.kernels.tir.qdwconv import qdwconv_primfunc, qdwconv_reference, weight_quads

    plain = tvm.target.Target(host_target(a.threads))
    built = int8_build_target(plain)
    rng = np.random.default_rng(0)
    dev = tvm.cpu()

    def best_ms(lib, args) -> float:
        ev = lib.mod.time_evaluator("main", dev, number=a.number, repeat=a.repeat)
        return min(ev(*args).results) * 1e3

    rows = ["| plane (C x H x W) | fp32 `dwconv` ms | int8, first conv: ms | / fp32 | int8, second conv "
            "(+ QDQ, residual, QDQ): ms | / fp32 | same, plain host target: ms |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for c, h, w in SHAPES:
        pad = (3, 3, 3, 3)
        q = rng.integers(0, 256, (1, c, h, w))
        x = ((q - 120).astype(np.float32) * np.float32(0.0307)).astype(np.float32)
        wq = rng.integers(-127, 128, (c, 1, 7, 7)).astype(np.int8)
        wsc = rng.uniform(1e-4, 4e-4, c).astype(np.float32)
        b = rng.standard_normal(c).astype(np.float32)
        r = rng.standard_normal((1, c, h, w)).astype(np.float32)
        wsum = wq.astype(np.int32).reshape(c, -1).sum(1).astype(np.int32)
        ws = (wsc * np.float32(0.0307)).astype(np.float32)
        fp32 = tvm.compile(tvm.IRModule({"main": dwconv_primfunc(1, c, h, w, (7, 7), pad, False)}),
                           target=plain)
        y = tvm.runtime.empty((1, c, h, w), "float32")
        t_fp32 = best_ms(fp32, [tvm.runtime.tensor(v) for v in (x, wq.reshape(c, 49).astype(np.float32), b,
                                                                 np.zeros(1, np.float32))] + [y])
        times = []
        for quant, res, tgt in (({"s": 0.0307, "z": 120}, None, built),
                                ({"s": 0.0307, "z": 120, "s_o": 0.0213, "z_o": 97, "s_a": 0.0291, "z_a": 131},
                                 r, built),
                                ({"s": 0.0307, "z": 120, "s_o": 0.0213, "z_o": 97, "s_a": 0.0291, "z_a": 131},
                                 r, plain)):
            lib = tvm.compile(tvm.IRModule({"main": qdwconv_primfunc(1, c, h, w, (7, 7), pad, quant,
                                                                     residual=res is not None)}), target=tgt)
            args = [tvm.runtime.tensor(v) for v in (x, weight_quads(wq), ws, wsum, b,
                                                    res if res is not None else np.zeros(1, np.float32))]
            lib["main"](*args, y)
            ref = qdwconv_reference(x, wq, wsc, b, pad, quant, res)
            if np.abs(y.numpy() - ref).max() > 0.01 * np.abs(ref).max():
                raise SystemExit(f"qdwconv {c}x{h}x{w} disagrees with its reference")
            times.append(best_ms(lib, args + [y]))
        rows.append(f"| {c} x {h} x {w} | {t_fp32:.4f} | {times[0]:.4f} | {times[0] / t_fp32:.2f}x | "
                    f"{times[1]:.4f} | {times[1] / t_fp32:.2f}x | {times[2]:.4f} |")
    print(f"{a.threads} thread(s), best of {a.repeat} x {a.number} calls, target {built}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
