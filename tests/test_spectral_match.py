"""The FITS spectral pattern recognised in a model's graph, whoever wrote the model: edgeflex's `FITS`, the
authors' `Model` (shared and per channel, odd and even L+H, both outputs) and `Real_FITS`, and FITS written
with real DFT matrices. Each exports to a spectral form (the manifest says which) equal to PyTorch; models
that only almost match (a ReLU inside the spectral path, another normalisation) are not recognised and
export through the general path, still equal to PyTorch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import authors  # tests/authors.py: the FITS authors' code
import numpy as np
import pytest
import torch
from torch import nn

import edgeflex as ef
from edgeflex.export import fits, spectral_match
from edgeflex.export.core import SPECTRAL_STRATEGY, FlatOutputs
from edgeflex.kernels import spectral
from edgeflex.models.fits import FITS


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights of the same kind (complex where the module's are), scaled like a trained FITS."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            re, im = torch.randn(p.shape, generator=g), torch.randn(p.shape, generator=g)
            p.copy_(torch.complex(re, im) * 0.1 if p.is_complex() else re * 0.1)
    return model.eval()


def _authors(seq_len: int, pred_len: int, channels: int, cut: int, individual: bool = False,
             real: bool = False) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)           # "complex modules are a new feature"
        cls = authors.RealFITS if real else authors.FITS
        return randomise(cls(authors.configs(seq_len, pred_len, channels, cut, individual)), seed=5)


def _ours(seq_len: int, pred_len: int, channels: int, cut: int, individual: bool = False) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return randomise(FITS(seq_len, pred_len, channels, cut, individual=individual), seed=6)


class MatrixFITS(nn.Module):
    """FITS with its transforms written as real matrices (what a complex-to-real lowering makes of it), or
    one of two near misses: `relu` inside the spectral path, or `std` normalisation (x / (std + eps))."""

    def __init__(self, seq_len: int, pred_len: int, cut: int, variant: str = "fits"):
        super().__init__()
        n, up = seq_len + pred_len, int(cut * (seq_len + pred_len) / seq_len)
        self.variant, self.eps = variant, 1e-5
        t, k = torch.arange(seq_len, dtype=torch.float64), torch.arange(cut, dtype=torch.float64)
        ang = 2 * torch.pi * k[None] * t[:, None] / seq_len                   # [L, cut]
        self.register_buffer("cos_f", torch.cos(ang).float())
        self.register_buffer("sin_f", -torch.sin(ang).float())
        ku, tn = torch.arange(up, dtype=torch.float64), torch.arange(n, dtype=torch.float64)
        ang = 2 * torch.pi * ku[:, None] * tn[None] / n                       # [up, n]
        alpha = torch.where((ku == 0) | (2 * ku == n), 1.0, 2.0)[:, None] / seq_len
        self.register_buffer("cos_i", (torch.cos(ang) * alpha).float())
        self.register_buffer("sin_i", (-torch.sin(ang) * alpha).float())
        self.wr, self.wi = nn.Linear(cut, up), nn.Linear(cut, up, bias=False)

    def forward(self, x):
        mean = x.mean(dim=1, keepdim=True)
        xc = x - mean
        if self.variant == "std":
            scale = xc.std(dim=1, keepdim=True) + self.eps
        else:
            scale = torch.sqrt(torch.var(xc, dim=1, keepdim=True) + self.eps)
        z = (xc / scale).transpose(1, 2)                                      # [B, C, L]
        re, im = z @ self.cos_f, z @ self.sin_f
        u_re = self.wr(re) - self.wi(im)
        u_im = self.wr(im) + self.wi(re)
        if self.variant == "relu":
            u_re = torch.relu(u_re)
        y = (u_re @ self.cos_i + u_im @ self.sin_i).transpose(1, 2)           # [B, n, C]
        return y * scale + mean


# name: (model, its example's [L, C])
CASES = {
    "ours-shared": (lambda: _ours(30, 9, 3, 6), (30, 3)),
    "ours-individual": (lambda: _ours(30, 10, 3, 6, individual=True), (30, 3)),
    "authors-shared-odd": (lambda: _authors(30, 9, 3, 6), (30, 3)),
    "authors-shared-even": (lambda: _authors(32, 16, 2, 7), (32, 2)),
    "authors-individual-odd": (lambda: _authors(30, 9, 3, 6, individual=True), (30, 3)),
    "authors-individual-even": (lambda: _authors(24, 12, 2, 13, individual=True), (24, 2)),
    "authors-real": (lambda: _authors(30, 9, 2, 6, real=True), (30, 2)),
    "matrix": (lambda: randomise(MatrixFITS(30, 9, 6), seed=2), (30, 2)),
}
SHARED = {"ours-shared", "authors-shared-odd", "authors-shared-even", "authors-real", "matrix"}


def _flat(out) -> list[np.ndarray]:
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.numpy() for o in out if isinstance(o, torch.Tensor)]


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want)) / max(float(np.max(np.abs(want))), 1e-30))


@pytest.mark.parametrize("case", CASES)
def test_the_pattern_is_recognised_shared_or_per_channel(case: str) -> None:
    make, shape = CASES[case]
    model, example = make(), torch.randn(3, *shape)
    with torch.no_grad():
        n_out = len(_flat(model(example)))
    paths = [(i,) for i in range(n_out)] if "authors" in case else None
    flat = FlatOutputs(model, paths).eval() if paths else model
    found, why = fits.recognise(flat, (example,))
    assert found is not None, why
    assert found.map.individual == (case not in SHARED)
    assert found.probe_dtype == "float64" and found.probe_err < 1e-9
    assert found.outputs == (["y", "centred"] if "authors" in case and "real" not in case else ["y"])


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory) -> tuple[str, nn.Module, Path]:
    make, shape = CASES[request.param]
    model = make()
    path = tmp_path_factory.mktemp("spectral") / "m.efx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                   # Real_FITS's `return xy, 0`: a dropped output
        ef.export(model, torch.randn(2, *shape), path)
    return request.param, model, path


def test_the_manifest_says_a_spectral_form_was_chosen(exported) -> None:
    case, _, path = exported
    m = json.loads((path / "manifest.json").read_text())
    assert m["export"]["strategy"] == SPECTRAL_STRATEGY
    k = m["export"]["kernels"]
    assert k["kernel"] == "spectral" and k["form"] in spectral.FORMS_OF_MAP
    assert set(k["measured"]) == set(fits.FORMS_BY_ENGINE["onnxruntime"])
    assert k["recognised"]["shared"] == (case in SHARED)
    assert m["export"]["validation"]["max_rel_err"] <= 1e-4


@pytest.mark.parametrize("batch", [1, 5])
def test_every_output_equals_pytorch_on_fresh_inputs(exported, batch: int) -> None:
    _, model, path = exported
    rt = ef.Runtime(path, backend="onnxruntime", threads=1)
    L, C = rt.inputs[0].shape[1:]
    x = (np.random.default_rng(batch).standard_normal((batch, L, C)) * 4 + 7).astype(np.float32)
    got = rt.run(x)
    got = got if isinstance(got, tuple) else (got,)
    with torch.no_grad():
        want = _flat(model(torch.from_numpy(x)))
    assert len(got) == len(want) == len(rt.outputs)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert _rel_err(g, w) <= 1e-4


@pytest.mark.parametrize("variant, reason", [("relu", "relu"), ("std", "not normalised as FITS does")])
def test_an_almost_fits_is_not_recognised_and_exports_through_the_general_path(
        variant: str, reason: str, tmp_path: Path) -> None:
    model = randomise(MatrixFITS(30, 9, 6, variant), seed=2)
    example = torch.randn(2, 30, 2)
    found, why = fits.recognise(model, (example,))
    assert found is None and reason in why
    bundle = ef.export(model, example, tmp_path / "near.efx")
    assert bundle.manifest["export"]["strategy"] != SPECTRAL_STRATEGY
    assert "kernels" not in bundle.manifest["export"]
    x = np.random.default_rng(1).standard_normal((4, 30, 2)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert _rel_err(ef.Runtime(bundle.path, backend="onnxruntime").run(x), want) <= 1e-4


def test_a_path_that_mixes_channels_is_not_recognised() -> None:
    class Mixer(MatrixFITS):
        def forward(self, x):
            return super().forward(x.flip(2) * 0.5 + x)     # each channel reads the others: not per channel

    model = randomise(Mixer(30, 9, 6), seed=2)
    found, why = fits.recognise(model, (torch.randn(2, 30, 2),))
    assert found is None


def test_the_recogniser_reads_the_time_axis_and_the_variance_convention() -> None:
    model = _ours(30, 9, 2, 6)
    found, _ = fits.recognise(model, (torch.randn(1, 30, 2),))
    assert found is not None and (found.map.seq_len, found.map.out_len, found.map.ddof) == (30, 39, 1)
    assert found.map.eps == model.eps
    w = spectral.SpectralMap.of(_weights(model))
    np.testing.assert_allclose(found.map.M, w.M, rtol=0, atol=1e-6 * np.abs(w.M).max())
    np.testing.assert_allclose(found.map.c, w.c, rtol=0, atol=1e-6 * np.abs(w.c).max())


def _weights(model: FITS) -> spectral.SpectralWeights:
    from edgeflex.models.fits import spectral_weights
    return spectral_weights(model)


def test_no_match_names_the_op_and_its_source_line() -> None:
    model = randomise(MatrixFITS(30, 9, 6, "relu"), seed=2)
    gm = spectral_match.capture(model, (torch.randn(2, 30, 2),))
    with pytest.raises(spectral_match.NoMatch, match=r"relu.*test_spectral_match\.py"):
        spectral_match.match(gm, torch.randn(2, 30, 2))


@pytest.mark.slow
def test_the_authors_fits_compiles_to_edgeflex_fits_kernel_on_tvm(tmp_path: Path) -> None:
    pytest.importorskip("tvm", reason="apache-tvm is not installed: TVM untested")
    from edgeflex.compile.tvm import compile_bundle

    model = _authors(64, 32, 3, 10)
    path = tmp_path / "authors.efx"
    ef.export(model, torch.randn(1, 64, 3), path)
    (engine,) = compile_bundle(path, "host")["engines"]
    assert engine["kernels"] == ["fits"], engine["kernels"]
    rt, ort_rt = ef.Runtime(path, backend="tvm"), ef.Runtime(path)
    for n in (1, 3):
        x = (np.random.default_rng(n).standard_normal((n, 64, 3)) * 2 + 5).astype(np.float32)
        got, ref = rt.run(x), ort_rt.run(x)
        with torch.no_grad():
            want = _flat(model(torch.from_numpy(x)))
        assert len(got) == len(ref) == len(want) == 2
        for g, r, w in zip(got, ref, want):
            assert _rel_err(g, r) <= 1e-4 and _rel_err(g, w) <= 1e-4
    # batch 1 of both outputs takes the engine's batch-1 path: the same arrays as its general path, and
    # what it handed out stays as it was after the next run
    x1 = np.random.default_rng(9).standard_normal((1, 64, 3)).astype(np.float32)
    (tvm_engine,) = rt.engines()
    assert tvm_engine.batch1(None, last=True) is not None
    y1 = rt.run(x1)
    kept = [y.copy() for y in y1]
    for g, r in zip(y1, tvm_engine.run([x1])):
        np.testing.assert_array_equal(g, r)
    rt.run(x1 + 1)
    for g, k in zip(y1, kept):
        np.testing.assert_array_equal(g, k)


class SquaredSpectrum(nn.Module):
    """FITS's shape with complex tensors, but the kept spectrum is squared: not affine, so not the pattern."""

    def forward(self, x):
        mean = x.mean(dim=1, keepdim=True)
        xc = x - mean
        var = torch.var(xc, dim=1, keepdim=True) + 1e-5
        s = torch.fft.rfft(xc / torch.sqrt(var), dim=1)[:, :6]
        full = torch.zeros(x.size(0), 20, x.size(2), dtype=s.dtype)
        full[:, :6] = s * s
        return torch.fft.irfft(full, n=39, dim=1) * torch.sqrt(var) + mean


def test_an_almost_fits_with_complex_tensors_exports_through_the_complex_lowering(tmp_path: Path) -> None:
    model, example = SquaredSpectrum().eval(), torch.randn(2, 30, 2)
    found, why = fits.recognise(model, (example,))
    assert found is None and "multiplies two values computed from the series" in why
    bundle = ef.export(model, example, tmp_path / "sq.efx")
    assert bundle.manifest["export"]["strategy"].startswith("edgeflex complex lowering")
    x = np.random.default_rng(2).standard_normal((3, 30, 2)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert _rel_err(ef.Runtime(bundle.path, backend="onnxruntime").run(x), want) <= 1e-4


def test_the_readme_fits_exports_through_the_spectral_form(tmp_path: Path) -> None:
    """The FITS of README.md's "Use" (plain PyTorch, as its authors write it), at a small size: recognised,
    exported in a spectral form, both outputs equal to PyTorch."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("class FITS(torch.nn.Module):")
    end = readme.index("\n\n", readme.index("return low * torch.sqrt(var)", start))
    scope: dict = {"torch": torch}
    exec(readme[start:end], scope)                               # noqa: S102 - our own README's snippet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)              # "complex modules are a new feature"
        model = randomise(scope["FITS"](L=64, H=16, cut=10), seed=5)
    bundle = ef.export(model, torch.randn(1, 64, 3), tmp_path / "readme.efx")
    assert bundle.manifest["export"]["strategy"] == SPECTRAL_STRATEGY
    assert bundle.manifest["export"]["kernels"]["recognised"]["outputs"] == ["y", "centred"]
    x = (np.random.default_rng(3).standard_normal((2, 64, 3)) * 4 + 9).astype(np.float32)
    with torch.no_grad():
        want = _flat(model(torch.from_numpy(x)))
    got = ef.Runtime(tmp_path / "readme.efx").run(x)
    assert len(got) == 2
    for g, w in zip(got, want):
        assert _rel_err(g, w) <= 1e-4


class TwiceCentred(nn.Module):
    """FITS as a user might write it: `x - mean` written twice (for the variance, then to divide), which
    torch.export captures as two subtractions."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 7).to(torch.cfloat)

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = torch.var(x - mean, dim=1, keepdim=True) + 1e-5
        spec = torch.fft.rfft((x - mean) / torch.sqrt(var), dim=1)[:, :6]
        spec = self.up(spec.permute(0, 2, 1)).permute(0, 2, 1)
        full = torch.zeros(x.size(0), 20, x.size(2), dtype=spec.dtype)
        full[:, :7] = spec
        return torch.fft.irfft(full, n=39, dim=1) * torch.sqrt(var) + mean


def test_a_computation_written_twice_is_merged_before_matching() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = randomise(TwiceCentred(), seed=4)
    x = torch.randn(2, 30, 2)
    gm = spectral_match.capture(model, (x,))
    assert sum(1 for n in gm.graph.nodes if str(n.target) == "aten.sub.Tensor") == 2
    found = spectral_match.match(gm, x)
    assert found.outputs == ["y"] and found.probe_err <= 1e-9
    assert sum(1 for n in gm.graph.nodes if str(n.target) == "aten.sub.Tensor") == 2   # the caller's, kept
    assert fits.recognise(model, (x,))[1] == "matched"
    graph, _ = fits.lower(found, input_name="x", output_names=["y"], threads=1)
    import onnxruntime as ort

    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    xs = (np.random.default_rng(5).standard_normal((3, 30, 2)) * 2 + 7).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(xs)).numpy()
    assert _rel_err(sess.run(None, {"x": xs})[0], want) <= 1e-4
