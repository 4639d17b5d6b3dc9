"""Bundle directories on disk: reads pinned to one version, writes that never lose or tear one.

A write builds the new version in a hidden sibling `.NAME.efx.tmp-*`, fsyncs it and swaps it in with one
`renameat2(RENAME_EXCHANGE)`, so the path always names a whole bundle, the old or the new. A reader holds
the version it opened by a directory file descriptor (every file is read through it, whatever is renamed
at the path meanwhile) and a shared `flock` on it; a writer removes a replaced version only when it can
take that lock exclusively, else leaves it as `.NAME.efx.old-*` for a later write to remove. One writer
at a time per folder (an exclusive `flock` on the folder), so an update never loses another's. Whatever a
kill leaves behind (a half-filled `.tmp-*`, a replaced version not yet removed, or, where the file system
cannot exchange, a bundle moved aside) is recovered by the next write, and the last one by the next open.
What format the files have is `bundle.py`'s business; this module moves directories.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from edgeflex.errors import BundleError

FORMAT = "edgeflex-bundle"
MANIFEST = "manifest.json"
SUFFIX = ".efx"
PARTIAL = ".edgeflex-partial"     # first file of a version being built: marks it ours and unfinished
TMP, OLD = ".tmp-", ".old-"

# Where a kill test may stop a write (`EDGEFLEX_FAULT=<step>` kills the writing process there by SIGKILL).
WRITE_STEPS = ("locked", "created", "fill", "filled", "synced", "unmarked", "swapped", "retired")
FALLBACK_STEPS = ("aside",)     # only without RENAME_EXCHANGE: between moving the old aside and the new in


def fault(step: str) -> None:
    """The fault-injection hook: die here, as a power cut or `kill -9` would, when a test asks for it."""
    if os.environ.get("EDGEFLEX_FAULT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


# --- reading: one version, pinned -------------------------------------------------------------------------

class Pinned:
    """A bundle directory held open: its files are read through its file descriptor, so a reader sees the
    version it opened even when a write swaps another in at the path; a shared `flock` keeps writers from
    removing it until `close()`."""

    def __init__(self, path: Path):
        self.path = path
        for _ in range(1000):
            fd = self._open_dir(path)
            with suppress(OSError):                 # a file system without flock: pinned by the fd alone
                fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            held = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                self.fd = fd
                return
            os.close(fd)                            # swapped out between our open and our lock: again
        raise BundleError(f"bundle {str(path)!r} is being rewritten without pause; try again")

    @staticmethod
    def _open_dir(path: Path) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BundleError(f"bundle {str(path)!r} not found: expected a directory NAME{SUFFIX}/ "
                              "written by `edgeflex export`") from None
        except NotADirectoryError:
            raise BundleError(f"bundle {str(path)!r} is a file, not a directory NAME{SUFFIX}/ written by "
                              "`edgeflex export`") from None
        except (OSError, ValueError) as e:     # permission, a link loop, a NUL in the name, ...
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise BundleError(f"bundle {str(path)!r} cannot be opened: {why}") from None

    def _open(self, rel: str) -> int:
        try:
            # O_NONBLOCK: a FIFO or device planted under a listed name must not hang the open
            fd = os.open(rel, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            raise BundleError(f"bundle file {rel!r} is missing from {self.path}; re-export the bundle") \
                from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise BundleError(f"bundle file {rel!r} in {self.path} is a symbolic link; a bundle holds "
                                  "plain files only (copy with `cp -rL`)") from None
            raise BundleError(f"bundle file {rel!r} in {self.path} cannot be read: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BundleError(f"bundle file {rel!r} in {self.path} is not a regular file")
        return fd

    def size(self, rel: str) -> int:
        fd = self._open(rel)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def sha256(self, rel: str) -> str:
        """The sha256 of `rel`, read through in 1 MiB chunks (a weights file is never held whole to hash)."""
        h = hashlib.sha256()
        with os.fdopen(self._open(rel), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def read(self, rel: str, limit: int | None = None) -> bytes:
        """The bytes of `rel`; more than `limit` bytes is a BundleError (a manifest is small)."""
        fd = self._open(rel)
        try:
            size = os.fstat(fd).st_size
            if limit is not None and size > limit:
                raise BundleError(f"bundle file {rel!r} in {self.path} is {size} bytes, over the "
                                  f"{limit >> 20} MiB such a file may have; re-export the bundle")
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read()
        finally:
            os.close(fd)

    def files(self) -> Iterator[str]:
        """Every non-directory entry below the root, as a relative POSIX path."""
        for top, _dirs, names, _fd in os.fwalk(".", dir_fd=self.fd):
            for n in names:
                yield os.path.normpath(os.path.join(top, n)).replace(os.sep, "/")

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)                            # drops the flock with it

    def __del__(self) -> None:
        with suppress(Exception):
            self.close()


# --- writing ----------------------------------------------------------------------------------------------

def is_bundle(path: Path) -> bool:
    """Whether `path` is a directory with an edgeflex manifest (readable enough to say so)."""
    try:
        with open(path / MANIFEST, "rb") as f:
            m = json.loads(f.read(1 << 26))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT


def target(path: str | os.PathLike, *, overwrite: bool, new: bool) -> Path:
    """Where a write of `path` goes, checked before any work is done: `.efx`, never over something that is
    not a bundle, over a bundle only with `overwrite` (`new`: an export; else an update of one)."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise BundleError(f"bundle path must be a str or os.PathLike ending in {SUFFIX}, got "
                          f"{type(path).__name__}")
    dest = Path(path)
    if dest.suffix != SUFFIX or dest.name == SUFFIX:
        raise BundleError(f"bundle path {str(dest)!r} must end in {SUFFIX} (e.g. {dest.name}{SUFFIX})")
    if dest.is_symlink():
        dest = Path(os.path.realpath(dest))     # a link to a bundle: its target is what gets replaced
    if not os.path.lexists(dest):
        if not new:
            raise BundleError(f"bundle {str(dest)!r} not found")
        return dest
    if not dest.is_dir() or not is_bundle(dest):
        kind = "directory" if dest.is_dir() else "file"
        raise BundleError(f"{str(dest)!r} exists and is a {kind} that is not an edgeflex bundle: refusing "
                          "to replace it; remove it yourself or choose another path")
    if new and not overwrite:
        raise BundleError(f"bundle {str(dest)!r} already exists; pass --force (overwrite=True) to replace "
                          "it, or choose another path")
    return dest


@contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """One writer at a time in `folder` (an exclusive flock on it; readers do not take it)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def commit(dest: Path, fill: Callable[[Path], None], manifest: bytes, *, mode: int | None,
           swapped: Callable[[], None] | None = None) -> None:
    """Build a version in `.NAME.efx.tmp-*` beside `dest` (`fill` writes its files, then `manifest`),
    fsync it, and swap it in; the caller holds `writer_lock(dest.parent)`. On any failure the temp
    directory goes and `dest` stays as it was. `mode`: the new root's permissions (None: from the umask).
    `swapped` is called once the new version is in, before the old one is retired (an update lets go of
    the old version it linked from there, so that its own hold does not keep it)."""
    fault("locked")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP}", dir=dest.parent))
    try:
        os.chmod(tmp, mode if mode is not None else 0o777 & ~umask())
        (tmp / PARTIAL).write_bytes(b"")
        fault("created")
        fill(tmp)
        fault("filled")
        _write_synced(tmp / MANIFEST, manifest, None if mode is None else mode & 0o666)
        _fsync_tree(tmp)
        fault("synced")
        os.unlink(tmp / PARTIAL)
        _fsync_dir(tmp)
        fault("unmarked")
        _swap(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault("swapped")
    if swapped is not None:
        swapped()
    _fsync_dir(dest.parent)
    if tmp.exists():            # the exchange left the replaced version at the temp name
        retire(tmp, dest)
        fault("retired")


def write_file(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """One file of a version being built (its folders made as needed), then the kill test's hook.
    `mode`: its permissions (None: from the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        if mode is not None:
            os.fchmod(f.fileno(), mode)
    fault("fill")


def link_or_copy(old: Pinned, rel: str, path: Path) -> None:
    """An unchanged file of the version `old` into the one being built: a hard link (no bytes copied),
    or a copy where the file system has none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(rel, path, src_dir_fd=old.fd, follow_symlinks=False)
    except OSError:
        mode = stat.S_IMODE(os.stat(rel, dir_fd=old.fd, follow_symlinks=False).st_mode)
        write_file(path, old.read(rel), mode=mode)
        return
    fault("fill")


def copy_dir_modes(old: Pinned, new: Path, mode: int) -> None:
    """Give every folder of the version being built the permissions of the same folder in `old` (a new
    folder: `mode`, the root's), so an update never narrows who can read the bundle."""
    for top, dirs, _names in os.walk(new):
        for d in dirs:
            rel = os.path.relpath(os.path.join(top, d), new)
            try:
                m = stat.S_IMODE(os.stat(rel, dir_fd=old.fd, follow_symlinks=False).st_mode)
            except OSError:
                m = mode
            os.chmod(os.path.join(top, d), m)


def _write_synced(path: Path, data: bytes, mode: int | None) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for top, dirs, names in os.walk(root):
        for n in names:
            fd = os.open(os.path.join(top, n), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for d in dirs:
            _fsync_dir(Path(top) / d)
    _fsync_dir(root)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the file system does not have it."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None or os.environ.get("EDGEFLEX_NO_RENAME_EXCHANGE"):
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _swap(new: Path, dest: Path) -> None:
    """Put `new` at `dest`. Over an existing bundle: one RENAME_EXCHANGE (`new` then names the old one);
    where the file system cannot, the old one is moved aside first (a kill between the two renames leaves
    it at `.NAME.efx.old-*`, which `recover` puts back)."""
    if not os.path.lexists(dest):
        if not _renameat2(new, dest, _RENAME_NOREPLACE):
            os.rename(new, dest)
        return
    if _renameat2(new, dest, _RENAME_EXCHANGE):
        return
    aside = dest.parent / f".{dest.name}{OLD}{uuid.uuid4().hex[:12]}"
    os.rename(dest, aside)
    fault("aside")
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    with suppress(OSError):     # as after an exchange: the old version at the temp name, to be retired
        os.rename(aside, new)


def retire(old: Path, dest: Path) -> bool:
    """Remove a replaced version of `dest` if no reader holds it (True), else rename it `.NAME.efx.old-*`
    for a later write to remove (False)."""
    try:
        fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if TMP in old.name:
                with suppress(OSError):
                    os.rename(old, dest.parent / old.name.replace(TMP, OLD, 1))
            return False
        except OSError:
            pass                    # no flock here: nothing can tell us of readers; remove as before
        shutil.rmtree(old)          # readers that opened it before the swap see the path changed: they retry
        return True
    finally:
        os.close(fd)


def leftovers(dest: Path) -> list[Path]:
    """The hidden siblings of `dest` that edgeflex's writes made: `.NAME.efx.tmp-*` and `.NAME.efx.old-*`
    directories holding our marker or a bundle. Nothing else is ever touched."""
    out = []
    with suppress(OSError):
        for entry in os.scandir(dest.parent):
            if not entry.name.startswith((f".{dest.name}{TMP}", f".{dest.name}{OLD}")):
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            p = Path(entry.path)
            if os.path.lexists(p / PARTIAL) or is_bundle(p):
                out.append(p)
    return out


def recover(dest: Path) -> None:
    """With the writer lock held: put back a bundle a kill left moved aside (no bundle at `dest`), then
    remove every leftover of earlier writes that no reader holds."""
    if not os.path.lexists(dest):
        whole = [p for p in leftovers(dest) if OLD in p.name and is_bundle(p) and not (p / PARTIAL).exists()]
        if whole:
            newest = max(whole, key=lambda p: p.stat().st_mtime)
            os.rename(newest, dest)
            _fsync_dir(dest.parent)
    for p in leftovers(dest):
        retire(p, dest)


def recover_missing(dest: Path) -> bool:
    """For `Bundle.open`: when nothing is at `dest` but a kill left it moved aside, put it back (True)."""
    if os.path.lexists(dest) or not any(OLD in p.name for p in leftovers(dest)):
        return False
    try:
        with writer_lock(dest.parent):
            recover(dest)
    except OSError:
        return False
    return os.path.lexists(dest)


def umask() -> int:
    """This process's umask, read without changing it where Linux says it (/proc), else by setting it back."""
    with suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith("Umask:")).split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old
