"""ONNX Runtime backend, CPU execution provider, threads set explicitly (never ORT's own default)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..bundle import TensorSpec
from ..errors import BackendUnavailable
from .base import Backend, Engine

# How long (us) an ORT worker spins for more work before it sleeps (see OnnxRuntimeBackend.load).
SPIN_US = 100


class OnnxRuntimeEngine(Engine):
    def __init__(self, session, inputs, outputs, keep=()):
        super().__init__(inputs, outputs)
        self.session = session
        self._keep = keep                   # OrtValues ORT was given: they must outlive the session
        self._in_names = [i.name for i in session.get_inputs()]

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self._in_names, arrays)))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self):
        try:
            import onnxruntime
        except ImportError as e:
            raise BackendUnavailable(f"backend 'onnxruntime' is not installed ({e}); "
                                     "pip install onnxruntime") from None
        self._ort = onnxruntime

    def load(self, graph: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
             threads: int, initializers: dict[str, np.ndarray] | None = None) -> OnnxRuntimeEngine:
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # NOTE: ORT's workers spin after each parallel op; with several sessions (a chained SN-Net config,
        # engines at several thread counts) an idle session's spinning workers take the cores from the one
        # running: s100 at 224x224 chained over 5 sessions at 2 threads took 10.0 ms against 1.62 ms with
        # spinning cut to 100 us (fused: 1.17 ms either way; 32x32: no change). Measured on this host.
        so.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
        values = []
        if initializers:
            # NOTE: the graph marks these tensors external; ORT takes them from memory and never opens a
            # file, so the bytes it runs are the ones the bundle verified.
            values = [self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
                      for a in initializers.values()]
            so.add_external_initializers(list(initializers), values)
        # NOTE: providers are named: ORT must not pick (or silently fall back to) another one.
        sess = self._ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        return OnnxRuntimeEngine(sess, inputs, outputs, values)

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": self._ort.__version__}
