"""The compile stage: bundle -> engines for a target (TVM today): targets from the device catalogue, the
graph fixes Relax needs, building, tuning, CUDA checks, the engine records the runtime loads. No torch.

`compile_bundle` is the entry point (`edgeflex compile`); `tvm.py` holds the TVM compiler.
"""

from .tvm import compile_bundle

__all__ = ["compile_bundle"]
