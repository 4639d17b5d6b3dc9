"""The sourced TensorRT operator matrix (issue 23): facts read from onnx-tensorrt docs/operators.md."""

import json
from pathlib import Path

from compile.tensorrt_ops.regen import parse

MATRIX = Path(__file__).parents[1] / "compile" / "tensorrt_ops" / "10.1.json"


def test_matrix_sourced_and_known_facts():
    data = json.loads(MATRIX.read_text())
    assert data["tag"] == "release/10.1-GA" and len(data["commit"]) == 40
    ops = data["operators"]
    assert ops["DFT"]["supported"] is False
    assert "first output" in ops["LayerNormalization"]["restrictions"]
    assert ops["MatMul"]["supported"] is True


def test_parse_table_rows():
    text = "| Operator | Supported |\n|---|---|\n| Abs | Y | FP32, FP16 |\n| DFT | N |\n"
    ops = parse(text)
    assert ops["Abs"] == {"supported": True, "types": ["FP32", "FP16"], "restrictions": ""}
    assert ops["DFT"]["supported"] is False
