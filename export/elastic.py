"""Elastic bundles: many configs over shared weights stored once.

Owns writing segment graphs whose large tensors move into one content-addressed `weights.bin` (ONNX
external data; identical tensors stored once), and the two elastic exports: DRESS (one graph, the level
picks a masked copy of the stored dense weights derived at load) and SN-Net (segments chained per config).
Every config is validated against PyTorch in that config before anything is written.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edgeflex.devices.measure import median_ms
from edgeflex.errors import ExportError
from edgeflex.kernels import rowsparse
from edgeflex.kernels.rowsparse import ell_tensors
from edgeflex.runtime.bundle import Bundle, Config, Fused, TensorSpec, write_bundle
from edgeflex.runtime.families.dress import DressLevel
from edgeflex.runtime.store import target as store_target

from . import analysis
from .core import STRATEGIES, capture, capture_with_strategy, default_threads, manifest_base
from .costs import config_costs
from .engines import check_engine, engine_record
from .validate import example_specs, validate_fn

WEIGHTS = "weights.bin"
ALIGN = 64
MIN_EXTERNAL_BYTES = 128       # smaller constants (shapes, axes) stay inside their graph


class WeightStore:
    """Accumulates tensors into one aligned blob; identical contents are stored once."""

    def __init__(self):
        self.blob = bytearray()
        self.index: dict[str, dict[str, Any]] = {}
        self._by_hash: dict[str, str] = {}

    def add(self, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode() + arr.tobytes()).hexdigest()
        if h in self._by_hash:
            return self._by_hash[h]
        self.blob.extend(b"\0" * (-len(self.blob) % ALIGN))
        tid = f"t{len(self.index)}"
        self.index[tid] = {"file": WEIGHTS, "offset": len(self.blob), "bytes": arr.nbytes,
                           "dtype": arr.dtype.str, "shape": list(arr.shape)}
        self.blob.extend(arr.tobytes())
        self._by_hash[h] = tid
        return tid

    def externalize(self, model: onnx.ModelProto) -> tuple[bytes, dict[str, str]]:
        """Move the model's large initialisers into the store; the graph keeps external references."""
        m = onnx.ModelProto()
        m.CopyFrom(model)
        refs = {}
        for t in m.graph.initializer:
            arr = numpy_helper.to_array(t)
            if arr.nbytes < MIN_EXTERNAL_BYTES:
                continue
            tid = self.add(arr)
            refs[t.name] = tid
            meta = self.index[tid]
            t.ClearField("raw_data")
            for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(f)
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            where = (("location", WEIGHTS), ("offset", str(meta["offset"])), ("length", str(meta["bytes"])))
            for k, v in where:
                e = t.external_data.add()
                e.key, e.value = k, v
        return m.SerializeToString(), refs


def _ort_session(graph: bytes, store: WeightStore, refs: dict[str, str], threads: int,
                 overrides: dict[str, np.ndarray] | None = None, inputs: list | None = None):
    """The graph on ONNX Runtime with the stored weights (and `overrides`), its inputs checked against
    `inputs` when it runs first in a plan (`plan_call`)."""
    from edgeflex.runtime.backends.onnxruntime import OnnxRuntimeBackend

    blob = bytes(store.blob)
    inits = {}
    for name, tid in refs.items():
        t = store.index[tid]
        inits[name] = np.frombuffer(blob, np.dtype(t["dtype"]), t["bytes"] // np.dtype(t["dtype"]).itemsize,
                                    t["offset"]).reshape(t["shape"])
    inits.update(overrides or {})
    return OnnxRuntimeBackend().load(graph, inputs or [], [], threads=threads, initializers=inits)


def plan_call(engines: list, constants: tuple = ()):
    """Engines (the first loaded with its input specs) as the runtime runs them: `Backend.compose`."""
    from edgeflex.runtime.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend().compose(engines, constants)


def _specs_json(tensors, names) -> list[dict]:
    return [TensorSpec(n, (None, *t.shape[1:]), "float32").to_json() for t, n in zip(tensors, names)]


# --- DRESS ------------------------------------------------------------------------------------------------

def export_dress(model, example: torch.Tensor, path: str | os.PathLike, *, name: str | None = None,
                 quality: list[dict] | None = None, tolerance: float = 1e-4, threads: int | None = None,
                 metadata: dict | None = None, overwrite: bool = False, engine: str | None = None) -> Bundle:
    """Export a `models.dress.DressModel`: one graph, one stored dense copy of each prunable weight plus its
    2-bit level codes; config `density-NN` per level. `quality`: per level, in level order (default: the
    model's own `quality`, which `ef.elastic.dress` measures on the user's held-out data). `engine`: as
    `ef.export` takes it (the graphs are the same for every engine; "tensorrt" checks them)."""
    engine = check_engine(engine)
    store_target(path, overwrite=overwrite, new=True)     # refuse before any work
    if quality is None:
        quality = getattr(model, "quality", None)
    threads = threads or default_threads()
    model = model.eval()
    levels = list(model.levels)
    dense = model.dense_copy(0).eval()
    graph = onnx.load_from_string(capture(dense, (example,), ["x"], ["y"]))
    # codes by initialiser, in the initialiser's layout (a Linear on tokens is captured as MatMul by W^T)
    codes = {init: (c.numpy().T if transposed else c.numpy()).astype(np.uint8)
             for pname, c in model.codes.items()
             for init, transposed in [_locate(graph, pname, dense.get_parameter(pname))]}
    store = WeightStore()
    graph_bytes, refs = store.externalize(graph)
    masked_spec = {}
    for init, c in codes.items():
        masked_spec[init] = {"weight": refs[init], "codes": store.add(rowsparse.pack_codes(c)),
                             "shape": list(c.shape)}
    # The row-sparse variant: Linear layers as the ELL kernel, its tensors derived at load from the same
    # stored weight and codes (nothing more is stored). Conv layers keep the dense op (no ORT lowering).
    sparse_graph, sparse_refs, sparse_layers = _sparse_variant(graph_bytes, refs, masked_spec, len(levels))
    sparse_engine = None
    if sparse_graph is not None:
        derived = {}
        for init in sparse_layers:
            w = _stored(store, masked_spec[init]["weight"])
            derived.update(ell_tensors(init, w, codes[init], len(levels)))
        sparse_engine = _ort_session(sparse_graph, store, sparse_refs, threads, derived,
                                     example_specs((example,)))
    # Validate every level through the paths the runtime takes: stored weight x unpacked codes.
    configs, checks = [], []
    stats = model_level_stats(model, example)
    costs = config_costs([graph])        # the dense kernel runs every level: one cost for all
    x1 = example[:1].numpy()
    for s, density in enumerate(levels):
        overrides = {init: rowsparse.masked(_stored(store, d["weight"]), codes[init], s)
                     for init, d in masked_spec.items()}
        masked_run = plan_call([_ort_session(graph_bytes, store, refs, threads, overrides,
                                        example_specs((example,)))])
        reference = model.dense_copy(s).eval()
        label = f"level {s} (density {density:g})"
        check = validate_fn(reference, masked_run, (example,), tolerance=tolerance, label=label)
        measured = {"dense": round(median_ms(lambda run=masked_run, x1=(x1,): run(x1)), 4)}
        if sparse_engine is not None:
            sparse = plan_call([sparse_engine], (np.array(s, np.int64),))
            sparse_check = validate_fn(reference, sparse, (example,), tolerance=tolerance,
                                       label=label + " row-sparse kernel")
            check = max(check, sparse_check, key=lambda c: c.max_rel_err)
            measured["sparse"] = round(median_ms(lambda run=sparse, x1=(x1,): run(x1)), 4)
        checks.append(check.to_json())
        level = DressLevel(s, min(measured, key=measured.get), density, measured, threads)
        configs.append(Config(f"density-{round(density * 100)}", quality=(quality or [None] * len(levels))[s],
                              flops=stats[s]["flops"], param_bytes=stats[s]["param_bytes"],
                              segments=("main",), costs=costs, kind=level).to_json())
    dense_weight_bytes = sum(int(np.prod(d["shape"])) * 4 for d in masked_spec.values())
    manifest = manifest_base(model, (example,), ["x"], [dense(example)], ["y"], name or _stem(path))
    segments = {"main": {"graph": "graphs/main.onnx", "tensors": refs,
                         "inputs": manifest["inputs"], "outputs": manifest["outputs"]}}
    files = {"graphs/main.onnx": graph_bytes}
    if sparse_graph is not None:
        segments["main.sparse"] = {"graph": "graphs/main.sparse.onnx", "tensors": sparse_refs,
                                   "inputs": manifest["inputs"], "outputs": manifest["outputs"],
                                   "derived_ell": sparse_layers}
        files["graphs/main.sparse.onnx"] = sparse_graph
    manifest.update({
        "configs": configs,
        "segments": segments,
        "tensors": store.index,
        "dress": {"densities": levels, "segments": {"main": {k: {"weight": v["weight"], "codes": v["codes"]}
                                                             for k, v in masked_spec.items()}},
                  "storage": {"dense_weight_bytes": dense_weight_bytes,
                              "codes_bytes": sum(store.index[v["codes"]]["bytes"]
                                                 for v in masked_spec.values())},
                  "kernel_choice": "per level, the faster kernel at batch 1 as measured at export "
                                   "(dense = masked weights; sparse = row-sparse ELL, Linear layers only)"},
        "export": {"strategy": "torch.onnx dynamo (dense backbone) + edgeflex DRESS level codes",
                   "validation": _worst(checks), "per_config": checks,
                   "opset": graph.opset_import[0].version, **engine_record(engine, files)},
        "metadata": metadata or {},
    })
    return write_bundle(path, manifest, {**files, WEIGHTS: bytes(store.blob)}, overwrite=overwrite)


def _locate(graph: onnx.ModelProto, pname: str, weight: torch.Tensor) -> tuple[str, bool]:
    """The initialiser holding prunable weight `pname`, and whether it holds it transposed: by name, else by
    value (torch.onnx folds the transpose of a Linear applied to tokens, [B, N, C], into a new constant)."""
    w = weight.detach().numpy()
    by_name = next((t for t in graph.graph.initializer if t.name == pname), None)
    if by_name is not None and list(by_name.dims) == list(w.shape):
        return pname, False
    for t in graph.graph.initializer:
        dims = list(t.dims)
        if w.ndim == 2 and dims == list(w.T.shape) and np.array_equal(numpy_helper.to_array(t), w.T):
            return t.name, True
        if dims == list(w.shape) and np.array_equal(numpy_helper.to_array(t), w):
            return t.name, False
    raise ExportError(f"prunable weight {pname!r} {list(w.shape)} is not among the ONNX initialisers, as "
                      "itself or transposed (the capture changed it); leave it dense with prunable=")


def _stored(store: WeightStore, tid: str) -> np.ndarray:
    t = store.index[tid]
    dt = np.dtype(t["dtype"])
    return np.frombuffer(bytes(store.blob[t["offset"]:t["offset"] + t["bytes"]]), dt).reshape(t["shape"])


def _sparse_variant(graph_bytes: bytes, refs: dict[str, str], masked_spec: dict, n_levels: int) -> tuple:
    """The graph with each prunable Linear (Gemm, transB=1) replaced by the row-sparse ELL kernel whose
    level is the run-time int64 input `level`. None unless every prunable layer is such a Gemm."""
    from onnx import TensorProto, helper

    g = onnx.load_from_string(graph_bytes)
    gemms = [n for n in g.graph.node if n.op_type == "Gemm" and n.input[1] in masked_spec
             and _attr(n, "transA", 0) == 0 and _attr(n, "transB", 0) == 1
             and _attr(n, "alpha", 1.0) == 1.0 and _attr(n, "beta", 1.0) == 1.0]
    # NOTE: all or nothing: a prunable layer left as its dense op here (a Linear on tokens, captured as
    # MatMul; a Conv) would run its stored dense weight at every level, while the level input only reaches
    # the ELL kernels (a transformer's row-sparse graph was 0.5 off PyTorch at density 50 %)
    if not gemms or {n.input[1] for n in gemms} != set(masked_spec):
        return None, None, []
    g.graph.input.append(helper.make_tensor_value_info("level", TensorProto.INT64, []))
    consts = [helper.make_tensor("ell.one", TensorProto.INT64, [1], [1]),
              helper.make_tensor("ell.zero", TensorProto.INT64, [1], [0]),
              helper.make_tensor("ell.axis2", TensorProto.INT64, [1], [2])]
    g.graph.initializer.extend(consts)
    replaced = {id(n): [] for n in gemms}
    layers = []
    for n in gemms:
        w, out_f = n.input[1], masked_spec[n.input[1]]["shape"][0]
        in_f = masked_spec[w]["shape"][1]
        layers.append(w)
        for suffix, dtype, dims in ((".ell_values", TensorProto.FLOAT, [out_f, in_f]),
                                    (".ell_index", TensorProto.INT64, [out_f, in_f]),
                                    (".ell_k", TensorProto.INT64, [n_levels])):
            t = g.graph.initializer.add()
            t.name, t.data_type = w + suffix, dtype
            t.dims.extend(dims)
            _mark_derived(t)
        v = w + "."
        replaced[id(n)] += [helper.make_node("Gather", [w + ".ell_k", "ell.level1"], [v + "k"]),
                  helper.make_node("Slice", [w + ".ell_values", "ell.zero", v + "k", "ell.one"], [v + "vk"]),
                  helper.make_node("Slice", [w + ".ell_index", "ell.zero", v + "k", "ell.one"], [v + "ik"]),
                  helper.make_node("Gather", [n.input[0], v + "ik"], [v + "xg"], axis=1),
                  helper.make_node("Mul", [v + "xg", v + "vk"], [v + "prod"]),
                  helper.make_node("ReduceSum", [v + "prod", "ell.axis2"],
                                   [v + "acc" if len(n.input) > 2 else n.output[0]], keepdims=0)]
        if len(n.input) > 2:
            replaced[id(n)].append(helper.make_node("Add", [v + "acc", n.input[2]], [n.output[0]]))
    nodes = [helper.make_node("Reshape", ["level", "ell.one"], ["ell.level1"])]
    for n in g.graph.node:
        nodes += replaced.get(id(n), [n])
    del g.graph.node[:]
    g.graph.node.extend(nodes)
    used = {i for n in g.graph.node for i in n.input}
    kept = [t for t in g.graph.initializer if t.name in used]
    del g.graph.initializer[:]
    g.graph.initializer.extend(kept)
    sparse_refs = {k: v for k, v in refs.items() if k in used}
    return g.SerializeToString(), sparse_refs, layers


def _attr(node, name: str, default):
    from onnx import helper
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _mark_derived(t) -> None:
    # NOTE: an external tensor with no bytes in the bundle: the runtime derives it at load (`ell_tensors`)
    # and hands it to the engine from memory; nothing ever reads this location.
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, val in (("location", "derived-at-load"), ("offset", "0"), ("length", "0")):
        e = t.external_data.add()
        e.key, e.value = k, val


def model_level_stats(model, example) -> list[dict]:
    from edgeflex.models.dress import level_stats
    return level_stats(model, example[:1])


# --- SN-Net -----------------------------------------------------------------------------------------------

def export_snnet(model, example: torch.Tensor, path: str | os.PathLike, *, name: str | None = None,
                 quality: dict[str, dict] | None = None, tolerance: float = 1e-4, threads: int | None = None,
                 metadata: dict | None = None, overwrite: bool = False, engine: str | None = None) -> Bundle:
    """Export a stitched network (`models.stitch.Stitched`: an `SNNet`, or the user's anchors stitched by
    `ef.elastic.stitch`): every segment (anchor blocks, stitching layers) once; a config is the ordered list
    of segments it chains. `quality`: config name -> metric dict (default: the model's own `quality`, which
    `ef.elastic.stitch` measures on the user's held-out data). `engine`: as `ef.export` takes it (the
    graphs are the same for every engine; "tensorrt" checks them)."""
    engine = check_engine(engine)
    store_target(path, overwrite=overwrite, new=True)     # refuse before any work
    from edgeflex.models.stitch import config_stats, segment_plan

    if quality is None:
        quality = getattr(model, "quality", None)

    threads = threads or default_threads()
    model = model.eval()
    segments, plans = segment_plan(model)
    # Each segment's example input: what reaches it on the first config that uses it.
    seg_example: dict[str, torch.Tensor] = {}
    for chain in plans.values():
        h = example
        with torch.no_grad():
            for seg in chain:
                seg_example.setdefault(seg, h)
                h = segments[seg].eval()(h)
    store = WeightStore()
    seg_manifest, graphs, engines, protos = {}, {}, {}, {}
    captured = {seg: capture_with_strategy(module.eval(), (seg_example[seg],), ["x"], ["y"])[:2]
                for seg, module in segments.items()}
    # one strategy for every segment: a config's fused graph merges its segments, which needs one IR
    # version and opset (dynamo fixed the batch of some ViT segments, so those fell back to torchscript)
    order = [label for label, _ in STRATEGIES]
    common = max((how for _, how in captured.values()), key=order.index)
    for seg, (_, how) in captured.items():
        if how != common:
            captured[seg] = capture_with_strategy(segments[seg].eval(), (seg_example[seg],), ["x"], ["y"],
                                                  only=common)[:2]
    for seg, module in segments.items():
        proto = onnx.load_from_string(captured[seg][0])
        gbytes, refs = store.externalize(proto)
        protos[seg] = proto
        graphs[f"graphs/{_safe(seg)}.onnx"] = gbytes
        with torch.no_grad():
            out = module(seg_example[seg])
        seg_manifest[seg] = {"graph": f"graphs/{_safe(seg)}.onnx", "tensors": refs,
                             "inputs": _specs_json([seg_example[seg]], ["x"]),
                             "outputs": _specs_json([out], ["y"]),
                             "flops": analysis.flops(proto)}
        engines[seg] = (gbytes, refs)
    loaded = {seg: _ort_session(g, store, r, threads, None,
                                [TensorSpec.from_json(d) for d in seg_manifest[seg]["inputs"]])
              for seg, (g, r) in engines.items()}
    stats = config_stats(model, example[:1])
    configs, checks = [], []
    for cfg, chain in plans.items():
        model.set_config(cfg)
        check = validate_fn(model, plan_call([loaded[seg] for seg in chain]), (example,), tolerance=tolerance,
                            label=f"config {cfg}")
        checks.append(check.to_json())
        # The store is content-addressed: the fused graph's tensors resolve to the segments' stored copies.
        fused_bytes, fused_refs = store.externalize(fuse_chain([protos[seg] for seg in chain]))
        fused_path = f"graphs/fused/{_safe(cfg)}.onnx"
        graphs[fused_path] = fused_bytes
        configs.append(Config(cfg, quality=(quality or {}).get(cfg), flops=stats[cfg]["flops"],
                              param_bytes=stats[cfg]["param_bytes"], segments=tuple(chain),
                              costs=config_costs([protos[seg] for seg in chain]),
                              fused=Fused(fused_path, fused_refs)).to_json())
    model.set_config(next(iter(plans)))
    with torch.no_grad():
        y = model(example)
    manifest = manifest_base(model, (example,), ["x"], [y], ["y"], name or _stem(path))
    manifest.update({
        "configs": configs, "segments": seg_manifest, "tensors": store.index,
        "export": {"strategy": f"{common} per segment", "validation": _worst(checks),
                   "per_config": checks, **engine_record(engine, graphs)},
        "metadata": metadata or {},
    })
    return write_bundle(path, manifest, {**graphs, WEIGHTS: bytes(store.blob)}, overwrite=overwrite)


def fuse_chain(protos: list[onnx.ModelProto]) -> onnx.ModelProto:
    """One graph running `protos` in order (each one's single output feeds the next's input)."""
    from onnx import compose

    fused = compose.add_prefix(protos[0], "s0.")
    for i, p in enumerate(protos[1:], start=1):
        p = compose.add_prefix(p, f"s{i}.")
        fused = compose.merge_models(fused, p, io_map=[(fused.graph.output[0].name, p.graph.input[0].name)])
    # keep the bundle's input/output names
    _rename(fused, fused.graph.input[0].name, protos[0].graph.input[0].name)
    _rename(fused, fused.graph.output[0].name, protos[-1].graph.output[0].name)
    return fused


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name == old:
            vi.name = new
    for node in model.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]


def _worst(checks: list[dict]) -> dict:
    return max(checks, key=lambda c: c["max_rel_err"])


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def _stem(path) -> str:
    return os.path.basename(os.fspath(path)).removesuffix(".efx")
