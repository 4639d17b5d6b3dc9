"""Operator-level costs (export/costs.py) against hand counts, and the latency predictor: NNLS, recovery of
known coefficients, leave-one-out arithmetic, JSON round trip, and the unvalidated-transfer label."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeflex.devices import get_device
from edgeflex.devices.predictor import FEATURES, KINDS, Predictor, features, fit, leave_one_out, nnls
from edgeflex.errors import DeviceError
from edgeflex.export import costs as costs_mod
from edgeflex.export.costs import config_costs, graph_costs


def _init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def tiny_graph() -> onnx.ModelProto:
    """x[N,2,5,5] -Conv 3x3 (3 out, bias)-> [1,3,3,3] -depthwise 3x3 pad 1-> -Relu-> -Flatten-> [1,27]
    -Gemm (4 out, bias)-> [1,4] -Identity-> y."""
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3]),
        helper.make_node("Conv", ["c", "Wd"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=3),
        helper.make_node("Relu", ["d"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "Wg", "bg"], ["g"], transB=1),
        helper.make_node("Identity", ["g"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            _init("W", (3, 2, 3, 3)),
            _init("B", (3,)),
            _init("Wd", (3, 1, 3, 3)),
            _init("Wg", (4, 27)),
            _init("bg", (4,)),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# Hand counts (4 bytes per float32 element):
#   conv:   2 x 27 outputs x (2 x 3 x 3) + 27 bias = 999 FLOPs;
#                                                    bytes x 50 + W 54 + B 3 + out 27 = 134 x 4 = 536
#   dwconv: 2 x 27 x (1 x 3 x 3) = 486;              bytes c 27 + Wd 27 + out 27 = 81 x 4 = 324
#   relu:   27;                                      bytes 27 + 27 = 216
#   flatten: 0;                                      bytes 27 + 27 = 216
#   gemm:   2 x 4 x 27 + 4 bias = 220;               bytes f 27 + Wg 108 + bg 4 + out 4 = 143 x 4 = 572
#   identity: free (not counted)
HAND = {
    "conv": (999, 536, 1),
    "dwconv": (486, 324, 1),
    "elementwise": (27, 216, 1),
    "data": (0, 216, 1),
    "matmul": (220, 572, 1),
}


def test_graph_costs_match_hand_counts():
    c = graph_costs(tiny_graph())
    for kind in costs_mod.KINDS:
        want = HAND.get(kind, (0, 0, 0))
        got = c["per_kind"][kind]
        assert (got["flops"], got["bytes"], got["nodes"]) == want, kind
    assert c["total"] == {"flops": 1732, "bytes": 1864, "nodes": 5}
    assert c["free_nodes"] == 1 and c["unresolved_nodes"] == 0 and c["batch"] == 1
    assert c["weight_bytes"] == (54 + 3 + 27 + 108 + 4) * 4
    assert costs_mod.KINDS == KINDS  # the predictor's copy of the kinds agrees
    # channels rounded up to 16: the conv's 3 outputs to 16 (its 2 inputs are read unblocked), the Gemm's
    # K 27 -> 32 and N 4 -> 16; other kinds have no padding term
    assert c["per_kind"]["conv"]["pad_flops"] == 999 * 16 // 3 - 999
    assert c["per_kind"]["matmul"]["pad_flops"] == 220 * 32 * 16 // (27 * 4) - 220
    assert c["per_kind"]["dwconv"]["pad_flops"] == 0
    # every op here is under SMALL_OP_FLOPS; Flatten (0 FLOPs) is not an op that computes
    small = {k: (v["small_flops"], v["small_nodes"]) for k, v in c["per_kind"].items() if v["small_nodes"]}
    assert small == {"conv": (999, 1), "dwconv": (486, 1), "elementwise": (27, 1), "matmul": (220, 1)}
    assert _conv(64, 48)["small_nodes"] == 1 and _conv(512, 512)["small_nodes"] == 0   # 2 x 512^2 x 16 FLOPs


def _conv(c_in: int, c_out: int) -> dict:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.zeros((c_out, c_in, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "conv", [x], [y], [w])
    return graph_costs(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))["per_kind"]["conv"]


def test_channels_in_whole_blocks_of_16_pad_nothing_and_others_pad_to_the_next_block():
    c = _conv(64, 48)
    assert c["flops"] == 2 * 48 * 16 * 64 and c["pad_flops"] == 0
    assert _conv(24, 8)["pad_flops"] == 2 * 16 * 16 * 32 - 2 * 16 * 8 * 24    # as if 32 in, 16 out
    assert _conv(3, 8)["pad_flops"] == 2 * 16 * 16 * 3 - 2 * 16 * 8 * 3      # 3 inputs: read unblocked


def test_costs_read_dims_of_external_initialisers(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_graph(), path, save_as_external_data=True, location="tiny.bin", size_threshold=0)
    m = onnx.load(path, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in m.graph.initializer)
    assert graph_costs(m) == graph_costs(tiny_graph())


def test_batch_is_fixed_to_one_and_shapes_can_be_given():
    assert graph_costs(tiny_graph())["per_kind"]["conv"]["flops"] == 999
    assert graph_costs(tiny_graph(), {"x": (2, 2, 5, 5)})["per_kind"]["conv"]["flops"] == 2 * 999


def _dft_model(n: int, onesided: int, transforms: int = 1) -> onnx.ModelProto:
    node = helper.make_node("DFT", ["x"], ["y"], axis=1, onesided=onesided)
    g = helper.make_graph(
        [node],
        "dft",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [transforms, n, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_dft_flops_fft_for_powers_of_two_bluestein_otherwise():
    pow2 = graph_costs(_dft_model(64, 0))["per_kind"]["dft"]
    assert pow2["flops"] == 5 * 64 * 6 and pow2["setup_flops"] == 0      # one FFT, log2 64 = 6, no chirp
    for n, m in [(96, 256), (720, 2048), (816, 2048), (1025, 4096)]:     # M = power of two >= 2n - 1
        one = graph_costs(_dft_model(n, 1))["per_kind"]["dft"]
        assert one["flops"] == 15 * m * int(np.log2(m)) and one["setup_flops"] == 8 * m, n
    # the batch multiplies the transforms, not the once-per-node chirp (shapes given: batch is not fixed to 1)
    seven = graph_costs(_dft_model(720, 1, 7), {"x": (7, 720, 1)})["per_kind"]["dft"]
    assert seven["flops"] == 7 * 15 * 2048 * 11 and seven["setup_flops"] == 8 * 2048


def test_config_costs_sum_a_chain():
    one = graph_costs(tiny_graph())
    c = config_costs([tiny_graph(), tiny_graph()])
    assert c["engine_calls"] == 2
    assert c["total"] == {k: 2 * v for k, v in one["total"].items()}
    assert c["per_kind"]["conv"]["flops"] == 2 * 999
    with pytest.raises(ValueError):
        config_costs([])


# --- predictor -------------------------------------------------------------------------------------------


def _random_costs(rng: np.random.Generator) -> dict:
    per_kind = {
        k: {
            "flops": int(rng.integers(0, 5e7)),
            "bytes": int(rng.integers(0, 5e6)),
            "nodes": int(rng.integers(0, 30)),
        }
        for k in KINDS
    }
    for k in ("conv", "matmul"):
        per_kind[k]["pad_flops"] = int(rng.integers(0, per_kind[k]["flops"] + 1))
    per_kind["dft"]["setup_flops"] = int(rng.integers(0, 1e6))
    per_kind["elementwise"]["small_flops"] = int(rng.integers(0, 1e6))
    per_kind["elementwise"]["small_nodes"] = int(rng.integers(0, 20))
    return {
        "per_kind": per_kind,
        "total": {"nodes": sum(v["nodes"] for v in per_kind.values())},
        "engine_calls": int(rng.integers(1, 4)),
    }


def test_nnls_matches_least_squares_when_unconstrained_and_respects_bounds():
    rng = np.random.default_rng(0)
    a = rng.random((30, 5))
    x_true = np.array([1.0, 2.0, 0.5, 3.0, 0.1])
    assert nnls(a, a @ x_true) == pytest.approx(x_true, rel=1e-8)
    b = a @ np.array([1.0, -2.0, 0.5, 3.0, 0.1]) + 0.01 * rng.standard_normal(30)
    x = nnls(a, b)
    assert (x >= 0).all()
    grad = a.T @ (a @ x - b)  # KKT: zero gradient where x > 0, >= 0 where x == 0
    assert np.abs(grad[x > 0]).max() < 1e-8 and (grad[x == 0] > -1e-8).all()


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(1)
    dev = get_device("rpi5")
    true = {f: float(v) for f, v in zip(FEATURES, rng.uniform(0.2, 3.0, len(FEATURES)))}
    true["nodes"], true["engine_calls"] = 0.002, 0.01
    coef = np.array([true[f] for f in FEATURES])
    samples = []
    for _ in range(80):
        c = _random_costs(rng)
        samples.append((c, float(features(c, {"peak_gflops": 153.6, "bandwidth_gbs": 17.07}) @ coef)))
    pred = fit(samples, dev, ridge=0.0)
    for f in FEATURES:
        assert pred.coef[f] == pytest.approx(true[f], rel=1e-6), f
    c = _random_costs(rng)
    assert pred.predict(c, dev) == pytest.approx(float(features(c, pred.reference) @ coef), rel=1e-6)
    loo = leave_one_out(samples, dev, ridge=0.0)
    assert loo["within_band"] == 1.0 and loo["max_abs_pct"] < 1e-4
    with_loo = fit(samples, dev, ridge=0.0, with_loo=True)
    assert with_loo.fit_error["loo_within_10pct"] == 1.0
    assert with_loo.fit_error["in_sample_median_abs_pct"] < 1e-4
    assert "loo_within_10pct" in with_loo.predict_detail(c, dev)["note"]


def test_leave_one_out_arithmetic_by_hand():
    # Only engine_calls varies: the fit is d = argmin sum((d - y_j) / y_j)^2 = sum(1/y) / sum(1/y^2).
    empty = {
        "per_kind": {k: {"flops": 0, "bytes": 0, "nodes": 0} for k in KINDS},
        "total": {"nodes": 0},
        "engine_calls": 1,
    }
    ys = [1.0, 2.0, 3.0]
    loo = leave_one_out([(empty, y, f"c{y:g}") for y in ys], get_device("rpi5"), ridge=0.0)
    for i, y in enumerate(ys):
        others = np.array([v for j, v in enumerate(ys) if j != i])
        d = (1 / others).sum() / (1 / others**2).sum()
        row = loo["rows"][i]
        assert row["label"] == f"c{y:g}" and row["predicted_ms"] == pytest.approx(d)
        assert row["error_pct"] == pytest.approx((d - y) / y * 100)
    errs = np.abs([r["error_pct"] for r in loo["rows"]])
    assert loo["median_abs_pct"] == pytest.approx(np.median(errs))
    assert loo["within_band"] == pytest.approx(np.mean(errs <= 10))
    assert loo["n"] == 3 and loo["rows"][0]["error_pct"] == pytest.approx(100 * (30 / 13 - 1))


def test_json_round_trip_and_refusals():
    rng = np.random.default_rng(2)
    dev = get_device("jetson-orin-nano-8gb")
    samples = [(c, 0.1 + rng.random()) for c in (_random_costs(rng) for _ in range(20))]
    pred = fit(samples, dev)
    back = Predictor.from_json(json.loads(json.dumps(pred.to_json())))
    c = _random_costs(rng)
    assert back.predict(c, dev) == pred.predict(c, dev)
    assert back.coef == pred.coef and back.reference == pred.reference
    with pytest.raises(DeviceError, match="not an edgeflex latency predictor"):
        Predictor.from_json({"format": "other"})
    bad = pred.to_json() | {"format_version": 99}
    with pytest.raises(DeviceError, match="format version 99"):
        Predictor.from_json(bad)
    with pytest.raises(DeviceError, match="positive number"):
        fit([(c, 0.0)], dev)
    with pytest.raises(DeviceError, match="no samples"):
        fit([], dev)


def test_transfer_is_labelled_unvalidated_and_scales_with_peak():
    rpi, nano = get_device("rpi5"), get_device("jetson-orin-nano-8gb")
    compute_only = {
        "per_kind": {k: {"flops": 1e9 if k == "conv" else 0, "bytes": 0, "nodes": 0} for k in KINDS},
        "total": {"nodes": 0},
        "engine_calls": 0,
    }
    pred = Predictor(
        {f: (1.0 if f == "flops:conv" else 0.0) for f in FEATURES},
        {
            "device": "rpi5",
            "mode": None,
            "unit": "cpu",
            "precision": "fp32",
            "peak_gflops": 153.6,
            "bandwidth_gbs": 17.07,
            "clock_ghz": 2.4,
            "cores": 4,
            "obtained": "catalogue",
        },
        10,
    )
    here = pred.predict_detail(compute_only, rpi)
    there = pred.predict_detail(compute_only, nano)
    assert here["validated"] and "UNVALIDATED" not in here["note"]
    assert (
        not there["validated"] and "UNVALIDATED transfer from rpi5 to jetson-orin-nano-8gb" in there["note"]
    )
    assert here["ms"] == pytest.approx(1e3 / 153.6)
    assert there["ms"] / here["ms"] == pytest.approx(153.6 / 165.9)
    assert not pred.validated_on(rpi.in_mode("default"))
