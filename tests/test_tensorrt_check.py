"""The static TensorRT check names the nodes TensorRT's ONNX parser would reject (issue 23)."""

import onnx
from onnx import TensorProto, helper

from compile.tensorrt_check import check_model


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def _unsupported(model):
    return {(f.node, f.level) for f in check_model(model) if f.level != "restricted"}


def test_dft_unknown_op_layernorm_outputs_double():
    f = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8])  # noqa: E731
    d = helper.make_tensor_value_info("xd", TensorProto.DOUBLE, [1, 8])
    nodes = [
        helper.make_node("DFT", ["x"], ["y"], name="dft"),
        helper.make_node("Frobnicate", ["x"], ["z"], name="mystery", domain="acme"),
        helper.make_node("LayerNormalization", ["x", "s"], ["ln", "mean", "rstd"], name="ln3"),
        helper.make_node("Abs", ["xd"], ["ad"], name="absd"),
    ]
    s = helper.make_tensor("s", TensorProto.FLOAT, [8], [1.0] * 8)
    m = _model(nodes, [f("x"), d], [f("y"), f("z"), f("ln"), f("mean"), f("rstd"),
                                   helper.make_tensor_value_info("ad", TensorProto.DOUBLE, [1, 8])], [s])
    got = _unsupported(m)
    assert {("dft", "unsupported"), ("mystery", "unsupported"), ("ln3", "unsupported"),
            ("absd", "dtype")} <= got


def test_int64_where_not_listed_ops_marked_n_and_a_one_output_layernorm():
    """INT64 into MatMul (the matrix lists FP types only) and Unique (marked N) are named; the same MatMul on
    FLOAT and a LayerNormalization asking for its first output only are not."""
    i64 = lambda n: helper.make_tensor_value_info(n, TensorProto.INT64, [4, 4])  # noqa: E731
    f = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4])  # noqa: E731
    s = helper.make_tensor("s", TensorProto.FLOAT, [4], [1.0] * 4)
    nodes = [
        helper.make_node("MatMul", ["a", "a"], ["p"], name="mm_int"),
        helper.make_node("Unique", ["a"], ["u"], name="uniq"),
        helper.make_node("MatMul", ["x", "x"], ["q"], name="mm_float"),
        helper.make_node("LayerNormalization", ["x", "s"], ["ln"], name="ln1"),
    ]
    u = helper.make_tensor_value_info("u", TensorProto.INT64, None)
    m = _model(nodes, [i64("a"), f("x")], [i64("p"), u, f("q"), f("ln")], [s])
    got = _unsupported(m)
    assert ("mm_int", "dtype") in got and ("uniq", "unsupported") in got
    assert not {n for n, _ in got} & {"mm_float", "ln1"}


def test_plain_graph_clean():
    f = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8])  # noqa: E731
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [f("x")], [f("y")])
    onnx.checker.check_model(m)
    assert check_model(m) == []


def test_fits_bundle_findings(fits_bundle):
    """The FITS bundle as exported today (for ONNX Runtime): its one graph's LayerNormalization (the
    instance normalisation) asks for mean and inv_std too, which TensorRT's parser rejects. Nothing else."""
    from compile.tensorrt_check import check_bundle

    found = check_bundle(str(fits_bundle))
    bad = {(g, f.op) for g, fs in found.items() for f in fs if f.level != "restricted"}
    assert bad == {("graphs/main.onnx", "LayerNormalization")}


def test_cli_check(fits_bundle, capsys):
    from edgeflex.cli import main

    assert main(["check", str(fits_bundle), "--engine", "tensorrt"]) == 1
    out = capsys.readouterr().out
    assert "LayerNormalization" in out and out.strip().endswith("in 1 graph(s)")
    assert main(["check", str(fits_bundle), "--version", "9.9"]) != 0
    assert "no TensorRT operator matrix for 9.9" in capsys.readouterr().err


def test_snnet_bundle_findings(snnet_bundle):
    """Every SN-Net graph (StarNet stitches), chained and fused: what TensorRT's parser would reject."""
    from compile.tensorrt_check import check_bundle

    found = check_bundle(str(snnet_bundle[1]))
    bad = sorted({(f.op, f.level) for fs in found.values() for f in fs if f.level != "restricted"})
    assert bad == []
