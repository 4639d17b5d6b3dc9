"""The user's training and held-out data for making their models elastic: (x, y) arrays or a torch
DataLoader of (x, y) batches, checked whole before any training starts.

Owns the checks (shapes, dtypes, labels, non-finite rows, too few rows; one-line `DataError`s named after
the .npz keys x_train, y_train, x_val, y_val), batching, and the one optimisation loop the user-model
trainers share (`train_steps`). Not what each trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from edgeflex.errors import DataError

# Fewer rows than this cannot fit a stitching layer by least squares nor train it (train), or cannot tell
# two configs apart (val: one row is 1/16 of top-1).
MIN_ROWS = {"train": 64, "val": 16}


class Checked:
    """Data that passed `check_data`: `rows`, `sample_shape`, `batches()`, `head(n)`."""

    def __init__(self, role: str, rows: int, sample_shape: tuple[int, ...], labels: tuple[int, int], *,
                 arrays: tuple[torch.Tensor, torch.Tensor] | None = None, loader: Any = None,
                 n_batches: int = 0) -> None:
        self.role, self.rows, self.sample_shape, self.labels = role, rows, sample_shape, labels
        self._arrays, self._loader, self._n_batches = arrays, loader, n_batches

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.rows / batch_size) if self._arrays is not None else self._n_batches

    def batches(self, batch_size: int, gen: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x float32, y int64) batches: arrays in `batch_size` rows, shuffled by `gen` when given; a
        DataLoader's own batches, in its own order."""
        if self._arrays is None:
            for x, y in self._loader:
                yield torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y).long()
            return
        x, y = self._arrays
        order = torch.randperm(self.rows, generator=gen) if gen is not None else torch.arange(self.rows)
        for i in range(0, self.rows, batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]

    def head(self, n: int) -> torch.Tensor:
        """The first `n` rows of x (all of them if fewer)."""
        if self._arrays is not None:
            return self._arrays[0][:n]
        parts, got = [], 0
        for x, _ in self.batches(n):
            parts.append(x[: n - got])
            got += len(parts[-1])
            if got >= n:
                break
        return torch.cat(parts)

    def check_labels(self, classes: int) -> None:
        low, high = self.labels
        if low < 0 or high >= classes:
            raise DataError(f"y_{self.role} has labels in [{low}, {high}] but the models have {classes} "
                            f"outputs; expected labels 0..{classes - 1}: remap them or drop those rows")


def check_data(data: Any, role: str, *, sample_shape: tuple[int, ...] | None = None,
               min_rows: int | None = None) -> Checked:
    """Check `data` ((x, y) arrays or a DataLoader of (x, y) batches) whole; raise one `DataError` line on
    the first problem. `sample_shape`: what each x row must be (the training rows' shape, for `val`)."""
    min_rows = MIN_ROWS.get(role, 1) if min_rows is None else min_rows
    if isinstance(data, DataLoader):
        return _check_loader(data, role, sample_shape, min_rows)
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise DataError(f"{role} data is {type(data).__name__}; expected (x_{role}, y_{role}) arrays or a "
                        "torch DataLoader of (x, y) batches")
    x, y = (_array(a, f"{n}_{role}") for a, n in zip(data, "xy", strict=True))
    rows = _check_batch(x, y, role, sample_shape, 0)
    if rows < min_rows:
        raise DataError(f"{role} data has {rows} rows; expected at least {min_rows} (MIN_ROWS in "
                        "edgeflex/models/userdata.py)")
    labels = (int(y.min()), int(y.max()))
    return Checked(role, rows, tuple(x.shape[1:]), labels,
                   arrays=(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                           torch.from_numpy(y.astype(np.int64))))


def _array(a: Any, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    if not isinstance(a, np.ndarray):
        raise DataError(f"{name} is {type(a).__name__}; expected a numpy array (or a torch tensor)")
    return a


def _check_batch(x: np.ndarray, y: np.ndarray, role: str, sample_shape: tuple[int, ...] | None,
                 offset: int) -> int:
    """Check one batch (or the whole array); `offset`: the row number of its first row. Returns its rows."""
    xn, yn = f"x_{role}", f"y_{role}"
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{xn} has dtype {x.dtype}; expected floating point inputs: pass "
                        "x.astype(np.float32), scaled as the models were trained")
    if x.ndim < 2:
        raise DataError(f"{xn} has shape {x.shape}; expected (rows, *one row's shape)")
    if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
        raise DataError(f"{xn} rows have shape {tuple(x.shape[1:])}; expected {tuple(sample_shape)}, as "
                        "the training rows")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{yn} has dtype {y.dtype}; expected integer class labels: pass y.astype(np.int64)")
    if y.ndim != 1:
        fix = ": pass y.reshape(-1)" if y.size == len(x) else ""
        raise DataError(f"{yn} has shape {y.shape}; expected ({len(x)},), one class label per row{fix}")
    if len(y) != len(x):
        raise DataError(f"{xn} has {len(x)} rows but {yn} has {len(y)}; expected one label per row")
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if len(bad):
        raise DataError(f"{xn} has {len(bad)} rows with NaN or inf (first: row {offset + bad[0]}); drop "
                        "them: keep = np.isfinite(x.reshape(len(x), -1)).all(1)")
    if len(y) and y.min() < 0:
        raise DataError(f"{yn} has negative labels (first: row {offset + int(np.argmax(y < 0))}); expected "
                        "class labels 0..classes-1")
    return len(x)


def _check_loader(loader: DataLoader, role: str, sample_shape: tuple[int, ...] | None,
                  min_rows: int) -> Checked:
    """One pass over the loader, every batch checked; no model runs."""
    rows, batches, low, high = 0, 0, None, None
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise DataError(f"{role} DataLoader batch {batches} is {type(batch).__name__}; expected (x, y) "
                            "pairs")
        x, y = (_array(a, f"{n}_{role}") for a, n in zip(batch, "xy", strict=True))
        rows += _check_batch(x, y, role, sample_shape, rows)
        sample_shape = tuple(x.shape[1:])
        if len(y):
            low = int(y.min()) if low is None else min(low, int(y.min()))
            high = int(y.max()) if high is None else max(high, int(y.max()))
        batches += 1
    if rows < min_rows:
        raise DataError(f"{role} DataLoader gave {rows} rows; expected at least {min_rows} (MIN_ROWS in "
                        "edgeflex/models/userdata.py)")
    return Checked(role, rows, sample_shape or (), (low or 0, high or 0), loader=loader, n_batches=batches)


def train_steps(params: Any, data: Checked, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
                gen: torch.Generator, step_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                desc: str, progress: bool, before_epoch: Callable[[int], None] | None = None) -> None:
    """`epochs` passes over `data` (shuffled by `gen`): per batch `step_loss(x, y)` and one step of AdamW with
    a one-cycle schedule over every step, a progress bar. `before_epoch(epoch)` runs at each epoch's start."""
    from tqdm.auto import tqdm

    steps = epochs * data.batches_per_epoch(batch_size)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
    try:
        done = 0
        for epoch in range(epochs):
            if before_epoch is not None:
                before_epoch(epoch)
            for x, y in data.batches(batch_size, gen=gen):
                if done == steps:        # a DataLoader may yield more batches than it promised
                    break
                loss = step_loss(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                done += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        bar.close()
