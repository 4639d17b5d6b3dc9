"""DLinear (Zeng, Chen, Zhang, Xu, AAAI 2023, "Are Transformers Effective for Time Series Forecasting?").

Owns the module as its paper's code writes it: a moving-average trend (edges padded by repeating the first
and last step), the seasonal remainder, one linear map over time for each, summed. The baseline FITS is
judged against; trained by `models/ett.py`, exported by torch.onnx like any plain module.
"""

from __future__ import annotations

import torch
from torch import nn


class MovingAverage(nn.Module):
    """Mean over `kernel_size` steps along time, same length out: [B, L, C] -> [B, L, C]."""

    def __init__(self, kernel_size: int):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1 (same-length output), got {kernel_size}")
        self.kernel_size = kernel_size
        self.avg = nn.AvgPool1d(kernel_size, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (self.kernel_size - 1) // 2
        x = torch.cat([x[:, :1].expand(-1, pad, -1), x, x[:, -1:].expand(-1, pad, -1)], dim=1)
        return self.avg(x.permute(0, 2, 1)).permute(0, 2, 1)


class DLinear(nn.Module):
    """Input [batch, seq_len, channels] -> forecast [batch, pred_len, channels]; weights shared across
    channels (the paper's default, `individual=False`)."""

    family = "dlinear"

    def __init__(self, seq_len: int, pred_len: int, channels: int, kernel_size: int = 25):
        super().__init__()
        self.seq_len, self.pred_len, self.channels = seq_len, pred_len, channels
        self.kernel_size = kernel_size
        self.decomposition = MovingAverage(kernel_size)
        self.linear_seasonal = nn.Linear(seq_len, pred_len)
        self.linear_trend = nn.Linear(seq_len, pred_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trend = self.decomposition(x)
        seasonal = x - trend
        out = self.linear_seasonal(seasonal.permute(0, 2, 1)) + self.linear_trend(trend.permute(0, 2, 1))
        return out.permute(0, 2, 1)

    def hyper(self) -> dict:
        return {"seq_len": self.seq_len, "pred_len": self.pred_len, "channels": self.channels,
                "kernel_size": self.kernel_size}
