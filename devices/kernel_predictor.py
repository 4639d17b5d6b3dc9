"""Kernel-level latency predictor (nn-Meter's method): a config's latency is the sum of its fused kernels'
(as `export/kernels.py` detects them), each predicted by a regressor fitted per kernel kind on kernels
timed on the device itself, calibrated per kind on measured configs, plus per-kernel and per-call overhead.

    linear_ms = sum_kind a_kind * sum_{k of kind} t(k) + (b+ - b-) * kernels + d * engine_calls
                + sum_kind p_kind * sum_{k of kind} (ta(k) - t(k))
                + sum_c w_c * (MiB of kernels' weights under c, in configs whose weights exceed c)
                + v * MiB of activations (the kernels' inputs and outputs that are not weights)
                [+ s * sum_k t1(k), instead of the per-kind sums, for a chained config at > 1 thread]
    latency_ms = linear_ms * exp(strength * weighted mean of log(measured / linear_ms) of the
                                 CONFIG_NEIGHBOURS measured configs nearest in config space)

t(k) is the kernel's own measured time where it was timed on the device (same kind, ops, FLOPs, bytes and head
shape: `signature`), else the kind's regressor: a non-negative linear model of the kernel's FLOPs,
channel-padding FLOPs, bytes and a constant (fitted on relative error), times a correction learnt from the
kernels nearest in log-shape space (inverse-distance weighted). ta(k): the kernel's time after its producer
(the kernel whose output it reads first), from the two timed as one graph (T(pair) - T(producer alone)), or
for a pair not timed, t(k) times the ratio of the nearest timed pairs; t(k) where the model has no pairs or
the kernel no producer (p lets the fit decide how far to trust the pairs). t1(k): the same at 1 thread
(`serial`, where the model was timed at more threads): a chained config runs one engine (own ORT pool) per
call, and at 2 threads the idle engines' spinning workers take the second core, so it runs at about its
1-thread speed. v: what a config's activations cost in the whole graph beyond what its kernels timed alone
show (fitted, not assumed; the likely causes: in a graph they pass from kernel to kernel through the caches,
and an ORT NCHWc Conv timed alone pays its own layout reorders, which inside a graph only the first and last
Conv pay). The coefficients a, b, d, p, v, w, s are fitted like `devices/predictor.py`'s (non-negative least
squares on relative error). The config space (`_config_point`): the config's size (sum of ta(k)), each kind's
share of it, its kernel count, whether it is chained, and its weights; the correction carries what kernels
timed alone miss in a family of similar configs (at 2 threads: how much of the pool a config's kernels use in
the graph). Its strength (0, 1/2 or 1: STRENGTHS) is chosen when fitting, by a leave-one-out over the measured
configs themselves (the strength that puts most of them within BAND_PCT %): where the configs' residuals are
noise rather than a family's bias, the full correction would carry that noise. Valid on the device the kernels
and configs were measured on only. numpy only (board side).
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
FORMAT_VERSION = 5     # 2: kernels' dims and the bytes-over-cache hinges; 3: measured kernels by signature,
#                        the 1-thread kernels of chained configs, the config-neighbour correction; 4: the
#                        activations column and the correction's strength (a format-3 model reads as one
#                        whose activations cost 0, at strength 1: the predictions it made); 5: kernels timed
#                        after their producers (a format-3/4 model has none: the predictions it made)
READS = (3, 4, FORMAT_VERSION)
# A kernel timed alone finds its weights in cache when they fit; in a config whose weights do not, they
# stream from the next level on every run: per cache size c (MiB, around L2 and L3; the fit picks), the
# MiB of weights of kernels under c in configs over c.
CACHE_HINGES_MIB = (1, 2, 4)
CONFIG_FEATURES = (*(f"kernels:{k}" for k in KINDS), "kernels", "-kernels", "engine_calls",
                   *(f"weights_over_{c}mib" for c in CACHE_HINGES_MIB), "serial_kernels", "activations_mib",
                   *(f"after_producer:{k}" for k in KINDS))
NEIGHBOURS = 30     # chosen by leave-one-out (benchmarks/RESULTS.md, Kernel-level latency predictor)
PAIR_NEIGHBOURS = 8     # timed pairs whose ratio (after the producer / alone) predicts an untimed pair's
# measured configs whose residual corrects a prediction, and their distance's floor (config-space units):
# chosen by leave-one-out on the issue-22 set (benchmarks/RESULTS.md, Kernel-level latency predictor)
CONFIG_NEIGHBOURS = 4
CONFIG_DIST_FLOOR = 0.05
# the calibration's ridge (devices.predictor._solve's, relative to each column's scale); chosen like the above
RIDGE = 1e-3
# the correction's strengths a fit chooses from (by leave-one-out over its configs: the most within
# BAND_PCT %, ties to the lower median error), and that band (the issue-22 goal's)
STRENGTHS = (0.0, 0.5, 1.0)
BAND_PCT = 10.0

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


def signature(k: dict[str, Any]) -> tuple:
    """What identifies a kernel in a bundle's manifest (which keeps no key): kind, ops, costs, head shape.
    Kernels with equal signatures are timed as one."""
    return (k.get("kind"), str(k.get("ops")), int(k.get("flops", 0)), int(k.get("bytes", 0)),
            int(k.get("weight_bytes", 0)), int(k.get("pad_flops", 0)), int(k.get("setup_flops", 0)),
            tuple(int(d) for d in (k.get("dims") or ())))


def _pair_point(producer: dict[str, Any], k: dict[str, Any]) -> np.ndarray:
    """Where a kernel after its producer sits among pairs: both kernels' points in log-shape space."""
    return np.concatenate([_shape_point(producer), _shape_point(k)])


def pair_signature(producer: dict[str, Any], k: dict[str, Any]) -> tuple:
    """What identifies a kernel after its producer (a pair timed as one graph)."""
    return signature(producer), signature(k)


def _pair_samples(samples: Sequence[tuple] | None) -> list[tuple[dict, dict, float]] | None:
    """(producer kernel, kernel, ms the kernel takes after it) samples, checked; None where there are none."""
    if not samples:
        return None
    out = []
    for i, s in enumerate(samples):
        if not isinstance(s, list | tuple) or len(s) < 3:
            raise DeviceError(f"pair sample {i} must be (producer kernel, kernel, ms), got {s!r:.80}")
        try:
            y = float(s[2])
        except (TypeError, ValueError):
            y = float("nan")
        if not (y > 0 and math.isfinite(y)):
            raise DeviceError(f"pair sample {i} has time {s[2]!r}; it must be a positive ms")
        out.append((_check_kernel(s[0], f"pair sample {i}'s producer"),
                    _check_kernel(s[1], f"pair sample {i}'s kernel"), y))
    return out


@dataclass
class KernelRegressor:
    """Per-kind kernel-time regressors from (kernel, ms) samples measured on one device; with `pairs`
    ((producer, kernel, ms) samples of kernels timed after their producers, the two as one graph), a
    kernel's time after its producer (`after`)."""

    kernels: list[dict[str, Any]]
    ms: np.ndarray
    coef: dict[str, np.ndarray]
    pairs: list[tuple[dict, dict, float]] | None = None

    @classmethod
    def fit(cls, samples: Sequence[KernelSample], pairs: Sequence[tuple] | None = None) -> KernelRegressor:
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
        return cls(kernels, y, coef, _pair_samples(pairs))

    def __post_init__(self) -> None:
        # a kernel timed on the device gets its own time back (the median where several share a signature)
        times: dict[tuple, list[float]] = {}
        for k, t in zip(self.kernels, self.ms):
            times.setdefault(signature(k), []).append(float(t))
        self._exact = {sig: float(np.median(v)) for sig, v in times.items()}
        # per kind: the samples' points in log-shape space, their op strings, and log(measured / linear)
        self._near: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for kind, c in self.coef.items():
            idx = [i for i, k in enumerate(self.kernels) if k["kind"] == kind]
            lin = np.array([_linear_row(self.kernels[i]) for i in idx]) @ c
            self._near[kind] = (np.stack([_shape_point(self.kernels[i]) for i in idx]),
                                np.array([str(self.kernels[i].get("ops")) for i in idx]),
                                np.log(self.ms[idx] / np.maximum(lin, 1e-6)))
        # pairs: each timed pair's time (the median where several share a signature), and per pair its
        # place in pair space and log(time after the producer / the kernel's own time)
        self._pair_exact: dict[tuple, float] = {}
        self._pair_near: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if self.pairs:
            ptimes: dict[tuple, list[float]] = {}
            for kp, k, t in self.pairs:
                ptimes.setdefault(pair_signature(kp, k), []).append(t)
            self._pair_exact = {sig: float(np.median(v)) for sig, v in ptimes.items()}
            firsts = {sig: (kp, k) for kp, k, _ in self.pairs for sig in [pair_signature(kp, k)]}
            pts, ops, ratio = [], [], []
            for sig, (kp, k) in firsts.items():
                if k["kind"] in self.coef:
                    pts.append(_pair_point(kp, k))
                    ops.append(f"{kp.get('ops')}>{k.get('ops')}")
                    ratio.append(math.log(self._pair_exact[sig] / max(self.predict(k), 1e-9)))
            if pts:
                self._pair_near = (np.stack(pts), np.array(ops), np.array(ratio))

    def after(self, producer: dict[str, Any], k: dict[str, Any]) -> float:
        """Predicted time (ms) of kernel `k` run right after `producer`, on what it just wrote: the pair's
        own time where it was timed; else k's own time (`predict`) times the ratio (time after the
        producer / time alone) of the timed pairs nearest in pair space (inverse-distance weighted, in
        log); k's own time where no pairs were timed."""
        exact = self._pair_exact.get(pair_signature(producer, k))
        if exact is not None:
            return exact
        alone = self.predict(k)
        if self._pair_near is None:
            return alone
        pts, ops, ratio = self._pair_near
        d = np.sqrt(((pts - _pair_point(producer, k)) ** 2).sum(axis=1)) + \
            np.where(ops == f"{producer.get('ops')}>{k.get('ops')}", 0, 0.5)
        near = np.argsort(d)[:PAIR_NEIGHBOURS]
        w = 1.0 / (d[near] + 1e-3) ** 2
        return alone * float(np.exp(np.clip((w * ratio[near]).sum() / w.sum(), -3, 3)))

    def predict(self, k: dict[str, Any]) -> float:
        """Predicted time (ms) of kernel `k` on the device the samples were measured on."""
        _check_kernel(k, "kernel")
        kind = k["kind"]
        if kind not in self.coef:
            raise DeviceError(f"no kernel of kind {kind!r} was measured; sample and time some "
                              f"(benchmarks/bench_predictor.py shows how)")
        exact = self._exact.get(signature(k))
        if exact is not None:
            return exact
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


def _calls(kernels: Sequence[dict[str, Any]]) -> int:
    return 1 + max((int(k.get("call", 0)) for k in kernels), default=0)


def _config_row(kernels: Sequence[dict[str, Any]], t: np.ndarray,
                serial: KernelRegressor | None = None) -> np.ndarray:
    """The config's features (CONFIG_FEATURES) from its kernels' predicted times `t` (`_times`: alone, after
    their producers): per kind, the sum of its kernels' times alone and, in a column of its own, what
    running after their producers changes (the fit decides how far to trust it: 0 = not at all, the
    kind's own coefficient = fully); `serial`: the kernels' 1-thread regressor, for a model timed at more
    threads (a chained config's kernels are summed at their 1-thread times, its pairs not used)."""
    per_kind = dict.fromkeys(KINDS, 0.0)
    delta = dict.fromkeys(KINDS, 0.0)
    calls = _calls(kernels)
    chained = 0.0
    if serial is not None and calls > 1:
        chained = sum(serial.predict(k) for k in kernels)
    else:
        for k, a, b in zip(kernels, t[0], t[1]):
            per_kind[k["kind"]] += a
            delta[k["kind"]] += b - a

    w = np.array([k.get("weight_bytes", 0) for k in kernels], float) / 2**20
    # weights of kernels that fit cache c alone (timed hot) while the config's do not (cold in the config)
    hinges = [float(w[w < c].sum()) if w.sum() > c else 0.0 for c in CACHE_HINGES_MIB]
    act = sum(max(k.get("bytes", 0) - k.get("weight_bytes", 0), 0) for k in kernels) / 2**20
    return np.array([*per_kind.values(), len(kernels), -len(kernels), calls, *hinges, chained, act,
                     *delta.values()], float)


def _times(kernels: Sequence[dict[str, Any]], reg: KernelRegressor) -> np.ndarray:
    """Each kernel's predicted times (ms), a row each: [0] alone (its own time or its kind's regressor),
    [1] after its producer (its "producer" index; `KernelRegressor.after`), equal to [0] for a kernel
    without one or a model without pairs. `_config_row` and `_config_point` read them."""
    out = np.empty((2, len(kernels)))
    for i, k in enumerate(kernels):
        p = k.get("producer")
        out[0, i] = reg.predict(k)
        out[1, i] = out[0, i]
        if reg.pairs and isinstance(p, int) and not isinstance(p, bool) and 0 <= p < len(kernels) and p != i:
            out[1, i] = reg.after(kernels[p], k)
    return out


def _config_point(kernels: Sequence[dict[str, Any]], t: np.ndarray) -> np.ndarray:
    """Where a config sits among configs (the neighbour correction's space), from its kernels' predicted
    times `t` (`_times`; those after their producers): half the log of their sum, each kind's share of
    it, log kernel count, chained or not, log1p weights MiB."""
    t = t[1]
    total = max(float(t.sum()), 1e-9)
    share = dict.fromkeys(KINDS, 0.0)
    for k, tk in zip(kernels, t):
        share[k["kind"]] += tk / total
    w = sum(k.get("weight_bytes", 0) for k in kernels) / 2**20
    return np.array([0.5 * math.log(total), *share.values(), math.log(len(kernels)),
                     float(_calls(kernels) > 1), math.log1p(w)])


def _correction(point: np.ndarray, points: np.ndarray, resid: np.ndarray, strength: float = 1.0) -> float:
    """exp of `strength` times the inverse-distance weighted mean residual of the CONFIG_NEIGHBOURS nearest
    configs."""
    if len(resid) == 0:
        return 1.0
    d = np.sqrt(((points - point) ** 2).sum(axis=1))
    near = np.argsort(d)[:CONFIG_NEIGHBOURS]
    w = 1.0 / (d[near] + CONFIG_DIST_FLOOR)
    return float(np.exp(strength * np.clip((w * resid[near]).sum() / w.sum(), -1.0, 1.0)))


@dataclass
class KernelPredictor:
    """A kernel regressor and the calibration that turns kernel sums into config latency, with the measured
    configs' residuals that correct it near them."""

    regressor: KernelRegressor
    coef: dict[str, float]
    device: str
    n_configs: int
    threads: int | None = None      # the intra-op threads everything was timed at, where known
    env: dict[str, Any] | None = None  # where it was timed ({"host": devices.host_info()}), where known
    serial: KernelRegressor | None = None   # the kernels timed at 1 thread, for chained configs (threads > 1)
    points: np.ndarray | None = None        # the measured configs' places in config space (_config_point)
    residuals: np.ndarray | None = None     # and log(measured / linear prediction) of each
    strength: float = 1.0                   # of the correction (one of STRENGTHS, chosen by the fit)

    def linear(self, kernels: Sequence[dict[str, Any]], t: np.ndarray | None = None) -> float:
        """The calibrated kernel sum (ms) before the neighbour correction (`t`: the kernels' predicted
        times, `_times`, where already known)."""
        row = _config_row(kernels, _times(kernels, self.regressor) if t is None else t, self.serial)
        return max(float(row @ np.array([self.coef.get(f, 0.0) for f in CONFIG_FEATURES])), 1e-6)

    def predict(self, kernels: Sequence[dict[str, Any]]) -> float:
        """Predicted p50 (ms) of a config that runs `kernels` (each with its engine `call` index)."""
        if not kernels:
            raise DeviceError("a config with no kernels: detect them with edgeflex.export.kernels")
        for i, k in enumerate(kernels):
            _check_kernel(k, f"kernel {i}")
        t = _times(kernels, self.regressor)
        base = self.linear(kernels, t)
        if self.points is None or self.residuals is None:
            return base
        return base * _correction(_config_point(kernels, t), self.points, self.residuals,
                                  self.strength)

    def to_json(self) -> dict[str, Any]:
        def samples(reg: KernelRegressor) -> list:
            return [[k, float(t)] for k, t in zip(reg.kernels, reg.ms)]

        return {"format": FORMAT, "format_version": FORMAT_VERSION, "device": self.device,
                "n_configs": self.n_configs, "threads": self.threads, "env": self.env,
                "coef": dict(self.coef), "kernel_samples": samples(self.regressor),
                "serial_kernel_samples": None if self.serial is None else samples(self.serial),
                "config_points": None if self.points is None else self.points.tolist(),
                "config_residuals": None if self.residuals is None else self.residuals.tolist(),
                "correction_strength": self.strength,
                "pair_samples": [[kp, k, float(t)] for kp, k, t in self.regressor.pairs or []]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KernelPredictor:
        version = d.get("format_version") if isinstance(d, dict) else None
        check_format(d, FORMAT, version if version in READS else FORMAT_VERSION, "kernel predictor")
        try:
            strength = float(d.get("correction_strength", 1.0))     # format 3: always 1
            if not 0 <= strength <= 1:
                raise ValueError(f"'correction_strength' {strength!r} (a number from 0 to 1)")
            serial = d.get("serial_kernel_samples")
            points, resid = d.get("config_points"), d.get("config_residuals")
            if points is not None:
                points, resid = np.asarray(points, float), np.asarray(resid, float)
                if points.ndim != 2 or resid.shape != (len(points),) or not np.isfinite(points).all() \
                        or not np.isfinite(resid).all():
                    raise ValueError("'config_points'/'config_residuals' (one finite row and residual per "
                                     "config)")
            pairs = d.get("pair_samples")         # format 5: [producer kernel, kernel, ms]
            if pairs is not None and not isinstance(pairs, list):
                raise ValueError("'pair_samples' (a list of [producer kernel, kernel, ms])")
            reg = KernelRegressor.fit([tuple(s) for s in d["kernel_samples"]], pairs)
            return cls(reg,
                       {f: float(d["coef"].get(f, 0.0)) for f in CONFIG_FEATURES}, str(d["device"]),
                       int(d["n_configs"]), None if d.get("threads") is None else int(d["threads"]),
                       dict(d["env"]) if d.get("env") else None,
                       None if serial is None else KernelRegressor.fit([tuple(s) for s in serial]),
                       points, resid, strength)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, DeviceError):
                raise
            raise DeviceError(f"kernel predictor: missing or malformed {e!s:.80} (expected 'device', "
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


def _strength(x: np.ndarray, y: np.ndarray, points: np.ndarray, ridge: float) -> float:
    """The correction's strength (STRENGTHS) under which a leave-one-out over these configs (calibration
    and residuals refitted without each; its kernels' times as given) puts the most within BAND_PCT %,
    ties to the lower median error; 1 where there are too few configs to tell."""
    n = len(y)
    if n < 4:
        return 1.0
    err = np.empty((len(STRENGTHS), n))
    for j in range(n):
        keep = np.arange(n) != j
        lin = np.maximum(x @ _solve(x[keep], y[keep], ridge), 1e-6)
        resid = np.log(y[keep] / lin[keep])
        for a, st in enumerate(STRENGTHS):
            err[a, j] = abs(lin[j] * _correction(points[j], points[keep], resid, st) / y[j] - 1) * 100
    score = [(float(np.mean(e <= BAND_PCT)), -float(np.median(e))) for e in err]
    return STRENGTHS[max(range(len(STRENGTHS)), key=lambda a: score[a])]


def _fit(reg: KernelRegressor, serial: KernelRegressor | None, ks: Sequence[Sequence[dict[str, Any]]],
         y: np.ndarray, ridge: float,
         correct: bool = True) -> tuple[dict[str, float], np.ndarray, np.ndarray, float]:
    """Calibration, the configs' points and residuals, and the correction's strength (its leave-one-out
    skipped without the correction: `correct=False`, strength 0)."""
    ts = [_times(k, reg) for k in ks]
    x = np.stack([_config_row(k, t, serial) for k, t in zip(ks, ts)])
    coef = _solve(x, y, ridge)
    points = np.stack([_config_point(k, t) for k, t in zip(ks, ts)])
    resid = np.log(y / np.maximum(x @ coef, 1e-6))
    strength = _strength(x, y, points, ridge) if correct else 0.0
    return dict(zip(CONFIG_FEATURES, map(float, coef))), points, resid, strength


def fit(kernel_samples: Sequence[KernelSample], config_samples: Sequence[ConfigSample], *,
        device: str = "host", ridge: float = RIDGE, threads: int | None = None,
        serial_samples: Sequence[KernelSample] | None = None,
        pair_samples: Sequence[tuple] | None = None) -> KernelPredictor:
    """Fit on kernels timed alone and configs timed whole, all measured on `device` (at `threads`);
    `serial_samples`: the same kernels timed at 1 thread, where `threads` > 1 (chained configs use them);
    `pair_samples`: (producer kernel, kernel, ms the kernel adds after it), from pairs timed as one graph."""
    ks, y, _ = _configs(config_samples)
    reg = KernelRegressor.fit(kernel_samples, pair_samples)
    serial = KernelRegressor.fit(serial_samples) if serial_samples else None
    coef, points, resid, strength = _fit(reg, serial, ks, y, ridge)
    return KernelPredictor(reg, coef, device, len(y), threads, None, serial, points, resid, strength)


def leave_one_out(kernel_samples: Sequence[tuple], config_samples: Sequence[ConfigSample], *,
                  ridge: float = RIDGE, band_pct: float = 10.0,
                  serial_samples: Sequence[tuple] | None = None, correct: bool = True,
                  pair_samples: Sequence[tuple] | None = None) -> dict[str, Any]:
    """For each config: drop it and every kernel sample seen only in it (kernel_samples and serial_samples
    are (kernel, ms, labels of the configs it came from); none = a sampled shape, always kept; pair_samples
    (producer, kernel, ms, labels) likewise), refit,
    predict it (the correction's strength chosen on the other configs alone). `correct=False`: without the
    config-neighbour correction (to show what it adds). Same
    summary as `devices.predictor.leave_one_out`."""
    ks, y, labels = _configs(config_samples)
    if len(y) < 3:
        raise DeviceError(f"leave-one-out needs at least 3 config samples, got {len(y)}")

    def kept(samples: Sequence[tuple], lab: str, n: int = 2) -> list[tuple]:
        return [s[:n] for s in samples if len(s) <= n or not s[n] or set(s[n]) - {lab}]

    pred = np.empty(len(y))
    for i, lab in enumerate(labels):
        reg = KernelRegressor.fit(kept(kernel_samples, lab),
                                  kept(pair_samples, lab, 3) if pair_samples else None)
        serial = KernelRegressor.fit(kept(serial_samples, lab)) if serial_samples else None
        keep = [j for j in range(len(y)) if j != i]
        coef, points, resid, strength = _fit(reg, serial, [ks[j] for j in keep], y[keep], ridge, correct)
        model = KernelPredictor(reg, coef, "loo", len(keep), None, None, serial,
                                points if correct else None, resid if correct else None, strength)
        pred[i] = model.predict(ks[i])
    return loo_summary(labels, y, pred, band_pct)


__all__ = ["CONFIG_FEATURES", "KernelPredictor", "KernelRegressor", "fit", "in_context", "leave_one_out",
           "signature"]
