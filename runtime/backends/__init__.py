"""Backends by name. A backend is one module `runtime/backends/<name>.py`; importing it is deferred
until it is asked for, so a missing engine fails only the caller who wants it, in one line."""

from __future__ import annotations

import importlib

from edgeflex.errors import BackendUnavailable

from .base import Backend, Engine

# name -> (module, class). A backend that cannot run here (no TensorRT, no GPU) raises BackendUnavailable
# with the reason when it is made.
KNOWN = {"onnxruntime": ("onnxruntime", "OnnxRuntimeBackend"), "tvm": ("tvm", "TvmBackend"),
         "tensorrt": ("tensorrt", "TensorRtBackend")}
PLANNED: set[str] = set()


def get_backend(name: str) -> Backend:
    if name in KNOWN:
        module, cls = KNOWN[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    if name in PLANNED:
        raise BackendUnavailable(f"backend {name!r} is not available in this edgeflex version; "
                                 f"available: {', '.join(KNOWN)}")
    raise BackendUnavailable(f"unknown backend {name!r}; expected one of: {', '.join(KNOWN)}")


__all__ = ["KNOWN", "Backend", "Engine", "get_backend"]
