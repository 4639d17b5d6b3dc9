"""The device catalogue: described devices, one TOML file each in `devices/catalog/` (data, not code), every
figure with the public source it came from; and `host`, this machine, detected (read off /proc and /sys)
and measured (a small numpy matmul and a memory copy, cached), each figure marked as such.

Owns reading and checking device files and the `Device` record. Not measurement of bundles
(`devices/measure.py`) nor latency prediction (`devices/predictor.py`). numpy and stdlib only.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from edgeflex.errors import DeviceError

CATALOG_DIR = Path(__file__).resolve().parent / "catalog"
HOST = "host"
KINDS = ("edge-soc", "sbc", "phone-soc", "datacenter-gpu", "host")
UNITS = ("cpu", "gpu", "npu")
PRECISIONS = ("fp32", "fp16", "int8")
MODE_NUMBERS = {"id": int, "watts": float, "cpu_online": int, "cpu_max_mhz": float, "gpu_max_mhz": float,
                "emc_max_mhz": float}


@dataclass(frozen=True)
class Source:
    """Where figures come from: a public page (catalogue), or this machine (host: detected / measured)."""

    url: str
    title: str
    seen: str           # what was actually read, and how, when the figures were written down


@dataclass(frozen=True)
class Figure:
    """One number and its provenance: the sources it rests on, what they say, and how it was derived."""

    value: float | int
    source: tuple[str, ...]
    says: str
    derived: str | None = None


@dataclass(frozen=True)
class Cluster:
    """A group of identical cores at one clock (big.LITTLE SoCs have several)."""

    core: str
    cores: int
    max_ghz: float
    fp32_flops_per_cycle: int


@dataclass(frozen=True)
class ComputeUnit:
    """A CPU or GPU: cores, top clock, peak GFLOP/s (GOP/s for int8) per precision, and, for a GPU with its
    own memory, that memory's size and bandwidth."""

    model: str
    cores: int
    max_ghz: float | None
    peak_gflops: dict[str, float]
    clusters: tuple[Cluster, ...] = ()
    memory_gb: float | None = None
    bandwidth_gbs: float | None = None


@dataclass(frozen=True)
class PowerMode:
    name: str
    id: int | None = None
    watts: float | None = None          # None: no power cap (MAXN)
    cpu_online: int | None = None
    cpu_max_mhz: float | None = None
    gpu_max_mhz: float | None = None
    emc_max_mhz: float | None = None


@dataclass(frozen=True)
class BackendTarget:
    """An engine that serves the device, on which unit, with its provider (ORT) or target (TVM) as data."""

    engine: str
    unit: str
    provider: str | None = None
    target: dict[str, Any] | None = None
    note: str | None = None

    def describe(self) -> str:
        what = self.provider or (json.dumps(self.target, separators=(",", ":")) if self.target else "")
        return f"{self.engine}:{self.unit}" + (f" {what}" if what else "")


@dataclass(frozen=True)
class Device:
    """A described device. `figures` maps each figure's dotted path (e.g. "cpu.peak_gflops.fp32") to its
    provenance; `obtained` is "catalogue" (from a device file) or "detected" (host)."""

    name: str
    title: str
    kind: str
    arch: str
    cpu: ComputeUnit
    gpu: ComputeUnit | None
    memory_gb: float
    bandwidth_gbs: float
    power_modes: tuple[PowerMode, ...]
    power_note: str
    backends: tuple[BackendTarget, ...]
    sources: dict[str, Source]
    figures: dict[str, Figure]
    obtained: str = "catalogue"
    file: str | None = None
    mode: str | None = None             # the power mode this description is scaled to (see `in_mode`)

    def unit(self, unit: str = "cpu") -> ComputeUnit:
        if unit == "cpu":
            return self.cpu
        if unit == "gpu" and self.gpu is not None:
            return self.gpu
        have = "cpu" + (", gpu" if self.gpu is not None else "")
        raise DeviceError(f"device {self.name!r} has no described {unit!r} unit; it has: {have}")

    def peak_gflops(self, unit: str = "cpu", precision: str = "fp32") -> float:
        """Peak GFLOP/s (GOP/s for int8) of `unit` at `precision`."""
        u = self.unit(unit)
        if precision not in u.peak_gflops:
            raise DeviceError(f"device {self.name!r} {unit} has no {precision} peak; it has: "
                              f"{', '.join(u.peak_gflops)}")
        return u.peak_gflops[precision]

    def memory_bandwidth_gbs(self, unit: str = "cpu") -> float:
        """Bandwidth (GB/s) of the memory `unit` reads: the GPU's own memory if it has one, else main
        memory."""
        u = self.unit(unit)
        return u.bandwidth_gbs if u.bandwidth_gbs is not None else self.bandwidth_gbs

    def in_mode(self, name: str) -> Device:
        """This device scaled to power mode `name`: CPU peak by online cores and clock cap, GPU peak by its
        clock cap, bandwidth by the memory clock cap against the fastest mode's. Derived, not measured."""
        mode = next((m for m in self.power_modes if m.name == name), None)
        if mode is None:
            modes = ", ".join(m.name for m in self.power_modes) or "none"
            raise DeviceError(f"device {self.name!r} has no power mode {name!r}; it has: {modes}")
        figures = dict(self.figures)

        def scaled(u: ComputeUnit, prefix: str, scale: float, how: str, **changes) -> ComputeUnit:
            peaks = {p: v * scale for p, v in u.peak_gflops.items()}
            for p, v in peaks.items():
                figures[f"{prefix}.peak_gflops.{p}"] = Figure(round(v, 1), ("derived",), f"power mode {name}",
                                                              f"full peak x {how}")
            return dataclasses.replace(u, peak_gflops=peaks, **changes)

        cpu = self.cpu
        if mode.cpu_online or mode.cpu_max_mhz:
            online = mode.cpu_online or cpu.cores
            ghz = (mode.cpu_max_mhz / 1e3) if mode.cpu_max_mhz else cpu.max_ghz
            scale = online / cpu.cores * (ghz / cpu.max_ghz if cpu.max_ghz else 1.0)
            cpu = scaled(cpu, "cpu", scale, f"{online}/{cpu.cores} cores x {ghz:g}/{cpu.max_ghz:g} GHz",
                         cores=online, max_ghz=ghz)
        gpu = self.gpu
        if gpu is not None and mode.gpu_max_mhz and gpu.max_ghz:
            ghz = mode.gpu_max_mhz / 1e3
            gpu = scaled(gpu, "gpu", ghz / gpu.max_ghz, f"{ghz:g}/{gpu.max_ghz:g} GHz", max_ghz=ghz)
        bandwidth = self.bandwidth_gbs
        top_emc = max((m.emc_max_mhz for m in self.power_modes if m.emc_max_mhz), default=None)
        if mode.emc_max_mhz and top_emc:
            bandwidth = self.bandwidth_gbs * mode.emc_max_mhz / top_emc
            figures["memory.bandwidth_gbs"] = Figure(round(bandwidth, 2), ("derived",), f"power mode {name}",
                                                     f"listed bandwidth x EMC {mode.emc_max_mhz:g} / "
                                                     f"{top_emc:g} MHz")
        sources = {**self.sources, "derived": Source("edgeflex:devices/catalog.py#Device.in_mode",
                                                     "scaled from this file's figures to a power mode's caps",
                                                     "derived, not measured")}
        return dataclasses.replace(self, cpu=cpu, gpu=gpu, bandwidth_gbs=bandwidth, figures=figures,
                                   sources=sources, mode=name, title=f"{self.title} [{name}]")

    def to_json(self) -> dict[str, Any]:
        """Everything, provenance included, as plain JSON types."""
        d = dataclasses.asdict(self)
        d["figures"] = {k: {kk: vv for kk, vv in dataclasses.asdict(f).items() if vv is not None}
                        | {"source": list(f.source)} for k, f in self.figures.items()}
        return json.loads(json.dumps(d))


# --- reading device files ------------------------------------------------------------------------------

class _Reader:
    """Reads one parsed device file, checking presence, type and provenance; errors name file and field."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data
        self.figures: dict[str, Figure] = {}
        self.sources: dict[str, Source] = {}

    def fail(self, field_: str, msg: str) -> NoReturn:
        raise DeviceError(f"device file {self.path}: field {field_!r} {msg}")

    def _get(self, parent: dict, key: str, where: str, required: bool, what: str) -> tuple[Any, str]:
        path = f"{where}.{key}" if where else key
        if parent.get(key) is None and required:
            self.fail(path, f"is missing; it must be {what}")
        return parent.get(key), path

    def table(self, parent: dict, key: str, where: str, *, required: bool = True) -> dict | None:
        v, path = self._get(parent, key, where, required, "a table (see devices/catalog/rpi5.toml)")
        if v is not None and not isinstance(v, dict):
            self.fail(path, f"must be a table, got {type(v).__name__}")
        return v

    def text(self, parent: dict, key: str, where: str, *, required: bool = True) -> str | None:
        v, path = self._get(parent, key, where, required, "a string")
        if v is not None and (not isinstance(v, str) or not v.strip()):
            self.fail(path, f"must be a non-empty string, got {v!r}")
        return v

    def number(self, v: Any, path: str, typ: type) -> float | int:
        ok = isinstance(v, int) and not isinstance(v, bool) if typ is int else \
            isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            what = "an integer" if typ is int else "a number"
            self.fail(path, f"must be {what}, got {type(v).__name__} {v!r}")
        if v < 0 or (isinstance(v, float) and not np.isfinite(v)):
            self.fail(path, f"must be a finite number >= 0, got {v!r}")
        return v

    def cites(self, src: Any, path: str) -> tuple[str, ...]:
        ids = (src,) if isinstance(src, str) else src
        if not isinstance(ids, list | tuple) or not ids or not all(isinstance(s, str) for s in ids):
            self.fail(path, f"source must be a source id or a list of them, got {src!r}")
        for s in ids:
            if s not in self.sources:
                self.fail(path, f"cites source {s!r}, which [sources] does not define (it has: "
                                f"{', '.join(self.sources) or 'none'})")
        return tuple(ids)

    def figure(self, parent: dict, key: str, where: str, typ: type = float, *,
               required: bool = True) -> float | int | None:
        """A sourced number: {value = ..., source = "id" | ["id", ...], says = "...", derived = "..."}."""
        path = f"{where}.{key}"
        v = parent.get(key)
        if v is None:
            if required:
                self.fail(path, 'is missing; give it as {value = ..., source = "<id>", says = "..."}')
            return None
        if not isinstance(v, dict):
            self.fail(path, 'has no source: give it as {value = ..., source = "<id>", says = "..."}, got '
                            f"a bare {type(v).__name__}")
        unknown = set(v) - {"value", "source", "says", "derived"}
        if unknown:
            self.fail(path, f"has unknown keys {sorted(unknown)}; expected value, source, says, derived")
        if "value" not in v:
            self.fail(path + ".value", "is missing")
        value = self.number(v["value"], path + ".value", typ)
        if "source" not in v:
            self.fail(path + ".source", "is missing: every figure names its source")
        src = self.cites(v["source"], path + ".source")
        says = self.text(v, "says", path)
        derived = self.text(v, "derived", path, required=False)
        self.figures[path] = Figure(value, src, says, derived)
        return value

    def check_keys(self, table: dict, where: str, allowed: set[str]) -> None:
        unknown = set(table) - allowed
        if unknown:
            self.fail(f"{where}.{sorted(unknown)[0]}" if where else sorted(unknown)[0],
                      f"is not a known field here; expected one of: {', '.join(sorted(allowed))}")


def _read_unit(r: _Reader, t: dict, where: str) -> ComputeUnit:
    model = r.text(t, "model", where)
    cores = r.figure(t, "cores", where, int)
    max_ghz = r.figure(t, "max_ghz", where)
    clusters = []
    raw = t.get("clusters", [])
    if not isinstance(raw, list):
        r.fail(f"{where}.clusters", "must be an array of tables ([[...clusters]])")
    for i, c in enumerate(raw):
        cw = f"{where}.clusters[{i}]"
        if not isinstance(c, dict):
            r.fail(cw, "must be a table")
        r.check_keys(c, cw, {"core", "cores", "max_ghz", "fp32_flops_per_cycle"})
        clusters.append(Cluster(r.text(c, "core", cw), r.figure(c, "cores", cw, int),
                                r.figure(c, "max_ghz", cw), r.figure(c, "fp32_flops_per_cycle", cw, int)))
    if clusters and sum(c.cores for c in clusters) != cores:
        r.fail(f"{where}.clusters", f"count {sum(c.cores for c in clusters)} cores, but {where}.cores says "
                                    f"{cores}")
    peaks_t = r.table(t, "peak_gflops", where)
    peaks = {p: r.figure(peaks_t, p, f"{where}.peak_gflops", required=(p == "fp32")) for p in PRECISIONS}
    r.check_keys(peaks_t, f"{where}.peak_gflops", set(PRECISIONS))
    mem = r.table(t, "memory", where, required=False)
    size = bw = None
    if mem is not None:
        size = r.figure(mem, "size_gb", f"{where}.memory")
        bw = r.figure(mem, "bandwidth_gbs", f"{where}.memory")
        r.check_keys(mem, f"{where}.memory", {"size_gb", "bandwidth_gbs"})
    r.check_keys(t, where, {"model", "cores", "max_ghz", "clusters", "peak_gflops", "memory"})
    return ComputeUnit(model, cores, max_ghz, {p: float(v) for p, v in peaks.items() if v is not None},
                       tuple(clusters), size, bw)


def _read_mode(r: _Reader, m: Any, where: str) -> PowerMode:
    if not isinstance(m, dict):
        r.fail(where, "must be a table")
    r.check_keys(m, where, {"name", "source", "says", *MODE_NUMBERS})
    name = r.text(m, "name", where)
    if "source" not in m:
        r.fail(f"{where}.source", "is missing: a power mode names the source of its figures")
    src = r.cites(m["source"], f"{where}.source")
    says = r.text(m, "says", where)
    values = {}
    for key, typ in MODE_NUMBERS.items():
        if key in m:
            values[key] = r.number(m[key], f"{where}.{key}", typ)
            r.figures[f"{where}.{key}"] = Figure(values[key], src, says)
    return PowerMode(name, **values)


def _read_backend(r: _Reader, b: Any, where: str) -> BackendTarget:
    if not isinstance(b, dict):
        r.fail(where, "must be a table")
    r.check_keys(b, where, {"engine", "unit", "provider", "target", "note"})
    unit = r.text(b, "unit", where)
    if unit not in UNITS:
        r.fail(f"{where}.unit", f"must be one of {', '.join(UNITS)}, got {unit!r}")
    target = b.get("target")
    if target is not None and (not isinstance(target, dict) or "kind" not in target):
        r.fail(f"{where}.target", f"must be a TVM target table with a 'kind', got {target!r}")
    return BackendTarget(r.text(b, "engine", where), unit, r.text(b, "provider", where, required=False),
                         target,                          r.text(b, "note", where, required=False))


def load_device_file(path: str | os.PathLike) -> Device:
    """Read and check one device file; DeviceError naming the file and the field on any fault."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DeviceError(f"device file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DeviceError(f"device file {path}: not valid TOML ({e}); fix its syntax") from None
    r = _Reader(path, data)
    name = r.text(data, "name", "")
    if name != path.stem:
        r.fail("name", f"is {name!r} but the file is {path.name}; they must match (files are found by "
                       "name)")
    kind = r.text(data, "kind", "")
    if kind not in KINDS or kind == "host":
        r.fail("kind", f"must be one of {', '.join(k for k in KINDS if k != 'host')}, got {kind!r}")
    for sid, s in r.table(data, "sources", "").items():
        where = f"sources.{sid}"
        if not isinstance(s, dict):
            r.fail(where, "must be a table with url, title, seen")
        r.check_keys(s, where, {"url", "title", "seen"})
        url = r.text(s, "url", where)
        if not url.startswith(("https://", "http://")):
            r.fail(f"{where}.url", f"must be a public http(s) URL, got {url!r}")
        r.sources[sid] = Source(url, r.text(s, "title", where), r.text(s, "seen", where))
    cpu = _read_unit(r, r.table(data, "cpu", ""), "cpu")
    gpu_t = r.table(data, "gpu", "", required=False)
    gpu = _read_unit(r, gpu_t, "gpu") if gpu_t is not None else None
    mem = r.table(data, "memory", "")
    size, bw = r.figure(mem, "size_gb", "memory"), r.figure(mem, "bandwidth_gbs", "memory")
    r.check_keys(mem, "memory", {"size_gb", "bandwidth_gbs"})
    modes = data.get("power_modes", [])
    if not isinstance(modes, list):
        r.fail("power_modes", "must be an array of tables ([[power_modes]])")
    power = r.table(data, "power", "")
    r.check_keys(power, "power", {"note"})
    backends = data.get("backends")
    if not isinstance(backends, list) or not backends:
        r.fail("backends", "is missing or empty; list the engines that serve the device ([[backends]])")
    r.check_keys(data, "", {"name", "title", "kind", "arch", "sources", "cpu", "gpu", "memory", "power_modes",
                            "power", "backends"})
    return Device(name=name, title=r.text(data, "title", ""), kind=kind, arch=r.text(data, "arch", ""),
                  cpu=cpu, gpu=gpu, memory_gb=float(size), bandwidth_gbs=float(bw),
                  power_modes=tuple(_read_mode(r, m, f"power_modes[{i}]") for i, m in enumerate(modes)),
                  power_note=r.text(power, "note", "power"),
                  backends=tuple(_read_backend(r, b, f"backends[{i}]") for i, b in enumerate(backends)),
                  sources=dict(r.sources), figures=dict(r.figures), obtained="catalogue", file=str(path))


def catalog_names(dir: str | os.PathLike | None = None) -> list[str]:
    """The described devices' names (file stems), without reading the files."""
    d = Path(dir) if dir is not None else CATALOG_DIR
    return sorted(p.stem for p in d.glob("*.toml"))


def load_catalog(dir: str | os.PathLike | None = None) -> dict[str, Device]:
    """Every device file in `dir` (default: the shipped catalogue), checked. `host` is not a file: see
    `detect_host`."""
    d = Path(dir) if dir is not None else CATALOG_DIR
    if not d.is_dir():
        raise DeviceError(f"device catalogue {d} is not a directory")
    return {name: load_device_file(d / f"{name}.toml") for name in catalog_names(d)}


def known_names(dir: str | os.PathLike | None = None) -> list[str]:
    return [HOST, *catalog_names(dir)]


def get_device(name: str, *, dir: str | os.PathLike | None = None, measure: bool = True) -> Device:
    """The device called `name`: `host` (detected here, and measured unless measure=False) or a catalogue
    file. Only that file is read, so one broken file does not hide the others."""
    if name == HOST:
        return detect_host(measure=measure)
    d = Path(dir) if dir is not None else CATALOG_DIR
    path = d / f"{name}.toml"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        raise DeviceError(f"unknown device {name!r}; known: {', '.join(known_names(d))}")
    return load_device_file(path)


# --- host: detected and measured -----------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    for ln in (_read("/proc/cpuinfo") or "").splitlines():
        if ":" in ln:
            k, v = (s.strip() for s in ln.split(":", 1))
            out.setdefault(k, v)
    return out


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cache_dir() -> Path:
    if os.environ.get("EDGEFLEX_CACHE"):
        return Path(os.environ["EDGEFLEX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeflex"


_PEAK_PROBE = """
import json, sys, time
import numpy as np
n, copy_mib, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rng = np.random.default_rng(0)
a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
c = np.empty((n, n), np.float32)
np.matmul(a, b, out=c)
best, t_end = float("inf"), time.perf_counter() + seconds
while time.perf_counter() < t_end:
    t = time.perf_counter()
    np.matmul(a, b, out=c)
    best = min(best, time.perf_counter() - t)
src = np.ones(copy_mib << 18, np.float32)
dst = np.empty_like(src)
np.copyto(dst, src)
copy_best = float("inf")
for _ in range(5):
    t = time.perf_counter()
    np.copyto(dst, src)
    copy_best = min(copy_best, time.perf_counter() - t)
print(json.dumps({"core_gflops": 2 * n**3 / best / 1e9, "copy_gbs": 2 * src.nbytes / copy_best / 1e9}))
"""


def measure_host_peaks(*, n: int = 384, copy_mib: int = 64, seconds: float = 0.3) -> dict[str, Any]:
    """Rough peaks of this machine, measured in a fresh process with one BLAS thread: float32 matmul
    GFLOP/s of one core (n x n, best time), and memory-copy GB/s (copy_mib MiB, bytes read + written).

    NOTE: one thread on purpose: on a shared machine a multi-threaded BLAS spins against the other
    processes and measures the load (on a loaded 2-core host, a small fraction of the one-thread figure)."""
    env = {**os.environ, **{k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(n), str(copy_mib), str(seconds)], env=env,
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise DeviceError(f"measuring this host's peaks failed: {out.stderr.strip().splitlines()[-1:]}")
    m = json.loads(out.stdout.strip().splitlines()[-1])
    return {**m, "matmul_n": n, "copy_mib": copy_mib,
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def detect_host(*, measure: bool = True, cache_dir: str | os.PathLike | None = None,
                refresh: bool = False) -> Device:
    """This machine as a Device: CPU model, usable cores, top clock (cpufreq, else /proc/cpuinfo), memory
    (/proc/meminfo); with measure=True also measured peak fp32 GFLOP/s and copy bandwidth, cached per
    machine in `cache_dir` (default $EDGEFLEX_CACHE or ~/.cache/edgeflex) unless refresh=True."""
    info = _cpuinfo()
    model = (info.get("model name") or info.get("Model") or info.get("Hardware") or platform.processor()
             or "unknown")
    cores = usable_cores()
    sources = {"detected": Source("file:///proc/cpuinfo", "this machine: /proc/cpuinfo, /proc/meminfo, "
                                  "/sys/devices/system/cpu, sched_getaffinity", "read at run time"),
               "measured": Source("edgeflex:devices/catalog.py#measure_host_peaks",
                                  "this machine, measured by edgeflex.devices.catalog.measure_host_peaks",
                                  "numpy float32 matmul (one thread) and a memory copy, best of several")}
    figures = {"cpu.cores": Figure(cores, ("detected",), f"{cores} usable by this process "
                                   f"({os.cpu_count()} logical)")}
    ghz = None
    khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if khz and khz.strip().isdigit():
        ghz = int(khz) / 1e6
        figures["cpu.max_ghz"] = Figure(ghz, ("detected",), f"cpuinfo_max_freq {khz.strip()} kHz")
    elif info.get("cpu MHz"):
        ghz = float(info["cpu MHz"]) / 1e3
        figures["cpu.max_ghz"] = Figure(ghz, ("detected",), f"/proc/cpuinfo cpu MHz {info['cpu MHz']} "
                                        "(the current or nominal clock, not a guaranteed maximum)")
    mem_kb = next((int(ln.split()[1]) for ln in (_read("/proc/meminfo") or "").splitlines()
                   if ln.startswith("MemTotal:")), 0)
    memory_gb = mem_kb / 2**20
    figures["memory.size_gb"] = Figure(round(memory_gb, 2), ("detected",), f"MemTotal {mem_kb} kB (GiB)")
    peaks: dict[str, float] = {}
    bandwidth = float("nan")
    if measure:
        m = _cached_peaks(model, cores, mem_kb, cache_dir, refresh)
        peaks["fp32"] = round(m["core_gflops"] * cores, 1)
        bandwidth = round(m["copy_gbs"], 2)
        load = m.get("load_average")
        when = f"measured {m['date']}" + (f", load average {load[0]:.2f}" if load else "")
        figures["cpu.peak_gflops.fp32"] = Figure(
            peaks["fp32"], ("measured",), when, f"numpy float32 {m['matmul_n']}^3 matmul on one BLAS thread: "
            f"{m['core_gflops']:.1f} GFLOP/s (2n^3 / best time) x {cores} usable cores")
        figures["memory.bandwidth_gbs"] = Figure(bandwidth, ("measured",), when,
                                                 f"np.copyto of {m['copy_mib']} MiB, (read + write bytes) / "
                                                 "best time")
    cpu = ComputeUnit(model, cores, ghz, peaks)
    backends = (BackendTarget("onnxruntime", "cpu", "CPUExecutionProvider"),)
    return Device(name=HOST, title=f"this machine ({model})", kind="host", arch=platform.machine(), cpu=cpu,
                  gpu=None, memory_gb=memory_gb, bandwidth_gbs=bandwidth, power_modes=(),
                  power_note="detected host: power modes are not read", backends=backends, sources=sources,
                  figures=figures, obtained="detected" + (" + measured" if measure else ""))


def _cached_peaks(model: str, cores: int, mem_kb: int, cache_dir, refresh: bool) -> dict[str, Any]:
    key = {"cpu": model, "cores": cores, "mem_kb": mem_kb, "machine": platform.node()}
    path = Path(cache_dir) if cache_dir is not None else _cache_dir()
    path = path / "host-peaks.json"
    if not refresh:
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["peaks"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    peaks = measure_host_peaks()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "peaks": peaks}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass                        # a read-only home: measure again next time
    return peaks


# --- a table for `edgeflex devices` ---------------------------------------------------------------------

ROW_COLUMNS = ("device", "kind", "cpu", "cpu fp32 GFLOP/s", "gpu", "gpu fp16 TFLOP/s", "memory GB",
               "bandwidth GB/s", "power modes", "backends", "figures")


def _unit_text(u: ComputeUnit) -> str:
    if u.clusters and len({(c.core, c.max_ghz) for c in u.clusters}) > 1:
        return " + ".join(f"{c.cores}x {c.core} {c.max_ghz:g} GHz" for c in u.clusters)
    ghz = f" {u.max_ghz:.3g} GHz" if u.max_ghz else ""
    return f"{u.cores}x {u.model}{ghz}"


def list_rows(*, dir: str | os.PathLike | None = None, host: bool = True,
              measure: bool = True) -> list[dict[str, str]]:
    """One row per device (host first, if asked), keys in ROW_COLUMNS order, values as display strings."""
    devices = ([detect_host(measure=measure)] if host else []) + list(load_catalog(dir).values())
    rows = []
    for d in devices:
        gpu, measured = d.gpu, d.kind == "host"
        n_src = len({s for f in d.figures.values() for s in f.source})
        figs = (f"{len(d.figures)} figures, {n_src} sources" if d.obtained == "catalogue"
                else f"{d.obtained} ({len(d.figures)} figures)")
        rows.append({
            "device": d.name, "kind": d.kind, "cpu": _unit_text(d.cpu),
            "cpu fp32 GFLOP/s": (f"{d.cpu.peak_gflops['fp32']:.1f}" + (" (measured)" if measured else "")
                                 if "fp32" in d.cpu.peak_gflops else "-"),
            "gpu": _unit_text(gpu) if gpu else "-",
            "gpu fp16 TFLOP/s": (f"{gpu.peak_gflops['fp16'] / 1e3:.1f}" if gpu and "fp16" in gpu.peak_gflops
                                 else "-"),
            "memory GB": f"{d.memory_gb:.1f}" if d.kind == "host" else f"{d.memory_gb:g}",
            "bandwidth GB/s": "-" if not np.isfinite(d.bandwidth_gbs) else f"{d.bandwidth_gbs:g}"
            + (" (measured copy)" if d.kind == "host" else ""),
            "power modes": ", ".join(m.name for m in d.power_modes) or "-",
            "backends": ", ".join(sorted({f"{b.engine}:{b.unit}" for b in d.backends})),
            "figures": figs,
        })
    return rows


def render_rows(rows: list[dict[str, str]], columns: tuple[str, ...] = ROW_COLUMNS) -> str:
    """A plain-text table of `rows` (what `edgeflex devices` prints)."""
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(r[c].ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(ln.rstrip() for ln in lines)


__all__ = ["CATALOG_DIR", "HOST", "BackendTarget", "Cluster", "ComputeUnit", "Device", "Figure", "PowerMode",
           "ROW_COLUMNS", "Source", "catalog_names", "detect_host", "get_device", "known_names", "list_rows",
           "load_catalog", "load_device_file", "measure_host_peaks", "render_rows", "usable_cores"]
