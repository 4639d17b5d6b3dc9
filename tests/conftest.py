"""Shared fixtures: FITS modules with non-trivial complex weights, and one exported FITS bundle per session.

The bundle is exported once (a fraction of a second) and shared read-only; tests that tamper with a bundle
copy it first.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeflex.models.fits import FITS

# The session bundle's FITS: seq_len, pred_len, channels, cut_freq.
FITS_SHAPE = (24, 8, 3, 7)


def random_fits(seq_len: int, pred_len: int, channels: int, cut_freq: int, *, individual: bool = False,
                seed: int = 0) -> FITS:
    """A FITS module whose complex weights have non-zero imaginary parts (nn.Linear(...).to(cfloat)
    starts with purely real ones, which would leave half of the complex arithmetic untested)."""
    torch.manual_seed(seed)
    model = FITS(seq_len, pred_len, channels, cut_freq, individual=individual).eval()
    layers = list(model.freq_upsampler) if individual else [model.freq_upsampler]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, dtype=torch.cfloat) / cut_freq**0.5)
            layer.bias.copy_(torch.randn(layer.bias.shape, dtype=torch.cfloat) * 0.1)
    return model


@pytest.fixture(scope="session")
def make_fits() -> Callable[..., FITS]:
    return random_fits


@pytest.fixture(scope="session")
def fits_model() -> FITS:
    return random_fits(*FITS_SHAPE, seed=1)


@pytest.fixture(scope="session")
def fits_bundle(tmp_path_factory: pytest.TempPathFactory, fits_model: FITS) -> Path:
    """A shared-weights FITS bundle, exported once; treat as read-only."""
    import edgeflex as ef

    seq_len, _, channels, _ = FITS_SHAPE
    path = tmp_path_factory.mktemp("bundles") / "fits.efx"
    ef.export(fits_model, torch.randn(2, seq_len, channels), path)
    return path


@pytest.fixture
def copy(fits_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session's FITS bundle, `b.efx` alone in its folder, for tests that change it."""
    dest = tmp_path / "b.efx"
    shutil.copytree(fits_bundle, dest)
    return dest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def snnet_bundle(tmp_path_factory):
    """An untrained SN-Net (StarNet s050 -> s100, 32x32, 10 classes) exported once for the whole session,
    with made-up qualities ordered by FLOPs. Tests that modify it work on a copy."""
    import torch

    from edgeflex.export.elastic import export_snnet
    from edgeflex.models.snnet import SNNet
    from edgeflex.models.starnet import starnet

    torch.manual_seed(0)
    model = SNNet([starnet(v, num_classes=10) for v in ("s050", "s100")], image_size=32).eval()
    path = tmp_path_factory.mktemp("snnet") / "sn.efx"
    quality = {n: {"metric": "top1", "value": 0.5 + 0.01 * i, "direction": "higher"}
               for i, n in enumerate(model.config_names())}
    export_snnet(model, torch.randn(2, 3, 32, 32), path, quality=quality)
    return model, path


@pytest.fixture(scope="session")
def profiled_snnet(snnet_bundle, tmp_path_factory) -> Path:
    """`snnet_bundle` with a host profile measured once, at 1 thread, for the whole session. Tests copy it
    (`copy_profiled`) before they change anything."""
    from edgeflex import Runtime
    from edgeflex.runtime.profiles import measure_profile, save_profile

    path = tmp_path_factory.mktemp("profiled") / "sn.efx"
    shutil.copytree(snnet_bundle[1], path)
    rt = Runtime(path, threads=1)
    save_profile(path, measure_profile(rt, min_runs=20, min_seconds=0.05, memory=False, progress=False))
    return path


def copy_profiled(profiled: Path, tmp_path_factory, name: str) -> Path:
    """A copy of the profiled SN-Net bundle of its own, for one test module."""
    path = tmp_path_factory.mktemp(name) / "sn.efx"
    shutil.copytree(profiled, path)
    return path


def dress_mlp_int8(tmp_path: Path) -> tuple[torch.nn.Module, Path, np.ndarray]:
    """A DRESS MLP exported with an int8 variant of every level (calibrated, min-max, no quality gate):
    the model, the bundle and its calibration images."""
    from edgeflex.export.elastic import export_dress
    from edgeflex.export.quantize import quantize
    from edgeflex.models.dress import DressModel, build_backbone

    torch.manual_seed(0)
    model = DressModel(build_backbone("mlp")).eval()
    path = tmp_path / "d.efx"
    export_dress(model, torch.randn(2, 1, 8, 8), path)
    x = np.random.default_rng(9).standard_normal((40, 1, 8, 8)).astype(np.float32)
    quantize(path, {"x": x}, precisions=["int8"], methods=["minmax"], progress=False, max_drop=100.0)
    return model, path, x
