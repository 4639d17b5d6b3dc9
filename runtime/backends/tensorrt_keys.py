"""Pure helpers of the TensorRT backend (issue 23): plan keys, stale plans, API path.

No tensorrt import: these run anywhere, so the rules are tested where TensorRT is absent.
A TensorRT plan is specific to the GPU model and the TensorRT version; a plan recorded for
another GPU, compute capability or version is stale: rebuilt, never loaded.
"""

from __future__ import annotations

import re
from typing import Any

ENGINES = "engines/tensorrt"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def plan_key(gpu: str, capability: tuple[int, int], trt_version: str) -> dict[str, str]:
    """What a stored plan is keyed by."""
    return {"gpu": gpu, "capability": f"{capability[0]}.{capability[1]}", "tensorrt": trt_version}


def plan_dir(key: dict[str, str]) -> str:
    """engines/tensorrt/<gpu>-sm<cc>-<trt version>/ inside the bundle."""
    cc = key["capability"].replace(".", "")
    return f"{ENGINES}/{_slug(key['gpu'])}-sm{cc}-{_slug(key['tensorrt'])}"


def stale_reason(record: dict[str, Any] | None, here: dict[str, str]) -> str | None:
    """None when the recorded plan was built for this GPU and TensorRT; else one line why not."""
    if record is None:
        return "no plan built for this GPU and TensorRT version"
    for field in ("gpu", "capability", "tensorrt"):
        if record.get(field) != here[field]:
            return f"plan built for {field} {record.get(field)!r}, this machine has {here[field]!r}"
    return None


def api_path(trt_version: str) -> str:
    """'10.x' (BuilderFlag.FP16 exists, weakly typed allowed) or '11.x' (strongly typed only)."""
    major = int(trt_version.split(".")[0])
    if major < 10:
        raise ValueError(f"TensorRT {trt_version} is older than 10.0, which edgeflex requires")
    return "10.x" if major == 10 else "11.x"
