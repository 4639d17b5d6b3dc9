"""`edgeflex train dress|stitch`: the user's own PyTorch models made elastic on their own data, from the
command line (it prints, as `cli.py` does).

The data is a .npz with x_train, y_train, x_val, y_val (`edgeflex.datafile.load_npz`: no pickle). A model
is the user's own code, named `FILE.py:FUNCTION` (the function builds it; importing the file runs it, as
`python FILE.py` would), with its weights from a .npz of its state_dict (`np.savez(path, **{k:
v.numpy() for k, v in model.state_dict().items()})`), never from a pickle or `torch.load`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeflex.errors import DataError, UsageError

SAVE_HINT = "np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})"


def load_function(spec: str, flag: str) -> Callable[..., Any]:
    """`FILE.py:FUNCTION` -> the function (the file imported as a module of its own)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise UsageError(f"{flag} {spec!r}: expected FILE.py:FUNCTION, e.g. mymodels.py:build_small")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {spec!r}: no such file {path!r}")
    module_name = f"edgeflex_user_{Path(path).stem}_{abs(hash(os.path.abspath(path)))}"
    module = sys.modules.get(module_name)
    if module is None:
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's code: reported in one line
            del sys.modules[module_name]
            raise UsageError(f"{flag} {spec!r}: importing {path} failed: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"{flag} {spec!r}: {path} has no function {name!r}")
    return fn


def build_model(spec: str, weights: str | None, flag: str) -> Any:
    """The user's model: `FILE.py:FUNCTION` called with no argument, then its weights from a state_dict
    .npz (strict: every key, every shape)."""
    import torch

    fn = load_function(spec, flag)
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{flag} {spec!r}: calling it failed: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}") from e
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{flag} {spec!r} returned {type(model).__name__}; expected a torch.nn.Module")
    if weights is None:
        return model
    if not os.path.isfile(weights):
        raise UsageError(f"weights {weights!r}: no such file; expected a .npz written by {SAVE_HINT}")
    try:
        with np.load(weights, allow_pickle=False) as archive:
            state = {k: torch.from_numpy(np.array(archive[k])) for k in archive.files}
    except (OSError, ValueError) as e:
        raise DataError(f"weights {weights!r}: not a .npz of arrays ({type(e).__name__}); expected one "
                        f"written by {SAVE_HINT}") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise DataError(f"weights {weights!r} do not fit {spec}: missing {missing[:4]}, unexpected "
                        f"{unexpected[:4]}; expected the keys of model.state_dict()")
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        k = wrong[0]
        raise DataError(f"weights {weights!r}: {k} has shape {tuple(state[k].shape)}, {spec} expects "
                        f"{tuple(own[k].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model.eval()


def _anchor(spec: str) -> tuple[str, str | None]:
    """`FILE.py:FUNCTION[=WEIGHTS.npz]`."""
    model, sep, weights = spec.partition("=")
    return model, (weights if sep else None)


def cmd_train_user(a: argparse.Namespace) -> int:
    import torch

    import edgeflex as ef
    from edgeflex.cli import _quality_str, writable_file
    from edgeflex.datafile import load_npz
    from edgeflex.runtime.store import target

    writable_file("--out", a.out, dir_ok=True)     # before training: a bad path fails in a second
    target(a.out, overwrite=a.force, new=True)
    if not a.npz:
        raise UsageError(f"train {a.family} needs --npz FILE.npz with x_train, y_train, x_val, y_val")
    data = load_npz(a.npz)
    train, val = (data["x_train"], data["y_train"]), (data["x_val"], data["y_val"])
    kw: dict[str, Any] = {"seed": a.seed}
    if a.epochs is not None:
        kw["epochs"] = a.epochs
    if a.family == "dress":
        if not a.model:
            raise UsageError("train dress needs --model FILE.py:FUNCTION (and --weights STATE.npz)")
        model = build_model(a.model, a.weights, "--model")
        if a.densities:
            kw["densities"] = _floats(a.densities, "--densities")
        elastic = ef.elastic.dress(model, train, val, **kw)
        rows = [(f"density {lv['density']:g}", lv["value"], lv["flops"]) for lv in elastic.report["levels"]]
    else:
        if not a.anchor or len(a.anchor) < 2:
            raise UsageError("train stitch needs two or more --anchor FILE.py:FUNCTION[=WEIGHTS.npz], "
                             "smallest first")
        anchors = [build_model(*_anchor(spec), "--anchor") for spec in a.anchor]
        if a.adapter:
            kw["adapter"] = load_function(a.adapter, "--adapter")
        if a.stitches is not None:
            kw["stitches"] = a.stitches
        elastic = ef.elastic.stitch(anchors, train, val, direction=a.direction, **kw)
        rows = [(c["name"], c["value"], c["flops"]) for c in elastic.report["configs"]]
    example = torch.from_numpy(np.ascontiguousarray(data["x_val"][:2], dtype=np.float32))
    bundle = ef.export(elastic, example, a.out, name=a.name or Path(a.out).name.removesuffix(".efx"),
                       tolerance=a.tolerance, overwrite=a.force)
    r = elastic.report
    print(f"trained on {r['train_rows']} rows of {a.npz} ({r['epochs']} epochs, {r['train_seconds']:.1f} s), "
          f"scored on {r['val_rows']} held-out rows")
    for name, value, flops in rows:
        print(f"  {name}: val top-1 {value:.4f}, {flops} FLOPs")
    v = bundle.manifest["export"]["validation"]
    print(f"wrote {bundle.path}  ({bundle.family}, {len(bundle.configs)} config(s), export error "
          f"{v['max_rel_err']:.2e} relative)")
    for c in bundle.configs:
        print(f"  {c.name}: {_quality_str(c.quality)}")
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 1,0.5,0.25,0.1") from None
