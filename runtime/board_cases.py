"""The runtime's side of the emulated-board check (`devices/board.py` builds the board and runs this module
there: `python -m edgeflex.runtime.board_cases SPEC`): open each case's bundle on TVM for the board's device,
run every config, save the outputs; prints one report line. numpy, TVM and edgeflex's runtime only.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

from edgeflex.devices.board import REPORT, hwcaps


def run_cases(spec_path: str) -> dict[str, Any]:
    """Board side of the check: for each case of the JSON spec, open the bundle's TVM engines for the spec's
    device with the case's Runtime options (first without allow_native, which the trust rule must refuse:
    they were compiled on another machine), run every config on the case's inputs and save the outputs
    (`<config>/<i>` in an .npz)."""
    import numpy as np
    from tvm.target import codegen

    from edgeflex.errors import BundleError

    from .runtime import Runtime

    spec = json.loads(Path(spec_path).read_text())
    report: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version(),
                              "numpy": np.__version__, "hwcaps": hwcaps(),
                              "llvm_cpu": str(codegen.llvm_get_system_cpu()), "cases": {}}
    for name, case in spec["cases"].items():
        refused = None
        opts = {"only": case.get("configs"), **case.get("options", {})}
        try:
            Runtime(case["bundle"], backend="tvm", device=spec["device"], threads=1, **opts)
        except BundleError as e:
            refused = str(e)
        rt = Runtime(case["bundle"], backend="tvm", device=spec["device"], threads=1, allow_native=True,
                        **opts)
        with np.load(case["inputs"]) as z:
            xs = [z[f"x{i}"] for i in range(len(z.files))]
        outs = {}
        for config in case.get("configs") or [c.name for c in rt.configs]:
            rt.switch(config)
            y = rt.run(*xs)
            for i, a in enumerate(y if isinstance(y, tuple) else (y,)):
                outs[f"{config}/{i}"] = a
        np.savez(case["out"], **outs)
        report["cases"][name] = {"refused_without_allow_native": refused, "configs": len(outs),
                                 "engine_versions": rt.info()["engine_versions"]}
    report["imported"] = sorted(m for m in ("torch", "onnxruntime", "onnx") if m in sys.modules)
    return report


if __name__ == "__main__":
    print(REPORT + json.dumps(run_cases(sys.argv[1])))
