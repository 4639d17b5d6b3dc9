# ruff: noqa: E501, UP008, B007  - the authors' code, kept as they wrote it
"""FITS as its authors publish it (github.com/VEWOXIC/FITS, models/FITS.py and models/Real_FITS.py), copied
with only the `configs` object made explicit, for tests that export a user's own code. Not edgeflex code:
keep it as written there (the in-place low-pass, `irfft` without `n`, the tuple outputs).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn


def configs(seq_len: int, pred_len: int, channels: int, cut_freq: int, individual: bool = False):
    return SimpleNamespace(seq_len=seq_len, pred_len=pred_len, enc_in=channels, cut_freq=cut_freq,
                           individual=individual)


class Model(nn.Module):

    # FITS: Frequency Interpolation Time Series Forecasting

    def __init__(self, configs):
        super(Model, self).__init__()
        self.seq_len = configs.seq_len
        self.pred_len = configs.pred_len
        self.individual = configs.individual
        self.channels = configs.enc_in

        self.dominance_freq = configs.cut_freq  # 720/24
        self.length_ratio = (self.seq_len + self.pred_len) / self.seq_len

        if self.individual:
            self.freq_upsampler = nn.ModuleList()
            for i in range(self.channels):
                self.freq_upsampler.append(nn.Linear(self.dominance_freq, int(self.dominance_freq * self.length_ratio)).to(torch.cfloat))  # noqa: E501

        else:
            self.freq_upsampler = nn.Linear(self.dominance_freq, int(self.dominance_freq * self.length_ratio)).to(torch.cfloat)  # complex layer for frequency upcampling]  # noqa: E501

    def forward(self, x):
        # RIN
        x_mean = torch.mean(x, dim=1, keepdim=True)
        x = x - x_mean
        x_var = torch.var(x, dim=1, keepdim=True) + 1e-5
        # print(x_var)
        x = x / torch.sqrt(x_var)

        low_specx = torch.fft.rfft(x, dim=1)
        low_specx[:, self.dominance_freq:] = 0  # LPF
        low_specx = low_specx[:, 0:self.dominance_freq, :]  # LPF
        # print(low_specx.permute(0,2,1))
        if self.individual:
            low_specxy_ = torch.zeros([low_specx.size(0), int(self.dominance_freq * self.length_ratio), low_specx.size(2)], dtype=low_specx.dtype).to(low_specx.device)  # noqa: E501
            for i in range(self.channels):
                low_specxy_[:, :, i] = self.freq_upsampler[i](low_specx[:, :, i].permute(0, 1)).permute(0, 1)
        else:
            low_specxy_ = self.freq_upsampler(low_specx.permute(0, 2, 1)).permute(0, 2, 1)
        # print(low_specxy_)
        low_specxy = torch.zeros([low_specxy_.size(0), int((self.seq_len + self.pred_len) / 2 + 1), low_specxy_.size(2)], dtype=low_specxy_.dtype).to(low_specxy_.device)  # noqa: E501
        low_specxy[:, 0:low_specxy_.size(1), :] = low_specxy_  # zero padding
        low_xy = torch.fft.irfft(low_specxy, dim=1)
        low_xy = low_xy * self.length_ratio  # energy compemsation for the length change
        # dom_x=x-low_x

        # dom_xy=self.Dlinear(dom_x)
        # xy=(low_xy+dom_xy) * torch.sqrt(x_var) +x_mean # REVERSE RIN
        xy = (low_xy) * torch.sqrt(x_var) + x_mean
        return xy, low_xy * torch.sqrt(x_var)


class RealModel(nn.Module):

    # FITS: Frequency Interpolation Time Series Forecasting
    # This is the real value implementation of the original FITS.
    # Real_FITS simulates the complex value multiplication with two layer of real value linear layer following
    # Y_real = X_real*W_real - X_imag * W_imag
    # Y_imag = X_real*W_imag + X_imag * W_real

    def __init__(self, configs):
        super(RealModel, self).__init__()
        self.seq_len = configs.seq_len
        self.pred_len = configs.pred_len
        self.individual = configs.individual
        self.channels = configs.enc_in

        self.cut_freq = configs.cut_freq  # 720/24
        self.length_ratio = (self.seq_len + self.pred_len) / self.seq_len

        # (their individual branch calls self.freq_upsampler, which Real_FITS never defines: shared only)
        self.freq_upsampler_real = nn.Linear(self.cut_freq, int(self.cut_freq * self.length_ratio))
        self.freq_upsampler_imag = nn.Linear(self.cut_freq, int(self.cut_freq * self.length_ratio))

    def forward(self, x):
        # RIN
        x_mean = torch.mean(x, dim=1, keepdim=True)
        x = x - x_mean
        x_var = torch.var(x, dim=1, keepdim=True) + 1e-5
        x = x / torch.sqrt(x_var)

        low_specx = torch.fft.rfft(x, dim=1)

        low_specx = torch.view_as_real(low_specx[:, 0:self.cut_freq, :])
        low_specx_real = low_specx[:, :, :, 0]
        low_specx_imag = low_specx[:, :, :, 1]
        low_specxy_real = self.freq_upsampler_real(low_specx_real.permute(0, 2, 1)).permute(0, 2, 1) - self.freq_upsampler_imag(low_specx_imag.permute(0, 2, 1)).permute(0, 2, 1)  # noqa: E501
        low_specxy_imag = self.freq_upsampler_real(low_specx_imag.permute(0, 2, 1)).permute(0, 2, 1) + self.freq_upsampler_imag(low_specx_real.permute(0, 2, 1)).permute(0, 2, 1)  # noqa: E501
        low_specxy_R = torch.zeros([low_specxy_real.size(0), int((self.seq_len + self.pred_len) / 2 + 1), low_specxy_real.size(2)], dtype=low_specxy_real.dtype).to(low_specxy_real.device)  # noqa: E501
        low_specxy_R[:, 0:low_specxy_real.size(1), :] = low_specxy_real

        low_specxy_I = torch.zeros([low_specxy_imag.size(0), int((self.seq_len + self.pred_len) / 2 + 1), low_specxy_imag.size(2)], dtype=low_specxy_imag.dtype).to(low_specxy_imag.device)  # noqa: E501
        low_specxy_I[:, 0:low_specxy_imag.size(1), :] = low_specxy_imag

        low_specxy = torch.complex(low_specxy_R, low_specxy_I)
        low_xy = torch.fft.irfft(low_specxy, dim=1)

        low_xy = low_xy * self.length_ratio  # compemsate the length change

        xy = (low_xy) * torch.sqrt(x_var) + x_mean
        return xy, 0


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights of the same kind (complex where the module's are), scaled like a trained FITS."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_complex():
                re, im = torch.randn(p.shape, generator=g), torch.randn(p.shape, generator=g)
                p.copy_(torch.complex(re, im) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()
