"""Cross-linking without apt: with the `ziglang` wheel (`edgeflex[cross]`), `edgeflex compile --target rpi5`
links the aarch64 library with `python -m ziglang c++ -target aarch64-linux-gnu` where Debian's
aarch64-linux-gnu-g++ is absent (forced here with EDGEFLEX_LINKER=zig, so the zig path is the one tested on
every machine). The engine JSON records the linker. Running the library on arm64 is tests/test_board.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgeflex[tvm]')")
pytest.importorskip("ziglang", reason="the ziglang wheel is not installed (pip install 'edgeflex[cross]')")

import edgeflex as ef  # noqa: E402
from edgeflex.cli import main as cli  # noqa: E402
from edgeflex.compile import tvm as ctvm  # noqa: E402


def test_rpi5_compiles_and_links_with_zig_without_the_cross_gxx(tmp_path: Path, fits_bundle: Path,
                                                                 monkeypatch, capsys) -> None:
    monkeypatch.setenv(ctvm.LINKER_ENV, "zig")
    path = tmp_path / "fits.efx"
    shutil.copytree(fits_bundle, path)
    assert ctvm.resolve_target("rpi5").linker == "zig c++ -target aarch64-linux-gnu"
    assert cli(["compile", str(path), "--target", "rpi5", "--no-batch1"]) == 0   # the first link: ~1 min
    assert "aarch64" in capsys.readouterr().out
    rec = json.loads((path / "engines/tvm/rpi5/main.json").read_bytes())
    assert rec["linker"].startswith("zig c++") and rec["linker_version"]
    assert rec["elf"]["machine"] == "aarch64" and rec["elf"]["shared_object"]
    assert "__tvm_ffi__library_bin" in rec["elf"]["symbols"]        # the Relax VM's bytecode is in it
    data = (path / rec["library"]).read_bytes()
    from edgeflex.runtime.backends.tvm import check_elf

    check_elf(data, "main.so", "aarch64")                           # a complete arm64 shared object
    with pytest.raises(ef.BackendUnavailable, match="aarch64"):     # arm64 code: refused here, not run
        ef.Runtime(path, backend="tvm", device="rpi5")


def test_the_cross_gxx_is_named_when_neither_it_nor_zig_is_there(monkeypatch) -> None:
    monkeypatch.delenv(ctvm.LINKER_ENV, raising=False)
    monkeypatch.setattr(ctvm, "_zig_version", lambda: None)
    monkeypatch.setattr(ctvm.shutil, "which", lambda _name: None)
    target = ctvm.resolve_target("rpi5")
    assert target.linker == "aarch64-linux-gnu-g++"
    with pytest.raises(ef.BackendUnavailable, match=r"edgeflex\[cross\]") as e:
        ctvm.fcompile_for(target)
    assert "\n" not in str(e.value)


def test_a_bad_linker_choice_is_one_line(monkeypatch) -> None:
    monkeypatch.setenv(ctvm.LINKER_ENV, "clang")
    with pytest.raises(ef.UsageError, match="EDGEFLEX_LINKER") as e:
        ctvm.resolve_target("rpi5")
    assert "\n" not in str(e.value)
