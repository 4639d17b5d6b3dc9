"""Elastic FITS on the board: a config's cut-level fields (`FitsLevel`, the config's "fits_level" object)
and its plan.

Every level's GEMM operands are derived at load from the top-left block of the one stored complex weight
(the manifest's "fits_elastic" section; `kernels.spectral.nested` + `gemm_operands`). NumPy only; the
exporter is `export.fits_elastic.export_fits_elastic`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

from edgeflex.errors import BundleError
from edgeflex.kernels.spectral import SpectralWeights, gemm_operands, nested

from ..plan import Plan, Step
from . import ConfigKind

if TYPE_CHECKING:
    from ..bundle import Bundle, Config


@dataclass(frozen=True)
class FitsLevel(ConfigKind):
    """An elastic FITS level: its cut frequency, the GEMM form the exporter chose ("folded" or "lowrank"),
    the graph's initializers derived at load (`derived`, one per GEMM operand), and what the exporter
    recorded about it."""

    key: ClassVar[str] = "fits_level"
    cut_freq: int
    form: Literal["folded", "lowrank"]
    derived: list[str]
    up_freq: int | None = None
    parameters: int | None = None
    engine_bytes: int | None = None
    measured: dict | None = None
    threads: int | None = None

    def plan(self, bundle: Bundle, config: Config, tensors: dict[str, np.ndarray],
             kernel: str | None) -> Plan:
        """Its spectral graph, the GEMM operands derived from the stored weight's top-left block."""
        b, fe = bundle, bundle.manifest["fits_elastic"]
        if fe["weight"] not in tensors or fe["bias"] not in tensors:
            raise BundleError(f"elastic FITS bundle {b.name!r} names weight tensors missing from it")
        w, bias = tensors[fe["weight"]], tensors[fe["bias"]]
        full = SpectralWeights(fe["seq_len"], fe["pred_len"], w[0] + 1j * w[1], bias[0] + 1j * bias[1],
                               fe["eps"])
        ops = gemm_operands(nested(full, self.cut_freq), self.form)
        (name,) = config.segments
        seg = b.segments[name]
        inits = {init: tensors[tid] for init, tid in seg.tensors.items()}
        inits.update({init: op.astype(np.float32) for init, op in zip(self.derived, ops)})
        return Plan(config, (Step((name,), seg.graph, b.inputs, b.outputs, inits),))
