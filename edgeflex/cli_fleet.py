"""The command line's fleet verbs (`edgeflex tracker`, `board serve`, `boards`, and `--rpc` of `profile`,
`check`): argument handling and printing only, the work is `edgeflex.runtime.fleet`. Kept apart from
`edgeflex/cli.py`, which parses the arguments and dispatches here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from edgeflex.errors import UsageError


def _table(rows: list[list[str]], header: list[str]) -> str:
    from edgeflex.cli import _table as table

    return table(rows, header)


def _serve_forever(state, what: str) -> int:
    """Block while TVM's serving thread runs. Ctrl-C ends the process at once: TVM's loops block in
    accept() and have no stop of their own for the server."""
    try:
        while state.thread.is_alive():
            state.thread.join(1.0)
    except KeyboardInterrupt:
        print(f"\n{what} stopped", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    return 1


def cmd_tracker(a: argparse.Namespace) -> int:
    from edgeflex.runtime.fleet import start_tracker

    state = start_tracker(a.host, a.port, silent=not a.verbose)
    print(f"RPC tracker (TVM) on {a.host}:{state.port}; boards join with `edgeflex board serve --tracker "
          f"{a.host}:{state.port} --key KEY`; reachable only from trusted hosts (docs/boards.md)", flush=True)
    return _serve_forever(state, "tracker")


def cmd_board_serve(a: argparse.Namespace) -> int:
    from edgeflex.runtime.fleet import SERVER_PORT, parse_addr, start_server

    tracker = parse_addr("--tracker", a.tracker)
    state = start_server(tracker, a.key, host=a.host, port=a.port or SERVER_PORT, name=a.name,
                         silent=not a.verbose)
    name = a.name or "this board"
    print(f"board {name} serving TVM RPC on {a.host}:{state.port}, key {a.key!r}, tracker "
          f"{tracker[0]}:{tracker[1]}; it runs what the workstation sends: trusted hosts only", flush=True)
    return _serve_forever(state, "board server")


def cmd_boards(a: argparse.Namespace) -> int:
    from edgeflex.runtime.fleet import parse_addr, tracker_summary

    tracker = parse_addr("--tracker", a.tracker)
    keys = tracker_summary(tracker)
    if a.json:
        print(json.dumps(keys, indent=1))
        return 0
    if not keys:
        print(f"no boards registered at tracker {tracker[0]}:{tracker[1]}")
        return 0
    rows = [[k, str(len(v["boards"])), str(v["free"]), str(v["busy"]), str(v["pending"]),
             ", ".join(v["boards"])] for k, v in keys.items()]
    print(_table(rows, ["key", "boards", "free", "busy", "queued", "addresses"]))
    return 0


def _remote_device(a: argparse.Namespace) -> str:
    """The device a remote run is about: --device, or the key when --device is left at host and the key
    names a catalogue device (`--key rpi5`)."""
    from edgeflex.devices import catalog_names, check_device

    if a.device == "host" and a.key in catalog_names():
        return a.key
    return check_device(a.device)


def _key(a: argparse.Namespace) -> str:
    if not a.key:
        raise UsageError("--rpc needs --key KEY: the key the boards registered under (`edgeflex boards`)")
    return a.key


def cmd_profile_remote(a: argparse.Namespace) -> int:
    from edgeflex.runtime.fleet import parse_addr, profile_remote
    from edgeflex.runtime.profiles import profile_path, save_profile

    from .cli import _profile_table

    tracker, key = parse_addr("--rpc", a.rpc), _key(a)
    if a.backend not in ("onnxruntime", "tvm"):
        raise UsageError(f"profile --rpc runs TVM engines on the boards; --backend {a.backend!r} is not one")
    device = _remote_device(a)
    threads = a.threads if isinstance(a.threads, tuple) else (a.threads,) if a.threads else None
    lock = threading.Lock()
    t0 = time.perf_counter()

    def event(kind: str, board: str, configs: list[str]) -> None:
        with lock:
            verb = {"start": "measuring", "done": "measured", "lost": "LOST while measuring"}[kind]
            print(f"[{time.perf_counter() - t0:5.1f}s] board {board}: {verb} {', '.join(configs)}",
                  flush=True)

    prof = profile_remote(a.bundle, tracker, key, device=device, threads=threads, batch=a.batch,
                          min_seconds=a.min_seconds, allow_native=a.allow_native, on_event=event)
    save_profile(a.bundle, prof)
    counts = list(prof["by_threads"])
    for t, stats in prof["by_threads"].items():
        if len(counts) > 1:
            print(f"\nat {t} thread(s):")
        print(_profile_table({n: {**s, "peak_memory_mb": float("nan")} for n, s in stats.items()}))
    rows = [[n, b, prof["boards"][b]["host"]["cpu"], prof["boards"][b]["node"]]
            for n, b in prof["measured_on"].items()]
    print()
    print(_table(rows, ["config", "board", "cpu", "node"]))
    print(f"\nmeasured on {len(prof['boards'])} board(s) under key {key!r} (TVM, {', '.join(counts)} "
          f"threads, batch {a.batch}, peak memory not measured remotely); stored as "
          f"{profile_path(device)} in {a.bundle}")
    return 0


def cmd_check_remote(a: argparse.Namespace) -> int:
    from edgeflex.runtime.fleet import check_remote, parse_addr

    tracker, key = parse_addr("--rpc", a.rpc), _key(a)
    device = _remote_device(a)
    report = check_remote(a.bundle, tracker, key, device=device, allow_native=a.allow_native)
    errs = report["outputs"]
    if a.json:
        print(json.dumps({k: v for k, v in report.items() if k not in ("remote", "local")}, indent=1))
    else:
        rows = [[k, f"{v:.2e}", "ok" if v <= a.tolerance else "DIFFERS"] for k, v in errs.items()]
        print(_table(rows, ["config/output", "max rel diff", f"within {a.tolerance:g}"]))
        print(f"\n{len(errs)} output(s) of TVM ({device}) on board {report['board']['name']} "
              f"({report['board']['host']['cpu']}) against ONNX Runtime here, batch {report['batch']}, "
              f"seed {report['seed']}")
    return 0 if all(v <= a.tolerance for v in errs.values()) else 1


def compile_boards(a: argparse.Namespace):
    """`compile --rpc HOST:PORT --key KEY`: the boards MetaSchedule's RPC runner tunes on."""
    from edgeflex.compile.tvm import Boards
    from edgeflex.runtime.fleet import parse_addr, tracker_summary

    host, port = parse_addr("--rpc", a.rpc)
    key = _key(a)
    if not a.trials:
        raise UsageError("--rpc tunes on the boards: give --trials N (N > 0)")
    if not tracker_summary((host, port)).get(key, {}).get("boards"):
        raise UsageError(f"no board registered under key {key!r} at {host}:{port} (`edgeflex boards "
                         f"--tracker {host}:{port}`)")
    return Boards(host, port, key)
