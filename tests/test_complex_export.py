"""The complex-to-real lowering (`edgeflex.export.complex`): models with FFTs and complex weights, written as
their authors write them (`tests/authors.py`), exported by `ef.export` and run by `ef.Runtime`.

Two levels: the lowered FX graph against the model in torch, one small module per op family; and whole
exports (FITS shared and individual, odd and even L+H, Real_FITS, FNO spectral convolutions, an FFT along a
non-last axis) run on ONNX Runtime, FITS on TVM too, at the example's batch and at another.
"""

from __future__ import annotations

import authors
import numpy as np
import pytest
import torch
from torch import nn

import edgeflex as ef
from edgeflex.export.complex import dft_matrices, lower_complex, uses_complex
from edgeflex.export.core import SPECTRAL_STRATEGY

TOL = 1e-4


def _tensors(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o for o in outs if isinstance(o, torch.Tensor)]


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _complex_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero imaginary parts in every complex Linear (`.to(torch.cfloat)` leaves them 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.weight.is_complex():
                w = torch.randn(m.weight.shape, dtype=torch.cfloat, generator=g)
                m.weight.copy_(w / m.in_features**0.5)
                m.bias.copy_(torch.randn(m.bias.shape, dtype=torch.cfloat, generator=g) * 0.1)
    return model.eval()


def _batches(x: torch.Tensor, other: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [x, torch.randn((other, *x.shape[1:]), generator=g)]


# --- the lowered FX graph, one op family at a time ----------------------------------------------------------

class FFT1d(nn.Module):
    """rfft with n (trim or zero-pad) and norm, then irfft with n, along a middle axis."""

    def __init__(self, n: int | None, norm: str | None, n_out: int | None):
        super().__init__()
        self.n, self.norm, self.n_out = n, norm, n_out

    def forward(self, x):
        spec = torch.fft.rfft(x, n=self.n, dim=1, norm=self.norm)
        return torch.fft.irfft(spec * 0.5, n=self.n_out, dim=1, norm=self.norm)


class DoubleFFT(nn.Module):
    """An FFT in float64 / complex128."""

    def forward(self, x):
        spec = torch.fft.rfft(x.double(), dim=-1)
        return torch.fft.irfft(spec * (1 - 1j), n=x.shape[-1], dim=-1).float()


class ComplexFFT(nn.Module):
    """fft of a real input, ifft with n, fft of a complex tensor; .real and .imag out."""

    def __init__(self, norm: str | None):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        spec = torch.fft.fft(x, dim=-1, norm=self.norm)
        back = torch.fft.ifft(spec[..., 1:], n=8, dim=-1, norm=self.norm)
        again = torch.fft.fft(back, dim=-2, norm=self.norm)
        return again.real, again.imag


class FFTnd(nn.Module):
    """rfftn over two axes with s, irfftn with s; fftn/ifftn of a complex tensor over (0-based) axes 1, 3."""

    def forward(self, x):                               # (batch, 5, 6, 7)
        spec = torch.fft.rfftn(x, s=(4, 8), dim=(1, 3))
        out = torch.fft.irfftn(spec, s=(5, 7), dim=(1, 3))
        c = torch.fft.ifftn(torch.fft.fftn(x, dim=(2, 3), norm="ortho") * 2, dim=(2, 3), norm="ortho")
        return out + c.real


class Spectra(nn.Module):
    """fftshift/ifftshift of an fft2, hfft, and an stft's magnitude."""

    def forward(self, x):                               # (batch, 4, 7)
        shifted = torch.fft.ifftshift(torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)) * 1j)
        h = torch.fft.hfft(torch.fft.rfft(x), n=10)
        st = torch.stft(x.flatten(1), 4, return_complex=True, window=torch.ones(4))
        return shifted.real, h, st.abs()


class Products(nn.Module):
    """Complex Linear, matmul of complex by complex and by real, einsum, mul/add/sub/neg/conj/div/pow."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4).to(torch.cfloat)
        self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.cfloat))
        self.r = nn.Parameter(torch.randn(3, 2))
        self.register_buffer("gain", torch.randn(2, dtype=torch.cfloat))

    def forward(self, x):                               # (batch, 3, 8)
        s = torch.fft.rfft(x)                           # (batch, 3, 5)
        h = self.lin(s)                                 # (batch, 3, 4)
        h = (h @ self.w) @ self.r.to(torch.cfloat)      # (batch, 3, 2)
        e = torch.einsum("bij,j->bij", h, self.gain)
        z = (-e.conj() + h * 2 - h / 3.0 + e * 1j - (1 + 2j)) / (h + 3.0) + h / x[:, :, :2] + h**3
        return torch.view_as_real(z)


class Layout(nn.Module):
    """Slices, select, permute/transpose/reshape/view/unsqueeze, cat/stack/flip on complex tensors."""

    def forward(self, x):                               # (batch, 6, 4)
        s = torch.fft.rfft(x, dim=1)                    # (batch, 4, 4)
        a = s[:, 1:3].permute(0, 2, 1).reshape(s.shape[0], -1)
        b = s.transpose(1, 2)[:, 0].unsqueeze(1).view(-1, 4)
        c = torch.cat([a, b, s[:, :, 2].flip(-1)], dim=-1)
        d = torch.stack([c, c.conj()], dim=1)
        return torch.view_as_real(d).flatten(1)


class Reduce(nn.Module):
    """roll, constant pad, squeeze, sum and mean of complex tensors."""

    def forward(self, x):                               # (batch, 6, 4)
        s = torch.fft.rfft(x, dim=1)                    # (batch, 4, 4)
        a = torch.roll(s, 1, dims=2).sum(dim=1) + s.mean(dim=2) + s[:, :1].squeeze(1)
        return torch.view_as_real(a), torch.view_as_real(nn.functional.pad(s, (1, 2)))


class Scatter(nn.Module):
    """Writes into complex zeros: slice assignment, index_put with a mask, copy_, zeros/new_zeros/zeros_like,
    ones, and the FITS low-pass `spec[:, cut:] = 0`."""

    def forward(self, x):                               # (batch, 8, 3)
        spec = torch.fft.rfft(x, dim=1)                 # (batch, 5, 3)
        spec[:, 3:] = 0
        out = torch.zeros(x.shape[0], 7, 3, dtype=torch.cfloat)
        out[:, 1:4] = spec[:, :3]
        out[:, -2] = spec[:, 0] * 1j
        more = spec.new_zeros(spec.shape)
        more.copy_(spec)
        more[spec.real > 0] = 0
        same = torch.zeros_like(spec) + torch.ones(5, 3, dtype=torch.cfloat)
        return torch.fft.irfft(out, n=12, dim=1), torch.view_as_real(more + same)


class Parts(nn.Module):
    """view_as_real / view_as_complex, torch.complex, torch.polar, .real, .imag, abs, angle."""

    def forward(self, x):                               # (batch, 9, 2)
        s = torch.fft.rfft(x, dim=1)
        r = torch.view_as_real(s)
        back = torch.view_as_complex(r * 2)
        z = torch.complex(back.imag, back.real) + torch.polar(s.abs(), s.angle())
        return z.real, z.imag, z.abs(), z.angle()


OP_FAMILIES = {
    "rfft-irfft-backward": (lambda: FFT1d(None, None, None), (2, 9, 3)),
    "rfft-irfft-ortho-pad": (lambda: FFT1d(12, "ortho", 11), (2, 9, 3)),
    "rfft-irfft-forward-trim": (lambda: FFT1d(6, "forward", 10), (2, 9, 3)),
    "fft-ifft-backward": (lambda: ComplexFFT(None), (2, 4, 7)),
    "fft-ifft-ortho": (lambda: ComplexFFT("ortho"), (2, 4, 7)),
    "rfft-complex128": (DoubleFFT, (2, 3, 7)),
    "rfftn-fftn": (FFTnd, (2, 5, 6, 7)),
    "shift-hfft-stft": (Spectra, (2, 4, 7)),
    "products": (Products, (2, 3, 8)),
    "layout": (Layout, (2, 6, 4)),
    "reduce-pad": (Reduce, (2, 6, 4)),
    "scatter": (Scatter, (2, 8, 3)),
    "parts": (Parts, (2, 9, 2)),
    "spectral-conv-1d": (lambda: authors.SpectralConv1d(2, 3, 4), (2, 2, 11)),
    "spectrum-features": (lambda: authors.SpectrumFeatures(9, 12, 3), (2, 9)),
}


# FITS, Real_FITS and the 2-D spectral convolution are held equal to torch by the whole exports below.
@pytest.mark.parametrize("family", list(OP_FAMILIES))
def test_the_lowered_graph_equals_the_model_in_torch_with_no_complex_value(family: str) -> None:
    make, shape = OP_FAMILIES[family]
    torch.manual_seed(0)
    model = make().eval()
    gm = lower_complex(model, torch.randn(shape))
    for x in _batches(torch.randn(shape)):
        with torch.no_grad():
            want, got = _tensors(model(x)), _tensors(gm(x))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert _rel_err(g, w) <= TOL, (family, x.shape[0])
    assert not uses_complex(gm, (x,))             # no complex parameter, buffer or intermediate left
    assert not any(t.is_complex() for t in gm.state_dict().values())


def test_a_lowered_dft_is_matmuls_with_named_cos_sin_buffers() -> None:
    gm = lower_complex(FFT1d(None, "ortho", None), torch.randn(2, 9, 3))
    dft = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"dft0_r2c_cos", "dft0_r2c_sin", "dft1_c2r_cos", "dft1_c2r_sin"} <= dft
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.matmul.default) == 4
    assert torch.ops.aten.transpose.int in targets                  # the FFT axis (1) is not the last
    assert all("complex_lowering" in n.meta for n in gm.graph.nodes
               if n.op == "call_function" and n.target is torch.ops.aten.matmul.default)
    assert gm.meta["complex_lowering"]["lowered_ops"]


def test_a_lowered_fits_computes_only_the_bins_it_keeps() -> None:
    model = _complex_weights(authors.FITS(authors.configs(16, 5, 2, 4)))     # cut 4 -> int(4 * 21/16) = 5
    gm = lower_complex(model, torch.randn(2, 16, 2))
    dft = {k: tuple(t.shape) for k, t in gm.named_buffers() if k.startswith("dft")}
    assert dft == {"dft0_r2c_cos_cols0_4": (16, 4), "dft0_r2c_sin_cols0_4": (16, 4),
                   "dft1_c2r_cos_rows0_5": (5, 20), "dft1_c2r_sin_rows0_5": (5, 20)}, dft
    assert gm.meta["complex_lowering"]["bin_rewrites"] > 0


@pytest.mark.parametrize("n", [7, 8])
def test_the_inverse_dft_matrix_ignores_the_dc_and_nyquist_imaginary_parts_as_pocketfft_does(n: int) -> None:
    bins = n // 2 + 1
    spec = torch.randn(3, bins, dtype=torch.cdouble)
    cos, sin = dft_matrices("c2r", bins, n, n, 1 / n)
    got = spec.real.numpy() @ cos - spec.imag.numpy() @ sin
    assert np.allclose(got, torch.fft.irfft(spec, n=n).numpy(), atol=1e-12)


class ComplexInverse(nn.Module):
    def forward(self, x):                               # (batch, 3, 3)
        return torch.linalg.inv(torch.fft.fft(x)).real


@pytest.mark.parametrize("make, shape, op, where", [
    (authors.ComplexExp, (2, 9), "aten.exp.default", "authors.py:"),
    (ComplexInverse, (2, 3, 3), "aten.linalg_inv_ex.default", "test_complex_export.py:"),
], ids=["exp", "linalg.inv"])
def test_an_unsupported_complex_op_is_refused_in_one_line_naming_it_and_its_source_line(make, shape, op,
                                                                                         where) -> None:
    with pytest.raises(ef.ExportError) as info:
        lower_complex(make(), torch.randn(shape))
    msg = str(info.value)
    assert "\n" not in msg
    assert f"no rule for {op} on a complex tensor at " in msg and where in msg and "(`return torch." in msg


def test_a_complex_output_is_refused_with_the_fix() -> None:
    class Spectrum(nn.Module):
        def forward(self, x):
            return torch.fft.rfft(x)

    with pytest.raises(ef.ExportError, match="returns a complex tensor.*view_as_real"):
        lower_complex(Spectrum(), torch.randn(2, 8))


# --- whole exports, run by ef.Runtime -------------------------------------------------------------------

EXPORTS = {
    # FITS as published: L+H odd (16+5) shared, even (16+6) individual; both outputs
    "fits-shared-odd": (lambda: _complex_weights(authors.FITS(authors.configs(16, 5, 2, 4))), (3, 16, 2)),
    "fits-individual-even": (lambda: _complex_weights(authors.FITS(authors.configs(16, 6, 3, 4, True))),
                             (3, 16, 3)),
    "real-fits": (lambda: authors.RealFITS(authors.configs(16, 5, 2, 4)), (3, 16, 2)),
    "fno-1d-mixed": (lambda: authors.FNO1d(3, 4), (3, 10, 1)),
    "spectral-conv-2d": (lambda: authors.SpectralConv2d(2, 3, 3, 2), (3, 2, 8, 7)),
    "ortho-fft-dim1": (lambda: authors.OrthoFilter(9, 2), (1, 9, 2)),       # a batch-1 example, too
}


@pytest.fixture(scope="module", params=list(EXPORTS))
def exported(request, tmp_path_factory):
    make, shape = EXPORTS[request.param]
    torch.manual_seed(3)
    model = make().eval()
    path = tmp_path_factory.mktemp("complex") / f"{request.param}.efx"
    ef.export(model, torch.randn(shape), path)
    return request.param, model, shape, path


def test_an_exported_complex_model_runs_equal_to_pytorch_on_onnxruntime(exported) -> None:
    name, model, shape, path = exported
    rt = ef.Runtime(path, backend="onnxruntime")
    for x in _batches(torch.randn(shape), other=2):
        with torch.no_grad():
            want = _tensors(model(x))
        got = rt.run(x.numpy())
        got = list(got) if isinstance(got, (tuple, list)) else [got]
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            assert _rel_err(g, w.numpy()) <= TOL, (name, x.shape[0])


def test_the_manifest_records_the_complex_lowering(exported) -> None:
    name, model, _, path = exported
    export = ef.Bundle.open(path).manifest["export"]
    if name.startswith(("fits", "real-fits")):      # the FITS pattern, recognised in the lowered graph
        assert export["strategy"] == SPECTRAL_STRATEGY and export["kernels"]["kernel"] == "spectral"
    else:
        assert export["strategy"].startswith("edgeflex complex lowering (export.complex) + torch.onnx")
        assert export["complex_lowering"]["lowered_ops"]
    assert export["validation"]["max_rel_err"] <= TOL
    manifest = ef.Bundle.open(path).manifest
    outputs = [o["name"] for o in manifest["outputs"]]
    assert outputs == (["y0", "y1"] if name.startswith("fits") else ["y"])   # Real_FITS's `0` is dropped
    assert manifest["model"]["class"] == type(model).__name__ and manifest["family"] == "generic"


def test_an_unsupported_complex_op_fails_the_export_in_one_line(tmp_path) -> None:
    with pytest.raises(ef.ExportError, match=r"no rule for aten\.exp\.default .*authors\.py:\d+") as info:
        ef.export(authors.ComplexExp(), torch.randn(2, 9), tmp_path / "exp.efx")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "exp.efx").exists()


def test_the_authors_fits_compiles_for_tvm_and_runs_equal_to_pytorch(tmp_path) -> None:
    pytest.importorskip("tvm")
    from edgeflex.compile.tvm import compile_bundle

    torch.manual_seed(4)
    model = _complex_weights(authors.FITS(authors.configs(16, 5, 2, 4)))
    path = tmp_path / "fits.efx"
    ef.export(model, torch.randn(2, 16, 2), path)
    compile_bundle(path, "host")
    rt = ef.Runtime(path, backend="tvm")
    x = torch.randn(3, 16, 2)
    with torch.no_grad():
        want = _tensors(model(x))
    for g, w in zip(rt.run(x.numpy()), want):
        assert _rel_err(g, w.numpy()) <= TOL


class TwoOutputSpectrum(nn.Module):
    """FNO's 1-D layer returning two tensors (a tuple, as FITS does) and sizing its zeros by x.size(0): the
    general complex lowering's capture must keep the batch dynamic through the exporter's output wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = authors.SpectralConv1d(3, 3, 4)

    def forward(self, x):
        y = self.conv(x)
        pad = torch.zeros(x.size(0), 3, 9, dtype=torch.cfloat)
        pad[:, :, :4] = torch.fft.rfft(x)[:, :, :4]
        return y, torch.fft.irfft(pad, n=16) * 2


@pytest.mark.parametrize("batch", [1, 2])
def test_a_several_output_complex_model_exports_with_a_dynamic_batch(batch: int, tmp_path) -> None:
    torch.manual_seed(0)
    model = TwoOutputSpectrum().eval()
    bundle = ef.export(model, torch.randn(batch, 3, 16), tmp_path / "two.efx")
    assert bundle.manifest["export"]["strategy"].startswith("edgeflex complex lowering")
    x = np.random.default_rng(batch).standard_normal((batch + 2, 3, 16)).astype(np.float32)
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x))]
    got = ef.Runtime(bundle.path).run(x)
    assert len(got) == 2
    for g, w in zip(got, want):
        assert float(np.abs(g - w).max() / np.abs(w).max()) <= 1e-4
