"""Elastic FITS export: one bundle whose configs are the cut frequencies, the complex weight stored once.

`weights.bin` holds the largest level's complex weight and bias (real and imaginary parts, float32) and the
constants the level graphs share. Each level is a FITS spectral graph (`kernels.spectral`, form chosen per
level by timing it on the engine) whose weight-dependent GEMM operands are marked derived-at-load: the
runtime slices the stored weight to the level's top-left block and derives them (`spectral.nested`,
`spectral.gemm_operands`), exactly as validated here against the level's PyTorch FITS.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch

from edgeflex.devices.measure import median_ms
from edgeflex.kernels import spectral
from edgeflex.models.fits_elastic import ElasticFITS
from edgeflex.runtime.bundle import Bundle, Config, write_bundle
from edgeflex.runtime.families.fits_elastic import FitsLevel
from edgeflex.runtime.store import target as store_target

from . import analysis
from .core import default_threads, manifest_base
from .elastic import WEIGHTS, WeightStore, _mark_derived, _ort_session, _stem, _worst, plan_call
from .engines import check_engine, engine_record, uses_layer_norm
from .validate import example_specs, validate_fn

FORMS = ("folded", "lowrank")   # the forms with GEMM operands to derive; ONNX DFT is far slower on ORT


def stored_weights(w: spectral.SpectralWeights) -> tuple[np.ndarray, np.ndarray]:
    """The stored layout: weight [2, up, cut] and bias [2, up] float32, [real, imaginary]."""
    return (np.stack([w.weight.real, w.weight.imag]).astype(np.float32),
            np.stack([w.bias.real, w.bias.imag]).astype(np.float32))


def level_graph(w: spectral.SpectralWeights, form: str, channels: int, store: WeightStore,
                layer_norm: bool = True):
    """(graph bytes with the GEMM operands marked derived, refs of the stored constants, the full proto);
    `layer_norm` as `spectral.to_onnx` takes it."""
    proto = spectral.to_onnx(w, form, channels=channels, layer_norm=layer_norm)
    derived = set(spectral.GEMM_NAMES[:len(spectral.gemm_operands(w, form))])
    lean = onnx.ModelProto()
    lean.CopyFrom(proto)
    kept = [t for t in lean.graph.initializer if t.name not in derived]
    placeholders = [t for t in lean.graph.initializer if t.name in derived]
    del lean.graph.initializer[:]
    lean.graph.initializer.extend(kept)
    graph_bytes, refs = store.externalize(lean)
    lean = onnx.load_from_string(graph_bytes)
    for t in placeholders:
        t.ClearField("raw_data")
        _mark_derived(t)
    lean.graph.initializer.extend(placeholders)
    return lean.SerializeToString(), refs, proto


def derive(stored_w: np.ndarray, stored_b: np.ndarray, hyper: dict, cut_freq: int,
           form: str) -> dict[str, np.ndarray]:
    """Level `cut_freq`'s GEMM operands (float32, by initializer name) from the stored weight: the same
    arithmetic `Runtime` does at load."""
    full = spectral.SpectralWeights(hyper["seq_len"], hyper["pred_len"], stored_w[0] + 1j * stored_w[1],
                                    stored_b[0] + 1j * stored_b[1], hyper["eps"])
    ops = spectral.gemm_operands(spectral.nested(full, cut_freq), form)
    return {name: op.astype(np.float32) for name, op in zip(spectral.GEMM_NAMES, ops)}


def export_fits_elastic(model: ElasticFITS, example: torch.Tensor, path: str | os.PathLike, *,
                        name: str | None = None, quality: list[dict] | None = None, tolerance: float = 1e-4,
                        threads: int | None = None, metadata: dict | None = None,
                        overwrite: bool = False, engine: str | None = None) -> Bundle:
    """Export an `ElasticFITS` into one bundle, config `cut-K` per level (largest first). `quality`: per
    level, in `model.cut_freqs` order. Every level is validated against its plain PyTorch FITS through the
    engine the runtime builds (stored weight -> derived operands) before anything is written. `engine`:
    as `ef.export` takes it; for "tensorrt" the levels normalise without LayerNormalization's extra
    outputs and each takes the form with the fewest multiply-adds (no TensorRT here to time on)."""
    engine = check_engine(engine)
    store_target(path, overwrite=overwrite, new=True)     # refuse before any work
    threads = threads or default_threads()
    model = model.eval()
    hyper = model.hyper()
    store = WeightStore()
    sw, sb = stored_weights(model.spectral_weights())
    weight_id, bias_id = store.add(sw), store.add(sb)
    rng = np.random.default_rng(0)
    configs, checks, segments, files = [], [], {}, {}
    with torch.no_grad():
        y = model(example)
    manifest = manifest_base(model, (example,), ["x"], [y], ["y"], name or _stem(path))
    for i, cut in enumerate(model.cut_freqs):
        w = spectral.nested(model.spectral_weights(), cut)
        candidates = {}
        for form in FORMS:
            graph, refs, proto = level_graph(w, form, model.channels, store, uses_layer_norm(engine))
            call = plan_call([_ort_session(graph, store, refs, threads, derive(sw, sb, hyper, cut, form),
                                           example_specs((example,)))])
            candidates[form] = (graph, refs, proto, call)
        measured = _measure({f: c[3] for f, c in candidates.items()}, model.seq_len, model.channels, rng)
        form = _choose(measured) if engine is None else min(FORMS, key=lambda f: spectral.macs(w, f))
        graph, refs, proto, call = candidates[form]
        check = validate_fn(model.level(cut), call, (example,),
                            tolerance=tolerance, label=f"cut_freq {cut} ({form})")
        checks.append({"config": f"cut-{cut}", **check.to_json()})
        seg = f"cut-{cut}"
        files[f"graphs/{seg}.onnx"] = graph
        segments[seg] = {"graph": f"graphs/{seg}.onnx", "tensors": refs,
                         "inputs": manifest["inputs"], "outputs": manifest["outputs"]}
        params = model.level_parameters(cut)
        level = FitsLevel(cut, form, list(spectral.GEMM_NAMES[:len(spectral.gemm_operands(w, form))]),
                          up_freq=w.up_freq, parameters=params, engine_bytes=analysis.param_bytes(proto),
                          measured=measured, threads=threads)
        configs.append(Config(seg, quality=(quality or [None] * len(model.cut_freqs))[i],
                              flops=analysis.flops(proto), param_bytes=8 * params, segments=(seg,),
                              kind=level).to_json())
    manifest.update({
        "configs": configs,
        "segments": segments,
        "tensors": store.index,
        "fits_elastic": {
            "weight": weight_id, "bias": bias_id, **hyper,
            "layout": "weight [2, up, cut], bias [2, up] float32 as [real, imaginary] of the largest level; "
                      "level k = weight[:, :up_k, :k], bias[:, :up_k], up_k = int(k * (L + H) / L)",
            "storage": {"weight_bytes": sw.nbytes + sb.nbytes,
                        "separate_levels_bytes": sum(c["param_bytes"] for c in configs)},
            "form_choice": "per level, of folded/lowrank (alternated, 3 rounds): fastest at batch 1; among "
                           "forms within 10% of it, fastest at batch 64 (the rule of export/fits.py)"
                           if engine is None else "per level, of folded/lowrank: the fewest multiply-adds "
                           "(TensorRT is not here to time on); normalised by ReduceMean / Sqrt"},
        "export": {"strategy": "edgeflex FITS lowering per cut level (kernels.spectral); GEMM operands "
                               "derived at load from the one stored complex weight",
                   "validation": _worst(checks), "per_config": checks, "opset": spectral.OPSET,
                   **engine_record(engine, files)},
        "metadata": metadata or {},
    })
    return write_bundle(path, manifest, {**files, WEIGHTS: bytes(store.blob)}, overwrite=overwrite)


def _measure(engines: dict, seq_len: int, channels: int, rng: np.random.Generator,
             rounds: int = 3) -> dict[str, dict[str, float]]:
    """Median us per call of each form's engine at batch 1 and 64: the forms alternate for `rounds` rounds
    and each keeps the median of its round medians, so a burst of load from elsewhere hits all alike."""
    measured: dict[str, dict[str, float]] = {f: {} for f in engines}
    for b in (1, 64):
        x = rng.standard_normal((b, seq_len, channels)).astype(np.float32)
        rounds_ms = {f: [] for f in engines}
        for _ in range(rounds):
            for f, e in engines.items():
                rounds_ms[f].append(median_ms(lambda e=e, x=(x,): e(x), runs=40 if b == 1 else 10))
        for f, ms in rounds_ms.items():
            measured[f][f"batch{b}_us"] = round(1e3 * float(np.median(ms)), 1)
    return measured


def _choose(measured: dict[str, dict[str, float]]) -> str:
    b1 = {f: m["batch1_us"] for f, m in measured.items()}
    near = [f for f in b1 if b1[f] <= 1.1 * min(b1.values())]
    return min(near, key=lambda f: measured[f]["batch64_us"])
