"""Kernel-level latency predictor (nn-Meter's method): a config's latency is the sum of its fused kernels'
(as `export/kernels.py` detects them), each predicted by a regressor fitted per kernel kind on kernels
timed on the device itself, calibrated per kind on measured configs, plus per-kernel and per-call overhead.

    latency_ms = sum_kind a_kind * sum_{k of kind} t(k) + (b+ - b-) * kernels + d * engine_calls
                 + sum_c w_c * (MiB of kernels' weights under c, in configs whose weights exceed c)

t(k) is the kind's regressor: a non-negative linear model of the kernel's FLOPs, channel-padding FLOPs,
bytes and a constant (fitted on relative error), times a correction learnt from the kernels nearest in
log-shape space (inverse-distance weighted; an already-measured kernel gets back its own time). The
coefficients a, b, d are fitted like `devices/predictor.py`'s (non-negative least squares on relative
error). Valid on the device the kernels and configs were measured on only. numpy only (board side).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeflex.errors import DeviceError

from .predictor import KINDS, _solve, check_format, loo_summary

FORMAT = "edgeflex-kernel-predictor"
FORMAT_VERSION = 2     # 2: kernels' dims and the bytes-over-cache hinges
# A kernel timed alone finds its weights in cache when they fit; in a config whose weights do not, they
# stream from the next level on every run: per cache size c (MiB, around L2 and L3; the fit picks), the
# MiB of weights of kernels under c in configs over c.
CACHE_HINGES_MIB = (1, 2, 4)
CONFIG_FEATURES = (*(f"kernels:{k}" for k in KINDS), "kernels", "-kernels", "engine_calls",
                   *(f"weights_over_{c}mib" for c in CACHE_HINGES_MIB))
NEIGHBOURS = 30     # chosen by leave-one-out (benchmarks/RESULTS.md, Kernel-level latency predictor)

KernelSample = tuple  # (kernel dict, measured ms)
ConfigSample = tuple  # (kernels list, measured p50 ms, label)


def _check_kernel(k: Any, where: str) -> dict[str, Any]:
    if not isinstance(k, dict) or k.get("kind") not in KINDS or not isinstance(k.get("flops"), int | float):
        raise DeviceError(f"{where} is not a kernel description (a dict with 'kind' in {list(KINDS)} and "
                          "'flops', 'bytes'); detect kernels with edgeflex.export.kernels.config_kernels")
    return k


# Bytes a kernel moves beyond these sizes (MiB) come from a slower level of the memory hierarchy (a
# hinge per size, the non-negative fit picks where this device's caches end).
BYTE_HINGES_MIB = (0.5, 1, 2, 4)
DIMS = 5     # export.kernels._dims: at most 5 numbers per kernel


def _linear_row(k: dict[str, Any]) -> list[float]:
    b = k.get("bytes", 0)
    return [k.get("flops", 0) / 1e6, k.get("pad_flops", 0) / 1e6, b / 1e6,
            *(max(b - c * 2**20, 0) / 1e6 for c in BYTE_HINGES_MIB), 1.0]


def _shape_point(k: dict[str, Any]) -> np.ndarray:
    f = k.get("flops", 0)
    dims = [math.log1p(max(float(d), 0)) for d in list(k.get("dims") or ())[:DIMS]]
    return np.array([math.log1p(f), math.log1p(k.get("bytes", 0)),
                     math.log1p(k.get("pad_flops", 0) / max(f, 1)),
                     math.log1p(k.get("setup_flops", 0)), *dims, *[0.0] * (DIMS - len(dims))])


@dataclass
class KernelRegressor:
    """Per-kind kernel-time regressors from (kernel, ms) samples measured on one device."""

    kernels: list[dict[str, Any]]
    ms: np.ndarray
    coef: dict[str, np.ndarray]

    @classmethod
    def fit(cls, samples: Sequence[KernelSample]) -> KernelRegressor:
        if not samples:
            raise DeviceError("no kernel samples to fit: give (kernel, measured ms) pairs")
        kernels, ms = [], []
        for i, s in enumerate(samples):
            if len(s) < 2:
                raise DeviceError(f"kernel sample {i} must be (kernel dict, ms), got {s!r:.80}")
            kernels.append(_check_kernel(s[0], f"kernel sample {i}"))
            y = float(s[1])
            if not (y > 0 and math.isfinite(y)):
                raise DeviceError(f"kernel sample {i} has measured time {s[1]!r}; it must be a positive ms")
            ms.append(y)
        y = np.asarray(ms)
        coef = {}
        for kind in KINDS:
            idx = [i for i, k in enumerate(kernels) if k["kind"] == kind]
            if idx:
                x = np.array([_linear_row(kernels[i]) for i in idx])
                coef[kind] = _solve(x, y[idx], 1e-3)
        return cls(kernels, y, coef)

    def __post_init__(self) -> None:
        # per kind: the samples' points in log-shape space, their op strings, and log(measured / linear)
        self._near: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for kind, c in self.coef.items():
            idx = [i for i, k in enumerate(self.kernels) if k["kind"] == kind]
            lin = np.array([_linear_row(self.kernels[i]) for i in idx]) @ c
            self._near[kind] = (np.stack([_shape_point(self.kernels[i]) for i in idx]),
                                np.array([str(self.kernels[i].get("ops")) for i in idx]),
                                np.log(self.ms[idx] / np.maximum(lin, 1e-6)))

    def predict(self, k: dict[str, Any]) -> float:
        """Predicted time (ms) of kernel `k` on the device the samples were measured on."""
        _check_kernel(k, "kernel")
        kind = k["kind"]
        if kind not in self.coef:
            raise DeviceError(f"no kernel of kind {kind!r} was measured; sample and time some "
                              f"(benchmarks/bench_predictor.py shows how)")
        base = max(float(np.array(_linear_row(k)) @ self.coef[kind]), 1e-6)
        pts, ops, resid = self._near[kind]
        d = np.sqrt(((pts - _shape_point(k)) ** 2).sum(axis=1)) + np.where(ops == str(k.get("ops")), 0, 0.5)
        near = np.argsort(d)[:NEIGHBOURS]
        w = 1.0 / (d[near] + 1e-3) ** 2
        if len(near) <= pts.shape[1] + 1:
            return base * float(np.exp((w * resid[near]).sum() / w.sum()))
        # locally weighted linear fit of the residual around k (a measured kernel gets back its own time)
        a = np.hstack([np.ones((len(near), 1)), pts[near] - _shape_point(k)]) * np.sqrt(w)[:, None]
        b = resid[near] * np.sqrt(w)
        reg = 1e-2 * w.max() * np.eye(a.shape[1])
        reg[0, 0] = 0.0
        sol = np.linalg.solve(a.T @ a + reg, a.T @ b)
        return base * float(np.exp(np.clip(sol[0], -3, 3)))


def _config_row(kernels: Sequence[dict[str, Any]], reg: KernelRegressor) -> np.ndarray:
    per_kind = dict.fromkeys(KINDS, 0.0)
    for k in kernels:
        per_kind[k["kind"]] += reg.predict(k)
    calls = 1 + max((int(k.get("call", 0)) for k in kernels), default=0)
    w = np.array([k.get("weight_bytes", 0) for k in kernels], float) / 2**20
    # weights of kernels that fit cache c alone (timed hot) while the config's do not (cold in the config)
    hinges = [float(w[w < c].sum()) if w.sum() > c else 0.0 for c in CACHE_HINGES_MIB]
    return np.array([*per_kind.values(), len(kernels), -len(kernels), calls, *hinges], float)


@dataclass
class KernelPredictor:
    """A kernel regressor and the per-kind calibration that turns kernel sums into config latency."""

    regressor: KernelRegressor
    coef: dict[str, float]
    device: str
    n_configs: int
    threads: int | None = None      # the intra-op threads everything was timed at, where known
    env: dict[str, Any] | None = None  # where it was timed ({"host": devices.host_info()}), where known

    def predict(self, kernels: Sequence[dict[str, Any]]) -> float:
        """Predicted p50 (ms) of a config that runs `kernels` (each with its engine `call` index)."""
        if not kernels:
            raise DeviceError("a config with no kernels: detect them with edgeflex.export.kernels")
        row = _config_row(kernels, self.regressor)
        return float(row @ np.array([self.coef[f] for f in CONFIG_FEATURES]))

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "device": self.device,
                "n_configs": self.n_configs, "threads": self.threads, "env": self.env,
                "coef": dict(self.coef),
                "kernel_samples": [[k, float(t)] for k, t in zip(self.regressor.kernels, self.regressor.ms)]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KernelPredictor:
        check_format(d, FORMAT, FORMAT_VERSION, "kernel predictor")
        try:
            return cls(KernelRegressor.fit([tuple(s) for s in d["kernel_samples"]]),
                       {f: float(d["coef"].get(f, 0.0)) for f in CONFIG_FEATURES}, str(d["device"]),
                       int(d["n_configs"]), None if d.get("threads") is None else int(d["threads"]),
                       dict(d["env"]) if d.get("env") else None)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, DeviceError):
                raise
            raise DeviceError(f"kernel predictor: missing or malformed {e!s:.60} (expected 'device', "
                              "'n_configs', 'coef' and 'kernel_samples' as KernelPredictor.to_json writes)") \
                from None


_SUFFIX = re.compile(r"(_token_\d+|_nchwc|_bn|_output_\d+)$")


def in_context(events: Sequence[dict[str, Any]],
               kernels: Sequence[dict[str, Any]]) -> tuple[list[float], float]:
    """Each kernel's time inside its graph (ms; the median over runs of its nodes' `kernel_time`, summed)
    from ONNX Runtime's profile (`SessionOptions.enable_profiling`) of runs of the one graph `kernels`
    came from, and the time of nodes that belong to none (ms: layout reorders ORT inserted). A node ORT
    fused from several kernels (a residual Add into an NCHWc Conv) counts for the kernel whose output it
    writes; the other gets 0. Nodes are found by name (`export.kernels.name_nodes`), ORT's "fused <name>",
    or the tensor its name was made from ("<output>_nchwc")."""
    by_name: dict[str, int] = {}
    for i, k in enumerate(kernels):
        _check_kernel(k, f"kernel {i}")
        by_name.update(dict.fromkeys(k.get("outputs", ()), i))
        by_name.update(dict.fromkeys(k.get("nodes", ()), i))
    durs: dict[str, list[float]] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            durs.setdefault(name[:-len("_kernel_time")], []).append(float(e.get("dur", 0)) / 1e3)
    ms, extra = [0.0] * len(kernels), 0.0
    for name, d in durs.items():
        t = float(np.median(d))
        n = name[len("fused "):] if name.startswith("fused ") else name
        while n not in by_name and _SUFFIX.search(n):
            n = _SUFFIX.sub("", n)
        if n in by_name:
            ms[by_name[n]] += t
        else:
            extra += t
    return ms, extra


def _configs(samples: Sequence[ConfigSample]) -> tuple[list[list[dict]], np.ndarray, list[str]]:
    if not samples:
        raise DeviceError("no config samples to fit: give (kernels, measured p50 ms, label) triples")
    ks, ys, labels = [], [], []
    for i, s in enumerate(samples):
        if len(s) not in (2, 3) or not isinstance(s[0], list | tuple) or not s[0]:
            raise DeviceError(f"config sample {i} must be (non-empty kernel list, p50_ms[, label])")
        y = float(s[1])
        if not (y > 0 and math.isfinite(y)):
            raise DeviceError(f"config sample {i} has measured p50 {s[1]!r}; it must be a positive ms")
        ks.append([_check_kernel(k, f"config sample {i}'s kernel") for k in s[0]])
        ys.append(y)
        labels.append(str(s[2]) if len(s) == 3 else str(i))
    return ks, np.asarray(ys), labels


def fit(kernel_samples: Sequence[KernelSample], config_samples: Sequence[ConfigSample], *,
        device: str = "host", ridge: float = 1e-2, threads: int | None = None) -> KernelPredictor:
    """Fit on kernels timed alone and configs timed whole, all measured on `device`."""
    ks, y, _ = _configs(config_samples)
    reg = KernelRegressor.fit(kernel_samples)
    x = np.stack([_config_row(k, reg) for k in ks])
    coef = _solve(x, y, ridge)
    return KernelPredictor(reg, dict(zip(CONFIG_FEATURES, map(float, coef))), device, len(y), threads)


def leave_one_out(kernel_samples: Sequence[tuple], config_samples: Sequence[ConfigSample], *,
                  ridge: float = 1e-2, band_pct: float = 10.0) -> dict[str, Any]:
    """For each config: drop it and every kernel sample seen only in it (kernel_samples are (kernel, ms,
    labels of the configs it came from); none = a sampled shape, always kept), refit, predict it. Same
    summary as `devices.predictor.leave_one_out`."""
    ks, y, labels = _configs(config_samples)
    if len(y) < 3:
        raise DeviceError(f"leave-one-out needs at least 3 config samples, got {len(y)}")
    pred = np.empty(len(y))
    for i, lab in enumerate(labels):
        kept = [s[:2] for s in kernel_samples if len(s) < 3 or not s[2] or set(s[2]) - {lab}]
        reg = KernelRegressor.fit(kept)
        keep = [j for j in range(len(y)) if j != i]
        x = np.stack([_config_row(ks[j], reg) for j in keep])
        coef = _solve(x, y[keep], ridge)
        pred[i] = _config_row(ks[i], reg) @ coef
    return loo_summary(labels, y, pred, band_pct)


__all__ = ["CONFIG_FEATURES", "KernelPredictor", "KernelRegressor", "fit", "in_context", "leave_one_out"]
