"""The board side: bundles, backends, the runtime, budgets. Imports numpy and the engine, never torch."""

from edgeflex.errors import (
    BackendUnavailable,
    BundleError,
    DeviceError,
    EdgeflexError,
    ExportError,
    InputError,
    UsageError,
)

from .bundle import Bundle, Config, Segment, TensorSpec
from .policy import Budget, BudgetError
from .runtime import Runtime

__all__ = ["Bundle", "Config", "Segment", "TensorSpec", "Runtime", "Budget", "EdgeflexError", "BundleError",
           "InputError", "BackendUnavailable", "DeviceError", "ExportError", "UsageError", "BudgetError"]
