"""A bundle's plans: for each config, which graphs run in which order, with which specs and which weights.

Built once from the verified bundle, with no engine: `Runtime` loads an engine per distinct step (steps with
the same `key` share one), and `edgeflex compile` compiles exactly the graphs the steps name. Weights a
config derives at load (a DRESS level's masked copy or row-sparse form, an elastic FITS level's operands)
are derived here, from the stored tensors read once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np

from edgeflex.errors import BundleError, UsageError
from edgeflex.kernels.rowsparse import ell_tensors, masked, unpack_codes
from edgeflex.kernels.spectral import SpectralWeights, gemm_operands, nested

from .bundle import Bundle, Config, TensorSpec


@dataclass(frozen=True)
class Step:
    """One graph of a plan: the engine that runs it is shared by every step with the same `key`."""

    key: tuple
    graph: str                                   # the bundle file
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    initializers: dict[str, np.ndarray] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Plan:
    config: Config
    steps: tuple[Step, ...]
    extra: tuple[np.ndarray, ...] = ()           # constant inputs after the caller's (a DRESS sparse level)


def build_plans(bundle: Bundle, *, fused: bool, only: Collection[str] | None = None,
                dress_kernel: Callable[[str], str | None] | None = None) -> dict[str, Plan]:
    """Every config's plan (only those in `only`, when given). `fused`: run a segmented config's fused graph
    where it has one. `dress_kernel(config)` overrides the exporter's DRESS kernel for a level (None keeps
    it)."""
    b = bundle
    tensors = b.tensors() if b.tensor_index else {}

    def seg_specs(name: str, key: str, default: list[TensorSpec]) -> list[TensorSpec]:
        return [TensorSpec.from_json(d) for d in b.manifest["segments"][name].get(key, [])] or default

    def inits_of(tensor_map: dict[str, str]) -> dict[str, np.ndarray]:
        return {init: tensors[tid] for init, tid in tensor_map.items()}

    plans = {}
    for c in b.configs:
        if only is not None and c.name not in only:
            continue
        if c.graph is not None:
            plans[c.name] = Plan(c, (Step(("graph", c.graph), c.graph, b.inputs, b.outputs),))
        elif fused and "fused" in c.extra:
            f = c.extra["fused"]
            step = Step(("fused", c.name), f["graph"], b.inputs, b.outputs, inits_of(f["tensors"]))
            plans[c.name] = Plan(c, (step,))
        elif c.extra.get("dress") is not None:
            kernel = (dress_kernel(c.name) if dress_kernel else None) or c.extra["dress"]["kernel"]
            plans[c.name] = _dress_plan(b, c, kernel, tensors)
        elif "fits_level" in c.extra:
            plans[c.name] = _fits_plan(b, c, tensors)
        else:
            steps = []
            for i, name in enumerate(c.segments):
                seg = b.segments[name]
                ins = b.inputs if i == 0 else seg_specs(name, "inputs", [])
                steps.append(Step((name,), seg.graph, ins, seg_specs(name, "outputs", b.outputs),
                                  inits_of(seg.tensors)))
            plans[c.name] = Plan(c, tuple(steps))
    return plans


def _dress_plan(b: Bundle, c: Config, kernel: str, tensors: dict[str, np.ndarray]) -> Plan:
    """A DRESS level: the masked dense graph, or the row-sparse graph with the level as an input. Both are
    derived from the one stored dense weight and its packed level codes."""
    level = c.extra["dress"]["level"]
    weights = {}
    for init, d in b.manifest["dress"]["segments"]["main"].items():
        if d["weight"] not in tensors or d["codes"] not in tensors:
            raise BundleError(f"DRESS weight {init!r} names tensors missing from the bundle")
        w = tensors[d["weight"]]
        weights[init] = (w, unpack_codes(tensors[d["codes"]], w.shape))
    if kernel == "dense":
        seg = b.segments["main"]
        inits = {init: tensors[tid] for init, tid in seg.tensors.items()}
        inits.update({init: masked(w, codes, level) for init, (w, codes) in weights.items()})
        return Plan(c, (Step(("main", level), seg.graph, b.inputs, b.outputs, inits),))
    if kernel != "sparse" or "main.sparse" not in b.segments:
        raise UsageError(f"DRESS kernel {kernel!r} is not in bundle {b.name!r}; it has: dense"
                         + (", sparse" if "main.sparse" in b.segments else ""))
    seg = b.segments["main.sparse"]
    inits = {init: tensors[tid] for init, tid in seg.tensors.items()}
    for init in b.manifest["segments"]["main.sparse"]["derived_ell"]:
        inits.update(ell_tensors(init, *weights[init], len(b.manifest["dress"]["densities"])))
    step = Step(("main.sparse",), seg.graph, b.inputs, b.outputs, inits)
    return Plan(c, (step,), (np.array(level, np.int64),))


def _fits_plan(b: Bundle, c: Config, tensors: dict[str, np.ndarray]) -> Plan:
    """An elastic FITS level: its spectral graph, whose GEMM operands are derived from the top-left block of
    the one stored complex weight (`kernels.spectral.nested` + `gemm_operands`)."""
    fe, level = b.manifest["fits_elastic"], c.extra["fits_level"]
    if fe["weight"] not in tensors or fe["bias"] not in tensors:
        raise BundleError(f"elastic FITS bundle {b.name!r} names weight tensors missing from it")
    w, bias = tensors[fe["weight"]], tensors[fe["bias"]]
    full = SpectralWeights(fe["seq_len"], fe["pred_len"], w[0] + 1j * w[1], bias[0] + 1j * bias[1], fe["eps"])
    ops = gemm_operands(nested(full, level["cut_freq"]), level["form"])
    (name,) = c.segments
    seg = b.segments[name]
    inits = {init: tensors[tid] for init, tid in seg.tensors.items()}
    inits.update({init: op.astype(np.float32) for init, op in zip(level["derived"], ops)})
    return Plan(c, (Step((name,), seg.graph, b.inputs, b.outputs, inits),))
