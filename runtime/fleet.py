"""Boards as a fleet, through Apache TVM's RPC tracker and server (no RPC of edgeflex's own): a board runs
`edgeflex board serve` (TVM's RPC server plus a few edgeflex functions registered in it), the workstation
runs `edgeflex tracker` (TVM's tracker) and profiles or checks a bundle on the boards registered under a key.

The board side needs the TVM runtime, numpy and edgeflex's runtime only: no torch, no onnx, no ONNX
Runtime. Every file the workstation sends is checked against the sha256 its bundle lists before the board
writes it, and the bundle is opened (every file checked again) before an engine is loaded. Compiling and
tuning on boards (MetaSchedule's RPC runner) is `edgeflex.compile.tvm`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgeflex.errors import BackendUnavailable, DeviceError, UsageError

from .bundle import Bundle, model_id, sha256_bytes

log = logging.getLogger(__name__)

TRACKER_PORT = 9190                     # TVM's default tracker port
SERVER_PORT = 9090                      # TVM's default server port (the first of a range of 100)
LOOPBACK = "127.0.0.1"
# Modules a board must not need: the test checks none of them was imported by the serving process.
HEAVY = ("torch", "onnx", "onnxruntime")
PREFIX = "edgeflex.fleet."              # the names of the functions `board serve` registers in TVM's server
BUNDLE_DIR = "bundle.efx"               # where a session keeps the bundle it was sent, in its work directory
EMULATED_ENV = "EDGEFLEX_EMULATED"      # set by devices/board.py on the emulated board: how it is emulated


class BoardLost(DeviceError):
    """A board's RPC session failed mid-call: the board died, was killed or was unplugged."""


def parse_addr(flag: str, text: str, default_port: int | None = None) -> tuple[str, int]:
    """`HOST:PORT` (or `HOST` with a default port) -> (host, port); UsageError naming the flag otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:{TRACKER_PORT}")
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), ""
    if not port and default_port is not None:
        return host, default_port
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{flag} {text!r}: expected HOST:PORT with a port in 1..65535, e.g. "
                         f"127.0.0.1:{TRACKER_PORT}")
    return host, int(port)


def _rpc(*needs: str):
    """tvm.rpc (and `needs`: tornado for the tracker), or one line naming the extra that brings them."""
    import importlib

    try:
        for mod in needs:
            importlib.import_module(mod)
        from tvm import rpc
    except ModuleNotFoundError as e:
        raise BackendUnavailable(f"boards over TVM RPC need {e.name}, which is not installed: pip install "
                                 f"'edgeflex[tvm,fleet]'") from None
    return rpc


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


# --- the tracker and the board's server ---------------------------------------------------------------------

def start_tracker(host: str = LOOPBACK, port: int = TRACKER_PORT, *, silent: bool = True):
    """TVM's RPC tracker (`tvm.rpc.tracker`), serving from a thread of this process, bound to `host` on the
    first free port from `port` (10 tried); returns its state (`.host`, `.port`, `.thread`)."""
    _rpc("tornado")
    from tvm.rpc import tracker as tvm_tracker

    try:
        return tvm_tracker.PopenTrackerServerState(host, port, port + 10, silent=silent)
    except (OSError, ValueError, RuntimeError) as e:
        raise DeviceError(f"cannot start the RPC tracker on {host}:{port} ({_one_line(e)}); expected a free "
                          "port and an address of this machine") from None


def start_server(tracker: tuple[str, int], key: str, *, host: str = LOOPBACK, port: int = SERVER_PORT,
                 name: str | None = None, silent: bool = True):
    """TVM's RPC server (`tvm.rpc.server`), serving from a thread of this process (each session in a
    forked process), bound to `host` (loopback unless told) on the first free port from `port` (100
    tried), registered under `key` with the tracker, with edgeflex's board functions in it (`_register`);
    returns its state (`.port`, `.thread`)."""
    if not isinstance(key, str) or not key or any(c in key for c in " :\t\n"):
        raise UsageError(f"--key {key!r}: expected a non-empty name without spaces or ':', e.g. rpi5")
    # NOTE: tvm_ffi imports torch when it can (a symbol-order workaround of its own); a board has no torch,
    # and a workstation serving as a board should not load it either: blocked before TVM is imported.
    for mod in HEAVY:
        if mod not in sys.modules:
            sys.modules[mod] = None  # type: ignore[assignment]
    _rpc()
    from tvm.rpc import server as tvm_server

    _register(name or f"{platform.node()}-{os.getpid()}")
    try:
        return tvm_server.PopenRPCServerState(host, port, port + 100, tracker_addr=tracker, key=key,
                                              silent=silent)
    except (OSError, ValueError, RuntimeError) as e:
        raise DeviceError(f"cannot start the RPC server on {host}:{port} for tracker "
                          f"{tracker[0]}:{tracker[1]} ({_one_line(e)})") from None


def _register(name: str) -> None:
    """In TVM's server process, before it serves: the board functions the workstation calls (TVM's
    documented way to extend its server). Each RPC session runs in a process forked from this one, with a
    work directory of its own."""
    import tvm_ffi

    logging.getLogger("RPCServer").setLevel(logging.WARNING)
    funcs = {"identity": lambda: json.dumps(board_identity(name)),
             "put": _board_put, "profile": _board_profile, "run": _board_run}
    for fn_name, fn in funcs.items():
        tvm_ffi.register_global_func(PREFIX + fn_name, fn, override=True)


def board_identity(name: str) -> dict[str, Any]:
    """What a board is: its name, CPU, machine id (hashed), versions, and which heavy modules its serving
    process has imported (none, on a board)."""
    import tvm

    from edgeflex.devices import host_info
    from edgeflex.version import __version__

    from .backends.tvm import host_cpu, machine_id

    return {"name": name, "node": platform.node(), "machine": sha256_bytes(machine_id().encode())[:16],
            "host": host_info(), "llvm": host_cpu(), "pid": os.getpid(),
            "versions": {"tvm": tvm.__version__, "edgeflex": __version__,
                         "python": platform.python_version()},
            "imported": sorted(m for m in HEAVY if sys.modules.get(m) is not None),
            "emulated": os.environ.get(EMULATED_ENV) or None}


def _workdir() -> Path:
    """This RPC session's work directory on the board (TVM's server makes one per session)."""
    import tvm

    return Path(str(tvm.get_global_func("tvm.rpc.server.workpath")(BUNDLE_DIR)))


def _board_put(rel: str, sha256: str, data: bytes) -> str:
    """Write one bundle file the workstation sent, after its bytes are checked against the sha256 that the
    workstation's bundle lists for it (and its path is checked to stay inside the session's bundle)."""
    data = bytes(data)
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"edgeflex board: refused file name {rel!r} (outside the bundle)")
    got = sha256_bytes(data)
    if got != sha256:
        raise ValueError(f"edgeflex board: {rel} arrived with sha256 {got[:12]}, the bundle lists "
                         f"{sha256[:12]}: not written")
    dest = _workdir() / Path(*path.parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return got


def _board_runtime(spec: dict[str, Any]):
    """The bundle the workstation sent, opened (every file checked against its manifest, whose own sha256
    the workstation gave) in edgeflex's Runtime on the TVM backend, only the configs asked for."""
    from .runtime import Runtime

    root = _workdir()
    manifest = (root / "manifest.json").read_bytes()
    if sha256_bytes(manifest) != spec["manifest_sha256"]:
        raise ValueError("edgeflex board: the bundle's manifest differs from the workstation's: not loaded")
    threads = tuple(spec["threads"]) if spec.get("threads") else None
    threads = threads[0] if threads and len(threads) == 1 else threads
    # allow_native: the workstation checked it trusts these engines before sending them (`_trusted`)
    return Runtime(Bundle.open(root), backend="tvm", device=spec["device"], threads=threads,
                   only=spec.get("configs"), config=(spec.get("configs") or [None])[0], allow_native=True,
                   shared_threads=not isinstance(threads, tuple))


def _board_profile(spec_json: str) -> str:
    """Profile the configs of `spec` on this board (edgeflex's own `measure_profile`): the profile as JSON."""
    from .profiles import measure_profile

    spec = json.loads(spec_json)
    rt = _board_runtime(spec)
    prof = measure_profile(rt, batch=spec["batch"], memory=False, progress=False,
                           min_seconds=spec["min_seconds"], warmup=spec.get("warmup", 20))
    return json.dumps(prof)


def _board_run(spec_json: str, inputs: bytes) -> bytes:
    """Run every config of `spec` on the inputs (an .npz, read without pickle): the outputs as an .npz,
    `CONFIG/INDEX` per output."""
    import io

    spec = json.loads(spec_json)
    rt = _board_runtime(spec)
    with np.load(io.BytesIO(bytes(inputs)), allow_pickle=False) as z:
        xs = [z[f"x{i}"] for i in range(len(z.files))]
    buf = io.BytesIO()
    np.savez(buf, **every_config(rt, xs))
    return buf.getvalue()


def every_config(rt, xs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Every config `rt` loaded run on `xs`: {CONFIG/INDEX: output}."""
    out = {}
    for c in rt.configs:
        if rt._only is not None and c.name not in rt._only:
            continue
        rt.switch(c.name)
        y = rt.run(*xs)
        for i, a in enumerate(y if isinstance(y, tuple) else (y,)):
            out[f"{c.name}/{i}"] = np.asarray(a)
    return out


# --- the workstation: what the tracker holds ----------------------------------------------------------------

def tracker_summary(tracker: tuple[str, int]) -> dict[str, Any]:
    """Per key, the boards registered under it: {key: {"boards": [addr...], "free": n, "busy": n,
    "pending": n}}, from TVM's tracker summary."""
    rpc = _rpc()
    try:
        sess = rpc.connect_tracker(*tracker)
        data = sess.summary()
        sess.close()
    except (OSError, RuntimeError) as e:
        raise DeviceError(f"no RPC tracker at {tracker[0]}:{tracker[1]} ({_one_line(e)}); start one with "
                          "`edgeflex tracker`") from None
    keys: dict[str, dict[str, Any]] = {}
    for server in data.get("server_info", []):
        key = server["key"].partition(":")[2]
        addr = server.get("addr") or [None, None]
        keys.setdefault(key, {"boards": []})["boards"].append(f"{addr[0] or '?'}:{addr[1]}")
    for key, q in data.get("queue_info", {}).items():
        entry = keys.setdefault(key, {"boards": []})
        entry.update(free=q["free"], pending=q["pending"])
    for entry in keys.values():
        entry.setdefault("free", 0)
        entry.setdefault("pending", 0)
        entry["boards"].sort()
        entry["busy"] = max(0, len(entry["boards"]) - entry["free"])
    return dict(sorted(keys.items()))


class Board:
    """One board's RPC session, from the tracker: its identity, and the bundle sent to it once."""

    def __init__(self, session: Any, identity: dict[str, Any]):
        self.session, self.identity = session, identity
        self.name = identity["name"]
        self.sent: str | None = None            # the manifest sha256 of the bundle this session holds

    def call(self, fn: str, *args: Any) -> Any:
        try:
            return self.session.get_function(PREFIX + fn)(*args)
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types, for a failed call or session
            msg = _one_line(e)
        # a board function that raised leaves the session usable; a dead board (killed, unplugged) does not
        try:
            self.session.get_function(PREFIX + "identity")()
        except Exception:  # noqa: BLE001 - whatever TVM raises on a broken session
            raise BoardLost(f"board {self.name} was lost ({msg})") from None
        raise DeviceError(f"board {self.name}: {msg}") from None

    def send(self, bundle: Bundle) -> None:
        """Every file of `bundle` to this board's session (each checked there against its sha256), once."""
        raw = (bundle.path / "manifest.json").read_bytes()
        digest = sha256_bytes(raw)
        if self.sent == digest:
            return
        for rel in sorted(bundle.manifest["files"]):
            self.call("put", rel, bundle.sha256(rel), bundle.read(rel))
        self.call("put", "manifest.json", digest, raw)
        self.sent = digest


def connect_boards(tracker: tuple[str, int], key: str, *, most: int | None = None,
                   request_timeout_s: float = 30.0) -> list[Board]:
    """Sessions with the free boards under `key` (at most `most`), each asked who it is. DeviceError in one
    line when the tracker has none free."""
    rpc = _rpc()
    info = tracker_summary(tracker).get(key)
    if not info or not info["boards"]:
        known = ", ".join(tracker_summary(tracker)) or "none"
        raise DeviceError(f"no board registered under key {key!r} at tracker {tracker[0]}:{tracker[1]} "
                          f"(keys: {known}); start one with `edgeflex board serve --tracker "
                          f"{tracker[0]}:{tracker[1]} --key {key}`")
    n = info["free"] if most is None else min(most, info["free"])
    if n < 1:
        raise DeviceError(f"every board under key {key!r} is busy ({info['busy']} of {len(info['boards'])}); "
                          "try again when one is free (`edgeflex boards`)")
    boards = []
    for _ in range(n):
        try:
            conn = rpc.connect_tracker(*tracker)
            # NOTE: the tracker queues a request until a board is free: one taken meanwhile by another user
            # would block this one without end (the socket is TrackerSession's own; no setter for it)
            conn._sock.settimeout(request_timeout_s)
            sess = conn.request(key, priority=1, session_timeout=0, max_retry=2)
        except (OSError, RuntimeError) as e:
            if boards:
                break                           # taken meanwhile by another user: go with those we have
            raise DeviceError(f"the tracker gave no board under key {key!r} ({_one_line(e)})") from None
        board = Board(sess, {"name": "?"})
        board.identity = json.loads(board.call("identity"))
        board.name = board.identity["name"]
        boards.append(board)
    return boards


def _trusted(bundle: Bundle, folder: str, allow_native: bool) -> list[str]:
    """The engine libraries of `folder` to send: refused unless compiled by this user on this machine or
    `allow_native` (the board runs whatever it is sent, so the workstation decides)."""
    from .backends.tvm import created_here, engine_records

    libs = []
    for rel in engine_records(bundle, folder):
        meta = json.loads(bundle.read(rel))
        if not allow_native and not created_here(meta.get("created_by")):
            who = meta.get("created_by") or {}
            raise BackendUnavailable(f"bundle {bundle.name!r}: TVM engine {meta.get('library')} was "
                                     f"compiled by {who.get('user', '?')!r} on another machine; send it to "
                                     "boards only if you trust its source: --allow-native")
        libs.append(meta["library"])
    return libs


def _engine_folder(bundle: Bundle, device: str) -> str:
    from .backends.tvm import target_dir

    folder = target_dir(device)
    if not any(r.startswith(folder + "/") for r in bundle.manifest["files"]):
        raise BackendUnavailable(f"bundle {bundle.name!r} has no TVM engines for {device!r} ({folder}/); "
                                 f"compile them first: `edgeflex compile {bundle.path} --target {device}`")
    return folder


# --- the workstation: remote profiles and checks ----------------------------------------------------------

Event = Callable[[str, str, list[str]], None]


def _spread(boards: list[Board], chunks: list[list[str]], work: Callable[[Board, list[str]], Any],
            on_event: Event | None) -> dict[int, tuple[Board, Any]]:
    """Run `work(board, chunk)` for every chunk on the boards in parallel, one thread per board taking chunks
    from a queue. A chunk whose board is lost goes back in the queue for the boards left; when none is
    left, BoardLost names what was lost and what was not done. Returns {chunk index: (board, result)}."""
    todo: queue.Queue = queue.Queue()
    for i in range(len(chunks)):
        todo.put(i)
    done: dict[int, tuple[Board, Any]] = {}
    lost: list[str] = []
    errors: list[BaseException] = []
    alive = [len(boards)]
    lock = threading.Lock()

    def worker(board: Board) -> None:
        while not errors:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            if on_event is not None:
                on_event("start", board.name, chunks[i])
            try:
                result = work(board, chunks[i])
            except BoardLost as e:
                with lock:
                    lost.append(str(e))
                    alive[0] -= 1
                todo.put(i)                     # for another board
                if on_event is not None:
                    on_event("lost", board.name, chunks[i])
                return
            except BaseException as e:  # noqa: BLE001 - the first error ends the run, named in one line
                errors.append(e)
                return
            with lock:
                done[i] = (board, result)
            if on_event is not None:
                on_event("done", board.name, chunks[i])

    threads = [threading.Thread(target=worker, args=(b,), daemon=True) for b in boards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if len(done) < len(chunks):
        missing = sorted({c for i, ch in enumerate(chunks) if i not in done for c in ch})
        raise BoardLost(f"{'; '.join(lost) or 'no board'}; no board left to measure {', '.join(missing)}: "
                        "nothing written to the bundle")
    return done


def _chunks(names: list[str], n: int) -> list[list[str]]:
    """`names` dealt round-robin into `n` chunks (none empty)."""
    return [c for c in (names[i::n] for i in range(n)) if c]


def profile_remote(path: str | os.PathLike, tracker: tuple[str, int], key: str, *, device: str = "host",
                   threads: Sequence[int] | None = None, batch: int = 1, min_seconds: float = 0.5,
                   configs: Sequence[str] | None = None, allow_native: bool = False,
                   boards: int | None = None, on_event: Event | None = None) -> dict[str, Any]:
    """Profile every config of the bundle at `path` on the boards under `key`: the bundle (with its TVM
    engines for `device`) sent to each board, the configs dealt over the boards and measured there in
    parallel by edgeflex's own profiler on the TVM backend; a lost board's configs are measured by another.
    Returns the profile, in the form of a local one, `obtained: measured` (`emulated` from an emulated
    board), with `boards` (each board's identity) and `measured_on` (config -> board name). Not saved:
    `save_profile` does that. `on_event(kind, board, configs)` is told of each start, done and lost."""
    from edgeflex.args import check_int, check_real

    check_int("batch", batch, 1)
    check_real("min_seconds", min_seconds, 0)
    bundle = Bundle.open(path)
    folder = _engine_folder(bundle, device)
    _trusted(bundle, folder, allow_native)
    names = [c.name for c in bundle.configs]
    if configs:
        for c in configs:
            bundle.config(c)
        names = [n for n in names if n in configs]
    manifest_sha = sha256_bytes((bundle.path / "manifest.json").read_bytes())
    fleet = connect_boards(tracker, key, most=boards)
    chunks = _chunks(names, len(fleet))

    def work(board: Board, chunk: list[str]) -> dict[str, Any]:
        board.send(bundle)
        prof: dict[str, Any] | None = None
        # NOTE: one thread count per call: TVM has one thread pool per process (the session's), so the
        # counts are measured one after the other, each with its engines loaded afresh
        for t in threads or [None]:
            spec = {"device": device, "configs": chunk, "threads": [t] if t else None, "batch": batch,
                    "min_seconds": min_seconds, "manifest_sha256": manifest_sha}
            part = json.loads(board.call("profile", json.dumps(spec)))
            if prof is None:
                prof = part
            else:
                prof["by_threads"].update(part["by_threads"])
                prof["env"]["thread_counts"] += part["env"]["thread_counts"]
        assert prof is not None
        return prof

    try:
        done = _spread(fleet, chunks, work, on_event)
    finally:
        for b in fleet:
            b.session = None
    return _merge(bundle, device, [done[i] for i in sorted(done)], tracker, key)


def _merge(bundle: Bundle, device: str, parts: list[tuple[Board, dict[str, Any]]], tracker: tuple[str, int],
           key: str) -> dict[str, Any]:
    """One profile from the boards' parts: each config's stats as its board measured them."""
    first = parts[0][1]
    counts = [str(t) for t in first["env"]["thread_counts"]]
    by_threads: dict[str, dict[str, Any]] = {t: {} for t in counts}
    measured_on, identities = {}, {}
    for board, prof in parts:
        if [str(t) for t in prof["env"]["thread_counts"]] != counts:
            raise DeviceError(f"boards under key {key!r} differ in their thread counts "
                              f"({prof['env']['thread_counts']} on {board.name}, {counts} elsewhere); pass "
                              "--threads")
        for t in counts:
            by_threads[t].update(prof["by_threads"][t])
        for name in prof["configs"]:
            measured_on[name] = board.name
        identities[board.name] = board.identity
    order = [c.name for c in bundle.configs]
    by_threads = {t: {n: s[n] for n in order if n in s} for t, s in by_threads.items()}
    env = {**first["env"], "rpc": {"tracker": f"{tracker[0]}:{tracker[1]}", "key": key}}
    emulated = sorted({b.identity["emulated"] for b, _ in parts if b.identity.get("emulated")})
    # NOTE: times under emulation are not the device's: recorded as such (the predictor and `query` must
    # not take them for measurements of the device)
    obtained = {"obtained": "emulated", "emulated": emulated} if emulated else {}
    return {**first, **obtained, "device": device, "model": model_id(bundle.manifest), "env": env,
            "configs": by_threads[counts[0]], "by_threads": by_threads,
            "boards": identities, "measured_on": measured_on}


def check_remote(path: str | os.PathLike, tracker: tuple[str, int], key: str, *, device: str = "host",
                 batch: int = 3, seed: int = 0, allow_native: bool = False,
                 on_event: Event | None = None) -> dict[str, Any]:
    """Every config of the bundle run on a board under `key` (TVM engines for `device`) on fixed inputs
    (seeded), beside the same inputs through ONNX Runtime here: per output, the largest difference relative
    to ONNX Runtime's largest magnitude. Returns {"board", "inputs", "outputs": {CONFIG/INDEX: rel_err}}
    and the arrays under "remote" and "local"."""
    import io

    from .runtime import Runtime

    bundle = Bundle.open(path)
    folder = _engine_folder(bundle, device)
    _trusted(bundle, folder, allow_native)
    local = Runtime(bundle, threads=1)
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal([batch if d is None else d for d in s.shape]).astype(s.dtype)
          for s in local.inputs]
    ref = every_config(local, xs)
    buf = io.BytesIO()
    np.savez(buf, **{f"x{i}": x for i, x in enumerate(xs)})
    manifest_sha = sha256_bytes((bundle.path / "manifest.json").read_bytes())
    fleet = connect_boards(tracker, key, most=1)

    def work(board: Board, _chunk: list[str]) -> bytes:
        board.send(bundle)
        spec = {"device": device, "threads": [1], "manifest_sha256": manifest_sha}
        return bytes(board.call("run", json.dumps(spec), buf.getvalue()))

    try:
        (board, data), = _spread(fleet, [[c.name for c in local.configs]], work, on_event).values()
    finally:
        for b in fleet:
            b.session = None
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        remote = {k: z[k] for k in z.files}
    if set(remote) != set(ref):
        raise DeviceError(f"board {board.name} returned outputs {sorted(remote)}, expected {sorted(ref)}")
    errs = {}
    for k, want in ref.items():
        got = remote[k]
        if got.shape != want.shape or got.dtype != want.dtype:
            errs[k] = float("inf")
            continue
        errs[k] = float(np.abs(got.astype(np.float64) - want).max() / max(float(np.abs(want).max()), 1e-30))
    return {"board": board.identity, "device": device, "batch": batch, "seed": seed, "outputs": errs,
            "remote": remote, "local": ref}


def wait_for_boards(tracker: tuple[str, int], key: str, n: int, timeout_s: float = 60.0) -> int:
    """Block until `n` boards under `key` are free (a freshly started server takes a moment to register);
    returns how many are. DeviceError after `timeout_s`."""
    t0 = time.monotonic()
    while True:
        try:
            have = tracker_summary(tracker).get(key, {}).get("free", 0)
        except DeviceError:
            have = 0
        if have >= n:
            return have
        if time.monotonic() - t0 > timeout_s:
            raise DeviceError(f"{have} of {n} boards registered under key {key!r} after {timeout_s:.0f} s")
        time.sleep(0.2)


__all__ = ["BoardLost", "check_remote", "connect_boards", "parse_addr", "profile_remote",
           "start_server", "start_tracker", "tracker_summary", "wait_for_boards"]
