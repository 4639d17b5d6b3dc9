"""`ef.export(..., engine="tensorrt")` (issue 23): every built-in model family's bundle, small, in the forms
the exporter picks for TensorRT, has zero nodes TensorRT's ONNX parser would reject or cast, by the static
check of every graph any config runs (`compile.tensorrt_check.check_bundle`, chained and fused); the FITS
forms then normalise without LayerNormalization's extra outputs and still equal PyTorch on ONNX Runtime. A
model with a node the parser rejects is refused in one line naming it, and nothing is written."""

from __future__ import annotations

import warnings
from pathlib import Path

import authors
import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from conftest import random_fits

import edgeflex as ef
from compile.tensorrt_check import check_bundle
from edgeflex.errors import ExportError
from edgeflex.models.dlinear import DLinear
from edgeflex.models.dress import DressModel, build_backbone
from edgeflex.models.fits_elastic import ElasticFITS
from edgeflex.models.starnet import starnet
from edgeflex.models.stitch import Stitched


def _authors_fits() -> nn.Module:
    ours = random_fits(48, 12, 3, 8, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)          # "complex modules are a new feature"
        theirs = authors.FITS(authors.configs(48, 12, 3, 8))
    theirs.load_state_dict(ours.state_dict())
    return theirs.eval()


def _elastic_fits() -> nn.Module:
    torch.manual_seed(4)
    m = ElasticFITS(48, 12, 3, (8, 5, 3))
    layer = m.full.freq_upsampler
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, dtype=torch.cfloat) / 8 ** 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, dtype=torch.cfloat) * 0.1)
    return m.eval()


def _anchor(width: int) -> list[tuple[str, nn.Module]]:
    """A small StarNet-like classifier as named layers: conv stem, depthwise + pointwise block, head."""
    return [("stem", nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width),
                                   nn.ReLU6())),
            ("b0", nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width),
                                 nn.Conv2d(width, width, 1), nn.GELU())),
            ("b1", nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())),
            ("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10)))]


def _stitched() -> nn.Module:
    """The snnet family at its smallest: two anchors stitched once by a 1x1 conv (shared segments + fused)."""
    torch.manual_seed(5)
    layers = {"a0": _anchor(4), "a1": _anchor(8)}
    m = Stitched({k: nn.Sequential(*(mod for _, mod in v)) for k, v in layers.items()}, layers)
    m.add_stitch("a0", 2, "a1", 2, nn.Conv2d(4, 8, 1))
    m.order_by_flops(torch.randn(2, 3, 16, 16))
    return m.eval()


def _generic() -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5)).eval()


# family -> (model, example input); one case per built-in family, the FITS family three ways
CASES = {
    "fits": lambda: (random_fits(48, 12, 3, 8, seed=2), torch.randn(2, 48, 3)),
    "fits individual": lambda: (random_fits(48, 13, 3, 8, individual=True, seed=2), torch.randn(2, 48, 3)),
    "fits as its authors write it": lambda: (_authors_fits(), torch.randn(2, 48, 3)),
    "fits-elastic": lambda: (_elastic_fits(), torch.randn(2, 48, 3)),
    "dlinear": lambda: (DLinear(48, 12, 3).eval(), torch.randn(2, 48, 3)),
    "starnet": lambda: (starnet("s050", num_classes=10).eval(), torch.randn(1, 3, 32, 32)),
    "dress": lambda: (DressModel(build_backbone("mlp")).eval(), torch.randn(2, 1, 8, 8)),
    "snnet": lambda: (_stitched(), torch.randn(2, 3, 16, 16)),
    "generic": lambda: (_generic(), torch.randn(2, 12)),
    "generic with FFTs": lambda: (authors.SpectralConv1d(3, 3, 4).eval(), torch.randn(2, 3, 16)),
}


def _rejected(path: Path) -> list[tuple[str, str, str]]:
    found = check_bundle(str(path))
    return [(g, f.node, f.op) for g, fs in found.items() for f in fs if f.level != "restricted"]


@pytest.mark.parametrize("case", list(CASES))
def test_every_family_exports_a_bundle_tensorrt_parser_takes(case: str, tmp_path: Path) -> None:
    model, x = CASES[case]()
    path = tmp_path / "b.efx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (the largest model validates on one random batch beside the example: the check is what is tested)
        kw = {"n_random": 1} if case == "starnet" else {}
        bundle = ef.export(model, x, path, engine="tensorrt", **kw)
    ex = bundle.manifest["export"]
    assert ex["engine"] == "tensorrt"
    assert ex["tensorrt_check"]["unsupported"] == 0 and ex["tensorrt_check"]["graphs"] >= 1
    assert check_bundle(str(path))                          # graphs were checked...
    assert _rejected(path) == []                            # ... and none has a node the parser rejects
    assert ex["validation"]["max_rel_err"] <= 1e-4


@pytest.mark.parametrize("case", ["fits", "fits individual", "fits as its authors write it"])
def test_the_tensorrt_fits_forms_normalise_without_layernorm_and_equal_pytorch(case: str,
                                                                               tmp_path: Path) -> None:
    """Against the default export of the same model (ONNX Runtime / TVM: LayerNormalization with its mean and
    inv_std outputs, which the parser rejects), the TensorRT form has no LayerNormalization, the same map,
    and equal outputs on fresh inputs at another batch."""
    model, x = CASES[case]()
    paths = {e: tmp_path / f"{e}.efx" for e in ("default", "tensorrt")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ef.export(model, x, paths["default"])
        ef.export(model, x, paths["tensorrt"], engine="tensorrt")
    ops = {e: [n.op_type for n in onnx.load(p / "graphs/main.onnx").graph.node] for e, p in paths.items()}
    assert "LayerNormalization" in ops["default"] and "LayerNormalization" not in ops["tensorrt"]
    assert "DFT" not in ops["tensorrt"]
    assert [r[2] for r in _rejected(paths["default"])] == ["LayerNormalization"]
    kernels = ef.Bundle.open(paths["tensorrt"]).manifest["export"]["kernels"]
    assert kernels["engine"] == "tensorrt" and kernels["form"] in ("folded", "lowrank")
    rt = ef.Runtime(paths["tensorrt"])
    xs = (np.random.default_rng(7).standard_normal((3, 48, 3)) * 3 + 20).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(xs))
    want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
    got = rt.run(xs)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert float(np.abs(g - w).max() / np.abs(w).max()) <= 1e-4


class Det(nn.Module):
    """A model whose graph needs ONNX `Det`, which TensorRT 10's parser marks unsupported."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.det(x.reshape(-1, 3, 3)).reshape(x.shape[0], -1)


def test_a_node_tensorrt_rejects_fails_the_export_in_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "det.efx"
    with pytest.raises(ExportError, match=r"\(Det\): marked N in TensorRT 10\.1") as info:
        ef.export(Det(), torch.randn(2, 9), path, engine="tensorrt")
    assert "\n" not in str(info.value) and "graphs/main.onnx" in str(info.value)
    assert not path.exists()
    ef.export(Det(), torch.randn(2, 9), path)                # for ONNX Runtime and TVM it is fine
    assert [r[2] for r in _rejected(path)] == ["Det"]


def test_an_unknown_engine_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"engine='tensorRT'.*expected None .* 'tensorrt'") as info:
        ef.export(_generic(), torch.randn(2, 12), tmp_path / "g.efx", engine="tensorRT")
    assert "\n" not in str(info.value)


def test_the_cli_exports_a_builtin_model_for_tensorrt(tmp_path: Path, capsys) -> None:
    from edgeflex.cli import main

    path = tmp_path / "fits.efx"
    assert main(["export", "--model", "fits", "--out", str(path), "--engine", "tensorrt"]) == 0
    out = capsys.readouterr().out
    assert "0 nodes TensorRT 10.1's ONNX parser would reject" in out
    assert ef.Bundle.open(path).manifest["export"]["engine"] == "tensorrt"
    assert main(["check", str(path), "--engine", "tensorrt"]) == 0
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "exported for TensorRT: 0 nodes" in out and "fewest multiply-adds" in out
