"""The board side: bundles, backends, the runtime. Imports numpy and the engine, never torch."""

from .bundle import Bundle, Config, TensorSpec
from .errors import BackendUnavailable, BundleError, DeviceError, EdgeflexError, ExportError, InputError
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
           "TensorSpec",
]
