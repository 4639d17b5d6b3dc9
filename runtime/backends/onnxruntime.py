"""ONNX Runtime backend, CPU execution provider, threads set explicitly (never ORT's own default).

Threads: by default every session has its own intra-op pool of `threads` (so a Runtime can hold engines at
several counts). `share_threads(n)` switches the whole process to ORT's one global pool of n threads instead
(`Runtime(..., shared_threads=True)`): a config chained over several sessions then runs on one set of
workers, not one pool per segment handing the cores to the next. ORT's rule, not ours: once the global pool
exists, every session in the process must use it (ORT refuses sessions with their own pools), so it is
opt-in, set once per process, and `session_options` is the one place edgeflex makes its options.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Sequence

import numpy as np

from edgeflex.errors import BackendUnavailable, BundleError, UsageError

from ..bundle import TensorSpec
from .base import Backend, Engine

# How long (us) an ORT worker spins for more work before it sleeps (see session_options).
SPIN_US = 100

_shared = {"threads": None}         # the process-wide ORT pool's size, once share_threads set it
_shared_lock = threading.Lock()


def shared_threads() -> int | None:
    """The size of the process-wide ORT pool edgeflex set (`share_threads`), or None (per-session pools)."""
    return _shared["threads"]


def share_threads(threads: int) -> None:
    """Make ORT run every session of this process on one global intra-op pool of `threads` workers.
    Idempotent for the same count; another count raises (ORT sets the global pool once per process)."""
    import onnxruntime as ort

    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise UsageError(f"shared ORT pool size must be a whole number >= 1, got {threads!r}")
    with _shared_lock:
        if _shared["threads"] == threads:
            return
        if _shared["threads"] is not None:
            raise UsageError(f"this process already runs ONNX Runtime on one shared pool of "
                             f"{_shared['threads']} threads (ORT sets it once per process); use "
                             f"threads={_shared['threads']}, not {threads}, or a new process")
        ort.set_global_thread_pool_sizes(threads, 1)
        _shared["threads"] = threads


def session_options(ort, threads: int):
    """SessionOptions for a CPU session at `threads` intra-op threads: its own pool (spinning capped at
    SPIN_US), or the process's shared pool when `share_threads` set one of that size."""
    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    shared = _shared["threads"]
    if shared is not None:
        if threads != shared:
            raise UsageError(f"ONNX Runtime runs this process on one shared pool of {shared} threads "
                             f"(Runtime(shared_threads=True)); a session at {threads} threads cannot have "
                             f"its own pool: use threads={shared}, or a new process")
        so.use_per_session_threads = False
        return so
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # NOTE: ORT's workers spin after each parallel op; with several sessions (a chained SN-Net config,
    # engines at several thread counts) an idle session's spinning workers take the cores from the one
    # running: a chained s100 at 224x224 (5 sessions, 2 threads) ran several times slower than with spinning
    # cut to SPIN_US, while its fused graph and the 32x32 chains did not change (what the spinning costs
    # the next engine's calls: benchmarks/RESULTS.md, Row-sparse TIR kernel).
    so.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
    return so


_fp16_casts: dict[str, int] = {}
# A two-node fp16 graph, y = Conv(x, w) * Conv(x, w), x [1, 8, 8, 8], w [8, 8, 3, 3], opset 17: the bytes
# onnx.helper.make_model writes for it (kept here, as the board side imports no onnx).
FP16_PROBE = base64.b64decode(
    "CAg6bQoPCgF4CgF3EgFjIgRDb252Cg4KAWMKAWMSAXkiA011bBIFcHJvYmVaGwoBeBIWChQIChIQCgIIAQoCCAgKAggICgIICFobCgF3"
    "EhYKFAgKEhAKAggICgIICAoCCAMKAggDYgkKAXkSBAoCCApCBAoAEBE=")


def _casts_fp16(ort) -> int:
    """How many Cast nodes ORT's CPU provider runs in a two-node fp16 graph (Conv, Mul), read from its own
    profile of one run: 0 where it has fp16 kernels for both. Measured once per process (milliseconds)."""
    if ort.__version__ not in _fp16_casts:
        import json
        import tempfile

        with tempfile.TemporaryDirectory(prefix="edgeflex-fp16-probe-") as tmp:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.enable_profiling = True
            so.profile_file_prefix = f"{tmp}/probe"
            sess = ort.InferenceSession(FP16_PROBE, so, providers=["CPUExecutionProvider"])
            sess.run(None, {"x": np.ones((1, 8, 8, 8), np.float16), "w": np.ones((8, 8, 3, 3), np.float16)})
            with open(sess.end_profiling()) as f:
                events = json.load(f)
        _fp16_casts[ort.__version__] = len({e["name"] for e in events if e.get("cat") == "Node"
                                            and e.get("args", {}).get("op_name") == "Cast"})
    return _fp16_casts[ort.__version__]


class OnnxRuntimeEngine(Engine):
    def __init__(self, session, inputs, outputs, keep=()):
        super().__init__(inputs, outputs)
        self.session = session
        self._keep = keep                   # OrtValues ORT was given: they must outlive the session
        self._in_names = [i.name for i in session.get_inputs()]
        self._out_names = [o.name for o in session.get_outputs()]
        # NOTE: the session's C binding, called directly: `InferenceSession.run` re-validates the feed names
        # in Python on every call, which a chained config pays once per segment (for a small chained config,
        # s050 at 32x32 over 4 sessions, most of its overhead over its fused graph; inputs are checked by
        # the runtime before the first engine). Public `run` where a build lacks the binding.
        self._binding = getattr(session, "_sess", None)

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        feed = dict(zip(self._in_names, arrays))
        if self._binding is not None:
            return self._binding.run(self._out_names, feed, None)      # None: default run options
        return self.session.run(None, feed)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self):
        try:
            import onnxruntime
        except ImportError as e:
            raise BackendUnavailable(f"backend 'onnxruntime' is not installed ({e}); "
                                     "pip install onnxruntime") from None
        self._ort = onnxruntime
        self._providers: list = ["CPUExecutionProvider"]

    @property
    def per_engine_threads(self) -> bool:          # once a shared pool is set, every session uses it
        return shared_threads() is None

    def open(self, bundle, *, device: str, allow_native: bool = False,
             shared_threads: int | None = None) -> None:
        """`shared_threads=n`: the process's one ORT pool of n workers (`share_threads`). A GPU device
        (`DEVICE:gpu`) runs on ORT's CUDA execution provider, which only a CUDA build of onnxruntime has
        (`onnxruntime-gpu`); without it the device is refused here, in one line, instead of silently running
        on the CPU. Any other device runs on the CPU provider."""
        if shared_threads is not None:
            share_threads(shared_threads)
        if not device.endswith(":gpu"):
            self._providers = ["CPUExecutionProvider"]
            return
        have = self._ort.get_available_providers()
        if "CUDAExecutionProvider" not in have:
            raise BackendUnavailable(f"device {device!r}: this onnxruntime {self._ort.__version__} has no "
                                     f"CUDA execution provider (it has {', '.join(have)}); pip install "
                                     "onnxruntime-gpu, or run backend='tvm' on engines from `edgeflex "
                                     f"compile --target {device}`")
        # NOTE: the CPU provider stays as ORT's home for the few ops CUDA lacks (shape arithmetic)
        self._providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]

    def load(self, graph: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
             threads: int, initializers: dict[str, np.ndarray] | None = None) -> OnnxRuntimeEngine:
        so = session_options(self._ort, threads)
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        values = []
        if initializers:
            # NOTE: the graph marks these tensors external; ORT takes them from memory and never opens a
            # file, so the bytes it runs are the ones the bundle verified.
            values = [self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
                      for a in initializers.values()]
            so.add_external_initializers(list(initializers), values)
        # NOTE: providers are named: ORT must not pick (or silently fall back to) another one.
        try:
            sess = self._ort.InferenceSession(graph, so, providers=self._providers)
        except Exception as e:  # noqa: BLE001 - ORT's own error types; one line naming what failed
            # the bundle verified, so its graph or the weights handed to it disagree (an edited manifest)
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise BundleError(f"ONNX Runtime refused a graph of the bundle with the weights the manifest "
                              f"gives it ({msg}); re-export the bundle") from None
        cuda = self._providers[0] != "CPUExecutionProvider"
        if cuda and "CUDAExecutionProvider" not in sess.get_providers():
            # ORT drops a provider whose libraries fail to load (CUDA, cuDNN) with only a log line
            raise BackendUnavailable("onnxruntime could not start its CUDA execution provider (CUDA or cuDNN "
                                     "libraries missing or mismatched; its log says which); the session ran "
                                     f"on {', '.join(sess.get_providers())}")
        return OnnxRuntimeEngine(sess, inputs, outputs, values)

    def precision_refusal(self, precision: str) -> str | None:
        """int8 (QDQ graphs) runs on ORT's int8 kernels; fp16 only where the provider has fp16 kernels, which
        `_casts_fp16` checks by building a small fp16 Conv + Mul session and reading back the graph ORT will
        run: ORT's CPU provider silently wraps nodes it has no fp16 kernel for in casts to fp32 (on x86); bf16
        it has no kernels for."""
        if precision in ("fp32", "int8"):
            return None
        if precision == "fp16":
            if self._providers[0] != "CPUExecutionProvider":
                return None
            return (f"ONNX Runtime {self._ort.__version__}'s CPU provider runs fp16 Conv/Mul in fp32 on this "
                    "CPU (it wraps them in casts: emulation)") if _casts_fp16(self._ort) else None
        return f"ONNX Runtime {self._ort.__version__}'s CPU provider has no {precision} kernels"

    def versions(self) -> dict[str, str]:
        v = {"onnxruntime": self._ort.__version__}
        if shared_threads() is not None:
            v["ort_thread_pool"] = f"shared, {shared_threads()} threads"
        return v
