"""edgeflex: export PyTorch models to verified bundles and run them on edge devices.

`import edgeflex as ef` loads only the board side (numpy + onnxruntime). `ef.export` and `ef.elastic`
(`ef.elastic.stitch`) import torch the first time they are touched; `ef.models` (the registry:
`ef.models.list()`, `ef.models.create(name)`) imports it only when a model is built.
"""

from edgeflex.errors import DataError
from edgeflex.runtime import (
    BackendUnavailable,
    Budget,
    BudgetError,
    Bundle,
    BundleError,
    Config,
    DeviceError,
    EdgeflexError,
    ExportError,
    InputError,
    Runtime,
    TensorSpec,
    UsageError,
)
from edgeflex.version import __version__

__all__ = [
    "__version__",
    "BackendUnavailable",
    "Budget",
    "BudgetError",
    "Bundle",
    "BundleError",
    "Config",
    "DataError",
    "DeviceError",
    "EdgeflexError",
    "ExportError",
    "InputError",
    "Runtime",
    "TensorSpec",
    "UsageError",
    "elastic",
    "export",
    "models",
    "quantize",
    "search",
]


def __getattr__(name: str):
    if name == "export":
        import importlib
        return importlib.import_module("edgeflex.export")   # a callable module: ef.export(model, x, path)
    if name == "elastic":
        import importlib
        return importlib.import_module("edgeflex.elastic")   # imports torch
    if name == "models":
        import importlib
        return importlib.import_module("edgeflex.models")    # torch-free until a builder runs
    if name == "quantize":
        from edgeflex.export.quantize import quantize  # imports onnx and onnxruntime.quantization
        return quantize
    if name == "search":
        from edgeflex.export.search import search
        return search                                        # imports onnx, not torch
    raise AttributeError(f"module 'edgeflex' has no attribute {name!r}")
