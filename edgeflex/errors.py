"""The error types every part of edgeflex raises: one base, one subclass per kind of failure.

Messages are one line: what was wrong, what was expected, and the fix where there is one.
"""


class EdgeflexError(Exception):
    """Base of every error edgeflex raises on purpose."""


class BundleError(EdgeflexError):
    """A bundle is missing, truncated, tampered with, or of an unknown format."""


class InputError(EdgeflexError, ValueError):
    """An array handed to `run` has the wrong count, shape, dtype, or non-finite values."""


class BackendUnavailable(EdgeflexError):
    """A backend is not installed, not implemented, or has no device here."""


class DeviceError(EdgeflexError, ValueError):
    """An unknown device name."""


class UsageError(EdgeflexError, ValueError):
    """An argument out of its range (threads, tolerance, ...)."""


class DataError(EdgeflexError, ValueError):
    """Training or held-out data with bad shapes, dtypes, labels or non-finite rows, or too few rows."""


class ExportError(EdgeflexError):
    """A model could not be exported, or its export does not match PyTorch within tolerance."""


__all__ = ["EdgeflexError", "BundleError", "InputError", "BackendUnavailable", "DeviceError", "UsageError",
           "DataError", "ExportError"]
