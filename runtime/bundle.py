"""The bundle format: a directory `NAME.efx/` with `manifest.json` and the files it lists by sha256.

Reading (`Bundle.open`, which verifies everything) and the atomic write that export uses live here, so
both sides agree on one format. What goes *into* a bundle is decided by `edgeflex.export`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .errors import BundleError
from .schema import check_manifest, check_seal, read_manifest, seal_manifest

FORMAT = "edgeflex-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUFFIX = ".efx"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_relpath(rel: str) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or rel != p.as_posix():
        raise BundleError(f"bundle file name {rel!r} is not a plain relative path inside the bundle")
    return rel


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (None for a dynamic dimension such as the batch) and dtype of one graph input/output."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def describe(self) -> str:
        dims = ", ".join("batch" if d is None else str(d) for d in self.shape)
        return f"{self.name} [{dims}] {self.dtype}"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Config:
    """One runnable variant of the model: for a plain model, the only one."""

    name: str
    graph: str | None = None
    quality: dict[str, Any] | None = None
    flops: int | None = None
    param_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def segments(self) -> list[str]:
        """The segments this config chains, in order (an elastic bundle); empty for a one-graph config."""
        return list(self.extra.get("segments", []))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Config:
        known = {"name", "graph", "quality", "flops", "param_bytes"}
        return cls(d["name"], d.get("graph"), d.get("quality"), d.get("flops"), d.get("param_bytes"),
                   {k: v for k, v in d.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "graph": self.graph, "quality": self.quality, "flops": self.flops,
             "param_bytes": self.param_bytes, **self.extra}
        return {k: v for k, v in d.items() if not (k == "graph" and v is None)}


@dataclass(frozen=True)
class Segment:
    """A graph several configs share. Its large tensors live once in the bundle's weights file;
    `tensors` maps the graph's initializer names to entries of the manifest's tensor index."""

    name: str
    graph: str
    tensors: dict[str, str] = field(default_factory=dict)


class Bundle:
    """An opened, verified bundle. Construct with `Bundle.open(path)`; nothing here writes."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.family: str = manifest["family"]
        self.inputs = [TensorSpec.from_json(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in manifest["outputs"]]
        self.configs = [Config.from_json(d) for d in manifest["configs"]]
        self.segments = {n: Segment(n, d["graph"], dict(d.get("tensors", {})))
                         for n, d in manifest.get("segments", {}).items()}
        self.tensor_index: dict[str, dict[str, Any]] = manifest.get("tensors", {})

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, family={self.family!r}, configs={len(self.configs)})"

    @classmethod
    def open(cls, path: str | os.PathLike) -> Bundle:
        """Open a bundle directory, checking its format version and the sha256 of every file."""
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"bundle {str(root)!r} not found: expected a directory NAME{SUFFIX}/ "
                              "written by `edgeflex export`")
        mpath = root / MANIFEST
        if not mpath.exists() and not mpath.is_symlink():
            raise BundleError(f"bundle {str(root)!r} has no {MANIFEST}: not a bundle, or a truncated copy")
        manifest = read_manifest(mpath)
        cls._check_manifest(mpath, manifest)
        try:
            return cls._verify(root, mpath, manifest)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"{mpath}: manifest is malformed ({type(e).__name__}: {e}); re-export the "
                              "bundle") from None

    @classmethod
    def _verify(cls, root: Path, mpath: Path, manifest: dict[str, Any]) -> Bundle:
        listed = set()
        for rel, meta in manifest["files"].items():
            fpath = root / _safe_relpath(rel)
            listed.add(rel)
            if not isinstance(meta, dict) or not {"bytes", "sha256"} <= meta.keys():
                raise BundleError(f"manifest entry for bundle file {rel!r} lacks its size or sha256; "
                                  "re-export the bundle")
            if not fpath.is_file():
                raise BundleError(f"bundle file {rel!r} is missing from {root}; re-export the bundle")
            size = fpath.stat().st_size
            if size != meta["bytes"]:
                raise BundleError(f"bundle file {rel!r} is {size} bytes, manifest says {meta['bytes']}: "
                                  "truncated or modified; re-export the bundle")
            if _sha256_file(fpath) != meta["sha256"]:
                raise BundleError(f"bundle file {rel!r} fails its sha256 check: modified after export; "
                                  "re-export the bundle")
        for fpath in root.rglob("*"):
            rel = fpath.relative_to(root).as_posix()
            if fpath.is_file() and rel != MANIFEST and rel not in listed:
                raise BundleError(f"bundle file {rel!r} is not listed in the manifest: added after export; "
                                  "remove it or re-export")
        return cls(root, manifest)

    @staticmethod
    def _check_manifest(mpath: Path, m: Any) -> None:
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise BundleError(f"{mpath}: not an edgeflex manifest (expected \"format\": \"{FORMAT}\")")
        version = m.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:      # not bool: True == 1
            raise BundleError(f"{mpath}: bundle format version {version!r}, this edgeflex reads version "
                              f"{FORMAT_VERSION}; re-export with this edgeflex or upgrade it")
        check_seal(mpath, m)
        check_manifest(mpath, m)

    def sha256(self, rel: str) -> str:
        """The sha256 the manifest lists for a file (what its bytes hash to), without reading it."""
        meta = self.manifest["files"].get(rel)
        if meta is None:
            raise BundleError(f"bundle {self.path} has no file {rel!r}")
        return meta["sha256"]

    def read(self, rel: str) -> bytes:
        """The bytes of a listed file, checked again against its sha256 (files may change after open)."""
        want = self.sha256(rel)
        data = (self.path / _safe_relpath(rel)).read_bytes()
        if sha256_bytes(data) != want:
            raise BundleError(f"bundle file {rel!r} fails its sha256 check: modified after the bundle was "
                              "opened; re-export the bundle")
        return data

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor of the weights file(s), read once (checksummed) as read-only array views."""
        out, blobs = {}, {}
        for tid, t in self.tensor_index.items():
            if t["file"] not in blobs:
                blobs[t["file"]] = self.read(t["file"])
            arr = np.frombuffer(blobs[t["file"]], dtype=np.dtype(t["dtype"]), count=t["bytes"] // np.dtype(
                t["dtype"]).itemsize, offset=t["offset"])
            out[tid] = arr.reshape(t["shape"])
        return out

    def config(self, name: str | None = None) -> Config:
        if name is None:
            return self.configs[0]
        for c in self.configs:
            if c.name == name:
                return c
        known = ", ".join(c.name for c in self.configs)
        raise BundleError(f"bundle {self.name!r} has no config {name!r}; it has: {known}")


def write_bundle(path: str | os.PathLike, manifest: dict[str, Any], files: dict[str, bytes],
                 *, overwrite: bool = True) -> Bundle:
    """Write a bundle atomically: everything goes to a temp dir beside `path`, then one rename.

    `manifest` gets `format`, `format_version` and `files` (sha256 and size of each) filled in here.
    An existing bundle at `path` is replaced only after the new one is complete.
    """
    dest = Path(path)
    if dest.suffix != SUFFIX:
        raise BundleError(f"bundle path {str(dest)!r} must end in {SUFFIX} (e.g. {dest.name}{SUFFIX})")
    if dest.exists() and not overwrite:
        raise BundleError(f"bundle {str(dest)!r} already exists; pass overwrite=True or choose another path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                "files": {_safe_relpath(rel): {"sha256": sha256_bytes(data), "bytes": len(data)}
                          for rel, data in sorted(files.items())}}

    def fill(tmp: Path) -> None:
        for rel, data in files.items():
            fpath = tmp / rel
            fpath.parent.mkdir(parents=True, exist_ok=True)
            fpath.write_bytes(data)

    return _commit(dest, manifest, fill)


def _commit(dest: Path, manifest: dict[str, Any], fill) -> Bundle:
    """Build the bundle in a temp dir beside `dest` (`fill` writes the files, then the manifest), fsync it,
    swap it in; on any failure remove the temp dir and leave `dest` as it was."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        (tmp / MANIFEST).write_text(json.dumps(seal_manifest(manifest), indent=1) + "\n")
        _fsync_tree(tmp)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.open(dest)


def _fsync_tree(root: Path) -> None:
    for fpath in root.rglob("*"):
        if fpath.is_file():
            with open(fpath, "rb") as f:
                os.fsync(f.fileno())


def _replace_dir(new: Path, dest: Path) -> None:
    # NOTE: a directory cannot be swapped in one rename over a non-empty one; the old copy is moved
    # aside first and removed only once the new one is in place, so one of them is always whole.
    if not dest.exists():
        os.rename(new, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    try:
        os.rename(dest, old / dest.name)
    except BaseException:
        old.rmdir()
        raise
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(old / dest.name, dest)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def update_bundle(path: str | os.PathLike, files: dict[str, bytes]) -> Bundle:
    """Add or replace files of an existing, verified bundle, atomically (a new directory swapped in).

    Unchanged files are hard-linked into the new copy where the file system allows (copied otherwise).
    """
    old = Bundle.open(path)
    dest = old.path
    manifest = {k: v for k, v in old.manifest.items() if k not in ("format", "format_version")}
    entries = dict(manifest["files"])
    for rel, data in files.items():
        entries[_safe_relpath(rel)] = {"sha256": sha256_bytes(data), "bytes": len(data)}
    manifest["files"] = dict(sorted(entries.items()))

    def fill(tmp: Path) -> None:
        for rel in entries:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if rel in files:
                target.write_bytes(files[rel])
                continue
            try:
                os.link(dest / rel, target)
            except OSError:
                shutil.copy2(dest / rel, target)

    return _commit(dest, {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}, fill)
