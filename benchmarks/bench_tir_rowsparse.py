"""Row-sparse TIR kernel benchmark (issue 5): `kernels/tir/rowsparse.py` at DRESS densities 100/50/25/10 %
(one compiled function, the level switched at run time) vs the dense layer on ONNX Runtime (MatMul / Conv)
and on TVM (the untuned Relax matmul / conv2d, what a TVM engine runs for the dense DRESS graph),
interleaved, medians.

Owns the cases, the timing and the report (stdout, and with --out its section of RESULTS.md); no library code.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OthersLoad, command_line, machine_info, publish, time_interleaved, usable_cores  # noqa: E402

from edgeflex.runtime.backends.onnxruntime import session_options  # noqa: E402

SECTION = "## Row-sparse TIR kernel (issue 5)"
LEVELS = (1.0, 0.5, 0.25, 0.1)


@dataclass(frozen=True)
class Case:
    label: str
    kind: str            # linear | conv1x1
    out_f: int
    in_f: int
    pixels: int = 1      # conv: H * W


CASES = [Case("StarNet-S1 MLP 96->384", "linear", 384, 96),
         Case("StarNet-S4 MLP 384->1536", "linear", 1536, 384),
         Case("MLP 1024x1024", "linear", 1024, 1024),
         Case("1x1 conv 96->384 @14x14", "conv1x1", 384, 96, 196),
         Case("1x1 conv 384->1536 @7x7", "conv1x1", 1536, 384, 49)]


def _ort(case: Case, w: np.ndarray, batch: int, threads: int):
    from onnx import TensorProto, helper, numpy_helper

    if case.kind == "linear":
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        init = numpy_helper.from_array(np.ascontiguousarray(w.T), "w")
        xs, ys = [batch, case.in_f], [batch, case.out_f]
    else:
        node = helper.make_node("Conv", ["x", "w"], ["y"])
        init = numpy_helper.from_array(w.reshape(case.out_f, case.in_f, 1, 1), "w")
        side = int(round(case.pixels ** 0.5))
        xs, ys = [batch, case.in_f, side, side], [batch, case.out_f, side, side]
    g = helper.make_graph([node], "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xs)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ys)], initializer=[init])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    # NOTE: the session options edgeflex's runtime uses (spinning capped at SPIN_US): with ORT's default,
    # its workers spin on both cores after each call and slowed the TVM contender's next calls up to 2x
    # (MLP 1024x1024 batch 16 at 10 %: 53 vs 26 us); ORT's own time did not change.
    so = session_options(ort, threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal(xs).astype(np.float32)
    return lambda: s.run(None, {"x": x})


def _tvm_dense(case: Case, w: np.ndarray, batch: int, target):
    """The untuned Relax dense layer (default legalisation + the default CPU pipeline)."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    if case.kind == "linear":
        xs, ws = [batch, case.in_f], [case.in_f, case.out_f]
        wv = np.ascontiguousarray(w.T)
    else:
        side = int(round(case.pixels ** 0.5))
        xs, ws = [batch, case.in_f, side, side], [case.out_f, case.in_f, 1, 1]
        wv = w.reshape(ws)
    x = relax.Var("x", relax.TensorType(xs, "float32"))
    wp = relax.Var("w", relax.TensorType(ws, "float32"))
    with bb.function("main", [x, wp]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, wp) if case.kind == "linear" else relax.op.nn.conv2d(x, wp))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=target), tvm.cpu())
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.random.default_rng(1).standard_normal(xs).astype(np.float32), dev),
            tvm.runtime.tensor(wv, dev)]
    fn = vm["main"]
    return lambda: fn(*args)


def _tvm_sparse(case: Case, vals, idx, k, batch: int, target):
    """One compiled row-sparse function; returns a factory: level -> zero-argument call."""
    import tvm

    from edgeflex.kernels.tir import rowsparse as rs

    if case.kind == "linear":
        fn = rs.linear_func(case.out_f, case.in_f, vals.shape[1], len(k), index_dtype=str(idx.dtype),
                            target=target)
        xs, ys = (batch, case.in_f), (batch, case.out_f)
    else:
        fn = rs.conv1x1_func(case.out_f, case.in_f, vals.shape[1], len(k), case.pixels,
                             index_dtype=str(idx.dtype), target=target)
        xs, ys = (batch, case.in_f, case.pixels), (batch, case.out_f, case.pixels)
    lib = tvm.tirx.build(tvm.IRModule({"main": fn.with_attr("global_symbol", "main")}), target=target)
    dev = tvm.cpu()
    x = np.random.default_rng(1).standard_normal(xs).astype(np.float32)
    args = [tvm.runtime.tensor(a, dev) for a in (x, *rs.block_ell(vals, idx), k)]
    bias = tvm.runtime.tensor(np.zeros(case.out_f, np.float32), dev)
    y = tvm.runtime.tensor(np.zeros(ys, np.float32), dev)
    f = lib["main"]

    def at(level: int):
        lv = tvm.runtime.tensor(np.array(level, np.int64), dev)
        return lambda: f(*args, lv, bias, y)

    return at


def run_case(case: Case, batch: int, threads: int, runs: int, warmup: int, block: int, target) -> dict:
    from edgeflex.kernels.rowsparse import to_ell
    from edgeflex.models.dress import row_codes

    w = np.random.default_rng(0).standard_normal((case.out_f, case.in_f)).astype(np.float32)
    codes = row_codes(torch.from_numpy(w), LEVELS).numpy()
    vals, idx, k = to_ell(w, codes, len(LEVELS))          # narrow (uint8/uint16) indices
    sparse = _tvm_sparse(case, vals, idx, k, batch, target)
    contenders = {"ORT dense": _ort(case, w, batch, threads), "TVM dense": _tvm_dense(case, w, batch, target)}
    contenders.update({f"sparse {d:.0%}": sparse(s) for s, d in enumerate(LEVELS)})
    with OthersLoad() as load:
        t = time_interleaved(contenders, runs=runs, warmup=warmup, block=block)
    med = {n: float(np.median(v)) for n, v in t.items()}
    return {"case": case, "batch": batch, "med": med, "load": load.share}


def table(rows: list[dict]) -> str:
    sparse = " | ".join(f"sparse {d:.0%} ms (x vs ORT)" for d in LEVELS)
    head = f"| layer | batch | ORT dense ms | TVM dense ms | {sparse} | fallback to dense at |"
    lines = [head, "|" + "---|" * (5 + len(LEVELS))]
    for r in rows:
        m = r["med"]
        cells, loses = [], []
        for d in LEVELS:
            s = m[f"sparse {d:.0%}"]
            ratio = m["ORT dense"] / s
            cells.append(f"{s:.4f} ({ratio:.2f}x)")
            if ratio < 1.0:
                loses.append(f"{d:.0%}")
        lines.append(f"| {r['case'].label} | {r['batch']} | {m['ORT dense']:.4f} | {m['TVM dense']:.4f} | "
                     + " | ".join(cells) + f" | {', '.join(loses) or 'none'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tvm

    from edgeflex.compile.tvm import host_target

    usable = usable_cores()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=usable, help=f"threads, every contender (default {usable})")
    p.add_argument("--runs", type=int, default=200, help="timed runs per contender")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--block", type=int, default=20, help="runs per interleaved block")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 16)")
    p.add_argument("--only", action="append", choices=[c.label for c in CASES], help="run only these layers")
    p.add_argument("--out", type=Path, help="write the table into this markdown file's section")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tvm.get_global_func("runtime.config_threadpool")(-3, a.threads, [str(c) for c in range(usable)])
    target = tvm.target.Target(host_target(a.threads))
    rows, loads = [], []
    for case in CASES:
        if a.only and case.label not in a.only:
            continue
        for batch in a.batch or [1, 16]:
            r = run_case(case, batch, a.threads, a.runs, a.warmup, a.block, target)
            rows.append(r)
            loads.append(r["load"])
            print(table([r]).splitlines()[-1], flush=True)
    info = machine_info(a.threads)
    body = "\n".join([
        f"Command: `{command_line()}`  ",
        f"Machine: {info['cpu']}, {info['cores']}; threads {a.threads} (ORT intra-op, TVM pool); "
        f"{info['os']}  ",
        f"Versions: {info['versions']}, TVM {tvm.__version__}; target `{target}`  ",
        f"Load from other processes while timing: {np.nanmin(loads):.0%}-{np.nanmax(loads):.0%} of the "
        "machine  ",
        f"Timing: interleaved blocks of {a.block}, {a.runs} runs per contender, median ms per call. Sparse: "
        "one compiled `rowsparse.linear_func` / `conv1x1_func` per layer, the density picked by the run-time "
        "level (narrow uint8/uint16 indices in the blocked [out/16, kmax, 16] layout made at load, "
        "zero bias). ORT dense: one MatMul / Conv session with edgeflex's runtime options (its workers' "
        "spinning capped at 100 us). TVM dense: the untuned Relax `matmul` / `conv2d` "
        "(default CPU pipeline, no MetaSchedule). Ratios are ORT dense / sparse (> 1: sparse faster).",
        "",
        table(rows),
    ])
    publish(a.out, SECTION, "bench_tir_rowsparse", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
