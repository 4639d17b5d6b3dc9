"""Hand-written TVM (TIR) kernels for the model families edgeflex serves, and the Relax rewrites that put
them into a compiled graph in place of the ops they replace.

Each kernel module registers one rewrite with `register`. `edgeflex compile --backend tvm` calls `apply`
on every imported Relax module before tuning and building (`--no-kernels` skips it); the names of the
rewrites that changed the module are recorded in the engine's JSON (`kernels`).

A rewrite is `fn(mod, ctx) -> mod | None`: None (or the same module) when its pattern is not in `mod`.
`ctx` is a `RewriteContext`: the target, the graph's bundle path, and the parameters the runtime hands
the engine (name -> (shape, dtype)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Rewrite = Callable[[Any, "RewriteContext"], Any]

# Multiply-adds per call from which the per-op kernels (star, conv, dwconv) run on the thread pool: a launch
# costs about the time of this much work on one core (a 16-channel 8x8 depthwise plane set takes about half a
# launch; launch cost: benchmarks/RESULTS.md, FITS TIR kernel). The row-sparse kernels keep their own,
# measured for their gathers.
PARALLEL_MACS = 1 << 16
LANES = 16          # float32 lanes of one AVX-512 register, the vector the kernels are written for


@dataclass
class RewriteContext:
    """What a rewrite may need beyond the module: the TVM target (a `tvm.target.Target`), the graph's path
    in the bundle, the engine's parameters, and the static batch (None: dynamic)."""

    target: Any
    graph: str = ""
    params: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    batch: int | None = None


_REWRITES: dict[str, Rewrite] = {}


def register(name: str) -> Callable[[Rewrite], Rewrite]:
    """Decorator: register a rewrite under `name` (applied in registration order)."""

    def deco(fn: Rewrite) -> Rewrite:
        _REWRITES[name] = fn
        return fn

    return deco


# The order rewrites run in: whole-graph kernels first (FITS, the row-sparse graph, whose dynamic gathers
# the per-op rewrites' constant folding cannot legalize), then int8 (before any folding turns an int8
# weight's dequantize into a float32 constant), then the per-op ones.
ORDER = ("fits", "rowsparse", "qconv", "star", "conv", "dwconv", "dense")


def _load_all() -> None:
    """Import the kernel modules so their rewrites register (each is optional until it exists)."""
    import importlib

    for mod in ORDER:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise


def rewrites() -> dict[str, Rewrite]:
    """Every registered rewrite, by name, in `ORDER` (then any others in registration order): the order
    must not depend on which kernel module some caller happened to import first."""
    _load_all()
    rank = {n: i for i, n in enumerate(ORDER)}
    return dict(sorted(_REWRITES.items(), key=lambda kv: rank.get(kv[0], len(ORDER))))


def apply(mod: Any, ctx: RewriteContext, only: list[str] | None = None) -> tuple[Any, list[str]]:
    """Run every registered rewrite (or those named in `only`) over `mod`; returns the module and the names
    of the rewrites that changed it."""
    applied = []
    for name, fn in rewrites().items():
        if only is not None and name not in only:
            continue
        out = fn(mod, ctx)
        if out is not None and out is not mod:
            mod = out
            applied.append(name)
    return mod, applied
