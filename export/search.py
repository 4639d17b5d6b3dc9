"""Hardware-aware search over configs that compose per layer, added to the bundle as configs of their own.

Owns the search space of a bundle (DRESS: a level per prunable weight, where the bundle's configs have one
level for all; SN-Net: paths that stitch more than once, from one anchor to the next and on, over the
stitching layers the bundle has), the costs, FLOPs and bytes of each new combination, the held-out quality
of every point (run by `Runtime` on the user's data), the latency predictor's estimate for the device, the
finalists measured when the device is this host, the Pareto front, and writing the front's new configs into
the bundle (no weight is stored again: a combination reuses the stored segments, weights and codes). Not
the predictor (`devices/predictor.py`) nor timing (`runtime/profiles.py`). Export side: reads ONNX graphs
(costs, fused chains); no torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeflex.args import check_bool, check_int, check_real, check_str
from edgeflex.devices import check_device, get_device, host_info, path_name
from edgeflex.devices.predictor import fit
from edgeflex.errors import BundleError, DataError, UsageError
from edgeflex.kernels.rowsparse import ell_tensors, unpack_codes
from edgeflex.runtime.bundle import Bundle, model_id, update_bundle
from edgeflex.runtime.profiles import measure_profile
from edgeflex.runtime.progress import bar as progress_bar
from edgeflex.runtime.runtime import Runtime

from .costs import _shapes, _with_shapes, config_costs
from .elastic import fuse_chain

log = logging.getLogger(__name__)

# Defaults. `max_candidates`: combinations scored (a DRESS space larger than this is sampled, seeded);
# `finalists`: predicted-front points measured on this host; `tie`: latencies within this share count as
# equal on the front (two configs running one graph differ by timing noise only).
SEARCH_RECIPE = {"max_candidates": 128, "max_stitches": 3, "finalists": 12, "max_add": 6, "tie": 0.03,
                 "min_seconds": 0.6}
RECORD = "search/{device}.json"
SCORE_CHUNK = 32


@dataclass
class Point:
    """One config in the search: hand-made (already in the bundle) or found (a new combination)."""

    name: str
    config: dict[str, Any]                 # its manifest object (found: what would be written)
    new: bool
    quality: float | None = None           # on the search's held-out data
    predicted_ms: float | None = None
    measured_ms: float | None = None
    calibration_only: bool = False         # timed to fit the predictor, never added (a level's other kernel)

    @property
    def ms(self) -> float | None:
        return self.measured_ms if self.measured_ms is not None else self.predicted_ms

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "new": self.new, "quality": self.quality,
                "predicted_ms": self.predicted_ms,
                "measured_ms": self.measured_ms, "flops": self.config.get("flops"),
                "param_bytes": self.config.get("param_bytes"),
                **({"segments": self.config["segments"]} if "segments" in self.config else {}),
                **({"dress": self.config["dress"]} if "dress" in self.config else {})}


@dataclass
class SearchResult:
    """What `search` found: every point scored, the front, the configs added, how latency was obtained."""

    bundle: str
    device: str
    metric: str
    direction: str
    obtained: str                          # "measured" (this host) or "predicted"
    points: list[Point]
    front: list[str]
    added: list[str]
    predictor: dict[str, Any]
    data: dict[str, Any]
    threads: int
    latency_ms: float | None = None
    plot: str | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict, repr=False)     # the new configs' fused graphs
    model: str = ""                        # the model_id of the bundle searched

    def point(self, name: str) -> Point:
        return next(p for p in self.points if p.name == name)

    def to_json(self) -> dict[str, Any]:
        return {"format": 1, "bundle": self.bundle, "device": self.device, "metric": self.metric,
                "direction": self.direction, "obtained": self.obtained, "threads": self.threads,
                "latency_ms": self.latency_ms, "front": self.front, "added": self.added,
                "predictor": self.predictor, "data": self.data, "host": host_info(), "notes": self.notes,
                "points": [p.to_json() for p in self.points if not p.calibration_only]}

    def table(self) -> str:
        """The front and the hand-made configs, one row each, fastest first."""
        shown = (p for p in self.points if not p.calibration_only and (not p.new or p.name in self.front))
        rows = sorted(shown, key=lambda p: p.ms)
        width = max(len(p.name) for p in rows)
        lines = [f"{'config':<{width}}  {'':5}  {self.metric:>7}  {'ms':>8}  {'':9}  front"]
        for p in rows:
            how = "measured" if p.measured_ms is not None else "predicted"
            tag = "added" if p.name in self.added else ("found" if p.new else "")
            lines.append(f"{p.name:<{width}}  {tag:5}  {p.quality:7.4f}  {p.ms:8.4f}  {how:9}  "
                         f"{'*' if p.name in self.front else ''}")
        return "\n".join(lines)


class _Staged(Bundle):
    """A verified bundle seen with other configs and files not yet written (the search's candidates), so that
    `Runtime` can load and time them before anything is committed."""

    def __init__(self, base: Bundle, configs: list[dict[str, Any]], files: dict[str, bytes]):
        super().__init__(base.path, {**base.manifest, "configs": configs}, version=base.version)
        self._base, self._files = base, files

    def sha256(self, rel: str) -> str:
        if rel in self._files:
            return hashlib.sha256(self._files[rel]).hexdigest()
        return self._base.sha256(rel)

    def read(self, rel: str) -> bytes:
        return self._files[rel] if rel in self._files else self._base.read(rel)

    def close(self) -> None:            # the base bundle is the caller's to close
        return None


# --- the search spaces -------------------------------------------------------------------------------------

def family_of(b: Bundle) -> str:
    """'dress' or 'snnet' where configs compose per layer; else one UsageError line."""
    if "dress" in b.manifest:
        return "dress"
    if any(s.startswith("stitch.") for c in b.configs for s in c.segments):
        return "snnet"
    raise UsageError(f"bundle {b.name!r} ({b.family}) has no configs that compose per layer: search covers "
                     "DRESS bundles (a level per layer) and stitched SN-Net bundles (several stitches)")


def _protos(b: Bundle, names: Sequence[str]) -> dict[str, onnx.ModelProto]:
    """The segments' graphs (weights stay external: costs read only their dims)."""
    return {n: onnx.load_from_string(b.read(b.segments[n].graph)) for n in names}


def _param_bytes(protos: Sequence[onnx.ModelProto]) -> int:
    """float32 bytes of the distinct float initialisers the graphs hold (shared weights counted once)."""
    seen: dict[str, int] = {}
    for p in protos:
        for t in p.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1:
                ext = {e.key: e.value for e in t.external_data}
                key = f"{ext.get('offset')}:{ext.get('length')}" if ext else f"{id(p)}:{t.name}"
                seen[key] = 4 * int(np.prod(t.dims))
    return sum(seen.values())


def snnet_space(b: Bundle, *, max_stitches: int, max_candidates: int) -> tuple[list[dict], dict[str, bytes]]:
    """Paths through the anchors that take two or more of the bundle's stitches: the front anchor runs to a
    stitch, the next anchor resumes where that stitch enters and runs at least one segment to its own stitch,
    and so on; the last anchor runs to its head. Returns the new configs' manifest objects (no quality yet)
    and their fused graphs (files to add) where the bundle's configs have fused graphs."""
    chains = {c.name: list(c.segments) for c in b.configs
              if not any(s.startswith("stitch.") for s in c.segments)}
    edges: dict[tuple[str, int], list[tuple[str, str, int]]] = {}
    for c in b.configs:
        stitches = [i for i, s in enumerate(c.segments) if s.startswith("stitch.")]
        if len(stitches) != 1:
            continue
        i = stitches[0]
        head, tail = list(c.segments[:i]), list(c.segments[i + 1:])
        front = next((a for a, ch in chains.items() if ch[:len(head)] == head), None)
        back = next((a for a, ch in chains.items() if tail and ch[len(ch) - len(tail):] == tail), None)
        if front is None or back is None:
            raise BundleError(f"config {c.name!r} chains {c.segments}, which is no anchor's prefix, a stitch "
                              "and another anchor's suffix; re-export the bundle")
        edges.setdefault((front, len(head)), []).append((c.segments[i], back, len(chains[back]) - len(tail)))
    paths: list[tuple[list[str], list[str]]] = []

    def walk(anchor: str, pos: int, segs: list[str], via: list[str]) -> None:
        if len(paths) >= max_candidates:
            return
        if len(via) >= 2:
            paths.append((segs + chains[anchor][pos:], via))
        if len(via) >= max_stitches:
            return
        for (front, stop), outs in sorted(edges.items()):
            if front != anchor or stop <= pos:
                continue
            for stitch, back, start in outs:
                walk(back, start, segs + chains[anchor][pos:stop] + [stitch], via + [stitch])

    for anchor in chains:
        walk(anchor, 0, [], [])
    fused = all(c.fused is not None for c in b.configs)
    tensors = b.tensors() if fused else {}
    seen = {c.name for c in b.configs}
    protos = _protos(b, list(b.segments))
    configs, files = [], {}
    for segs, via in paths:
        name = "+".join(s.removeprefix("stitch.") for s in via)
        if name in seen:
            continue
        seen.add(name)
        chain = [protos[s] for s in segs]
        cfg = {"name": name, "quality": None,
               "flops": sum(int(b.manifest["segments"][s].get("flops") or 0) for s in segs),
               "param_bytes": _param_bytes(chain), "segments": segs, "costs": config_costs(chain)}
        if fused:
            graph = f"graphs/fused/{_safe(name)}.onnx"
            refs = {f"s{i}.{init}": tid for i, s in enumerate(segs)
                    for init, tid in b.segments[s].tensors.items()}
            files[graph] = _fused_graph(b, segs, chain, tensors, refs)
            cfg["fused"] = {"graph": graph, "tensors": refs}
        configs.append(cfg)
    return configs, files


def _fused_graph(b: Bundle, segs: Sequence[str], chain: Sequence[onnx.ModelProto],
                 tensors: dict[str, np.ndarray], refs: dict[str, str]) -> bytes:
    """`export.elastic.fuse_chain` of the segments, whose weights stay where the bundle stores them: the
    segments' external initialisers are filled from the stored tensors for the merge (ONNX's checker reads
    them), then pointed back at the same bytes of the weights file."""
    filled = []
    for s, proto in zip(segs, chain):
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        for t in p.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                arr = np.array(tensors[b.segments[s].tensors[t.name]])
                t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
        filled.append(p)
    fused = fuse_chain(filled)
    for t in fused.graph.initializer:
        if t.name in refs:
            meta = b.tensor_index[refs[t.name]]
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            where = (("location", meta["file"]), ("offset", str(meta["offset"])),
                     ("length", str(meta["bytes"])))
            for k, v in where:
                e = t.external_data.add()
                e.key, e.value = k, v
    return fused.SerializeToString()


def _uses(graph: onnx.ModelProto, weights: Sequence[str]) -> dict[str, int]:
    """Per weight: how often each of its elements is multiplied at batch 1 (output positions of its Conv,
    rows of its MatMul/Gemm), from ONNX shape inference: what `models.dress.count_flops` counts in torch."""
    shapes, _ = _shapes(_with_shapes(graph, None))
    uses = {}
    for node in graph.graph.node:
        for w in weights:
            if w in node.input[1:2] and node.op_type in ("Conv", "Gemm", "MatMul"):
                out = shapes.get(node.output[0])
                if out is None:
                    raise BundleError(f"the shape of {node.op_type} on {w!r} does not resolve at batch 1")
                channels = out[1] if node.op_type == "Conv" else out[-1]
                uses[w] = int(np.prod(out)) // int(channels)
    missing = [w for w in weights if w not in uses]
    if missing:
        raise BundleError(f"DRESS weights {missing} feed no Conv/Gemm/MatMul of the main graph; re-export")
    return uses


def _sparse_costs(sparse: onnx.ModelProto, ks: dict[str, int]) -> dict[str, Any]:
    """Costs of the row-sparse graph with each weight's k fixed (its level's), so shapes resolve."""
    g = onnx.ModelProto()
    g.CopyFrom(sparse)
    keep = [n for n in g.graph.node if not (n.op_type == "Gather" and n.output[0].endswith(".k")
                                            and n.output[0][:-2] in ks)]
    del g.graph.node[:]
    g.graph.node.extend(keep)
    for w, k in ks.items():
        g.graph.initializer.append(onnx.numpy_helper.from_array(np.array([k], np.int64), f"{w}.k"))
    return config_costs([g])


def dress_space(b: Bundle, *, max_candidates: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Mixes of levels, one per prunable weight, that are not one level for all: every mix when there are
    at most `max_candidates`, else that many drawn (seeded). Each runs on the kernel the predictor will
    judge faster (both are returned, the search keeps one). Returns (candidates, calibration): calibration
    holds the bundle's levels on the kernel the exporter did not pick, timed to fit the predictor only."""
    section = b.manifest["dress"]
    n_levels, weights = len(section["densities"]), list(section["segments"]["main"])
    tensors = b.tensors()
    codes = {w: unpack_codes(tensors[d["codes"]], tensors[d["weight"]].shape)
             for w, d in section["segments"]["main"].items()}
    nnz = {w: [int((c >= s).sum()) for s in range(n_levels)] for w, c in codes.items()}
    main = onnx.load_from_string(b.read(b.segments["main"].graph))
    uses = _uses(main, weights)
    sparse = None
    if "main.sparse" in b.segments:
        sparse = onnx.load_from_string(b.read(b.segments["main.sparse"].graph))
        derived = set(b.manifest["segments"]["main.sparse"]["derived_ell"])
        k_of = {w: ell_tensors(w, tensors[d["weight"]], codes[w], n_levels)[f"{w}.ell_k"]
                for w, d in section["segments"]["main"].items() if w in derived}
    levels = sorted((c for c in b.configs if c.kind is not None), key=lambda c: c.kind.level)
    if [c.kind.level for c in levels] != list(range(n_levels)):
        raise BundleError(f"bundle {b.name!r} has DRESS configs for levels {[c.kind.level for c in levels]}, "
                          f"expected one per level 0..{n_levels - 1}")
    base = levels[0]
    dense_costs = base.costs

    def make(name: str, mix: tuple[int, ...], kernel: str) -> dict[str, Any]:
        flops = base.flops - 2 * sum((nnz[w][0] - nnz[w][lv]) * uses[w] for w, lv in zip(weights, mix))
        pbytes = base.param_bytes - 4 * sum(nnz[w][0] - nnz[w][lv] for w, lv in zip(weights, mix))
        costs = dense_costs if kernel == "dense" else _sparse_costs(
            sparse, {w: int(k_of[w][lv]) for w, lv in zip(weights, mix) if w in k_of})
        kind = {"level": min(mix), "kernel": kernel, "layers": dict(zip(weights, mix))}
        return {"name": name, "quality": None, "flops": int(flops), "param_bytes": int(pbytes),
                "segments": ["main"], "costs": costs, "dress": kind}

    kernels = ["dense"] + (["sparse"] if sparse is not None else [])
    space = n_levels ** len(weights)
    if space - n_levels <= max_candidates:
        mixes = [m for m in itertools.product(range(n_levels), repeat=len(weights)) if len(set(m)) > 1]
    else:
        rng, mixes, seen = np.random.default_rng(seed), [], set()
        while len(mixes) < max_candidates:
            m = tuple(int(v) for v in rng.integers(0, n_levels, len(weights)))
            if len(set(m)) > 1 and m not in seen:
                seen.add(m)
                mixes.append(m)
    dens = section["densities"]
    candidates = [make("density-" + "-".join(str(round(dens[lv] * 100)) for lv in m)
                       + ("" if kernel == "dense" else "-sparse"), m, kernel)
                  for m in mixes for kernel in kernels]
    calibration = []
    for c in levels:
        for kernel in kernels:
            made = make(f"{c.name}@{kernel}", (c.kind.level,) * len(weights), kernel)
            made["dress"] = {"level": c.kind.level, "kernel": kernel}
            if kernel == c.kind.kernel:
                made = {**c.to_json(), "costs": made["costs"]}      # the hand-made config, costed as it runs
            calibration.append(made)
    return candidates, calibration


# --- quality, latency, front -------------------------------------------------------------------------------

def _check_val(b: Bundle, val: Any) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(val, (tuple, list)) and len(val) == 2):
        raise DataError(f"val must be (x_val, y_val) arrays, got {type(val).__name__}")
    x, y = (np.asarray(v) for v in val)
    spec = b.inputs[0]
    want = tuple(d for d in spec.shape[1:])
    if x.ndim != len(spec.shape) or tuple(x.shape[1:]) != want:
        raise DataError(f"x_val has shape {x.shape}; bundle {b.name!r} takes {spec.describe()}: expected "
                        f"(rows, {', '.join(map(str, want))})")
    if x.dtype.kind not in "fiu":
        raise DataError(f"x_val has dtype {x.dtype}; expected float32 values")
    rows = ~np.isfinite(x.reshape(len(x), -1).astype(np.float64)).all(axis=1)
    if rows.any():
        raise DataError(f"x_val row {int(np.flatnonzero(rows)[0])} holds NaN or inf ({int(rows.sum())} such "
                        "rows); expected finite values: drop or fix those rows")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"y_val has shape {y.shape}; expected ({len(x)},), one label per row of x_val")
    if y.dtype.kind not in "fiu" or (y.dtype.kind == "f" and not np.isfinite(y).all()):
        raise DataError(f"y_val holds {y.dtype} values{' with NaN or inf' if y.dtype.kind == 'f' else ''}; "
                        "expected int labels (top-1) or finite targets (MSE)")
    if len(x) < 16:
        raise DataError(f"x_val has {len(x)} rows; expected at least 16 to tell configs apart")
    return x.astype(np.float32), y


def _score(rt: Runtime, name: str, x: np.ndarray, y: np.ndarray, metric: str) -> float:
    """A config's metric on (x, y): top-1 (labels) or MSE (targets), run in batches of 256."""
    rt.switch(name)
    preds = np.concatenate([rt.run(x[i:i + 256]) for i in range(0, len(x), 256)])
    if metric == "top1":
        if y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= preds.shape[-1]:
            raise DataError(f"y_val must hold int labels in [0, {preds.shape[-1]}) for top-1, got "
                            f"{y.dtype} in [{y.min()}, {y.max()}]")
        return float((preds.argmax(-1) == y).mean())
    if preds.size != y.size:
        raise DataError(f"y_val has {y.size // len(y)} value(s) a row, the model gives "
                        f"{preds.size // len(y)}; for MSE expected one target per output")
    return float(((preds.reshape(len(y), -1) - y.reshape(len(y), -1)) ** 2).mean())


def pareto(points: Sequence[Point], higher: bool, tie: float = 0.0) -> list[str]:
    """Names of the points no other beats: none is at least as good and no slower (latencies within `tie`
    of each other count as equal), and strictly better in one of the two."""
    def better(q: Point, p: Point) -> bool:
        gq, gp = (q.quality, p.quality) if higher else (-q.quality, -p.quality)
        no_slower = q.ms <= p.ms * (1 + tie)
        return gq >= gp and no_slower and (gq > gp or q.ms < p.ms * (1 - tie))

    return [p.name for p in sorted(points, key=lambda p: p.ms) if not any(better(q, p) for q in points
                                                                            if q is not p)]


def _measure(staged: Bundle, names: Sequence[str], threads: int | None, seconds: float,
             progress: bool) -> dict[str, float]:
    """p50 (ms, batch 1) of each config on this host, interleaved (`runtime.profiles.measure_profile`)."""
    rt = Runtime(staged, threads=threads, only=list(names))
    prof = measure_profile(rt, memory=False, progress=progress, min_seconds=seconds * len(names) / 4)
    return {n: s["p50_ms"] for n, s in prof["configs"].items()}


def search(path: str | os.PathLike, val: Any, *, device: str = "host", latency_ms: float | None = None,
           pareto_front: bool = False, threads: int | None = None,
           max_candidates: int = SEARCH_RECIPE["max_candidates"],
           max_stitches: int = SEARCH_RECIPE["max_stitches"], finalists: int = SEARCH_RECIPE["finalists"],
           max_add: int = SEARCH_RECIPE["max_add"], plot: str | os.PathLike | None = None,
           write: bool = True, seed: int = 0, progress: bool = True) -> SearchResult:
    """Search the per-layer combinations of a bundle's configs for `device`; see `ef.search`."""
    check_str("device", device)
    check_device(device)
    check_real("latency_ms", latency_ms, 0, none=True)
    for what, v, low in (("max_candidates", max_candidates, 1), ("max_stitches", max_stitches, 2),
                         ("finalists", finalists, 1), ("max_add", max_add, 1)):
        check_int(what, v, low)
    check_bool("write", write)
    if (latency_ms is None) == (not pareto_front):
        raise UsageError("give a latency budget (latency_ms=) or ask for the Pareto front "
                         "(pareto_front=True), one of the two")
    with Bundle.open(path) as b:
        family = family_of(b)
        x, y = _check_val(b, val)
        quality = next((c.quality for c in b.configs if c.quality), None) or {}
        metric = quality.get("metric", "top1" if y.dtype.kind in "iu" else "mse")
        metric = metric if metric in ("top1", "mse") else ("top1" if y.dtype.kind in "iu" else "mse")
        higher = metric == "top1"
        if family == "dress":
            cand_json, calib_json = dress_space(b, max_candidates=max_candidates, seed=seed)
            files: dict[str, bytes] = {}
        else:
            cand_json, files = snnet_space(b, max_stitches=max_stitches, max_candidates=max_candidates)
            calib_json = [{**c.to_json()} for c in b.configs]
        hand = {c.name for c in b.configs}
        points = [Point(c["name"], c, False, calibration_only=c["name"] not in hand) for c in calib_json]
        points += [Point(c["name"], c, True) for c in cand_json]
        notes = []
        if not cand_json:
            notes.append("no combination beyond the bundle's own configs (SN-Net: needs 3+ anchors or "
                         "stitches both ways; DRESS: needs 2+ prunable weights)")
        # quality of every point on the user's data, through the runtime (chained: no fused copies needed),
        # SCORE_CHUNK configs loaded at a time (each DRESS mix on the dense kernel holds its own masked copy)
        bar = progress_bar(len(points), "search: held-out quality", show=progress, leave=False)
        for i in range(0, len(points), SCORE_CHUNK):
            chunk = points[i:i + SCORE_CHUNK]
            rt = Runtime(_Staged(b, [p.config for p in chunk], files), threads=threads, fused=False)
            run_threads = rt.threads
            for p in chunk:
                p.quality = _score(rt, p.name, x, y, metric)
                bar.update(1)
            del rt
        bar.close()
        # the predictor: fitted on this host's timings of the hand-made configs, applied to the device
        calib = [p for p in points if not p.new]
        timed = _measure(_Staged(b, [p.config for p in calib], files), [p.name for p in calib], threads,
                         SEARCH_RECIPE["min_seconds"], progress)
        pred = fit([(p.config["costs"], timed[p.name], p.name) for p in calib], get_device("host"),
                   with_loo=len(calib) >= 3)
        target = get_device(device)
        here = device == "host"
        note = None
        for p in points:
            detail = pred.predict_detail(p.config["costs"], None if here else target)
            p.predicted_ms, note = detail["ms"], detail["note"]
            if here and not p.new:
                p.measured_ms = timed[p.name]
        if family == "dress":         # one kernel per mix: the one predicted faster
            best: dict[str, Point] = {}
            for p in (p for p in points if p.new):
                key = p.name.removesuffix("-sparse")
                if key not in best or p.predicted_ms < best[key].predicted_ms:
                    best[key] = p
            points = [p for p in points if not p.new or best[p.name.removesuffix("-sparse")] is p]
            for p in points:
                if p.new:
                    p.name = p.config["name"] = p.name.removesuffix("-sparse")
        scored = [p for p in points if not p.calibration_only]
        front = pareto(scored, higher, SEARCH_RECIPE["tie"])
        if here:                      # measure the predicted front's new points beside the hand-made ones
            picks = [p for p in scored if p.new and p.name in front][:finalists]
            if picks:
                chosen = [p for p in scored if not p.new] + picks
                got = _measure(_Staged(b, [p.config for p in chosen], files), [p.name for p in chosen],
                               threads, SEARCH_RECIPE["min_seconds"], progress)
                for p in chosen:
                    p.measured_ms = got[p.name]
            # the front on measured latencies only: new points off the predicted front stay unmeasured
            scored = [p for p in scored if not p.new or p.measured_ms is not None]
            front = pareto(scored, higher, SEARCH_RECIPE["tie"])
        added = _choose(scored, front, latency_ms, higher, max_add)
        if latency_ms is not None and not any(p.ms <= latency_ms for p in scored):
            notes.append(f"no config runs within {latency_ms:g} ms on {device}; the fastest takes "
                         f"{min(p.ms for p in scored):.4g} ms")
        data = {"rows": int(len(x)), "sha256": hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()}
        result = SearchResult(b.name, device, metric, "higher" if higher else "lower",
                              "measured" if here else "predicted", points, front, added,
                              {"note": note, "fit_error_on_host": pred.fit_error, "samples": len(calib)},
                              data, run_threads, latency_ms, notes=notes, files=files,
                              model=model_id(b.manifest))
    if write and added:
        add(path, result)
    if plot is not None:
        plot_front(result, plot)
        result.plot = os.fspath(plot)
    return result


def _choose(points: Sequence[Point], front: Sequence[str], latency_ms: float | None, higher: bool,
            max_add: int) -> list[str]:
    """The new configs to add: with a budget, the best one within it if it beats every hand-made config
    within it; else the new configs on the front, at most `max_add`, spread over its latency range."""
    on_front = [p for p in points if p.name in front]
    if latency_ms is not None:
        fit_in = [p for p in on_front if p.ms <= latency_ms]
        if not fit_in:
            return []
        best = max(fit_in, key=lambda p: (p.quality if higher else -p.quality, -p.ms))
        return [best.name] if best.new else []
    new = sorted((p for p in on_front if p.new), key=lambda p: p.ms)
    if len(new) > max_add:
        new = [new[i] for i in np.unique(np.round(np.linspace(0, len(new) - 1, max_add)).astype(int))]
    return [p.name for p in new]


def add(path: str | os.PathLike, result: SearchResult, names: Sequence[str] | None = None) -> None:
    """Add the configs `names` (default: `result.added`) found by `result` to the bundle at `path` with their
    fused graphs, where chained, and the search's record (`search/<device>.json`), atomically; refused if the
    bundle was re-exported since the search."""
    path = Path(path)
    if names is not None:
        result.added = list(names)
    added = [result.point(n) for n in result.added]
    files = result.files
    split = f"search data ({result.data['rows']} rows, sha256 {result.data['sha256'][:12]})"
    configs = []
    for p in added:
        cfg = dict(p.config)
        cfg["quality"] = {"metric": result.metric, "direction": result.direction, "value": p.quality,
                          "split": split}
        cfg["search"] = {"device": result.device, "latency_ms": p.ms, "obtained": "measured"
                         if p.measured_ms is not None else "predicted", "threads": result.threads}
        configs.append(cfg)
    extra = {rel: files[rel] for p in added for rel in [p.config.get("fused", {}).get("graph")] if rel}
    record = json.dumps(result.to_json(), indent=1) + "\n"
    extra[RECORD.format(device=path_name(result.device))] = record.encode()

    def edit(m: dict[str, Any]) -> dict[str, Any]:
        names = {c["name"] for c in m["configs"]}
        clash = [c["name"] for c in configs if c["name"] in names]
        if clash:
            raise BundleError(f"bundle {str(path)!r} already has config(s) {clash}; search again")
        m = {**m, "configs": m["configs"] + configs}
        if m.pop("signatures", None):
            log.warning("%s: the search changed the manifest; its signatures were removed: sign it again",
                        path)
        return m

    update_bundle(path, extra, model=result.model, edit=edit)


def plot_front(result: SearchResult, path: str | os.PathLike) -> None:
    """Quality against latency: every found point (grey), the hand-made configs, the front, those added."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise UsageError("the plot needs matplotlib, which is not installed: pip install 'edgeflex[bench]'") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in result.points if not p.calibration_only and p.ms is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    guessed = [p for p in pts if p.new and p.measured_ms is None and result.obtained == "measured"]
    ax.scatter([p.ms for p in guessed], [p.quality for p in guessed], s=18, facecolors="none",
               edgecolors="0.5", label="found, off the predicted front (predicted ms)")
    found = [p for p in pts if p.new and p not in guessed]
    ax.scatter([p.ms for p in found], [p.quality for p in found], s=14, c="0.5", label="found")
    hand = [p for p in pts if not p.new]
    ax.scatter([p.ms for p in hand], [p.quality for p in hand], s=40, marker="s", c="tab:blue",
               label="hand-made configs")
    front = sorted((p for p in pts if p.name in result.front), key=lambda p: p.ms)
    ax.plot([p.ms for p in front], [p.quality for p in front], "-", c="tab:orange", lw=1.2, label="front")
    added = [p for p in pts if p.name in result.added]
    ax.scatter([p.ms for p in added], [p.quality for p in added], s=70, marker="*", c="tab:red",
               label="added to the bundle")
    if result.latency_ms is not None:
        ax.axvline(result.latency_ms, ls="--", c="0.4", lw=0.8, label=f"budget {result.latency_ms:g} ms")
    ax.set_xlabel(f"latency p50, batch 1 (ms, {result.obtained} on {result.device}, "
                  f"{result.threads} threads)")
    ax.set_ylabel(f"{result.metric} on the search data ({result.data['rows']} rows)")
    ax.set_title(f"{result.bundle}: search on {result.device}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".png", dir=target.parent or ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, target)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
