"""What the FITS authors' second output (`low_xy * sqrt(var)` = y - mean) costs on ONNX Runtime, in four forms
of the same `lowrank` graph (L=720 H=96 C=7 cut 60, the authors' model of bench_fits_authors.py), raw
sessions at batch 1, interleaved: y alone; as `kernels.spectral.to_onnx` writes it (transpose back, Sub the
mean, transpose); the centred series from the last GEMM without its mean row and y = it + mean; Sub of the
transposed mean on the time-major output; one GEMM of twice the width and a Split. Prints a table (the
reading of RESULTS.md's issue-18 section quotes it); every form's outputs are checked against the first.

Owns nothing else; it changes no library code.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from edgeflex.export import fits
from edgeflex.kernels import spectral
from edgeflex.runtime.backends.onnxruntime import session_options

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_fits_authors import models  # noqa: E402
from common import OthersLoad, time_interleaved, timing_parser  # noqa: E402

N, C = 816, 7


def _out(name: str):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", N, C])


def _sorted(m: onnx.ModelProto) -> onnx.ModelProto:
    """`m` with its nodes in an order where each reads only what is already computed."""
    g = m.graph
    have = {i.name for i in g.input} | {t.name for t in g.initializer}
    todo, done = list(g.node), []
    while todo:
        n = next(n for n in todo if all(i in have or not i for i in n.input))
        todo.remove(n)
        done.append(n)
        have |= set(n.output)
    del g.node[:]
    g.node.extend(done)
    onnx.checker.check_model(m)
    return m


def forms(one: onnx.ModelProto, written: onnx.ModelProto, last: str) -> dict[str, onnx.ModelProto]:
    """The graphs to time, from the one-output graph `one` and the two-output graph as written."""
    def copy() -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(one)
        return m

    g_init = {t.name: t for t in one.graph.initializer}
    mean = next(n for n in one.graph.node if n.op_type == "LayerNormalization").output[1]
    mm = next(n for n in one.graph.node if n.op_type == "MatMul" and n.input[1] == last)

    sub_t = copy()                                        # Sub of the transposed mean, time-major
    sub_t.graph.node.extend([helper.make_node("Transpose", [mean], ["meanT"], perm=[0, 2, 1]),
                             helper.make_node("Sub", ["y0", "meanT"], ["y1"])])
    sub_t.graph.output.append(_out("y1"))

    centred_first = copy()                                # the GEMM without the mean row, y = it + mean
    g = centred_first.graph
    cat = next(n for n in g.node if n.op_type == "Concat")
    del cat.input[2]
    init = next(t for t in g.initializer if t.name == last)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(g_init[last])[:-1], last))
    tr = next(n for n in g.node if n.op_type == "Transpose" and n.input[0] == mm.output[0])
    tr.input[0] = "y_cm"
    g.node.extend([helper.make_node("Add", [mm.output[0], mean], ["y_cm"]),
                   helper.make_node("Transpose", [mm.output[0]], ["y1"], perm=[0, 2, 1])])
    g.output.append(_out("y1"))

    wide = copy()                                         # one GEMM of twice the width, then Split
    g = wide.graph
    w = numpy_helper.to_array(g_init[last])
    w2 = w.copy()
    w2[-1] = 0
    init = next(t for t in g.initializer if t.name == last)
    init.CopyFrom(numpy_helper.from_array(np.concatenate([w, w2], axis=1), last))
    tr = next(n for n in g.node if n.op_type == "Transpose" and n.input[0] == mm.output[0])
    g.node.remove(tr)
    g.node.extend([helper.make_node("Transpose", [mm.output[0]], ["both"], perm=[0, 2, 1]),
                   helper.make_node("Split", ["both", "halves"], ["y0", "y1"], axis=1)])
    g.initializer.append(numpy_helper.from_array(np.array([N, N], np.int64), "halves"))
    g.output.append(_out("y1"))

    return {"y alone": one, "as written (transpose back, Sub, transpose)": written,
            "centred from the GEMM without its mean row, y = it + mean": _sorted(centred_first),
            "Sub of the transposed mean, time-major": _sorted(sub_t),
            "one GEMM of twice the width + Split": _sorted(wide)}


def main() -> None:
    p = timing_parser(__doc__, runs_default="600", warmup=20, block=10)
    a = p.parse_args()
    warnings.simplefilter("ignore")
    x = np.random.default_rng(1).standard_normal((1, 720, C)).astype(np.float32)
    found, why = fits.recognise(models()["authors' FITS"], (torch.from_numpy(x),))
    if found is None:
        raise SystemExit(f"the authors' FITS was not recognised: {why}")
    one = spectral.to_onnx(found.map, "lowrank", channels=C, outputs=[("y0", "y")])
    written = spectral.to_onnx(found.map, "lowrank", channels=C, outputs=[("y0", "y"), ("y1", "centred")])
    graphs = forms(one, written, spectral.GEMM_NAMES[1])
    so = session_options(ort, a.threads)
    sessions = {k: ort.InferenceSession(g.SerializeToString(), so, providers=["CPUExecutionProvider"])
                for k, g in graphs.items()}
    ref = sessions["as written (transpose back, Sub, transpose)"].run(None, {"x": x})
    for k, s in sessions.items():
        for got, want in zip(s.run(None, {"x": x}), ref):
            assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max()), k
    with OthersLoad() as load:
        times = time_interleaved({k: (lambda s=s: s.run(None, {"x": x})) for k, s in sessions.items()},
                                 a.runs or 600, a.warmup, a.block)
    print(f"| form of the second output (ORT {ort.__version__}, {a.threads} threads, batch 1) | median us | "
          "p90 us |\n|---|---:|---:|")
    for k, t in times.items():
        print(f"| {k} | {1e3 * np.median(t):.1f} | {1e3 * np.percentile(t, 90):.1f} |")
    print(f"\nothers' CPU while timed: {load.share:.0%}")


if __name__ == "__main__":
    main()
