"""Elastic models from the user's own models and data: `ef.elastic.stitch(anchors, train, val)` stitches
pretrained anchors of one family into one SN-Net whose configs `ef.export` writes as shared segments;
`ef.elastic.dress(model, train, val)` makes one pretrained model nested-sparse (DRESS levels, one weight
copy).

The public face only: the training code is torch and lives in `models/stitch.py` (the network, stitch
points, least squares, joint training), `models/dress.py` (levels, joint fine-tuning) and
`models/userdata.py` (the data checks). Importing this module imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from edgeflex.models.dress import DENSITIES, USER_RECIPE, DressModel, PrunablePredicate, is_prunable
from edgeflex.models.dress import dress as _dress
from edgeflex.models.stitch import STITCH_RECIPE, Layout, Stitched, starnet_layout
from edgeflex.models.stitch import stitch as _stitch

__all__ = ["DressModel", "Layout", "Stitched", "dress", "is_prunable", "starnet_layout", "stitch"]


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
