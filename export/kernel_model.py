"""A bundle's kernel-level latency model for this machine (`edgeflex profile BUNDLE --kernels`): every
config's fused kernels (`export/kernels.py`) timed alone on ONNX Runtime, the configs timed whole, all in
the same shuffled rounds, fitted (`devices/kernel_predictor.py`) and stored in the bundle
(`runtime.profiles.save_kernel_model`), from where `Runtime.query` and the budget policy predict configs
that have no measured profile on the device. Export side: builds the kernels' standalone ONNX graphs (onnx);
the model it writes is read on the board with numpy alone.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeflex.args import check_int, check_path, check_str
from edgeflex.devices import host_info, kernel_predictor
from edgeflex.devices.measure import measure
from edgeflex.errors import BundleError
from edgeflex.runtime.backends.onnx_wire import inline_initializers
from edgeflex.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgeflex.runtime.bundle import Bundle
from edgeflex.runtime.plan import build_plans
from edgeflex.runtime.progress import bar

from .kernels import config_kernels, sample_kernels, without_graphs

OVERHEAD = "__run_overhead__"
PAIR = "pair:"      # measure_rounds keys of kernels timed after their producer, the two as one graph


def add_pairs(pairs: dict[str, dict], ks: list[dict[str, Any]], label: str | None = None) -> None:
    """Into `pairs`, each kernel of `ks` (a config's, with graphs) that has a producer: "<producer key> ->
    <key>" -> {"producer", "kernel" (their descriptions), "first" (the producer's key), "graph" (the two as
    one graph: export.kernels._pair_graph), "labels" (the configs it is in, where `label` is given)}."""
    for k in ks:
        if k.get("producer") is None or k.get("pair_graph") is None:
            continue
        kp = ks[k["producer"]]
        pr = pairs.setdefault(f"{kp['key']} -> {k['key']}", {
            "producer": without_graphs(kp), "kernel": without_graphs(k), "first": kp["key"],
            "graph": k["pair_graph"], "labels": set()})
        if label is not None:
            pr["labels"].add(label)


def pair_context(rounds: dict[str, list[float]], pairs: dict[str, dict]) -> dict[str, float]:
    """Each pair's second kernel's time after its producer (ms): T(pair) - T(producer alone), medians of
    the rounds (the engine's per-run cost cancels), at least a tenth of the kernel's time alone; only pairs
    timed (PAIR + key) with both kernels timed alone."""
    alone = kernel_times({k: v for k, v in rounds.items() if not k.startswith(PAIR)})
    med = {k: float(np.median(v)) for k, v in rounds.items()}
    out = {}
    for key, pr in pairs.items():
        second = pr["kernel"]["key"]
        if PAIR + key in med and pr["first"] in med and second in alone:
            out[key] = max(med[PAIR + key] - med[pr["first"]], 0.1 * alone[second])
    return out


def overhead_graph() -> bytes:
    """A Relu of one float: what one engine run costs with next to no work (taken off each kernel's time;
    a config pays it once per engine call, not per kernel)."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "overhead",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def kernel_runners(unique: dict[str, dict], threads: int) -> dict[str, Callable[[], Any]]:
    """key -> a call that runs the kernel (unique[key]["graph"]) alone on ONNX Runtime, for each kernel
    that has a graph; and OVERHEAD."""
    backend = OnnxRuntimeBackend()
    runners: dict[str, Callable[[], Any]] = {}
    rng = np.random.default_rng(0)
    for key, u in unique.items():
        if u["graph"] is None:
            continue
        g = onnx.load_from_string(u["graph"])
        xs = [rng.standard_normal([d.dim_value for d in vi.type.tensor_type.shape.dim]).astype(np.float32)
              for vi in g.graph.input]
        e = backend.load(u["graph"], [], [], threads=threads)
        runners[key] = lambda e=e, xs=xs: e._run(xs)
    e0 = backend.load(overhead_graph(), [], [], threads=threads)
    x0 = [np.ones(1, np.float32)]
    runners[OVERHEAD] = lambda: e0._run(x0)
    return runners


def kernel_times(rounds: dict[str, list[float]]) -> dict[str, float]:
    """Kernel times (median of the rounds' p50s) less the engine's per-run overhead (at least a tenth)."""
    med = {k: float(np.median(v)) for k, v in rounds.items()}
    o = med.get(OVERHEAD, 0.0)
    return {k: max(v - o, 0.1 * v) for k, v in med.items() if k != OVERHEAD}


def measure_rounds(runners: dict[str, Callable[[], Any]], block_s: dict[str, float], rounds: int, *,
                   cap: int = 2000, on_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """key -> each round's p50 ms: every key timed for ~block_s[key] per round, in shuffled rounds, so a
    machine whose speed drifts slows every key alike."""
    est = {k: measure(fn, warmup=3, runs=5)["p50_ms"] for k, fn in runners.items()}
    per_round: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for k in order:
            runs = int(min(cap, max(10, block_s[k] * 1e3 / max(est[k], 1e-3))))
            per_round[k].append(measure(runners[k], warmup=1, runs=runs)["p50_ms"])
        if on_round is not None:
            on_round(r)
    return per_round


def bundle_config_graphs(path: str | os.PathLike) -> dict[str, list[onnx.ModelProto]]:
    """Each config's graphs as it runs them unfused (one per engine call), weights inline; configs whose
    plan feeds constants (a DRESS row-sparse level) are left out."""
    out = {}
    with Bundle.open(path) as b:
        for name, plan in build_plans(b, fused=False).items():
            if plan.constants:
                continue
            out[name] = [onnx.load_from_string(inline_initializers(b.read(s.graph), s.initializers or {}))
                         for s in plan.steps]
    return out


def measure_kernel_model(path: str | os.PathLike, *, device: str = "host", threads: int = 1,
                         rounds: int = 8, sampled: int = 0, block_ms: float = 10.0,
                         kernel_block_ms: float = 3.0,
                         progress: bool = True) -> kernel_predictor.KernelPredictor:
    """Time the bundle's configs whole and their kernels alone (plus `sampled` kernels of random shapes)
    here, in `rounds` shuffled rounds, at `threads` intra-op threads (and, where `threads` > 1, the kernels
    at 1 thread too, in the same rounds: a chained config is predicted from them), and fit the kernel-level
    model of `device` (this machine; named as `edgeflex profile --device` names it)."""
    check_path("path", path)
    check_str("device", device)
    check_int("threads", threads, 1)
    check_int("rounds", rounds, 1)
    check_int("sampled", sampled, 0)
    graphs = bundle_config_graphs(path)
    if len(graphs) < 2:
        raise BundleError(f"bundle {str(path)!r} has {len(graphs)} config(s) with plain graphs: a kernel "
                          "model is fitted on at least 2 configs timed whole")
    backend = OnnxRuntimeBackend()
    per_config, unique, pairs = {}, {}, {}
    for k in sample_kernels(sampled):
        unique.setdefault(k["key"], {"kernel": k, "graph": k["graph"]})
    cfg_runners: dict[str, Callable[[], Any]] = {}
    with Bundle.open(path) as b:
        shape = [1 if not isinstance(d, int) else d for d in b.inputs[0].shape]
        dtype = b.inputs[0].dtype
        # a manifest written before kernels recorded their producers: `query` predicts its configs from
        # kernels without producers, so the model is fitted on those too (re-export to use the pairs)
        old = [c.name for c in b.configs
               if any("producer" not in k for k in (c.costs or {}).get("kernels", []))]
    if old and progress:
        print(f"note: {str(path)!r} was exported before kernels recorded their producers ({len(old)} "
              "config(s)): the model times no pairs for them; export the bundle again to use them",
              file=sys.stderr)
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    for name, gs in graphs.items():
        ks = config_kernels(gs, with_graphs=True)
        if name in old:
            ks = [k | {"producer": None, "pair_graph": None} for k in ks]
        for k in ks:
            unique.setdefault(k["key"], {"kernel": k, "graph": k["graph"]})
        add_pairs(pairs, ks)
        per_config[name] = [without_graphs(k) for k in ks]
        engines = [backend.load(g.SerializeToString(), [], [], threads=threads) for g in gs]

        def run(engines=engines):
            h = [x]
            for e in engines:
                h = e._run(h)[:1]
            return h

        cfg_runners[f"config:{name}"] = run
    ker = kernel_runners(unique, threads)
    # each kernel after its producer, the two as one graph: in a config it runs on what the producer just
    # wrote, with the engine's threads already at work (at 2 threads a conv timed alone ran up to 2x slower)
    paired = {PAIR + k: fn for k, fn in kernel_runners(pairs, threads).items() if k != OVERHEAD}
    serial = {f"serial:{k}": fn for k, fn in kernel_runners(unique, 1).items()} if threads > 1 else {}
    block = dict.fromkeys(cfg_runners, block_ms / 1e3) | \
        dict.fromkeys([*ker, *paired, *serial], kernel_block_ms / 1e3)
    pbar = bar(rounds, "kernel model rounds", show=progress, unit="round")
    rounds_ms = measure_rounds(cfg_runners | ker | paired | serial, block, rounds,
                               on_round=lambda r: pbar.update())
    pbar.close()

    def samples(prefix: str) -> list[tuple]:
        kms = kernel_times({k[len(prefix):]: v for k, v in rounds_ms.items()
                            if k.startswith(prefix) and k[len(prefix):] in ker})
        return [(without_graphs(u["kernel"]), kms[key])
                for key, u in unique.items() if key in kms]

    csamples = [(per_config[n], float(np.median(rounds_ms[f"config:{n}"])), n) for n in per_config]
    ctx = pair_context({k: v for k, v in rounds_ms.items() if k in ker or k in paired}, pairs)
    km = kernel_predictor.fit(samples(""), csamples, device=device, threads=threads,
                              serial_samples=samples("serial:") if serial else None,
                              pair_samples=[(pairs[k]["producer"], pairs[k]["kernel"], ms)
                                            for k, ms in ctx.items()])
    km.env = {"host": host_info()}
    return km


__all__ = ["OVERHEAD", "PAIR", "add_pairs", "bundle_config_graphs", "kernel_runners", "kernel_times",
           "measure_kernel_model", "measure_rounds", "overhead_graph", "pair_context"]
