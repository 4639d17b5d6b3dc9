"""Apache TVM backend: runs the engines `edgeflex compile --backend tvm` put into a bundle
(`engines/tvm/<target>/<graph>.so` + `<graph>.json`) on TVM's Relax virtual machine, and owns the
native-code trust rule. Compiling (ONNX -> Relax -> library) is `edgeflex.compile.tvm`.

An engine is found by the sha256 of the graph the runtime asks for, so every plan (plain graph, segment,
fused graph, DRESS level) finds its library without the runtime knowing about TVM. Weights that the graph
keeps external (a bundle's shared `weights.bin`, or a level's derived copy) are the engine's parameters,
handed over from the verified bundle at load; they are not compiled into the library.
"""

from __future__ import annotations

import ctypes
import getpass
import logging
import os
import platform
import shutil
import struct
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgeflex.errors import BackendUnavailable, BundleError, DeviceError, InputError, UsageError

from .. import schema
from ..bundle import Bundle, TensorSpec, sha256_bytes
from ..checks import batch1_check, check_inputs
from .base import Backend, Engine, sequential

log = logging.getLogger(__name__)
ENGINES = "engines/tvm"
HOST = "host"
# Under a target's folder: per DRESS level, the kernel `edgeflex compile` timed fastest on TVM there.
DRESS_CHOICE = "choices/dress.json"
# Under the host folder: every config timed on TVM and on ONNX Runtime by `edgeflex compile`, and the
# faster backend, which `Runtime(backend="auto")` runs.
BACKEND_CHOICE = "choices/backend.json"


def auto_backend(bundle: Bundle, device: str) -> tuple[str, str]:
    """(backend, why) for `Runtime(backend="auto")`: "tvm" where `edgeflex compile` measured TVM faster
    than ONNX Runtime on this machine (same CPU, engines still those it measured), else "onnxruntime"."""
    rel = f"{target_dir(HOST)}/{BACKEND_CHOICE}"
    if device != HOST:
        return "onnxruntime", f"no backend measurement for device {device!r} (only the host's are made)"
    if rel not in bundle.manifest["files"]:
        return "onnxruntime", ("no TVM engines measured against ONNX Runtime here: `edgeflex compile "
                               f"{bundle.path} --target host` measures both")
    choice = _read_json(bundle, rel, schema.BACKEND_CHOICE)
    if choice.get("stale") or not choice.get("faster"):
        return "onnxruntime", "the TVM engines changed since the backends were measured: re-run compile"
    if choice["faster"] == "tvm":
        missing = _uncovered(bundle, HOST)
        if missing:     # configs added after the compile (`edgeflex quantize`): TVM could not load them
            return "onnxruntime", (f"the TVM engines do not cover config(s) {', '.join(missing[:3])}"
                                   f"{' ...' if len(missing) > 3 else ''} (added since `edgeflex compile`): "
                                   f"re-run `edgeflex compile {bundle.path} --target host`")
    import importlib.util

    if importlib.util.find_spec("tvm") is None:
        return "onnxruntime", "TVM is not installed here (pip install 'edgeflex[tvm]')"
    here = host_cpu()
    made = choice.get("host", {})
    if (made.get("arch"), made.get("mcpu")) != (here["arch"], here["mcpu"]) and here["mcpu"] is not None:
        return "onnxruntime", (f"the backends were measured on {made.get('arch')} {made.get('mcpu')}, this "
                               f"machine is {here['arch']} {here['mcpu']}")
    ratio = choice.get("ratio")
    return choice["faster"], (f"measured by `edgeflex compile` at {choice.get('threads')} threads, batch "
                              f"{choice.get('batch')}: {choice['faster']} faster"
                              + (f" (ONNX Runtime / TVM {ratio:.2f}x, geometric mean over configs)"
                                 if ratio else ""))


def _uncovered(bundle: Bundle, target: str) -> list[str]:
    """The configs one of whose own graphs (the config's, or its segments') has no engine compiled for
    `target` in the bundle."""
    files = bundle.manifest["files"]
    covered = {_read_json(bundle, r, schema.ENGINE).get("graph_sha256")
               for r in engine_records(bundle, target_dir(target))}
    segments = bundle.manifest.get("segments") or {}
    out = []
    for c in bundle.configs:
        graphs = [c.graph] if c.graph is not None else \
            [segments[s]["graph"] for s in c.segments if s in segments]
        if any(g not in files or files[g]["sha256"] not in covered for g in graphs):
            out.append(c.name)
    return out


def engine_records(bundle: Bundle, folder: str) -> list[str]:
    """The engine records (`<graph>.json`) directly under one target's folder of the bundle."""
    return sorted(r for r in bundle.manifest["files"]
                  if PurePosixPath(r).parent.as_posix() == folder and r.endswith(".json"))


def compiled_targets(bundle: Bundle) -> list[str]:
    """The targets the bundle has TVM engines for, as `edgeflex compile --target` names them (a GPU's
    folder `DEVICE-gpu` is `DEVICE:gpu`)."""
    depth = ENGINES.count("/") + 2          # engines/tvm/<target>
    folders = sorted({"/".join(r.split("/")[:depth]) for r in bundle.manifest["files"]
                      if r.startswith(ENGINES + "/") and r.count("/") >= depth})
    out = []
    for folder in folders:
        records = engine_records(bundle, folder)
        if records:
            name = PurePosixPath(folder).name
            gpu = _read_json(bundle, records[0], schema.ENGINE).get("unit") == "gpu"
            out.append(f"{name.removesuffix('-gpu')}:gpu" if gpu else name)
    return out


def _read_json(bundle: Bundle, rel: str, spec) -> Any:
    """A JSON file `edgeflex compile` wrote into the bundle, checked against `spec` (one-line BundleError)."""
    return schema.load_json(f"bundle file {rel!r}", bundle.read(rel), "re-run `edgeflex compile`", spec)


def target_dir(target: str) -> str:
    """The bundle folder of one target's engines, e.g. `engines/tvm/host`; a device's GPU (`DEVICE:gpu`,
    as `Runtime(device=)` names it) is `engines/tvm/DEVICE-gpu`."""
    from edgeflex.devices import path_name

    return f"{ENGINES}/{path_name(target)}"


def machine_id() -> str:
    """This machine, for the trust rule: /etc/machine-id where there is one, and the host name."""
    mid = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            mid = Path(path).read_text().strip()
            break
        except OSError:
            continue
    return f"{mid}/{platform.node()}"


def creator() -> dict[str, Any]:
    """Who is compiling, where: recorded with every engine, checked by the trust rule at load."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return {"uid": os.getuid() if hasattr(os, "getuid") else -1, "user": user, "machine": machine_id()}


def created_here(record: dict[str, Any] | None) -> bool:
    """True if `record` (an engine's `created_by`) names this user on this machine."""
    here = creator()
    return bool(record) and record.get("uid") == here["uid"] and record.get("machine") == here["machine"]


def untrusted(bundle: str, what: str, record: dict[str, Any] | None, fix: str) -> BundleError:
    """The trust rule's refusal: `what` (e.g. "native code (X) compiled") was made by someone else, or here
    by another user; `fix` says how to load it anyway."""
    who = record or {}
    where = "this" if who.get("machine") == machine_id() else "another"
    return BundleError(f"bundle {bundle!r} holds {what} by user {who.get('user', '?')!r} (uid "
                       f"{who.get('uid', '?')}) on {where} machine; load it only if you trust its source: "
                       f"{fix}")


def host_cpu() -> dict[str, str | None]:
    """What LLVM calls this machine's CPU and triple: a host engine runs only where these match. With the
    TVM runtime alone (no compiler library, as on a board) LLVM is not there to ask: mcpu and mtriple are
    None, and only the architecture is checked."""
    try:
        from tvm.target import codegen

        return {"arch": platform.machine(), "mcpu": str(codegen.llvm_get_system_cpu()),
                "mtriple": str(codegen.llvm_get_system_triple())}
    except (ImportError, AttributeError):
        return {"arch": platform.machine(), "mcpu": None, "mtriple": None}


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary (what compiled TVM code assumes;
    numpy guarantees 16)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + nbytes].view(dtype).reshape(shape)


class TvmEngine(Engine):
    """One compiled graph on the Relax VM; its parameters live on the device for the engine's lifetime.
    Runs are serialised: a Relax VM keeps per-call state in the VM object (not thread-safe, unlike an ORT
    session), and a runtime may be run from several threads."""

    def __init__(self, fn, device, params: list, inputs, outputs, batch: int | None, name: str, keep=(),
                 batch1: tuple[Any, list] | None = None):
        super().__init__(inputs, outputs)
        import tvm

        self._tensor = tvm.runtime.tensor
        self._fn, self._dev, self._params = fn, device, params
        # (function, weights) of the library specialised to batch 1, where the bundle has one
        self._fn1, self._params1 = batch1 if batch1 is not None else (None, None)
        self._batch, self._name, self._keep = batch, name, keep
        self._lock = threading.Lock()
        self._dlpack = None
        if device.dlpack_device_type() == 1:            # kDLCPU: inputs and outputs by DLPack, no copies
            import tvm_ffi

            self._dlpack = tvm_ffi.from_dlpack
            self._tensor_type = tvm_ffi.Tensor
            # NOTE: an output tuple's items by index, without the length check `Array.__getitem__` makes
            # through a second FFI call per item: 0.5 against 2 us for two outputs, a sixth of a FITS call
            self._item = tvm_ffi.get_global_func("ffi.ArrayGetItem")
        self._stages: dict[int, tuple[np.ndarray, Any, int, int]] = {}   # buffer, its tensor, span

    def _stage(self, i: int, a: np.ndarray) -> tuple[Any, int, int]:
        """Input `i` as the compiled code may read it, as (TVM tensor, first byte, end byte): the caller's
        array itself when it is large (64 KiB or more), C-contiguous, writable (DLPack exports no read-only
        array) and 64-byte aligned (a large FITS batch saves its copy, benchmarks/RESULTS.md, FITS TIR kernel;
        TVM's own outputs, e.g. a chained segment's, are 64-byte aligned), else copied into this engine's
        64-byte-aligned buffer for it (compiled code assumes that alignment; numpy guarantees 16), made with
        its TVM tensor anew only when the shape or dtype changes. Under the lock."""
        # (asking for the address has a cost of its own: only where the copy it may save costs more)
        if a.nbytes >= 1 << 16 and a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % 64 == 0:
            t = self._dlpack(a)
            return t, t.data_ptr(), t.data_ptr() + a.nbytes
        st = self._stages.get(i)
        if st is None or st[0].shape != a.shape or st[0].dtype != a.dtype:
            buf = _aligned_empty(a.shape, a.dtype)
            t = self._dlpack(buf)
            st = self._stages[i] = (buf, t, t.data_ptr(), t.data_ptr() + a.nbytes)
        np.copyto(st[0], a)
        return st[1], st[2], st[3]

    def _check_batch(self, arrays: list[np.ndarray]) -> None:
        if self._batch is not None and arrays and arrays[0].shape[0] != self._batch:
            n = arrays[0].shape[0]
            raise InputError(f"TVM engine {self._name!r} was compiled for batch {self._batch} (tuned and "
                             f"--batch libraries are static), got {n}; recompile with --batch {n}, or "
                             "without --batch and tuning records for any batch")

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        self._check_batch(arrays)
        if self._dlpack is None:
            # NOTE: np.require, not np.ascontiguousarray, which makes a 0-d input (a DRESS level) 1-d
            args = [self._tensor(np.require(a, requirements="C"), self._dev) for a in arrays]
            with self._lock:
                out = self._fn(*args, *self._params)
                return [o.numpy() for o in out] if isinstance(out, tuple | list) else [out.numpy()]
        return self._call(arrays, numpy_out=True, one=arrays[0].ndim > 0 and arrays[0].shape[0] == 1)

    def _entry(self, one: bool) -> tuple[Any, list]:
        """(function, weights) for a run of batch 1 (`one`) or any other: the batch-1 library's where the
        bundle has one."""
        return (self._fn1, self._params1) if one and self._fn1 is not None else (self._fn, self._params)

    def _call(self, arrays: list[np.ndarray], numpy_out: bool, one: bool) -> list:
        # CPU: less per-call overhead than tvm.runtime.tensor in + .numpy() out, which were a large share of a
        # small FITS call (benchmarks/RESULTS.md, FITS TIR kernel; benchmarks/bench_tir_fits.py). Outputs are
        # the VM's fresh tensors, handed over as numpy views (or, `numpy_out=False`, as the tensors
        # themselves, for the next engine of a chain); one whose data lies inside an input's staging buffer (a
        # graph that returns its input, or a view of it) is copied: data pointers compared, cheaper than
        # np.may_share_memory.
        fn, params = self._entry(one)
        with self._lock:
            if len(arrays) == 1:                # the common case without the per-call lists
                t, lo, hi = self._stage(0, arrays[0])
                out = fn(t, *params)
                spans: Any = ((lo, hi),)
            else:
                staged = [self._stage(i, a) for i, a in enumerate(arrays)]
                out = fn(*[t for t, _, _ in staged], *params)
                spans = [(lo, hi) for _, lo, hi in staged]
            return self._outputs(out, spans, numpy_out)

    def _outputs(self, out: Any, spans: Any, numpy_out: bool) -> list:
        if isinstance(out, self._tensor_type):
            if len(spans) == 1:                 # one input, one output: no generator
                lo, hi = spans[0]
                if not lo <= out.data_ptr() < hi:
                    return [np.from_dlpack(out) if numpy_out else out]
                if numpy_out:
                    return [np.from_dlpack(out).copy()]
            out = (out,)
        res = []
        for o in out:
            p = o.data_ptr()
            aliased = any(lo <= p < hi for lo, hi in spans)
            if numpy_out:
                r = np.from_dlpack(o)
                res.append(r.copy() if aliased else r)
            else:
                if aliased:                     # the next engine's code assumes 64-byte alignment too
                    view = np.from_dlpack(o)
                    copy = _aligned_empty(view.shape, view.dtype)
                    np.copyto(copy, view)
                    o = self._dlpack(copy)
                res.append(o)
        return res

    def batch1(self, general: Any, last: bool) -> Any:
        """Batch 1 of a one-input CPU engine in one function of the caller's arrays: the input checks of
        `check_inputs` (`batch1_check`), the copy into a staging buffer of its own with its TVM tensor made
        once, the batch-1 library's call, the output by DLPack; no per-call lists, spans or generic
        dispatch. Anything else (another batch, an array the predicate turns down) goes to `general`.
        `last`: returns the run's result as `Runtime.run` does (one array, or a tuple for several outputs);
        else, the first engine of a chain, its outputs as TVM tensors for the next engine (`None` then
        means: not taken). None where this engine has no such path."""
        if self._dlpack is None or len(self.inputs) != 1 or self._batch not in (None, 1):
            return None
        check = batch1_check(self.inputs[0])
        if check is None:
            return None
        shape, ok = check
        fn, params = self._entry(True)
        buf = _aligned_empty(shape, self.inputs[0].dtype)
        t = self._dlpack(buf)
        lo = t.data_ptr()
        hi = lo + buf.nbytes
        lock, copyto, to_numpy, tensor_type = self._lock, np.copyto, np.from_dlpack, self._tensor_type

        def run1(arrays: Sequence[Any]) -> Any:
            if len(arrays) != 1 or not ok(a := arrays[0]):
                return general(arrays)
            with lock:
                copyto(buf, a)
                out = fn(t, *params)
            if not isinstance(out, tensor_type):  # a VM tensor is a subclass of tvm_ffi's
                (out,) = out
            r = to_numpy(out)
            # a graph that returns its input (or a view of it) would hand out the staging buffer
            return r.copy() if lo <= out.data_ptr() < hi else r

        item, which = self._item, range(len(self.outputs))

        def run_many(arrays: Sequence[Any]) -> Any:
            if len(arrays) != 1 or not ok(a := arrays[0]):
                return general(arrays)
            with lock:
                copyto(buf, a)
                out = fn(t, *params)
                res = []
                for i in which:
                    o = item(out, i)
                    r = to_numpy(o)
                    res.append(r.copy() if lo <= o.data_ptr() < hi else r)
                return tuple(res)

        def first1(arrays: Sequence[Any]) -> list | None:
            if len(arrays) != 1 or not ok(a := arrays[0]):
                return None
            with lock:
                copyto(buf, a)
                out = fn(t, *params)
                outs = [out] if isinstance(out, tensor_type) else list(out)
                if any(lo <= o.data_ptr() < hi for o in outs):     # copied before the lock is let go
                    return self._outputs(out, ((lo, hi),), False)
            return outs

        if not last:
            return first1
        return run1 if len(self.outputs) == 1 else run_many

    def _hop(self, fn: Any, params: list, values: list, last: bool) -> list:
        """A later engine of a chain on the previous engine's VM tensors: its outputs as tensors for the
        next engine, or as numpy views when `last`. No alias check: its inputs are tensors only this run
        holds (the first engine copies any output that lies in its staging buffer), so a view of one that is
        handed out keeps that tensor alive, and nothing writes it again."""
        with self._lock:
            out = fn(*values, *params)
        if isinstance(out, self._tensor_type):
            return [np.from_dlpack(out) if last else out]
        return [np.from_dlpack(o) for o in out] if last else list(out)


def compose(engines: Sequence[Engine], constants: Sequence[np.ndarray]) -> Any:
    """`TvmBackend.compose`. On the CPU, a chain's engines hand each other the VM's output tensors as they
    are: no numpy view, no staging copy, no DLPack export per hop; the first engine stages the caller's
    arrays, the last hands numpy arrays back. A plan that takes the caller's one array and nothing else
    gets the first engine's batch-1 path (`TvmEngine.batch1`), the rest of a chain on the batch-1
    libraries. Other engines (a GPU's): the default."""
    if not all(isinstance(e, TvmEngine) and e._dlpack is not None for e in engines):
        return sequential(engines, constants)
    first, later = engines[0], list(engines[1:])
    specs, extra = first.inputs, list(constants)

    def general(arrays: Sequence[Any]) -> Any:
        values = check_inputs(specs, arrays)
        if extra:
            values += extra
        first._check_batch(values)
        one = values[0].ndim > 0 and values[0].shape[0] == 1
        outs = first._call(values, numpy_out=not later, one=one)
        for i, e in enumerate(later):
            outs = e._hop(*e._entry(one), outs, i == len(later) - 1)
        return outs[0] if len(outs) == 1 else tuple(outs)

    if extra:
        return general
    if not later:
        return first.batch1(general, last=True) or general
    head = first.batch1(general, last=False)
    if head is None:
        return general
    hops = [(e, *e._entry(True), i == len(later) - 1) for i, e in enumerate(later)]

    def chain1(arrays: Sequence[Any]) -> Any:
        outs = head(arrays)
        if outs is None:
            return general(arrays)
        for e, fn, params, last in hops:
            outs = e._hop(fn, params, outs, last)
        return outs[0] if len(outs) == 1 else tuple(outs)

    return chain1


class TvmBackend(Backend):
    name = "tvm"
    per_engine_threads = False          # runtime.config_threadpool is process-wide

    def __init__(self):
        try:
            import tvm
            from tvm.runtime.vm import VirtualMachine  # noqa: F401 - fail now, in one line, if it cannot load
        except ImportError as e:
            raise BackendUnavailable(f"backend 'tvm' is not installed ({e}); pip install 'edgeflex[tvm]', or "
                                     "use backend='onnxruntime'") from None
        self._tvm = tvm
        self._bundle: Bundle | None = None
        self._engines: dict[str, dict[str, Any]] = {}
        self._choices: dict[str, str] = {}
        self._dev = None
        self.target = HOST

    def open(self, bundle: Bundle, *, device: str, allow_native: bool = False,
             shared_threads: int | None = None) -> None:
        """Index the bundle's engines for `device` (a target folder) and apply the trust rule to all of them
        before any native code is loaded. (TVM's thread pool is process-wide: `shared_threads` is moot.)"""
        folder = target_dir(device)
        records = engine_records(bundle, folder)
        if not records:
            raise BackendUnavailable(f"bundle {bundle.name!r} has no TVM engines for target {device!r}; run "
                                     f"`edgeflex compile {bundle.path} --backend tvm --target {device}`, or "
                                     "use backend='onnxruntime'")
        engines = {}
        gpu = False
        for rel in records:
            meta = _read_json(bundle, rel, schema.ENGINE)
            schema.check_engine_record(rel, meta, bundle.manifest["files"])
            if not created_here(meta.get("created_by")) and not allow_native:
                raise untrusted(bundle.name, f"native code ({meta.get('library')}) compiled",
                                meta.get("created_by"), "Runtime(..., allow_native=True) or --allow-native")
            self._check_compatible(bundle, device, meta)
            engines[meta["graph_sha256"]] = meta
            gpu = gpu or meta.get("unit", "cpu") == "gpu"
        self._dev = cuda_device(bundle.name, device) if gpu else self._tvm.cpu(0)
        self._bundle, self._engines, self.target = bundle, engines, device
        self._choices = {}
        choice = f"{folder}/{DRESS_CHOICE}"
        if choice in bundle.manifest["files"]:
            levels = _read_json(bundle, choice, schema.DRESS_CHOICE).get("levels", {})
            graphs = {k: bundle.sha256(bundle.segments[s].graph) for k, s in
                      (("dense", "main"), ("sparse", "main.sparse")) if s in bundle.segments}
            # only a choice whose engine is here (a later compile of one kernel leaves the other's out)
            self._choices = {c: v["kernel"] for c, v in levels.items()
                             if graphs.get(v.get("kernel")) in engines}

    def measured(self, config: str) -> dict[str, str]:
        kernel = self._choices.get(config)
        return {"kernel": kernel} if kernel else {}

    def compose(self, engines: Sequence[Engine], constants: Sequence[np.ndarray] = ()) -> Any:
        return compose(engines, constants)

    def can_load(self, graph_sha256: str) -> bool:
        return graph_sha256 in self._engines

    def _check_compatible(self, bundle: Bundle, device: str, meta: dict[str, Any]) -> None:
        built = meta.get("versions", {}).get("tvm")
        if built != self._tvm.__version__:
            raise BackendUnavailable(f"bundle {bundle.name!r}: TVM engine {meta['library']} was compiled "
                                     f"with TVM {built}, this is TVM {self._tvm.__version__}; re-run "
                                     f"`edgeflex compile --target {device}` or install apache-tvm=={built}")
        unit = meta.get("unit", "cpu")
        if unit not in ("cpu", "gpu") or (unit == "gpu") != device.endswith(":gpu"):
            raise BackendUnavailable(f"bundle {bundle.name!r}: TVM engine {meta['library']} is for the "
                                     f"{unit}, not what device {device!r} names; a GPU's engines load with "
                                     "device='DEVICE:gpu'")
        here = host_cpu()
        h = meta.get("host", {})                # the machine that compiled it
        if device == HOST and (h.get("arch") != here["arch"] or
                               (here["mcpu"] is not None and h.get("mcpu") != here["mcpu"])):
            raise BackendUnavailable(f"bundle {bundle.name!r}: its host TVM engines were compiled for "
                                     f"{h.get('arch')} {h.get('mcpu')}, this machine is {here['arch']} "
                                     f"{here['mcpu']}; re-run `edgeflex compile --target host` here")
        target = meta.get("target", {})
        triple = (target.get("host", {}) if unit == "gpu" else target).get("mtriple", "")
        if device != HOST and triple and not triple.startswith(here["arch"]):
            raise BackendUnavailable(f"bundle {bundle.name!r}: TVM engines for {device!r} are {triple} code, "
                                     f"this machine is {here['arch']}; run them on the device")

    def load(self, graph: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
             threads: int, initializers: dict[str, np.ndarray] | None = None) -> TvmEngine:
        if self._bundle is None:
            raise UsageError("the TVM backend loads engines compiled into a bundle: use Runtime(path, "
                             "backend='tvm') after `edgeflex compile PATH --backend tvm`")
        b, key = self._bundle, sha256_bytes(graph)
        meta = self._engines.get(key)
        if meta is None:
            name = next((r for r, m in b.manifest["files"].items() if m["sha256"] == key), key[:12])
            raise BackendUnavailable(f"bundle {b.name!r} has no TVM engine ({self.target}) for {name}, which "
                                     "this runtime loads; it was not compiled with these options (configs, "
                                     "fused=, dress_kernel=): re-run `edgeflex compile` with them")
        _configure_threads(threads)
        inits = initializers or {}
        fn, params, keep = self._load_vm(meta, inits)
        one = None
        if meta.get("batch1"):          # the batch-1 specialisation beside the dynamic library
            fn1, params1, keep1 = self._load_vm({**meta, **meta["batch1"]}, inits)
            one = (fn1, _shared(params, params1))
            keep += keep1
        return TvmEngine(fn, self._dev, params, inputs, outputs, meta.get("batch"), meta["library"],
                         keep=keep, batch1=one)

    def _load_vm(self, meta: dict[str, Any], inits: dict[str, np.ndarray]) -> tuple[Any, list, tuple]:
        """One library of an engine record on the VM: (entry function, its weights as the VM takes them,
        what must outlive them)."""
        from tvm.runtime.vm import VirtualMachine

        why = _amx_refusal(meta)        # also asks Linux for the AMX tile state, before any kernel runs
        if why is not None:
            raise DeviceError(why)
        tvm = self._tvm
        lib = _load_library(self._bundle.read(meta["library"]), Path(meta["library"]).name)  # sha256-checked
        dev = self._dev
        vm = VirtualMachine(lib, dev)
        params = []
        for p in meta["params"]:
            if p["name"] not in inits:
                raise BundleError(f"TVM engine {meta['library']} needs weight {p['name']!r}, which the "
                                  "runtime did not supply from the bundle; re-run `edgeflex compile`")
            arr = np.ascontiguousarray(inits[p["name"]])
            if list(arr.shape) != p["shape"] or arr.dtype != np.dtype(p["dtype"]):
                raise BundleError(f"TVM engine {meta['library']}: weight {p['name']!r} is {arr.dtype}"
                                  f"{list(arr.shape)} in the bundle, compiled for {p['dtype']}{p['shape']}; "
                                  "re-run `edgeflex compile`")
            params.append(tvm.runtime.tensor(arr, dev))
        transform = meta.get("transform_params")
        if transform:                   # weight re-layouts lifted out of `main` at compile: run once, here
            try:
                params = list(vm[transform](params))
            except Exception as e:  # noqa: BLE001 - one line naming the engine
                raise BundleError(f"TVM engine {meta['library']}: its load-time weight transform "
                                  f"{transform!r} failed ({str(e).strip().splitlines()[0][:160]}); re-run "
                                  "`edgeflex compile`") from None
        return vm[meta["entry"]], params, (lib, vm)

    def precision_refusal(self, precision: str) -> str | None:
        """fp32 and fp16 (LLVM's half-precision arithmetic where the target has it; the device's own check
        says whether it does). int8 where its engines were compiled with edgeflex's int8 kernels
        (`kernels.tir.qconv`: uint8 x int8 -> int32 dot products, VNNI `vpdpbusd` / aarch64 `sdot`) and,
        for this host, its CPU has that instruction; refused elsewhere (TVM's importer alone would run a
        QDQ graph's convs in fp32 on dequantized weights: emulation)."""
        if precision in ("fp32", "fp16"):
            return None
        if precision != "int8":
            return f"the TVM path has no {precision} lowering"
        if self.target == HOST:
            from edgeflex.devices.precision import tvm_int8_refusal

            why = tvm_int8_refusal()
            if why is not None:
                return f"{why}; run it on backend='onnxruntime'"
        if self._bundle is not None:
            int8 = {c.name for c in self._bundle.configs if c.precision == "int8"}
            for meta in self._engines.values():
                if int8 & set(meta.get("used_by", ())) and self.target == HOST:
                    why = _amx_refusal(meta)
                    if why is not None:
                        return why
                if int8 & set(meta.get("used_by", ())) and "qconv" not in meta.get("kernels", ()):
                    return (f"TVM engine {meta['library']} was compiled without edgeflex's int8 kernels "
                            "(its target has no VNNI / dotprod, or --no-kernels): its int8 convs would run "
                            "in fp32 (int8 emulated); re-compile for a target with the instruction, or run "
                            "it on backend='onnxruntime'")
        return None

    def versions(self) -> dict[str, str]:
        return {"tvm": self._tvm.__version__, "target": self.target}


def _amx_refusal(meta: dict[str, Any]) -> str | None:
    """Why an engine whose int8 star blocks run on AMX tiles (`kernels.tir.qstar`, compiled where the
    target had amx-int8) cannot run here: this CPU lacks `amx_int8`, or Linux refused the process the tile
    state (requested here, once per process: without it the first tile instruction kills the process)."""
    if not any(f.startswith("qstar_amx") for f in meta.get("kernel_functions", ())):
        return None
    from edgeflex.devices.precision import cpu_flags
    from edgeflex.kernels.tir.qstar import request_amx

    why = "this CPU has no amx_int8" if "amx_int8" not in cpu_flags() else request_amx()
    if why is None:
        return None
    return (f"TVM engine {meta['library']} computes with AMX-INT8 tiles, but {why}; re-compile it on this "
            "machine (edgeflex compile --backend tvm: without amx-int8 its star blocks use VNNI) or run it "
            "on backend='onnxruntime'")


def _shared(params: list, params1: list) -> list:
    """The batch-1 library's weights, each replaced by the dynamic library's tensor where the two hold the
    same values (their load-time transforms lay weights out alike unless a kernel's layout depends on the
    batch): one copy of the weights in memory, not two. Compared once, at load."""
    if len(params) != len(params1):
        return params1
    out = []
    for a, b in zip(params, params1):
        same = (tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
                and np.array_equal(np.from_dlpack(a), np.from_dlpack(b)))
        out.append(a if same else b)
    return out


def cuda_device(bundle: str, device: str):
    """TVM's CUDA device 0, ready to load engines: the runtime's CUDA sidecar library loaded (the TVM
    wheel keeps it apart, since it links libcuda) and the CUDA compile callback registered (these wheels'
    engines carry CUDA C, compiled for the GPU at hand when a library is loaded: NVRTC from
    `cuda-bindings`, or nvcc with TVM_CUDA_COMPILE_MODE=nvcc). BackendUnavailable, one line, if any is
    missing."""
    import tvm

    if tvm.get_global_func("device_api.cuda", allow_missing=True) is None:
        import ctypes

        from tvm import base

        lib = Path(base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
        try:        # the CUDA runtime it links, where pip's nvidia packages put it (not on the loader path)
            from cuda.pathfinder import load_nvidia_dynamic_lib

            load_nvidia_dynamic_lib("cudart")
        except Exception:  # noqa: BLE001, S110 - not installed, or found by the loader anyway
            pass
        try:
            base._LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(lib), mode=ctypes.RTLD_LOCAL)
        except OSError as e:
            raise BackendUnavailable(f"bundle {bundle!r}: {device} engines need TVM's CUDA runtime "
                                     f"({lib.name}), which did not load ({str(e)[:120]}): no NVIDIA driver "
                                     "(libcuda.so.1) here, or a TVM built without CUDA") from None
    if not tvm.cuda(0).exist:
        raise BackendUnavailable(f"bundle {bundle!r}: {device} engines need a CUDA GPU, and none is visible "
                                 "here (nvidia-smi; CUDA_VISIBLE_DEVICES)")
    try:
        from tvm.support import nvcc  # registers tvm_callback_cuda_compile
    except ImportError as e:
        raise BackendUnavailable(f"bundle {bundle!r}: {device} engines are compiled for this GPU when "
                                 f"loaded, and TVM's CUDA compiler hook did not import ({e})") from None
    from tvm.target import _ffi_api

    if not hasattr(_ffi_api, "TargetCurrent"):
        # TVM's runtime alone (no compiler library): the hook asks for the current compile target, which
        # only the compiler library knows. There is none at load, so it falls back to the GPU's own
        # compute capability, as it does under the full TVM.
        nvcc.Target = _NoTarget
    return tvm.cuda(0)


class _NoTarget:
    """Stands in for `tvm.target.Target` in TVM's CUDA compile hook when only the runtime is installed."""

    @staticmethod
    def current(allow_none: bool = True) -> None:
        return None


_SIZED: set[int] = set()        # the threads whose TVM parallel launcher has been sized for every core
_SIZED_LOCK = threading.Lock()


def _configure_threads(threads: int) -> None:
    import tvm

    # NOTE: TVM keeps one thread pool per calling thread (a thread-local ThreadPool): the last engine
    # configured in a thread sets it for every TVM engine that thread runs.
    # Mode -3 (threads share every core, no pinning): on a shared machine pinning fights other processes.
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(threads))
    names = [str(c) for c in cpus]
    config = tvm.get_global_func("runtime.config_threadpool")
    if len(cpus) > 1:
        _size_launcher(config, names)
    config(-3, threads, names)


def _size_launcher(config: Any, cpus: list[str]) -> None:
    """Once per thread, before its first run: one no-op parallel launch at every core (TVM 0.27's pool).

    TVM's `ParallelLauncher` (one per calling thread) allocates a launch's barrier counters (64 bytes per
    task) at the thread's first launch, for that launch's task count k, and reallocates only when a later
    count exceeds its error list's size, k + 1: a later launch at k + 1 threads (2 after a first at 1) uses
    a counter at byte 64 k of a 64 k-byte allocation. glibc's rounding leaves 8 usable bytes there, so it
    is harmless here, but it is out of bounds of what was allocated. A first launch at every core
    allocates the counters for any count the pool is later set to. Checked by tests/test_tvm.py with
    malloc_usable_size."""
    import tvm

    with _SIZED_LOCK:
        if threading.get_ident() in _SIZED:
            return
        _SIZED.add(threading.get_ident())
    lib = getattr(tvm.base, "_LOADED_LIBS", {}).get("tvm_runtime")
    launch = getattr(lib, "TVMBackendParallelLaunch", None)
    if launch is None:                   # another packaging of the runtime: left as TVM sizes it
        log.debug("TVMBackendParallelLaunch not found: TVM's parallel launcher left unsized")
        return
    launch.argtypes = [_LAMBDA, ctypes.c_void_p, ctypes.c_int]
    launch.restype = ctypes.c_int
    config(-3, len(cpus), cpus)
    if launch(_NOOP, None, 0) != 0:
        log.debug("sizing TVM's parallel launcher failed")


def _noop_task(task_id: int, penv: Any, cdata: Any) -> int:
    return 0


# FTVMParallelLambda: int (*)(int task_id, TVMParallelGroupEnv* penv, void* cdata)
_LAMBDA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_NOOP = _LAMBDA(_noop_task)


# ELF e_machine of the architectures engines are built for, by `platform.machine()` name.
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
# Per ELF class (32, 64 bit): header size, header fields after e_ident, and for the program and section
# header tables: entry format, entry size, and the indices of the entry's file offset and file size.
_ELF = {1: {"ehsize": 52, "head": "HHIIIIIHHHHHH", "ph": ("IIIIIIII", 32, 1, 4),
            "sh": ("IIIIIIIIII", 40, 4, 5)},
        2: {"ehsize": 64, "head": "HHIQQQIHHHHHH", "ph": ("IIQQQQQQ", 56, 2, 5),
            "sh": ("IIQQQQIIQQ", 64, 4, 5)}}


def check_elf(data: bytes, name: str, machine: str | None = None) -> None:
    """Refuse, in one line, a library whose ELF header or tables point past its end, before the loader maps
    it: a truncated library's pages beyond the end fault with SIGBUS when touched, killing the process.
    Checks the magic, class and byte order, the header size, the program and section header tables, every
    PT_LOAD segment's and every section's file extent, and (when `machine` is given) the architecture."""
    def bad(why: str) -> BundleError:
        return BundleError(f"TVM library {name} is not a loadable shared object ({why}; {len(data)} bytes): "
                           "truncated or corrupted; re-run `edgeflex compile`")

    if len(data) < 16 or data[:4] != b"\x7fELF" or data[4] not in _ELF or data[5] not in (1, 2):
        raise bad("no ELF32/ELF64 header")
    layout, order = _ELF[data[4]], "<" if data[5] == 1 else ">"
    if len(data) < layout["ehsize"]:
        raise bad("header cut short")
    (e_type, e_machine, _, _, phoff, shoff, _, ehsize, phentsize, phnum, shentsize, shnum, _) = \
        struct.unpack_from(order + layout["head"], data, 16)
    if ehsize != layout["ehsize"] or e_type != 3:
        raise bad(f"header size {ehsize}, type {e_type}: not a shared object")
    if machine is not None and machine in ELF_MACHINES.values() and ELF_MACHINES.get(e_machine) != machine:
        raise bad(f"built for {ELF_MACHINES.get(e_machine, f'machine {e_machine}')}, this is {machine}")
    tables = (("program", phoff, phentsize, phnum, layout["ph"]),
              ("section", shoff, shentsize, shnum, layout["sh"]))
    for table, off, size, count, (fmt, entsize, i_off, i_size) in tables:
        if count and (size != entsize or off + count * size > len(data)):
            raise bad(f"{table} header table ({count} x {size} bytes at {off}) past the end")
        for i in range(count):
            ent = struct.unpack_from(order + fmt, data, off + i * size)
            kind = ent[0] if table == "program" else ent[1]
            if (kind == 1 if table == "program" else kind != 8) and ent[i_off] + ent[i_size] > len(data):
                what = "PT_LOAD segment" if table == "program" else "section"
                raise bad(f"{what} {i} ends at byte {ent[i_off] + ent[i_size]}, past the end")


def _load_library(data: bytes, name: str):
    """Load a verified library from its bytes: written to a private temp file, loaded, removed, so the
    code that runs is the code the bundle's checksum covered (not a file that could change meanwhile)."""
    import tvm

    check_elf(data, name, platform.machine())
    tmp = tempfile.mkdtemp(prefix="edgeflex-tvm-")
    try:
        path = os.path.join(tmp, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o500)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return tvm.runtime.load_module(path)
        except Exception as e:  # noqa: BLE001 - one line, naming the library and the likely cause
            msg = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            hint = (f"; is {tempfile.gettempdir()} mounted noexec? set TMPDIR to an executable directory"
                    if any(w in msg for w in ("ermission", "map segment", "not permitted")) else "")
            raise BackendUnavailable(f"cannot load TVM library {name} ({msg}){hint}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
