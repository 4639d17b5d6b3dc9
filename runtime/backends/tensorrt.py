"""TensorRT backend (10.x; JetPack 6 ships 10.3): builds each graph's engine on the GPU it will run on, the
first time a bundle is loaded there, keeps the serialized plan in the bundle, and runs it with device
buffers from `cuda-bindings` (no torch, no CuPy). Plan keys and the stale-plan rule are
`tensorrt_keys.py`; putting a bundle's weights back into a graph for TensorRT's parser is `onnx_wire.py`.

NOTE: written against the TensorRT 10.3 and 11.4 Python bindings' names and docstrings and cuda-bindings
12.9/13.5 (docs/tensorrt.md says what was checked how); it has never run on a GPU with TensorRT.

Plans live under `engines/tensorrt/<gpu>-sm<cc>-<version>/`: `<graph sha256[:16]>-<precision>-b<N>.plan`
and a `.json` record beside it (the key, the plan's sha256, who built it where). A plan recorded for another
GPU, compute capability or TensorRT version is never deserialized: it is rebuilt. A graph whose weights the
bundle keeps apart (every graph with external weights: an elastic bundle's segments, a DRESS level's
derived copy) is built refittable and stored stripped of its weights (`STRIP_PLAN`), then refitted from the
bundle's verified weights at each load, so the bundle holds one copy of them. Refit mode REFIT_IDENTICAL:
the plan's name carries the sha256 of the weights it was built with, so it is only ever refitted with those
(TensorRT may then optimise with their values; plain REFIT can drop a GEMM bias in 11.3, per its notes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeflex.errors import BackendUnavailable, BundleError, InputError, UsageError

from ..bundle import Bundle, TensorSpec, sha256_bytes
from . import onnx_wire
from .base import Backend, Engine
from .tensorrt_keys import (
    REBUILD,
    RECORD_FORMAT,
    api_path,
    plan_file,
    plan_key,
    plan_records,
    stale_reason,
    store_plan,
    stored_plan,
    weights_sha256,
)
from .tvm import creator

log = logging.getLogger(__name__)

MAX_BATCH = 16                  # the optimization profile's batch range: 1..MAX_BATCH, tuned for 1
WORKSPACE_MB = 1024             # builder scratch memory (MemoryPoolType.WORKSPACE); Orin Nano has 8 GB shared
BUILD = ("missing", "always", "never")


# --- CUDA through cuda-bindings ---------------------------------------------------------------------------

def cuda_runtime() -> Any:
    """`cuda.bindings.runtime`, or BackendUnavailable naming the package."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise BackendUnavailable(f"backend 'tensorrt' needs cuda-bindings for device memory and streams "
                                 f"({e}); pip install 'cuda-bindings>=12.8,<13' (CUDA 12, JetPack 6), or use "
                                 "backend='onnxruntime'") from None
    return cudart


def check(cudart: Any, result: tuple, what: str) -> Any:
    """A cuda-bindings call's value: every call returns (cudaError_t, values...); an error is one line."""
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        text = cudart.cudaGetErrorString(err)[1]
        raise BackendUnavailable(f"CUDA {what} failed: {name.decode()} ({text.decode()})")
    return rest[0] if len(rest) == 1 else (rest or None)


def cuda_gpu(cudart: Any) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of CUDA device 0, made current; BackendUnavailable in one line where there
    is no driver or no GPU (cuda-bindings answers cudaErrorInsufficientDriver when libcuda is absent)."""
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1].decode()
        text = cudart.cudaGetErrorString(err)[1].decode()
        raise BackendUnavailable(f"backend 'tensorrt' needs a CUDA GPU, and CUDA found none here ({name}: "
                                 f"{text}): no NVIDIA GPU or driver (nvidia-smi), or use "
                                 "backend='onnxruntime'")
    if count < 1:
        raise BackendUnavailable("backend 'tensorrt' needs a CUDA GPU, and none is visible (nvidia-smi; "
                                 "CUDA_VISIBLE_DEVICES); or use backend='onnxruntime'")
    check(cudart, cudart.cudaSetDevice(0), "cudaSetDevice(0)")
    prop = check(cudart, cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties(0)")
    name = prop.name.split(b"\0", 1)[0].decode("utf-8", "replace").strip() if isinstance(prop.name, bytes) \
        else str(prop.name)
    return name, (int(prop.major), int(prop.minor))


# --- TensorRT -----------------------------------------------------------------------------------------------

def import_tensorrt() -> Any:
    """`tensorrt`, 10.0 or newer, or BackendUnavailable saying where it comes from."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:     # OSError: the bindings without libnvinfer.so.10
        raise BackendUnavailable(f"backend 'tensorrt' needs TensorRT, which is not importable here ({e}); "
                                 "on a Jetson it comes with JetPack 6 (TensorRT 10.3: apt install "
                                 "python3-libnvinfer), elsewhere from NVIDIA's index (pip install "
                                 "tensorrt-cu12); or use backend='onnxruntime'") from None
    version = getattr(trt, "__version__", "0")
    try:
        api_path(version)
    except ValueError:
        raise BackendUnavailable(f"TensorRT {version} is older than 10.0, the API edgeflex speaks (JetPack 6 "
                                 "ships 10.3); upgrade TensorRT, or use backend='onnxruntime'") from None
    return trt


def _logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to `logging` and keeps the last errors, for one-line reports."""

    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg).strip().splitlines()[0][:200] if str(msg).strip() else "?")
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

        def last(self) -> str:
            return self.errors[-1] if self.errors else "no error logged"

    return Log()


# numpy dtype of each TensorRT DataType edgeflex feeds or reads (bf16, fp8, int4 have no numpy type).
def _np_dtypes(trt: Any) -> dict[Any, np.dtype]:
    d = trt.DataType
    return {d.FLOAT: np.dtype(np.float32), d.HALF: np.dtype(np.float16), d.INT32: np.dtype(np.int32),
            d.INT64: np.dtype(np.int64), d.INT8: np.dtype(np.int8), d.UINT8: np.dtype(np.uint8),
            d.BOOL: np.dtype(np.bool_)}


def _parse(trt: Any, network: Any, logger: Any, model: bytes, graph: str) -> Any:
    """Fill `network` from the ONNX model and return the parser, which must outlive the build (it owns the
    weights the network points at); the parser's first error as one line naming the node."""
    parser = trt.OnnxParser(network, logger)
    if parser.parse(model):
        return parser
    n = parser.num_errors
    if not n:
        raise BackendUnavailable(f"TensorRT's ONNX parser refused graph {graph} ({logger.last()})")
    e = parser.get_error(0)
    node = e.node()
    where = f"node {node} {e.node_name()!r} ({e.node_operator()})" if node >= 0 else "the graph"
    raise BackendUnavailable(f"TensorRT {trt.__version__}'s ONNX parser rejected {where} of graph {graph}: "
                             f"{e.desc()} ({e.code()}){f'; {n - 1} more errors' if n > 1 else ''}; "
                             f"`edgeflex check BUNDLE --engine tensorrt --version "
                             f"{'.'.join(trt.__version__.split('.')[:2])}` lists every such node")


def _profile_shapes(network: Any, max_batch: int, graph: str) -> list[tuple[str, tuple, tuple, tuple]]:
    """(name, min, opt, max) per network input: a dynamic first dimension (the batch) ranges over
    1..max_batch, tuned for 1; any other dynamic dimension has no range edgeflex could know: refused."""
    out = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in dims[1:]):
            raise BackendUnavailable(f"graph {graph}: input {t.name!r} has shape {list(dims)} with a dynamic "
                                     "dimension other than the batch (the first); TensorRT needs its range, "
                                     "which the bundle does not give: re-export with fixed sizes")
        if not dims or dims[0] >= 0:
            lo = opt = hi = dims
        else:
            lo, opt, hi = (1, *dims[1:]), (1, *dims[1:]), (max_batch, *dims[1:])
        out.append((t.name, lo, opt, hi))
    return out


def build_plan(trt: Any, logger: Any, model: bytes, graph: str, *, fp16: bool, max_batch: int,
               refit: bool, workspace_mb: int = WORKSPACE_MB) -> tuple[bytes, dict[str, Any]]:
    """Build one graph's engine on this GPU: (serialized plan, how it was built). 10.x: weakly typed,
    `BuilderFlag.FP16` where asked and the GPU has fast fp16. 11.x (no FP16/INT8 flags, strongly typed
    only): precision is the graph's own types, and an fp16 request is recorded as not applied."""
    path = api_path(trt.__version__)
    try:
        builder = trt.Builder(logger)
    except TypeError:           # pybind: the factory returned nullptr ("CUDA initialization failure")
        raise BackendUnavailable(f"TensorRT could not create a builder ({logger.last()}): no usable GPU or "
                                 "driver for TensorRT here") from None
    # NOTE: 0 on both paths: explicit batch is 10.x's only mode (its flag is deprecated), and 11.x is strongly
    # typed whatever the flags (NetworkDefinitionCreationFlag.STRONGLY_TYPED is kept there but ignored).
    network = builder.create_network(0)
    parser = _parse(trt, network, logger, model, graph)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    shapes = _profile_shapes(network, max_batch, graph)
    for name, lo, opt, hi in shapes:
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    how: dict[str, Any] = {"api": path, "fp16_asked": fp16, "max_batch": max_batch,
                           "workspace_mb": workspace_mb,
                           "profile": [{"input": n, "min": list(lo), "opt": list(o), "max": list(hi)}
                                       for n, lo, o, hi in shapes]}
    if path == "10.x":
        if fp16 and builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
            how["precision"] = "fp16"
        else:
            how["precision"] = "fp32"
            if fp16:
                how["precision_note"] = "fp16 asked; this GPU has no fast fp16 (platform_has_fast_fp16)"
    else:
        how["precision"] = "strongly-typed"
        if fp16:
            how["precision_note"] = ("fp16 asked; TensorRT 11 has no FP16 flag (strongly typed): the graph's "
                                     "own types ran, fp16 needs an fp16 graph")
    # NOTE: TF32 is on by default (BuilderFlag.TF32): "fp32" plans may round inner products' inputs to TF32
    # on Ampere and later (Orin is Ampere); recorded so a comparison knows.
    how["tf32"] = bool(config.get_flag(trt.BuilderFlag.TF32))
    how["refit"] = refit
    how["stripped"] = False
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
        if hasattr(trt.BuilderFlag, "STRIP_PLAN"):
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
            how["stripped"] = True
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendUnavailable(f"TensorRT {trt.__version__} could not build graph {graph} "
                                 f"({logger.last()})")
    how["built_s"] = round(time.perf_counter() - t0, 3)
    del parser                  # only now: the network's weights were the parser's
    return bytes(plan), how


def refit_engine(trt: Any, logger: Any, engine: Any, model: bytes, graph: str) -> None:
    """Put the weights of `model` (the graph with the bundle's weights inline) into a refittable engine:
    `OnnxParserRefitter` maps ONNX initialisers to the engine's weights, through whatever the parser did to
    them (a transposed MatMul weight, folded constants), which naming weights one by one would miss."""
    refitter = trt.Refitter(engine, logger)
    onnx_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not onnx_refitter.refit_from_bytes(model):
        why = logger.last()
        if onnx_refitter.num_errors:
            e = onnx_refitter.get_error(0)
            why = f"{e.desc()} at node {e.node()}"
        raise BundleError(f"TensorRT could not refit the plan of graph {graph} from the bundle's weights "
                          f"({why}); the plan is stale; {REBUILD}")
    missing = refitter.get_missing_weights()
    if missing:
        raise BundleError(f"TensorRT plan of graph {graph} still misses weight {missing[0]!r} after "
                          f"refitting from the bundle ({len(missing)} missing); {REBUILD}")
    if not refitter.refit_cuda_engine():
        raise BundleError(f"TensorRT could not refit the plan of graph {graph} ({logger.last()}); {REBUILD}")


class TensorRtEngine(Engine):
    """One deserialized engine and its execution context. Device buffers are allocated once per input shape
    (at most `max_batch` of them for a batch-dynamic graph); the caller's arrays are copied in, the outputs
    copied out into fresh arrays, on one stream, under a lock (an execution context runs one call at once)."""

    def __init__(self, trt: Any, cudart: Any, engine: Any, stream: Any, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], io: tuple[list[str], list[str]], graph: str, max_batch: int):
        super().__init__(inputs, outputs)
        self._cudart, self._engine, self._stream, self.graph = cudart, engine, stream, graph
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailable(f"TensorRT could not create an execution context for graph {graph} "
                                     "(out of GPU memory?)")
        self._in, self._out = io
        types = _np_dtypes(trt)
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        for n in self._in + self._out:
            if n not in names:
                raise BundleError(f"TensorRT plan of graph {graph} has no tensor {n!r} the graph names; the "
                                  f"plan is stale; {REBUILD}")
        self._dtypes = {}
        for n in self._in + self._out:
            dt = engine.get_tensor_dtype(n)
            if dt not in types:
                raise BackendUnavailable(f"graph {graph}: tensor {n!r} is TensorRT {dt}, which numpy cannot "
                                         "hold; export it as float32, float16 or an integer type")
            self._dtypes[n] = types[dt]
        self._max_batch = max_batch
        self._buffers: dict[tuple, tuple[dict[str, int], dict[str, tuple[int, ...]]]] = {}
        self._shapes: tuple | None = None
        self._lock = threading.Lock()
        self._handle = int(stream)

    def _bind(self, shapes: tuple) -> dict[str, tuple[int, ...]]:
        """Set the input shapes and point every tensor at this shape's device buffers (made on first use)."""
        ctx, cudart = self._context, self._cudart
        for n, s in zip(self._in, shapes):
            if not ctx.set_input_shape(n, s):
                raise InputError(f"input {n!r} of shape {list(s)} is outside the TensorRT plan's profile "
                                 f"(batch 1..{self._max_batch}); rebuild with TensorRtBackend(max_batch=...)")
        if shapes not in self._buffers:
            ptrs, out_shapes = {}, {}
            for n in self._out:
                s = tuple(int(d) for d in ctx.get_tensor_shape(n))
                if any(d < 0 for d in s):
                    raise BackendUnavailable(f"graph {self.graph}: output {n!r} has a data-dependent shape "
                                             f"{list(s)}, which needs an output allocator edgeflex does not "
                                             "have")
                out_shapes[n] = s
            for n, s in [*zip(self._in, shapes), *out_shapes.items()]:
                nbytes = max(int(np.prod(s, dtype=np.int64)) * self._dtypes[n].itemsize, 1)
                ptrs[n] = int(check(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {n!r}"))
            self._buffers[shapes] = (ptrs, out_shapes)
        ptrs, out_shapes = self._buffers[shapes]
        for n, p in ptrs.items():
            if not ctx.set_tensor_address(n, p):
                raise BackendUnavailable(f"TensorRT refused the device buffer of tensor {n!r} of graph "
                                         f"{self.graph} (set_tensor_address returned False; see its log)")
        self._shapes = shapes
        return out_shapes

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        cudart = self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if len(arrays) != len(self._in):
            raise InputError(f"graph {self.graph} takes {len(self._in)} inputs ({', '.join(self._in)}), got "
                             f"{len(arrays)}")
        with self._lock:
            shapes = tuple(a.shape for a in arrays)
            out_shapes = self._buffers[shapes][1] if shapes == self._shapes else self._bind(shapes)
            ptrs = self._buffers[shapes][0]
            keep = []
            for n, a in zip(self._in, arrays):
                if a.dtype != self._dtypes[n]:          # never a silent cast
                    raise InputError(f"input {n!r} is {a.dtype}; the TensorRT plan of graph {self.graph} "
                                     f"takes {self._dtypes[n]}")
                a = np.ascontiguousarray(a)
                keep.append(a)          # alive until the stream has copied it
                check(cudart, cudart.cudaMemcpyAsync(ptrs[n], a.ctypes.data, a.nbytes, h2d, self._stream),
                      f"copy of input {n!r} to the GPU")
            if not self._context.execute_async_v3(self._handle):
                raise BackendUnavailable(f"TensorRT could not enqueue graph {self.graph} (execute_async_v3 "
                                         "returned False; its log says why)")
            outs = [np.empty(out_shapes[n], self._dtypes[n]) for n in self._out]
            for n, o in zip(self._out, outs):
                check(cudart, cudart.cudaMemcpyAsync(o.ctypes.data, ptrs[n], o.nbytes, d2h, self._stream),
                      f"copy of output {n!r} from the GPU")
            check(cudart, cudart.cudaStreamSynchronize(self._stream), f"running graph {self.graph}")
            return outs

    def __del__(self):
        for ptrs, _ in getattr(self, "_buffers", {}).values():
            for p in ptrs.values():
                self._cudart.cudaFree(p)


class TensorRtBackend(Backend):
    """`Runtime(path, backend="tensorrt")`, or `backend=TensorRtBackend(fp16=True, max_batch=8)` for options.

    `build`: "missing" (default) builds a plan where the bundle has none for this GPU and TensorRT version
    (or only a stale one) and stores it; "always" rebuilds every plan here (also the way to replace plans
    someone else built, instead of trusting them); "never" only loads stored plans (a missing or stale plan
    is a one-line error: a board that must not spend minutes building)."""

    name = "tensorrt"

    def __init__(self, *, fp16: bool = False, max_batch: int = MAX_BATCH, build: str = "missing",
                 workspace_mb: int = WORKSPACE_MB):
        if not isinstance(fp16, bool):
            raise UsageError(f"fp16 must be True or False, got {fp16!r}")
        for arg, value in (("max_batch", max_batch), ("workspace_mb", workspace_mb)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{arg} must be a whole number >= 1, got {value!r}")
        if build not in BUILD:
            raise UsageError(f"build must be one of {', '.join(BUILD)}, got {build!r}")
        self.fp16, self.max_batch, self.build, self.workspace_mb = fp16, max_batch, build, workspace_mb
        self._trt = import_tensorrt()
        self._cudart = cuda_runtime()
        self.gpu, self.capability = cuda_gpu(self._cudart)
        self.key = plan_key(self.gpu, self.capability, self._trt.__version__)
        self.api = api_path(self._trt.__version__)
        self._logger = _logger(self._trt)
        try:
            self._runtime = self._trt.Runtime(self._logger)
        except TypeError:       # pybind: the factory returned nullptr (CUDA initialization failure)
            raise BackendUnavailable(f"TensorRT could not start its runtime on {self.gpu} "
                                     f"({self._logger.last()})") from None
        self._stream = check(self._cudart, self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._bundle: Bundle | None = None
        self._records: dict[str, dict[str, Any]] = {}      # plan file -> its record, this GPU's folder
        self._built: dict[str, tuple[bytes, dict[str, Any]]] = {}
        self.plans: dict[str, str] = {}                    # graph file -> what happened to its plan
        self._precision = "strongly-typed" if self.api == "11.x" else "fp16" if fp16 else "fp32"
        self._ran: set[str] = set()                        # precisions of the plans loaded, as built

    def open(self, bundle: Bundle, *, device: str, allow_native: bool = False,
             shared_threads: int | None = None) -> None:
        """Find this GPU's plans in the bundle and vet them (`tensorrt_keys.plan_records`: the trust rule).
        With build="always" stored plans are neither read nor trusted: each is rebuilt here."""
        if device != "host" and not device.endswith(":gpu"):
            raise BackendUnavailable(f"backend 'tensorrt' runs on this machine's GPU: device='host' or "
                                     f"'DEVICE:gpu', not {device!r}")
        self._bundle = bundle
        self._records = {} if self.build == "always" else plan_records(bundle, self.key,
                                                                         allow_native=allow_native)

    def can_load(self, graph_sha256: str) -> bool:
        """With build="never": whether a plan for this graph on this GPU and TensorRT is stored (asked
        without the weights: any of the graph's plans). Else True: a missing plan is built at load."""
        if self.build != "never":
            return True
        return any(rec["graph_sha256"] == graph_sha256 and stale_reason(rec.get("key"), self.key) is None
                   for rec in self._records.values())

    def load(self, graph: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
             threads: int, initializers: dict[str, np.ndarray] | None = None) -> TensorRtEngine:
        """Deserialize this graph's stored plan (refitted from `initializers` if stored stripped), or build
        one and store it. `threads` has no meaning on a GPU."""
        b = self._bundle
        if b is None:
            raise UsageError("the TensorRT backend loads graphs of a bundle: Runtime(path, "
                             "backend='tensorrt')")
        sha = sha256_bytes(graph)
        name = next((r for r, m in b.manifest["files"].items() if m["sha256"] == sha), sha[:12])
        weights = initializers or {}
        model = onnx_wire.inline_initializers(graph, weights) if weights else graph
        wsha = weights_sha256(weights) if weights else None
        rel = plan_file(self.key, sha, wsha, self._precision, self.max_batch)
        why = None
        if rel in self._built:
            plan, how = self._built[rel]
        else:
            plan, how, why = stored_plan(b, self._records, rel, self.key, sha, wsha)
            if plan is None and self.build == "never":
                raise BackendUnavailable(f"stale or missing TensorRT plan for graph {name} on {self.gpu} "
                                         f"sm{self.key['capability']} TensorRT {self._trt.__version__} "
                                         f"({why}); build one: TensorRtBackend(build='missing')")
            if plan is None and rel in self._records:
                log.warning("TensorRT plan %s is stale (%s): rebuilding", rel, why)
        engine = None
        if plan is not None:
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                why = f"TensorRT {self._trt.__version__} could not deserialize it ({self._logger.last()})"
                if self.build == "never":
                    raise BackendUnavailable(f"stale TensorRT plan {rel} for graph {name}: {why}; rebuild "
                                             "it: TensorRtBackend(build='missing')")
                log.warning("TensorRT plan %s: %s; rebuilding", rel, why)
                plan = None
            else:
                self.plans.setdefault(name, f"loaded from {rel}")
        if plan is None:
            plan, how = self._build(rel, sha, wsha, name, model, why or "no plan")
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise BackendUnavailable(f"TensorRT built a plan for graph {name} it cannot deserialize "
                                         f"({self._logger.last()})")
        if how.get("refit"):
            refit_engine(self._trt, self._logger, engine, model, name)
        self._ran.add(how.get("precision", "?") + (", TF32 allowed" if how.get("tf32") else ""))
        return TensorRtEngine(self._trt, self._cudart, engine, self._stream, inputs, outputs,
                              onnx_wire.graph_io(graph), name, self.max_batch)

    def _build(self, rel: str, sha: str, wsha: str | None, name: str, model: bytes,
               why: str) -> tuple[bytes, dict]:
        log.info("building TensorRT %s plan for graph %s on %s (minutes on a Jetson)", self._precision, name,
                 self.gpu)
        plan, how = build_plan(self._trt, self._logger, model, name, fp16=self.fp16, max_batch=self.max_batch,
                               refit=wsha is not None, workspace_mb=self.workspace_mb)
        record = {"format": RECORD_FORMAT, "graph": name, "graph_sha256": sha, "weights_sha256": wsha,
                  "plan": rel, "plan_sha256": sha256_bytes(plan), "key": dict(self.key), **how,
                  "created_by": creator()}
        self._built[rel] = (plan, record)
        where = store_plan(self._bundle, rel, plan, record)
        self.plans[name] = f"built here ({why}) in {how['built_s']:.1f} s; {where}"
        return plan, record

    def versions(self) -> dict[str, str]:
        v = {"tensorrt": self._trt.__version__, "tensorrt_api": self.api,
             "gpu": f"{self.gpu} sm{self.key['capability'].replace('.', '')}",
             "precision": "; ".join(sorted(self._ran)) or f"{self._precision} (asked; nothing loaded yet)",
             "max_batch": str(self.max_batch)}
        if self.fp16 and self.api == "11.x":
            v["precision_note"] = "fp16 asked; TensorRT 11 is strongly typed: the graph's own types ran"
        for name, what in sorted(self.plans.items()):
            v[f"plan {name}"] = what
        return v

    def __del__(self):
        stream = getattr(self, "_stream", None)
        if stream is not None:
            self._cudart.cudaStreamDestroy(stream)
