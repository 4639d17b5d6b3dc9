"""Kept so that `from edgeflex.runtime.errors import ...`, written before the errors moved to the package
top, still works; the errors live in `edgeflex/errors.py`."""

from edgeflex.errors import *  # noqa: F403
from edgeflex.errors import __all__  # noqa: F401
