"""The engine a bundle is exported for (`ef.export(..., engine=)`): None, edgeflex's CPU engines (ONNX Runtime
and TVM: the forms measured fastest there), or "tensorrt": the forms TensorRT's ONNX parser takes (the FITS
spectral forms without ONNX `DFT` and with their normalisation by ReduceMean / Sqrt rather than a
LayerNormalization that also outputs its mean and inverse standard deviation), every graph then checked
against the parser's operator matrix (`compile.tensorrt_check`) before anything is written.

Owns the names and the check's verdict for the manifest; not the forms (each family's exporter) nor the
matrix (compile/tensorrt_ops).
"""

from __future__ import annotations

from typing import Any

import onnx

from edgeflex.errors import ExportError

ENGINES = ("tensorrt",)
MAX_NAMED = 6       # findings named in the error line; the rest counted


def check_engine(engine: Any) -> str | None:
    """`engine` as given, or ExportError in one line when it is not None or one of `ENGINES`."""
    if engine is None or engine in ENGINES:
        return engine
    raise ExportError(f"engine={engine!r}: expected None (ONNX Runtime and TVM) or one of "
                      f"{', '.join(map(repr, ENGINES))}")


def uses_layer_norm(engine: str | None) -> bool:
    """Whether the FITS forms may normalise by a LayerNormalization with its extra outputs."""
    return engine != "tensorrt"


def verdict(engine: str | None, files: dict[str, bytes], version: str | None = None) -> dict | None:
    """For engine "tensorrt": every ONNX graph of `files` (path -> bytes) through the static check of
    TensorRT `version`'s parser (default: the newest matrix kept); ExportError naming the nodes it would
    reject or cast (unsupported op, extra outputs, DOUBLE, INT64 where the matrix does not list it), else
    the record for the manifest. None for the other engines."""
    if engine != "tensorrt":
        return None
    from edgeflex.compile.tensorrt_check import DEFAULT_VERSION, check_model

    version = version or DEFAULT_VERSION
    bad: list[str] = []
    restricted = 0
    graphs = sorted(p for p in files if p.endswith(".onnx"))
    for path in graphs:
        for f in check_model(onnx.load_from_string(files[path]), version):
            if f.level == "restricted":
                restricted += 1
            else:
                bad.append(f"{path}: {f.node} ({f.op}): {f.why}")
    if bad:
        more = f"; and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
        raise ExportError(f"{len(bad)} node(s) TensorRT {version}'s ONNX parser would reject or cast: "
                          + "; ".join(bad[:MAX_NAMED]) + more + " (export without engine='tensorrt' for "
                          "ONNX Runtime and TVM)")
    return {"version": version, "graphs": len(graphs), "unsupported": 0, "restricted_to_review": restricted,
            "by": "compile.tensorrt_check (the parser's operator matrix; TensorRT itself did not run)"}


def engine_record(engine: str | None, files: dict[str, bytes]) -> dict:
    """The manifest's "export" entries for `engine` ({} for None): the engine and the check's `verdict`."""
    if engine is None:
        return {}
    return {"engine": engine, "tensorrt_check": verdict(engine, files)}
