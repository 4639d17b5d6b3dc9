"""Latency predictor: per-config latency on a device from the config's operator-level costs (as written by
`edgeflex.export.costs.config_costs`) and the device's description, calibrated on measured profiles.

    latency_ms = sum_k (a_k * flops_k / peak_flops + b_k * bytes_k / bandwidth)
                 + sum_g e_g * pad_flops_g / peak_flops + c * nodes + d * engine_calls
                 + h * (engine_calls - 1) * flops / peak_flops + s * dft_setup_flops / peak_flops
                 + u * small_op_flops / peak_flops + v * small_op_nodes

with k over operator kinds, g over the GEMM kinds (conv, matmul) whose channels, rounded up to the SIMD
block, cost extra FLOPs (`export/costs.py` pad_flops).
The h term is a config chained over several engines losing a share of its speed with every extra
engine (on ONNX Runtime at 2 threads each engine has its own thread pool and converts layouts at its
edges: chains ran well behind their fused graph with ORT's default spinning, less since the runtime caps
it; at 1 thread each extra call still costs a fixed overhead; benchmarks/RESULTS.md, Elastic models).
The coefficients are fitted by non-negative least squares on relative error,
from (costs, measured p50) pairs of a reference device. On another device the same coefficients are applied
with that device's peak and bandwidth (c, d and v scaled by the clock ratio): that transfer is UNVALIDATED
until the device itself is measured, and every prediction says so. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeflex.errors import DeviceError

from .catalog import Device

FORMAT = "edgeflex-latency-predictor"
FORMAT_VERSION = 1
# Mirrors edgeflex.export.costs.KINDS (kept here so the board side never imports onnx).
KINDS = ("conv", "dwconv", "matmul", "elementwise", "norm", "data", "dft", "other")
# GEMM kinds whose channel-padding FLOPs (costs' `pad_flops`) get a coefficient of their own.
PAD_KINDS = ("conv", "matmul")
# Kinds with per-node work that does not grow with the batch (costs' `setup_flops`: a Bluestein DFT's chirp).
SETUP_KINDS = ("dft",)
FEATURES = (*(f"flops:{k}" for k in KINDS), *(f"pad:{k}" for k in PAD_KINDS),
            *(f"bytes:{k}" for k in KINDS), "nodes", "engine_calls", "chained",
            *(f"setup:{k}" for k in SETUP_KINDS), "small:flops", "small:nodes")
OVERHEADS = ("nodes", "engine_calls", "small:nodes")

Sample = tuple  # (costs: dict, p50_ms: float) or (costs, p50_ms, label)


def nnls(a: np.ndarray, b: np.ndarray, *, max_iter: int | None = None) -> np.ndarray:
    """argmin ||a x - b||_2 subject to x >= 0 (Lawson and Hanson's active-set method)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, bool)
    tol = 10 * np.finfo(float).eps * max(m, n) * max(np.abs(a).sum(axis=0).max(initial=0.0), 1.0)
    max_iter = max_iter or 3 * n + 30
    w = a.T @ (b - a @ x)
    it = 0
    while (~passive).any() and w[~passive].max() > tol and it < max_iter:
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            it += 1
            s = np.zeros(n)
            s[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if s[passive].min() > 0 or it >= max_iter:
                break
            neg = passive & (s <= 0)
            alpha = np.min(x[neg] / (x[neg] - s[neg]))
            x = x + alpha * (s - x)
            passive &= x > tol
        x = np.where(passive, np.maximum(s, 0.0), 0.0)
        w = a.T @ (b - a @ x)
    return x


# How many times fewer bytes a reduced-precision config moves than its fp32 costs count (weights and
# activations at 1 or 2 bytes).
BYTES_SHRINK = {"int8": 4, "fp16": 2, "bf16": 2}


def _figures(device: Device, unit: str, precision: str) -> dict[str, float | str | None]:
    peak = device.peak_gflops(unit, precision)
    bw = device.memory_bandwidth_gbs(unit)
    if not (peak > 0 and bw > 0 and math.isfinite(peak) and math.isfinite(bw)):
        raise DeviceError(f"device {device.name!r} has no usable {unit} {precision} peak or bandwidth "
                          f"(peak {peak}, bandwidth {bw}); measure the host (get_device('host'))")
    u = device.unit(unit)
    return {"device": device.name, "mode": device.mode, "unit": unit, "precision": precision,
            "peak_gflops": float(peak), "peaks": {p: float(v) for p, v in u.peak_gflops.items()},
            "bandwidth_gbs": float(bw), "clock_ghz": u.max_ghz, "cores": u.cores,
            "obtained": device.obtained}


def features(costs: dict[str, Any], figures: dict[str, Any]) -> np.ndarray:
    """One row of the design matrix: each kind's FLOPs and bytes as milliseconds at the device's peak and
    bandwidth, then the node count, the number of engine calls, and (calls - 1) x all FLOPs at peak."""
    per_kind = costs.get("per_kind")
    if not isinstance(per_kind, dict):
        raise DeviceError("costs have no 'per_kind' table; compute them with "
                          "edgeflex.export.costs.config_costs")
    # A reduced-precision config (costs["precision"], `edgeflex quantize`) at its precision's peak where the
    # device gives one (int8 GOP/s, fp16 GFLOP/s), else at the reference precision's; its bytes at its width.
    peak = figures.get("peaks", {}).get(costs.get("precision", ""), figures["peak_gflops"])
    ms_per_flop = 1e3 / (peak * 1e9)
    ms_per_byte = 1e3 / (figures["bandwidth_gbs"] * 1e9) / BYTES_SHRINK.get(costs.get("precision", ""), 1)
    row = [per_kind.get(k, {}).get("flops", 0) * ms_per_flop for k in KINDS]
    flops_ms = sum(row)
    row += [per_kind.get(k, {}).get("pad_flops", 0) * ms_per_flop for k in PAD_KINDS]
    row += [per_kind.get(k, {}).get("bytes", 0) * ms_per_byte for k in KINDS]
    nodes = costs.get("total", {}).get("nodes", sum(v.get("nodes", 0) for v in per_kind.values()))
    calls = costs.get("engine_calls", 1)
    row += [nodes, calls, max(calls - 1, 0) * flops_ms]
    row += [per_kind.get(k, {}).get("setup_flops", 0) * ms_per_flop for k in SETUP_KINDS]
    # ops too small to split over threads (costs' small_flops / small_nodes, summed over the kinds)
    row += [sum(v.get("small_flops", 0) for v in per_kind.values()) * ms_per_flop,
            sum(v.get("small_nodes", 0) for v in per_kind.values())]
    return np.asarray(row, float)


@dataclass
class Predictor:
    """Fitted coefficients (name -> value, see FEATURES) and the reference device's figures they are
    relative to. Build with `fit`; `predict` gives milliseconds."""

    coef: dict[str, float]
    reference: dict[str, Any]
    n_samples: int
    ridge: float = 0.0
    fit_error: dict[str, float] = field(default_factory=dict)

    def validated_on(self, device: Device) -> bool:
        """True only for the device (and power mode) the coefficients were measured on."""
        return device.name == self.reference["device"] and device.mode == self.reference.get("mode")

    def _scaled_coef(self, target: dict[str, Any]) -> np.ndarray:
        c = np.array([self.coef.get(f, 0.0) for f in FEATURES])
        ref_clock, clock = self.reference.get("clock_ghz"), target.get("clock_ghz")
        if ref_clock and clock and target["device"] != self.reference["device"]:
            for f in OVERHEADS:                 # per-node and per-call overheads are single-thread CPU work
                c[FEATURES.index(f)] *= ref_clock / clock
        return c

    def predict(self, costs: dict[str, Any], device: Device | None = None, *, unit: str = "cpu",
                precision: str = "fp32") -> float:
        """Predicted p50 latency (ms) of a config with `costs` on `device` (default: the reference)."""
        return self.predict_detail(costs, device, unit=unit, precision=precision)["ms"]

    def predict_detail(self, costs: dict[str, Any], device: Device | None = None, *, unit: str = "cpu",
                       precision: str = "fp32") -> dict[str, Any]:
        """The prediction, its per-term breakdown (ms), whether it is validated, and a note saying on what."""
        if device is None:
            target = dict(self.reference)
            validated = True
        else:
            target = _figures(device, unit, precision)
            validated = self.validated_on(device) and unit == self.reference["unit"]
        x = features(costs, target)
        c = self._scaled_coef(target)
        terms = {f: float(v) for f, v in zip(FEATURES, x * c) if v}
        ms = float(x @ c)
        ref = self.reference
        if validated:
            note = (f"fitted on {self.n_samples} measured configs on {ref['device']} ({ref['unit']}); "
                    f"fit error: {self.fit_error or 'not computed'}")
        else:
            note = (f"UNVALIDATED transfer from {ref['device']} to {target['device']} ({unit}, {precision}): "
                    f"coefficients fitted on {ref['device']} applied with {target['device']}'s listed peak "
                    f"{target['peak_gflops']:g} GFLOP/s and bandwidth {target['bandwidth_gbs']:g} GB/s "
                    f"(reference: {ref['peak_gflops']:g} GFLOP/s, {ref['bandwidth_gbs']:g} GB/s, "
                    f"{ref['obtained']}); assumes the same share of peak is reached on both; no "
                    f"measurement on {target['device']} checks it")
        return {"ms": ms, "terms": terms, "validated": validated, "device": target["device"], "note": note}

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "model": "latency_ms = sum_k(a_k flops_k / peak + b_k bytes_k / bandwidth) + "
                         "sum_g(e_g pad_flops_g / peak) + c nodes + d engine_calls + "
                         "h (engine_calls - 1) flops / peak + s dft_setup_flops / peak + "
                         "u small_op_flops / peak + v small_op_nodes",
                "features": list(FEATURES),
                "coef": dict(self.coef), "reference": dict(self.reference), "n_samples": self.n_samples,
                "ridge": self.ridge, "fit_error": dict(self.fit_error)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Predictor:
        check_format(d, FORMAT, FORMAT_VERSION, "latency predictor")
        unknown = set(d["coef"]) - set(FEATURES)
        if unknown:
            raise DeviceError(f"latency predictor has unknown coefficients {sorted(unknown)}; refit it")
        return cls({k: float(v) for k, v in d["coef"].items()}, dict(d["reference"]), int(d["n_samples"]),
                   float(d.get("ridge", 0.0)), dict(d.get("fit_error", {})))


def check_format(d: Any, fmt: str, version: int, what: str) -> None:
    """Raise a one-line DeviceError unless `d` is a saved `what` of format `fmt`, version `version`."""
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise DeviceError(f"not an edgeflex {what} (expected \"format\": \"{fmt}\")")
    if d.get("format_version") != version:
        raise DeviceError(f"{what} format version {d.get('format_version')!r}; this edgeflex reads "
                          f"{version}: refit it")


def loo_summary(labels: Sequence[str], y: np.ndarray, pred: np.ndarray,
                band_pct: float) -> dict[str, Any]:
    """The leave-one-out summary of predictions `pred` of measured `y`: share within +-band_pct % and
    +-20 %, median/mean/max absolute % error, and the per-sample rows."""
    err = (pred - y) / y * 100
    abs_err = np.abs(err)
    rows = [{"label": lab, "measured_ms": float(m), "predicted_ms": float(p), "error_pct": float(e)}
            for lab, m, p, e in zip(labels, y, pred, err)]
    return {"n": len(y), "band_pct": band_pct, "within_band": float(np.mean(abs_err <= band_pct)),
            "within_20pct": float(np.mean(abs_err <= 20)), "median_abs_pct": float(np.median(abs_err)),
            "mean_abs_pct": float(abs_err.mean()), "max_abs_pct": float(abs_err.max()), "rows": rows}


def _split(samples: Sequence[Sample]) -> tuple[list[dict], np.ndarray, list[str]]:
    if not samples:
        raise DeviceError("no samples to fit: give (costs, measured p50 ms) pairs")
    costs, ys, labels = [], [], []
    for i, s in enumerate(samples):
        if len(s) not in (2, 3) or not isinstance(s[0], dict):
            raise DeviceError(f"sample {i} must be (costs dict, p50_ms) or (costs, p50_ms, label), got "
                              f"{s!r:.80}")
        y = float(s[1])
        if not (y > 0 and math.isfinite(y)):
            raise DeviceError(f"sample {i} has measured p50 {s[1]!r}; it must be a positive number of ms")
        costs.append(s[0])
        ys.append(y)
        labels.append(str(s[2]) if len(s) == 3 else str(i))
    return costs, np.asarray(ys), labels


def fit(samples: Sequence[Sample], device: Device, *, unit: str = "cpu", precision: str = "fp32",
        ridge: float = 1e-2, with_loo: bool = False) -> Predictor:
    """Fit the coefficients on `samples` = [(costs, measured p50 ms), ...] measured on `device`.

    Minimises the squared *relative* error (each row divided by its measured latency), coefficients >= 0.
    `ridge` adds a small penalty (relative to each column's scale) that keeps coefficients of features the
    samples barely vary from taking extreme values; 0 disables it. `fit_error` holds the in-sample error and,
    with `with_loo=True` (n refits), the leave-one-out error that predictions on `device` then quote."""
    costs, y, _ = _split(samples)
    ref = _figures(device, unit, precision)
    x = np.stack([features(c, ref) for c in costs])
    coef = _solve(x, y, ridge)
    err = np.abs(x @ coef - y) / y * 100
    fit_error = {"in_sample_median_abs_pct": round(float(np.median(err)), 2),
                 "in_sample_within_10pct": round(float(np.mean(err <= 10)), 3)}
    if with_loo and len(y) >= 3:
        loo = leave_one_out(samples, device, unit=unit, precision=precision, ridge=ridge)
        fit_error |= {"loo_median_abs_pct": round(loo["median_abs_pct"], 2),
                      "loo_within_10pct": round(loo["within_band"], 3)}
    return Predictor({f: float(v) for f, v in zip(FEATURES, coef)}, ref, len(y), ridge, fit_error)


def _solve(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    a = x / y[:, None]                              # relative error: each row divided by its target
    b = np.ones(len(y))
    scale = np.sqrt((a**2).sum(axis=0))
    used = scale > 0
    a = a[:, used] / scale[used]
    if ridge > 0:
        a = np.vstack([a, math.sqrt(ridge) * np.eye(a.shape[1])])
        b = np.concatenate([b, np.zeros(a.shape[1])])
    coef = np.zeros(x.shape[1])
    coef[used] = nnls(a, b) / scale[used]
    return coef


def leave_one_out(samples: Sequence[Sample], device: Device, *, unit: str = "cpu", precision: str = "fp32",
                  ridge: float = 1e-2, band_pct: float = 10.0) -> dict[str, Any]:
    """Fit on all samples but one, predict that one, for each: the share within +-band_pct %, the median and
    mean absolute % error, and the per-sample table (label, measured, predicted, error %)."""
    costs, y, labels = _split(samples)
    if len(y) < 3:
        raise DeviceError(f"leave-one-out needs at least 3 samples, got {len(y)}")
    ref = _figures(device, unit, precision)
    x = np.stack([features(c, ref) for c in costs])
    pred = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        pred[i] = x[i] @ _solve(x[keep], y[keep], ridge)
    return loo_summary(labels, y, pred, band_pct) | {"device": device.name, "unit": unit}


__all__ = ["FEATURES", "KINDS", "Predictor", "features", "fit", "leave_one_out", "nnls"]
