"""Which arithmetic precisions a device runs natively: read off this machine's CPU flags for `host`, from
the catalogue's per-unit peak figures for a described device (a unit with an `int8` peak runs int8).

Owns only the answer and the one-line refusal; which precision a config runs is `Config.precision`, and
the runtime asks here before loading one. Nothing is emulated: a precision the device lacks is refused.
"""

from __future__ import annotations

import platform

from edgeflex.errors import DeviceError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")

# Per architecture: the CPU flags (/proc/cpuinfo "flags" on x86, "Features" on aarch64) any one of which
# gives a precision native arithmetic. x86 int8: VNNI/AMX dot products, or AVX2's vpmaddubsw (u8 x s8 pairs,
# what ONNX Runtime's int8 GEMM uses without VNNI); fp16: AVX512-FP16 (F16C only converts); bf16:
# AVX512-BF16 dot products or AMX. aarch64: sdot/udot (dotprod), half-precision arithmetic, BF16.
HOST_FLAGS: dict[str, dict[str, tuple[str, ...]]] = {
    "x86_64": {"int8": ("amx_int8", "avx512_vnni", "avx_vnni", "avx2"), "fp16": ("avx512_fp16",),
               "bf16": ("amx_bf16", "avx512_bf16")},
    "aarch64": {"int8": ("asimddp",), "fp16": ("asimdhp",), "bf16": ("bf16",)},
}
# What TVM's int8 kernels (edgeflex.kernels.tir.qconv) compute with, per architecture: the CPU flag of
# the dot-product instruction they are written for (x86: AVX512-VNNI `vpdpbusd`; aarch64: `sdot`).
# AVX-VNNI (256-bit only), AMX and AVX2's vpmaddubsw have no kernel here: int8 on TVM is refused there.
TVM_INT8_FLAGS: dict[str, tuple[str, ...]] = {"x86_64": ("avx512_vnni",), "aarch64": ("asimddp",)}
# The x86 int8 units that add u8 x s8 products in int32: without one, ONNX Runtime's int8 GEMM uses AVX2's
# vpmaddubsw, which adds pairs of products in int16 and saturates (`u8s8_saturates`).
EXACT_U8S8_FLAGS: dict[str, tuple[str, ...]] = {"x86_64": ("amx_int8", "avx512_vnni", "avx_vnni")}
# Flags worth naming in a benchmark record (which int8/16-bit units the machine has).
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16",
                 "avx512_fp16", "asimddp", "asimdhp", "bf16", "i8mm")


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (x86 `flags`, aarch64 `Features` of /proc/cpuinfo); empty where
    there is no /proc/cpuinfo."""
    from .catalog import _cpuinfo

    info = _cpuinfo()
    return set((info.get("flags") or info.get("Features") or "").split())


def host_precisions(flags: set[str] | None = None, arch: str | None = None) -> dict[str, str]:
    """{precision: the flag that gives it} for this machine (fp32: always)."""
    flags = cpu_flags() if flags is None else flags
    table = HOST_FLAGS.get(arch or platform.machine(), {})
    out = {"fp32": "baseline"}
    for precision, needs in table.items():
        have = [f for f in needs if f in flags]
        if have:
            out[precision] = have[0]
    return out


def tvm_int8_refusal(flags: set[str] | None = None, arch: str | None = None) -> str | None:
    """Why TVM's int8 kernels cannot run on this machine (its CPU lacks their dot-product instruction), in
    a phrase; None where they run."""
    flags = cpu_flags() if flags is None else flags
    arch = arch or platform.machine()
    needs = TVM_INT8_FLAGS.get(arch, ())
    if any(f in flags for f in needs):
        return None
    have = " / ".join(needs) or "int8 dot-product instruction TVM has a kernel for"
    return f"this {arch} CPU has no {have} (what TVM's int8 kernels compute with): int8 would be emulated"


def u8s8_saturates(flags: set[str] | None = None, arch: str | None = None) -> bool:
    """True on an x86 CPU without VNNI or AMX (AVX2, AVX-512 without VNNI), where ONNX Runtime's uint8 x int8
    kernels saturate pairs of products in int16 (`EXACT_U8S8_FLAGS`); ARM's dot products do not."""
    flags = cpu_flags() if flags is None else flags
    needs = EXACT_U8S8_FLAGS.get(arch or platform.machine())
    return needs is not None and not any(f in flags for f in needs)


def device_precisions(device: str) -> dict[str, str]:
    """{precision: why} a device runs: `host` from its CPU flags, a catalogue device (`DEVICE` its CPU,
    `DEVICE:gpu` its GPU) from the precisions its unit has a peak figure for."""
    if device == "host":
        return host_precisions()
    from .catalog import get_device

    base, _, unit = device.partition(":")
    dev = get_device(base)
    u = dev.unit(unit or "cpu")
    return {p: f"catalogue peak {v:g} G{'OP' if p == 'int8' else 'FLOP'}/s"
            for p, v in u.peak_gflops.items()}


def check_precision(device: str, precision: str, what: str = "") -> None:
    """Refuse, in one DeviceError line, a precision `device` has no arithmetic for."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")
    have = device_precisions(device)
    if precision not in have:
        raise DeviceError(f"{what + ': ' if what else ''}device {device!r} has no {precision} arithmetic "
                          f"(it runs: {', '.join(p for p in PRECISIONS if p in have)}); edgeflex does not "
                          f"emulate it: use a config of one of those precisions")
