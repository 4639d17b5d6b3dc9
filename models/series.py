"""The user's own time series from a CSV: FITS and elastic FITS trained on it with the paper's recipe.

Owns reading the CSV without pickle (the `csv` module; a header row; a date column skipped), its checks
(unknown columns, non-numeric cells, empty or NaN cells, constant columns, too few rows for the look-back and
horizon: one-line `DataError`s before any training), the chronological 70/10/20 split of the long-term
forecasting literature's custom data sets, the scaler from the training rows only, and `fits_csv`. Not the
recipe and windows (`ett.py`) nor the networks (`fits.py`, `fits_elastic.py`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeflex.errors import DataError, UsageError
from edgeflex.models import ett

# Informer's / Autoformer's / FITS's `Dataset_Custom`: the first 70 % of the rows train, the last 20 % test,
# the 10 % between validate; validation and test start one look-back early (their first windows' inputs).
SPLIT = {"train": 0.7, "test": 0.2}
DATE_COLUMNS = ("date", "time", "timestamp", "datetime")     # skipped when present and not asked for
HARMONIC_ORDER = 6       # the FITS paper's ETT setting (etth1_best.sh): cut = (L // period + 1) * 6 + 10
ELASTIC_FRACTIONS = (0.75, 0.5, 0.375, 0.2)   # lower cuts as fractions of the top, as LOWER_CUTS are of 106


def read_csv(path: str | Path, columns: Sequence[str] | None = None,
             date_column: str | None = None) -> tuple[np.ndarray, list[str], dict]:
    """The series [T, C] float64 from `path`, its column names, and where it came from (path, sha256, rows).

    The first row names the columns. `columns`: those to read, in that order (default: every column but the
    date column). `date_column`: a column to skip (default: the first of `DATE_COLUMNS` present, any case).
    Every problem is one `DataError` naming the file, line and column, and the fix."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"CSV {str(p)!r} not found; expected a file with a header row")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start}); expected a CSV file") from None
    rows = list(csv.reader(io.StringIO(text)))
    while rows and not any(c.strip() for c in rows[-1]):
        rows.pop()                                       # trailing blank lines
    if not rows:
        raise DataError(f"{p}: the file is empty; expected a header row, then one row per time step")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header) or "" in header:
        dup = next((h for h in header if header.count(h) > 1), "")
        raise DataError(f"{p}: the header {header[:8]} has an empty or repeated column name {dup!r}; "
                        "expected distinct names")
    lower = [h.lower() for h in header]
    if date_column is None:
        date_column = next((header[lower.index(d)] for d in DATE_COLUMNS if d in lower), None)
    elif date_column not in header:
        raise DataError(f"{p}: no date column {date_column!r}; its columns are {', '.join(header)}")
    wanted = list(columns) if columns else [h for h in header if h != date_column]
    unknown = [c for c in wanted if c not in header]
    if unknown:
        raise DataError(f"{p}: unknown column(s) {', '.join(map(repr, unknown))}; its columns are "
                        f"{', '.join(header)}")
    if not wanted:
        raise DataError(f"{p}: no columns to read besides the date column {date_column!r}")
    if len(set(wanted)) != len(wanted):
        raise DataError(f"{p}: columns {wanted} repeat a name; expected each once")
    idx = [header.index(c) for c in wanted]
    series = np.empty((len(rows) - 1, len(idx)), np.float64)
    for i, row in enumerate(rows[1:]):
        line = i + 2
        if len(row) != len(header):
            raise DataError(f"{p} line {line}: {len(row)} cells, the header has {len(header)}; expected one "
                            "cell per column")
        for j, k in enumerate(idx):
            cell = row[k].strip()
            try:
                series[i, j] = float(cell) if cell else math.nan
            except ValueError:
                fix = (f"name it with --date-column / date_column={wanted[j]!r}" if j == 0 and columns is None
                       else "pick numeric columns with --columns / columns=")
                raise DataError(f"{p} line {line}, column {wanted[j]!r}: {cell[:40]!r} is not a number; "
                                f"{fix}") from None
    bad = np.flatnonzero(~np.isfinite(series).all(axis=1))
    if len(bad):
        col = wanted[int(np.argmax(~np.isfinite(series[bad[0]])))]
        raise DataError(f"{p}: {len(bad)} rows with an empty, NaN or inf cell (first: line {bad[0] + 2}, "
                        f"column {col!r}); fill or drop them before training (FITS needs evenly spaced "
                        "steps)")
    return series, wanted, {"path": str(p), "sha256": hashlib.sha256(raw).hexdigest(), "rows": len(series),
                            "columns": wanted, "date_column": date_column}


def borders(rows: int, seq_len: int) -> dict[str, tuple[int, int]]:
    """Row ranges [start, end) of each split (`SPLIT`); validation and test start seq_len rows early."""
    n_train, n_test = int(rows * SPLIT["train"]), int(rows * SPLIT["test"])
    n_val = rows - n_train - n_test
    return {"train": (0, n_train), "val": (n_train - seq_len, n_train + n_val),
            "test": (rows - n_test - seq_len, rows)}


def min_rows(seq_len: int, pred_len: int) -> int:
    """The fewest rows whose split gives every part at least one window of seq_len + pred_len."""
    n = seq_len + pred_len
    while any(b - a < seq_len + pred_len or a < 0 for a, b in borders(n, seq_len).values()):
        n += 1
    return n


@dataclass
class SeriesFit:
    """A FITS (or elastic FITS) trained on the user's CSV: the model, an example input (two test windows),
    its test quality (a dict; per level for elastic), the bundle metadata (source, split, scaler, training
    record) and the held-out test split. `ef.elastic` returns it with `export(path)`, which writes the bundle
    with all of it (the export stage comes after models/)."""

    model: torch.nn.Module
    example: torch.Tensor
    quality: Any
    metadata: dict
    test: ett.Split


def fits_csv(path: str | Path, *, lookback: int, horizon: int, columns: Sequence[str] | None = None,
             date_column: str | None = None, **kw: Any) -> SeriesFit:
    """Train FITS (or, `elastic`, an ElasticFITS with one level per cut frequency) on the CSV's series; see
    `ef.elastic.fits_csv`. `kw`: as `fits_series`."""
    _check_settings(lookback, horizon, kw.get("epochs"), kw.get("period"), kw.get("cut_freq"))
    series, names, source = read_csv(path, columns, date_column)
    return fits_series(series, lookback=lookback, horizon=horizon, names=names, source=source, **kw)


def read_array(values: Any, names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """The user's series as an array [T, C] float64 (a 1-D array is one column) and its column names
    (default c0, c1, ...), checked as `read_csv` checks a file: one `DataError` line."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if not isinstance(values, np.ndarray):
        raise DataError(f"series is {type(values).__name__}; expected a numpy array [time steps, columns] "
                        "(or a CSV path: fits_csv)")
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise DataError(f"series has dtype {values.dtype}; expected numbers: pass values.astype(np.float32)")
    if values.ndim not in (1, 2) or values.size == 0:
        raise DataError(f"series has shape {values.shape}; expected [time steps, columns] (or one column)")
    series = values.astype(np.float64).reshape(len(values), -1)
    names = list(names) if names is not None else [f"c{i}" for i in range(series.shape[1])]
    if len(names) != series.shape[1] or len(set(names)) != len(names):
        raise DataError(f"names {names}: expected {series.shape[1]} distinct names, one per column")
    bad = np.flatnonzero(~np.isfinite(series).all(axis=1))
    if len(bad):
        raise DataError(f"series has {len(bad)} rows with NaN or inf (first: row {bad[0]}); fill or drop "
                        "them before training (FITS needs evenly spaced steps)")
    return series, names


def _check_settings(lookback: Any, horizon: Any, epochs: Any, period: Any = None,
                    cut_freq: Any = None) -> None:
    """Every setting an int >= 1 (period, cut_freq and epochs may be None), in one UsageError line."""
    settings = {"lookback": lookback, "horizon": horizon, "period": period, "cut_freq": cut_freq}
    for what, value in settings.items():
        if (value is not None or what in ("lookback", "horizon")) and \
                (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{what} must be an int >= 1, got {value!r}")
    if lookback < 4:
        raise UsageError(f"lookback must be >= 4 steps (FITS interpolates its spectrum), got {lookback}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise UsageError(f"epochs must be an int >= 1 (or None: the recipe's 100 with early stopping), got "
                         f"{epochs!r}")


def fits_series(values: Any, *, lookback: int, horizon: int, names: Sequence[str] | None = None,
                elastic: bool = False, period: int | None = None, cut_freq: int | None = None,
                cut_freqs: Sequence[int] | None = None, epochs: int | None = None, seed: int = 0,
                progress: bool = True, source: dict | None = None) -> SeriesFit:
    """Train FITS (or, `elastic`, an ElasticFITS) on `values` [T, C], oldest first; see
    `ef.elastic.fits_csv`. `source`: where the rows came from (recorded; default: the array's sha256)."""
    from edgeflex.models.fits import FITS, cut_freq_for, dominant_period
    from edgeflex.models.fits_elastic import ElasticFITS, evaluate_levels, fit_levels

    _check_settings(lookback, horizon, epochs, period, cut_freq)
    series, names = read_array(values, names)
    if source is None:
        source = {"path": None, "sha256": hashlib.sha256(np.ascontiguousarray(series).tobytes()).hexdigest(),
                  "rows": len(series), "columns": names, "date_column": None}
    path = source["path"] or "series"
    need = min_rows(lookback, horizon)
    if len(series) < need:
        raise DataError(f"{path}: {len(series)} rows; look-back {lookback} + horizon {horizon} need at least "
                        f"{need} for the 70/10/20 split (one window each); shorten them or add rows")
    parts = borders(len(series), lookback)
    train_rows = series[: parts["train"][1]]
    std = train_rows.std(axis=0)
    flat = [n for n, s in zip(names, std) if not s > 0]
    if flat:
        raise DataError(f"{path}: column(s) {', '.join(map(repr, flat))} are constant over the training rows "
                        "(std 0): nothing to learn or scale; leave them out with --columns / columns=")
    scaler = ett.Scaler(train_rows.mean(axis=0), std)
    z = scaler.transform(series)
    splits = {k: ett.Split(z[a:b], lookback, horizon) for k, (a, b) in parts.items()}
    data = ett.EttData(Path(path).stem, splits["train"], splits["val"], splits["test"], scaler, source)
    if period is None:
        period = dominant_period(train_rows, max_period=lookback)     # a season the window holds
    top = cut_freq or cut_freq_for(lookback, period, HARMONIC_ORDER)
    top = _fit_cut(top, lookback, horizon)
    recipe = ett.Recipe(seed=seed, batch_size=min(ett.Recipe.batch_size, len(data.train)),
                        **({"max_epochs": epochs} if epochs else {}))
    torch.manual_seed(seed)
    channels = len(names)
    if elastic:
        cuts = cut_freqs or sorted({top, *(max(1, round(top * f)) for f in ELASTIC_FRACTIONS)}, reverse=True)
        cuts = [_fit_cut(int(k), lookback, horizon) for k in cuts]
        model = ElasticFITS(lookback, horizon, channels, cuts)
        record = fit_levels(model, data, recipe, progress=progress,
                            desc=f"elastic FITS {data.name} L={lookback} H={horizon} "
                                 f"cuts={list(model.cut_freqs)}")
        quality = [{"metric": "mse", "value": lv["mse"], "mae": lv["mae"], "direction": "lower",
                    "split": "test", "cut_freq": lv["cut_freq"]} for lv in evaluate_levels(model, data.test)]
    else:
        model = FITS(lookback, horizon, channels, top)
        record = ett.fit(model, data, recipe, desc=f"FITS {data.name} L={lookback} H={horizon} cut={top}",
                         progress=progress)
        test = ett.evaluate(ett.torch_predict(model), data.test)
        quality = {"metric": "mse", "value": test["mse"], "mae": test["mae"], "direction": "lower",
                   "split": "test"}
    naive = _repeat_last_mse(data.test)
    for q in quality if isinstance(quality, list) else [quality]:
        q["baseline"] = {"name": "repeat last value", "value": naive}
    meta = {"data": {**source, "split": {k: list(v) for k, v in parts.items()},
                     "split_rule": "chronological 70/10/20 (Dataset_Custom); val and test start one "
                                   "look-back early"},
            "scaler": {"mean": scaler.mean.tolist(), "std": scaler.std.tolist(),
                       "fit_rows": list(parts["train"]), "columns": names},
            "input": f"[batch, {lookback}, {channels}] standardised with scaler.mean/std",
            "output": f"[batch, {lookback + horizon}, {channels}]: the last {horizon} steps are the forecast "
                      "(standardised; multiply by scaler.std and add scaler.mean for raw units)",
            "training": {**record, "period": period, "harmonic_order": HARMONIC_ORDER}}
    example = torch.from_numpy(data.test.windows(slice(0, 2))[0])
    return SeriesFit(model, example, quality, meta, data.test)


def _fit_cut(cut: int, seq_len: int, pred_len: int) -> int:
    """`cut` lowered until FITS takes it: at most seq_len // 2 + 1 bins in, its upsampled bins fitting the
    output's spectrum."""
    cut = max(1, min(cut, seq_len // 2 + 1))
    while cut > 1 and int(cut * (seq_len + pred_len) / seq_len) > (seq_len + pred_len) // 2 + 1:
        cut -= 1
    return cut


def _repeat_last_mse(split: ett.Split) -> float:
    """Test MSE of forecasting every step as the last observed value (standardised): the plain baseline."""
    se, n = 0.0, 0
    for start in range(0, len(split), 512):
        x, y = split.windows(slice(start, start + 512))
        se += float(np.square(y - x[:, -1:]).sum())
        n += y.size
    return se / n
