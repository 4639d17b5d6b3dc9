"""PyTorch -> ONNX -> bundle. `edgeflex.export(model, example_inputs, path)` is this module, callable.

Needs the `export` extra (torch, onnx, onnxscript); the board side never imports it. torch and onnx are
imported when an export is asked for (`export` or a call), not with the package: `edgeflex compile`
(`compile.tvm`) needs the `tvm` extra only.
"""

import sys
import types

__all__ = ["export"]


def __getattr__(name: str):
    if name == "export":
        from .core import export

        return export
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    # NOTE: `ef.export` names both this sub-package and the function. Python binds the sub-package onto
    # `edgeflex` once it is imported, so the module itself must be callable for `ef.export(...)` to work.
    def __call__(self, *args, **kwargs):
        from .core import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
