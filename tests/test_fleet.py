"""Boards as a fleet through TVM's RPC tracker, all on 127.0.0.1 with ephemeral ports: `edgeflex tracker` and
two `edgeflex board serve` processes (real TVM tracker and servers), a DRESS bundle (four configs) compiled
for this host, profiled over both boards, checked on a board against ONNX Runtime here, and a board killed
mid-profile (its configs measured by the other; with none left, one line and the bundle unchanged)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgeflex[tvm]')")
pytest.importorskip("tornado", reason="the RPC tracker needs tornado (pip install 'edgeflex[fleet]')")

import edgeflex as ef  # noqa: E402
from edgeflex.cli import main as cli  # noqa: E402
from edgeflex.runtime import fleet  # noqa: E402
from edgeflex.runtime.profiles import measure_profile  # noqa: E402

KEY = "edgeflex-test"
EDGEFLEX = [sys.executable, "-m", "edgeflex.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """An edgeflex command in a process group of its own, its first line of output read for the port."""

    def __init__(self, args: list[str]):
        self.p = subprocess.Popen([*EDGEFLEX, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True, cwd=Path(__file__).parents[1])
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)
            self.ready.set()
        self.ready.set()

    def port(self, timeout: float = 120) -> int:
        assert self.ready.wait(timeout), "no output from " + " ".join(self.p.args)
        m = re.search(r"127\.0\.0\.1:(\d+)", self.lines[0])
        assert m, self.lines
        return int(m.group(1))

    def kill(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)       # the server and its session's forked process
            self.p.wait()


@pytest.fixture(scope="module")
def fleet_setup(tmp_path_factory):
    """(tracker address, {board name: Proc}, bundle path): a tracker and two boards, a DRESS MLP bundle
    (four levels) with TVM engines for this host."""
    from edgeflex.compile.tvm import compile_bundle
    from edgeflex.export.elastic import export_dress
    from edgeflex.models.dress import DressModel, build_backbone

    tracker = Proc(["tracker", "--port", str(_free_port())])
    procs = {}
    try:
        port = tracker.port()
        for name in ("board-a", "board-b"):
            procs[name] = Proc(["board", "serve", "--tracker", f"127.0.0.1:{port}", "--key", KEY,
                                "--name", name, "--port", str(_free_port())])
        path = tmp_path_factory.mktemp("fleet") / "mlp.efx"
        torch.manual_seed(0)
        export_dress(DressModel(build_backbone("mlp")).eval(), torch.randn(2, 1, 8, 8), path)
        compile_bundle(path, "host", dress_kernel="dense", batch1=False)
        for p in procs.values():
            p.port()
        fleet.wait_for_boards(("127.0.0.1", port), KEY, 2, timeout_s=120)
        yield ("127.0.0.1", port), procs, path
    finally:
        for p in procs.values():
            p.kill()
        tracker.kill()


def test_boards_lists_the_key_with_both_boards_free(fleet_setup, capsys) -> None:
    (host, port), _, _ = fleet_setup
    assert cli(["boards", "--tracker", f"{host}:{port}", "--json"]) == 0
    keys = json.loads(capsys.readouterr().out)
    assert keys[KEY]["free"] == 2 and keys[KEY]["busy"] == 0 and len(keys[KEY]["boards"]) == 2


def test_a_board_serves_with_the_tvm_runtime_alone_on_loopback(fleet_setup) -> None:
    tracker, procs, _ = fleet_setup
    boards = fleet.connect_boards(tracker, KEY, most=1)
    assert boards[0].identity["imported"] == []         # neither torch nor onnx nor onnxruntime
    assert boards[0].identity["name"] in procs
    for p in procs.values():
        assert "on 127.0.0.1:" in p.lines[0]
    boards[0].session = None
    fleet.wait_for_boards(tracker, KEY, 2)


def test_a_profile_over_two_boards_spreads_the_configs_and_has_a_local_profiles_form(fleet_setup,
                                                                                      capsys) -> None:
    (host, port), procs, path = fleet_setup
    assert cli(["profile", str(path), "--rpc", f"{host}:{port}", "--key", KEY, "--threads", "1",
                "--min-seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    remote = ef.Runtime(path).latency_profile()
    assert remote["obtained"] == "measured" and remote["device"] == "host"
    assert set(remote["measured_on"].values()) == set(procs)        # both boards measured configs
    assert sorted(remote["measured_on"]) == sorted(c.name for c in ef.Bundle.open(path).configs)
    for board in procs:
        assert f"board {board}: measured" in out
        assert remote["boards"][board]["host"]["cpu"]
    local = measure_profile(ef.Runtime(path, backend="tvm", threads=1), memory=False, progress=False,
                            min_seconds=0.05)
    assert set(local) <= set(remote) and set(remote) - set(local) == {"boards", "measured_on"}
    assert set(local["env"]) <= set(remote["env"])
    assert list(remote["configs"]) == list(local["configs"])
    for name, stats in remote["configs"].items():
        assert set(stats) == set(local["configs"][name]) and stats["p50_ms"] > 0
    assert cli(["query", str(path), "--device", "host", "--latency-ms", "100", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["configs"]
    assert hits and all(h["source"] == "measured" for h in hits)
    fleet.wait_for_boards((host, port), KEY, 2)


def test_a_remote_check_equals_the_local_outputs(fleet_setup, capsys) -> None:
    tracker, _, path = fleet_setup
    report = fleet.check_remote(path, tracker, KEY, batch=3, seed=1)
    local_tvm = ef.Runtime(path, backend="tvm", threads=1)
    xs = [np.random.default_rng(1).standard_normal([3, *local_tvm.inputs[0].shape[1:]]).astype(np.float32)]
    here = fleet.every_config(local_tvm, xs)
    assert set(report["remote"]) == set(here) == set(report["local"]) and len(here) == 4
    for k, got in report["remote"].items():
        np.testing.assert_allclose(got, here[k], rtol=1e-6, atol=1e-7)   # the same engines, same CPU
        assert report["outputs"][k] <= 1e-4
    fleet.wait_for_boards(tracker, KEY, 2)
    assert cli(["check", str(path), "--rpc", f"{tracker[0]}:{tracker[1]}", "--key", KEY]) == 0
    assert "4 output(s) of TVM (host) on board" in capsys.readouterr().out
    fleet.wait_for_boards(tracker, KEY, 2)


def test_a_board_refuses_a_file_whose_bytes_differ_from_the_bundles_sha256(fleet_setup) -> None:
    from edgeflex.runtime.bundle import sha256_bytes

    tracker, _, _ = fleet_setup
    (board,) = fleet.connect_boards(tracker, KEY, most=1)
    with pytest.raises(ef.DeviceError, match="not written"):
        board.call("put", "engines/tvm/host/main.so", "0" * 64, b"\x7fELF not the bundle's")
    with pytest.raises(ef.DeviceError, match="outside the bundle"):
        board.call("put", "../escape.so", sha256_bytes(b"x"), b"x")
    board.call("identity")                              # a refused file leaves the session usable
    board.session = None
    fleet.wait_for_boards(tracker, KEY, 2)


def test_bad_fleet_arguments_are_one_line_errors(fleet_setup, capsys) -> None:
    (host, port), _, path = fleet_setup
    for args, want in ((["boards", "--tracker", "nohost"], "expected HOST:PORT"),
                       (["profile", str(path), "--rpc", f"{host}:{port}"], "--rpc needs --key"),
                       (["profile", str(path), "--rpc", f"{host}:{port}", "--key", "nobody"],
                        "no board registered under key 'nobody'"),
                       (["check", str(path), "--rpc", f"{host}:{port}", "--key", KEY, "--device", "rpi5"],
                        "no TVM engines for 'rpi5'")):
        assert cli(args) == 2, args
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1, err


def test_a_board_killed_mid_profile_leaves_it_to_the_other_then_fails_in_one_line(fleet_setup) -> None:
    tracker, procs, path = fleet_setup
    killed: list[str] = []

    def kill_first(kind: str, board: str, _configs: list[str]) -> None:
        if kind == "start" and not killed:
            killed.append(board)
            procs[board].kill()

    prof = fleet.profile_remote(path, tracker, KEY, threads=[1], min_seconds=0.05, on_event=kill_first)
    (survivor,) = set(procs) - set(killed)
    assert set(prof["measured_on"].values()) == {survivor} and len(prof["measured_on"]) == 4
    fleet.wait_for_boards(tracker, KEY, 1)

    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def kill_all(kind: str, board: str, _configs: list[str]) -> None:
        if kind == "start":
            procs[board].kill()

    with pytest.raises(fleet.BoardLost) as e:
        fleet.profile_remote(path, tracker, KEY, threads=[1], min_seconds=0.05, on_event=kill_all)
    assert "\n" not in str(e.value) and "nothing written to the bundle" in str(e.value)
    assert survivor in str(e.value)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
