"""A bundle's plans: for each config, which graphs run in which order, with which specs and which weights.

Built once from the verified bundle, with no engine: `Runtime` loads an engine per distinct step (steps with
the same `key` share one), and `edgeflex compile` compiles exactly the graphs the steps name. A config with
its own graph, a fused graph or a chain of segments is planned here; a config with a family kind (a DRESS
level, an elastic FITS cut level: `runtime.families`) by its kind's `plan`, which derives its weights from
the stored tensors read once. No family is named here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np

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
    """What a config runs: its steps in order, and `constants`, inputs given after the caller's (a DRESS
    row-sparse level's level)."""

    config: Config
    steps: tuple[Step, ...]
    constants: tuple[np.ndarray, ...] = ()


def build_plans(bundle: Bundle, *, fused: bool, only: Collection[str] | None = None,
                kernel: Callable[[str], str | None] | None = None) -> dict[str, Plan]:
    """Every config's plan (only those in `only`, when given). `fused`: run a segmented config's fused graph
    where it has one. `kernel(config)`: the kernel to run a config with where its family offers several
    (DRESS: "dense" or "sparse"); None keeps the exporter's choice."""
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
        elif fused and c.fused is not None:
            step = Step(("fused", c.name), c.fused.graph, b.inputs, b.outputs, inits_of(c.fused.tensors))
            plans[c.name] = Plan(c, (step,))
        elif c.kind is not None:
            plans[c.name] = c.kind.plan(b, c, tensors, kernel(c.name) if kernel else None)
        else:
            steps = []
            for i, name in enumerate(c.segments):
                seg = b.segments[name]
                ins = b.inputs if i == 0 else seg_specs(name, "inputs", [])
                steps.append(Step((name,), seg.graph, ins, seg_specs(name, "outputs", b.outputs),
                                  inits_of(seg.tensors)))
            plans[c.name] = Plan(c, tuple(steps))
    return plans
