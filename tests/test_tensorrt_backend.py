"""The TensorRT backend where TensorRT cannot run (no TensorRT, no GPU here): every TensorRT and CUDA name its
source uses is held against the names read from the real 10.3 / 11.4 bindings and cuda-bindings wheels
(compile/tensorrt_ops/api/, regen_api.py), so a renamed API fails here; the plans' place in a bundle (store,
stale, trust) runs on real bundles; the no-TensorRT and no-GPU answers are one line. The end-to-end test
runs only where TensorRT and a GPU exist and skips, saying why, elsewhere."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeflex as ef
from edgeflex.errors import BackendUnavailable, BundleError, UsageError
from edgeflex.runtime.backends import get_backend, tensorrt_keys
from edgeflex.runtime.backends.tensorrt_keys import (
    RECORD_FORMAT,
    plan_dir,
    plan_file,
    plan_key,
    plan_records,
    record_file,
    store_plan,
    stored_plan,
    weights_sha256,
)
from edgeflex.runtime.backends.tvm import creator
from edgeflex.runtime.bundle import Bundle, model_id

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "runtime/backends/tensorrt.py"
API = ROOT / "compile/tensorrt_ops/api"
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_CUDA = (importlib.util.find_spec("cuda") is not None
             and importlib.util.find_spec("cuda.bindings") is not None)
# Names reached only on the 10.x path (BuilderFlag precision); 11.x is strongly typed and lacks them.
TEN_ONLY = {"FP16", "platform_has_fast_fp16"}


def _names(file: str) -> list[str]:
    return json.loads((API / file).read_text())["names"]


def _has(names: list[str], name: str) -> bool:
    # NOTE: the linker stores a string inside a longer one that ends with it (regen_api.py)
    return any(n.endswith(name) for n in names)


def _chains(source: str) -> list[tuple[str, list[str]]]:
    """(root name, attribute names) of every outermost attribute chain: `trt.BuilderFlag.FP16` ->
    ("trt", ["BuilderFlag", "FP16"]); `self._trt.Runtime` -> ("self", ["_trt", "Runtime"])."""
    tree = ast.parse(source)
    parent = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(parent.get(node), ast.Attribute):
            parts = []
            while isinstance(node, ast.Attribute):
                parts.append(node.attr)
                node = node.value
            root = node.id if isinstance(node, ast.Name) else ""
            out.append((root, parts[::-1]))
    return out


def _ours_or_python(source: str) -> set[str]:
    """Names that are not TensorRT's: what the module itself defines or assigns, and the attributes of the
    Python, numpy and edgeflex objects it handles."""
    import logging
    import threading
    import time

    from edgeflex.runtime.backends import onnx_wire
    from edgeflex.runtime.bundle import TensorSpec

    tree = ast.parse(source)
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    targets = [t for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
               for t in (n.targets if isinstance(n, ast.Assign) else [n.target])]
    names |= {a.attr for t in targets for a in ast.walk(t) if isinstance(a, ast.Attribute)}
    for obj in (np, np.empty(1), np.empty(1).ctypes, np.dtype("f4"), str, bytes, dict, list, tuple, set, int,
                logging, logging.getLogger(), threading, threading.Lock(), time, onnx_wire, tensorrt_keys,
                Bundle, TensorSpec, Path):
        names |= set(dir(obj))
    return names | {"manifest", "path", "name"}


def unknown_api(source: str, trt_names: list[str], cuda_names: list[str]) -> list[str]:
    """Every name the source would look up on TensorRT or cuda-bindings that the given lists lack."""
    bad = []
    cuda_roots = {"cudart", "_cudart"}
    ours = _ours_or_python(source)
    for root, parts in _chains(source):
        if root == "cudart" or (root == "self" and parts[0] == "_cudart"):
            path = parts if root == "cudart" else parts[1:]
            if path and not (path[0] in cuda_names and (len(path) < 2 or ".".join(path[:2]) in cuda_names)):
                bad.append("cudart." + ".".join(path))
            continue
        if root == "trt" or (root == "self" and parts[0] == "_trt"):
            path = parts if root == "trt" else parts[1:]
            path = path[:next((i for i, p in enumerate(path) if p.startswith("__")), len(path))]  # a str
            bad += [f"trt.{p}" for p in path if not _has(trt_names, p)]
            continue
        for p in parts:        # a method on an object TensorRT made (builder, network, context, ...)
            if p not in ours and p not in cuda_roots and not _has(trt_names, p):
                bad.append(f"{root}.{p}")
    return sorted(set(bad))


def test_every_tensorrt_and_cuda_name_the_backend_uses_is_in_the_10_3_bindings() -> None:
    source = SOURCE.read_text()
    cuda = _names("cuda-bindings-12.9.5.json")
    assert unknown_api(source, _names("tensorrt-10.3.0.json"), cuda) == []
    assert unknown_api(source, _names("tensorrt-10.3.0.json"), _names("cuda-bindings-13.5.0.json")) == []
    # the names the backend reads off cudaGetDeviceProperties' result
    assert {"cudaDeviceProp().name", "cudaDeviceProp().major", "cudaDeviceProp().minor"} <= set(cuda)


def test_a_renamed_api_fails_the_name_check() -> None:
    source = SOURCE.read_text().replace("execute_async_v3", "execute_async_v9").replace(
        "cudaMemcpyAsync", "cudaMemcpyAsink").replace("trt.OnnxParserRefitter", "trt.OnnxRefitter")
    bad = unknown_api(source, _names("tensorrt-10.3.0.json"), _names("cuda-bindings-12.9.5.json"))
    assert bad == ["cudart.cudaMemcpyAsink", "self.execute_async_v9", "trt.OnnxRefitter"]


def test_the_11x_path_uses_only_names_11_4_still_has() -> None:
    """Outside the 10.x-only precision branch every name is in 11.4; `platform_has_fast_fp16`, which that
    branch reads, is gone from 11.4, which is why the two paths are kept apart."""
    v11 = _names("tensorrt-11.4.0.106.json")
    source = SOURCE.read_text()
    used = {p for root, parts in _chains(source) if root == "trt"
            for p in parts[:next((i for i, p in enumerate(parts) if p.startswith("__")), len(parts))]}
    used |= {p for root, parts in _chains(source) if root == "builder" for p in parts}
    assert sorted(p for p in used - TEN_ONLY if not p.startswith("__") and not _has(v11, p)) == []
    assert not _has(v11, "platform_has_fast_fp16") and _has(_names("tensorrt-10.3.0.json"),
                                                            "platform_has_fast_fp16")


# What each variable of tensorrt.py that holds a TensorRT object is (a naming rule of that file).
VAR_CLASS = {"builder": "Builder", "network": "INetworkDefinition", "config": "IBuilderConfig",
             "profile": "IOptimizationProfile", "parser": "OnnxParser", "e": "ParserError", "t": "ITensor",
             "engine": "ICudaEngine", "_engine": "ICudaEngine", "ctx": "IExecutionContext",
             "_context": "IExecutionContext", "_runtime": "Runtime", "refitter": "Refitter",
             "onnx_refitter": "OnnxParserRefitter", "d": "DataType"}


def _arities(signatures: str) -> list[tuple[int, int]]:
    """(required, total) parameters after self of each overload in a member's signature line(s) (" | "
    between overloads); empty when they cannot be read."""
    return [a for a in map(_arity, signatures.split(" | ")) if a is not None]


def _arity(signature: str) -> tuple[int, int] | None:
    if "(" not in signature or "(*args" in signature:
        return None
    inner, depth, parts, cur = signature[signature.index("(") + 1:], 0, [], ""
    for ch in inner:
        if ch == ")" and depth == 0:
            break
        depth += ch in "([" and 1 or (ch in ")]" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts = [p.strip() for p in [*parts, cur] if p.strip()]
    if parts and parts[0].startswith("self"):
        parts = parts[1:]
    return sum("=" not in p for p in parts), len(parts)


def member_mismatches(source: str, members: dict[str, dict[str, str]], skip: set[str] = frozenset()) -> list:
    """Each use in the source of a TensorRT class member the given bindings lack, or called with a number of
    arguments its signature does not take: `trt.X` / `trt.X.Y` (Y a member of class X, constructors' arity
    from `__init__`), and `var.m(...)` on a variable VAR_CLASS types."""
    tree = ast.parse(source)
    bad = []
    for node in ast.walk(tree):
        call = node if isinstance(node, ast.Call) else None
        f = call.func if call else node
        if not isinstance(f, ast.Attribute):
            continue
        n_args = len(call.args) + len(call.keywords) if call else None
        base = f.value
        owner = None
        if isinstance(base, ast.Name) and base.id == "trt" or (isinstance(base, ast.Attribute) and
                                                               base.attr == "_trt"):
            if f.attr.startswith("__") or f.attr in skip:
                continue
            if f.attr not in members and f.attr not in members[""]:
                bad.append(f"trt.{f.attr}")
            elif call and f.attr in members:
                ar = _arities(members[f.attr].get("__init__", ""))
                if ar and not any(lo <= n_args <= hi for lo, hi in ar):
                    bad.append(f"trt.{f.attr}() with {n_args} arguments: {members[f.attr]['__init__']}")
            continue
        if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "trt":
            owner = base.attr                       # trt.X.Y
        elif isinstance(base, ast.Name) and base.id in VAR_CLASS:
            owner = VAR_CLASS[base.id]
        elif isinstance(base, ast.Attribute) and base.attr in VAR_CLASS and isinstance(base.value, ast.Name) \
                and base.value.id == "self":
            owner = VAR_CLASS[base.attr]
        if owner is None or f.attr in skip or owner.startswith("__") or f.attr.startswith("__"):
            continue
        cls = members.get(owner, {})
        if f.attr not in cls:
            bad.append(f"{owner}.{f.attr}")
        elif call:
            ar = _arities(cls[f.attr])
            if ar and not any(lo <= n_args <= hi for lo, hi in ar):
                bad.append(f"{owner}.{f.attr}() with {n_args} arguments: {cls[f.attr]}")
    return sorted(set(bad))


def _members(file: str) -> dict[str, dict[str, str]]:
    return json.loads((API / file).read_text())["members"]


def test_every_tensorrt_member_the_backend_uses_exists_in_10_3_with_that_many_arguments() -> None:
    source = SOURCE.read_text()
    assert member_mismatches(source, _members("tensorrt-10.3.0.json")) == []
    # and the rule sees what it should: a member of the wrong class, a wrong argument count
    wrong = source.replace("ctx.set_input_shape(n, s)", "ctx.set_input_shape(n)").replace(
        "builder.create_optimization_profile()", "builder.create_profile()")
    bad = member_mismatches(wrong, _members("tensorrt-10.3.0.json"))
    assert len(bad) == 2 and bad[0] == "Builder.create_profile"
    assert bad[1].startswith("IExecutionContext.set_input_shape() with 1 arguments: set_input_shape(self: ")


def test_the_11x_path_finds_every_member_in_11_4_but_the_fp16_flag() -> None:
    v11 = _members("tensorrt-11.4.0.106.json")
    assert member_mismatches(SOURCE.read_text(), v11, skip=TEN_ONLY) == []
    assert "FP16" not in v11["BuilderFlag"] and "platform_has_fast_fp16" not in v11["Builder"]
    v10 = _members("tensorrt-10.3.0.json")
    assert "FP16" in v10["BuilderFlag"] and "platform_has_fast_fp16" in v10["Builder"]


def test_api_lists_say_where_they_came_from() -> None:
    for f in API.glob("*.json"):
        d = json.loads(f.read_text())
        assert d["wheel"].endswith(".whl") and len(d["wheel_sha256"]) == 64 and len(d["names"]) > 1000


@pytest.mark.skipif(not HAVE_CUDA, reason="cuda-bindings is not installed (pip install 'edgeflex[tensorrt]')")
def test_cuda_names_exist_in_the_installed_cuda_bindings() -> None:
    from cuda.bindings import runtime as cudart

    for root, parts in _chains(SOURCE.read_text()):
        path = parts if root == "cudart" else parts[1:] if root == "self" and parts[0] == "_cudart" else None
        if path:
            obj = cudart
            for p in path:
                obj = getattr(obj, p)       # AttributeError names the missing one


# --- one-line answers where TensorRT or the GPU is missing ------------------------------------------------

@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is importable here")
def test_runtime_on_tensorrt_without_tensorrt_says_why_in_one_line(fits_bundle: Path) -> None:
    with pytest.raises(BackendUnavailable, match="needs TensorRT, which is not importable") as info:
        ef.Runtime(fits_bundle, backend="tensorrt")
    msg = str(info.value)
    assert "\n" not in msg and "JetPack 6" in msg and "backend='onnxruntime'" in msg
    with pytest.raises(BackendUnavailable, match="not importable"):
        get_backend("tensorrt")


def test_bad_backend_options_are_refused_before_anything_loads() -> None:
    from edgeflex.runtime.backends.tensorrt import TensorRtBackend

    for kw, what in (({"fp16": "yes"}, "fp16"), ({"max_batch": 0}, "max_batch"), ({"build": "sometimes"},
                                                                                   "build")):
        with pytest.raises(UsageError, match=what):
            TensorRtBackend(**kw)


def _gpu_here() -> bool:
    from cuda.bindings import runtime as cudart

    err, count = cudart.cudaGetDeviceCount()
    return err == cudart.cudaError_t.cudaSuccess and count > 0


@pytest.mark.skipif(not HAVE_CUDA, reason="cuda-bindings is not installed (pip install 'edgeflex[tensorrt]')")
def test_no_gpu_is_one_line_from_the_real_cuda_runtime() -> None:
    from cuda.bindings import runtime as cudart

    from edgeflex.runtime.backends.tensorrt import check, cuda_gpu

    if _gpu_here():
        pytest.skip("a CUDA GPU is visible here")
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU.*cudaError") as info:
        cuda_gpu(cudart)
    assert "\n" not in str(info.value)
    with pytest.raises(BackendUnavailable, match=r"CUDA cudaMalloc\(16\) failed: cudaError"):
        check(cudart, cudart.cudaMalloc(16), "cudaMalloc(16)")


# --- plans in the bundle: names, store, stale, trust -----------------------------------------------------

KEY = plan_key("Orin (nvgpu)", (8, 7), "10.3.0")


def _record(rel: str, plan: bytes, graph_sha: str, wsha: str | None, **over) -> dict:
    from edgeflex.runtime.bundle import sha256_bytes

    return {"format": RECORD_FORMAT, "graph": "graphs/x.onnx", "graph_sha256": graph_sha,
            "weights_sha256": wsha,
            "plan": rel, "plan_sha256": sha256_bytes(plan), "key": dict(KEY), "stripped": True, "refit": True,
            "created_by": creator(), **over}


def _graph_sha(path: Path) -> str:
    with Bundle.open(path) as b:
        return next(m["sha256"] for r, m in b.manifest["files"].items() if r.endswith(".onnx"))


def test_plan_names_carry_graph_weights_precision_and_batch(rng) -> None:
    w = {"W": rng.standard_normal((3, 2)).astype(np.float32)}
    wsha = weights_sha256(w)
    rel = plan_file(KEY, "ab" * 32, wsha, "fp16", 16)
    assert rel == f"engines/tensorrt/orin-nvgpu-sm87-10.3.0/{'ab' * 8}-w{wsha[:12]}-fp16-b16.plan"
    assert record_file(rel).endswith("-fp16-b16.json")
    assert plan_file(KEY, "ab" * 32, None, "fp32", 1).endswith(f"{'ab' * 8}-fp32-b1.plan")
    w2 = {"W": w["W"].copy()}
    w2["W"][1, 1] += 1
    assert weights_sha256(w2) != wsha and weights_sha256({"W": w["W"].copy()}) == wsha


def test_a_stored_plan_is_added_atomically_and_found_again(copy: Path) -> None:
    sha = _graph_sha(copy)
    plan = b"opaque plan bytes: TensorRT's own format, not read here"
    rel = plan_file(KEY, sha, "cd" * 32, "fp32", 16)
    with Bundle.open(copy) as b:
        before = model_id(b.manifest)
        assert store_plan(b, rel, plan, _record(rel, plan, sha, "cd" * 32)) == f"stored at {rel}"
    with Bundle.open(copy) as b:                    # every file verified against the new manifest
        assert model_id(b.manifest) == before       # plans are builds, not a new model
        assert {rel, record_file(rel)} <= set(b.manifest["files"])
        assert rel.startswith(plan_dir(KEY) + "/")
        records = plan_records(b, KEY, allow_native=False)
        data, rec, why = stored_plan(b, records, rel, KEY, sha, "cd" * 32)
    assert (data, why) == (plan, None) and rec["plan"] == rel


def test_a_plan_for_another_gpu_version_or_weights_is_stale_never_read(copy: Path) -> None:
    sha = _graph_sha(copy)
    plan = b"plan"
    rel = plan_file(KEY, sha, "cd" * 32, "fp32", 16)
    with Bundle.open(copy) as b:
        store_plan(b, rel, plan, _record(rel, plan, sha, "cd" * 32))
    with Bundle.open(copy) as b:
        records = plan_records(b, KEY, allow_native=False)
        for here, field in ((plan_key("Orin (nvgpu)", (8, 7), "10.4.0"), "tensorrt"),
                            (plan_key("NVIDIA H100", (9, 0), "10.3.0"), "gpu")):
            assert stale_field(stored_plan(b, records, rel, here, sha, "cd" * 32)) == field
        data, _, why = stored_plan(b, records, rel, KEY, sha, "ef" * 32)
        assert data is None and "other weights" in why
        data, _, why = stored_plan(b, records, plan_file(KEY, sha, None, "fp32", 16), KEY, sha, None)
        assert data is None and "no plan" in why


def stale_field(result: tuple) -> str:
    data, _, why = result
    assert data is None
    return why.split()[3]           # "plan built for <field> ..."


def test_a_plan_record_that_does_not_match_its_plan_is_refused(copy: Path) -> None:
    sha = _graph_sha(copy)
    rel = plan_file(KEY, sha, None, "fp32", 16)
    with Bundle.open(copy) as b:
        store_plan(b, rel, b"plan", {**_record(rel, b"plan", sha, None), "plan_sha256": "0" * 64})
    with Bundle.open(copy) as b:
        with pytest.raises(BundleError, match="does not match the sha256") as info:
            stored_plan(b, plan_records(b, KEY, allow_native=False), rel, KEY, sha, None)
    assert "\n" not in str(info.value)


def test_a_plan_built_by_someone_else_needs_allow_native(copy: Path) -> None:
    sha = _graph_sha(copy)
    rel = plan_file(KEY, sha, None, "fp32", 16)
    other = {"uid": os.getuid() + 1, "user": "mallory", "machine": "elsewhere/box"}
    with Bundle.open(copy) as b:
        store_plan(b, rel, b"plan", _record(rel, b"plan", sha, None, created_by=other))
    with Bundle.open(copy) as b:
        with pytest.raises(BundleError, match="TensorRT plan .* built by user 'mallory'") as info:
            plan_records(b, KEY, allow_native=False)
        msg = str(info.value)
        assert "\n" not in msg and "another machine" in msg and "allow_native=True" in msg
        assert rel in plan_records(b, KEY, allow_native=True)
        # another GPU's folder is not this GPU's business: not read, not vetted
        assert plan_records(b, plan_key("NVIDIA H100", (9, 0), "10.3.0"), allow_native=False) == {}


def test_a_packed_bundle_keeps_plans_in_memory_and_says_so(fits_bundle: Path, tmp_path: Path) -> None:
    from edgeflex.runtime.pack import pack_bundle

    packed = tmp_path / "f.efz"
    with Bundle.open(fits_bundle) as src:
        pack_bundle(src, packed)
    sha = _graph_sha(fits_bundle)
    rel = plan_file(KEY, sha, None, "fp32", 16)
    b = Bundle.open(packed)
    said = store_plan(b, rel, b"plan", _record(rel, b"plan", sha, None))
    assert said.startswith("not stored: f.efz is packed")


def test_a_kill_while_storing_a_plan_leaves_the_bundle_whole(copy: Path) -> None:
    """SIGKILL in the middle of writing the plan (store.py's fault hook): the bundle opens, verified, as it
    was; the next store goes through."""
    sha = _graph_sha(copy)
    rel = plan_file(KEY, sha, None, "fp32", 16)
    code = ("import sys, json; from edgeflex.runtime.bundle import Bundle; "
            "from edgeflex.runtime.backends.tensorrt_keys import store_plan; "
            "b = Bundle.open(sys.argv[1]); store_plan(b, sys.argv[2], b'plan', json.loads(sys.argv[3]))")
    rec = json.dumps(_record(rel, b"plan", sha, None))
    r = subprocess.run([sys.executable, "-c", code, str(copy), rel, rec], env={**os.environ,
                       "EDGEFLEX_FAULT": "fill"}, capture_output=True, timeout=120)
    assert r.returncode == -9
    with Bundle.open(copy) as b:
        assert rel not in b.manifest["files"]
        assert store_plan(b, rel, b"plan", json.loads(rec)) == f"stored at {rel}"
    with Bundle.open(copy) as b:
        assert rel in b.manifest["files"]


# --- on a GPU with TensorRT only ------------------------------------------------------------------------

def _why_not_here() -> str | None:
    if not HAVE_TRT:
        return "TensorRT is not importable here (JetPack 6, or NVIDIA's index)"
    if not HAVE_CUDA:
        return "cuda-bindings is not installed"
    if not _gpu_here():
        return "no CUDA GPU here"
    return None


@pytest.mark.skipif(_why_not_here() is not None, reason=str(_why_not_here()))
def test_tensorrt_runs_like_onnx_runtime_and_reuses_its_plan(copy: Path, rng) -> None:    # pragma: no cover
    shape = [3 if d is None else d for d in ef.Runtime(copy).inputs[0].shape]
    x = rng.standard_normal(shape).astype(np.float32)
    want = ef.Runtime(copy).run(x)
    rt = ef.Runtime(copy, backend="tensorrt")
    np.testing.assert_allclose(rt.run(x), want, rtol=1e-3, atol=1e-4)
    assert any("built here" in v for k, v in rt.info()["engine_versions"].items() if k.startswith("plan "))
    again = ef.Runtime(copy, backend="tensorrt")
    plans = {k: v for k, v in again.info()["engine_versions"].items() if k.startswith("plan ")}
    assert plans and all("loaded from" in v for v in plans.values())
    np.testing.assert_allclose(again.run(x), want, rtol=1e-3, atol=1e-4)


# --- the real bindings module, on stand-in libraries -----------------------------------------------------

PROBE = r"""
import sys, tensorrt_bindings
sys.modules["tensorrt"] = tensorrt_bindings                  # what the tensorrt-cu12 package's module is
import numpy as np
from edgeflex.errors import BackendUnavailable
from edgeflex.runtime.backends import tensorrt as b

trt = b.import_tensorrt()
assert trt.__version__ == "10.3.0", trt.__version__
log = b._logger(trt)                                         # a Python subclass of the real trt.ILogger
log.log(trt.ILogger.Severity.ERROR, "first line\nsecond")
assert log.last() == "first line", log.last()
assert b._np_dtypes(trt)[trt.DataType.HALF] == np.float16
assert b._np_dtypes(trt)[trt.float32] == np.float32         # trt.float32 is DataType.FLOAT
for make in (lambda: b.build_plan(trt, log, b"", "g.onnx", fp16=False, max_batch=4, refit=False),
             lambda: b.TensorRtBackend()):
    try:
        make()
        raise SystemExit("no error")
    except BackendUnavailable as e:
        assert "\n" not in str(e), e
        print(e)
"""


@pytest.mark.skipif(not os.environ.get("EDGEFLEX_TRT_BINDINGS_WHEEL"),
                    reason="set EDGEFLEX_TRT_BINDINGS_WHEEL to a tensorrt-cu12-bindings 10.3 wheel (pip "
                           "download --no-deps tensorrt-cu12-bindings==10.3.0) and have a C compiler")
def test_the_real_10_3_bindings_module_on_stand_in_libraries(tmp_path: Path) -> None:
    """The backend's TensorRT-facing code against the real 10.3 extension module, whose nine C entry points
    (builder, runtime, parser, refitter factories, plugin registry) are stand-ins returning null: the logger
    subclass, the dtype map, and the one-line answers when `trt.Builder` gets no builder (pybind11 raises
    TypeError, as it does where CUDA cannot initialise) and when there is no GPU (before any TensorRT
    call)."""
    import shutil
    import zipfile

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the stand-in libraries")
    with zipfile.ZipFile(os.environ["EDGEFLEX_TRT_BINDINGS_WHEEL"]) as z:
        z.extractall(tmp_path)
    for lib in ("libnvinfer", "libnvonnxparser", "libnvinfer_plugin"):
        so = f"{lib}.so.10"
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / so), f"-Wl,-soname,{so}",
                        str(ROOT / "compile/tensorrt_ops/stub.c")], check=True)
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    said = r.stdout.splitlines()
    assert said[0].startswith("TensorRT could not create a builder"), said
    assert "needs a CUDA GPU" in said[1] or "could not start its runtime" in said[1], said
