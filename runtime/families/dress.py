"""DRESS on the board: a config's level fields (`DressLevel`, the config's "dress" object) and its plan.

Every level runs from the one stored dense weight and its packed 2-bit level codes (the manifest's "dress"
section): the masked dense graph with the level's masked copy, or the row-sparse graph with its ELL tensors
and the level as a constant input. NumPy only; the exporter is `export.elastic.export_dress`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from edgeflex.errors import BundleError, UsageError
from edgeflex.kernels.rowsparse import ell_tensors, masked, unpack_codes

from ..plan import Plan, Step
from . import ConfigKind

if TYPE_CHECKING:
    from ..bundle import Bundle, Config


@dataclass(frozen=True)
class DressLevel(ConfigKind):
    """A DRESS level: its index into the bundle's densities, the kernel the exporter measured fastest, and
    what it measured (`measured_ms_batch1` per kernel, at `threads`). `layers` (weight -> level, written by
    `edgeflex search`) runs each listed weight at its own level and the rest at `level`: the levels nest,
    so any mix derives from the same stored weight and codes."""

    key: ClassVar[str] = "dress"
    level: int
    kernel: Literal["dense", "sparse"]
    density: float | None = None
    measured_ms_batch1: dict[str, float] | None = None
    threads: int | None = None
    layers: dict[str, int] | None = None

    def level_of(self, weight: str) -> int:
        """The level `weight` runs at in this config."""
        return (self.layers or {}).get(weight, self.level)

    def plan(self, bundle: Bundle, config: Config, tensors: dict[str, np.ndarray],
             kernel: str | None) -> Plan:
        """The masked dense graph, or the row-sparse graph with the level as an input (`kernel`, default the
        exporter's). Both are derived from the one stored dense weight and its packed level codes."""
        b, level, kernel = bundle, self.level, kernel or self.kernel
        weights = {}
        for init, d in _section(b)["segments"]["main"].items():
            if d["weight"] not in tensors or d["codes"] not in tensors:
                raise BundleError(f"DRESS weight {init!r} names tensors missing from the bundle")
            w = tensors[d["weight"]]
            weights[init] = (w, unpack_codes(tensors[d["codes"]], w.shape))
        # one engine per distinct mix of levels: a per-layer config's key names every weight's level
        mix = (level,) if not self.layers else tuple(self.level_of(init) for init in sorted(weights))
        if kernel == "dense":
            seg = b.segments["main"]
            inits = {init: tensors[tid] for init, tid in seg.tensors.items()}
            inits.update({init: masked(w, codes, self.level_of(init))
                          for init, (w, codes) in weights.items()})
            return Plan(config, (Step(("main", *mix), seg.graph, b.inputs, b.outputs, inits),))
        if kernel != "sparse" or "main.sparse" not in b.segments:
            raise UsageError(f"DRESS kernel {kernel!r} is not in bundle {b.name!r}; it has: dense"
                             + (", sparse" if "main.sparse" in b.segments else ""))
        seg = b.segments["main.sparse"]
        inits = {init: tensors[tid] for init, tid in seg.tensors.items()}
        for init in b.manifest["segments"]["main.sparse"]["derived_ell"]:
            ell = ell_tensors(init, *weights[init], len(_section(b)["densities"]))
            if self.layers:
                # NOTE: the graph takes one run-time level; a per-layer mix fills each weight's k table with
                # the k of its own level, so whatever level is fed, each layer slices its own prefix
                k = ell[f"{init}.ell_k"]
                ell[f"{init}.ell_k"] = np.full_like(k, k[self.level_of(init)])
            inits.update(ell)
        key = ("main.sparse",) if not self.layers else ("main.sparse", *mix)
        step = Step(key, seg.graph, b.inputs, b.outputs, inits)
        return Plan(config, (step,), (np.array(level, np.int64),))


def _section(b: Bundle) -> dict[str, Any]:
    """The manifest's "dress" section (checked by the schema at open): densities, each weight's tensors."""
    return b.manifest["dress"]
