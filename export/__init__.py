"""PyTorch -> ONNX -> bundle. `edgeflex.export(model, example_inputs, path)` is this module, callable.

Needs the `export` extra (torch, onnx, onnxscript); the board side never imports it.
"""

import sys
import types

from .core import export

__all__ = ["export"]


class _CallableModule(types.ModuleType):
    # NOTE: `ef.export` names both this sub-package and the function. Python binds the sub-package onto
    # `edgeflex` once it is imported, so the module itself must be callable for `ef.export(...)` to work.
    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
