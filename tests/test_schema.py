"""The manifest schema and seal (issue 16, item 7): an edited manifest fails `Bundle.open` in one line naming
the field, never later as a raw error or a silently different model.

Explicit cases for each reported hole, then a Hypothesis suite that mutates a real bundle's manifest (delete a
key, replace a value with one of another type, nudge a number, duplicate a list element), reseals it, and
accepts only a correct result (the outputs of one of the unmutated bundle's configs) or an EdgeflexError,
from the API and from `edgeflex info`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgeflex as ef
from edgeflex.cli import main as cli
from edgeflex.errors import EdgeflexError
from edgeflex.runtime.bundle import MANIFEST
from edgeflex.runtime.schema import SEAL, seal_manifest

# Cases each property test ran, reported at the end of the session (pytest -s, or the summary below).
RAN: dict[str, dict[str, int]] = {}
REFS: dict[str, tuple] = {}         # per bundle fixture: a valid input and every config's output for it


@pytest.fixture(scope="module")
def dress_bundle(tmp_path_factory) -> Path:
    """The small DRESS MLP bundle of tests/test_elastic.py (four levels, dense and row-sparse graphs)."""
    from edgeflex.export.elastic import export_dress
    from edgeflex.models.dress import DressModel, build_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dress") / "mlp.efx"
    export_dress(DressModel(build_backbone("mlp")).eval(), torch.randn(2, 1, 8, 8), path)
    return path


def _copy(src: Path, dest: Path) -> Path:
    """The bundle at `dest`: files hard-linked (never written here), the manifest a copy of its own."""
    shutil.copytree(src, dest, copy_function=os.link, ignore=shutil.ignore_patterns(MANIFEST))
    shutil.copy(src / MANIFEST, dest / MANIFEST)
    return dest


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def _write(path: Path, m: Any, *, seal: bool = True) -> None:
    (path / MANIFEST).unlink()
    (path / MANIFEST).write_text(json.dumps(seal_manifest(m) if seal and isinstance(m, dict) else m))


def _edit(src: Path, tmp: Path, edit) -> Path:
    path = _copy(src, tmp / "b.efx")
    m = _manifest(path)
    edit(m)
    _write(path, m)
    return path


def _open_fails(path: Path, *words: str) -> str:
    with pytest.raises(ef.BundleError) as info:
        ef.Bundle.open(path)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


# --- the reported cases -------------------------------------------------------------------------------------

def test_input_dtype_nonsense(fits_bundle, tmp_path):
    path = _edit(fits_bundle, tmp_path, lambda m: m["inputs"][0].update(dtype="nonsense"))
    _open_fails(path, "inputs[0].dtype", "'nonsense'", "float32")


def test_tensor_offset_negative(snnet_bundle, tmp_path):
    tid = next(iter(_manifest(snnet_bundle[1])["tensors"]))
    path = _edit(snnet_bundle[1], tmp_path, lambda m: m["tensors"][tid].update(offset=-8))
    _open_fails(path, f"tensors[{tid!r}].offset is -8", "an int in 0..")


def test_tensor_outside_its_file_and_wrong_size(snnet_bundle, tmp_path):
    tid = next(iter(_manifest(snnet_bundle[1])["tensors"]))
    path = _edit(snnet_bundle[1], tmp_path, lambda m: m["tensors"][tid].update(offset=10**9))
    _open_fails(path, f"tensors[{tid!r}].offset", "within 'weights.bin'")
    path = _edit(snnet_bundle[1], tmp_path / "2", lambda m: m["tensors"][tid].update(dtype="<f2"))
    _open_fails(path, f"tensors[{tid!r}].bytes")


def test_manifest_is_a_directory(fits_bundle, tmp_path):
    path = _copy(fits_bundle, tmp_path / "b.efx")
    (path / MANIFEST).unlink()
    (path / MANIFEST).mkdir()
    _open_fails(path, MANIFEST, "not a regular file")
    assert cli(["info", str(path)]) == 2


def test_dress_level_99(dress_bundle, tmp_path):
    path = _edit(dress_bundle, tmp_path, lambda m: m["configs"][2]["dress"].update(level=99))
    _open_fails(path, "configs[2].dress.level is 99", "0..3")


def test_dress_level_beyond_the_densities(dress_bundle, tmp_path):
    def edit(m):
        m["dress"]["densities"] = m["dress"]["densities"][:2]
    path = _edit(dress_bundle, tmp_path, edit)
    _open_fails(path, "configs[2].dress.level is 2", "0..1")


def test_duplicate_config_names(fits_bundle, tmp_path):
    path = _edit(fits_bundle, tmp_path, lambda m: m["configs"].append(dict(m["configs"][0])))
    _open_fails(path, "configs[1]", "'default'", "not used before")


def test_format_version_true(fits_bundle, tmp_path):
    path = _edit(fits_bundle, tmp_path, lambda m: m.update(format_version=True))
    _open_fails(path, "format version True")


def test_unsealed_edit_and_missing_seal(fits_bundle, tmp_path):
    path = _copy(fits_bundle, tmp_path / "b.efx")
    m = _manifest(path)
    assert m[SEAL] == seal_manifest(m)[SEAL]           # written sealed by export
    m["configs"][0]["flops"] = 1
    _write(path, m, seal=False)
    _open_fails(path, "fails its checksum", "re-export")
    del m[SEAL]
    _write(path, m, seal=False)
    _open_fails(path, "no checksum", "older edgeflex or edited")


@pytest.mark.parametrize("text, words", [
    (b'{"a": NaN}', ["NaN"]), (b'{"a": 1, "a": 2}', ["duplicate key 'a'"]), (b"\xff\xfe{}", ["utf-8"]),
    (b"[1, 2]", ["format"])])
def test_manifest_json_refused(fits_bundle, tmp_path, text, words):
    path = _copy(fits_bundle, tmp_path / "b.efx")
    (path / MANIFEST).unlink()
    (path / MANIFEST).write_bytes(text)
    _open_fails(path, *words)


def test_manifest_symlink_unreadable_huge(fits_bundle, tmp_path):
    path = _copy(fits_bundle, tmp_path / "b.efx")
    real = tmp_path / "elsewhere.json"
    shutil.move(path / MANIFEST, real)
    (path / MANIFEST).symlink_to(real)
    _open_fails(path, "symlink")
    (path / MANIFEST).unlink()
    with open(path / MANIFEST, "wb") as f:              # sparse: 65 MiB without writing them
        f.truncate(65 << 20)
    _open_fails(path, "over the 64 MiB")
    if os.geteuid() != 0:                               # root reads anything
        (path / MANIFEST).unlink()
        shutil.copy(real, path / MANIFEST)
        (path / MANIFEST).chmod(0)
        _open_fails(path, "cannot be read")


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["configs"][0].update(quality={"metric": "mse", "value": "low"}), ["quality.value"]),
    (lambda m: m["files"].update({"a/../../x": {"bytes": 1, "sha256": "0" * 64}}), ["a/../../x"]),
    (lambda m: m["files"]["graphs/main.onnx"].update(sha256="A" * 64), ["sha256", "lowercase hex"]),
    (lambda m: m["inputs"][0].update(shape=[None, 0]), ["inputs[0].shape[1] is 0"]),
    (lambda m: m["model"].update(parameters="many"), ["model.parameters"]),
    (lambda m: m["configs"][0].update(flops=10**400), ["configs[0].flops", "2**63-1"]),
    (lambda m: m["configs"][0].update(quality={"metric": "mse", "value": 10**400}), ["quality.value"]),
    (lambda m: m.update(name=""), ["name is ''"]),
])
def test_fits_fields(fits_bundle, tmp_path, edit, words):
    _open_fails(_edit(fits_bundle, tmp_path, edit), *words)


def test_cli_reports_a_bad_manifest_in_one_line(fits_bundle, tmp_path, capsys):
    path = _edit(fits_bundle, tmp_path, lambda m: m["configs"][0].update(flops=-1))
    assert cli(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "configs[0].flops is -1" in err and "Traceback" not in err


def test_written_bundles_are_sealed(fits_bundle, tmp_path):
    from edgeflex.runtime.bundle import update_bundle

    path = _copy(fits_bundle, tmp_path / "b.efx")
    b = update_bundle(path, {"extra/note.txt": b"hi"})
    assert b.manifest[SEAL] == seal_manifest(b.manifest)[SEAL] == _manifest(path)[SEAL]


# --- Hypothesis: mutate a real manifest, reseal, accept only a right answer or an EdgeflexError -------------

LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.sampled_from([-1, -8, 0, 1, 2, 3, 99, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "nonsense", "<f4", "float16", "../x"]))
VALUE = st.one_of(LEAF, st.lists(LEAF, max_size=4), st.lists(st.integers(0, 9), min_size=50, max_size=300),
                  st.dictionaries(st.text(max_size=6), LEAF, max_size=3))


def _mutate(data: st.DataObject, m: dict[str, Any]) -> str:
    """Apply one generated mutation to `m` in place; return its description."""
    parent, key, node, where = None, None, m, "$"
    while isinstance(node, (dict, list)) and node and (parent is None or data.draw(st.integers(0, 3)) > 0):
        keys = sorted(node, key=str) if isinstance(node, dict) else list(range(len(node)))
        k = data.draw(st.sampled_from(keys))
        if isinstance(node, dict) and k == SEAL:
            break
        parent, key, node, where = node, k, node[k], f"{where}[{k!r}]"
    if parent is None:
        return "none"
    kinds = ["replace", "delete"] + (["nudge"] if type(node) in (int, float) else []) \
        + (["duplicate"] if isinstance(node, list) and node else [])
    kind = data.draw(st.sampled_from(kinds))
    if kind == "delete":
        del parent[key]
    elif kind == "nudge":
        parent[key] = node + data.draw(st.sampled_from([-1, 1, -node - 1, 2 * node + 1]))
    elif kind == "duplicate":
        node.insert(data.draw(st.integers(0, len(node))), json.loads(json.dumps(node[data.draw(
            st.integers(0, len(node) - 1))])))
    else:
        parent[key] = data.draw(VALUE)
    return f"{kind} {where}"


def _reference(path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """A valid input and what every config of the unmutated bundle gives for it."""
    rt = ef.Runtime(path, threads=1)
    shape = [1 if d is None else d for d in rt.inputs[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(rt.inputs[0].dtype)
    outs = []
    for c in rt.configs:
        rt.switch(c.name)
        outs.append(rt.run(x))
    return x, outs


def _check_mutated(src: Path, data: st.DataObject, x: np.ndarray, refs: list[np.ndarray],
                   tally: dict[str, int]) -> None:
    with tempfile.TemporaryDirectory(prefix="edgeflex-schema-") as tmp:
        path = _copy(src, Path(tmp) / "b.efx")
        m = _manifest(path)
        what = _mutate(data, m)
        _write(path, m)
        try:
            ef.Bundle.open(path)
            y = ef.Runtime(path, threads=1).run(x)
            assert any(np.allclose(y, r, rtol=1e-4, atol=1e-5) for r in refs), f"{what}: a different answer"
            tally["ran"] += 1
        except EdgeflexError as e:
            assert "\n" not in str(e), f"{what}: {e}"
            tally["refused"] += 1
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli(["info", str(path), "--threads", "1"])
        msg = err.getvalue().strip()
        assert rc == 0 or (rc == 2 and msg.startswith("edgeflex: error:") and "\n" not in msg
                           and "Traceback" not in msg), f"{what}: edgeflex info exit {rc}: {msg}"


def _property(fixture: str, examples: int):
    """A property test on `fixture`'s bundle; EDGEFLEX_FUZZ=N runs N times the examples (a longer hunt)."""
    examples = int(examples * float(os.environ.get("EDGEFLEX_FUZZ", "1")))

    @settings(max_examples=examples, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def test(request, data):
        src = request.getfixturevalue(fixture)
        src = src[1] if isinstance(src, tuple) else src
        if fixture not in REFS:
            REFS[fixture] = _reference(src)
        tally = RAN.setdefault(fixture, {"ran": 0, "refused": 0})
        _check_mutated(src, data, *REFS[fixture], tally)
    return test


test_mutated_fits_manifest = _property("fits_bundle", 150)
test_mutated_dress_manifest = _property("dress_bundle", 100)
test_mutated_snnet_manifest = _property("snnet_bundle", 40)


def test_zz_report_generated_cases():
    """Says how many generated manifests each property test ran (-s shows it; zz: runs after them)."""
    print("\ngenerated manifest mutations:", json.dumps(RAN))
    assert all(t["ran"] + t["refused"] > 0 for t in RAN.values())


# --- a TVM library truncated, its checksums re-fixed: refused in one line, not SIGBUS --------------------

def _elf64(machine: int = 62, phnum: int = 0, phoff: int = 64) -> bytes:
    """A bare ELF64 little-endian shared-object header (no tables unless `phnum`)."""
    import struct

    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHIQQQIHHHHHH", 3, machine, 1, 0, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)


@pytest.mark.parametrize("data, words", [
    (b"MZ" + bytes(100), ["no ELF32/ELF64 header"]), (_elf64()[:40], ["header cut short"]),
    (_elf64(machine=183), ["built for aarch64, this is x86_64"]),
    (_elf64(phnum=3), ["program header table (3 x 56 bytes at 64) past the end"])])
def test_check_elf_refuses(data, words):
    from edgeflex.runtime.backends.tvm import check_elf

    with pytest.raises(ef.BundleError) as info:
        check_elf(data, "lib.so", "x86_64")
    assert all(w in str(info.value) for w in words), str(info.value)
    check_elf(_elf64(), "lib.so", "x86_64")             # the bare header itself is fine


@pytest.fixture(scope="module")
def fits_tvm_bundle(fits_bundle, tmp_path_factory) -> Path:
    pytest.importorskip("tvm", reason="apache-tvm is not installed")
    from edgeflex.compile.tvm import compile_bundle

    path = tmp_path_factory.mktemp("tvm") / "fits.efx"
    shutil.copytree(fits_bundle, path)
    compile_bundle(path, "host", batch1=False)          # one library, ~4 s
    return path


_LOAD = """
import sys
import edgeflex as ef
try:
    ef.Runtime(sys.argv[1], backend="tvm", allow_native=True)
except ef.BundleError as e:
    print(e)
    sys.exit(3)
"""


def _load_in_subprocess(path: Path, tmpdir: Path) -> subprocess.CompletedProcess:
    """Load the bundle on TVM in a fresh process whose temp dir is `tmpdir` (where private copies go)."""
    return subprocess.run([sys.executable, "-c", _LOAD, str(path)], env={**os.environ, "TMPDIR": str(tmpdir)},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cut", ["half", "last byte"])
def test_truncated_tvm_library_refused_not_sigbus(fits_tvm_bundle, tmp_path, cut):
    private = tmp_path / "private"
    private.mkdir()
    if cut == "half":                                   # once: a good load removes its private copy
        ok = _load_in_subprocess(fits_tvm_bundle, private)
        assert ok.returncode == 0 and not list(private.iterdir()), ok.stderr[-800:]
    path = _copy(fits_tvm_bundle, tmp_path / "t.efx")
    so = next(path.rglob("*.so"))
    data = so.read_bytes()
    data = data[: len(data) // 2] if cut == "half" else data[:-1]
    so.unlink()                                         # hard-linked: replace, never write through
    so.write_bytes(data)
    m = _manifest(path)
    rel = so.relative_to(path).as_posix()
    m["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write(path, m)                                     # checksums re-fixed and the manifest resealed
    r = _load_in_subprocess(path, private)
    assert r.returncode == 3, f"exit {r.returncode} (a negative one is a signal): {r.stderr[-800:]}"
    msg = r.stdout.strip()
    assert "\n" not in msg and "TVM library main.so" in msg and "past the end" in msg, msg
    assert not list(private.iterdir())                  # no private copy left behind


def test_profile_json_checked_where_read(fits_bundle, tmp_path):
    from edgeflex.runtime.bundle import update_bundle

    path = _copy(fits_bundle, tmp_path / "b.efx")
    prof = {"format": 1, "device": "host", "configs": {"default": {"p50_ms": "fast", "p90_ms": 1.0}}}
    update_bundle(path, {"profiles/host.json": json.dumps(prof).encode()})
    with pytest.raises(ef.BundleError, match=r"profiles/host.json.*configs\['default'\].p50_ms is 'fast'"):
        ef.Runtime(path).latency_profile()
    update_bundle(path, {"profiles/host.json": b'{"format": 1, "format": 1, "configs": {}}'})
    with pytest.raises(ef.BundleError, match="duplicate key 'format'"):
        ef.Runtime(path).latency_profile()


@pytest.mark.parametrize("field, value, words", [
    ("entry", 5, ["entry is 5"]), ("library", "engines/tvm/host/gone.so", ["a library the manifest lists"]),
    ("params", [{"name": "w", "shape": [-1], "dtype": "float32"}], ["params[0].shape[0] is -1"])])
def test_tvm_engine_record_checked_where_read(fits_tvm_bundle, tmp_path, field, value, words):
    from edgeflex.runtime.bundle import update_bundle

    path = _copy(fits_tvm_bundle, tmp_path / "t.efx")
    rel = "engines/tvm/host/main.json"
    rec = {**json.loads((path / rel).read_text()), field: value}
    update_bundle(path, {rel: json.dumps(rec).encode()})
    with pytest.raises(ef.BundleError) as info:
        ef.Runtime(path, backend="tvm", allow_native=True)
    assert rel in str(info.value) and all(w in str(info.value) for w in words), str(info.value)
