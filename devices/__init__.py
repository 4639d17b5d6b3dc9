"""Devices edgeflex can run on. Today only `host` (this machine, detected); the described catalogue
(Jetson, Pi, phones) and the predictor come later. No torch."""

from __future__ import annotations

import os
import platform

from edgeflex.runtime.errors import DeviceError

KNOWN = ("host",)


def host_info() -> dict:
    """What this machine is, read off it: CPU model, usable cores, architecture."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"name": "host", "cpu": model or "unknown", "cores": cores, "arch": platform.machine(),
            "system": platform.system()}


def check_device(name: str) -> str:
    if name not in KNOWN:
        raise DeviceError(f"unknown device {name!r}; expected one of: {', '.join(KNOWN)}")
    return name
