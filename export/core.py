"""`export(model, example_inputs, path)`: PyTorch module -> validated ONNX graph(s) -> bundle on disk.

`export` asks the family registry which exporter writes the model (elastic families have their own, in
`elastic.py` / `fits_elastic.py`); `export_plain`, the one-config exporter, tries FITS's lowering first,
else torch.onnx's capture strategies in order, keeping every failure so the final error explains what was
tried. Nothing is written unless the graph matches PyTorch within tolerance.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import io
import logging
import os
import platform
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edgeflex.devices import usable_cores
from edgeflex.errors import ExportError
from edgeflex.runtime.bundle import Bundle, Config, TensorSpec, write_bundle
from edgeflex.runtime.store import target as store_target

from . import analysis, engines, fits
from . import complex as complex_lowering
from .costs import config_costs
from .validate import ModelFailure, flat_message, validate

log = logging.getLogger(__name__)

GRAPH = "graphs/main.onnx"
SPECTRAL_STRATEGY = "edgeflex FITS lowering: the spectral pattern recognised in the graph (kernels.spectral)"


def default_threads() -> int:
    return usable_cores()


def _capture_dynamo(model, example, in_names, out_names) -> bytes:
    # torch.onnx logs a warning per torchvision op it cannot register; torchvision is not used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    dyn = tuple({0: torch.export.Dim("batch")} for _ in example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=dyn, input_names=in_names,
                                 output_names=out_names, verbose=False)
    return prog.model_proto.SerializeToString()


def _capture_torchscript(model, example, in_names, out_names) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, buf, dynamo=False, input_names=in_names, output_names=out_names,
                          dynamic_axes={n: {0: "batch"} for n in in_names + out_names}, opset_version=17)
    return buf.getvalue()


STRATEGIES = (("torch.onnx dynamo", _capture_dynamo), ("torch.onnx torchscript", _capture_torchscript))
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def capture(model: torch.nn.Module, example: tuple[torch.Tensor, ...], in_names: list[str],
            out_names: list[str]) -> bytes:
    """ONNX bytes of `model` (batch dimension dynamic) from the first torch.onnx strategy that works."""
    return capture_with_strategy(model, example, in_names, out_names)[0]


def fixed_batch(graph: bytes) -> str | None:
    """Where a captured graph fixed the batch dimension it was asked to keep dynamic ("input 'x' has its
    batch dimension fixed at 1"), or None. torch.export specialises a dimension whose example size is 1
    (its 0/1 rule) and the dynamo exporter then writes a graph that runs at that batch only: a transformer
    or GRU exported from a batch-1 example did, while the torchscript exporter kept the batch dynamic."""
    for vi in onnx.load_from_string(graph).graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return f"input {vi.name!r} has its batch dimension fixed at {dims[0].dim_value}"
    return None


def capture_with_strategy(model, example, in_names, out_names,
                          check: Callable[[bytes], Any] | None = None,
                          only: str | None = None) -> tuple[bytes, str, Any]:
    """(graph, strategy, check's result) from the first torch.onnx strategy whose graph keeps the batch
    dynamic and passes `check` (validation: an ExportError there tries the next strategy); one error
    naming every strategy's failure where none does. `only`: that strategy alone (its label)."""
    failures = []
    for label, fn in STRATEGIES:
        if only is not None and label != only:
            continue
        try:
            graph = fn(model, example, in_names, out_names)
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            first = _ANSI.sub("", str(e)).strip().splitlines()[0][:200] if str(e).strip() else ""
            failures.append(f"{label}: {type(e).__name__}: {first}")
            log.info("capture strategy %s failed: %s", label, e)
            continue
        why = fixed_batch(graph)
        if why is not None:
            failures.append(f"{label}: {why} (the batch must stay dynamic)")
            log.info("capture strategy %s: %s", label, why)
            continue
        try:
            return graph, label, check(graph) if check is not None else None
        except ModelFailure:
            raise
        except ExportError as e:
            failures.append(f"{label}: {str(e).removesuffix('; nothing was written')}")
            log.info("capture strategy %s does not validate: %s", label, e)
    what = "capture" if check is None else "export"     # with a check, a strategy may capture and not pass
    raise ExportError(f"could not {what} {type(model).__name__} to ONNX; tried " + " | ".join(failures)
                      + ("; nothing was written" if check is not None else ""))


def _specs(values, names: list[str]) -> list[TensorSpec]:
    dtypes = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32"}
    specs = []
    for v, n in zip(values, names):
        if v.dtype not in dtypes:
            raise ExportError(f"tensor {n!r} has dtype {v.dtype}; supported: {', '.join(map(str, dtypes))}")
        specs.append(TensorSpec(n, (None, *v.shape[1:]), dtypes[v.dtype]))
    return specs


def tool_versions() -> dict[str, str]:
    import onnxruntime

    from edgeflex.version import __version__
    return {"edgeflex": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


N_RANDOM = 4


def export(model: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, *, name: str | None = None,
           quality: dict | list | None = None, tolerance: float = 1e-4, n_random: int = N_RANDOM,
           threads: int | None = None, overwrite: bool = False, metadata: dict | None = None,
           engine: str | None = None) -> Bundle:
    """Export `model` into a validated bundle at `path` (a directory ending in .efx) and return it opened.

    The family registry (`edgeflex.models.place`) picks the exporter: a model of an elastic family
    (DressModel, SNNet, ElasticFITS) goes to that family's exporter (one config per level / stitch point /
    cut frequency; `quality` then per config, as that exporter takes it); FITS keeps its lowering; any other
    module is one config captured by torch.onnx; an elastic-looking model no family places is refused.
    `example_inputs`: a tensor or a tuple of tensors, batch first (the batch becomes dynamic).
    `quality`: the held-out metric, e.g. {"metric": "top1", "value": 0.98, "direction": "higher"}.
    `engine`: None (ONNX Runtime and TVM) or "tensorrt": the forms TensorRT's ONNX parser takes, every graph
    checked against its operator matrix, ExportError naming the nodes it would reject (`export.engines`);
    recorded in the manifest ("export": "engine", "tensorrt_check").
    Raises ExportError if no capture strategy works or the graph differs from PyTorch by > `tolerance`
    (relative to the output's scale); then nothing is written.
    """
    from edgeflex.models.registry import place

    store_target(path, overwrite=overwrite, new=True)     # refuse before any work
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"export expects a torch.nn.Module, got {type(model).__name__}")
    family = place(model)
    fn = family.export_fn()
    kw = {"name": name, "quality": quality, "tolerance": tolerance, "threads": threads,
          "overwrite": overwrite, "metadata": metadata}
    params = inspect.signature(fn).parameters
    if "n_random" in params:
        kw["n_random"] = n_random
    elif n_random != N_RANDOM:
        raise ExportError(f"n_random={n_random}: the {family.name} exporter validates every config on its "
                          "own inputs; leave n_random out")
    if "engine" in params:
        kw["engine"] = engines.check_engine(engine)
    elif engine is not None:
        raise ExportError(f"engine={engine!r}: the {family.name} exporter writes one form for every engine; "
                          "leave engine out")
    if family.elastic:
        example = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if len(example) != 1 or not isinstance(example[0], torch.Tensor):
            raise ExportError(f"the {family.name} exporter takes one example tensor (batch first), got "
                              f"{len(example)} inputs")
        example_inputs = example[0]
    # the exporters put the model in eval mode (dropout off, BatchNorm on its running statistics); the
    # user's model goes back to the modes its modules had, so exporting mid-training changes nothing of it
    modes = [(m, m.training) for m in model.modules()]
    try:
        return fn(model, example_inputs, path, **kw)
    finally:
        for m, training in modes:
            m.training = training


def export_plain(model: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                 name: str | None = None, quality: dict | None = None, tolerance: float = 1e-4,
                 n_random: int = N_RANDOM, threads: int | None = None, overwrite: bool = False,
                 metadata: dict | None = None, engine: str | None = None) -> Bundle:
    """The one-config exporter (FITS, StarNet, DLinear, generic), validated, then written; `ef.export` calls
    it for every non-elastic family. A model with complex tensors is first lowered to a real graph
    (`complex.py`). If the graph is the FITS spectral pattern (`spectral_match`, whoever wrote the model)
    the fastest spectral form of `kernels.spectral` is exported; else torch.onnx's capture strategies run
    in order (on the lowered graph where there is one). Every tensor of a (nested) tuple / list / dict
    output is an output of the bundle (`output_names`); outputs that are not tensors are left out, noted
    in the manifest and warned about. `engine`: as `export` takes it."""
    engine = engines.check_engine(engine)
    store_target(path, overwrite=overwrite, new=True)     # refuse before any work
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"export expects a torch.nn.Module, got {type(model).__name__}")
    example = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not example or not all(isinstance(t, torch.Tensor) for t in example):
        raise ExportError("example_inputs must be a tensor or a non-empty tuple of tensors (batch first)")
    model = model.eval()
    threads = threads or default_threads()
    try:
        with torch.no_grad():
            out = model(*example)
    except Exception as e:  # noqa: BLE001 - the model's own error, as one line
        raise ExportError(f"{type(model).__name__} fails in PyTorch on the example input(s) "
                          f"{[tuple(t.shape) for t in example]}: {type(e).__name__}: "
                          f"{flat_message(e)}; nothing was written") from None
    in_names = ["x"] if len(example) == 1 else [f"x{i}" for i in range(len(example))]
    kept, dropped = flatten_outputs(out)
    if not kept:
        raise ExportError(f"{type(model).__name__} returns no tensor ({type(out).__name__}); a bundle "
                          "needs at least one tensor output")
    out_names = output_names([path for path, _ in kept], in_names)
    outs = tuple(t for _, t in kept)
    extra: dict[str, Any] = {}
    if dropped:
        extra["dropped_outputs"] = dropped
        warnings.warn(dropped_line(type(model).__name__, dropped), DroppedOutputWarning, stacklevel=2)
    user_model = model
    if not isinstance(out, torch.Tensor):
        model = FlatOutputs(model, [path for path, _ in kept]).eval()   # the graph yields the kept tensors
    family = getattr(user_model, "family", "generic")
    lowered = None
    if complex_lowering.uses_complex(model, example):
        lowered = complex_lowering.lower_complex(model, example)
    graph, check, rejected = None, None, None
    found, why = fits.recognise(model, example, graph=lowered)
    if found is not None:
        graph, extra["kernels"] = fits.lower(found, input_name=in_names[0], output_names=out_names,
                                             threads=threads, engine=engine)
        strategy = SPECTRAL_STRATEGY
        try:
            check = validate(model, graph, example, tolerance=tolerance, n_random=n_random, threads=threads,
                             output_names=out_names)
        except ExportError as e:             # the general graph may still pass; if not, this is the error
            log.warning("the spectral form of %s does not validate (%s); trying the general graph",
                        type(user_model).__name__, e)
            rejected, graph = e, None
            del extra["kernels"]
            extra["spectral"] = {"recognised": True, "rejected": str(e)}
    else:
        log.info("%s is not the FITS spectral pattern: %s", type(user_model).__name__, why)
    if graph is None:
        try:
            def checked(g: bytes):
                return validate(model, g, example, tolerance=tolerance, n_random=n_random, threads=threads,
                                output_names=out_names)

            if lowered is not None:
                graph, how, check = capture_with_strategy(lowered, complex_lowering.traceable(example),
                                                          in_names, out_names, checked)
                strategy = f"edgeflex complex lowering (export.complex) + {how}"
                extra["complex_lowering"] = lowered.meta["complex_lowering"]
            else:
                graph, strategy, check = capture_with_strategy(model, example, in_names, out_names, checked)
        except ExportError:
            if rejected is not None:
                raise rejected from None
            raise
    extra.update(engines.engine_record(engine, {GRAPH: graph}))
    proto = onnx.load_from_string(graph)
    config = Config("default", GRAPH, quality, analysis.flops(proto), analysis.param_bytes(proto),
                    costs=config_costs([proto]))
    manifest = manifest_base(user_model, example, in_names, outs, out_names,
                             name or Path(path).name.removesuffix(".efx"))
    manifest.update({
        "family": family,
        "configs": [config.to_json()],
        "export": {"strategy": strategy, "validation": check.to_json(),
                   "opset": proto.opset_import[0].version, **extra},
        "metadata": metadata or {},
    })
    return write_bundle(path, manifest, {GRAPH: graph}, overwrite=overwrite)


class DroppedOutputWarning(UserWarning):
    """A model output that is not a tensor (a number, None, a string) was left out of the bundle."""


class FlatOutputs(torch.nn.Module):
    """`model` with its output structure flattened to the tuple of the tensors at `paths` (see
    `flatten_outputs`): what is captured, so the graph computes the kept outputs and nothing else."""

    def __init__(self, model: torch.nn.Module, paths: list[tuple]):
        super().__init__()
        self.model, self.paths = model, paths

    def forward(self, *xs):
        out = self.model(*xs)
        flat = []
        for path in self.paths:
            v = out
            for key in path:
                v = v[key]
            flat.append(v)
        return tuple(flat)


def flatten_outputs(out: Any, path: tuple = ()) -> tuple[list[tuple[tuple, torch.Tensor]], list[dict]]:
    """The tensors of a (nested) tuple / list / dict output, each with its path of indices and keys, in
    order; and a note for each leaf that is not a tensor (left out of the bundle)."""
    if isinstance(out, torch.Tensor):
        return [(path, out)], []
    kept: list[tuple[tuple, torch.Tensor]] = []
    dropped: list[dict] = []
    items = out.items() if isinstance(out, dict) else \
        enumerate(out) if isinstance(out, (tuple, list)) else None
    if items is None:
        note: dict[str, Any] = {"output": _path_str(path), "type": type(out).__name__}
        if len(path) == 1 and isinstance(path[0], int):
            note["index"] = path[0]
        if out is None or isinstance(out, (bool, int, float)) or (isinstance(out, str) and len(out) <= 80):
            note["value"] = out if not isinstance(out, float) or np.isfinite(out) else repr(out)
        return [], [note]
    for key, v in items:
        k, d = flatten_outputs(v, (*path, key))
        kept += k
        dropped += d
    return kept, dropped


def _path_str(path: tuple) -> str:
    return "out" + "".join(f"[{k!r}]" for k in path)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def output_names(paths: list[tuple], in_names: list[str]) -> list[str]:
    """The bundle's output names: a dict output's keys (joined by '_' when nested) where every one is a
    valid name and they are all distinct; else y (one output) or y0, y1, ..."""
    names = ["_".join(p) if p and all(isinstance(k, str) and _NAME.fullmatch(k) for k in p) else None
             for p in paths]
    if all(names) and len(set(names)) == len(names) and not set(names) & set(in_names):
        return names
    return ["y"] if len(paths) == 1 else [f"y{i}" for i in range(len(paths))]


def dropped_line(model_name: str, dropped: list[dict]) -> str:
    """One line saying which outputs of the model are not in the bundle, and why."""
    what = ", ".join(f"{d['output']} ({d['type']}" + (f" {d['value']!r})" if "value" in d else ")")
                     for d in dropped)
    return (f"{model_name} returns {len(dropped)} output(s) that are not tensors, left out of the bundle: "
            f"{what}")


def manifest_base(model: torch.nn.Module, example, in_names: list[str], outs, out_names: list[str],
                  name: str) -> dict[str, Any]:
    """The manifest entries every bundle has: name, family, model, inputs/outputs, creation, tools."""
    hyper = model.hyper() if hasattr(model, "hyper") else {}
    return {
        "name": name,
        "family": getattr(model, "family", "generic"),
        "model": {"class": type(model).__name__, "variant": getattr(model, "variant", None), "hyper": hyper,
                  "parameters": int(sum(p.numel() for p in model.parameters()))},
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "inputs": [s.to_json() for s in _specs(example, in_names)],
        "outputs": [s.to_json() for s in _specs(outs, out_names)],
        "tools": tool_versions(),
    }
