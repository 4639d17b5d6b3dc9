"""The board side: bundles, backends, the runtime. Imports numpy and the engine, never torch."""

from .bundle import Bundle, Config, Segment, TensorSpec
from .errors import (
    BackendUnavailable,
    BundleError,
    DeviceError,
    EdgeflexError,
    ExportError,
    InputError,
    UsageError,
)
from .runtime import Runtime

__all__ = [
    "BackendUnavailable",
    "Bundle",
    "BundleError",
    "Config",
    "DeviceError",
    "EdgeflexError",
    "ExportError",
    "InputError",
    "Runtime",
    "Segment",
    "TensorSpec",
    "UsageError",
]
