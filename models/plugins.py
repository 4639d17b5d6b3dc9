"""The built-in family plug-ins: one section per family, its `Family` record, its model names with their
settings as data, and its builders.

Read by `models/registry.py` on first use (no registration by import side effect). Torch-free at import:
each builder imports its model and training code when it is called. Not the networks (`models/<family>.py`)
nor the exporters (`export/`), which the records name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .registry import Built, Evaluation, Family, ModelEntry

STARNET_VARIANTS = ("s050", "s100", "s150", "s1", "s2", "s3", "s4")    # as models/starnet.py, smallest first


def _epochs(epochs: int | None) -> dict[str, int]:
    return {"epochs": epochs} if epochs else {}


def _plain(q: dict) -> dict:
    return {k: v for k, v in q.items() if isinstance(v, (int, float, str))}


def _digits_example(arch: str, image_size: int, seed: int):
    import torch

    from edgeflex.models.digits import load_digits_images
    if arch == "mlp":      # the DRESS MLP reads the raw 8x8 grey digit, one channel
        return torch.from_numpy(load_digits_images(8, seed=seed)[2][:2, :1])
    return torch.from_numpy(load_digits_images(image_size, seed=seed)[2][:2])


# --- FITS: CO2 ---------------------------------------------------------------------------------------------

def build_fits_co2(entry: ModelEntry, *, train: bool, epochs: int | None, seed: int, progress: bool,
                   **_: Any) -> Built:
    import torch

    from edgeflex.models.co2 import load_co2, split_scale, train_fits_co2, windows
    from edgeflex.models.fits import FITS, cut_freq_for
    s = entry.settings
    if train:
        model, q = train_fits_co2(seed=seed, progress=progress, **_epochs(epochs))
        _, _, test_z, _ = split_scale(load_co2(), model.seq_len)
        held = windows(test_z, model.seq_len, model.pred_len)
        meta = {"data": q["data"], "scaler": q.pop("scaler")}
        return Built(model, torch.from_numpy(held.x[:1]), q, meta, held)
    torch.manual_seed(seed)
    model = FITS(s["seq_len"], s["pred_len"], s["channels"],
                 cut_freq_for(s["seq_len"], s["period"], s["harmonic_order"]))
    return Built(model, torch.randn(1, s["seq_len"], s["channels"]), None, {}, None)


# --- StarNet: digits ---------------------------------------------------------------------------------------

def build_starnet(entry: ModelEntry, *, train: bool, epochs: int | None, seed: int, image_size: int | None,
                  progress: bool, **_: Any) -> Built:
    import torch

    variant = entry.settings["variant"]
    if train:
        from edgeflex.models.digits import NUM_CLASSES, load_digits_images, train_starnet_digits
        size = image_size or entry.settings["train_image_size"]
        model, q = train_starnet_digits(variant, image_size=size, seed=seed, progress=progress,
                                        **_epochs(epochs))
        _, _, xte, yte = load_digits_images(size, seed=seed)
        q = {**q, "split": "test", "classes": NUM_CLASSES}
        return Built(model, torch.from_numpy(xte[:1]), q, {"data": "scikit-learn digits"}, (xte, yte))
    from edgeflex.models.starnet import starnet
    torch.manual_seed(seed)
    size = image_size or entry.settings["image_size"]
    return Built(starnet(variant).eval(), torch.randn(1, 3, size, size), None, {}, None)


# --- DRESS: digits -----------------------------------------------------------------------------------------

def build_dress(entry: ModelEntry, *, epochs: int | None, seed: int, image_size: int | None, progress: bool,
                **_: Any) -> Built:
    from edgeflex.models.dress import train_dress_digits
    arch, size = entry.settings["arch"], image_size or entry.settings["image_size"]
    model, q = train_dress_digits(arch, image_size=size, seed=seed, progress=progress, **_epochs(epochs))
    levels = [{"metric": q["metric"], "value": lv["value"], "direction": q["direction"], "split": "test",
               "density": lv["density"]} for lv in q["levels"]]
    return Built(model, _digits_example(arch, size, seed), levels,
                 {"data": "scikit-learn digits", "training": _plain(q)}, None)


# --- SN-Net: corrupted digits ------------------------------------------------------------------------------

def build_snnet(entry: ModelEntry, *, epochs: int | None, seed: int, image_size: int | None, progress: bool,
                **_: Any) -> Built:
    from edgeflex.models.digits import CORRUPTIONS, TEST_SEED_OFFSET
    from edgeflex.models.snnet import train_snnet_digits
    size = image_size or entry.settings["image_size"]
    model, q = train_snnet_digits(entry.settings["anchors"], image_size=size, seed=seed, progress=progress,
                                  **_epochs(epochs))
    quality = {c["name"]: {"metric": q["metric"], "value": c["value"], "direction": q["direction"],
                           "split": "test"} for c in q["configs"]}
    data = (f"scikit-learn digits, corrupted ({q['data']}): each training batch corrupted afresh, test "
            f"split = {q['test_images']} fixed corrupted images (seed {seed + TEST_SEED_OFFSET})")
    return Built(model, _digits_example("starnet", size, seed), quality, {
        "data": data, "corruption": CORRUPTIONS[q["corruption"]], "training": _plain(q)}, None)


# --- FITS and elastic FITS: ETT ----------------------------------------------------------------------------

def build_ett(entry: ModelEntry, *, epochs: int | None, seed: int, horizon: int | None, data: str | None,
              progress: bool, **_: Any) -> Built:
    from edgeflex.models.ett import build_ett_model
    return Built(*build_ett_model(entry.name, horizon=horizon or entry.settings["horizon"], data=data,
                                  epochs=epochs, seed=seed, progress=progress))


# --- quality evaluations: NumPy only, of a run function and the held-out data a builder returns ----------

def forecast_mse(run: Callable[[np.ndarray], np.ndarray], held: Any) -> float:
    """Mean squared error of the forecast (the last H steps of `run`'s output) over every held-out window:
    `held` has arrays `x` [n, L, C] and `y` [n, H, C] (CO2's test windows), or is an ETT split."""
    x, y = held.windows() if hasattr(held, "windows") else (held.x, held.y)
    pred = np.asarray(run(x))[:, -y.shape[1]:]
    return float(((pred - y) ** 2).mean())


def top1(run: Callable[[np.ndarray], np.ndarray], held: tuple[np.ndarray, np.ndarray]) -> float:
    """Share of held-out images whose largest logit is their label: `held` = (images, labels)."""
    x, y = held
    return float((np.asarray(run(x)).argmax(1) == y).mean())


FORECAST = Evaluation("mse", "the test windows of the series it was trained on (Mauna Loa CO2, ETT), "
                      "standardised as in training", "edgeflex.models.plugins:forecast_mse")
DIGITS = Evaluation("top1", "the scikit-learn digits test split", "edgeflex.models.plugins:top1")


# --- the tables --------------------------------------------------------------------------------------------

FAMILIES: tuple[Family, ...] = (
    Family("fits", ("edgeflex.models.fits:FITS",),
           description="FITS forecaster: one config, its spectral path lowered by kernels.spectral",
           evaluation=FORECAST),
    Family("fits-elastic", ("edgeflex.models.fits_elastic:ElasticFITS",),
           "edgeflex.export.fits_elastic:export_fits_elastic", elastic=True,
           description="elastic FITS: one config per cut frequency, the complex weight stored once",
           kind="edgeflex.runtime.families.fits_elastic:FitsLevel", evaluation=FORECAST),
    Family("starnet", ("edgeflex.models.starnet:StarNet",), description="StarNet image classifier",
           evaluation=DIGITS),
    Family("dress", ("edgeflex.models.dress:DressModel",), "edgeflex.export.elastic:export_dress",
           elastic=True, description="DRESS: nested row-sparse levels over one stored dense weight "
                                      "(edgeflex's backbones or the user's own model, ef.elastic.dress)",
           kind="edgeflex.runtime.families.dress:DressLevel", evaluation=DIGITS),
    Family("snnet", ("edgeflex.models.snnet:SNNet", "edgeflex.models.stitch:Stitched"),
           "edgeflex.export.elastic:export_snnet", elastic=True,
           description="SN-Net: stitched anchors (edgeflex's StarNets or the user's own, ef.elastic.stitch), "
                       "a config per stitch point, segments stored once",
           evaluation=Evaluation("top1", "the digits test split, corrupted as in training (fixed seed), or "
                                 "the user's held-out data (ef.elastic.stitch)",
                                 "edgeflex.models.plugins:top1")),
    Family("dlinear", ("edgeflex.models.dlinear:DLinear",), description="DLinear forecaster",
           evaluation=FORECAST),
    Family("generic", (), description="any other module: one config, captured by torch.onnx"),
)

MODELS: tuple[ModelEntry, ...] = (
    ModelEntry("fits", "fits", "FITS on the Mauna Loa CO2 series, 208 -> 52 weeks (--train: fit it on CO2)",
               "edgeflex.models.plugins:build_fits_co2",
               {"seq_len": 208, "pred_len": 52, "channels": 1, "period": 52, "harmonic_order": 3}),
    *(ModelEntry(f"starnet-{v}", "starnet", f"StarNet-{v.upper()}, ImageNet head at 224x224 (--train: "
                 "digits at 32x32)", "edgeflex.models.plugins:build_starnet",
                 {"variant": v, "image_size": 224, "train_image_size": 32}) for v in STARNET_VARIANTS),
    ModelEntry("dress-starnet-s050", "dress", "DRESS levels of StarNet-S050, trained on digits at 32x32",
               "edgeflex.models.plugins:build_dress", {"arch": "starnet-s050", "image_size": 32},
               always_trains=True),
    ModelEntry("dress-mlp", "dress", "DRESS levels of a 64-256-256-10 MLP, trained on 8x8 digits",
               "edgeflex.models.plugins:build_dress", {"arch": "mlp", "image_size": 32}, always_trains=True),
    ModelEntry("snnet-starnet", "snnet", "SN-Net stitching StarNet-S050 and S100, trained on corrupted "
               "digits",
               "edgeflex.models.plugins:build_snnet", {"anchors": ("s050", "s100"), "image_size": 32},
               always_trains=True),
    ModelEntry("fits-etth1", "fits", "FITS on ETTh1 with the paper's settings, trained (--horizon, --data)",
               "edgeflex.models.plugins:build_ett", {"data_set": "ETTh1", "horizon": 96}, always_trains=True),
    ModelEntry("fits-etth2", "fits", "FITS on ETTh2 with the paper's settings, trained (--horizon, --data)",
               "edgeflex.models.plugins:build_ett", {"data_set": "ETTh2", "horizon": 96}, always_trains=True),
    ModelEntry("fits-elastic-etth1", "fits-elastic", "elastic FITS on ETTh1, a config per cut frequency, "
               "trained", "edgeflex.models.plugins:build_ett", {"data_set": "ETTh1", "horizon": 96},
               always_trains=True),
)
