"""The emulated arm64 board (`edgeflex.devices.board`, QEMU Cortex-A76) joins a fleet: `edgeflex board serve`
runs on it (TVM runtime and numpy only), registers with `edgeflex tracker` on this host, and a DRESS bundle
whose rpi5 engines were linked here (by the system's cross g++ or zig) is checked and profiled through it.
Times under emulation are recorded as such (`obtained: emulated`). Skipped until `make board-test` has built
the board."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgeflex[tvm]')")
pytest.importorskip("tornado", reason="the RPC tracker needs tornado (pip install 'edgeflex[fleet]')")

from edgeflex.devices.board import Board  # noqa: E402
from edgeflex.runtime import fleet  # noqa: E402

BOARD = Board(Path(__file__).resolve().parents[1] / ".board")
WHY = BOARD.why_not_ready()
pytestmark = pytest.mark.skipif(WHY is not None, reason=str(WHY))
KEY = "rpi5"


@pytest.fixture(scope="module")
def board_fleet(tmp_path_factory):
    """(tracker address, bundle with rpi5 engines, the board's server process)."""
    import subprocess

    from test_fleet import Proc, _free_port

    from edgeflex.compile.tvm import compile_bundle
    from edgeflex.export.elastic import export_dress
    from edgeflex.models.dress import DressModel, build_backbone

    path = tmp_path_factory.mktemp("board-fleet") / "mlp.efx"
    torch.manual_seed(0)
    export_dress(DressModel(build_backbone("mlp")).eval(), torch.randn(2, 1, 8, 8), path)
    compile_bundle(path, "rpi5", dress_kernel="dense", batch1=False)
    tracker = Proc(["tracker", "--port", str(_free_port())])
    server = None
    try:
        port = tracker.port()
        BOARD.stage()
        cmd, env = BOARD.command(["-P", "-m", "edgeflex.cli", "board", "serve", "--tracker",
                                  f"127.0.0.1:{port}", "--key", KEY, "--name", "qemu-rpi5",
                                  "--port", str(_free_port())])
        server = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        fleet.wait_for_boards(("127.0.0.1", port), KEY, 1, timeout_s=300)
        yield ("127.0.0.1", port), path
    finally:
        if server is not None and server.poll() is None:
            import os
            import signal

            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        tracker.kill()


def test_the_emulated_board_serves_with_neither_torch_nor_onnx(board_fleet) -> None:
    tracker, _ = board_fleet
    (board,) = fleet.connect_boards(tracker, KEY, most=1)
    assert board.identity["host"]["arch"] == "aarch64" and board.identity["imported"] == []
    assert board.identity["emulated"].startswith("qemu-aarch64")
    board.session = None
    fleet.wait_for_boards(tracker, KEY, 1, timeout_s=60)


def test_rpi5_engines_checked_on_the_board_equal_onnxruntime_here(board_fleet) -> None:
    tracker, path = board_fleet
    report = fleet.check_remote(path, tracker, KEY, device="rpi5", batch=3)
    assert report["board"]["name"] == "qemu-rpi5" and len(report["outputs"]) == 4
    assert max(report["outputs"].values()) <= 1e-4, report["outputs"]
    outs = [report["remote"][k] for k in sorted(report["remote"])]
    assert not np.allclose(outs[0], outs[-1])            # the levels really ran different weights
    fleet.wait_for_boards(tracker, KEY, 1, timeout_s=60)


def test_a_profile_through_the_emulated_board_is_recorded_as_emulated(board_fleet, tmp_path) -> None:
    tracker, path = board_fleet
    copy = tmp_path / "mlp.efx"
    shutil.copytree(path, copy)
    prof = fleet.profile_remote(copy, tracker, KEY, device="rpi5", threads=[1], min_seconds=0.05)
    assert prof["obtained"] == "emulated" and prof["emulated"][0].startswith("qemu-aarch64")
    assert set(prof["measured_on"].values()) == {"qemu-rpi5"} and len(prof["configs"]) == 4
