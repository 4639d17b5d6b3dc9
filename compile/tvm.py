"""`edgeflex compile --backend tvm`: every graph a bundle's configs run -> ONNX fixes for Relax's importer ->
Relax -> `tvm.compile` for a named target (this host, an aarch64 board, a Jetson GPU) -> a library and a small
JSON under `engines/tvm/<target>/` of the bundle, checksummed like every bundle file. Optional MetaSchedule
tuning, its records kept in the bundle so a re-compile reuses them. Loading is `runtime/backends/tvm.py`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgeflex.args import (
    check_bool,
    check_choice,
    check_int,
    check_names,
    check_path,
    check_str,
    fail,
)
from edgeflex.devices.measure import interleaved
from edgeflex.errors import BackendUnavailable, BundleError, DeviceError, EdgeflexError, UsageError
from edgeflex.runtime.backends.tvm import (
    BACKEND_CHOICE,
    DRESS_CHOICE,
    ELF_MACHINES,
    HOST,
    creator,
    host_cpu,
    target_dir,
)
from edgeflex.runtime.bundle import Bundle, TensorSpec, model_id, sha256_bytes, update_bundle
from edgeflex.runtime.plan import build_plans

log = logging.getLogger(__name__)

ENGINE_FORMAT = "edgeflex-tvm-engine"

# Used only when the device catalogue (edgeflex.devices.catalog) is not installed: the same target dicts as
# its TOML files. NOTE: not TVM's `nvidia/jetson-orin-nano` tag, whose host CPU is wrong for the module.
_A78AE = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"}
FALLBACK_TARGETS: dict[str, dict[str, dict[str, Any]]] = {
    "jetson-orin-nano-8gb": {"cpu": {**_A78AE, "num-cores": 6},
                             "gpu": {"kind": "cuda", "arch": "sm_87", "host": {**_A78AE, "num-cores": 6}}},
    "jetson-agx-orin-64gb": {"cpu": {**_A78AE, "num-cores": 12},
                             "gpu": {"kind": "cuda", "arch": "sm_87", "host": {**_A78AE, "num-cores": 12}}},
    "rpi5": {"cpu": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "num-cores": 4}},
}


# --- targets -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompileTarget:
    """A named TVM target: the bundle folder it compiles into, the TVM target dict, the unit it runs on,
    the C++ driver that links the library (a cross compiler for another architecture), and where the dict
    came from."""

    name: str
    target: dict[str, Any]
    unit: str
    linker: str
    source: str

    @property
    def host_triple(self) -> str:
        host = self.target.get("host", self.target) if self.unit == "gpu" else self.target
        return str(host.get("mtriple", ""))


def host_target(threads: int | None = None) -> dict[str, Any]:
    """This machine as a TVM llvm target: LLVM's detected CPU and triple, the cores this process may use."""
    cpu = host_cpu()
    from edgeflex.devices import usable_cores
    return {"kind": "llvm", "mtriple": cpu["mtriple"], "mcpu": cpu["mcpu"],
            "num-cores": int(threads or usable_cores())}


def _device_targets(name: str) -> tuple[str, dict[str, dict[str, Any]], str]:
    """(canonical device name, {unit: target dict}, source) from the device catalogue, else the table above.
    A unique prefix names a device (`jetson-orin-nano` -> `jetson-orin-nano-8gb`)."""
    try:
        from edgeflex.devices.catalog import catalog_names, get_device
    except ImportError:
        names, source = sorted(FALLBACK_TARGETS), "built-in table (no device catalogue installed)"
        get_device = None
    else:
        names, source = catalog_names(), "device catalogue"
    hits = [name] if name in names else [n for n in names if n.startswith(name + "-")]
    if len(hits) != 1:
        why = "is ambiguous" if hits else "is not a known device"
        raise DeviceError(f"TVM target {name!r} {why}; expected host or one of: {', '.join(names)} "
                          "(a unique prefix works; append :gpu for a Jetson's GPU)")
    canonical = hits[0]
    if get_device is None:
        return canonical, FALLBACK_TARGETS[canonical], source
    dev = get_device(canonical)
    units = {b.unit: dict(b.target) for b in dev.backends if b.engine == "tvm" and b.target}
    return canonical, units, f"{source} ({Path(dev.file).name if dev.file else canonical})"


def resolve_target(name: str, *, threads: int | None = None) -> CompileTarget:
    """`host`, a catalogue device (its CPU), or `<device>:gpu` (its CUDA GPU, compile-only here)."""
    if name == HOST:
        return CompileTarget(HOST, host_target(threads), "cpu", os.environ.get("CXX", "g++"),
                             "detected (LLVM host CPU)")
    base, _, unit = name.partition(":")
    unit = unit or "cpu"
    if unit not in ("cpu", "gpu"):
        raise UsageError(f"TVM target {name!r}: unit {unit!r} unknown; expected <device> or <device>:gpu")
    canonical, units, source = _device_targets(base)
    if unit not in units:
        raise BackendUnavailable(f"device {canonical!r} has no TVM {unit} target in the {source}; it has: "
                                 f"{', '.join(units) or 'none'}")
    target = units[unit]
    from edgeflex.devices import path_name

    folder = canonical if unit == "cpu" else path_name(f"{canonical}:gpu")
    host = target.get("host", target) if unit == "gpu" else target
    triple = str(host.get("mtriple", ""))
    here = platform.machine()
    cross = bool(triple) and not triple.startswith(here)
    linker = cross_linker(triple) if cross else os.environ.get("CXX", "g++")
    return CompileTarget(folder, target, unit, linker, source)


# --- linking: the system's C++ driver; for another architecture its cross g++ or the ziglang wheel ----

ZIG = "zig c++"             # a CompileTarget.linker that starts so links with the ziglang wheel
LINKER_ENV = "EDGEFLEX_LINKER"  # `zig`: link cross targets with ziglang even where the cross g++ is installed


def cross_linker(triple: str) -> str:
    """The linker of libraries for `triple` (another architecture): Debian's `<triple>-g++` where it is
    installed, else the `ziglang` wheel (`edgeflex[cross]`, no apt needed) as `zig c++ -target <triple>`;
    $EDGEFLEX_LINKER=zig picks zig even where the g++ is there. Without either, the g++'s name (compiling
    says what to install)."""
    gxx = f"{triple}-g++"
    want = os.environ.get(LINKER_ENV, "")
    if want not in ("", "zig"):
        raise UsageError(f"${LINKER_ENV}={want!r}: expected 'zig' or unset")
    if (want == "zig" or shutil.which(gxx) is None) and _zig_version() is not None:
        return f"{ZIG} -target {triple}"
    return gxx


def _zig_version() -> str | None:
    """The installed ziglang wheel's version, or None."""
    from importlib import metadata

    try:
        return metadata.version("ziglang")
    except metadata.PackageNotFoundError:
        return None


class ZigLinker:
    """`export_library`'s fcompile for a cross target without its g++: `python -m ziglang c++ -target T
    -shared -fPIC` over TVM's object files (the first call builds zig's cache for the target, ~1 min)."""

    output_format = "so"

    def __init__(self, triple: str):
        self.triple = triple

    def __call__(self, output: str, objects: Sequence[str] | str, options: Sequence[str] | None = None,
                 **_: Any) -> None:
        objects = [objects] if isinstance(objects, str) else list(objects)
        cmd = [sys.executable, "-m", "ziglang", "c++", "-target", self.triple, "-shared", "-fPIC",
               "-o", output, *objects, *(options or [])]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
            raise BackendUnavailable(f"zig could not link {Path(output).name} for {self.triple} "
                                     f"({last[0][:200]}); command: {' '.join(cmd)}")


def fcompile_for(target: CompileTarget):
    """The fcompile `export_library` links `target`'s library with (BackendUnavailable, one line, if its
    linker is not installed)."""
    from tvm.support import cc

    if target.linker.startswith(ZIG):
        return ZigLinker(target.linker.split()[-1])
    if shutil.which(target.linker) is None:
        arch = target.host_triple.replace("-linux-gnu", "")
        hint = (f"apt-get install g++-{arch}-linux-gnu, or pip install 'edgeflex[cross]' (ziglang)"
                if target.host_triple else "install a C++ compiler")
        raise BackendUnavailable(f"linking the {target.name} library needs {target.linker!r}, not found on "
                                 f"PATH (Debian: {hint})")
    return cc.cross_compiler(target.linker)


# --- which graphs: the ones the runtime would load --------------------------------------------------------

@dataclass
class GraphJob:
    """One graph to compile: its bundle file, bytes, and the weights the runtime hands it (its parameters)."""

    rel: str
    data: bytes
    inputs: list[TensorSpec]
    params: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    used_by: list[str] = field(default_factory=list)


def collect_graphs(bundle: Bundle, *, configs: Sequence[str] | None = None, fused: bool = False,
                   dress_kernel: str | None = None) -> list[GraphJob]:
    """The graphs `Runtime(bundle, fused=, dress_kernel=, only=configs)` would load, each once, named by
    their bundle file: the runtime's own plans (`runtime.plan.build_plans`), read without loading anything."""
    for name in configs or ():
        bundle.config(name)                 # an unknown name is refused, listing the configs
    plans = build_plans(bundle, fused=fused, only=set(configs) if configs else None,
                        kernel=(lambda _name: dress_kernel) if dress_kernel else None)
    jobs: dict[str, GraphJob] = {}
    for name, plan in plans.items():
        for step in plan.steps:
            if step.graph not in jobs:
                params = {n: (tuple(a.shape), np.asarray(a).dtype.str)
                          for n, a in (step.initializers or {}).items()}
                jobs[step.graph] = GraphJob(step.graph, bundle.read(step.graph), list(step.inputs), params)
            if name not in jobs[step.graph].used_by:
                jobs[step.graph].used_by.append(name)
    return list(jobs.values())


# --- ONNX fixes for Relax's importer ------------------------------------------------------------------------

def prepare_onnx(data: bytes, params: dict[str, tuple[tuple[int, ...], str]]):
    """The graph as Relax's ONNX importer needs it: refused if it uses ONNX DFT (the importer has none);
    LayerNormalization whose mean / inv-std outputs are used expanded into plain ops (the importer returns
    zeros for them); the weights the runtime supplies turned into trailing graph inputs (parameters)."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(data)
    g = model.graph
    ops = {n.op_type for n in g.node}
    if "DFT" in ops:
        raise BackendUnavailable("graph uses ONNX DFT (FITS form 'dft'), which TVM's Relax importer lacks; "
                                 "re-export the bundle with the 'folded' or 'lowrank' form "
                                 "(export.fits.FORMS_BY_ENGINE['tvm'])")
    _expand_layernorm(model)
    inits = {t.name: t for t in g.initializer}
    inputs = {i.name: i for i in g.input}
    for name, (shape, dtype) in params.items():
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        if name in inits:
            g.initializer.remove(inits.pop(name))
        elif name in inputs:
            g.input.remove(inputs[name])
        else:
            continue                                    # a weight for another graph of the same config
        g.input.append(helper.make_tensor_value_info(name, elem, list(shape)))
    external = [t.name for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise BundleError(f"graph has external tensors the runtime does not supply "
                          f"({', '.join(external[:3])}); the bundle is inconsistent, re-export it")
    return model


def _expand_layernorm(model) -> None:
    """Rewrite each LayerNormalization (last axis) whose Mean or InvStdDev output is used into ReduceMean,
    Sub, Mul, Sqrt, Reciprocal: same maths, every output real."""
    from onnx import helper, numpy_helper

    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    nodes = []
    for n in g.node:
        extra = [o for o in n.output[1:] if o]
        if n.op_type != "LayerNormalization" or not extra:
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        x, scale = n.input[0], n.input[1]
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if attrs.get("axis", -1) != -1:
            raise BackendUnavailable(f"LayerNormalization {n.name!r} normalises axis {attrs['axis']}; the "
                                     "TVM path expands only the last axis")
        p = f"{n.output[0]}.ln"
        mean = n.output[1] or f"{p}.mean"
        inv = n.output[2] if len(n.output) > 2 and n.output[2] else f"{p}.inv"
        eps = np.array(attrs.get("epsilon", 1e-5), np.float32)
        g.initializer.append(numpy_helper.from_array(eps, f"{p}.eps"))

        def reduce_mean(src: str, dst: str, p: str = p) -> Any:
            if opset >= 18:
                g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{p}.axes"))
                return helper.make_node("ReduceMean", [src, f"{p}.axes"], [dst], keepdims=1)
            return helper.make_node("ReduceMean", [src], [dst], axes=[-1], keepdims=1)

        nodes += [reduce_mean(x, mean), helper.make_node("Sub", [x, mean], [f"{p}.d"]),
                  helper.make_node("Mul", [f"{p}.d", f"{p}.d"], [f"{p}.sq"]),
                  reduce_mean(f"{p}.sq", f"{p}.var"),
                  helper.make_node("Add", [f"{p}.var", f"{p}.eps"], [f"{p}.ve"]),
                  helper.make_node("Sqrt", [f"{p}.ve"], [f"{p}.sd"]),
                  helper.make_node("Reciprocal", [f"{p}.sd"], [inv]),
                  helper.make_node("Mul", [f"{p}.d", inv], [f"{p}.n"]),
                  helper.make_node("Mul", [f"{p}.n", scale], [f"{p}.s" if bias else n.output[0]])]
        if bias:
            nodes.append(helper.make_node("Add", [f"{p}.s", bias], [n.output[0]]))
    del g.node[:]
    g.node.extend(nodes)


# --- compiling one graph ---------------------------------------------------------------------------------

def _relax_module(model, inputs: list[TensorSpec], batch: int | None, label: str = ""):
    from tvm.relax.frontend.onnx import from_onnx

    shapes = None
    if batch is not None:
        shapes = {s.name: [batch if d is None else d for d in s.shape] for s in inputs}
        # Parameters keep their own (static) shapes; only the runtime inputs get the batch.
        shapes.update({i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
                       for i in model.graph.input if i.name not in shapes})
    import tvm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # "Renaming name ..." per sanitized tensor name
        try:
            return from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
        except tvm.error.OpNotImplemented as e:     # e.g. a GRU or LSTM: ONNX Runtime runs it, TVM cannot
            raise BackendUnavailable(
                f"TVM {tvm.__version__} cannot import {label or 'the graph'}: "
                f"{_one_line(e)}; its configs keep running on ONNX Runtime, nothing was "
                "added to the bundle") from None


@dataclass(frozen=True)
class Boards:
    """Tune on the boards of an RPC tracker (`edgeflex tracker`, `edgeflex board serve`): its address and the
    boards' key."""

    host: str
    port: int
    key: str

    def __str__(self) -> str:
        return f"boards {self.key!r} at RPC tracker {self.host}:{self.port}"


def export_candidate(target: CompileTarget, mod) -> str:
    """MetaSchedule's export of one candidate (run in its builder's worker processes): a shared library
    linked with the target's linker (a cross g++ or zig for a board), which TVM's RPC server on the board
    loads as it is, without a compiler there."""
    path = os.path.join(tempfile.mkdtemp(prefix="edgeflex-ms-"), "candidate.so")
    mod.export_library(path, fcompile=fcompile_for(target))
    return path


def _tune(mod, target, work_dir: Path, trials: int, progress: Callable[[int, int], None] | None,
          timeout_s: float, compile_target: CompileTarget | None = None,
          boards: Boards | None = None) -> tuple[Any, dict[str, int]]:
    """MetaSchedule tuning of `mod` with at most `trials` measured candidates in all, records in `work_dir`
    (which may hold earlier records: they are reused, not re-measured), then applied. Candidates run on
    this machine, or with `boards` on the boards of an RPC tracker (MetaSchedule's RPCRunner, each
    candidate linked here with the target's linker). Returns the module and the counts of candidates
    measured and failed this run."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    with target:
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                        relax.transform.CanonicalizeBindings(),
                                        relax.get_pipeline("zero")])(mod)
    counts = {"measured": 0, "failed": 0}
    if trials > 0:
        tasks = ms.relax_integration.extract_tasks(mod, target)
        per_task = max(8, -(-trials // max(1, len(tasks))))
        callbacks = [*ms.MeasureCallback.create("default"), _progress_callback(progress, trials, counts)]
        # MetaSchedule's console handler takes this level (its per-task log files keep everything).
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
        # NOTE: the default 30 s build/run timeouts fail every candidate on a loaded 2-core machine (a build
        # worker alone can take longer than that to start there): timeouts are a parameter, and failures are
        # counted.
        if boards is None:
            builder = ms.builder.LocalBuilder(timeout_sec=timeout_s)
            runner = ms.runner.LocalRunner(timeout_sec=timeout_s)
        else:
            import functools

            builder = ms.builder.LocalBuilder(timeout_sec=timeout_s,
                                              f_export=functools.partial(export_candidate, compile_target))
            runner = ms.runner.RPCRunner(
                ms.runner.RPCConfig(tracker_host=boards.host, tracker_port=boards.port,
                                    tracker_key=boards.key, session_timeout_sec=int(timeout_s)),
                ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False))
        ms.relax_integration.tune_relax(
            mod, params={}, target=target, work_dir=str(work_dir), max_trials_global=trials,
            max_trials_per_task=per_task, num_trials_per_iter=min(64, per_task), measure_callbacks=callbacks,
            builder=builder, runner=runner)
    with target:
        return relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod), counts


def _progress_callback(progress: Callable[[int, int], None] | None, total: int, counts: dict[str, int]):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            counts["measured"] += len(measure_candidates)
            counts["failed"] += sum(1 for b, r in zip(builder_results, runner_results)
                                    if b.error_msg or (r is not None and r.error_msg))
            if progress is not None:
                progress(min(counts["measured"], total), total)

    return _Progress()


def compile_graph(job: GraphJob, target: CompileTarget, out_dir: Path, *, batch: int | None = None,
                  trials: int = 0, tuning_dir: Path | None = None, timeout_s: float = 120.0,
                  kernels: bool = True, cuda_check: bool = True,
                  progress: Callable[[int, int], None] | None = None,
                  boards: Boards | None = None) -> dict[str, Any]:
    """Compile one graph into `out_dir/<stem>.so`; returns its engine record (the JSON written beside it).
    `kernels` puts edgeflex's hand-written TIR kernels (`edgeflex.kernels.tir`) in place of the ops they
    replace; the names of those applied are recorded."""
    import tvm

    t0 = time.perf_counter()
    model = prepare_onnx(job.data, job.params)
    mod = _relax_module(model, job.inputs, batch, job.rel)
    tgt = tvm.target.Target(target.target)
    applied: list[str] = []
    if kernels:
        from edgeflex.kernels import tir

        mod, applied = tir.apply(mod, tir.RewriteContext(tgt, job.rel, dict(job.params), batch))
    # the hand-written functions the rewrites added (e.g. fits_split_nx720x7_h816_r118: which FITS kernel)
    functions = sorted(gv.name_hint for gv, f in mod.functions.items()
                       if f.attrs is not None and "tirx.is_scheduled" in f.attrs) if applied else []
    mod, transform = _lift_param_transforms(mod, model, job)
    if "qconv" in applied and target.unit == "cpu" and tuning_dir is None:
        # the QuantizeLinear / DequantizeLinear pairs left between the int8 kernels: vectorized, parallel
        from edgeflex.kernels.tir.elementwise import lower_and_schedule

        mod = lower_and_schedule(mod, tgt)
        tgt = int8_build_target(tgt)
    tuned = None
    if tuning_dir is not None:
        mod, counts = _tune(mod, tgt, tuning_dir, trials, progress, timeout_s, target, boards)
        tuned = {"trials_budget": trials, **counts, "measured_on": str(boards) if boards else "this machine",
                 "records": sorted(p.name for p in tuning_dir.glob("*.json"))}
    try:
        if target.unit == "gpu":
            ex = tvm.compile(mod, target=tgt)
        else:
            # NOTE: the VM's functions compiled to native code instead of interpreted bytecode: less overhead
            # per kernel call, which adds up over a small model's many calls (benchmarks/RESULTS.md, Elastic
            # models). CPU only: unchecked on a GPU.
            from tvm import relax

            ex = relax.build(mod, tgt, exec_mode="compiled")
    except Exception as e:  # noqa: BLE001 - one line naming the graph and target
        first = _one_line(e)
        if target.unit == "gpu" and "cuda" in str(e).lower():
            raise BackendUnavailable(f"CUDA code generation for {target.name} failed ({first}); it needs an "
                                     "apache-tvm built with CUDA (tvm.support.libinfo()['USE_CUDA'])") \
                from None
        raise BackendUnavailable(f"TVM could not compile {job.rel} for {target.name}: {first}") from None
    kinds = _module_kinds(ex.mod)
    if target.unit == "gpu" and "cuda" not in kinds:
        raise BackendUnavailable(f"TVM generated no CUDA module for {job.rel} on {target.name} (modules: "
                                 f"{', '.join(kinds)}); this TVM build lacks CUDA code generation")
    stem = PurePosixPath(job.rel).stem
    so = out_dir / f"{stem}.so"
    ex.export_library(str(so), fcompile=fcompile_for(target))
    elf = elf_summary(so.read_bytes())
    param_names = list(job.params)
    graph_inputs = [i.name for i in model.graph.input if i.name not in job.params]
    return {"format": ENGINE_FORMAT, "graph": job.rel, "graph_sha256": sha256_bytes(job.data),
            "entry": "main", "inputs": graph_inputs,
            "params": [{"name": n, "shape": list(job.params[n][0]), "dtype": np.dtype(job.params[n][1]).name}
                       for n in param_names if n in {i.name for i in model.graph.input}],
            "batch": batch, "target": target.target, "target_name": target.name, "unit": target.unit,
            "target_source": target.source, "linker": target.linker,
            "linker_version": _zig_version() if target.linker.startswith(ZIG) else None, "modules": kinds,
            "cuda_device_code": _cuda_device_code(ex.mod), "elf": elf,
            "cuda_check": cuda_ahead_check(ex.mod, target, job.rel) if target.unit == "gpu" and cuda_check
            else None,
            "used_by": job.used_by, "kernels": applied, "kernel_functions": functions,
            "transform_params": transform,
            "compile_s": round(time.perf_counter() - t0, 2), "tuning": tuned}


def _lift_param_transforms(mod, model, job: GraphJob) -> tuple[Any, str | None]:
    """`mod` with the ops that read only weights (the runtime's parameters: a kernel's re-layout, stacked
    star weights, unpacked level codes) moved out of `main` into `main_transform_params`, which the engine
    runs once at load (`runtime.backends.tvm`); returns that function's name, or None when `main` has no
    such op. `main`'s parameters are the graph inputs first, then the weights (`prepare_onnx`)."""
    from tvm import relax

    n_inputs = sum(1 for i in model.graph.input if i.name not in job.params)
    main = mod["main"]
    if len(main.params) <= n_inputs:
        return mod, None
    mod["main"] = main.with_attr("num_input", n_inputs)       # `mod` is this compile's own module
    lifted = relax.transform.LiftTransformParams()(mod)
    names = [g.name_hint for g in lifted.get_global_vars()]
    if "main_transform_params" not in names or _is_identity(lifted["main_transform_params"]):
        mod["main"] = main
        return mod, None
    return lifted, "main_transform_params"


def _is_identity(fn) -> bool:
    """True when a lifted transform returns its parameters unchanged (nothing was worth lifting)."""
    from tvm import relax

    body = fn.body
    blocks = getattr(body, "blocks", [])
    return all(isinstance(b.value, relax.TupleGetItem) or isinstance(b.value, relax.Tuple)
               for blk in blocks for b in blk.bindings)


def _one_line(e: Exception) -> str:
    """TVM's multi-line errors as one line: the first line, and the last (the offending op) if different."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return lines[0][:200] + (f" ({lines[-1][:80]})" if len(lines) > 1 else "")


def _cuda_device_code(mod) -> str | None:
    """What form the CUDA kernels take in a compiled module: "ptx" / "cubin" / "fatbin" if compiled ahead of
    time, "source" if only CUDA C is embedded (this TVM wheel: the runtime compiles it when the library is
    loaded, with NVRTC from `cuda-bindings`, or nvcc if TVM_CUDA_COMPILE_MODE=nvcc)."""
    if str(mod.kind) == "cuda":
        for fmt in ("fatbin", "cubin", "ptx"):
            try:
                if mod.inspect_source(fmt):
                    return fmt
            except Exception:  # noqa: BLE001 - a format this module cannot show
                continue
        return "source"
    return next((f for f in map(_cuda_device_code, mod.imports) if f), None)


def _cuda_source(mod) -> str | None:
    """The CUDA C a compiled module embeds (this TVM wheel's GPU engines carry source), or None."""
    if str(mod.kind) == "cuda":
        try:
            return str(mod.inspect_source("")) or None
        except Exception:  # noqa: BLE001 - a module that cannot show its source
            return None
    return next((src for src in map(_cuda_source, mod.imports) if src), None)


def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH, else the newest /usr/local/cuda*/bin."""
    found = shutil.which("nvcc")
    if found:
        return found
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    roots += sorted((str(p) for p in Path("/usr/local").glob("cuda*")), reverse=True)
    return next((str(Path(r) / "bin" / "nvcc") for r in roots if r and (Path(r) / "bin" / "nvcc").is_file()),
                None)


def cuda_ahead_check(mod, target: CompileTarget, graph: str) -> dict[str, Any]:
    """Compile the engine's CUDA C to machine code for the target's GPU with nvcc, here, so a GPU engine
    that would not build on the device fails at `edgeflex compile` and not at load on the board. The
    machine code is not kept (the engine still carries source, compiled on the GPU at load); what is kept
    is what ptxas said: kernels, registers, spills. Without nvcc: `{"skipped": why}`."""
    src = _cuda_source(mod)
    arch = str(target.target.get("arch", ""))
    nvcc = find_nvcc()
    if src is None or not arch.startswith("sm_") or nvcc is None:
        why = ("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda*)" if nvcc is None else
               f"no CUDA source or arch ({arch or 'none'})")
        return {"skipped": why}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeflex-nvcc-") as tmp:
        cu, cubin = Path(tmp) / "engine.cu", Path(tmp) / "engine.cubin"
        cu.write_text(src)
        r = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                            "-Xptxas", "-v", "-o", str(cubin), str(cu)],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            err = next((ln.strip() for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:200])
            raise BackendUnavailable(f"the CUDA C TVM generated for {graph} does not compile for {arch} "
                                     f"({Path(nvcc).name}: {err[:200]}); the engine would fail on the GPU")
        size = cubin.stat().st_size
    log = r.stderr
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
    version = re.search(r"release ([\d.]+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                             text=True).stdout)
    return {"compiler": f"nvcc {version.group(1) if version else '?'}", "arch": arch,
            "kernels": len(re.findall(r"Compiling entry function", log)),
            "max_registers": max(regs, default=0), "spill_store_bytes": sum(spills), "cubin_bytes": size,
            "seconds": round(time.perf_counter() - t0, 1)}


def _module_kinds(mod) -> list[str]:
    """The kinds of a compiled module and everything it imports (host code, CUDA device code, ...)."""
    kinds = [str(mod.kind)]
    for sub in mod.imports:
        kinds += [k for k in _module_kinds(sub) if k not in kinds]
    return kinds


def elf_summary(data: bytes) -> dict[str, Any]:
    """Architecture and defined dynamic symbols of an ELF64 little-endian shared object (no tools needed)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {"machine": "not ELF64-LE"}
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    symbols = []
    for sh in sections:
        if sh[1] != 11:                                 # SHT_DYNSYM
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], sh[9] or 24):
            name_off, _info, _other, shndx = struct.unpack_from("<IBBH", data, off)
            if shndx == 0 or name_off == 0:
                continue                                # undefined (imported) or unnamed
            end = data.index(b"\0", strtab[4] + name_off)
            symbols.append(data[strtab[4] + name_off:end].decode())
    return {"e_machine": e_machine, "machine": ELF_MACHINES.get(e_machine, str(e_machine)),
            "shared_object": e_type == 3, "symbols": sorted(s for s in symbols if s.startswith("__tvm_ffi"))}


# --- a whole bundle ---------------------------------------------------------------------------------------

def int8_build_target(tgt: Any) -> Any:
    """The target an int8 engine (edgeflex's int8 kernels applied) is built for: on x86 with AVX-512, LLVM
    told not to prefer 256-bit vectors (`-prefer-256-bit`, which LLVM sets for recent Xeons): the kernels'
    float32 epilogues (requantize, QDQ, residual add) are written 16 lanes wide and were split into two
    256-bit halves; one 512-bit instruction each made StarNet-S1 int8 ~5 % faster here (benchmarks/
    RESULTS.md, int8 depthwise). Other targets unchanged."""
    import tvm
    from tvm.target import codegen

    if tgt.kind.name != "llvm" or not str(tgt.attrs.get("mtriple", "") or "x86_64").startswith("x86_64"):
        return tgt
    try:
        feats = {str(f) for f in codegen.llvm_get_cpu_features(tgt)}
    except Exception:  # noqa: BLE001 - an LLVM that cannot list features: leave the target as it is
        return tgt
    mattr = [str(a) for a in (tgt.attrs.get("mattr", []) or [])]
    if "avx512f" not in feats or any("prefer-256-bit" in a for a in mattr):
        return tgt
    cfg = {k: v for k, v in tgt.export().items() if not k.startswith("feature.") and k != "tag"}
    cfg["mattr"] = [*mattr, "-prefer-256-bit"]
    return tvm.target.Target(cfg)


def compile_bundle(path: str | os.PathLike, target: str = HOST, *, trials: int = 0, batch: int | None = None,
                   configs: Sequence[str] | None = None, fused: bool = False, dress_kernel: str | None = None,
                   threads: int | None = None, kernels: bool = True, cuda_check: bool = True,
                   batch1: bool = True, boards: Boards | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Compile every graph `Runtime(path, fused=, dress_kernel=, only=configs)` loads for `target` and add the
    libraries (+ one JSON each, + tuning records) to the bundle atomically. Returns what was compiled.

    `trials > 0` tunes with MetaSchedule on this machine (host target only). Tuning records already in the
    bundle for this target are always applied, and further tuning starts from them (measures only new
    candidates). Tuned libraries have a static `batch` (default 1); otherwise `batch=None` keeps the batch
    dimension dynamic (one library for every batch size), and on a CPU target `batch1` adds a second library
    specialised to batch 1 beside it (`<stem>.b1.so`), which the engine runs for batch-1 calls: no shape
    function, fewer VM steps (faster per call on small inputs: benchmarks/RESULTS.md, Elastic models), for
    twice the compile time and library bytes."""
    check_path("path", path)
    check_str("target", target)
    check_int("trials", trials, 0)
    check_int("batch", batch, 1, none=True)
    if configs is not None:
        check_names("configs", configs)
    if dress_kernel is not None:
        check_choice("dress_kernel", dress_kernel, ("dense", "sparse"))
    # the target's num-cores: any count >= 1 (a board's cores, not this machine's); 0 or less wrote an
    # engine record that made backend="auto" fall back to ONNX Runtime without a word
    check_int("threads", threads, 1, none=True)
    for flag, value in (("fused", fused), ("kernels", kernels), ("cuda_check", cuda_check),
                        ("batch1", batch1)):
        check_bool(flag, value)
    if progress is not None and not callable(progress):
        fail("progress", progress, "None or a callable (graph, done, total)")
    import tvm

    from edgeflex.version import __version__

    bundle = Bundle.open(path)
    tgt = resolve_target(target, threads=threads)
    if boards is not None and not isinstance(boards, Boards):
        fail("boards", boards, "None or a compile.tvm.Boards (tracker host, port, key)")
    if trials and tgt.name != HOST and boards is None:
        raise UsageError(f"tuning measures on this machine: --trials needs --target host, got {tgt.name!r}; "
                         "or tune on the boards: --rpc HOST:PORT --key KEY")
    folder = target_dir(tgt.name)
    have_records = any(r.startswith(f"{folder}/tuning/") for r in bundle.manifest["files"])
    # records in the bundle are always reused
    tune = (tgt.name == HOST or boards is not None) and (trials > 0 or have_records)
    if tune and batch is None:
        batch = 1
    both = dress_kernel is None and _dress_kernels(bundle) == ("dense", "sparse")
    if both:            # both DRESS kernels: which one each level runs is measured on TVM below
        jobs = _union(collect_graphs(bundle, configs=configs, fused=fused, dress_kernel=k)
                      for k in ("dense", "sparse"))
    else:
        jobs = collect_graphs(bundle, configs=configs, fused=fused, dress_kernel=dress_kernel)
    files: dict[str, bytes] = {}
    records = []
    stamp = {"created_by": creator(), "host": host_cpu(),
             "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
             "versions": {"tvm": tvm.__version__, "edgeflex": __version__}}
    with tempfile.TemporaryDirectory(prefix="edgeflex-tvm-compile-") as tmp:
        for i, job in enumerate(jobs):
            stem = PurePosixPath(job.rel).stem
            tuning_dir = None
            if tune:
                tuning_dir = Path(tmp) / "tuning" / stem
                tuning_dir.mkdir(parents=True)
                for rel in bundle.manifest["files"]:
                    if rel.startswith(f"{folder}/tuning/{stem}/"):
                        (tuning_dir / PurePosixPath(rel).name).write_bytes(bundle.read(rel))

            def step(done: int, total: int, stem: str = stem) -> None:
                if progress is not None:
                    progress(stem, done, total)

            log.info("compiling %s (%d/%d) for %s", job.rel, i + 1, len(jobs), tgt.name)
            rec = compile_graph(job, tgt, Path(tmp), batch=batch, trials=trials if tune else 0,
                                tuning_dir=tuning_dir, kernels=kernels, cuda_check=cuda_check,
                                progress=step if tune else None, boards=boards)
            rec["library"] = f"{folder}/{stem}.so"
            rec.update(stamp)
            files[rec["library"]] = (Path(tmp) / f"{stem}.so").read_bytes()
            if batch1 and batch is None and tgt.unit == "cpu":
                one_dir = Path(tmp) / "batch1"
                one_dir.mkdir(exist_ok=True)
                one = compile_graph(job, tgt, one_dir, batch=1, kernels=kernels, cuda_check=False)
                one["library"] = f"{folder}/{stem}.b1.so"
                files[one["library"]] = (one_dir / f"{stem}.so").read_bytes()
                rec["batch1"] = {k: one[k] for k in ("library", "entry", "params", "transform_params", "elf",
                                                     "kernels", "compile_s")}
            if tuning_dir is not None:
                for p in sorted(tuning_dir.glob("*.json")):
                    files[f"{folder}/tuning/{stem}/{p.name}"] = p.read_bytes()
                rec["tuning"]["records"] = [f"{folder}/tuning/{stem}/{n}" for n in rec["tuning"]["records"]]
            files[f"{folder}/{stem}.json"] = (json.dumps(rec, indent=1) + "\n").encode()
            records.append(rec)
            if progress is not None and not tune:
                progress(stem, i + 1, len(jobs))
    choice_file = f"{folder}/{DRESS_CHOICE}"
    bundle.close()          # let the updates below retire the version compiled from
    model = model_id(bundle.manifest)
    if both and tgt.name == HOST:
        update_bundle(bundle.path, files, model=model)
        try:
            choice = measure_dress_kernels(bundle.path, threads=threads, configs=configs,
                                           batch=batch or 1)
        except EdgeflexError as e:          # the libraries are in; the levels keep the exporter's pick
            log.warning("could not time the DRESS kernels on TVM (%s); every level runs the kernel the "
                        "exporter chose on ONNX Runtime", e)
            choice = {"stale": True, "levels": {}, "error": str(e)}
        files = {choice_file: (json.dumps(choice, indent=1) + "\n").encode()}
    elif choice_file in bundle.manifest["files"]:
        # the libraries change: an earlier measurement no longer describes them
        files[choice_file] = (json.dumps({"stale": True, "levels": {}}) + "\n").encode()
    update_bundle(bundle.path, files, model=model)
    backends = None
    if tgt.name == HOST:
        try:
            backends = measure_backends(bundle.path, threads=threads, configs=configs,
                                        dress_kernel=dress_kernel, batch=batch or 1)
        except EdgeflexError as e:         # the libraries are in; backend="auto" keeps to ONNX Runtime
            log.warning("could not time TVM against ONNX Runtime (%s); backend='auto' runs ONNX Runtime", e)
            backends = {"stale": True, "faster": None, "error": str(e)}
        update_bundle(bundle.path, {f"{folder}/{BACKEND_CHOICE}": (json.dumps(backends, indent=1) + "\n")
                                    .encode()}, model=model)
    return {"bundle": str(bundle.path), "target": tgt.name, "target_dict": tgt.target, "source": tgt.source,
            "engines": records, "dress_kernels": json.loads(files[choice_file]) if choice_file in files
            else None, "backends": backends}


def measure_backends(path: str | os.PathLike, *, threads: int | None = None,
                     configs: Sequence[str] | None = None, dress_kernel: str | None = None,
                     runs: int = 60, batch: int = 1) -> dict[str, Any]:
    """Every config's latency (lower quartile) on the TVM engines just compiled and on ONNX Runtime
    (interleaved, this host, the same threads and DRESS option, each fused or chained as its Runtime would by
    default), and the faster backend by the geometric mean of the per-config ratios: what
    `Runtime(backend="auto")` runs."""
    from edgeflex.runtime import Runtime

    only = _native_configs(path, configs)
    # each as `Runtime(backend=...)` runs by default (fused="auto": ORT may fuse what TVM chains)
    opts = {"threads": threads, "only": only, "dress_kernel": dress_kernel}
    rts = {"onnxruntime": Runtime(path, **opts), "tvm": Runtime(path, backend="tvm", **opts)}
    times = _time_interleaved(rts, only, batch, runs)
    per = {}
    for name, t in times.items():
        # NOTE: the lower quartile, not the median: another process's load slows ORT's spinning thread
        # pool more than TVM's (by medians StarNet-S1 read as a TVM win under load and an ORT win idle)
        per[name] = {k: round(float(np.percentile(v, 25)) * 1e6, 2) for k, v in t.items()}
    ratio = float(np.exp(np.mean([np.log(v["onnxruntime"] / v["tvm"]) for v in per.values()])))
    return {"stale": False, "faster": "tvm" if ratio > 1 else "onnxruntime", "ratio": round(ratio, 3),
            "threads": rts["tvm"].threads, "host": host_cpu(), "runs": runs, "batch": batch,
            "fused": {k: rt.fused for k, rt in rts.items()}, "p25_us": per}


def _native_configs(path: str | os.PathLike, configs: Sequence[str] | None) -> list[str]:
    """The configs (of `configs`, default all) that both TVM and ONNX Runtime run natively on this host:
    what the compile-time measurements time (an int8 QDQ config is refused on TVM, not timed)."""
    from edgeflex.devices.precision import device_precisions
    from edgeflex.runtime.backends import get_backend

    backends, have = [get_backend(n) for n in ("onnxruntime", "tvm")], device_precisions(HOST)
    with Bundle.open(path) as b:
        names = [c.name for c in b.configs if (not configs or c.name in configs) and c.precision in have
                 and all(be.precision_refusal(c.precision) is None for be in backends)]
    if not names:
        raise BackendUnavailable("no compiled config runs natively on both TVM and ONNX Runtime here")
    return names


def _time_interleaved(rts: dict[str, Any], configs: Sequence[str], batch: int, runs: int,
                      block: int = 10) -> dict[str, dict[str, list[float]]]:
    """Per config, each runtime's `runs` call times (s) on one random batch, the runtimes taking turns in
    blocks of `block` calls after 5 warm-up calls each, so a slow spell of the machine falls on all of them
    alike. Each block starts with one untimed call: the other runtime's thread pool is still spinning on
    the cores (ORT's for up to 100 us after its call), and taking turns call by call had TVM pay for that on
    every call (SN-Net at 32x32 read far slower on TVM that way than in blocks)."""
    spec = next(iter(rts.values())).inputs[0]
    x = np.random.default_rng(0).standard_normal([batch, *spec.shape[1:]]).astype(spec.dtype)
    out = {}
    for name in configs:
        calls = {k: (lambda rt=rt, name=name: rt.switch(name), lambda rt=rt: rt.run(x))
                 for k, rt in rts.items()}
        ms = interleaved(calls, rounds=-(-runs // block), runs_per_round=block, warmup=5, lead=1)
        out[name] = {k: list(t[:runs] / 1e3) for k, t in ms.items()}
    return out


def _dress_kernels(bundle: Bundle) -> tuple[str, ...]:
    """The DRESS kernels a bundle has graphs for (empty for other bundles)."""
    if "dress" not in bundle.manifest:
        return ()
    return ("dense", "sparse") if "main.sparse" in bundle.segments else ("dense",)


def _union(job_lists) -> list[GraphJob]:
    jobs: dict[str, GraphJob] = {}
    for job_list in job_lists:
        for job in job_list:
            if job.rel in jobs:
                jobs[job.rel].used_by.extend(n for n in job.used_by if n not in jobs[job.rel].used_by)
            else:
                jobs[job.rel] = job
    return list(jobs.values())


def measure_dress_kernels(path: str | os.PathLike, *, threads: int | None = None,
                          configs: Sequence[str] | None = None, runs: int = 100,
                          batch: int = 1) -> dict[str, Any]:
    """Per DRESS level, the TVM engine's batch-1 median latency with the masked dense graph and with the
    row-sparse one (interleaved, on this host), and the faster: what `Runtime(backend="tvm")` runs by
    default (the exporter's choice was measured on ONNX Runtime, whose gather-based sparse graph loses at
    every level while edgeflex's TIR row-sparse kernel wins at the sparse ones)."""
    from edgeflex.runtime import Runtime

    only = _native_configs(path, configs)
    rts = {k: Runtime(path, backend="tvm", threads=threads, dress_kernel=k, only=only)
           for k in ("dense", "sparse")}
    levels = {}
    for name, t in _time_interleaved(rts, rts["dense"].loaded, batch, runs).items():
        us = {k: round(float(np.median(v)) * 1e6, 2) for k, v in t.items()}
        levels[name] = {"kernel": min(us, key=us.get), "median_us": us}
    return {"stale": False, "threads": rts["dense"].threads, "host": host_cpu(), "runs": runs,
            "batch": batch, "levels": levels}
