"""The protobuf-level ONNX reader/rewriter the TensorRT backend gives its parser graphs with (no onnx needed
on a board): held equal to the onnx package and to ONNX Runtime, on hand-made graphs and a real bundle's."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeflex.errors import BundleError
from edgeflex.runtime.backends.onnx_wire import external_names, graph_io, inline_initializers
from edgeflex.runtime.bundle import Bundle
from edgeflex.runtime.plan import build_plans


def _externalize(t: onnx.TensorProto, location: str = "weights.bin") -> None:
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "0")):
        e = t.external_data.add()
        e.key, e.value = k, v


def _model(rng: np.random.Generator, external: bool = True) -> tuple[bytes, dict[str, np.ndarray]]:
    """x[b, 5] @ W[5, 3] + B, then Relu; W and B external (as a bundle stores them); W also listed as a graph
    input, as older exporters do."""
    w = rng.standard_normal((5, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    if external:
        for t in inits:
            _externalize(t)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["s"]),
         helper.make_node("Relu", ["s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [5, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return m.SerializeToString(), {"W": w, "B": b}


def test_graph_io_matches_onnx_runtime(rng) -> None:
    graph, _ = _model(rng, external=False)
    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    ins, outs = graph_io(graph)
    assert ins == [i.name for i in sess.get_inputs()] == ["x"]     # W is an initialiser: not an input
    assert outs == [o.name for o in sess.get_outputs()] == ["y"]


def test_inlined_model_holds_the_arrays_and_runs_like_external_weights(rng) -> None:
    graph, weights = _model(rng)
    assert sorted(external_names(graph)) == ["B", "W"]
    inlined = inline_initializers(graph, weights)
    m = onnx.load_from_string(inlined)
    onnx.checker.check_model(m)
    got = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert all(t.data_location == TensorProto.DEFAULT and not t.external_data for t in m.graph.initializer)
    for k, v in weights.items():
        np.testing.assert_array_equal(got[k], v)
    assert external_names(inlined) == []
    x = rng.standard_normal((4, 5)).astype(np.float32)
    so = ort.SessionOptions()
    so.add_external_initializers(list(weights),
                                 [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()])
    want = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    have = ort.InferenceSession(inlined, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(have, want)


def test_inline_refuses_a_weight_of_another_dtype_or_shape(rng) -> None:
    graph, weights = _model(rng)
    with pytest.raises(BundleError, match="'W'.*float64") as info:
        inline_initializers(graph, {**weights, "W": weights["W"].astype(np.float64)})
    assert "\n" not in str(info.value)
    with pytest.raises(BundleError, match=r"'B'.*\[4\]"):
        inline_initializers(graph, {**weights, "B": np.zeros(4, np.float32)})


def test_inline_refuses_an_external_weight_not_supplied(rng) -> None:
    graph, weights = _model(rng)
    with pytest.raises(BundleError, match="'B' is stored outside the graph") as info:
        inline_initializers(graph, {"W": weights["W"]})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cut", [3, 17, -9])
def test_truncated_graph_is_a_one_line_bundle_error(rng, cut: int) -> None:
    graph, weights = _model(rng)
    with pytest.raises(BundleError, match="not a valid model") as info:
        inline_initializers(graph[:cut], weights)
    assert "\n" not in str(info.value)


def test_every_weighted_graph_of_a_real_bundle_inlines_to_the_same_outputs(snnet_bundle, rng) -> None:
    """SN-Net's segments and fused graphs keep their weights in the bundle's weights file: each, inlined,
    runs on ONNX Runtime exactly as with the weights handed over from memory."""
    _, path = snnet_bundle
    with Bundle.open(Path(path)) as b:
        steps = {s.key: s for p in build_plans(b, fused=True).values() for s in p.steps}
        steps.update({s.key: s for p in build_plans(b, fused=False).values() for s in p.steps})
        checked = 0
        for step in steps.values():
            if not step.initializers:
                continue
            graph = b.read(step.graph)
            inlined = inline_initializers(graph, step.initializers)
            assert external_names(inlined) == []
            feed = {}
            for name, spec in zip(graph_io(graph)[0], step.inputs):
                shape = [2 if d is None else d for d in spec.shape]
                feed[name] = rng.standard_normal(shape).astype(spec.dtype)
            so = ort.SessionOptions()
            so.add_external_initializers(list(step.initializers),
                                         [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
                                          for a in step.initializers.values()])
            want = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"]).run(None, feed)
            have = ort.InferenceSession(inlined, providers=["CPUExecutionProvider"]).run(None, feed)
            for h, w in zip(have, want):
                np.testing.assert_array_equal(h, w)
            checked += 1
    assert checked >= 3
