"""FITS lowering: the paper's module (complex Linear, rfft/irfft) cannot go through torch.onnx, so its
spectral path is rebuilt from the trained weights by `edgeflex.kernels.spectral`.

The form (folded matrix, low-rank DFT factors, ONNX DFT) is chosen per engine by timing each candidate
on that engine at batch 1 and a large batch, not by habit; the timings go into the manifest.
"""

from __future__ import annotations

import numpy as np
import torch

from edgeflex.devices.measure import median_ms
from edgeflex.kernels import spectral
from edgeflex.models.fits import FITS, spectral_weights

# Engines that cannot run ONNX DFT (TensorRT's parser, TVM's Relax importer) are offered the real forms only.
FORMS_BY_ENGINE = {"onnxruntime": spectral.FORMS, "tvm": ("folded", "lowrank"),
                   "tensorrt": ("folded", "lowrank")}


def is_fits(model: torch.nn.Module) -> bool:
    return isinstance(model, FITS)


def lower(model: FITS, *, input_name: str, output_name: str, threads: int,
          engine: str = "onnxruntime", batches: tuple[int, ...] = (1, 64)) -> tuple[bytes, dict]:
    """The ONNX bytes of the fastest valid form on `engine`, and a record of what was measured."""
    import onnxruntime as ort

    from edgeflex.runtime.backends.onnxruntime import session_options, shared_threads

    w = spectral_weights(model)
    so = session_options(ort, shared_threads() or threads)
    rng = np.random.default_rng(0)
    measured: dict[str, dict[str, float]] = {}
    graphs: dict[str, bytes] = {}
    for form in FORMS_BY_ENGINE[engine]:
        data = spectral.to_onnx(w, form, input_name=input_name, output_name=output_name,
                                channels=model.channels).SerializeToString()
        graphs[form] = data
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        measured[form] = {}
        for b in batches:
            x = rng.standard_normal((b, model.seq_len, model.channels)).astype(np.float32)
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
              "rule": "fastest at batch 1; among forms within 10% of it, fastest at the large batch"}
    return graphs[chosen], record
