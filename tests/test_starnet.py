"""StarNet variants (size against the paper, shapes, the star block) and the digits data preparation.

Training is tested elsewhere; everything here runs in a few seconds on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeflex.models.digits import load_digits_images
from edgeflex.models.starnet import (
    PAPER_PARAMS_M,
    STARNET_VARIANTS,
    Block,
    DropPath,
    list_variants,
    starnet,
)


def test_every_variant_has_a_paper_size() -> None:
    assert list_variants() == list(STARNET_VARIANTS)
    assert set(PAPER_PARAMS_M) == set(STARNET_VARIANTS)


@pytest.mark.parametrize("variant", list_variants())
def test_params_match_paper_rounding(variant: str) -> None:
    model = starnet(variant, num_classes=1000, in_chans=3)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    paper = PAPER_PARAMS_M[variant]
    decimals = len(repr(paper).split(".")[1])
    assert abs(params_m - paper) <= 0.5 * 10**-decimals + 1e-9, (
        f"{variant}: {params_m:.4f}M vs paper {paper}M"
    )


@pytest.mark.parametrize("variant", list_variants())
def test_forward_shape_and_identity(variant: str) -> None:
    model = starnet(variant, num_classes=10, in_chans=3).eval()
    assert (model.family, model.variant) == ("starnet", variant)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_in_chans_and_drop_path_are_honoured() -> None:
    model = starnet("s050", num_classes=5, in_chans=1, drop_path_rate=0.2)
    assert model.stem[0].conv.in_channels == 1
    assert model(torch.randn(3, 1, 24, 24)).shape == (3, 5)
    last = model.stages[-1][-1]
    assert last.drop_path.drop_prob == pytest.approx(0.2)


def test_drop_path_drops_whole_samples_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    drop = DropPath(0.5)
    x = torch.ones(4000, 2, 3, 3)
    y = drop(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert abs(float(y.mean()) - 1.0) < 0.1
    assert drop.eval()(x) is x


def test_unknown_variant_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'s9'.*s050.*s4"):
        starnet("s9")


def _conv(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, padding=conv.padding, groups=conv.groups)


def _bn(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]


def test_block_is_the_star_operation() -> None:
    torch.manual_seed(0)
    dim, ratio = 6, 3
    block = Block(dim, mlp_ratio=ratio).eval()
    # non-trivial BatchNorm statistics and affine terms, so eval-mode BN is really exercised
    for bn in (block.dwconv.bn, block.g.bn):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, dim, 9, 7)
    with torch.no_grad():
        y = _bn(_conv(x, block.dwconv.conv), block.dwconv.bn)
        star = torch.clamp(_conv(y, block.f1.conv), 0.0, 6.0) * _conv(y, block.f2.conv)
        assert star.shape[1] == ratio * dim
        expected = x + _conv(_bn(_conv(star, block.g.conv), block.g.bn), block.dwconv2.conv)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_digits_split_shapes_and_normalisation() -> None:
    x_train, y_train, x_test, y_test = load_digits_images(image_size=16, seed=0)
    assert x_train.shape == (1437, 3, 16, 16) and x_test.shape == (360, 3, 16, 16)
    assert (x_train.dtype, x_test.dtype, y_train.dtype, y_test.dtype) == (np.float32,) * 2 + (np.int64,) * 2
    assert len(y_train) == len(x_train) and len(y_test) == len(x_test)
    np.testing.assert_array_equal(x_train[:, 0], x_train[:, 2])
    # stratified: each class keeps its 80/20 share to within one sample
    all_counts = np.bincount(np.concatenate([y_train, y_test]), minlength=10)
    assert np.all(np.abs(np.bincount(y_test, minlength=10) - 0.2 * all_counts) <= 1)
    # statistics come from the training split only, so the test split is not exactly standardised
    assert abs(x_train.mean()) < 1e-4 and abs(x_train.std() - 1) < 1e-4
    assert abs(x_test.mean()) > 1e-3 or abs(x_test.std() - 1) > 1e-3


def test_digits_test_split_uses_the_train_affine_map() -> None:
    x_train, _, x_test, _ = load_digits_images(image_size=8, seed=1)
    # at 8x8 nothing is resized: raw grey levels are integers 0..16, both 0 and 16 occur in training
    lo, hi = float(x_train.min()), float(x_train.max())
    raw_test = (x_test - lo) * 16.0 / (hi - lo)
    np.testing.assert_allclose(raw_test, np.round(raw_test), atol=1e-3)
    assert raw_test.min() > -1e-3 and raw_test.max() < 16 + 1e-3


def test_digits_split_is_seeded() -> None:
    a, b = load_digits_images(8, seed=3), load_digits_images(8, seed=3)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[1], load_digits_images(8, seed=4)[1])
