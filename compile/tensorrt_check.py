"""Static TensorRT compatibility check of one ONNX graph (issue 23), from the sourced operator matrix.

Runs anywhere (onnx only, no tensorrt, no torch). Findings are per node: an operator the parser
does not know or does not support, LayerNormalization asking for more than its first output, a
DOUBLE tensor (cast down to FLOAT with clamping by the parser), an INT64 tensor (TensorRT computes
in INT32 where it can), or a verbatim restriction from the matrix to review.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx

MATRICES = Path(__file__).with_name("tensorrt_ops")
DEFAULT_VERSION = "10.1"


@dataclass(frozen=True)
class Finding:
    node: str
    op: str
    level: str  # "unsupported" | "restricted" | "dtype"
    why: str


def matrix(version: str = DEFAULT_VERSION) -> dict:
    path = MATRICES / f"{version}.json"
    if not path.exists():
        have = sorted(p.stem for p in MATRICES.glob("*.json"))
        raise ValueError(f"no TensorRT operator matrix for {version} (have {', '.join(have)})")
    return json.loads(path.read_text())


def _dtypes(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    out = {t.name: t.data_type for t in g.initializer}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        out[v.name] = v.type.tensor_type.elem_type
    return out


def check_model(model: onnx.ModelProto, version: str = DEFAULT_VERSION) -> list[Finding]:
    ops = matrix(version)["operators"]
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a graph shape inference cannot type is still checked by op
        pass
    types = _dtypes(model)
    found: list[Finding] = []
    for i, n in enumerate(model.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        entry = ops.get(n.op_type) if n.domain in ("", "ai.onnx") else None
        if entry is None:
            found.append(Finding(name, n.op_type, "unsupported", f"not in TensorRT {version}'s ONNX parser"))
            continue
        if not entry["supported"]:
            found.append(Finding(name, n.op_type, "unsupported", f"marked N in TensorRT {version}'s matrix"))
            continue
        if n.op_type == "LayerNormalization" and len([o for o in n.output if o]) > 1:
            found.append(Finding(name, n.op_type, "unsupported", "only the first output Y is supported"))
        for t in list(n.input) + list(n.output):
            dt = types.get(t)
            if dt == onnx.TensorProto.DOUBLE:
                found.append(Finding(name, n.op_type, "dtype", f"{t} is DOUBLE: cast down to FLOAT, clamped"))
            elif dt == onnx.TensorProto.INT64 and "INT64" not in entry["types"]:
                found.append(Finding(name, n.op_type, "dtype", f"{t} is INT64, not among {entry['types']}"))
        if entry["restrictions"]:
            found.append(Finding(name, n.op_type, "restricted", entry["restrictions"]))
    return found


def check_bundle(path: str, version: str = DEFAULT_VERSION) -> dict[str, list[Finding]]:
    """Findings per graph file for every graph any config runs, chained or fused (runtime/plan.py)."""
    from edgeflex.runtime.bundle import Bundle
    from edgeflex.runtime.plan import build_plans

    b = Bundle.open(path)
    graphs: dict[str, list[Finding]] = {}
    for fused in (False, True):
        for plan in build_plans(b, fused=fused).values():
            for step in plan.steps:
                if step.graph not in graphs:
                    m = onnx.ModelProto()
                    m.ParseFromString(b.read(step.graph))
                    graphs[step.graph] = check_model(m, version)
    return graphs
