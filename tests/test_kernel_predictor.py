"""Kernel-level latency predictor (issue 22): fused-kernel detection on a real exported StarNet, standalone
kernel graphs that ONNX Runtime runs, and regressors that recover known synthetic kernel timings."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from edgeflex.devices import kernel_predictor
from edgeflex.devices.kernel_predictor import KernelPredictor, KernelRegressor
from edgeflex.errors import DeviceError
from edgeflex.export.costs import graph_costs
from edgeflex.export.kernels import MAX_SAMPLE_FLOPS, config_kernels, detect_kernels, sample_kernels
from edgeflex.models.starnet import StarNet


@pytest.fixture(scope="module")
def starnet_graph() -> onnx.ModelProto:
    """A small StarNet (edgeflex's port of the authors' code: ConvBN, ReLU6 star blocks) exported the way
    users export it, through torch.onnx with constant folding (BatchNorm folded into the convs)."""
    torch.manual_seed(0)
    net = StarNet(12, (1, 1, 1, 1), 4, num_classes=10).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), buf, dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def test_a_starnet_graph_is_detected_as_its_fused_conv_star_and_head_kernels(starnet_graph):
    ks = detect_kernels(starnet_graph)
    kinds = [k["kind"] for k in ks]
    ops = [k["ops"] for k in ks]
    assert ops[0] == "Conv+Clip" and kinds[0] == "conv"          # stem: ConvBN + ReLU6, one kernel
    block = ["dwconv", "conv", "conv", "elementwise", "conv", "dwconv"]
    # four stages, each a strided ConvBN then one star block (dwconv, f1 + ReLU6, f2, star, g, dwconv2 with
    # the residual add: ORT's NCHWc Conv sums into its output, and its profile shows no Add node)
    body = kinds[1:1 + 4 * (1 + len(block))]
    for s in range(4):
        stage = body[s * (1 + len(block)):(s + 1) * (1 + len(block))]
        assert stage == ["conv", *block], stage
    assert ops[2 + 1] == "Conv+Clip" and ops[2 + 3] == "Mul"       # f1 fused with its activation; the star op
    assert ops[2 + 5] == "Conv+Add"                                  # dwconv2 and the residual
    assert kinds[-2:] == ["data", "matmul"] and "GlobalAveragePool" in ops
    # fusion keeps every op's FLOPs: the kernels add up to the graph's operator-level costs
    assert sum(k["flops"] for k in ks) == graph_costs(starnet_graph)["total"]["flops"]
    assert len({k["key"] for k in ks}) < len(ks) or all(k["key"] for k in ks)


def test_every_standalone_kernel_graph_runs_on_onnx_runtime_and_gives_the_graphs_intermediate(starnet_graph):
    import onnxruntime as ort

    ks = config_kernels([starnet_graph], with_graphs=True)
    assert all(k["graph"] is not None and k["call"] == 0 for k in ks)
    # chain the kernels: each standalone graph fed the previous outputs reproduces the whole graph
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    values = {"x": x}
    for k in ks:
        s = ort.InferenceSession(k["graph"], opts, providers=["CPUExecutionProvider"])
        outs = s.run(None, {i.name: values[i.name] for i in s.get_inputs()})
        values.update({o.name: v for o, v in zip(s.get_outputs(), outs)})
    whole = ort.InferenceSession(starnet_graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(values["y"], whole.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)


def _synthetic_kernel(rng: np.random.Generator, kind: str) -> dict:
    c, hw = int(rng.integers(8, 97)), int(rng.integers(4, 57))
    flops = 2 * c * c * 9 * hw * hw if kind == "conv" else c * hw * hw
    pad = flops * ((-(-c // 16) * 16) ** 2 // (c * c)) - flops if kind == "conv" else 0
    return {"kind": kind, "ops": "Conv" if kind == "conv" else "Add", "flops": flops, "pad_flops": pad,
            "bytes": 8 * c * hw * hw + (36 * c * c if kind == "conv" else 0), "setup_flops": 0,
            "key": f"{kind}-{c}-{hw}"}


def _true_ms(k: dict) -> float:
    """A device whose conv reaches 20-60 GFLOP/s depending on size (not linear in FLOPs) plus launch cost."""
    if k["kind"] == "conv":
        eff = 20 + 40 * k["flops"] / (k["flops"] + 2e6)
        return (k["flops"] + k["pad_flops"]) / (eff * 1e6) + 0.004
    return k["bytes"] / 10e6 + 0.002


def test_the_kernel_regressor_recovers_synthetic_kernel_timings_it_was_not_fitted_on():
    rng = np.random.default_rng(1)
    train = [_synthetic_kernel(rng, kind) for kind in ("conv", "elementwise") for _ in range(400)]
    reg = KernelRegressor.fit([(k, _true_ms(k)) for k in train])
    seen = {k["key"] for k in train}
    test = [k for k in (_synthetic_kernel(rng, kd) for kd in ("conv", "elementwise") for _ in range(200))
            if k["key"] not in seen][:20]
    assert len(test) == 20
    for k in test:
        assert reg.predict(k) == pytest.approx(_true_ms(k), rel=0.05), k["key"]
    with pytest.raises(DeviceError, match="no kernel of kind 'matmul'"):
        reg.predict({**train[0], "kind": "matmul"})


def test_configs_are_predicted_as_the_sum_of_their_kernels_plus_call_overhead():
    rng = np.random.default_rng(2)
    pool = [_synthetic_kernel(rng, kind) for kind in ("conv", "elementwise") for _ in range(60)]
    configs = []
    for i in range(14):
        ks = [dict(k, call=j % 2) for j, k in enumerate(rng.choice(pool, size=int(rng.integers(3, 12))))]
        ms = sum(_true_ms(k) for k in ks) + 0.001 * len(ks) + 0.02 * (1 + max(k["call"] for k in ks))
        configs.append((ks, ms, f"cfg{i}"))
    samples = [(k, _true_ms(k) + 0.001, []) for k in pool]
    loo = kernel_predictor.leave_one_out(samples, configs, ridge=0.0)
    assert loo["within_band"] == 1.0 and loo["median_abs_pct"] < 2, loo["rows"]
    pred = kernel_predictor.fit([s[:2] for s in samples], configs, ridge=0.0)
    back = KernelPredictor.from_json(json.loads(json.dumps(pred.to_json())))
    assert back.predict(configs[0][0]) == pytest.approx(configs[0][1], rel=0.02)
    assert pred.coef["engine_calls"] == pytest.approx(0.02, rel=0.2)


def test_bad_kernel_and_config_samples_fail_in_one_line():
    with pytest.raises(DeviceError, match="not a kernel description"):
        KernelRegressor.fit([({"kind": "warp"}, 1.0)])
    with pytest.raises(DeviceError, match="positive ms"):
        KernelRegressor.fit([({"kind": "conv", "flops": 10}, -1.0)])
    with pytest.raises(DeviceError, match="non-empty kernel list"):
        kernel_predictor.fit([({"kind": "conv", "flops": 10}, 1.0)], [([], 1.0)])
    with pytest.raises(DeviceError, match="not an edgeflex kernel predictor"):
        KernelPredictor.from_json({"format": "x"})


def test_sampled_kernels_cover_the_gemm_kinds_and_run_on_onnx_runtime():
    import onnxruntime as ort

    ks = sample_kernels(10, seed=3)
    assert {k["kind"] for k in ks} == {"conv", "dwconv", "matmul", "elementwise"}
    assert all(0 < k["flops"] <= MAX_SAMPLE_FLOPS for k in ks)
    assert ks == [dict(k, graph=k["graph"]) for k in sample_kernels(10, seed=3)]   # seeded: repeatable
    for k in ks[:5]:
        s = ort.InferenceSession(k["graph"], providers=["CPUExecutionProvider"])
        feeds = {i.name: np.ones(i.shape, np.float32) for i in s.get_inputs()}
        assert s.run(None, feeds)[0].size > 0
