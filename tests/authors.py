# ruff: noqa: UP008, B007 - the authors' spelling (super(Cls, self), unused loop variables) kept on purpose
"""Models with complex tensors written the way their authors publish them (no edgeflex imports): FITS
(VEWOXIC/FITS `models/FITS.py`, shared and individual), its real-valued variant (`models/Real_FITS.py`),
Fourier-neural-operator spectral convolutions in 1-D and 2-D (zongyi-li/fourier_neural_operator), and
small FFT models for the op families the complex lowering covers. Facts from those files, our own code.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def configs(seq_len: int, pred_len: int, enc_in: int, cut_freq: int, individual: bool = False):
    """The authors' argparse namespace, with only the fields FITS reads."""
    return SimpleNamespace(seq_len=seq_len, pred_len=pred_len, enc_in=enc_in, cut_freq=cut_freq,
                           individual=individual)


class FITS(nn.Module):
    """FITS as published: RIN, rfft, low-pass, a complex Linear (one per channel if individual), zero
    padding, irfft; returns (forecast, the low-passed reconstruction scaled back)."""

    def __init__(self, configs):
        super(FITS, self).__init__()
        self.seq_len = configs.seq_len
        self.pred_len = configs.pred_len
        self.individual = configs.individual
        self.channels = configs.enc_in
        self.dominance_freq = configs.cut_freq
        self.length_ratio = (self.seq_len + self.pred_len) / self.seq_len
        out = int(self.dominance_freq * self.length_ratio)
        if self.individual:
            self.freq_upsampler = nn.ModuleList()
            for i in range(self.channels):
                self.freq_upsampler.append(nn.Linear(self.dominance_freq, out).to(torch.cfloat))
        else:
            self.freq_upsampler = nn.Linear(self.dominance_freq, out).to(torch.cfloat)

    def forward(self, x):
        x_mean = torch.mean(x, dim=1, keepdim=True)
        x = x - x_mean
        x_var = torch.var(x, dim=1, keepdim=True) + 1e-5
        x = x / torch.sqrt(x_var)

        low_specx = torch.fft.rfft(x, dim=1)
        low_specx[:, self.dominance_freq:] = 0
        low_specx = low_specx[:, 0:self.dominance_freq, :]
        if self.individual:
            low_specxy_ = torch.zeros([low_specx.size(0), int(self.dominance_freq * self.length_ratio),
                                       low_specx.size(2)], dtype=low_specx.dtype).to(low_specx.device)
            for i in range(self.channels):
                low_specxy_[:, :, i] = self.freq_upsampler[i](low_specx[:, :, i].permute(0, 1)).permute(0, 1)
        else:
            low_specxy_ = self.freq_upsampler(low_specx.permute(0, 2, 1)).permute(0, 2, 1)
        low_specxy = torch.zeros([low_specxy_.size(0), int((self.seq_len + self.pred_len) / 2 + 1),
                                  low_specxy_.size(2)], dtype=low_specxy_.dtype).to(low_specxy_.device)
        low_specxy[:, 0:low_specxy_.size(1), :] = low_specxy_
        low_xy = torch.fft.irfft(low_specxy, dim=1)
        low_xy = low_xy * self.length_ratio
        xy = (low_xy) * torch.sqrt(x_var) + x_mean
        return xy, low_xy * torch.sqrt(x_var)


class RealFITS(nn.Module):
    """The authors' real-valued FITS (shared weights; their individual branch does not run): two real
    Linears on view_as_real parts, torch.complex, irfft; returns (forecast, 0)."""

    def __init__(self, configs):
        super(RealFITS, self).__init__()
        self.seq_len = configs.seq_len
        self.pred_len = configs.pred_len
        self.channels = configs.enc_in
        self.cut_freq = configs.cut_freq
        self.length_ratio = (self.seq_len + self.pred_len) / self.seq_len
        out = int(self.cut_freq * self.length_ratio)
        self.freq_upsampler_real = nn.Linear(self.cut_freq, out)
        self.freq_upsampler_imag = nn.Linear(self.cut_freq, out)

    def forward(self, x):
        x_mean = torch.mean(x, dim=1, keepdim=True)
        x = x - x_mean
        x_var = torch.var(x, dim=1, keepdim=True) + 1e-5
        x = x / torch.sqrt(x_var)

        low_specx = torch.fft.rfft(x, dim=1)
        low_specx = torch.view_as_real(low_specx[:, 0:self.cut_freq, :])
        low_specx_real = low_specx[:, :, :, 0]
        low_specx_imag = low_specx[:, :, :, 1]
        real, imag = self.freq_upsampler_real, self.freq_upsampler_imag
        low_specxy_real = (real(low_specx_real.permute(0, 2, 1)).permute(0, 2, 1)
                           - imag(low_specx_imag.permute(0, 2, 1)).permute(0, 2, 1))
        low_specxy_imag = (real(low_specx_imag.permute(0, 2, 1)).permute(0, 2, 1)
                           + imag(low_specx_real.permute(0, 2, 1)).permute(0, 2, 1))
        n_bins = int((self.seq_len + self.pred_len) / 2 + 1)
        low_specxy_R = torch.zeros([low_specxy_real.size(0), n_bins, low_specxy_real.size(2)],
                                   dtype=low_specxy_real.dtype).to(low_specxy_real.device)
        low_specxy_R[:, 0:low_specxy_real.size(1), :] = low_specxy_real
        low_specxy_I = torch.zeros([low_specxy_imag.size(0), n_bins, low_specxy_imag.size(2)],
                                   dtype=low_specxy_imag.dtype).to(low_specxy_imag.device)
        low_specxy_I[:, 0:low_specxy_imag.size(1), :] = low_specxy_imag
        low_specxy = torch.complex(low_specxy_R, low_specxy_I)
        low_xy = torch.fft.irfft(low_specxy, dim=1)
        low_xy = low_xy * self.length_ratio
        xy = (low_xy) * torch.sqrt(x_var) + x_mean
        return xy, 0


class SpectralConv1d(nn.Module):
    """FNO's 1-D Fourier layer: rfft, the lowest `modes1` modes times complex weights (einsum), irfft."""

    def __init__(self, in_channels, out_channels, modes1):
        super(SpectralConv1d, self).__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.modes1 = modes1
        self.scale = (1 / (in_channels * out_channels))
        self.weights1 = nn.Parameter(self.scale * torch.rand(in_channels, out_channels, self.modes1,
                                                             dtype=torch.cfloat))

    def compl_mul1d(self, input, weights):
        return torch.einsum("bix,iox->box", input, weights)

    def forward(self, x):
        batchsize = x.shape[0]
        x_ft = torch.fft.rfft(x)
        out_ft = torch.zeros(batchsize, self.out_channels, x.size(-1) // 2 + 1, device=x.device,
                             dtype=torch.cfloat)
        out_ft[:, :, :self.modes1] = self.compl_mul1d(x_ft[:, :, :self.modes1], self.weights1)
        x = torch.fft.irfft(out_ft, n=x.size(-1))
        return x


class SpectralConv2d(nn.Module):
    """FNO's 2-D Fourier layer: rfft2, keep the low modes of both corners of the first axis, irfft2 with s."""

    def __init__(self, in_channels, out_channels, modes1, modes2):
        super(SpectralConv2d, self).__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.modes1 = modes1
        self.modes2 = modes2
        self.scale = (1 / (in_channels * out_channels))
        self.weights1 = nn.Parameter(self.scale * torch.rand(in_channels, out_channels, self.modes1,
                                                             self.modes2, dtype=torch.cfloat))
        self.weights2 = nn.Parameter(self.scale * torch.rand(in_channels, out_channels, self.modes1,
                                                             self.modes2, dtype=torch.cfloat))

    def compl_mul2d(self, input, weights):
        return torch.einsum("bixy,ioxy->boxy", input, weights)

    def forward(self, x):
        batchsize = x.shape[0]
        x_ft = torch.fft.rfft2(x)
        out_ft = torch.zeros(batchsize, self.out_channels, x.size(-2), x.size(-1) // 2 + 1,
                             dtype=torch.cfloat, device=x.device)
        out_ft[:, :, :self.modes1, :self.modes2] = \
            self.compl_mul2d(x_ft[:, :, :self.modes1, :self.modes2], self.weights1)
        out_ft[:, :, -self.modes1:, :self.modes2] = \
            self.compl_mul2d(x_ft[:, :, -self.modes1:, :self.modes2], self.weights2)
        x = torch.fft.irfft2(out_ft, s=(x.size(-2), x.size(-1)))
        return x


class FNO1d(nn.Module):
    """FNO's 1-D network (two layers here): a grid channel, a lift, Fourier layers beside 1x1 convs, GELU,
    padding, a projection: ordinary layers mixed with FFT blocks."""

    def __init__(self, modes, width):
        super(FNO1d, self).__init__()
        self.modes1 = modes
        self.width = width
        self.padding = 2
        self.fc0 = nn.Linear(2, self.width)
        self.conv0 = SpectralConv1d(self.width, self.width, self.modes1)
        self.conv1 = SpectralConv1d(self.width, self.width, self.modes1)
        self.w0 = nn.Conv1d(self.width, self.width, 1)
        self.w1 = nn.Conv1d(self.width, self.width, 1)
        self.fc1 = nn.Linear(self.width, 16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x):
        grid = self.get_grid(x.shape, x.device)
        x = torch.cat((x, grid), dim=-1)
        x = self.fc0(x)
        x = x.permute(0, 2, 1)
        x = F.pad(x, [0, self.padding])
        x1 = self.conv0(x)
        x2 = self.w0(x)
        x = x1 + x2
        x = F.gelu(x)
        x1 = self.conv1(x)
        x2 = self.w1(x)
        x = x1 + x2
        x = x[..., :-self.padding]
        x = x.permute(0, 2, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.fc2(x)
        return x

    def get_grid(self, shape, device):
        batchsize, size_x = shape[0], shape[1]
        gridx = torch.tensor(np.linspace(0, 1, size_x), dtype=torch.float)
        gridx = gridx.reshape(1, size_x, 1).repeat([batchsize, 1, 1])
        return gridx.to(device)


class OrthoFilter(nn.Module):
    """A learned filter over time (dim 1 of (batch, time, channels)): full complex FFT with norm="ortho",
    a complex per-bin gain, inverse FFT, the real part."""

    def __init__(self, seq_len: int, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(seq_len, channels, dtype=torch.cfloat))

    def forward(self, x):
        spec = torch.fft.fft(x, dim=1, norm="ortho")
        spec = spec * self.gain
        return torch.fft.ifft(spec, dim=1, norm="ortho").real


class SpectrumFeatures(nn.Module):
    """Magnitude and phase of a zero-padded rfft (n larger than the input, norm="forward") -> Linear."""

    def __init__(self, seq_len: int, n: int, out: int):
        super().__init__()
        self.n = n
        self.head = nn.Linear(2 * (n // 2 + 1), out)

    def forward(self, x):                       # x: (batch, seq_len)
        spec = torch.fft.rfft(x, n=self.n, norm="forward")
        return self.head(torch.cat([spec.abs(), spec.angle()], dim=-1))


class ComplexExp(nn.Module):
    """A complex op the lowering has no rule for (a complex exponential): export refuses it in one line."""

    def forward(self, x):
        spec = torch.fft.rfft(x, dim=-1)
        return torch.fft.irfft(torch.exp(spec), dim=-1)
