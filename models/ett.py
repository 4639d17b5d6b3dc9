"""ETTh1 / ETTh2 (Zhou et al., AAAI 2021) as the long-term forecasting literature uses them.

Owns reading the unmodified CSVs from outside the repository (never copied), the 12/4/4-month split, the
scaler (fit on the training rows only), lazy look-back windows, the FITS paper's training recipe (loss on the
horizon, Adam, early stopping on validation) and test MSE/MAE on standardised values. Not the networks
(`fits.py`, `dlinear.py`, `fits_elastic.py`) nor export.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from edgeflex.errors import UsageError

# ../shared/data/ETT relative to the repository root (models/ett.py -> repo -> its parent).
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ETT"
COLUMNS = ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
MONTH = 30 * 24                                  # the literature's month: 720 hourly rows
TRAIN_END, VAL_END, TEST_END = 12 * MONTH, 16 * MONTH, 20 * MONTH

# The FITS paper's final settings per data set (its scripts/FITS/etth*_best.sh): look-back, base period,
# harmonic order -> cut frequency (L // 24 + 1) * H + 10. ETTh1: 360 -> 106; ETTh2: 720 -> 196.
SETTINGS = {"ETTh1": {"seq_len": 360, "period": 24, "harmonic_order": 6},
            "ETTh2": {"seq_len": 720, "period": 24, "harmonic_order": 6}}
# Test MSE the FITS authors report (repository README, ICLR 2024 final), per (data set, horizon).
PAPER_MSE = {("ETTh1", 96): 0.372, ("ETTh1", 192): 0.404, ("ETTh1", 336): 0.427, ("ETTh1", 720): 0.424,
             ("ETTh2", 96): 0.271}


@dataclass(frozen=True)
class Recipe:
    """FITS's training recipe (run_longExp_F.py + etth1_best.sh): Adam lr 5e-4; the script's batch 64,
    which run_longExp_F.py doubles when no augmentation is used, so 128; lr x 0.95 per epoch from the
    third on (`lradj type3`); early stopping on validation MSE with patience 20; at most 100 epochs."""

    lr: float = 5e-4
    batch_size: int = 128
    max_epochs: int = 100
    patience: int = 20
    lr_decay: float = 0.95
    seed: int = 0


def resolve_csv(name: str = "ETTh1", data: str | Path | None = None) -> Path:
    """The CSV of `name`: `data` may be the file itself, a directory holding NAME.csv, or None (the default
    directory ../shared/data/ETT beside the repository)."""
    if name not in SETTINGS:
        raise UsageError(f"unknown ETT data set {name!r}; expected one of {', '.join(SETTINGS)}")
    p = Path(data) if data is not None else DEFAULT_DIR
    path = p / f"{name}.csv" if p.is_dir() else p
    if not path.is_file():
        raise UsageError(f"{name} CSV not found at {str(path)!r}; pass --data PATH to ETTh1.csv / ETTh2.csv "
                         f"(or their directory), default {DEFAULT_DIR}")
    return path


def load_ett(name: str = "ETTh1", data: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """The 7 series [T, 7] float64 in `COLUMNS` order, and where they came from (path, sha256, rows)."""
    path = resolve_csv(name, data)
    raw = path.read_bytes()
    header = raw.split(b"\n", 1)[0].decode().strip().split(",")
    if tuple(header[1:]) != COLUMNS:
        raise UsageError(f"{path}: columns {header}, expected date,{','.join(COLUMNS)}; not an ETT-small CSV")
    series = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(1, 8), dtype=np.float64, ndmin=2)
    if len(series) < TEST_END:
        raise UsageError(f"{path}: {len(series)} rows, the 12/4/4-month split needs at least {TEST_END}")
    return series, {"name": name, "path": str(path), "sha256": hashlib.sha256(raw).hexdigest(),
                    "rows": len(series)}


def borders(seq_len: int) -> dict[str, tuple[int, int]]:
    """Row ranges [start, end) of each split; validation and test start seq_len rows early (their first
    windows' look-back), as in Informer's and FITS's `Dataset_ETT_hour`."""
    return {"train": (0, TRAIN_END), "val": (TRAIN_END - seq_len, VAL_END),
            "test": (VAL_END - seq_len, TEST_END)}


@dataclass(frozen=True)
class Scaler:
    """Per-channel standardisation with the training rows' mean and (population) std."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, series: np.ndarray) -> Scaler:
        train = series[:TRAIN_END]
        return cls(train.mean(axis=0), train.std(axis=0))

    def transform(self, series: np.ndarray) -> np.ndarray:
        return ((series - self.mean) / self.std).astype(np.float32)

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "fit_rows": [0, TRAIN_END],
                "columns": list(COLUMNS)}


@dataclass(frozen=True)
class Split:
    """The standardised rows of one split; window i is x = z[i:i+L], y = z[i+L:i+L+H] (made on demand)."""

    z: np.ndarray
    seq_len: int
    pred_len: int

    def __len__(self) -> int:
        return len(self.z) - self.seq_len - self.pred_len + 1

    def windows(self, idx: np.ndarray | slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        i = np.arange(len(self))[idx if idx is not None else slice(None)]
        t = i[:, None] + np.arange(self.seq_len + self.pred_len)
        w = self.z[t]
        return w[:, : self.seq_len], w[:, self.seq_len:]


@dataclass(frozen=True)
class EttData:
    name: str
    train: Split
    val: Split
    test: Split
    scaler: Scaler
    source: dict

    @property
    def seq_len(self) -> int:
        return self.train.seq_len

    @property
    def pred_len(self) -> int:
        return self.train.pred_len

    def meta(self) -> dict:
        """What a bundle's manifest records about its data: source, split borders, scaler."""
        return {"data": {**self.source, "split": {k: list(v) for k, v in borders(self.seq_len).items()},
                         "license": "CC BY-ND 4.0 (ETDataset, Zhou et al. 2021)"},
                "scaler": self.scaler.to_json(),
                "input": f"[batch, {self.seq_len}, {len(COLUMNS)}] standardised with scaler.mean/std",
                "output": f"[batch, ..., {len(COLUMNS)}]: the last {self.pred_len} steps are the forecast "
                          "(standardised; multiply by scaler.std and add scaler.mean for raw units)"}


def load_splits(name: str, seq_len: int, pred_len: int, data: str | Path | None = None) -> EttData:
    series, source = load_ett(name, data)
    scaler = Scaler.fit(series)
    z = scaler.transform(series)
    parts = {k: Split(z[a:b], seq_len, pred_len) for k, (a, b) in borders(seq_len).items()}
    return EttData(name, parts["train"], parts["val"], parts["test"], scaler, source)


# --- evaluation and training ------------------------------------------------------------------------------

def evaluate(predict: Callable[[np.ndarray], np.ndarray], split: Split, batch: int = 512) -> dict[str, float]:
    """MSE and MAE over every window, step and channel of `split`; `predict(x [n, L, C]) -> [n, >= H, C]`
    (its last H steps are the forecast), e.g. a torch model or a bundle's `Runtime.run`."""
    return evaluate_many(lambda x: [predict(x)], split, batch)[0]


def evaluate_many(predict: Callable[[np.ndarray], list[np.ndarray]], split: Split,
                  batch: int = 512) -> list[dict[str, float]]:
    """`evaluate` for a predictor that returns several forecasts per input (e.g. every elastic level)."""
    se = ae = None
    for start in range(0, len(split), batch):
        x, y = split.windows(slice(start, start + batch))
        errs = [np.asarray(p)[:, -split.pred_len:].astype(np.float64) - y for p in predict(x)]
        se = [(se[i] if se else 0.0) + float(np.square(e).sum()) for i, e in enumerate(errs)]
        ae = [(ae[i] if ae else 0.0) + float(np.abs(e).sum()) for i, e in enumerate(errs)]
    n = len(split) * split.pred_len * split.z.shape[1]
    return [{"mse": s / n, "mae": a / n} for s, a in zip(se, ae)]


def torch_predict(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()
    return predict


def horizon_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss on the horizon only (FITS's train_mode 1): the last H steps of the output against y."""
    return torch.mean((out[:, -y.shape[1]:] - y) ** 2)


def fit(model: torch.nn.Module, data: EttData, recipe: Recipe = Recipe(), *,
        loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        val_score: Callable[[torch.nn.Module], float] | None = None, desc: str = "train",
        progress: bool = True, threads: int | None = 1) -> dict:
    """Train `model` in place with `recipe`; keep the weights of the best validation epoch.

    `loss(model, x, y)` defaults to the horizon MSE of `model(x)`; `val_score(model)` to the validation
    MSE over all windows (the FITS code averages shuffled, drop-last batches; every window is cleaner).
    `threads`: torch threads while training (1: these models are small and the machine is shared).
    """
    loss = loss or (lambda m, x, y: horizon_mse(m(x), y))
    val_score = val_score or (lambda m: evaluate(torch_predict(m), data.val)["mse"])
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    best, best_state, best_epoch, stale, history = math.inf, None, -1, 0, []
    start = time.perf_counter()
    try:
        bar = tqdm(range(recipe.max_epochs), desc=desc, disable=not progress, leave=False)
        for epoch in bar:
            model.train()
            order = rng.permutation(len(data.train))
            for b in range(len(order) // recipe.batch_size):            # drop_last, as the paper's loader
                x, y = data.train.windows(order[b * recipe.batch_size:(b + 1) * recipe.batch_size])
                step_loss = loss(model, torch.from_numpy(x), torch.from_numpy(y))
                opt.zero_grad()
                step_loss.backward()
                opt.step()
            model.eval()
            score = val_score(model)
            history.append(score)
            bar.set_postfix(val=f"{score:.4f}")
            if score < best:
                best, best_epoch, stale = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= recipe.patience:
                    break
            # NOTE: as FITS's adjust_learning_rate(epoch + 1): two epochs at lr, then x0.95 per epoch.
            for g in opt.param_groups:
                g["lr"] = recipe.lr * recipe.lr_decay ** epoch
    finally:
        torch.set_num_threads(saved_threads)
    model.load_state_dict(best_state)
    model.eval()
    return {"recipe": asdict(recipe), "epochs": len(history), "best_epoch": best_epoch + 1, "val_mse": best,
            "train_seconds": round(time.perf_counter() - start, 1), "threads": threads or saved_threads}


def parameters(model: torch.nn.Module) -> int:
    """Trainable parameters as the papers count them (a complex weight counts once)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


# --- the built-in CLI models -------------------------------------------------------------------------------

ETT_MODELS = ("fits-etth1", "fits-etth2", "fits-elastic-etth1")


def train_fits(name: str, pred_len: int, *, data: str | Path | None = None, cut_freq: int | None = None,
               recipe: Recipe = Recipe(), progress: bool = True):
    """FITS with the paper's settings for `name` trained on it: (model, EttData, training record)."""
    from edgeflex.models.fits import FITS, cut_freq_for

    s = SETTINGS[name]
    d = load_splits(name, s["seq_len"], pred_len, data)
    cut = cut_freq or cut_freq_for(s["seq_len"], s["period"], s["harmonic_order"])
    torch.manual_seed(recipe.seed)
    model = FITS(s["seq_len"], pred_len, len(COLUMNS), cut)
    record = fit(model, d, recipe, desc=f"FITS {name} H={pred_len} cut={cut}", progress=progress)
    return model, d, record


def build_ett_model(name: str, *, horizon: int | None, data: str | Path | None, epochs: int | None,
                    seed: int, progress: bool = True):
    """(model, example input, quality, metadata, held-out Split) for the CLI's ETT models; always trains."""
    horizon = horizon or 96
    recipe = Recipe(seed=seed, **({"max_epochs": epochs} if epochs else {}))
    if name == "fits-elastic-etth1":
        from edgeflex.models.fits_elastic import train_elastic
        model, d, record = train_elastic("ETTh1", horizon, data=data, recipe=recipe, progress=progress)
        quality = [{"metric": "mse", "value": lv["mse"], "mae": lv["mae"], "direction": "lower",
                    "split": "test", "cut_freq": lv["cut_freq"]} for lv in record.pop("levels")]
    elif name in ("fits-etth1", "fits-etth2"):
        model, d, record = train_fits("ETTh" + name[-1], horizon, data=data, recipe=recipe, progress=progress)
        test = evaluate(torch_predict(model), d.test)
        quality = {"metric": "mse", "value": test["mse"], "mae": test["mae"], "direction": "lower",
                   "split": "test", "paper_mse": PAPER_MSE.get((d.name, horizon))}
    else:
        raise UsageError(f"unknown ETT model {name!r}; expected one of {', '.join(ETT_MODELS)}")
    example = torch.from_numpy(d.test.windows(slice(0, 2))[0])
    meta = {**d.meta(), "training": record}
    return model, example, quality, meta, d.test
