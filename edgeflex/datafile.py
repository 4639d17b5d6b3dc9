"""The user's data files on the command line: `.npz` archives of named arrays, read without pickle.

Owns opening the archive and the one-line errors for a file that is not one, a missing key, an object
array or a wrong rank. Not the checks of what the arrays hold (`models/userdata.py`, `export/search.py`).
numpy only.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence

import numpy as np

from edgeflex.errors import DataError

NPZ_KEYS = ("x_train", "y_train", "x_val", "y_val")


def load_npz(path: str | os.PathLike, keys: Sequence[str] = NPZ_KEYS) -> dict[str, np.ndarray]:
    """The arrays `keys` of the .npz at `path` (np.load with allow_pickle=False), each read whole.

    y_* arrays must be 1-D (one label or target a row), x_* arrays at least 1-D with as many rows as their
    y; anything else, a missing key or an unreadable file is one DataError line naming the file and key."""
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise DataError(f"{where}: no such file; expected a .npz with arrays {', '.join(keys)}")
    try:
        archive = np.load(where, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{where}: not a readable .npz archive ({type(e).__name__}); expected one written by "
                        f"np.savez with arrays {', '.join(keys)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{where}: holds one array, not a .npz archive; expected np.savez(path, "
                        f"{'=..., '.join(keys)}=...)")
    out = {}
    with archive:
        missing = [k for k in keys if k not in archive.files]
        if missing:
            has = ", ".join(archive.files) or "none"
            raise DataError(f"{where}: no array {', '.join(missing)} (it has: {has}); expected "
                            f"{', '.join(keys)}")
        for k in keys:
            try:
                out[k] = archive[k]
            except ValueError:
                raise DataError(f"{where}: array {k} holds Python objects, which are not read (no pickle); "
                                "save numbers: x as float32, y as int64 labels") from None
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                raise DataError(f"{where}: array {k} cannot be read ({type(e).__name__}: truncated?)") \
                    from None
    for k, a in out.items():
        if a.dtype.kind not in "biuf":
            raise DataError(f"{where}: array {k} has dtype {a.dtype}; expected numbers (x float32, y int64 "
                            "labels)")
        if k.startswith("y_") and a.ndim != 1:
            raise DataError(f"{where}: array {k} has shape {a.shape}; expected 1-D, one label per row")
        if k.startswith("x_") and a.ndim < 1:
            raise DataError(f"{where}: array {k} is a scalar; expected one row per sample")
    for split in {k[2:] for k in out}:
        x, y = out.get(f"x_{split}"), out.get(f"y_{split}")
        if x is not None and y is not None and len(x) != len(y):
            raise DataError(f"{where}: x_{split} has {len(x)} rows, y_{split} {len(y)}; expected one label "
                            "per row")
    return out
