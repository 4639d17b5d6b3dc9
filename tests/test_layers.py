"""Imports only go down the stages of DESIGN.md: kernels <- devices, models <- runtime <- compile <- export
<- edgeflex (API and CLI), function-level imports included. The foundation every stage may import sits at
the package top: `edgeflex.errors`, `edgeflex.args` (argument checks), `edgeflex.version`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("kernels", "devices", "models", "runtime", "compile", "export", "edgeflex")
MAY_IMPORT = {
    "kernels": set(),
    "devices": {"kernels"},
    "models": {"kernels"},
    "runtime": {"kernels", "devices"},
    "compile": {"kernels", "devices", "runtime"},
    "export": {"kernels", "devices", "models", "runtime", "compile"},
    "edgeflex": set(STAGES),
}
FOUNDATION = {"edgeflex.errors", "edgeflex.args", "edgeflex.version"}
# Known, with the reason; the test fails when one is added, and when one of these goes (update the list).
KNOWN: set[tuple[str, str]] = set()


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "edgeflex":
        return None
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    return "edgeflex"


def _imports(path: Path, package: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.append(".".join(base + ([node.module] if node.module else [])))
            else:
                out.append(node.module or "")
    return out


def violations() -> set[tuple[str, str]]:
    found = set()
    for stage in STAGES:
        folder = ROOT / stage
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.py")):
            sub = path.relative_to(folder).with_suffix("").parts[:-1]
            package = ".".join(("edgeflex",) + (() if stage == "edgeflex" else (stage,)) + sub)
            for module in _imports(path, package):
                target = _stage(module)
                if target is None or target == stage or module in FOUNDATION:
                    continue
                if stage == "edgeflex" and path.stem in ("errors", "args", "version"):
                    target = "edgeflex (foundation)"
                if target not in MAY_IMPORT[stage]:
                    found.add((path.relative_to(ROOT).as_posix(), module))
    return found


def test_imports_only_go_down_the_stages() -> None:
    found = violations()
    assert found - KNOWN == set(), f"new imports of a later stage: {sorted(found - KNOWN)}"
    assert KNOWN - found == set(), f"gone (remove from KNOWN): {sorted(KNOWN - found)}"


def test_the_foundation_imports_no_stage() -> None:
    for name in ("errors", "args", "version"):
        mods = [m for m in _imports(ROOT / "edgeflex" / f"{name}.py", "edgeflex") if m.startswith("edgeflex")]
        assert set(mods) <= FOUNDATION, (name, mods)
