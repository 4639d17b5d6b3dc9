"""Elastic-models benchmark (issue 3): accuracy vs FLOPs per config (DRESS, SN-Net), switch time vs a new
ONNX Runtime session, SN-Net segment chaining vs the fused graph, row-sparse vs dense per level on ORT.

Trains and exports the three built-in elastic bundles (or reuses them with --reuse), then measures them
side by side in one run. Writes its section of RESULTS.md with --out and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import edgeflex as ef
from edgeflex.cli import build_model
from edgeflex.export.elastic import export_dress, export_snnet
from edgeflex.kernels import rowsparse
from edgeflex.models.snnet import SNNet
from edgeflex.models.starnet import starnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OthersLoad, machine_and_run, publish, time_interleaved, usable_cores  # noqa: E402

SECTION = "## Elastic models (issue 3): DRESS levels, SN-Net stitches, run-time switching"
MODELS = ("dress-mlp", "dress-starnet-s050", "snnet-starnet")


def build_bundles(workdir: Path, reuse: bool) -> dict[str, Path]:
    paths = {}
    for name in MODELS:
        path = workdir / f"{name}.efx"
        if not (reuse and path.exists()):
            t = time.perf_counter()
            model, example, quality, meta, _ = build_model(name, train=True, epochs=None, seed=0,
                                                           image_size=None)
            exporter = export_dress if name.startswith("dress-") else export_snnet
            exporter(model, example, path, name=name, quality=quality, metadata=meta)
            print(f"{name}: trained and exported in {time.perf_counter() - t:.0f} s", flush=True)
        paths[name] = path
    return paths


def example_input(rt: ef.Runtime, batch: int = 1) -> np.ndarray:
    shape = [batch if d is None else d for d in rt.inputs[0].shape]
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def config_table(paths: dict[str, Path], threads: int, runs: int) -> tuple[list[str], dict]:
    """Per config: quality, FLOPs, bytes, p50 latency on the kernel(s) the runtime can use."""
    lines = [("| bundle | config | top-1 | MFLOPs | param KiB | p50 ms (chosen) | p50 ms dense "
              "| p50 ms sparse | p50 ms chained | p50 ms fused |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    curves = {}
    for name, path in paths.items():
        variants = {"chosen": ef.Runtime(path, threads=threads)}
        if name.startswith("dress-"):
            variants["dense"] = ef.Runtime(path, threads=threads, dress_kernel="dense")
            if "main.sparse" in variants["chosen"].bundle.segments:
                variants["sparse"] = ef.Runtime(path, threads=threads, dress_kernel="sparse")
        else:
            variants["chained"] = ef.Runtime(path, threads=threads, fused=False)
            variants["fused"] = ef.Runtime(path, threads=threads, fused=True)
        x = example_input(variants["chosen"])
        curves[name] = []
        for c in variants["chosen"].configs:
            for rt in variants.values():
                rt.switch(c.name)
            calls = {k: (lambda rt=rt, x=x: rt.run(x)) for k, rt in variants.items()}
            t = time_interleaved(calls, runs, 10, 10)
            p50 = {k: float(np.median(v)) for k, v in t.items()}
            q = (c.quality or {}).get("value", float("nan"))
            curves[name].append((c.flops / 1e6, q, c.name))
            cells = [f"{p50[k]:.3f}" if k in p50 else ""
                     for k in ("chosen", "dense", "sparse", "chained", "fused")]
            lines.append(f"| {name} | {c.name} | {q:.4f} | {c.flops / 1e6:.2f} | "
                         f"{c.param_bytes / 1024:.1f} | " + " | ".join(cells) + " |")
    return lines, curves


def plot(curves: dict, out: Path, metrics: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4))
    for ax, (name, pts) in zip(np.atleast_1d(axes), curves.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        for f, q, label in pts:
            ax.annotate(label, (f, q), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.set_xlabel("MFLOPs (batch 1)")
        ax.set_ylabel(metrics.get(name, "held-out top-1"))
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def switch_vs_reload(path: Path, threads: int) -> list[str]:
    """Median of rt.switch (alternating configs) vs creating one config's ORT session, and a whole Runtime."""
    rt = ef.Runtime(path, threads=threads)
    names = [c.name for c in rt.configs]
    ts = np.empty(20000)
    for i in range(len(ts)):
        t = time.perf_counter_ns()
        rt.switch(names[i % len(names)])
        ts[i] = time.perf_counter_ns() - t
    b = rt.bundle
    seg = b.segments["main"]
    tensors = b.tensors()
    graph = b.read(seg.graph)
    inits = {k: tensors[v] for k, v in seg.tensors.items()}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads

    def new_session():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in inits.values()]
        opts.add_external_initializers(list(inits), values)
        return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])

    reload = [_timed(new_session) for _ in range(20)]
    whole = [_timed(lambda: ef.Runtime(path, threads=threads)) for _ in range(5)]
    sw = float(np.median(ts)) / 1e3
    return [(f"- `rt.switch` on {b.name} ({len(names)} configs, alternating, 20000 switches): median "
            f"**{sw:.2f} us**, p99 {np.percentile(ts, 99) / 1e3:.2f} us"),
            (f"- a new ONNX Runtime session for one config of the same bundle (weights from memory): median "
            f"**{np.median(reload):.1f} ms** ({np.median(reload) * 1e3 / sw:,.0f}x the switch)"),
            (f"- opening the whole bundle (`ef.Runtime`, verify + every config's engine): median "
            f"{np.median(whole):.1f} ms")]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def rowsparse_layers(threads: int, runs: int) -> list[str]:
    """A Linear layer per shape at each DRESS density: row-sparse ELL graph (level as input) vs dense Gemm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dens = (1.0, 0.5, 0.25, 0.1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    lines = ["| layer (out x in) | batch | density | dense p50 ms | row-sparse p50 ms | sparse / dense |",
             "|---|---:|---:|---:|---:|---:|"]
    for out_f, in_f in ((256, 256), (1024, 1024)):
        w = rng.standard_normal((out_f, in_f)).astype(np.float32)
        order = np.argsort(-np.abs(w), axis=1, kind="stable")
        codes = np.zeros(w.shape, np.uint8)
        for s, d in enumerate(dens):
            np.put_along_axis(codes, order[:, :max(1, round(d * in_f))], s, axis=1)
        vals, idx, k = rowsparse.to_ell(w, codes, len(dens))
        sparse = ort.InferenceSession(rowsparse.linear_onnx(vals, idx, k, in_f).SerializeToString(), so)
        for batch in (1, 16):
            x = rng.standard_normal((batch, in_f)).astype(np.float32)
            for s, d in enumerate(dens):
                g = helper.make_graph(
                    [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "dense",
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", in_f])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", out_f])],
                    initializer=[numpy_helper.from_array(rowsparse.masked(w, codes, s), "W")])
                m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
                m.ir_version = 8
                dense = ort.InferenceSession(m.SerializeToString(), so)
                lv = np.array(s, np.int64)
                t = time_interleaved(
                    {"dense": lambda dense=dense, x=x: dense.run(None, {"x": x}),
                     "sparse": lambda lv=lv, x=x, sp=sparse: sp.run(None, {"x": x, "level": lv})},
                    runs, 10, 10)
                dm, sm = float(np.median(t["dense"])), float(np.median(t["sparse"]))
                lines.append(f"| {out_f} x {in_f} | {batch} | {d:.0%} | {dm:.4f} | {sm:.4f} "
                             f"| {sm / dm:.1f}x |")
    return lines


def _scaled_bundle(workdir: Path, size: int) -> Path:
    path = workdir / f"snnet-starnet-{size}px.efx"
    if not path.exists():
        torch.manual_seed(0)
        model = SNNet([starnet(v, num_classes=10) for v in ("s050", "s100")], image_size=size).eval()
        export_snnet(model, torch.randn(1, 3, size, size), path, name=f"snnet-starnet-{size}px",
                     metadata={"note": "untrained: latency only"})
    return path


Times = dict[str, dict[str, list[float]]]


def chain_times(paths: list[Path], threads: int, runs: int, shared: bool,
                backend: str = "onnxruntime") -> Times:
    """Per bundle, per config: [chained p50 ms, fused p50 ms], interleaved. `shared`: every ORT session
    on the process's one pool (`Runtime(shared_threads=True)`), which only a fresh process can have."""
    out: Times = {}
    kw = {"shared_threads": shared} if backend == "onnxruntime" else {}
    for path in paths:
        chained = ef.Runtime(path, backend=backend, threads=threads, fused=False, **kw)
        fused = ef.Runtime(path, backend=backend, threads=threads, fused=True, **kw)
        x = example_input(chained)
        out[str(path)] = {}
        for c in chained.configs:
            chained.switch(c.name)
            fused.switch(c.name)
            calls = {"chained": lambda rt=chained, x=x: rt.run(x), "fused": lambda rt=fused, x=x: rt.run(x)}
            t = time_interleaved(calls, runs, 10, 10)
            out[str(path)][c.name] = [float(np.median(t["chained"])), float(np.median(t["fused"]))]
    return out


def shared_chain_times(paths: list[Path], threads: int, runs: int) -> Times:
    """`chain_times(..., shared=True)` in a child process (ORT's global pool is once per process)."""
    cmd = [sys.executable, __file__, "--threads", str(threads), "--runs", str(runs), "--shared-child",
           *[str(p) for p in paths]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"shared-pool child failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tvm_chain_times(paths: list[Path], threads: int, runs: int) -> Times:
    """`chain_times` on TVM engines, compiled here for this host first (segments and fused graphs; the
    bundles in --workdir gain them, and a --reuse run finds them)."""
    from edgeflex.compile.tvm import compile_bundle

    for path in paths:
        for fused in (False, True):
            compile_bundle(path, "host", fused=fused, threads=threads)
    return chain_times(paths, threads, runs, shared=False, backend="tvm")


def chaining_at_scale(workdir: Path, threads: int, runs: int, sizes: tuple[int, ...],
                      shared: Times, tvm: Times | None) -> list[str]:
    """The same SN-Net (s050 -> s100, untrained: latency only) exported at larger input sizes: chained
    segments vs each config's fused graph, with a pool per ORT session (the default), with one shared
    pool (`shared`, measured by `shared_chain_times`), and on TVM (`tvm`, where measured)."""
    lines = ["| input | config | engines chained | p50 ms chained | p50 ms fused | overhead "
             "| us per extra call | shared pool: chained | fused | overhead "
             "| TVM: chained | fused | overhead |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    paths = {size: _scaled_bundle(workdir, size) for size in sizes}
    own = chain_times(list(paths.values()), threads, runs, shared=False)
    for size, path in paths.items():
        for c in ef.Bundle.open(path).configs:
            ch, fu = own[str(path)][c.name]
            sch, sfu = shared[str(path)][c.name]
            hops = len(c.segments) - 1
            tv = (tvm or {}).get(str(path), {}).get(c.name)
            tcells = f"{tv[0]:.3f} | {tv[1]:.3f} | **{(tv[0] - tv[1]) / tv[1]:+.1%}**" if tv else "- | - | -"
            lines.append(f"| {size}x{size} | {c.name} | {hops + 1} | {ch:.3f} | {fu:.3f} | "
                         f"{(ch - fu) / fu:+.1%} | {(ch - fu) * 1e3 / max(hops, 1):.1f} | {sch:.3f} | "
                         f"{sfu:.3f} | **{(sch - sfu) / sfu:+.1%}** | {tcells} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    usable = usable_cores()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=usable)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--workdir", type=Path, default=Path("benchmarks/.elastic-bundles"))
    p.add_argument("--reuse", action="store_true", help="reuse bundles already in --workdir")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224],
                   help="input sizes of the SN-Net chaining-at-scale table")
    p.add_argument("--no-tvm", action="store_true",
                   help="leave out chaining on TVM engines (compiled here first: ~2 minutes)")
    p.add_argument("--out", type=Path, help="write the section into this RESULTS.md (and the PNG beside it)")
    p.add_argument("--shared-child", nargs="+", type=Path, help=argparse.SUPPRESS)   # shared_chain_times
    a = p.parse_args(argv)
    if a.shared_child:
        print(json.dumps(chain_times(a.shared_child, a.threads, a.runs, shared=True)))
        return 0
    start = time.perf_counter()
    paths = build_bundles(a.workdir, a.reuse)
    scaled = [_scaled_bundle(a.workdir, size) for size in a.sizes]
    shared = shared_chain_times([paths["snnet-starnet"], *scaled], a.threads, a.runs)   # (not "others")
    tvm = None if a.no_tvm else tvm_chain_times([paths["snnet-starnet"], *scaled], a.threads, a.runs)
    with OthersLoad() as load:
        table, curves = config_table(paths, a.threads, a.runs)
        switch = switch_vs_reload(paths["dress-starnet-s050"], a.threads)
        layers = rowsparse_layers(a.threads, a.runs)
        scale = chaining_at_scale(a.workdir, a.threads, a.runs, tuple(a.sizes), shared, tvm)
    png = (a.out.parent if a.out else Path("benchmarks")) / "elastic_accuracy_flops.png"
    metrics = {}
    for name, path in paths.items():
        q = ef.Bundle.open(path).configs[0].quality or {}
        metrics[name] = str(q.get("metric", "held-out top-1"))
    plot(curves, png, metrics)
    sizes = []
    for name, path in paths.items():
        b = ef.Bundle.open(path)
        total = sum(f["bytes"] for f in b.manifest["files"].values())
        densest = max(c.param_bytes for c in b.configs)
        sizes.append(f"- {name}: bundle {total / 1024:.1f} KiB for {len(b.configs)} configs = "
                     f"**{total / densest:.3f}x** the largest config's weights ({densest / 1024:.1f} KiB)")
    chained = []
    sn = [ln for ln in table if ln.startswith("| snnet")]
    for ln in sn:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        ch, fu = float(cells[8]), float(cells[9])
        sch, sfu = shared[str(paths["snnet-starnet"])][cells[1]]
        line = (f"- {cells[1]}: chained {ch:.3f} ms vs fused {fu:.3f} ms: overhead "
                f"**{(ch - fu) / fu:+.1%}**; one shared ORT pool: chained {sch:.3f} ms vs fused "
                f"{sfu:.3f} ms: **{(sch - sfu) / sfu:+.1%}**")
        if tvm is not None:
            tch, tfu = tvm[str(paths["snnet-starnet"])][cells[1]]
            line += f"; TVM: chained {tch:.3f} ms vs fused {tfu:.3f} ms: **{(tch - tfu) / tfu:+.1%}**"
        chained.append(line)
    body = "\n".join([
        (f"Accuracy vs FLOPs per config (held-out top-1: DRESS on scikit-learn digits, SN-Net on "
         f"digits-corrupted, models/digits.py CORRUPTIONS; plot: `{png.name}`), latency "
        "batch 1 on ONNX Runtime. 'chosen' is what the runtime runs by default: for DRESS the kernel the "
        "exporter measured fastest per level; for SN-Net `fused=\"auto\"`, which runs each config's fused "
        "graph when the per-config weight copies fit `AUTO_FUSE_MB` (they do here) and chains the shared "
        "segments otherwise."), "",
        *table, "", f"![accuracy vs FLOPs]({png.name})", "",
        "Switching vs reloading:", "", *switch, "",
        "SN-Net segment chaining vs the config's fused graph (goal: < 10 %), the trained 32x32 bundle:", "",
        *chained, "",
        ("The same SN-Net (untrained; latency only) at larger inputs, with a pool per ORT session (the "
         "default), with one shared pool (`Runtime(shared_threads=True)`, measured in a child process: "
         "ORT sets its global pool once per process), and on TVM (engines compiled here for this host, "
         "`edgeflex compile --target host [--fused]`; TVM's pool is one per process):"), "", *scale, "",
        "Bundle size (weights stored once; goal for DRESS: <= 1.15x the densest level's weights):", "",
        *sizes, "", ("Row-sparse (ELL, level as a run-time input) vs dense Gemm with the masked weight, one "
                     "Linear layer on ONNX Runtime:"), "", *layers, "",
        *machine_and_run(a.threads, f"- others' CPU share while measuring: {load.share:.0%}; load average "
                         f"{os.getloadavg()[0]:.2f}", started=start),
    ])
    publish(a.out, SECTION, "bench_elastic", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
