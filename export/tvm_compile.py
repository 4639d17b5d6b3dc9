"""Kept so that `edgeflex.export.tvm_compile`, the compiler's home before the compile stage had its own
folder, still names it: this module is `edgeflex.compile.tvm` itself."""

import sys

from edgeflex.compile import tvm as _tvm

sys.modules[__name__] = _tvm
