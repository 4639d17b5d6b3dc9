"""FITS on a real series that ships inside a package: statsmodels' weekly Mauna Loa CO2 (1958-2001).

Owns the chronological split, the scaling (training rows only), the windowing, a small training loop
and the seasonal-naive baseline it is judged against. Not the network (`models/fits.py`) nor export.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from edgeflex.models.fits import FITS, cut_freq_for

PERIOD = 52                       # weeks per year: the dominant period of the series
SPLIT = (0.7, 0.1, 0.2)          # train / validation / test, in time order


def load_co2() -> np.ndarray:
    """The weekly series [T, 1] float32, its 59 missing weeks filled by linear interpolation."""
    from statsmodels.datasets import co2

    s = co2.load_pandas().data["co2"].interpolate(limit_direction="both")
    return s.to_numpy(np.float32)[:, None]


@dataclass
class Windows:
    x: np.ndarray   # [N, L, C] look-back windows
    y: np.ndarray   # [N, H, C] the horizon that follows each


def split_scale(series: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Chronological split; each later part keeps the seq_len steps before it as look-back context.

    Scaled with the mean/std of the training rows only.
    """
    T = len(series)
    a, b = int(T * SPLIT[0]), int(T * (SPLIT[0] + SPLIT[1]))
    mean, std = series[:a].mean(axis=0), series[:a].std(axis=0)
    z = (series - mean) / std
    return z[:a], z[a - seq_len:b], z[b - seq_len:], {"mean": mean.tolist(), "std": std.tolist(),
                                                       "borders": [0, a, b, T]}


def windows(z: np.ndarray, seq_len: int, pred_len: int) -> Windows:
    n = len(z) - seq_len - pred_len + 1
    idx = np.arange(n)[:, None]
    return Windows(z[idx + np.arange(seq_len)], z[idx + seq_len + np.arange(pred_len)])


def seasonal_naive(x: np.ndarray, pred_len: int, period: int = PERIOD) -> np.ndarray:
    """Forecast each step with the value one period (or a whole number of periods) earlier."""
    reps = -(-pred_len // period)
    return np.concatenate([x[:, -period:]] * reps, axis=1)[:, :pred_len]


def train_fits_co2(*, seq_len: int = 208, pred_len: int = 52, harmonic_order: int = 3, epochs: int = 30,
                   lr: float = 5e-3, batch_size: int = 64, seed: int = 0,
                   progress: bool = True) -> tuple[FITS, dict]:
    """Train FITS on the horizon loss with early stopping on validation MSE; report held-out test MSE
    on standardised values beside the seasonal-naive baseline's."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    # A ~1k-parameter model: one thread is fastest and does not fight other work for the second core.
    torch.set_num_threads(1)
    try:
        return _train(seq_len, pred_len, harmonic_order, epochs, lr, batch_size, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _train(seq_len, pred_len, harmonic_order, epochs, lr, batch_size, seed, progress):
    rng = np.random.default_rng(seed)
    train_z, val_z, test_z, scaler = split_scale(load_co2(), seq_len)
    tr, va, te = (windows(z, seq_len, pred_len) for z in (train_z, val_z, test_z))
    model = FITS(seq_len, pred_len, 1, cut_freq_for(seq_len, PERIOD, harmonic_order))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(tr.x), torch.from_numpy(tr.y)

    def mse(w: Windows) -> float:
        with torch.no_grad():
            return float(((model(torch.from_numpy(w.x))[:, seq_len:] - torch.from_numpy(w.y)) ** 2).mean())

    best, best_state, patience, start = float("inf"), None, 0, time.perf_counter()
    bar = tqdm(range(epochs), desc="train FITS on CO2", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        for i in np.array_split(rng.permutation(len(xt)), max(1, len(xt) // batch_size)):
            loss = ((model(xt[i])[:, seq_len:] - yt[i]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        val = mse(va)
        bar.set_postfix(val_mse=f"{val:.4f}")
        if val < best - 1e-6:
            best, patience = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            patience += 1
            if patience >= 5:
                break
    model.load_state_dict(best_state)
    model.eval()
    naive = float(((seasonal_naive(te.x, pred_len) - te.y) ** 2).mean())
    return model, {"metric": "mse", "value": mse(te), "direction": "lower", "split": "test",
                   "baseline": {"name": "seasonal naive (period 52)", "value": naive},
                   "val_mse": best, "train_seconds": round(time.perf_counter() - start, 2),
                   "scaler": scaler, "data": "statsmodels co2 (weekly Mauna Loa, 1958-2001)"}
