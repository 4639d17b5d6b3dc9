"""The bundle format: `Bundle.open` verifies everything and names the file at fault; `write_bundle` is atomic.

Each tampering test works on its own copy of the session's FITS bundle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import edgeflex as ef
from edgeflex.runtime import store
from edgeflex.runtime.bundle import MANIFEST, write_bundle
from edgeflex.runtime.schema import seal_manifest

GRAPH = "graphs/main.onnx"


def _edit_manifest(path: Path, edit) -> None:
    """Edit the manifest and reseal it, so the deeper check under test is the one that fails."""
    m = json.loads((path / MANIFEST).read_text())
    edit(m)
    (path / MANIFEST).write_text(json.dumps(seal_manifest(m)))


def _open_fails(path: Path, *names: str) -> str:
    with pytest.raises(ef.BundleError) as info:
        ef.Bundle.open(path)
    msg = str(info.value)
    for name in names:
        assert name in msg, msg
    assert "\n" not in msg
    return msg


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_open_good_bundle(copy: Path) -> None:
    b = ef.Bundle.open(copy)
    assert b.path == copy and b.family == "fits"
    assert [c.name for c in b.configs] == ["default"] and b.config().graph == GRAPH
    assert set(b.manifest["files"]) == {GRAPH}
    assert b.read(GRAPH) == (copy / GRAPH).read_bytes()
    with pytest.raises(ef.BundleError, match="'nope'"):
        b.config("nope")


def test_flipped_byte(copy: Path) -> None:
    data = bytearray((copy / GRAPH).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / GRAPH).write_bytes(bytes(data))
    assert "sha256" in _open_fails(copy, GRAPH)


def test_truncated_graph(copy: Path) -> None:
    data = (copy / GRAPH).read_bytes()
    (copy / GRAPH).write_bytes(data[: len(data) - 10])
    _open_fails(copy, GRAPH)


def test_deleted_graph(copy: Path) -> None:
    (copy / GRAPH).unlink()
    assert "missing" in _open_fails(copy, GRAPH)


@pytest.mark.parametrize("extra", ["notes.txt", "graphs/evil.onnx", "engines/x/y.bin"])
def test_unlisted_file(copy: Path, extra: str) -> None:
    (copy / extra).parent.mkdir(parents=True, exist_ok=True)
    (copy / extra).write_bytes(b"hello")
    assert "not listed" in _open_fails(copy, extra)


def test_modified_after_open(copy: Path) -> None:
    b = ef.Bundle.open(copy)
    data = bytearray((copy / GRAPH).read_bytes())
    data[-1] ^= 0xFF
    (copy / GRAPH).write_bytes(bytes(data))
    with pytest.raises(ef.BundleError, match=GRAPH):
        b.read(GRAPH)


def test_manifest_invalid_json(copy: Path) -> None:
    text = (copy / MANIFEST).read_text()
    (copy / MANIFEST).write_text(text[: len(text) // 2])
    assert "corrupted" in _open_fails(copy, MANIFEST)


def test_manifest_missing(copy: Path) -> None:
    (copy / MANIFEST).unlink()
    _open_fails(copy, MANIFEST)


def test_manifest_format_version_2(copy: Path) -> None:
    _edit_manifest(copy, lambda m: m.update(format_version=2))
    assert "version 2" in _open_fails(copy, MANIFEST)


def test_manifest_wrong_format(copy: Path) -> None:
    _edit_manifest(copy, lambda m: m.update(format="something-else"))
    _open_fails(copy, MANIFEST)


@pytest.mark.parametrize("evil", ["../evil", "graphs/../../evil", "/etc/passwd", "./graphs/main.onnx"])
def test_manifest_lists_a_path_outside(copy: Path, evil: str) -> None:
    def edit(m):
        m["files"][evil] = {"sha256": "0" * 64, "bytes": 1}

    _edit_manifest(copy, edit)
    _open_fails(copy, evil)


def test_config_names_an_unlisted_graph(copy: Path) -> None:
    _edit_manifest(copy, lambda m: m["configs"][0].update(graph="graphs/other.onnx"))
    _open_fails(copy, "graphs/other.onnx")


def test_path_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.efx"
    _open_fails(missing, str(missing))
    with pytest.raises(ef.BundleError):
        ef.Runtime(missing)


def test_manifest_file_entry_missing_fields(copy: Path) -> None:
    _edit_manifest(copy, lambda m: m["files"].update({GRAPH: {}}))
    _open_fails(copy, GRAPH)


# --- atomic write ----------------------------------------------------------------------------------------

def _parts(b: ef.Bundle) -> tuple[dict, dict[str, bytes]]:
    files = {rel: b.read(rel) for rel in b.manifest["files"]}
    manifest = {k: v for k, v in b.manifest.items() if k not in ("format", "format_version", "files")}
    return manifest, files


def test_write_bundle_replaces_existing(copy: Path) -> None:
    manifest, files = _parts(ef.Bundle.open(copy))
    manifest["name"] = "second"
    files["graphs/extra.bin"] = b"\x00\x01"
    b = write_bundle(copy, manifest, files, overwrite=True)
    assert b.name == "second" and ef.Bundle.open(copy).name == "second"
    assert set(b.manifest["files"]) == {GRAPH, "graphs/extra.bin"}
    assert os.listdir(copy.parent) == [copy.name]


def test_write_bundle_refuses_an_existing_bundle_by_default_and_bad_suffix(copy: Path) -> None:
    manifest, files = _parts(ef.Bundle.open(copy))
    with pytest.raises(ef.BundleError, match="already exists.*--force"):
        write_bundle(copy, manifest, files)
    with pytest.raises(ef.BundleError, match=r"\.efx"):
        write_bundle(copy.parent / "plain", manifest, files)
    assert os.listdir(copy.parent) == [copy.name]


def _old_intact(copy: Path, name: str) -> None:
    assert ef.Bundle.open(copy).name == name
    assert os.listdir(copy.parent) == [copy.name], _leftovers(copy.parent)


def test_failed_write_midway_keeps_old_bundle(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = ef.Bundle.open(copy)
    manifest, files = _parts(old)
    manifest["name"] = "second"
    real = store.write_file

    def write_file(path, data, **kw):
        real(path, data[: len(data) // 2], **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_file", write_file)
    with pytest.raises(ef.BundleError, match="cannot write bundle.*No space.*nothing was changed"):
        write_bundle(copy, manifest, files, overwrite=True)
    monkeypatch.undo()
    _old_intact(copy, old.name)


def test_failed_swap_keeps_old_bundle(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename that moves the new tree into place fails: the old tree stays."""
    old = ef.Bundle.open(copy)
    manifest, files = _parts(old)
    manifest["name"] = "second"

    def swap(new, dest):
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(store, "_swap", swap)
    with pytest.raises(ef.BundleError, match="busy"):
        write_bundle(copy, manifest, files, overwrite=True)
    monkeypatch.undo()
    _old_intact(copy, old.name)


def test_interrupted_write_keeps_old_bundle(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = ef.Bundle.open(copy)
    manifest, files = _parts(old)

    def fsync_tree(root):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_fsync_tree", fsync_tree)
    with pytest.raises(KeyboardInterrupt):
        write_bundle(copy, manifest, files, overwrite=True)
    monkeypatch.undo()
    _old_intact(copy, old.name)


def test_failed_move_aside_without_exchange_leaves_no_temp_dir(copy: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the file system has no RENAME_EXCHANGE, the old version is moved aside first: that failing
    leaves the old bundle and no temp directory."""
    old = ef.Bundle.open(copy)
    manifest, files = _parts(old)
    real = os.rename

    def rename(src, dst):
        if Path(src) == copy:
            raise OSError(13, "Permission denied")
        return real(src, dst)

    monkeypatch.setenv("EDGEFLEX_NO_RENAME_EXCHANGE", "1")
    monkeypatch.setattr(store.os, "rename", rename)
    with pytest.raises(ef.BundleError, match="Permission denied"):
        write_bundle(copy, manifest, files, overwrite=True)
    monkeypatch.undo()
    _old_intact(copy, old.name)


def test_odd_things_at_the_path_or_inside_are_one_line_errors(copy: Path) -> None:
    """A FIFO planted as the manifest must not hang the open; links loops, NULs, bytes and a file path
    are named, never raised raw."""
    os.rename(copy / MANIFEST, copy.parent / "m.json")
    os.mkfifo(copy / MANIFEST)
    assert "not a regular file" in _open_fails(copy, MANIFEST)
    os.unlink(copy / MANIFEST)
    os.rename(copy.parent / "m.json", copy / MANIFEST)
    (copy.parent / "loop.efx").symlink_to("loop.efx")
    for bad, words in [(copy.parent / "loop.efx", "symbolic links"), (f"{copy}\0x", "null byte"),
                       (bytes(copy), "str or os.PathLike"), (copy / MANIFEST, "is a file"),
                       (None, "str or os.PathLike")]:
        with pytest.raises(ef.BundleError, match=words):
            ef.Bundle.open(bad)
    (copy / "graphs" / "planted").symlink_to("/etc/passwd")
    _open_fails(copy, "graphs/planted", "not listed")
