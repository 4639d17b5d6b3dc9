"""FITS (Xu, Zeng, Xu, ICLR 2024): frequency interpolation for time series, written as the paper does.

Owns the PyTorch module (complex `nn.Linear`, `torch.fft.rfft/irfft`, slice assignment into a zero
spectrum), the cut-frequency helpers, and `spectral_weights` to hand the trained state to the kernel.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn

from edgeflex.kernels.spectral import SpectralWeights


def cut_freq_for(seq_len: int, period: int, harmonic_order: int) -> int:
    """The paper's rule: (L // base period + 1) * harmonic order + 10, capped at the rfft length."""
    if period < 1 or harmonic_order < 1:
        raise ValueError(f"period and harmonic_order must be >= 1, got {period} and {harmonic_order}")
    return min((seq_len // period + 1) * harmonic_order + 10, seq_len // 2 + 1)


def dominant_period(series: np.ndarray, max_period: int | None = None) -> int:
    """The period (in steps) of the strongest non-DC frequency of a 1-D series (or of the columns' mean
    spectrum), detrended, among periods of at most `max_period` steps where given. FITS sees a window of
    `lookback` steps, so a longer period is no season it can use: on ETTh1's training rows the strongest
    frequency overall is the drift's (a period of 12,194 hours), which gave a cut of 16 for a 336-step
    window where the daily period (24, the paper's) gives 100."""
    x = np.asarray(series, dtype=np.float64)
    x = x.reshape(len(x), -1)
    # each column less its least-squares line: a trend's spectrum falls off as 1/k and swamps the first
    # frequencies a window allows (a linear trend gave 93 for a daily season under a 96-step window)
    t = np.linspace(-1.0, 1.0, len(x))[:, None]
    x = x - x.mean(axis=0) - t * ((t * x).sum(axis=0) / max(float((t * t).sum()), 1e-12))
    amp = np.abs(np.fft.rfft(x, axis=0)).mean(axis=1)
    first = 1 if max_period is None else max(1, math.ceil(len(x) / max(max_period, 1)))
    if first >= len(amp):
        return max(1, min(len(x), max_period or len(x)))
    k = int(np.argmax(amp[first:]) + first)
    return max(1, round(len(x) / k))


class FITS(nn.Module):
    """Input [batch, seq_len, channels] -> output [batch, seq_len + pred_len, channels] (reconstruction +
    forecast).

    Differs from the paper's code in two documented ways: `forward` returns only the de-normalised
    output (not the tuple), and irfft is asked for length seq_len + pred_len explicitly, so odd totals work.
    """

    family = "fits"

    def __init__(self, seq_len: int, pred_len: int, channels: int, cut_freq: int, *,
                 individual: bool = False, eps: float = 1e-5):
        super().__init__()
        if not 1 <= cut_freq <= seq_len // 2 + 1:
            raise ValueError(f"cut_freq {cut_freq} out of range: expected 1..{seq_len // 2 + 1} "
                             f"for seq_len {seq_len}")
        self.seq_len, self.pred_len, self.channels = seq_len, pred_len, channels
        self.cut_freq, self.individual, self.eps = cut_freq, individual, eps
        self.length_ratio = (seq_len + pred_len) / seq_len
        self.up_freq = int(cut_freq * self.length_ratio)
        if self.up_freq > (seq_len + pred_len) // 2 + 1:
            raise ValueError(f"cut_freq {cut_freq} too high for pred_len {pred_len}: the upsampled spectrum "
                             "would not fit the output length")
        with warnings.catch_warnings():   # "complex modules are a new feature": they are what FITS is
            warnings.simplefilter("ignore", UserWarning)
            self._make_upsampler(cut_freq, channels, individual)

    def _make_upsampler(self, cut_freq: int, channels: int, individual: bool) -> None:
        if individual:
            self.freq_upsampler = nn.ModuleList(
                nn.Linear(cut_freq, self.up_freq).to(torch.cfloat) for _ in range(channels))
        else:
            self.freq_upsampler = nn.Linear(cut_freq, self.up_freq).to(torch.cfloat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_mean = torch.mean(x, dim=1, keepdim=True)
        x = x - x_mean
        x_var = torch.var(x, dim=1, keepdim=True) + self.eps
        x = x / torch.sqrt(x_var)
        low_specx = torch.fft.rfft(x, dim=1)
        low_specx = low_specx[:, : self.cut_freq, :]
        if self.individual:
            low_specxy_ = torch.zeros([x.size(0), self.up_freq, x.size(2)], dtype=low_specx.dtype)
            for i, layer in enumerate(self.freq_upsampler):
                low_specxy_[:, :, i] = layer(low_specx[:, :, i])
        else:
            low_specxy_ = self.freq_upsampler(low_specx.permute(0, 2, 1)).permute(0, 2, 1)
        n = self.seq_len + self.pred_len
        low_specxy = torch.zeros([x.size(0), n // 2 + 1, x.size(2)], dtype=low_specxy_.dtype)
        low_specxy[:, : self.up_freq, :] = low_specxy_
        low_xy = torch.fft.irfft(low_specxy, n=n, dim=1) * self.length_ratio
        return low_xy * torch.sqrt(x_var) + x_mean

    def hyper(self) -> dict:
        return {"seq_len": self.seq_len, "pred_len": self.pred_len, "channels": self.channels,
                "cut_freq": self.cut_freq, "individual": self.individual, "eps": self.eps}


def spectral_weights(model: FITS) -> SpectralWeights:
    """The trained complex weights of a FITS module as NumPy arrays, for the spectral kernel."""
    with torch.no_grad():
        layers = list(model.freq_upsampler) if model.individual else [model.freq_upsampler]
        weight = np.stack([lay.weight.numpy() for lay in layers])
        bias = np.stack([lay.bias.numpy() for lay in layers])
    if not model.individual:
        weight, bias = weight[0], bias[0]
    return SpectralWeights(model.seq_len, model.pred_len, weight, bias, model.eps)
