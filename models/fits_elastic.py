"""Elastic FITS: one FITS whose nested cut frequencies share one complex weight, trained jointly.

A level with cut frequency k is the top-left block weight[:up_k, :k], bias[:up_k] of the largest level's
complex layer (up_k = int(k * (L + H) / L), FITS's own rule), so every level is a plain FITS and a smaller
cut is fewer input bins and fewer output bins of the same map. Owns the module, the level slicing and the
joint training (a weighted sum of every level's horizon loss, as DRESS does for sparsity). Export and the
run-time derivation of each level live in `export/fits_elastic.py` and `runtime/runtime.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeflex.kernels.spectral import SpectralWeights, nested
from edgeflex.models import ett
from edgeflex.models.fits import FITS, cut_freq_for, spectral_weights

LOWER_CUTS = (80, 60, 40, 20)      # below the paper's cut for look-back 360 (106): ~3/4, 1/2, 3/8, 1/5 of it


class ElasticFITS(nn.Module):
    """FITS at any of `cut_freqs` (largest first): input [batch, L, C] -> [batch, L + H, C].

    `forward` runs the level set by `set_cut` (default: the largest); `forward_levels` runs several levels
    on one shared normalisation and rfft, for joint training; `level(k)` is a plain `FITS` with level k's
    weights (the PyTorch reference of that config).
    """

    family = "fits-elastic"

    def __init__(self, seq_len: int, pred_len: int, channels: int, cut_freqs: Sequence[int], *,
                 eps: float = 1e-5):
        super().__init__()
        cuts = tuple(sorted({int(k) for k in cut_freqs}, reverse=True))
        if not cuts or cuts[-1] < 1:
            raise ValueError(f"cut_freqs must be positive integers, got {list(cut_freqs)}")
        self.full = FITS(seq_len, pred_len, channels, cuts[0], eps=eps)   # checks the largest cut's range
        self.seq_len, self.pred_len, self.channels, self.eps = seq_len, pred_len, channels, eps
        self.cut_freqs = cuts
        self.cut = cuts[0]

    def up_freq(self, cut: int) -> int:
        return int(cut * self.full.length_ratio)

    def _check(self, cut: int) -> int:
        if cut not in self.cut_freqs:
            raise ValueError(f"cut_freq {cut} is not a level of this model; levels: {list(self.cut_freqs)}")
        return cut

    def set_cut(self, cut: int) -> ElasticFITS:
        self.cut = self._check(cut)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x, (self.cut,))[0]

    def forward_levels(self, x: torch.Tensor, cuts: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The outputs of every level in `cuts` (default: all), FITS's forward with one shared rfft."""
        cuts = self.cut_freqs if cuts is None else cuts
        x_mean = torch.mean(x, dim=1, keepdim=True)
        x = x - x_mean
        x_std = torch.sqrt(torch.var(x, dim=1, keepdim=True) + self.eps)
        spec = torch.fft.rfft(x / x_std, dim=1)[:, : max(cuts)].permute(0, 2, 1)        # [B, C, cut]
        layer, n = self.full.freq_upsampler, self.seq_len + self.pred_len
        outs = []
        for k in cuts:
            up = self.up_freq(k)
            u = F.linear(spec[..., :k], layer.weight[:up, :k], layer.bias[:up])         # [B, C, up]
            # irfft zero-pads the spectrum to n // 2 + 1 bins, as FITS's zero tensor + slice assignment.
            y = torch.fft.irfft(u, n=n, dim=2).permute(0, 2, 1) * self.full.length_ratio
            outs.append(y * x_std + x_mean)
        return outs

    def spectral_weights(self, cut: int | None = None) -> SpectralWeights:
        """Level `cut`'s complex weights (a slice of the stored largest level) as NumPy arrays."""
        return nested(spectral_weights(self.full), self._check(self.cut_freqs[0] if cut is None else cut))

    def level(self, cut: int) -> FITS:
        """A plain FITS module holding level `cut`'s weights (copies)."""
        up = self.up_freq(self._check(cut))
        m = FITS(self.seq_len, self.pred_len, self.channels, cut, eps=self.eps)
        with torch.no_grad():
            m.freq_upsampler.weight.copy_(self.full.freq_upsampler.weight[:up, :cut])
            m.freq_upsampler.bias.copy_(self.full.freq_upsampler.bias[:up])
        return m.eval()

    def level_parameters(self, cut: int) -> int:
        """Complex parameters level `cut` uses (weight block + bias), as FITS counts them."""
        up = self.up_freq(cut)
        return up * cut + up

    def hyper(self) -> dict:
        return {"seq_len": self.seq_len, "pred_len": self.pred_len, "channels": self.channels,
                "cut_freqs": list(self.cut_freqs), "eps": self.eps}


def default_cuts(seq_len: int, period: int = 24, harmonic_order: int = 6) -> tuple[int, ...]:
    top = cut_freq_for(seq_len, period, harmonic_order)
    return (top, *(k for k in LOWER_CUTS if k < top))


def evaluate_levels(model: ElasticFITS, split: ett.Split) -> list[dict]:
    """Per level (largest first): test MSE and MAE over every window, via the shared-rfft forward."""
    def predict(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [o.numpy() for o in model.forward_levels(torch.from_numpy(x))]
    return [{"cut_freq": k, **m} for k, m in zip(model.cut_freqs, ett.evaluate_many(predict, split))]


def train_elastic(name: str, pred_len: int, *, data: str | Path | None = None,
                  cut_freqs: Sequence[int] | None = None, loss_weights: Sequence[float] | None = None,
                  recipe: ett.Recipe | None = None, progress: bool = True):
    """Train an ElasticFITS on `name` with FITS's recipe and the loss sum_k w_k * horizon_mse_k (default:
    equal weights summing to 1); early stopping on the same weighted sum over validation. Returns
    (model, EttData, record with per-level test MSE/MAE under "levels")."""
    recipe = recipe or ett.Recipe()
    s = ett.SETTINGS[name]
    d = ett.load_splits(name, s["seq_len"], pred_len, data)
    torch.manual_seed(recipe.seed)
    model = ElasticFITS(s["seq_len"], pred_len, len(ett.COLUMNS),
                        cut_freqs or default_cuts(s["seq_len"], s["period"], s["harmonic_order"]))
    record = fit_levels(model, d, recipe, loss_weights, progress=progress,
                        desc=f"elastic FITS {name} H={pred_len} cuts={list(model.cut_freqs)}")
    val = evaluate_levels(model, d.val)
    levels = [{**t, "val_mse": v["mse"], "parameters": model.level_parameters(t["cut_freq"])}
              for t, v in zip(evaluate_levels(model, d.test), val)]
    return model, d, {**record, "levels": levels}


def fit_levels(model: ElasticFITS, data: ett.EttData, recipe: ett.Recipe,
               loss_weights: Sequence[float] | None = None, *, desc: str, progress: bool = True) -> dict:
    """`ett.fit` with the joint loss sum_k w_k * horizon_mse_k (default: equal weights summing to 1) and
    early stopping on the same weighted sum over validation; the record adds the weights and the cuts."""
    k = len(model.cut_freqs)
    weights = [1.0 / k] * k if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != k:
        raise ValueError(f"loss_weights needs one weight per level ({k}), got {len(weights)}")

    def loss(m: ElasticFITS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(w * ett.horizon_mse(o, y) for w, o in zip(weights, m.forward_levels(x)))

    def val_score(m: ElasticFITS) -> float:
        return sum(w * lv["mse"] for w, lv in zip(weights, evaluate_levels(m, data.val)))

    record = ett.fit(model, data, recipe, loss=loss, val_score=val_score, progress=progress, desc=desc)
    return {**record, "loss_weights": weights, "cut_freqs": list(model.cut_freqs)}
