"""Bundle writes you can trust (issue 16): nothing that is not a bundle is replaced; readers in other
processes never see a torn version while `profile`/`export` rewrite; a kill at every step of a write
leaves a whole bundle and, after the next write or open, nothing else; modes follow the umask.

The kill tests stop a real writing process by SIGKILL at each step (`store.fault`, EDGEFLEX_FAULT).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeflex as ef
from edgeflex.cli import main as cli
from edgeflex.runtime import store
from edgeflex.runtime.bundle import update_bundle, write_bundle
from edgeflex.runtime.profiles import measure_profile, save_profile

TAG = "notes/tag.txt"


def _parts(path: Path) -> tuple[dict, dict[str, bytes]]:
    with ef.Bundle.open(path) as b:
        files = {rel: b.read(rel) for rel in b.manifest["files"]}
        manifest = {k: v for k, v in b.manifest.items()
                    if k not in ("format", "format_version", "files", "manifest_sha256")}
    return manifest, files


def _siblings(path: Path) -> list[str]:
    return sorted(os.listdir(path.parent))


# --- never replace what is not a bundle ---------------------------------------------------------------------

def _user_tree(path: Path) -> None:
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "t.txt").write_text("thesis")


@pytest.mark.parametrize("force", [False, True])
def test_export_refuses_a_directory_that_is_not_a_bundle(fits_model, tmp_path: Path, force: bool) -> None:
    import torch
    path = tmp_path / "p.efx"
    _user_tree(path)
    with pytest.raises(ef.BundleError, match="not an edgeflex bundle"):
        ef.export(fits_model, torch.randn(2, 24, 3), path, overwrite=force)
    assert (path / "sub" / "t.txt").read_text() == "thesis" and _siblings(path) == ["p.efx"]


def test_export_refuses_a_plain_file(fits_model, tmp_path: Path) -> None:
    import torch
    path = tmp_path / "p.efx"
    path.write_text("thesis")
    with pytest.raises(ef.BundleError, match="is a file that is not an edgeflex bundle"):
        ef.export(fits_model, torch.randn(2, 24, 3), path, overwrite=True)
    assert path.read_text() == "thesis"


@pytest.mark.parametrize("args", [[], ["--force"]])
def test_cli_export_refuses_a_users_directory_before_any_work(tmp_path: Path, capsys, args) -> None:
    path = tmp_path / "p.efx"
    _user_tree(path)
    code = cli(["export", "--model", "fits", "--out", str(path), *args])
    err = capsys.readouterr().err
    assert code != 0 and "not an edgeflex bundle" in err and "Traceback" not in err
    assert (path / "sub" / "t.txt").read_text() == "thesis" and _siblings(path) == ["p.efx"]


def test_cli_export_replaces_a_bundle_only_with_force(tmp_path: Path, capsys) -> None:
    path = tmp_path / "p.efx"
    assert cli(["export", "--model", "fits", "--out", str(path)]) == 0
    first = ef.Bundle.open(path).version
    capsys.readouterr()
    assert cli(["export", "--model", "fits", "--out", str(path)]) != 0
    assert "already exists" in capsys.readouterr().err and ef.Bundle.open(path).version == first
    assert cli(["export", "--model", "fits", "--out", str(path), "--force"]) == 0
    assert ef.Bundle.open(path).version != first and _siblings(path) == ["p.efx"]


def test_hidden_siblings_that_are_not_ours_survive_writes(copy: Path) -> None:
    mine = [copy.parent / f".{copy.name}.tmp-mine", copy.parent / f".{copy.name}.old-notes"]
    for d in mine:
        d.mkdir()
        (d / "keep.txt").write_text("mine")
    manifest, files = _parts(copy)
    write_bundle(copy, manifest, files, overwrite=True)
    update_bundle(copy, {TAG: b"x"})
    assert all((d / "keep.txt").read_text() == "mine" for d in mine)


def test_a_symlink_to_a_bundle_is_updated_through(copy: Path) -> None:
    link = copy.parent / "link.efx"
    link.symlink_to(copy, target_is_directory=True)
    update_bundle(link, {TAG: b"through"})
    assert link.is_symlink() and ef.Bundle.open(copy).read(TAG) == b"through"


# --- readers hold their version ---------------------------------------------------------------------------

def test_an_open_bundle_keeps_its_version_until_closed(copy: Path) -> None:
    manifest, files = _parts(copy)
    held = ef.Bundle.open(copy)
    write_bundle(copy, {**manifest, "name": "second"}, {**files, TAG: b"second"}, overwrite=True)
    assert ef.Bundle.open(copy).name == "second"
    assert held.name == manifest["name"]
    assert all(held.read(rel) == data for rel, data in files.items())     # the old version, whole
    kept = [n for n in _siblings(copy) if n != copy.name]
    assert len(kept) == 1 and ".old-" in kept[0]           # kept while held, named as replaced
    held.close()
    with pytest.raises(ef.BundleError, match="rewritten since it was opened"):
        held.read(next(iter(files)))                       # closed: never reads another version
    update_bundle(copy, {TAG: b"third"})
    assert _siblings(copy) == [copy.name]                  # the next write removed the unheld old one


def test_a_runtime_keeps_its_profiles_until_asked_and_refuses_another_models(copy: Path) -> None:
    rt = ef.Runtime(copy, threads=1)
    x = np.random.default_rng(0).standard_normal((1, 24, 3)).astype(np.float32)
    y = rt.run(x)
    with pytest.raises(ef.BudgetError, match="no latency profile"):
        rt.query(ef.Budget(latency_ms=100))
    prof = measure_profile(rt, min_runs=4, min_seconds=0.01, memory=False, progress=False, rounds=1)
    save_profile(copy, prof)
    with pytest.raises(ef.BudgetError, match="no latency profile"):
        rt.query(ef.Budget(latency_ms=100))                # still the version it opened
    assert rt.reload_profiles() == ["profiles/host.json"]
    assert [r["name"] for r in rt.query(ef.Budget(latency_ms=1000))] == ["default"]
    save_profile(copy, prof)                               # the same model, profiled again: fine
    assert rt.query(ef.Budget(latency_ms=1000))

    manifest, files = _parts(copy)
    write_bundle(copy, {**manifest, "name": "other"}, files, overwrite=True)    # a re-export
    with pytest.raises(ef.BundleError, match="re-exported since this runtime opened it"):
        rt.reload_profiles()
    with pytest.raises(ef.BundleError, match="re-exported meanwhile"):
        save_profile(copy, prof)
    np.testing.assert_array_equal(rt.run(x), y)           # still runs the model it loaded
    assert rt.query(ef.Budget(latency_ms=1000))


# --- modes --------------------------------------------------------------------------------------------------

def _modes(path: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in [path, *path.rglob("*")]}


@pytest.mark.parametrize("mask,want", [(0o022, {0o755, 0o644}), (0o077, {0o700, 0o600})])
def test_written_bundles_follow_the_umask(copy: Path, mask: int, want: set[int]) -> None:
    manifest, files = _parts(copy)
    old = os.umask(mask)
    try:
        write_bundle(copy, manifest, files, overwrite=True)
    finally:
        os.umask(old)
    assert _modes(copy) == want


def test_an_update_keeps_the_bundles_permissions(copy: Path) -> None:
    for p in [copy, *copy.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    old = os.umask(0o077)
    try:
        update_bundle(copy, {"profiles/host.json": b"{}", TAG: b"x"})    # new folders and files too
    finally:
        os.umask(old)
    assert _modes(copy) == {0o755, 0o644}


# --- kill at every step ------------------------------------------------------------------------------------

_WRITER = """
import sys
from edgeflex.runtime.bundle import Bundle, update_bundle, write_bundle
path, kind = sys.argv[1], sys.argv[2]
with Bundle.open(path) as b:
    files = {rel: b.read(rel) for rel in b.manifest["files"]}
    m = {k: v for k, v in b.manifest.items()
         if k not in ("format", "format_version", "files", "manifest_sha256")}
if kind == "export":
    write_bundle(path, {**m, "name": "new"}, {**files, "notes/new.txt": b"new"}, overwrite=True)
else:
    update_bundle(path, {"notes/new.txt": b"new"})
"""


def _killed_write(path: Path, kind: str, step: str, **env: str) -> None:
    run = subprocess.run([sys.executable, "-c", _WRITER, str(path), kind], capture_output=True, text=True,
                         env={**os.environ, "EDGEFLEX_FAULT": step, **env}, timeout=120)
    assert run.returncode == -9, (step, run.returncode, run.stderr[-2000:])


@pytest.mark.parametrize("kind", ["export", "update"])
@pytest.mark.parametrize("step", store.WRITE_STEPS)
def test_a_kill_at_any_step_of_a_write_leaves_a_whole_bundle(copy: Path, kind: str, step: str) -> None:
    old = ef.Bundle.open(copy).version
    _killed_write(copy, kind, step)
    b = ef.Bundle.open(copy)                                       # whole: the old or the new
    done = store.WRITE_STEPS.index(step) >= store.WRITE_STEPS.index("swapped")
    assert (b.version != old) == done
    assert ("notes/new.txt" in b.manifest["files"]) == done
    b.close()
    update_bundle(copy, {"notes/after.txt": b"after"})           # the next write cleans up
    assert _siblings(copy) == [copy.name]
    assert ef.Bundle.open(copy).read("notes/after.txt") == b"after"


@pytest.mark.parametrize("kind", ["export", "update"])
def test_a_kill_between_the_two_renames_without_exchange_is_recovered_at_open(copy: Path, kind: str) -> None:
    """Where the file system has no RENAME_EXCHANGE, the old version is moved aside before the new one
    goes in: a kill between leaves no bundle at the path, and the next open puts the old one back."""
    old = ef.Bundle.open(copy).version
    _killed_write(copy, kind, "aside", EDGEFLEX_NO_RENAME_EXCHANGE="1")
    assert not copy.exists()
    assert ef.Bundle.open(copy).version == old
    assert _siblings(copy) == [copy.name]


# --- readers in other processes while profile and export rewrite ------------------------------------------

_READER = """
import json, sys, time
from edgeflex.runtime.bundle import Bundle
from edgeflex.errors import BundleError
path, seconds = sys.argv[1], float(sys.argv[2])
opens, errors, names = 0, [], set()
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with Bundle.open(path) as b:
            tag = b.read("notes/tag.txt")
            name = b.name.encode()
            if tag != name * (len(tag) // len(name)) or len(tag) % len(name):
                errors.append(f"{b.name} with tag {tag[:20]!r}")
            for rel in b.manifest["files"]:
                b.read(rel)
            names.add(b.name)
        opens += 1
    except BundleError as e:
        errors.append(str(e))
print(json.dumps({"opens": opens, "errors": errors[:5], "n_errors": len(errors), "versions": len(names)}))
"""

_REWRITER = """
import json, sys, time
from edgeflex.runtime.bundle import Bundle, update_bundle, write_bundle
from edgeflex.runtime.profiles import save_profile
path, seconds = sys.argv[1], float(sys.argv[2])
with Bundle.open(path) as b:
    files = {rel: b.read(rel) for rel in b.manifest["files"] if rel != "notes/tag.txt"}
    m = {k: v for k, v in b.manifest.items()
         if k not in ("format", "format_version", "files", "manifest_sha256")}
writes, i = 0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    i += 1
    if i % 2:      # a re-export: every file new, the tag matching the name
        name = f"v{i}"
        write_bundle(path, {**m, "name": name}, {**files, "notes/tag.txt": name.encode() * (i % 5 + 1)},
                     overwrite=True)
    else:          # a profile: one file added or replaced, the rest hard-linked
        stats = {"p50_ms": 0.1, "p90_ms": 0.1 + i * 1e-4}
        save_profile(path, {"format": 1, "device": "host", "obtained": "measured", "batch": 1,
                            "env": {"threads": 1, "pad": "x" * (i % 97)}, "configs": {"default": stats}},
                     merge=bool(i % 4))
    writes += 1
print(json.dumps({"writes": writes}))
"""


def test_readers_in_other_processes_never_see_a_torn_bundle(copy: Path) -> None:
    manifest, files = _parts(copy)
    write_bundle(copy, {**manifest, "name": "v0"}, {**files, TAG: b"v0"}, overwrite=True)
    seconds = "6"
    readers = [subprocess.Popen([sys.executable, "-c", _READER, str(copy), seconds], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    writer = subprocess.run([sys.executable, "-c", _REWRITER, str(copy), seconds], capture_output=True,
                            text=True, timeout=120)
    assert writer.returncode == 0, writer.stderr[-2000:]
    results = []
    for r in readers:
        out, err = r.communicate(timeout=120)
        assert r.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    writes = json.loads(writer.stdout)["writes"]
    print(f"\n{writes} rewrites, reads: {results}")
    assert writes >= 10
    for res in results:
        assert res["n_errors"] == 0, res
        assert res["opens"] >= 20 and res["versions"] >= 2, res
    assert ef.Bundle.open(copy).name.startswith("v")
    # readers have exited: every old version is unheld, the next write removes them all
    update_bundle(copy, {"notes/after.txt": b"x"})
    assert _siblings(copy) == [copy.name]
