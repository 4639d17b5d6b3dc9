"""DRESS nested row-sparse levels: the codes, running at a level, plain copies, FLOPs per level, training.

No full training run here (a one-epoch MLP smoke test only); everything runs in seconds on CPU.
"""

from __future__ import annotations

import copy
from itertools import pairwise

import pytest
import torch
from torch import nn

from edgeflex.models.dress import (
    DENSITIES,
    DigitsMLP,
    DressModel,
    build_backbone,
    count_flops,
    level_stats,
    row_codes,
    row_nnz,
    train_dress_digits,
)
from edgeflex.models.starnet import starnet

LAYERS = {
    "linear": lambda: nn.Linear(37, 23),
    "conv3x3": lambda: nn.Conv2d(5, 7, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(16, 48, 1),
    "depthwise7x7": lambda: nn.Conv2d(6, 6, 7, padding=3, groups=6),
    "grouped3x3": lambda: nn.Conv2d(8, 4, 3, groups=2),
}


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so eval-mode BN is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)


@pytest.fixture(scope="module")
def dress_starnet() -> DressModel:
    torch.manual_seed(0)
    backbone = starnet("s050", num_classes=10, in_chans=3)
    with torch.no_grad():  # weights well above init scale so masking visibly changes the output
        for p in backbone.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.2)
    _randomise_bn(backbone)
    return DressModel(backbone.eval()).eval()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_codes_are_nested_row_balanced_and_keep_the_largest(kind: str) -> None:
    torch.manual_seed(1)
    weight = LAYERS[kind]().weight.detach()
    codes = row_codes(weight, DENSITIES)
    assert codes.dtype == torch.uint8 and codes.shape == weight.shape
    assert int(codes.max()) == len(DENSITIES) - 1
    rows, crows = weight.reshape(weight.shape[0], -1).abs(), codes.reshape(weight.shape[0], -1)
    previous = torch.ones_like(crows, dtype=torch.bool)
    for s, density in enumerate(DENSITIES):
        keep = crows >= s
        assert torch.all(keep.sum(1) == row_nnz(density, rows.shape[1])), f"level {s}: rows differ"
        assert not torch.any(keep & ~previous), f"level {s} keeps a weight level {s - 1} dropped"
        # the kept ones are the row's largest: smallest kept >= largest dropped
        if not keep.all():
            kept_min = torch.where(keep, rows, torch.inf).min(1).values
            dropped_max = torch.where(keep, -torch.inf, rows).max(1).values
            assert torch.all(kept_min >= dropped_max)
        previous = keep


def test_row_nnz_rounds_and_keeps_at_least_one() -> None:
    assert [row_nnz(d, 49) for d in DENSITIES] == [49, 24, 12, 5]  # depthwise 7x7: round(24.5) == 24
    assert row_nnz(0.1, 3) == 1 and row_nnz(0.01, 64) == 1


def test_ties_go_to_the_lower_column() -> None:
    weight = torch.tensor([[1.0, -1.0, 1.0, 1.0], [0.5, 2.0, 2.0, -0.5]])
    codes = row_codes(weight, (1.0, 0.5, 0.25))
    assert codes.tolist() == [[2, 1, 0, 0], [0, 2, 1, 0]]
    torch.testing.assert_close(row_codes(weight, (1.0, 0.5, 0.25)), codes, rtol=0, atol=0)


@pytest.mark.parametrize("densities", [(0.5, 0.25), (1.0, 0.5, 0.5), (1.0, 0.0), ()])
def test_bad_densities_are_refused(densities: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="densities must start at 1.0"):
        DressModel(DigitsMLP(), densities)


def test_default_predicate_spares_stem_and_head_only(dress_starnet: DressModel) -> None:
    backbone = dress_starnet.backbone
    layers = {f"{n}.weight" for n, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(dress_starnet.prunable_names) == layers - {"stem.0.conv.weight", "head.weight"}
    assert "stages.0.1.f1.conv.weight" in dress_starnet.codes
    assert all(c.dtype == torch.uint8 for c in dress_starnet.codes.values())
    assert (dress_starnet.family, dress_starnet.backbone_family) == ("dress", "starnet")
    mlp = DressModel(DigitsMLP())
    assert mlp.prunable_names == ["fc1.weight", "fc2.weight"] and mlp.backbone_family == "mlp"


def test_custom_predicate() -> None:
    model = DressModel(DigitsMLP(), prunable=lambda _b, name, _m: name == "fc2")
    assert model.prunable_names == ["fc2.weight"]


def test_non_prunable_state_is_untouched(dress_starnet: DressModel) -> None:
    dense = dress_starnet.backbone.state_dict()
    for level in range(len(DENSITIES)):
        state = dress_starnet.masked_state_dict(level)
        assert state.keys() == dense.keys()
        for key, value in state.items():
            if key not in dress_starnet.codes:
                torch.testing.assert_close(value, dense[key], rtol=0, atol=0, msg=key)
    # masking never writes into the live backbone
    assert all(bool((dress_starnet.backbone.get_parameter(k) != 0).all()) for k in dress_starnet.codes)


def _hand_masked(model: DressModel, level: int) -> nn.Module:
    copy_ = copy.deepcopy(model.backbone)
    with torch.no_grad():
        for name, codes in model.codes.items():
            copy_.get_parameter(name)[codes < level] = 0.0
    return copy_


@pytest.mark.parametrize("level", range(len(DENSITIES)))
def test_set_level_equals_hand_masked_and_dense_copy(dress_starnet: DressModel, level: int) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(level))
    plain = dress_starnet.dense_copy(level)
    assert type(plain) is type(dress_starnet.backbone)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in plain.modules())
    with torch.no_grad():
        got = dress_starnet.set_level(level)(x)
        torch.testing.assert_close(got, _hand_masked(dress_starnet, level)(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, plain(x), rtol=1e-5, atol=1e-5)
        if level > 0:  # the levels really differ
            assert not torch.allclose(got, dress_starnet.set_level(0)(x), atol=1e-3)
    dress_starnet.set_level(0)
    with pytest.raises(ValueError, match=r"level must be in \[0, 4\)"):
        dress_starnet.set_level(4)


def test_sparse_level_trains_only_its_weights() -> None:
    torch.manual_seed(0)
    model = DressModel(DigitsMLP()).set_level(3)
    model(torch.randn(8, 64)).sum().backward()
    for name, codes in model.codes.items():
        grad = model.backbone.get_parameter(name).grad
        assert torch.all(grad[codes < 3] == 0) and grad[codes >= 3].abs().sum() > 0


def test_recompute_codes_follows_the_magnitudes() -> None:
    model = DressModel(DigitsMLP())
    with torch.no_grad():
        model.backbone.fc2.weight.copy_(torch.arange(256.0).repeat(256, 1))
    model.recompute_codes()
    top = model.codes["fc2.weight"][:, -row_nnz(0.1, 256):]
    assert bool((top == 3).all()) and int((model.codes["fc2.weight"] == 3).sum()) == top.numel()


def test_level_stats_flops_bytes_and_monotonic(dress_starnet: DressModel) -> None:
    mlp = DressModel(DigitsMLP())
    stats = level_stats(mlp, torch.randn(4, 64))
    dense_flops = 2 * (64 * 256 + 256 * 256 + 256 * 10)
    assert stats[0]["flops"] == dense_flops == count_flops(mlp.backbone, torch.randn(1, 64))
    for s, (st, d) in enumerate(zip(stats, DENSITIES, strict=True)):
        nnz = 256 * row_nnz(d, 64) + 256 * row_nnz(d, 256)
        assert (st["level"], st["density"], st["nnz"]) == (s, d, nnz)
        assert st["prunable_params"] == 64 * 256 + 256 * 256
        assert st["flops"] == 2 * (nnz + 256 * 10)
        assert st["param_bytes"] == 4 * (nnz + 256 * 10 + 256 + 256 + 10)

    x = torch.randn(1, 3, 32, 32)
    stats = level_stats(dress_starnet, x)
    flops = [st["flops"] for st in stats]
    assert flops[0] == count_flops(dress_starnet.backbone, x)
    assert all(b < a for a, b in pairwise(flops))
    assert all(b["param_bytes"] < a["param_bytes"] for a, b in pairwise(stats))
    assert stats[0]["nnz"] == stats[0]["prunable_params"]
    # stem conv: 32 x 27 weights at 16 x 16 outputs; counting leaves BN statistics alone
    running = [m.running_mean.clone() for m in dress_starnet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert count_flops(dress_starnet.backbone.stem, x) == 2 * 32 * 27 * 16 * 16
    after = [m.running_mean for m in dress_starnet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after, strict=True))


def test_state_dict_round_trip_keeps_codes() -> None:
    torch.manual_seed(0)
    model = DressModel(DigitsMLP())
    fresh = DressModel(DigitsMLP())
    fresh.load_state_dict(model.state_dict())
    for name, codes in model.codes.items():
        assert torch.equal(fresh.codes[name], codes)


def test_unknown_arch_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'resnet'.*mlp.*starnet-s050"):
        build_backbone("resnet")


def test_mlp_one_epoch_smoke() -> None:
    threads = torch.get_num_threads()
    model, result = train_dress_digits("mlp", epochs=1, warmup_epochs=1, progress=False)
    assert torch.get_num_threads() == threads
    assert (result["metric"], result["direction"]) == ("top1", "higher")
    assert [lv["density"] for lv in result["levels"]] == list(DENSITIES)
    assert all(0.0 <= lv["value"] <= 1.0 for lv in result["levels"])
    assert result["levels"][0]["value"] > 0.5  # one dense epoch already learns the digits
    assert not model.training and model.level == 0 and result["train_seconds"] > 0


def test_dense_copy_exports_to_onnx_and_matches() -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = DressModel(DigitsMLP()).eval()
    x = torch.randn(3, 64)
    program = torch.onnx.export(model.dense_copy(3).eval(), (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model.set_level(3)(x), rtol=1e-4, atol=1e-5)
