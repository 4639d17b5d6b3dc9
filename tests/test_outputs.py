"""Every output of a user's model: tuple, list, dict and nested outputs become the bundle's named outputs,
in order; outputs that are not tensors (a number, None) are left out with a note and a warning; each kept
output is validated and comes back from `Runtime.run` on ONNX Runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgeflex as ef
from edgeflex.export.core import DroppedOutputWarning


class Heads(nn.Module):
    """A small MLP whose forward returns its two heads in the structure named by `kind`."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.body = nn.Linear(6, 8)
        self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 5)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        a, b = self.a(h), self.b(h)
        return {
            "tuple": lambda: (a, b),
            "list": lambda: [a, b],
            "dict": lambda: {"score": a, "embedding": b},
            "nested": lambda: (a, {"inner": [b, a * 2]}),
            "number": lambda: (a, 0),
            "mixed": lambda: {"score": a, "steps": 3, "none": None, "more": (b, 1.5)},
            "bad_keys": lambda: {"1st": a, "two words": b},
            "one_in_tuple": lambda: (a,),
        }[self.kind]()


def _export(kind: str, tmp_path: Path, **kw) -> tuple[nn.Module, ef.Runtime, dict]:
    torch.manual_seed(0)
    model = Heads(kind).eval()
    path = tmp_path / f"{kind}.efx"
    ef.export(model, torch.randn(4, 6), path, **kw)
    rt = ef.Runtime(path, backend="onnxruntime", threads=1)
    return model, rt, json.loads((path / "manifest.json").read_text())


def _flat(v) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, dict):
        v = list(v.values())
    if isinstance(v, (tuple, list)):
        return [t for item in v for t in _flat(item)]
    return []


def _check_equal(model: nn.Module, rt: ef.Runtime, batch: int) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, 6)).astype(np.float32)
    got = rt.run(x)
    got = got if isinstance(got, tuple) else (got,)
    with torch.no_grad():
        want = _flat(model(torch.from_numpy(x)))
    assert len(got) == len(want) == len(rt.outputs)
    for g, w, spec in zip(got, want, rt.outputs):
        assert g.shape == tuple(w.shape) and spec.shape[1:] == tuple(w.shape[1:])
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, names", [
    ("tuple", ["y0", "y1"]),
    ("list", ["y0", "y1"]),
    ("dict", ["score", "embedding"]),
    ("nested", ["y0", "y1", "y2"]),
    ("bad_keys", ["y0", "y1"]),
    ("one_in_tuple", ["y"]),
])
def test_structured_outputs_become_named_outputs_in_order(kind: str, names: list[str],
                                                          tmp_path: Path) -> None:
    model, rt, manifest = _export(kind, tmp_path)
    assert [s.name for s in rt.outputs] == names
    assert [o["name"] for o in manifest["outputs"]] == names
    assert "dropped_outputs" not in manifest["export"]
    assert set(manifest["export"]["validation"]["per_output_rel_err"]) == set(names)
    for batch in (1, 7):
        _check_equal(model, rt, batch)


def test_a_number_beside_a_tensor_is_dropped_with_a_note_and_a_warning(tmp_path: Path) -> None:
    with pytest.warns(DroppedOutputWarning, match=r"out\[1\] \(int 0\)"):
        model, rt, manifest = _export("number", tmp_path)
    assert [s.name for s in rt.outputs] == ["y"]
    assert manifest["export"]["dropped_outputs"] == [
        {"output": "out[1]", "type": "int", "index": 1, "value": 0}]
    assert isinstance(rt.run(np.zeros((2, 6), np.float32)), np.ndarray)      # one output: one array
    _check_equal(model, rt, 3)


def test_nested_non_tensors_are_dropped_and_dict_keys_name_the_rest(tmp_path: Path) -> None:
    with pytest.warns(DroppedOutputWarning, match="3 output"):
        model, rt, manifest = _export("mixed", tmp_path)
    assert [s.name for s in rt.outputs] == ["y0", "y1"]        # a tuple inside: no name for every output
    dropped = manifest["export"]["dropped_outputs"]
    assert [(d["output"], d["type"], d.get("value")) for d in dropped] == [
        ("out['steps']", "int", 3), ("out['none']", "NoneType", None), ("out['more'][1]", "float", 1.5)]
    _check_equal(model, rt, 5)


def test_a_model_without_a_tensor_output_is_refused(tmp_path: Path) -> None:
    class Nothing(nn.Module):
        def forward(self, x):
            return 0, None

    with pytest.raises(ef.ExportError, match="no tensor"):
        ef.export(Nothing(), torch.randn(2, 3), tmp_path / "n.efx")
    assert not (tmp_path / "n.efx").exists()
