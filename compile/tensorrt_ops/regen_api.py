"""Regenerate the API name lists the TensorRT backend is checked against (tests/test_tensorrt_backend.py).

    python compile/tensorrt_ops/regen_api.py tensorrt WHEEL          # tensorrt-cu12-bindings wheel
    python compile/tensorrt_ops/regen_api.py cuda-bindings WHEEL     # imported: needs no GPU

writes compile/tensorrt_ops/api/<dist>-<version>.json: the names, and where they came from (wheel file name
and sha256). The TensorRT bindings wheels carry no .pyi stubs, and their module links libnvinfer,
libnvonnxparser and libnvinfer_plugin (NVIDIA's index only). Two readings:
- `names`: from the extension's string table: every NUL-terminated string's trailing identifier (pybind11
  registers each class, method, property and enum member by such a string) plus the names the package's
  __init__.py defines. NOTE: the linker merges a string into another that ends with it (`set_named_weights`
  lives inside `unset_named_weights`), so a name is present when some listed name ends with it.
- `members`: the module itself, imported against stand-in libraries (`stub.c`, compiled here with cc: the
  nine C entry points the extension calls, each returning null, so no TensorRT code exists to run): every
  class's members, each with the first line of pybind11's signature docstring (`parse(self: ...OnnxParser,
  model: buffer, path: str = None) -> bool`). Needs a C compiler; without one only `names` is written.
cuda-bindings imports without a driver: its names are `dir()` of `cuda.bindings.runtime` and of each of its
classes.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).parent / "api"
IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*$")


def tensorrt_names(wheel: Path) -> tuple[str, list[str]]:
    names: set[str] = set()
    version = "?"
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.filename.endswith("tensorrt.so"):
                for chunk in z.read(info).split(b"\0"):
                    m = IDENT.search(chunk)
                    if m and len(m.group()) > 1 and not m.group().startswith(b"_Z"):
                        names.add(m.group().decode())
            elif info.filename.endswith("tensorrt_bindings/__init__.py"):
                tree = ast.parse(z.read(info).decode())
                for node in ast.walk(tree):
                    if isinstance(node, ast.FunctionDef):
                        names.add(node.name)
                    elif isinstance(node, ast.Assign):
                        names.update(t.attr for t in node.targets if isinstance(t, ast.Attribute))
                        names.update(t.id for t in node.targets if isinstance(t, ast.Name))
                    elif isinstance(node, ast.Constant) and node.value and isinstance(node.value, str) \
                            and re.fullmatch(r"\d+\.\d+\.\d+.*", node.value):
                        version = node.value
    return version, sorted(names)


# Run inside the unpacked wheel, against the stand-in libraries: {class or "": {member: signature line}}.
# An overloaded member's docstring starts `name(*args, **kwargs)` and lists `1. name(self: ...) -> ...` per
# overload: those are kept, joined by " | ".
DUMP = r"""
import json, re, sys
import tensorrt_bindings as trt

def sig(obj, name):
    lines = (getattr(obj, "__doc__", None) or "").strip().splitlines() or [""]
    if "(*args, **kwargs)" in lines[0]:
        over = [re.sub(r"^\d+\. ", "", ln) for ln in lines if re.match(rf"^\d+\. {name}\(", ln)]
        return " | ".join(over) or lines[0]
    return lines[0]

out = {"": {}}
for name in dir(trt):
    obj = getattr(trt, name)
    if isinstance(obj, type):
        out[name] = {m: sig(getattr(obj, m), m) for m in dir(obj)
                     if not m.startswith("__") or m == "__init__"}
    elif not name.startswith("__"):
        out[""][name] = sig(obj, name)
json.dump(out, sys.stdout)
"""


def tensorrt_members(wheel: Path) -> dict[str, dict[str, str]] | None:
    """Every class's members with their signature lines, from the module imported on stand-in libraries."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("no C compiler: members not read", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory(prefix="regen-api-") as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        for lib in ("libnvinfer", "libnvonnxparser", "libnvinfer_plugin"):
            for major in ("10", "11"):
                so = f"{lib}.so.{major}"
                subprocess.run([cc, "-shared", "-fPIC", "-o", f"{tmp}/{so}", f"-Wl,-soname,{so}",
                                str(Path(__file__).with_name("stub.c"))], check=True)
        env = {**os.environ, "LD_LIBRARY_PATH": tmp, "PYTHONPATH": tmp}
        r = subprocess.run([sys.executable, "-c", DUMP], cwd=tmp, env=env, capture_output=True, text=True,
                           check=True)
        return json.loads(r.stdout)


def cuda_names(wheel: Path) -> tuple[str, list[str]]:
    with tempfile.TemporaryDirectory(prefix="regen-api-") as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        sys.path.insert(0, tmp)
        import cuda.bindings
        from cuda.bindings import runtime as cudart

        names = {n for n in dir(cudart) if not n.startswith("__")}
        for n in list(names):
            obj = getattr(cudart, n)
            if isinstance(obj, type):
                names.update(f"{n}.{m}" for m in dir(obj) if not m.startswith("__"))
        names.update(f"cudaDeviceProp().{m}" for m in dir(cudart.cudaDeviceProp()) if not m.startswith("__"))
        return cuda.bindings.__version__, sorted(names)


def main() -> None:
    kind, wheel = sys.argv[1], Path(sys.argv[2])
    version, names = tensorrt_names(wheel) if kind == "tensorrt" else cuda_names(wheel)
    OUT.mkdir(exist_ok=True)
    out = OUT / f"{kind}-{version}.json"
    data = {"dist": kind, "version": version, "wheel": wheel.name,
            "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "method": " ".join(__doc__.split("\n\n")[2:]).replace("\n", " "), "names": names}
    members = tensorrt_members(wheel) if kind == "tensorrt" else None
    if members is not None:
        data["members"] = members
    out.write_text(json.dumps(data, indent=0) + "\n")
    print(f"{out}: {len(names)} names, {len(members or {})} classes")


if __name__ == "__main__":
    main()
