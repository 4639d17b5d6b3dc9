"""ONNX Runtime backend, CPU execution provider, threads set explicitly (never ORT's own default)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..bundle import TensorSpec
from ..errors import BackendUnavailable
from .base import Backend, Engine


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
