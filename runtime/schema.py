"""The manifest schema and seal: every manifest field a reader uses (runtime, backends, `edgeflex info`) is
checked when a bundle is opened, so an edited or corrupted manifest fails in `Bundle.open` with one line that
names the field, its value and what was expected, never later as a raw TypeError or a silent wrong level.

The manifest carries `manifest_sha256`, the sha256 of its canonical JSON without that key (`seal_manifest`
sets it when a bundle is written, `check_seal` checks it at open): the files' sha256s are only as good as the
manifest that lists them. JSON files inside the bundle (profiles, TVM engine records) are parsed with
`load_json` and checked by `check_profile` / `check_engine_record` where they are read. NumPy only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
import sys
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from edgeflex.devices.precision import PRECISIONS  # what a config may run in (`Config.precision`)
from edgeflex.errors import BundleError

SEAL = "manifest_sha256"
MAX_MANIFEST_BYTES = 64 << 20          # a real manifest is kilobytes; refuse to parse anything this big
# The dtypes ONNX Runtime / TVM run that a bundle may declare (bfloat16 has no NumPy dtype: not accepted).
DTYPES = ("float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
          "uint64", "bool")
# The tensor index stores NumPy's canonical `dtype.str` ("<f4", "|u1"): native little-endian only.
TENSOR_DTYPES = {np.dtype(n).str: np.dtype(n) for n in DTYPES}
DRESS_MAX_LEVELS = 4                   # 2-bit level codes (kernels.rowsparse.MAX_LEVELS)
# The weight store's rule (export.elastic.WeightStore): every tensor starts on a 64-byte boundary and no two
# overlap, so a shifted offset cannot still point inside its file at other bytes of the right size.
TENSOR_ALIGN = 64
FITS_FORMS = {"folded": 1, "lowrank": 2}   # elastic FITS forms -> how many GEMM operands are derived
INT_MAX = 2**63 - 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MISSING = object()
_repr = reprlib.Repr()             # values in messages: short, one line
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 48, 48, 4, 3, 2


# --- seal --------------------------------------------------------------------------------------------------

def manifest_digest(m: dict[str, Any]) -> str:
    """sha256 hex of the manifest's canonical JSON, without its seal."""
    body = {k: v for k, v in m.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
                          .encode()).hexdigest()


def seal_manifest(m: dict[str, Any]) -> dict[str, Any]:
    """A copy of `m` with `manifest_sha256` set (what every writer of a manifest calls last)."""
    return {**{k: v for k, v in m.items() if k != SEAL}, SEAL: manifest_digest(m)}


def check_seal(mpath: Any, m: dict[str, Any]) -> None:
    if SEAL not in m:
        raise BundleError(f"{mpath}: manifest has no checksum: written by an older edgeflex or edited; "
                          "re-export")
    if m[SEAL] != manifest_digest(m):
        raise BundleError(f"{mpath}: manifest.json fails its checksum: edited after export; re-export the "
                          "bundle")


# --- reading JSON safely -----------------------------------------------------------------------------------

def _no_dup_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        dup = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise ValueError(f"duplicate key {dup!r}")
    return d


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_json(where: Any, data: bytes, fix: str = "re-export the bundle", spec: Check | None = None) -> Any:
    """Parse a bundle's JSON (UTF-8; no NaN/Infinity, no duplicate keys) and check it against `spec`, or
    raise one-line BundleError."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_no_dup_keys, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise BundleError(f"{where}: corrupted, not valid JSON ({msg}); {fix}") from None
    if spec is not None:
        _run(where, fix, lambda: spec(value, ""))
    return value


# --- checkers: each is fn(value, path) and raises _Bad ------------------------------------------------------

class _Bad(Exception):
    def __init__(self, path: str, value: Any, expected: str):
        super().__init__(path)
        self.path, self.value, self.expected = path, value, expected

    def message(self, where: Any, fix: str) -> str:
        shown = "missing" if self.value is _MISSING else f"{_repr.repr(self.value)}"
        return f"{where}: {self.path or 'the top level'} is {shown}, expected {self.expected}; {fix}"


Check = Callable[[Any, str], None]


def _is_int(v: Any) -> bool:
    return type(v) is int                      # not bool: True == 1 in Python


def _int(lo: int = 0, hi: int = INT_MAX) -> Check:
    """An int in lo..hi; by default at most int64's largest (readers divide counts as floats: 10**400
    would overflow there)."""
    def check(v, path):
        if not _is_int(v) or not lo <= v <= hi:
            _fail(path, v, f"an int in {lo}..{'2**63-1' if hi == INT_MAX else hi}")
    return check


def _num(lo: float = -math.inf) -> Check:
    """A number a float can hold (int or float; not NaN, not infinite, no int past 1.8e308)."""
    def check(v, path):
        if type(v) not in (int, float) or not abs(v) <= sys.float_info.max or v < lo:
            _fail(path, v, "a finite number" + (f" >= {lo}" if lo > -math.inf else ""))
    return check


def _str(v: Any, path: str) -> None:
    if not isinstance(v, str) or not v:
        _fail(path, v, "a non-empty string")


def _one_of(*choices: Any) -> Check:
    def check(v, path):
        if not any(type(v) is type(c) and v == c for c in choices):
            _fail(path, v, "one of " + ", ".join(map(repr, choices)))
    return check


def _opt(inner: Check) -> Check:
    def check(v, path):
        if v is not None:
            inner(v, path)
    return check


def _list(item: Check, *, nonempty: bool = True, unique: Callable[[Any], Any] | None = None) -> Check:
    def check(v, path):
        if not isinstance(v, list) or (nonempty and not v):
            _fail(path, v, "a non-empty list" if nonempty else "a list")
        seen = set()
        for i, x in enumerate(v):
            item(x, f"{path}[{i}]")
            if unique is not None:
                if unique(x) in seen:
                    _fail(f"{path}[{i}]", unique(x), "a name not used before in the list")
                seen.add(unique(x))
    return check


def _dict(value: Check, key: Check = _str) -> Check:
    def check(v, path):
        if not isinstance(v, dict):
            _fail(path, v, "an object")
        for k, x in v.items():
            key(k, f"{path} key")
            value(x, f"{path}[{k!r}]")
    return check


def _obj(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    """An object with these keys (others are allowed and ignored)."""
    def check(v, path):
        if not isinstance(v, dict):
            _fail(path, v, "an object")
        for k, c in required.items():
            c(v.get(k, _MISSING), f"{path}.{k}" if path else k)
        for k, c in (optional or {}).items():
            if k in v:
                c(v[k], f"{path}.{k}" if path else k)
    return check


def _fail(path: str, value: Any, expected: str) -> None:
    raise _Bad(path, value, expected)


def _any(v: Any, path: str) -> None:
    if v is _MISSING:
        _fail(path, v, "a value")


def _relpath(v: Any, path: str) -> None:
    p = PurePosixPath(v) if isinstance(v, str) else None
    if p is None or not v or p.is_absolute() or ".." in p.parts or v != p.as_posix() or "\\" in v \
            or "\0" in v or v == "manifest.json":
        _fail(path, v, "a plain relative path inside the bundle")


def _sha(v: Any, path: str) -> None:
    if not isinstance(v, str) or not _HEX64.fullmatch(v):
        _fail(path, v, "64 lowercase hex digits (a sha256)")


def _dim(v: Any, path: str) -> None:
    if v is not None:
        _int(1)(v, path)


def _tensor_dtype(v: Any, path: str) -> None:
    if not isinstance(v, str) or v not in TENSOR_DTYPES:
        _fail(path, v, "one of " + ", ".join(TENSOR_DTYPES))


SPEC = _obj({"name": _str, "shape": _list(_dim, nonempty=False), "dtype": _one_of(*DTYPES)})
SPECS = _list(SPEC, unique=lambda s: s["name"])
QUALITY = _obj({"metric": _str, "value": _num()},
               {"direction": _one_of("higher", "lower"), "split": _str, "mae": _num(),
                "baseline": _obj({"name": _str, "value": _num()})})
KERNEL = _obj({"kind": _str, "flops": _num(0)},
              {"bytes": _num(0), "weight_bytes": _num(0), "pad_flops": _num(0), "setup_flops": _num(0),
               "call": _int(0), "dims": _list(_num(0), nonempty=False), "nodes": _list(_str, nonempty=False),
               "outputs": _list(_str, nonempty=False), "producer": _opt(_int(0))})
COSTS = _obj({"per_kind": _dict(_dict(_num(0)))},
             {"total": _dict(_num(0)), "engine_calls": _int(1), "kernels": _list(KERNEL, nonempty=False)})
CONFIG = _obj({"name": _str},
              {"graph": _relpath, "segments": _list(_str, unique=lambda s: s), "quality": _opt(QUALITY),
               "flops": _opt(_int()), "param_bytes": _opt(_int()), "costs": COSTS,
               "fused": _obj({"graph": _relpath, "tensors": _dict(_str)}),
               "dress": _obj({"level": _int(0, DRESS_MAX_LEVELS - 1), "kernel": _one_of("dense", "sparse")},
                             {"density": _num(0), "layers": _dict(_int(0, DRESS_MAX_LEVELS - 1))}),
               "fits_level": _obj({"cut_freq": _int(1), "form": _one_of(*FITS_FORMS),
                                   "derived": _list(_str)}),
               "precision": _one_of(*PRECISIONS),
               "quantization": _obj({"base": _str}, {"method": _str, "vs_fp32": _dict(_any),
                                                     "quality_drop": _opt(_num()),
                                                     "weight_bits": _one_of(7, 8)})})
SEGMENT = _obj({"graph": _relpath},
               {"tensors": _dict(_str), "inputs": SPECS, "outputs": SPECS, "flops": _opt(_int()),
                "derived_ell": _list(_str)})
TENSOR = _obj({"file": _relpath, "offset": _int(), "bytes": _int(), "dtype": _tensor_dtype,
               "shape": _list(_int(), nonempty=False)})
VALIDATION = _obj({}, {"max_abs_err": _num(), "max_rel_err": _num(), "tolerance": _num(), "n_inputs": _int()})
MANIFEST = _obj(
    {"name": _str, "family": _str, "inputs": SPECS, "outputs": SPECS,
     "configs": _list(CONFIG, unique=lambda c: c["name"]),
     "files": _dict(_obj({"bytes": _int(), "sha256": _sha}), key=_relpath),
     "model": _obj({"class": _str, "parameters": _int()}, {"variant": _opt(_str), "hyper": _dict(_any)})},
    {"segments": _dict(SEGMENT), "tensors": _dict(TENSOR), "tools": _dict(_any), "metadata": _dict(_any),
     "export": _obj({}, {"strategy": _str, "opset": _int(1), "validation": VALIDATION,
                         "kernels": _obj({"kernel": _str, "form": _str, "engine": _str,
                                          "measured": _dict(_obj({"batch1_us": _num(0)}))})}),
     "dress": _obj({"densities": _list(_num(0)),
                    "segments": _obj({"main": _dict(_obj({"weight": _str, "codes": _str}))}),
                    "storage": _obj({"dense_weight_bytes": _int(), "codes_bytes": _int()})}),
     "fits_elastic": _obj({"weight": _str, "bias": _str, "seq_len": _int(1), "pred_len": _int(1),
                           "eps": _num(0)})})


# --- cross-references: names that must resolve, ranges that depend on other fields --------------------------

def _refs(m: dict[str, Any]) -> None:
    files, segments, tensors = m["files"], m.get("segments", {}), m.get("tensors", {})

    def listed(rel: str, path: str) -> None:
        if rel not in files:
            _fail(path, rel, "a file the manifest lists under files")

    def tensor(tid: str, path: str, dtype: str | None = None, ndim: int | None = None) -> dict[str, Any]:
        if tid not in tensors:
            _fail(path, tid, "a tensor id of the manifest's tensors")
        t = tensors[tid]
        if (dtype and t["dtype"] != dtype) or (ndim is not None and len(t["shape"]) != ndim):
            want = " ".join(w for w in (f"{ndim}-d" if ndim else "", dtype or "") if w)
            _fail(path, tid, f"a {want} tensor, not {t['dtype']} {t['shape']}")
        return t

    for tid, t in tensors.items():
        where = f"tensors[{tid!r}]"
        listed(t["file"], f"{where}.file")
        if t["offset"] + t["bytes"] > files[t["file"]]["bytes"] or t["offset"] % TENSOR_ALIGN:
            _fail(f"{where}.offset", t["offset"], f"a multiple of {TENSOR_ALIGN} with offset + bytes "
                  f"({t['bytes']}) within {t['file']!r} ({files[t['file']]['bytes']} bytes)")
        want = math.prod(t["shape"]) * TENSOR_DTYPES[t["dtype"]].itemsize
        if t["bytes"] != want:
            _fail(f"{where}.bytes", t["bytes"], f"{want} (shape {t['shape']} x {t['dtype']})")
    spans = sorted((t["file"], t["offset"], t["offset"] + t["bytes"], tid) for tid, t in tensors.items())
    for (f, _, end, a), (g, start, _, b) in zip(spans, spans[1:]):
        if f == g and start < end:
            _fail(f"tensors[{b!r}].offset", start, f"a span not overlapping tensor {a!r} (ends at {end})")
    for name, s in segments.items():
        listed(s["graph"], f"segments[{name!r}].graph")
        for init, tid in s.get("tensors", {}).items():
            tensor(tid, f"segments[{name!r}].tensors[{init!r}]")
    dress, fe = m.get("dress"), m.get("fits_elastic")
    if dress is not None:
        n = len(dress["densities"])
        if n > DRESS_MAX_LEVELS or any(a <= b for a, b in zip(dress["densities"], dress["densities"][1:])) \
                or dress["densities"][0] > 1:
            _fail("dress.densities", dress["densities"], f"1..{DRESS_MAX_LEVELS} decreasing densities <= 1")
        main = segments.get("main", {}).get("tensors", {})
        for init, d in dress["segments"]["main"].items():
            where = f"dress.segments.main[{init!r}]"
            w = tensor(d["weight"], f"{where}.weight", "<f4")
            if main.get(init) != d["weight"]:
                _fail(f"{where}.weight", d["weight"], f"the tensor segments['main'] uses for {init!r}")
            codes = tensor(d["codes"], f"{where}.codes", "|u1", 1)
            if codes["bytes"] * 4 < math.prod(w["shape"]):
                _fail(f"{where}.codes", d["codes"], f"2-bit codes for all {math.prod(w['shape'])} weights")
        for init in segments.get("main.sparse", {}).get("derived_ell", []):
            if init not in dress["segments"]["main"]:
                _fail("segments['main.sparse'].derived_ell", init, "a weight of dress.segments.main")
    if fe is not None:
        w = tensor(fe["weight"], "fits_elastic.weight", "<f4", 3)
        b = tensor(fe["bias"], "fits_elastic.bias", "<f4", 2)
        if w["shape"][0] != 2 or b["shape"] != w["shape"][:2]:
            _fail("fits_elastic.bias", fe["bias"], f"a [2, up] tensor beside weight {w['shape']}")
    names = {c["name"]: c for c in m["configs"]}
    for i, c in enumerate(m["configs"]):
        where = f"configs[{i}]"
        if "quantization" in c:
            base = names.get(c["quantization"]["base"])
            fp32 = c.get("precision", "fp32") == "fp32"
            if base is None or base.get("precision", "fp32") != "fp32" or fp32:
                _fail(f"{where}.quantization.base", c["quantization"]["base"],
                      "an fp32 config of the bundle, for a config whose precision is not fp32")
        if "graph" in c:
            listed(c["graph"], f"{where}.graph")
        elif not c.get("segments"):
            _fail(f"{where}.segments", c.get("segments", _MISSING), "a graph or a non-empty segment list")
        chain = c.get("segments", [])
        for j, seg in enumerate(chain):
            if seg not in segments:
                _fail(f"{where}.segments[{j}]", seg, "a segment the manifest defines")
        for j, (seg, nxt) in enumerate(zip(chain, chain[1:])):
            # a chain hands each segment's outputs to the next: their specs must agree where both are given
            outs, ins = (_io(segments[seg].get("outputs")), _io(segments[nxt].get("inputs")))
            if outs and ins and outs != ins:
                _fail(f"{where}.segments[{j + 1}]", nxt, f"a segment taking what {seg!r} gives ({outs})")
        if "fused" in c:
            listed(c["fused"]["graph"], f"{where}.fused.graph")
            for init, tid in c["fused"]["tensors"].items():
                tensor(tid, f"{where}.fused.tensors[{init!r}]")
        if "graph" in c:
            continue                               # a one-graph config runs its graph, nothing else
        if "dress" in c:
            if dress is None or "main" not in segments:
                _fail(f"{where}.dress", c["dress"], "a bundle with a dress section and a 'main' segment")
            top = len(dress["densities"]) - 1
            _int(0, top)(c["dress"]["level"], f"{where}.dress.level")
            for init, lv in c["dress"].get("layers", {}).items():
                if init not in dress["segments"]["main"]:
                    _fail(f"{where}.dress.layers", init, "a weight of dress.segments.main")
                _int(0, top)(lv, f"{where}.dress.layers[{init!r}]")
            if c["dress"]["kernel"] == "sparse" and "main.sparse" not in segments:
                _fail(f"{where}.dress.kernel", "sparse", "'dense' (the bundle has no main.sparse segment)")
        elif "fits_level" in c:
            lv = c["fits_level"]
            if fe is None or len(c["segments"]) != 1:
                _fail(f"{where}.fits_level", lv, "one segment, in a bundle with a fits_elastic section")
            _int(1, tensors[fe["weight"]]["shape"][2])(lv["cut_freq"], f"{where}.fits_level.cut_freq")
            want = ["spectral.gemm0", "spectral.gemm1"][:FITS_FORMS[lv["form"]]]
            if lv["derived"] != want:
                _fail(f"{where}.fits_level.derived", lv["derived"], f"{want} for form {lv['form']!r}")


def _io(specs: list | None) -> list:
    return [(s["shape"], s["dtype"]) for s in specs or []]


def _run(where: Any, fix: str, *steps: Callable[[], None]) -> None:
    try:
        for step in steps:
            step()
    except _Bad as e:
        raise BundleError(e.message(where, fix)) from None


def check_manifest(mpath: Any, m: Any) -> None:
    """Raise one-line BundleError naming the first manifest field that is missing, mistyped, out of range
    or names something the bundle does not have."""
    _run(mpath, "re-export the bundle", lambda: MANIFEST(m, ""), lambda: _refs(m))


# --- JSON files inside the bundle --------------------------------------------------------------------------

STATS = _obj({"p50_ms": _num(0), "p90_ms": _num(0)},
             {"p99_ms": _num(0), "mean_ms": _num(0), "peak_memory_mb": _opt(_num(0)), "energy_mj": _num(0)})
PROFILE = _obj({"format": _one_of(1), "configs": _dict(STATS)},
               {"device": _str, "obtained": _str, "batch": _int(1), "by_threads": _dict(_dict(STATS)),
                "env": _obj({}, {"threads": _opt(_int(1)), "host": _dict(_any)})})
# What `edgeflex compile` times on TVM: per DRESS level the faster kernel; TVM against ONNX Runtime.
DRESS_CHOICE = _obj({}, {"levels": _dict(_obj({"kernel": _one_of("dense", "sparse")}))})
BACKEND_CHOICE = _obj({}, {"faster": _opt(_one_of("tvm", "onnxruntime")), "ratio": _opt(_num(0)),
                           "host": _dict(_any)})
PARAM = _obj({"name": _str, "shape": _list(_int(), nonempty=False), "dtype": _one_of(*DTYPES)})
LIBRARY = {"library": _relpath, "entry": _str, "params": _list(PARAM, nonempty=False)}
ENGINE = _obj({**LIBRARY, "graph_sha256": _sha},
              {"unit": _one_of("cpu", "gpu"), "batch": _opt(_int(1)), "transform_params": _opt(_str),
               "created_by": _opt(_dict(_any)), "versions": _dict(_any), "host": _dict(_any),
               "target": _dict(_any), "batch1": _opt(_obj(LIBRARY, {"transform_params": _opt(_str)}))})


def check_engine_record(rel: str, meta: dict[str, Any], files: dict[str, Any]) -> None:
    """A TVM engine record (checked against ENGINE by `load_json`): its libraries listed in the bundle."""
    def refs() -> None:
        for path, part in (("library", meta), ("batch1.library", meta.get("batch1") or {})):
            if "library" in part and part["library"] not in files:
                _fail(path, part["library"], "a library the manifest lists")

    _run(f"bundle file {rel!r}", "re-run `edgeflex compile`", refs)
