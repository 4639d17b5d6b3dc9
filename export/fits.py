"""The fast FITS forms for any model whose graph is the FITS spectral pattern (edgeflex's `FITS`, the
authors' code, a user's copy): `spectral_match` recognises the pattern and probes its map; here the ONNX
forms of `edgeflex.kernels.spectral` are built from that map, and one is chosen per engine by timing
each candidate on that engine at batch 1 and a large batch, not by habit; the timings go into the manifest.
A model that is not exactly the pattern gets None (and the reason in the log): the general path exports it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from edgeflex.devices.measure import median_ms
from edgeflex.kernels import spectral

from . import spectral_match

log = logging.getLogger(__name__)

# Engines that cannot run ONNX DFT (TensorRT's parser, TVM's Relax importer) are offered the real forms only;
# a probed map has no complex weights, so the `dft` form (never the fastest on ONNX Runtime) is not offered.
FORMS_BY_ENGINE = {"onnxruntime": spectral.FORMS_OF_MAP, "tvm": ("folded", "lowrank"),
                   "tensorrt": ("folded", "lowrank")}


def recognise(model: torch.nn.Module, example: tuple[torch.Tensor, ...],
              graph: torch.fx.GraphModule | None = None) -> tuple[spectral_match.SpectralMatch | None, str]:
    """The spectral pattern of `model` (its torch.export graph, or `graph` when the caller has one), or
    None and why not. Only a model with one float32 input [batch, L, C] is captured for it."""
    if len(example) != 1 or example[0].dim() != 3 or example[0].dtype != torch.float32:
        return None, "not one float32 [batch, L, C] input"
    try:
        gm = graph if graph is not None else spectral_match.capture(model, example)
    except Exception as e:  # noqa: BLE001 - a model torch.export cannot capture is simply not the pattern
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return None, f"torch.export: {type(e).__name__}: {first}"
    try:
        return spectral_match.match(gm, example[0]), "matched"
    except spectral_match.NoMatch as e:
        return None, str(e)


def lower(found: spectral_match.SpectralMatch, *, input_name: str, output_names: list[str], threads: int,
          engine: str | None = None, batches: tuple[int, ...] = (1, 64)) -> tuple[bytes, dict]:
    """The ONNX bytes of the fastest valid form of the recognised map on `engine` (None: ONNX Runtime, whose
    timing also serves TVM), and a record of what was measured and recognised. For "tensorrt" (no TensorRT
    here to time on): the form with the fewest multiply-adds, normalised without LayerNormalization's extra
    outputs (`export.engines`)."""
    import onnxruntime as ort

    from edgeflex.runtime.backends.onnxruntime import session_options, shared_threads

    w = found.map
    channels = found.channels
    if engine == "tensorrt":
        macs = {f: spectral.macs(w, f) for f in FORMS_BY_ENGINE[engine]}
        chosen = min(macs, key=macs.__getitem__)
        graph = spectral.to_onnx(w, chosen, input_name=input_name, channels=channels, layer_norm=False,
                                 outputs=list(zip(output_names, found.outputs))).SerializeToString()
        return graph, {"kernel": "spectral", "form": chosen, "engine": engine, "measured": {},
                       "macs_per_channel": macs, "normalisation": "ReduceMean / Sqrt (no LayerNormalization)",
                       "rule": "fewest multiply-adds: TensorRT is not here to time the forms on",
                       "recognised": found.to_json()}
    engine = engine or "onnxruntime"
    so = session_options(ort, shared_threads() or threads)
    rng = np.random.default_rng(0)
    measured: dict[str, dict[str, float]] = {}
    graphs: dict[str, bytes] = {}
    outputs = list(zip(output_names, found.outputs))
    for form in FORMS_BY_ENGINE[engine]:
        data = spectral.to_onnx(w, form, input_name=input_name, channels=channels,
                                outputs=outputs).SerializeToString()
        graphs[form] = data
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        measured[form] = {}
        for b in batches:
            x = rng.standard_normal((b, w.seq_len, channels)).astype(np.float32)
            feed = {input_name: x}
            ms = median_ms(lambda s=sess, feed=feed: s.run(None, feed), runs=40 if b == 1 else 8)
            measured[form][f"batch{b}_us"] = round(1e3 * ms, 1)
    # Batch 1 decides (edge inference is latency-bound); the large batch breaks near-ties (< 10 %).
    b1 = {f: m[f"batch{batches[0]}_us"] for f, m in measured.items()}
    best_b1 = min(b1.values())
    near = [f for f in b1 if b1[f] <= 1.1 * best_b1]
    chosen = min(near, key=lambda f: measured[f][f"batch{batches[-1]}_us"])
    record = {"kernel": "spectral", "form": chosen, "engine": engine, "threads": shared_threads() or threads,
              "measured": measured, "macs_per_channel": {f: spectral.macs(w, f) for f in measured},
              "rule": "fastest at batch 1; among forms within 10% of it, fastest at the large batch",
              "recognised": found.to_json()}
    return graphs[chosen], record
