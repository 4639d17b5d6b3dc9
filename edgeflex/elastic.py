"""Elastic models from the user's own models and data: `ef.elastic.stitch(anchors, train, val)` stitches
pretrained anchors of one family into one SN-Net whose configs `ef.export` writes as shared segments;
`ef.elastic.dress(model, train, val)` makes one pretrained model nested-sparse (DRESS levels, one weight
copy); `ef.elastic.fits_csv(path, lookback=, horizon=)` trains FITS or elastic FITS on the user's series.

The public face only: the training code is torch and lives in `models/stitch.py` (the network, stitch
points, least squares, joint training), `models/dress.py` (levels, joint fine-tuning), `models/series.py`
(the CSV, its split, FITS's recipe) and `models/userdata.py` (the data checks). Importing this module
imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeflex.models import series as _series
from edgeflex.models.dress import DENSITIES, USER_RECIPE, DressModel, PrunablePredicate, is_prunable
from edgeflex.models.dress import dress as _dress
from edgeflex.models.stitch import STITCH_RECIPE, Layout, Stitched, starnet_layout
from edgeflex.models.stitch import stitch as _stitch

__all__ = ["DressModel", "Layout", "SeriesFit", "Stitched", "dress", "fits_csv", "fits_series", "is_prunable",
           "starnet_layout", "stitch"]


def stitch(anchors: Sequence[Any], train: Any, val: Any, *, adapter: Callable[[Any], Layout] | None = None,
           names: Sequence[str] | None = None, direction: str = "slow-to-fast",
           stitches: int | None = STITCH_RECIPE["stitches"], epochs: int = STITCH_RECIPE["epochs"],
           lr: float = STITCH_RECIPE["lr"], batch_size: int = STITCH_RECIPE["batch_size"],
           ls_rows: int = STITCH_RECIPE["ls_rows"], seed: int = 0, progress: bool = True) -> Stitched:
    """Stitch pretrained classifiers of one family, smallest first, into one network: the anchors plus a
    config per stitch, trained jointly on `train`, each config scored on `val`.

    `train`, `val`: (x, y) numpy arrays (x float, one row per sample; y int class labels) or torch
    DataLoaders of (x, y) batches; checked whole first (shapes, labels in range, no NaN rows, enough rows:
    one-line `ef.DataError`). `adapter(model) -> Layout(before, blocks, after)` says how an anchor runs
    (default: StarNet's published layout, `starnet_layout`). A stitch is a 1x1 conv between feature maps,
    a linear layer between tokens or vectors, set by least squares on up to `ls_rows` training rows, then
    trained with copies of the anchors (yours are left as they are) for `epochs`, one config sampled per step
    (SN-Net). `stitches` per pair of
    neighbouring anchors and `direction` ("slow-to-fast": the larger anchor in front; "fast-to-slow";
    "both"). `names`: the anchors' names in config names (default a0, a1, ...).

    Returns the `Stitched` model in eval mode, set to its largest anchor: `config_names()` (small -> large
    by FLOPs), `set_config(name)`, `quality` (per config, held-out top-1; `ef.export` records it),
    `report` (per config FLOPs, parameter bytes, top-1 after least squares and after training).
    """
    return _stitch(anchors, train, val, adapter=adapter, names=names, direction=direction, stitches=stitches,
                   epochs=epochs, lr=lr, batch_size=batch_size, ls_rows=ls_rows, seed=seed, progress=progress)


def dress(model: Any, train: Any, val: Any, *, densities: Sequence[float] = DENSITIES,
          prunable: PrunablePredicate | None = None, loss_weights: Sequence[float] | None = None,
          epochs: int = USER_RECIPE["epochs"], remask_epochs: int = USER_RECIPE["remask_epochs"],
          lr: float = USER_RECIPE["lr"], batch_size: int = USER_RECIPE["batch_size"], seed: int = 0,
          progress: bool = True) -> DressModel:
    """Make a pretrained classifier nested-sparse (DRESS): every prunable Linear/Conv2d weight (default
    `is_prunable`: all but the first Conv2d and the last Linear) keeps, at level s, the top `densities[s]`
    of each row by magnitude, the levels nested (one dense copy and 2-bit codes), then the copy is fine-tuned
    on `train` with the joint loss sum_s loss_weights[s] * loss_s (default: equal) and each level scored on
    `val`. Your model is copied, never changed.

    `train`, `val`: (x, y) arrays or DataLoaders, checked whole first as for `stitch` (one-line
    `ef.DataError`). `densities`: 1.0 first, strictly decreasing, at most 4 (the bundle's 2-bit codes).
    Fine-tuning: AdamW with a one-cycle schedule at `lr` for `epochs`, BatchNorm statistics frozen at
    yours (shared by every level), codes re-ranked by magnitude at the start of each of the first
    `remask_epochs` epochs, then fixed.

    Returns the `DressModel` in eval mode at level 0: `set_level(s)`, `levels`, `quality` (per level,
    held-out top-1; `ef.export` records it), `report` (per level FLOPs, parameter bytes, top-1 before and
    after fine-tuning; the prunable weights).
    """
    return _dress(model, train, val, densities=densities, prunable=prunable, loss_weights=loss_weights,
                  epochs=epochs, remask_epochs=remask_epochs, lr=lr, batch_size=batch_size, seed=seed,
                  progress=progress)


def fits_csv(path: str | os.PathLike, *, lookback: int, horizon: int, columns: Sequence[str] | None = None,
             date_column: str | None = None, elastic: bool = False, period: int | None = None,
             cut_freq: int | None = None, cut_freqs: Sequence[int] | None = None, epochs: int | None = None,
             seed: int = 0, progress: bool = True) -> SeriesFit:
    """Train FITS on the series of a CSV file with the FITS paper's recipe; `elastic`: one ElasticFITS whose
    nested cut frequencies share one complex weight, trained on the equal-weighted sum of every level's loss.

    The CSV: a header row, then one row per time step, evenly spaced, oldest first; read with the `csv`
    module (no pickle). `columns`: the series to model, in order (default: all but the date column);
    `date_column`: a column to skip (default: `date`, `time`, `timestamp` or `datetime` if present). Checked
    first, in one `ef.DataError` line: unknown columns, non-numeric cells, empty / NaN / inf cells (the first
    one's line), columns constant over the training rows, too few rows for `lookback` + `horizon`.

    Split: chronological 70 / 10 / 20 % (train / validation / test, the literature's `Dataset_Custom`;
    validation and test start one look-back early), standardised with the training rows' mean and std only.
    Recipe (`ett.Recipe`): loss on the horizon, Adam lr 5e-4, batch 128 (or the training windows, if fewer),
    lr x0.95 per epoch, early stopping on validation MSE (patience 20), at most `epochs` (default 100).
    Cut frequency: `cut_freq`, else the paper's (lookback // period + 1) * 6 + 10 with `period` (default: the
    training rows' dominant period of at most `lookback` steps); elastic levels: `cut_freqs`, else that cut
    and 3/4, 1/2, 3/8, 1/5 of it.

    Returns a `SeriesFit`: `model`, `example`, `quality` (test MSE/MAE, per level when elastic, beside the
    repeat-the-last-value baseline), `metadata` (source sha256, split, scaler, training record), `test`;
    `fit.export("f.efx")` writes the bundle with the quality and metadata.

    `ef.elastic.fits_series(values, lookback=, horizon=, names=...)` does the same on an array [T, C] (or a
    tensor; 1-D: one column), checked alike (numbers, no NaN/inf rows, enough rows).
    """
    return SeriesFit.of(_series.fits_csv(path, lookback=lookback, horizon=horizon, columns=columns,
                                         date_column=date_column, elastic=elastic, period=period,
                                         cut_freq=cut_freq, cut_freqs=cut_freqs, epochs=epochs, seed=seed,
                                         progress=progress))


def fits_series(values: Any, *, lookback: int, horizon: int, **kw: Any) -> SeriesFit:
    """`fits_csv` on an array [T, C] (or a tensor; 1-D: one column) instead of a file; `names=`: the
    columns' names. Checked alike (numbers, no NaN/inf rows, enough rows)."""
    return SeriesFit.of(_series.fits_series(values, lookback=lookback, horizon=horizon, **kw))


@dataclass
class SeriesFit(_series.SeriesFit):
    """A trained FITS on the user's series (`models.series.SeriesFit`) that exports itself."""

    @classmethod
    def of(cls, fit: _series.SeriesFit) -> SeriesFit:
        return cls(**vars(fit))

    def export(self, path: str | os.PathLike | Path, **kw: Any):
        """`ef.export` of the model with its example, test quality and metadata (`kw` as `ef.export`'s)."""
        from edgeflex.export.core import export

        return export(self.model, self.example, path, **{"quality": self.quality, "metadata": self.metadata,
                                                         **kw})
