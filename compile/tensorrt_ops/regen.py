"""Regenerate a TensorRT ONNX-parser operator matrix from onnx/onnx-tensorrt docs/operators.md.

    python compile/tensorrt_ops/regen.py MIRROR_GIT_DIR TAG VERSION

reads `git show TAG:docs/operators.md` in a clone of github.com/onnx/onnx-tensorrt and writes
compile/tensorrt_ops/VERSION.json: per operator supported (bool), types, restrictions (verbatim),
with the source URL, tag and commit recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOURCE = "https://github.com/onnx/onnx-tensorrt"


def parse(text: str) -> dict[str, dict]:
    ops: dict[str, dict] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or cells[1] not in ("Y", "N"):
            continue
        types = [t.strip() for t in cells[2].split(",") if t.strip()] if len(cells) > 2 else []
        ops[cells[0]] = {"supported": cells[1] == "Y", "types": types,
                         "restrictions": cells[3] if len(cells) > 3 else ""}
    return ops


def main(git_dir: str, tag: str, version: str) -> None:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", git_dir, *args], check=True, capture_output=True, text=True)
        return done.stdout

    text = git("show", f"{tag}:docs/operators.md")
    data = {"tensorrt": version, "source": f"{SOURCE}/blob/{tag}/docs/operators.md", "tag": tag,
            "commit": git("rev-list", "-n1", tag).strip(), "operators": parse(text)}
    out = Path(__file__).with_name(f"{version}.json")
    out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{out}: {len(data['operators'])} operators from {tag}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
