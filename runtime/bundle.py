"""The bundle format: a directory `NAME.efx/` with `manifest.json` and the files it lists by sha256.

Reading (`Bundle.open`, which verifies everything) and the atomic write that export uses live here, so
both sides agree on one format. What goes *into* a bundle is decided by `edgeflex.export`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np

from edgeflex.errors import BundleError

from . import store
from .families import ConfigKind, parse_kind
from .schema import MAX_MANIFEST_BYTES, check_manifest, check_seal, load_json, seal_manifest
from .store import FORMAT, MANIFEST, SUFFIX

FORMAT_VERSION = 1


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
class Fused:
    """A chained config's fused graph: the chain as one graph, its tensors from the weights file."""

    graph: str
    tensors: dict[str, str]


@dataclass(frozen=True)
class Config:
    """One runnable variant of the model: for a plain model, the only one.

    `graph`: its one graph, or `segments`: the segments it chains, in order; `fused`: that chain as one
    graph, where exported; `costs`: operator-level costs for the latency predictor; `kind`: its family's
    typed fields (`runtime.families`: a DRESS level, an elastic FITS cut level), None for a plain or chained
    config; `precision`: the arithmetic its graphs run in ("fp32", or a reduced-precision variant `edgeflex
    quantize` added: "int8", "fp16", "bf16"), written only when not fp32; `quantization`: for such a variant,
    how it was made and what it measured (its fp32 `base` config, the calibration method, its outputs
    against the fp32 config's, its quality drop). Written to and read from the manifest's config objects as
    they always were; keys no field knows are kept in `unknown`, written back as they were."""

    name: str
    graph: str | None = None
    quality: dict[str, Any] | None = None
    flops: int | None = None
    param_bytes: int | None = None
    segments: tuple[str, ...] = ()
    costs: dict[str, Any] | None = None
    fused: Fused | None = None
    kind: ConfigKind | None = None
    precision: str = "fp32"
    quantization: dict[str, Any] | None = None
    unknown: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    KNOWN: ClassVar[tuple[str, ...]] = ("name", "graph", "quality", "flops", "param_bytes", "segments",
                                        "costs", "fused", "precision", "quantization")

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "config") -> Config:
        """A config from its manifest object (checked by the schema at `Bundle.open`); its kind is the
        registered family kind whose key it has (`runtime.families`)."""
        where = f"{where} {d.get('name')!r}"
        kind = parse_kind(d, where)
        fused = d.get("fused")
        known = set(cls.KNOWN) | ({kind.key} if kind is not None else set())
        return cls(d["name"], d.get("graph"), d.get("quality"), d.get("flops"), d.get("param_bytes"),
                   tuple(d.get("segments", ())), d.get("costs"),
                   Fused(fused["graph"], dict(fused["tensors"])) if fused is not None else None, kind,
                   d.get("precision", "fp32"), d.get("quantization"),
                   {k: v for k, v in d.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        """The manifest object this config reads from (the same keys and values)."""
        d: dict[str, Any] = {"name": self.name}
        if self.graph is not None:
            d["graph"] = self.graph
        d.update(quality=self.quality, flops=self.flops, param_bytes=self.param_bytes)
        if self.segments:
            d["segments"] = list(self.segments)
        if self.costs is not None:
            d["costs"] = self.costs
        if self.fused is not None:
            d["fused"] = {"graph": self.fused.graph, "tensors": dict(self.fused.tensors)}
        if self.kind is not None:
            d[self.kind.key] = self.kind.to_json()
        if self.precision != "fp32":
            d["precision"] = self.precision
        if self.quantization is not None:
            d["quantization"] = self.quantization
        return {**d, **self.unknown}


@dataclass(frozen=True)
class Segment:
    """A graph several configs share. Its large tensors live once in the bundle's weights file;
    `tensors` maps the graph's initializer names to entries of the manifest's tensor index."""

    name: str
    graph: str
    tensors: dict[str, str] = field(default_factory=dict)


class Bundle:
    """An opened, verified bundle: one version of it. Construct with `Bundle.open(path)`; nothing here writes.

    The bundle holds the version it opened (`store.Pinned`): its files are read from that version even
    when `edgeflex export`/`profile`/`compile` swap another in at the path, and no writer removes it
    until `close()` (or the object goes). After `close()`, `read` opens the path again and reads on only
    if the same version is still there (`version`: the sha256 of its manifest), else raises BundleError.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], *, pinned: store.Pinned | None = None,
                 version: str = ""):
        self.path = path
        self.manifest = manifest
        self.version = version
        self._pinned = pinned
        self.name: str = manifest["name"]
        self.family: str = manifest["family"]
        self.inputs = [TensorSpec.from_json(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in manifest["outputs"]]
        self.configs = [Config.from_json(d, f"{path / MANIFEST}: config") for d in manifest["configs"]]
        self.segments = {n: Segment(n, d["graph"], dict(d.get("tensors", {})))
                         for n, d in manifest.get("segments", {}).items()}
        self.tensor_index: dict[str, dict[str, Any]] = manifest.get("tensors", {})

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, family={self.family!r}, configs={len(self.configs)})"

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Let writers remove this version once replaced (reads after this re-open the path, same version
        only)."""
        pinned, self._pinned = self._pinned, None
        if pinned is not None:
            pinned.close()

    @classmethod
    def open(cls, path: str | os.PathLike) -> Bundle:
        """Open a bundle directory, checking its format version and the sha256 of every file."""
        if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
            raise BundleError(f"bundle path must be a str or os.PathLike naming a NAME{SUFFIX}/ directory, "
                              f"got {type(path).__name__}")
        root = Path(path)
        if root.suffix == ".efz":           # a packed bundle: read and verified in memory (runtime/pack.py)
            from .pack import open_pack

            return open_pack(root)
        if not os.path.lexists(root):
            store.recover_missing(root)     # a kill may have left it moved aside (no RENAME_EXCHANGE here)
        pinned = store.Pinned(root)
        try:
            raw, manifest = cls._load_manifest(pinned)
            bundle = cls._verify(root, root / MANIFEST, manifest, pinned, sha256_bytes(raw))
        except BaseException:
            pinned.close()
            raise
        return bundle

    @classmethod
    def _load_manifest(cls, pinned: store.Pinned) -> tuple[bytes, dict[str, Any]]:
        root, mpath = pinned.path, pinned.path / MANIFEST
        try:
            raw = pinned.read(MANIFEST, limit=MAX_MANIFEST_BYTES)
        except BundleError as e:
            if "is missing" in str(e):
                raise BundleError(f"bundle {str(root)!r} has no {MANIFEST}: not a bundle, or a truncated "
                                  "copy") from None
            raise
        manifest = load_json(mpath, raw)
        cls._check_manifest(mpath, manifest)
        return raw, manifest

    @classmethod
    def _verify(cls, root: Path, mpath: Path, manifest: dict[str, Any], pinned: store.Pinned,
                version: str) -> Bundle:
        try:
            cls._check_files(root, manifest, pinned)
            return cls(root, manifest, pinned=pinned, version=version)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"{mpath}: manifest is malformed ({type(e).__name__}: {e}); re-export the "
                              "bundle") from None

    @staticmethod
    def _check_files(root: Path, manifest: dict[str, Any], pinned: store.Pinned) -> None:
        listed = set()
        for rel, meta in manifest["files"].items():     # names and entries: checked by the schema
            listed.add(rel)
            size = pinned.size(rel)
            if size != meta["bytes"]:
                raise BundleError(f"bundle file {rel!r} is {size} bytes, manifest says {meta['bytes']}: "
                                  "truncated or modified; re-export the bundle")
            if pinned.sha256(rel) != meta["sha256"]:
                raise BundleError(f"bundle file {rel!r} fails its sha256 check: modified after export; "
                                  "re-export the bundle")
        for rel in pinned.files():
            if rel != MANIFEST and rel not in listed:
                raise BundleError(f"bundle file {rel!r} is not listed in the manifest: added after export; "
                                  "remove it or re-export")

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
        """The bytes of a listed file of this version, checked again against its sha256."""
        want = self.sha256(rel)
        _safe_relpath(rel)
        data = self._version().read(rel)
        if sha256_bytes(data) != want:
            raise BundleError(f"bundle file {rel!r} fails its sha256 check: modified in place after the "
                              "bundle was opened (edgeflex never does); re-export the bundle")
        return data

    def _version(self) -> store.Pinned:
        """This version, held: the pin taken at open, or after `close()` a new one if the path still holds
        this version."""
        if self._pinned is None:
            pinned = store.Pinned(self.path)
            try:
                raw = pinned.read(MANIFEST, limit=MAX_MANIFEST_BYTES)
            except BaseException:
                pinned.close()
                raise
            if sha256_bytes(raw) != self.version:
                pinned.close()
                raise BundleError(f"bundle {str(self.path)!r} was rewritten since it was opened (a new "
                                  "export, profile or compile): open it again to read the new version")
            self._pinned = pinned
        return self._pinned

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


def model_id(manifest: dict[str, Any]) -> str:
    """What identifies the model a bundle version holds: its manifest and files but for measurements and
    builds added later (`profiles/`, `engines/`), the manifest's own checksum and its signatures
    (`edgeflex sign`). `profile`/`compile`/`sign` keep it; a re-export changes it."""
    later = ("profiles/", "engines/")
    files = {k: v for k, v in manifest.get("files", {}).items() if not k.startswith(later)}
    core = {**{k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256", "signatures")},
            "files": files}
    return sha256_bytes(json.dumps(core, sort_keys=True, separators=(",", ":")).encode())


def write_bundle(path: str | os.PathLike, manifest: dict[str, Any], files: dict[str, bytes],
                 *, overwrite: bool = False) -> Bundle:
    """Write a bundle at `path` atomically (`store.commit`: built beside it, swapped in whole).

    `manifest` gets `format`, `format_version` and `files` (sha256 and size of each) filled in here.
    Something at `path` that is not an edgeflex bundle is never replaced; a bundle only with `overwrite`.
    The new directory's permissions follow the umask. Returns the new version, opened and closed.
    """
    dest = store.target(path, overwrite=overwrite, new=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                "files": {_safe_relpath(rel): {"sha256": sha256_bytes(data), "bytes": len(data)}
                          for rel, data in sorted(files.items())}}

    def fill(tmp: Path) -> None:
        for rel, data in files.items():
            store.write_file(tmp / rel, data)

    with _writing(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with store.writer_lock(dest.parent):
            store.recover(dest)
            store.target(dest, overwrite=overwrite, new=True)      # again, now that no writer can race us
            store.commit(dest, fill, _manifest_bytes(manifest), mode=None)
    return _opened(dest)


def update_bundle(path: str | os.PathLike, files: dict[str, bytes] | Callable[[Bundle], dict[str, bytes]],
                  *, model: str | None = None,
                  edit: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Bundle:
    """Add or replace files of an existing, verified bundle, atomically (a new version swapped in).

    `files` may be a function of the bundle as it is when the writer lock is held (to merge with what is
    there without losing another writer's update). Unchanged files are hard-linked into the new version
    where the file system allows (copied otherwise); the new version keeps the old one's permissions.
    `model`: the `model_id` what is added was made from; refused if the bundle now holds another model
    (re-exported meanwhile). `edit`: a function of the new manifest returning it changed (`edgeflex sign`
    adds its signatures; the files it lists stay). Returns the new version, opened and closed.
    """
    dest = store.target(path, overwrite=True, new=False)
    with _writing(dest), store.writer_lock(dest.parent):
        store.recover(dest)
        with Bundle.open(dest) as old:
            if model is not None and model_id(old.manifest) != model:
                raise BundleError(f"bundle {str(dest)!r} was re-exported meanwhile: what was to be added was "
                                  "made from the model it held before; run the command again")
            add = files(old) if callable(files) else files
            manifest = {k: v for k, v in old.manifest.items() if k not in ("format", "format_version")}
            entries = dict(manifest["files"])
            for rel, data in add.items():
                entries[_safe_relpath(rel)] = {"sha256": sha256_bytes(data), "bytes": len(data)}
            manifest["files"] = dict(sorted(entries.items()))
            if edit is not None:
                manifest = {**edit(manifest), "files": manifest["files"]}
            pinned = old._version()
            mode = os.fstat(pinned.fd).st_mode & 0o7777

            def fill(tmp: Path) -> None:
                for rel in entries:
                    if rel in add:
                        store.write_file(tmp / rel, add[rel], mode=mode & 0o666)
                    else:
                        store.link_or_copy(pinned, rel, tmp / rel)
                store.copy_dir_modes(pinned, tmp, mode)

            store.commit(dest, fill, _manifest_bytes({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                      **manifest}), mode=mode, swapped=old.close)
    return _opened(dest)


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(seal_manifest(manifest), indent=1) + "\n").encode()


def _opened(dest: Path) -> Bundle:
    b = Bundle.open(dest)
    b.close()
    return b


class _writing:
    """Turns an OS error of a write into a one-line BundleError naming the bundle and the cause."""

    def __init__(self, dest: Path):
        self.dest = dest

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if isinstance(err, OSError):
            where = f" ({err.filename})" if err.filename else ""
            raise BundleError(f"cannot write bundle {str(self.dest)!r}: {err.strerror or err}{where}; "
                              "nothing was changed") from None
        return False
