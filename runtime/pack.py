"""Packed bundles: one file `NAME.efz` holding a bundle's manifest and every file, compressed, and delta
packs `NAME.efzd` that hold only what a base pack lacks. Owns the format, reading it (into memory, never
trusting it: every member's sha256 is checked against the manifest after decompression), writing it
atomically, unpacking it through `store.commit`, and rebuilding a pack from a base and a delta.

Layout: a 16-byte header (magic, format version, kind), the compressed data, a zstd-compressed JSON index,
and a 24-byte trailer at the very end (the index's offset and length, then an end magic), so a reader
seeks to the end, reads the index, and from it to any tensor. Float32 tensors are stored as four byte
planes (the sign bit rotated down, so the top byte is the exponent), each zstd-compressed where that is
smaller; the rest (and a tensor where plain zstd is smaller) as plain zstd frames. Signatures: `sign.py`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import zstandard

from edgeflex.errors import BundleError

from . import store
from .bundle import Bundle, _writing
from .schema import MAX_MANIFEST_BYTES, load_json
from .store import MANIFEST

PACK_SUFFIX, DELTA_SUFFIX = ".efz", ".efzd"
MAGIC = b"\x89EFZ\r\n\x1a\n"           # PNG-style: a text-mode copy or a truncated first line shows
END_MAGIC = b"EFZINDEX"
PACK_VERSION = 1
KINDS = {0: "full", 1: "delta"}
HEADER = struct.Struct("<8sII")         # magic, version, kind
TRAILER = struct.Struct("<QQ8s")        # index offset, index length, end magic
MAX_INDEX_BYTES = 64 << 20              # decompressed; a real index is kilobytes
MAX_UNPACKED = 64 << 30                 # the most a pack may unpack to, all members together (`limit=`)
MIN_PLANES = 4096                       # smaller float tensors go into the plain zstd stream around them
LEVEL = 9                               # zstd level: the exponent plane compresses alike at 3..19


def _sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# --- byte planes -----------------------------------------------------------------------------------------

def to_planes(data: bytes | memoryview) -> list[bytes]:
    """float32 bytes -> four planes: the exponent byte first (after rotating the sign bit to the bottom),
    then the three bytes holding the mantissa, high to low (the last one ends with the sign)."""
    u = np.frombuffer(data, dtype="<u4")
    r = ((u << np.uint32(1)) | (u >> np.uint32(31))).view(np.uint8).reshape(-1, 4)
    return [r[:, 3 - i].tobytes() for i in range(4)]


def from_planes(planes: list[bytes]) -> bytes:
    """The inverse of `to_planes`."""
    out = bytearray(4 * len(planes[0]))
    from_planes_into(planes, memoryview(out))
    return bytes(out)


def from_planes_into(planes: list[bytes | memoryview], dst: memoryview) -> None:
    """`from_planes` written into `dst` (writable, 4 x a plane's length): no temporary of the result."""
    r = np.frombuffer(dst, dtype=np.uint8).reshape(-1, 4)
    for i, p in enumerate(planes):
        r[:, 3 - i] = np.frombuffer(p, dtype=np.uint8)
    u = r.view("<u4").ravel()
    sign = u << np.uint32(31)
    u >>= np.uint32(1)
    u |= sign


# --- where the float32 tensors are -----------------------------------------------------------------------

def _varint(b: bytes | memoryview, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if i >= len(b) or shift > 63:
            raise ValueError("truncated varint")
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return v, i


def _fields(b: memoryview, lo: int, hi: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field of the protobuf message b[lo:hi]."""
    i = lo
    while i < hi:
        key, i = _varint(b, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(b, i)
            yield num, wire, v, i
        elif wire == 2:
            n, i = _varint(b, i)
            if i + n > hi:
                raise ValueError("field past its message")
            yield num, wire, i, i + n
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            yield num, wire, 0, i
        else:
            raise ValueError("protobuf groups are not used by ONNX")


def onnx_float_tensors(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the raw bytes of every float32 initializer of a serialized ONNX model, found by
    walking the protobuf wire format (ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto
    data_type = 2 (FLOAT = 1), raw_data = 9); no onnx import. Anything unexpected: none found."""
    b, out = memoryview(data), []
    try:
        for num, wire, gs, ge in _fields(b, 0, len(b)):
            if num != 7 or wire != 2:
                continue
            for n2, w2, ts, te in _fields(b, gs, ge):
                if n2 != 5 or w2 != 2:
                    continue
                dtype, raw = None, None
                for n3, w3, s, e in _fields(b, ts, te):
                    if n3 == 2 and w3 == 0:
                        dtype = s
                    elif n3 == 9 and w3 == 2:
                        raw = (s, e)
                if dtype == 1 and raw is not None:
                    out.append(raw)
    except ValueError:
        return []
    return out


def _float_tensors(rel: str, data: bytes, manifest: dict[str, Any]) -> list[tuple[int, int]]:
    if rel.endswith(".onnx"):
        return onnx_float_tensors(data)
    return [(t["offset"], t["offset"] + t["bytes"]) for t in manifest.get("tensors", {}).values()
            if t["file"] == rel and t["dtype"] == "<f4"]


def _pieces(size: int, floats: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """The member cut into (start, end, is_float32) pieces covering it in order: each float tensor of at
    least MIN_PLANES bytes its own piece (so a delta can reuse it), the bytes between as plain pieces."""
    out, at = [], 0
    for s, e in sorted(floats):
        if s < at or e > size or e - s < MIN_PLANES or (e - s) % 4:
            continue
        if s > at:
            out.append((at, s, False))
        out.append((s, e, True))
        at = e
    if at < size or not out:
        out.append((at, size, False))
    return out


# --- writing ---------------------------------------------------------------------------------------------

class _Builder:
    """A pack being assembled in memory: compressed parts appended after the header, then the index."""

    def __init__(self, kind: str, level: int = LEVEL):
        self.buf = bytearray(HEADER.size)
        self.kind = kind
        self.members: list[dict[str, Any]] = []
        self.cctx = zstandard.ZstdCompressor(level=level)

    def put(self, data: bytes | memoryview) -> tuple[int, int]:
        at = len(self.buf)
        self.buf += data
        return at, len(data)

    def encode(self, piece: bytes | memoryview, is_float: bool) -> tuple[dict[str, Any], list[bytes]]:
        """(segment record without offsets, its compressed parts): planes where they are smaller."""
        plain = self.cctx.compress(piece)
        seg: dict[str, Any] = {"codec": "zstd", "bytes": len(piece), "sha256": _sha(piece)}
        if is_float:
            parts, codecs = [], []
            for p in to_planes(piece):
                c = self.cctx.compress(p)
                parts.append(c if len(c) < len(p) else p)
                codecs.append("zstd" if len(c) < len(p) else "raw")
            if sum(map(len, parts)) < len(plain):
                return {**seg, "codec": "planes", "planes": codecs}, parts
        return seg, [plain]

    def add(self, name: str, segments: list[tuple[dict[str, Any], list[bytes]]]) -> None:
        recs = []
        for seg, parts in segments:
            recs.append({**seg, "parts": [list(self.put(p)) for p in parts]} if parts else seg)
        self.members.append({"name": name, "bytes": sum(s["bytes"] for s, _ in segments), "segments": recs})

    def finish(self, base: str | None = None) -> bytes:
        kind = next(k for k, v in KINDS.items() if v == self.kind)
        self.buf[:HEADER.size] = HEADER.pack(MAGIC, PACK_VERSION, kind)
        index = {"format": "edgeflex-pack", "version": PACK_VERSION, "kind": self.kind,
                 "members": self.members, **({"base": base} if base else {})}
        return assemble(bytes(self.buf), index)


def assemble(body: bytes, index: dict[str, Any]) -> bytes:
    """A pack from its header and data (`body`) and an index: the compressed index, then the trailer.
    (Also what tests use to build hostile packs.)"""
    raw = json.dumps(index, separators=(",", ":"), sort_keys=True).encode()
    comp = zstandard.ZstdCompressor(level=LEVEL).compress(raw)
    return body + comp + TRAILER.pack(len(body), len(comp), END_MAGIC)


def _members(bundle: Bundle) -> dict[str, bytes]:
    """Every file of an opened bundle, the manifest's own bytes first (as written: its seal covers them)."""
    files = {MANIFEST: raw_manifest(bundle)}
    for rel in sorted(bundle.manifest["files"]):
        files[rel] = bundle.read(rel)
    return files


def raw_manifest(bundle: Bundle) -> bytes:
    """The manifest bytes of the version `bundle` holds (a directory's or a pack's)."""
    if isinstance(bundle, PackedBundle):
        return bundle.raw_manifest
    raw = bundle._version().read(MANIFEST, limit=MAX_MANIFEST_BYTES)
    if _sha(raw) != bundle.version:
        raise BundleError(f"bundle {str(bundle.path)!r} was rewritten while it was packed; pack it again")
    return raw


def encode(files: dict[str, bytes], manifest: dict[str, Any], *, base: Pack | None = None,
           level: int = LEVEL) -> bytes:
    """A full pack of `files` (manifest.json first), or with `base` a delta holding only the pieces whose
    sha256 the base lacks (the others are named by their sha256, codec `base`)."""
    have = base.pieces() if base is not None else {}
    b = _Builder("delta" if base is not None else "full", level)
    for rel, data in files.items():
        view = memoryview(data)
        floats = [] if rel == MANIFEST else _float_tensors(rel, data, manifest)
        segs = []
        for s, e, is_float in _pieces(len(data), floats):
            piece = view[s:e]
            h = _sha(piece)
            if h in have and rel != MANIFEST:      # a delta always carries its own manifest
                segs.append(({"codec": "base", "bytes": e - s, "sha256": h}, []))
            else:
                segs.append(b.encode(piece, is_float))
        b.add(rel, segs)
    return b.finish(base.version if base is not None else None)


def pack_bundle(bundle: Bundle, out: str | os.PathLike, *, base: str | os.PathLike | None = None,
                force: bool = False, level: int = LEVEL) -> Path:
    """Write `bundle` (opened) as a pack at `out` (`.efz`), or with `base` (a `.efz`) as a delta (`.efzd`)
    holding only what the base lacks. Atomic; never over a file that is not a pack (a pack only with
    `force`). Returns the path written."""
    suffix = DELTA_SUFFIX if base is not None else PACK_SUFFIX
    dest = pack_target(out, suffix, force=force)
    files = _members(bundle)
    if base is not None:
        old = Pack.open(base)
        if old.kind != "full":
            raise BundleError(f"{old.where} is a delta; the base must be a full pack (.efz)")
        old.members()                               # verified before any of its pieces is left out
        data = encode(files, bundle.manifest, base=old, level=level)
    else:
        data = encode(files, bundle.manifest, level=level)
    write_file(dest, data, suffix, force=force)
    return dest


# --- atomic writes of one file ---------------------------------------------------------------------------

def _is_pack_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def pack_target(path: str | os.PathLike, suffix: str, *, force: bool) -> Path:
    """Where a pack goes, checked before any work: `suffix`, never over anything but a pack, over a pack
    only with `force`; a symbolic link is written through."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise BundleError(f"pack path must be a str or os.PathLike ending in {suffix}, got "
                          f"{type(path).__name__}")
    dest = Path(path)
    if dest.suffix != suffix or dest.name == suffix:
        raise BundleError(f"pack path {str(dest)!r} must end in {suffix} (e.g. {dest.stem}{suffix})")
    if dest.is_symlink():
        dest = Path(os.path.realpath(dest))
    if not dest.parent.is_dir():
        raise BundleError(f"cannot write {str(dest)!r}: directory {str(dest.parent)!r} does not exist")
    if os.path.lexists(dest):
        if not dest.is_file() or not _is_pack_file(dest):
            raise BundleError(f"{str(dest)!r} exists and is not an edgeflex pack: refusing to replace it; "
                              "remove it yourself or choose another path")
        if not force:
            raise BundleError(f"pack {str(dest)!r} already exists; pass --force to replace it, or choose "
                              "another path")
    return dest


def write_file(dest: Path, data: bytes, suffix: str, *, force: bool) -> None:
    """Write `data` at `dest` whole or not at all: a hidden temp file beside it (`.NAME.tmp-*`), synced,
    renamed into place under the folder's writer lock after the target is checked again. A kill leaves
    the old file (or none) and a temp file that the next write there removes."""
    with _writing(dest), store.writer_lock(dest.parent):
        prefix = f".{dest.name}{store.TMP}"
        for entry in os.scandir(dest.parent):      # what an earlier killed write left
            if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                p = Path(entry.path)
                if p.stat().st_size == 0 or _is_pack_file(p):
                    with suppress(OSError):
                        p.unlink()
        pack_target(dest, suffix, force=force)
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~store.umask())
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            store.fault("synced")
            if os.path.lexists(dest):
                os.replace(tmp, dest)
            else:
                try:
                    os.link(tmp, dest)              # fails if something appeared meanwhile: never replaced
                except OSError as e:
                    if e.errno == errno.EEXIST:
                        raise
                    os.rename(tmp, dest)            # no hard links here (FAT on an SD card): checked above
                else:
                    os.unlink(tmp)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        store._fsync_dir(dest.parent)


# --- reading ---------------------------------------------------------------------------------------------

def _safe_name(name: Any, where: str) -> str:
    p = PurePosixPath(name) if isinstance(name, str) else None
    if p is None or not name or p.is_absolute() or ".." in p.parts or "." in p.parts or name != p.as_posix() \
            or "\\" in name or "\0" in name or name.endswith("/"):
        raise BundleError(f"{where}: member {name!r} is not a plain relative path inside the bundle (it "
                          "would escape it); refusing the pack")
    return name


class Pack:
    """A pack file read into memory, its trailer and index checked for shape (not yet trusted: the
    manifest, checked by `members`, is what decides). `version`: the sha256 of its manifest's bytes."""

    def __init__(self, path: Path | str, data: bytes):
        self.path, self.data = path, data
        self.where = f"pack {str(path)!r}"
        self.dctx = zstandard.ZstdDecompressor()
        self._index()
        self.manifest_raw = self.member(MANIFEST, MAX_MANIFEST_BYTES)
        self.version = _sha(self.manifest_raw)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Pack:
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise BundleError(f"pack {str(p)!r} not found") from None
        except OSError as e:
            raise BundleError(f"pack {str(p)!r} cannot be opened: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise BundleError(f"pack {str(p)!r} is not a regular file")
            return cls(p, f.read())

    def _bad(self, what: str) -> BundleError:
        return BundleError(f"{self.where}: {what}; the pack is truncated, corrupted or not a pack: copy or "
                           "pack it again")

    def _index(self) -> None:
        data = self.data
        if len(data) < HEADER.size + TRAILER.size:
            raise self._bad(f"only {len(data)} bytes")
        magic, version, kind = HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise self._bad("no edgeflex pack header")
        if version != PACK_VERSION:
            raise BundleError(f"{self.where}: pack format version {version}, this edgeflex reads "
                              f"{PACK_VERSION}; upgrade edgeflex or pack with this one")
        if kind not in KINDS:
            raise self._bad(f"unknown pack kind {kind}")
        off, n, end = TRAILER.unpack_from(data, len(data) - TRAILER.size)
        if end != END_MAGIC:
            raise self._bad("no index trailer at its end")
        self.end = len(data) - TRAILER.size
        if off < HEADER.size or off + n != self.end:
            raise self._bad(f"its index at {off}+{n} is not where the trailer says")
        raw = self._zstd("the index", memoryview(data)[off:off + n], None, MAX_INDEX_BYTES)
        index = load_json(f"{self.where} index", raw, "pack it again")
        if not isinstance(index, dict) or index.get("format") != "edgeflex-pack" \
                or index.get("kind") != KINDS[kind] or not isinstance(index.get("members"), list):
            raise self._bad("its index is not an edgeflex pack index")
        self.kind, self.base, self.data_end = KINDS[kind], index.get("base"), off
        self.index: dict[str, dict[str, Any]] = {}
        for m in index["members"]:
            if not isinstance(m, dict) or set(m) != {"name", "bytes", "segments"}:
                what = m.get("type", "?") if isinstance(m, dict) else type(m).__name__
                name = m.get("name") if isinstance(m, dict) else None
                raise BundleError(f"{self.where}: member {name!r} is an index entry of kind {what!r}, not a "
                                  "plain file (links, devices, folders are never packed); refusing the pack")
            name = _safe_name(m["name"], self.where)
            if name in self.index:
                raise BundleError(f"{self.where}: member {name!r} appears twice; refusing the pack")
            self._check_member(name, m)
            self.index[name] = m
        for name in self.index:       # a file and a folder of the same name cannot both be unpacked
            for parent in PurePosixPath(name).parents:
                if str(parent) in self.index:
                    raise BundleError(f"{self.where}: member {name!r} lies inside member {str(parent)!r}, "
                                      "which is a file; refusing the pack")

    def _check_member(self, name: str, m: dict[str, Any]) -> None:
        def bad(what: str) -> BundleError:
            return BundleError(f"{self.where}: member {name!r}: {what}; refusing the pack")

        if not _nat(m["bytes"]) or not isinstance(m["segments"], list):
            raise bad("malformed index entry")
        total = 0
        for s in m["segments"]:
            if not isinstance(s, dict) or not _nat(s.get("bytes")) or not isinstance(s.get("sha256"), str):
                raise bad("malformed segment")
            codec, parts = s.get("codec"), s.get("parts", [])
            want = {"zstd": 1, "planes": 4, "base": 0}.get(codec)
            if want is None or not isinstance(parts, list) or len(parts) != want:
                raise bad(f"segment codec {codec!r} with {len(parts) if isinstance(parts, list) else '?'} "
                          "parts is not one this edgeflex reads")
            if codec == "base" and self.kind != "delta":
                raise bad("a full pack refers to a base")
            if codec == "planes" and (s["bytes"] % 4 or not isinstance(s.get("planes"), list)
                                      or len(s["planes"]) != 4
                                      or any(c not in ("zstd", "raw") for c in s["planes"])):
                raise bad("malformed byte-plane segment")
            for p in parts:
                if not (isinstance(p, list) and len(p) == 2 and _nat(p[0]) and _nat(p[1])
                        and HEADER.size <= p[0] and p[0] + p[1] <= self.data_end):
                    raise bad(f"a part at {p!r} lies outside the pack's data")
            total += s["bytes"]
        if total != m["bytes"]:
            raise bad(f"its segments hold {total} bytes, its entry says {m['bytes']}")

    def _zstd(self, what: str, comp: memoryview, size: int | None, limit: int) -> bytes:
        """One zstd frame, decompressed to exactly `size` bytes (None: any up to `limit`): the output is
        bounded while decompressing, never by what the frame claims."""
        try:
            claimed = zstandard.frame_content_size(comp)
        except zstandard.ZstdError:
            raise self._bad(f"{what}: not a zstd frame") from None
        if claimed >= 0 and (claimed > limit or (size is not None and claimed != size)):
            raise BundleError(f"{self.where}: {what}: compressed data claims {claimed} bytes, expected "
                              f"{size if size is not None else f'at most {limit}'}: a lying size or a "
                              "decompression bomb; refusing the pack")
        try:
            out = self.dctx.decompress(comp, max_output_size=size if size is not None else limit,
                                       allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise BundleError(f"{self.where}: {what}: does not decompress to "
                              f"{size if size is not None else f'at most {limit}'} bytes ({e}): truncated, "
                              "corrupted, a lying size or a decompression bomb; refusing the pack") from None
        if size is not None and len(out) != size:
            raise BundleError(f"{self.where}: {what}: decompresses to {len(out)} bytes, its entry says "
                              f"{size}: a lying size; refusing the pack")
        return out

    def _part(self, p: list[int]) -> memoryview:
        return memoryview(self.data)[p[0]:p[0] + p[1]]

    def segment(self, name: str, s: dict[str, Any], base: Pack | None = None) -> bytes:
        """One segment's bytes, decompressed within its declared size (which the member's bound capped)."""
        out = bytearray(s["bytes"])
        self._segment_into(name, s, memoryview(out), base)
        return bytes(out)

    def _segment_into(self, name: str, s: dict[str, Any], dst: memoryview, base: Pack | None) -> None:
        what = f"member {name!r}"
        if s["codec"] == "zstd":
            dst[:] = self._zstd(what, self._part(s["parts"][0]), s["bytes"], s["bytes"])
        elif s["codec"] == "planes":
            n = s["bytes"] // 4
            planes: list[bytes | memoryview] = []
            for codec, p in zip(s["planes"], s["parts"]):
                if codec == "raw":
                    if p[1] != n:
                        raise BundleError(f"{self.where}: {what}: a stored byte plane of {p[1]} bytes, "
                                          f"expected {n}: a lying size; refusing the pack")
                    planes.append(self._part(p))
                else:
                    planes.append(self._zstd(what, self._part(p), n, n))
            from_planes_into(planes, dst)
        else:
            if base is None:
                raise BundleError(f"{self.where}: {what} refers to a base pack: apply it to its base "
                                  "(`edgeflex apply BASE.efz DELTA.efzd --out NEW.efz`)")
            data = base.pieces().get(s["sha256"])
            if data is None or len(data) != s["bytes"]:
                raise BundleError(f"{self.where}: {what} needs a piece (sha256 {s['sha256'][:16]}...) that "
                                  f"base {str(base.path)!r} does not hold: not the base this delta was made "
                                  "from")
            dst[:] = data

    def member(self, name: str, bound: int, base: Pack | None = None, sha256: str | None = None) -> bytes:
        """A member's bytes; `bound` (from the manifest) caps what its segments may decompress to, checked
        before any is decompressed; `sha256`: what they must hash to (then its size must be `bound`)."""
        m = self.index.get(name)
        if m is None:
            raise BundleError(f"{self.where}: member {name!r} is missing; the pack is incomplete: pack it "
                              "again")
        if m["bytes"] > bound or (sha256 is not None and m["bytes"] != bound):
            raise BundleError(f"{self.where}: member {name!r} declares {m['bytes']} bytes, the manifest "
                              f"{'says' if sha256 else 'allows'} {bound}: a lying size or a decompression "
                              "bomb; refusing the pack")
        out = np.empty(m["bytes"], dtype=np.uint8)      # not zeroed: every byte is written below
        view, at, h = memoryview(out).cast("B"), 0, hashlib.sha256()
        for s in m["segments"]:
            dst = view[at:at + s["bytes"]]
            self._segment_into(name, s, dst, base)
            if sha256 is not None:
                h.update(dst)           # while it is still in cache (a helper thread measured slower)
            at += s["bytes"]
        if sha256 is not None and h.hexdigest() != sha256:
            raise BundleError(f"{self.where}: member {name!r} fails its sha256 check against the manifest: "
                              "modified after packing; pack it again")
        return out.tobytes()

    def pieces(self) -> dict[str, bytes]:
        """Every segment of this (full, verified by `members`) pack by its sha256: what a delta may reuse."""
        if not hasattr(self, "_pieces"):
            self._pieces = {}
            for name, m in self.index.items():
                for s in m["segments"]:
                    data = self.segment(name, s)
                    if _sha(data) == s["sha256"]:
                        self._pieces[s["sha256"]] = data
        return self._pieces

    def members(self, limit: int = MAX_UNPACKED, base: Pack | None = None) -> tuple[dict[str, Any],
                                                                                   dict[str, bytes]]:
        """(manifest, every file): the manifest checked (schema, seal) and every other member decompressed
        within the size the manifest gives it and checked against its sha256. Raises one-line BundleError."""
        mpath = f"{self.where} {MANIFEST}"
        manifest = load_json(mpath, self.manifest_raw, "pack it again")
        Bundle._check_manifest(mpath, manifest)
        files = manifest["files"]
        total = sum(f["bytes"] for f in files.values())
        if total > limit:
            raise BundleError(f"{self.where}: its manifest declares {total} bytes of files, over the "
                              f"{limit} allowed (limit=); refusing the pack")
        for name in self.index:
            if name != MANIFEST and name not in files:
                raise BundleError(f"{self.where}: member {name!r} is not listed in the manifest; refusing "
                                  "the pack")
        out = {}
        for rel, meta in files.items():
            out[rel] = self.member(rel, meta["bytes"], base, meta["sha256"])
        return manifest, out


def _nat(v: Any) -> bool:
    return type(v) is int and 0 <= v < 1 << 62


# --- a pack as a bundle ----------------------------------------------------------------------------------

class PackedBundle(Bundle):
    """A bundle read from a `.efz` into memory and verified (nothing extracted to disk). `read` serves the
    verified bytes; after `close()` it reads the pack again, only while it holds the same version."""

    def __init__(self, path: Path, manifest: dict[str, Any], files: dict[str, bytes], raw: bytes):
        super().__init__(path, manifest, version=_sha(raw))
        self.raw_manifest = raw
        self._files: dict[str, bytes] | None = files

    def close(self) -> None:
        self._files = None

    def read(self, rel: str) -> bytes:
        want = self.sha256(rel)
        if self._files is not None:
            return self._files[rel]
        p = Pack.open(self.path)
        if p.version != self.version:
            raise BundleError(f"pack {str(self.path)!r} was replaced since it was opened: open it again to "
                              "read the new version")
        data = p.member(rel, self.manifest["files"][rel]["bytes"])
        if _sha(data) != want:
            raise BundleError(f"pack {str(self.path)!r}: member {rel!r} fails its sha256 check; pack it "
                              "again")
        return data


def open_pack(path: str | os.PathLike, *, limit: int = MAX_UNPACKED) -> PackedBundle:
    """`Bundle.open` for a `.efz`: read, decompress and verify every member in memory."""
    p = Pack.open(path)
    if p.kind != "full":
        raise BundleError(f"{p.where} is a delta: apply it to its base first (`edgeflex apply BASE.efz "
                          f"{Path(path).name} --out NEW.efz`)")
    manifest, files = p.members(limit)
    return PackedBundle(Path(path), manifest, files, p.manifest_raw)


def apply_delta(base: str | os.PathLike, delta: str | os.PathLike, *, level: int = LEVEL) -> bytes:
    """The full pack that `delta` describes, rebuilt from `base`: every member decompressed and checked
    against the delta's manifest, then packed again (as `edgeflex pack` would have packed it)."""
    d, manifest, files = _rebuild(base, delta)
    return encode({MANIFEST: d.manifest_raw, **dict(sorted(files.items()))}, manifest, level=level)


def open_delta(base: str | os.PathLike, delta: str | os.PathLike,
               *, limit: int = MAX_UNPACKED) -> PackedBundle:
    """The bundle `delta` describes, rebuilt in memory from `base` and verified, no file written:
    `Runtime(open_delta("old.efz", "d.efzd"))` runs the update before (or without) `edgeflex apply`."""
    d, manifest, files = _rebuild(base, delta, limit)
    return PackedBundle(Path(delta), manifest, files, d.manifest_raw)


def _rebuild(base: str | os.PathLike, delta: str | os.PathLike,
             limit: int = MAX_UNPACKED) -> tuple[Pack, dict[str, Any], dict[str, bytes]]:
    old, d = Pack.open(base), Pack.open(delta)
    if d.kind != "delta":
        raise BundleError(f"{d.where} is not a delta (.efzd); a full pack needs no base")
    if old.kind != "full":
        raise BundleError(f"{old.where} is a delta; the base must be a full pack (.efz)")
    old.members()                                   # the base is verified before any piece is reused
    if d.base != old.version:
        raise BundleError(f"{d.where} was made against another base (manifest sha256 {str(d.base)[:16]}...), "
                          f"not {str(base)!r} ({old.version[:16]}...)")
    manifest, files = d.members(limit, base=old)
    return d, manifest, files


def unpack(path: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Unpack a `.efz` into a bundle directory through `store.commit` (built in a hidden temp sibling and
    swapped in whole, so a failure leaves nothing): every member is verified in memory first."""
    dest = store.target(out, overwrite=force, new=True)
    b = open_pack(path)

    def fill(tmp: Path) -> None:
        for rel, data in b._files.items():
            store.write_file(tmp / rel, data)

    with _writing(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with store.writer_lock(dest.parent):
            store.recover(dest)
            store.target(dest, overwrite=force, new=True)
            store.commit(dest, fill, b.raw_manifest, mode=None)
    return dest
