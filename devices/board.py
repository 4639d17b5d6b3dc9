"""An emulated arm64 board on this machine: a Debian arm64 root (debootstrap, unpacked with `dpkg -x`) plus
the aarch64 wheels of numpy and apache-tvm, run under QEMU user mode with the catalogue device's CPU model
(rpi5: Cortex-A76). Builds once into `.board/` (resumable: each step leaves a stamp), stages edgeflex into it
and runs Python there. Owns the board, not the check (`tests/test_board.py`). Stdlib only: it also runs on
the board. Timing under emulation means nothing: nothing here reports latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from edgeflex.errors import DeviceError

BOARD_DIR = ".board"
DEVICE = "rpi5"
SUITE = "bookworm"                     # Debian 12: python3.11, the ABI of the host venv's wheels
MIRROR = os.environ.get("EDGEFLEX_BOARD_MIRROR", "http://deb.debian.org/debian")
PYTHON = "usr/bin/python3.11"
# The board runs the engine and numpy only, pinned to the host's versions (TVM engines are version-bound).
WHEELS = ("numpy", "apache-tvm", "apache-tvm-ffi")
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")   # bookworm has glibc 2.36
# tool -> the Debian package that has it
TOOLS = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap", "dpkg": "dpkg",
         "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}
# The board's own /etc/machine-id (QEMU's -L root is searched first), so the native-code trust rule sees
# another machine, as a real board would.
MACHINE_ID = "edgef1e0b0a4d00000000000000e0a4d"
REPORT = "edgeflex-board-report: "
EMULATED_ENV = "EDGEFLEX_EMULATED"     # set on the emulated board: how it is emulated
STEPS = ("debootstrap", "unpack", "wheels", "smoke")
# aarch64 AT_HWCAP bits (Linux arch/arm64/include/uapi/asm/hwcap.h): what QEMU's CPU model offers
HWCAP_BITS = {0: "fp", 1: "asimd", 3: "aes", 4: "pmull", 7: "crc32", 8: "atomics", 9: "fphp", 10: "asimdhp",
              12: "asimdrdm", 13: "jscvt", 14: "fcma", 15: "lrcpc", 16: "dcpop", 17: "sha3", 20: "asimddp",
              21: "sha512", 22: "sve"}


def missing_tools() -> list[str]:
    """The tools the board needs (emulator, root builder, cross linker) that are not on PATH. The cross
    linker is not needed where the ziglang wheel is installed (`edgeflex[cross]`: compile links with it)."""
    zig = _has_module("ziglang")
    return [t for t in TOOLS if shutil.which(t) is None and not (zig and t == "aarch64-linux-gnu-g++")]


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def require_tools() -> None:
    missing = missing_tools()
    if missing:
        pkgs = " ".join(dict.fromkeys(TOOLS[t] for t in missing))
        raise DeviceError(f"the emulated board needs {', '.join(missing)} (not found on PATH); install them: "
                          f"sudo apt-get install {pkgs}")


def qemu_cpu(device: str = DEVICE) -> str:
    """QEMU's CPU model for `device`: the mcpu of its TVM target in the catalogue, the CPU the engines are
    compiled for. Refused if this QEMU does not emulate it (never a silent stand-in such as `max`)."""
    from edgeflex.devices.catalog import get_device

    dev = get_device(device)
    mcpus = {b.target.get("mcpu") for b in dev.backends if b.engine == "tvm" and b.unit == "cpu" and b.target}
    if len(mcpus) != 1 or None in mcpus:
        raise DeviceError(f"device {device!r} has no single TVM cpu target with an mcpu in the catalogue "
                          f"(found {sorted(map(str, mcpus))}); expected one, e.g. mcpu = \"cortex-a76\"")
    (mcpu,) = mcpus
    out = subprocess.run(["qemu-aarch64-static", "-cpu", "help"], capture_output=True, text=True).stdout
    if mcpu not in out.split():
        raise DeviceError(f"this QEMU does not emulate {mcpu!r} (the CPU of {device}'s engines); "
                          "`qemu-aarch64-static -cpu help` lists its models; install a newer qemu-user")
    return mcpu


def wheel_pins() -> list[str]:
    """`name==version` for each board wheel: the versions of the host's (compiling) environment."""
    pins = []
    for name in WHEELS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise DeviceError(f"{name} is not installed on the host; the board takes the host's version "
                              "(TVM engines are version-bound): pip install 'edgeflex[tvm]'") from None
    return pins


def _repo_package_dirs() -> tuple[Path, dict[str, str], list[str], dict[str, list[str]]] | None:
    """(repo root, package-dir map, packages, package-data) when edgeflex runs from its source tree."""
    root = Path(__file__).resolve().parents[1]
    try:
        tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
        return root, tool["package-dir"], tool["packages"], tool.get("package-data", {})
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None


class Board:
    """The board in `path` (default `.board/`): `root/` (arm64 Debian), `site/` (aarch64 wheels),
    `edgeflex/` (the package, staged afresh for each run), `steps/` (one stamp per finished build step)."""

    def __init__(self, path: str | os.PathLike = BOARD_DIR, device: str = DEVICE):
        self.path = Path(path).resolve()
        self.device = device
        self.root, self.site, self.pkg = self.path / "root", self.path / "site", self.path / "edgeflex"

    # --- state ---------------------------------------------------------------------------------------------

    def _stamp(self, step: str) -> Path:
        return self.path / "steps" / f"{step}.json"

    def done(self, step: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._stamp(step).read_text())
        except (OSError, ValueError):
            return None

    def _mark(self, step: str, **info: Any) -> None:
        self._stamp(step).parent.mkdir(parents=True, exist_ok=True)
        tmp = self._stamp(step).with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        tmp.replace(self._stamp(step))

    @property
    def ready(self) -> bool:
        """Built, with the wheels of the host's current versions."""
        wheels = self.done("wheels")
        return self.done("smoke") is not None and wheels is not None and wheels.get("pins") == wheel_pins()

    def why_not_ready(self) -> str | None:
        """One line: what is missing, and the command that builds it; None when ready."""
        missing = missing_tools()
        if missing:
            pkgs = " ".join(dict.fromkeys(TOOLS[t] for t in missing))
            return f"the emulated board needs {', '.join(missing)}: sudo apt-get install {pkgs}"
        if not self.ready:
            todo = [s for s in STEPS if self.done(s) is None] or ["wheels (host versions changed)"]
            return (f"the emulated arm64 board in {self.path} is not built (to do: {', '.join(todo)}); "
                    "build it with `make board-test` or `python -m edgeflex.devices.board build`")
        return None

    # --- building ------------------------------------------------------------------------------------------

    def build(self, log: Callable[[str], None] = print) -> float:
        """Build what is not built yet; returns the seconds it took (0 when already built)."""
        require_tools()
        t0 = time.perf_counter()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / ".gitignore").write_text("# the emulated board (python -m edgeflex.devices.board)\n*\n")
        pins = wheel_pins()
        if (self.done("wheels") or {}).get("pins") not in (None, pins):
            log(f"[board] host versions changed ({', '.join(pins)}): reinstalling the wheels")
            for step in ("wheels", "smoke"):
                self._stamp(step).unlink(missing_ok=True)
        for i, step in enumerate(STEPS, 1):
            if self.done(step) is not None:
                log(f"[board {i}/{len(STEPS)}] {step}: done before")
                continue
            s0 = time.perf_counter()
            info = getattr(self, f"_step_{step}")(lambda m, i=i, step=step: log(f"[board {i}/{len(STEPS)}] "
                                                                                  f"{step}: {m}"))
            self._mark(step, seconds=round(time.perf_counter() - s0, 1), **info)
            log(f"[board {i}/{len(STEPS)}] {step}: done in {time.perf_counter() - s0:.0f} s")
        return round(time.perf_counter() - t0, 1)

    def _step_debootstrap(self, say: Callable[[str], None]) -> dict[str, Any]:
        # NOTE: --foreign: the second stage runs the arm64 maintainer scripts, which needs binfmt_misc (absent
        # in containers); the first stage downloads everything and unpacks the base, `unpack` does the rest.
        if self.root.exists():
            say(f"removing the partial root of an interrupted run ({self.root})")
            shutil.rmtree(self.root)
        say(f"debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 {SUITE} ({MIRROR}), "
            "~230 MB")
        _run_logged(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3",
                     SUITE, str(self.root), MIRROR], self.path / "debootstrap.log", say)
        return {"suite": SUITE, "mirror": MIRROR}

    def _step_unpack(self, say: Callable[[str], None]) -> dict[str, Any]:
        debs = sorted((self.root / "var/cache/apt/archives").glob("*.deb"))
        if not debs:
            raise DeviceError(f"no .deb files in {self.root}/var/cache/apt/archives; debootstrap did "
                              f"not finish: rm -r {self.path} and build again")
        say(f"dpkg -x {len(debs)} packages (no maintainer scripts run)")
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(self.root)], check=True)
        (self.root / "etc/machine-id").write_text(MACHINE_ID + "\n")
        if not (self.root / PYTHON).exists():
            raise DeviceError(f"the arm64 root has no {PYTHON} after unpacking; expected Debian {SUITE}'s "
                              f"python3.11: rm -r {self.path} and build again")
        return {"packages": len(debs)}

    def _step_wheels(self, say: Callable[[str], None]) -> dict[str, Any]:
        pins = wheel_pins()
        tmp = self.path / "site.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"pip install --target (aarch64, cp311): {' '.join(pins)}")
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        _run_logged([sys.executable, "-m", "pip", "install", "--target", str(tmp), "--only-binary=:all:",
                     *plat, "--python-version", "3.11", "--implementation", "cp", "--progress-bar", "off",
                     *pins], self.path / "pip.log", say)
        shutil.rmtree(self.site, ignore_errors=True)
        tmp.replace(self.site)
        return {"pins": pins}

    def _step_smoke(self, say: Callable[[str], None]) -> dict[str, Any]:
        say(f"python3.11 under qemu-aarch64 -cpu {qemu_cpu(self.device)}: import numpy, tvm, relax")
        out = self.python(["-c", "import json, platform, numpy, tvm; from tvm import relax; print(json.dumps("
                                 "{'machine': platform.machine(), 'tvm': tvm.__version__, "
                                 "'numpy': numpy.__version__}))"], stage=False, capture=True)
        info = json.loads(out.strip().splitlines()[-1])
        if info["machine"] != "aarch64":
            raise DeviceError(f"the board's python says it runs on {info['machine']!r}, expected aarch64")
        return info

    # --- running -------------------------------------------------------------------------------------------

    def stage(self) -> Path:
        """Copy the edgeflex package (as installed: pure Python) into the board, replacing the last copy."""
        tmp = self.path / "edgeflex.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        repo = _repo_package_dirs()
        if repo is not None:
            root, dirs, packages, data = repo
            for pkg in packages:
                src, dst = root / dirs[pkg], tmp / pkg.replace(".", "/")
                dst.mkdir(parents=True, exist_ok=True)
                for f in src.glob("*.py"):
                    shutil.copy2(f, dst / f.name)
                for pattern in data.get(pkg, []):
                    for f in src.glob(pattern):
                        (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, dst / f.relative_to(src))
        else:                                            # an installed edgeflex: one complete package tree
            shutil.copytree(Path(__file__).resolve().parents[1], tmp / "edgeflex",
                            ignore=shutil.ignore_patterns("__pycache__"))
        shutil.rmtree(self.pkg, ignore_errors=True)
        tmp.replace(self.pkg)
        return self.pkg

    def command(self, args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """The host command line and environment that run `python3.11 ARGS` on the board."""
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.path), "LANG": "C.UTF-8",
               "PYTHONPATH": f"{self.pkg}:{self.site}", "PYTHONNOUSERSITE": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
               # what runs here is emulated: a profile measured here says so (runtime/fleet.py)
               EMULATED_ENV: f"qemu-aarch64-static -cpu {qemu_cpu(self.device)}"}
        return ["qemu-aarch64-static", "-cpu", qemu_cpu(self.device), "-L", str(self.root),
                str(self.root / PYTHON), *args], env

    def python(self, args: Sequence[str], *, stage: bool = True, capture: bool = False,
               timeout: float | None = None) -> str:
        """Run `python3.11 ARGS` on the board (staging edgeflex first); raises DeviceError if it fails."""
        if stage:
            self.stage()
        cmd, env = self.command(args)
        p = subprocess.run(cmd, env=env, capture_output=capture, text=True, timeout=timeout)
        if p.returncode != 0:
            tail = (p.stderr or "").strip().splitlines()[-1:] if capture else []
            raise DeviceError(f"python on the emulated board exited with {p.returncode}"
                              + (f" ({tail[0][:200]})" if tail else "") + f"; command: {' '.join(cmd)}")
        return p.stdout or ""

    def run_cases(self, spec: str | os.PathLike, *, timeout: float | None = None) -> dict[str, Any]:
        """Run `edgeflex.runtime.board_cases` (the runtime's side of the check) on the board with `spec`;
        returns its report."""
        # NOTE: -P: with -m, python puts the working directory first on sys.path, and in the source tree
        # that is the repo's own `edgeflex/` folder (which lacks the mapped sub-packages).
        out = self.python(["-P", "-m", "edgeflex.runtime.board_cases", str(spec)], capture=True,
                          timeout=timeout)
        line = next((ln for ln in out.splitlines()[::-1] if ln.startswith(REPORT)), None)
        if line is None:
            raise DeviceError(f"the board printed no report line ({REPORT}...); its output: {out[-200:]}")
        return json.loads(line[len(REPORT):])


def _run_logged(cmd: list[str], log_file: Path, say: Callable[[str], None]) -> None:
    """Run a long step with its output in `log_file`, a progress line every 15 s."""
    with open(log_file, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        t0 = time.perf_counter()
        while True:
            try:
                rc = p.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                last = log_file.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                say(f"{time.perf_counter() - t0:.0f} s ... {last[0][:90]}")
    if rc != 0:
        last = log_file.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise DeviceError(f"`{' '.join(cmd[:3])} ...` failed (exit {rc}: {last[0][:160]}); see {log_file}")


# --- on the board ----------------------------------------------------------------------------------------

def hwcaps() -> list[str]:
    """The CPU features this process is given (AT_HWCAP of /proc/self/auxv, which QEMU fills from its CPU
    model), by their Linux names; [] off aarch64."""
    if platform.machine() != "aarch64":
        return []
    data = Path("/proc/self/auxv").read_bytes()
    aux = dict(struct.iter_unpack("<QQ", data[:len(data) // 16 * 16]))
    return [name for bit, name in sorted(HWCAP_BITS.items()) if aux.get(16, 0) >> bit & 1]


# --- command line ----------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeflex.devices.board", description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=BOARD_DIR, help="where the board lives (default: .board)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the board (once; resumable)")
    sub.add_parser("status", help="say whether the board is built")
    run = sub.add_parser("run", help="run a Python script on the board: run SCRIPT [ARGS...]")
    run.add_argument("script")
    run.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    try:
        board = Board(a.dir)
        if a.cmd == "build":
            seconds = board.build()
            print(f"[board] ready in {board.path} ({seconds:.0f} s this run)")
        elif a.cmd == "status":
            why = board.why_not_ready()
            print(why or f"[board] ready in {board.path}: {json.dumps(board.done('smoke'))}")
            return 1 if why else 0
        else:
            if not board.ready:
                raise DeviceError(board.why_not_ready() or "the board is not ready")
            board.python([a.script, *a.args])
    except DeviceError as e:
        print(f"edgeflex board: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
