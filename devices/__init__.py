"""Devices edgeflex knows: `host` (this machine, detected) and the described catalogue (`devices/catalog/`,
one TOML file per device, every figure sourced). The predictor for devices not at hand is
`edgeflex.devices.predictor`. numpy and stdlib only: no torch, no onnx."""

from __future__ import annotations

from edgeflex.errors import DeviceError

from .catalog import (
    HOST,
    Device,
    catalog_names,
    detect_host,
    get_device,
    known_names,
    list_rows,
    load_catalog,
    load_device_file,
    render_rows,
    usable_cores,
)
from .catalog import _cpuinfo as _cpuinfo

KNOWN = (HOST,)     # kept for callers of the first release; the full list is known_names()


def host_info() -> dict:
    """What this machine is, read off it: CPU model, usable cores, architecture (cheap: nothing measured)."""
    import platform

    info = _cpuinfo()
    model = info.get("model name") or info.get("Model") or info.get("Hardware") or platform.processor()
    return {"name": HOST, "cpu": model or "unknown", "cores": usable_cores(), "arch": platform.machine(),
            "system": platform.system()}


def check_device(name: str) -> str:
    """`name` if it is `host`, a catalogue device, or `DEVICE:gpu` (a catalogue device's GPU, whose TVM
    engines `edgeflex compile --target DEVICE:gpu` builds), else DeviceError listing the known names."""
    base, sep, unit = name.partition(":") if isinstance(name, str) else (name, "", "")
    if sep and unit != "gpu":
        raise DeviceError(f"unknown unit {unit!r} in device {name!r}; expected DEVICE or DEVICE:gpu")
    if (base != HOST or sep) and base not in catalog_names():
        raise DeviceError(f"unknown device {name!r}; expected one of: {', '.join(known_names())}"
                          f"{' (with :gpu, a catalogue device)' if sep else ''}")
    return name


def path_name(device: str) -> str:
    """A device's name in bundle paths (`profiles/<name>.json`, `engines/tvm/<name>/`): `DEVICE:gpu` is
    `DEVICE-gpu`, any other name itself."""
    return device.replace(":", "-")


__all__ = ["HOST", "KNOWN", "Device", "DeviceError", "catalog_names", "check_device", "detect_host",
           "get_device", "host_info", "known_names", "list_rows", "load_catalog", "load_device_file",
           "path_name", "render_rows"]
