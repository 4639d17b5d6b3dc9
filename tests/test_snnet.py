"""SN-Net over StarNet anchors: segments chain to the model per config, weights stored once, FLOPs order,
least-squares stitching, config errors, and the corrupted digits it trains on. Untrained anchors with
non-trivial weights; a few seconds on CPU.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from edgeflex.models import snnet
from edgeflex.models.digits import TEST_COPIES, augment, corrupt_digits, load_digits_images
from edgeflex.models.snnet import (
    FAST_TO_SLOW_PLANS,
    STITCH_PLANS,
    SNNet,
    config_stats,
    lstsq_init,
    segment_plan,
    stitch_errors,
    train_snnet_digits,
)
from edgeflex.models.starnet import StarNet, starnet

PAIR, TRIPLE = ("s050", "s100"), ("s050", "s100", "s150")


def random_anchor(variant: str, seed: int) -> StarNet:
    """An untrained StarNet whose weights and BatchNorm statistics are far from the init defaults, so
    activations are O(1) and every stitch point carries a distinct signal."""
    torch.manual_seed(seed)
    net = starnet(variant, num_classes=10)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, 0.7 / fan_in**0.5)
                m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def make_snnet(variants: tuple[str, ...]) -> SNNet:
    model = SNNet([random_anchor(v, seed) for seed, v in enumerate(variants)])
    with torch.no_grad():
        for conv in model.stitches.values():
            conv.weight.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(load_digits_images(32, seed=0)[0][:96])


@pytest.mark.parametrize("variants", [PAIR, TRIPLE])
def test_chained_segments_equal_the_model_in_every_config(variants: tuple[str, ...]) -> None:
    model = make_snnet(variants)
    segments, plan = segment_plan(model)
    assert list(plan) == model.config_names()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for config, chain in plan.items():
            model.set_config(config)
            expected = model(x)
            y = x
            for name in chain:
                y = segments[name](y)
            assert y.shape == (3, 10) and expected.abs().mean() > 1e-2
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    model.set_config(variants[0])
    with torch.no_grad():  # a pure anchor config is exactly that anchor
        torch.testing.assert_close(model(x), model.anchors[variants[0]](x), rtol=0, atol=0)


@pytest.mark.parametrize("variants", [PAIR, TRIPLE])
def test_segments_hold_every_weight_once_and_are_shared(variants: tuple[str, ...]) -> None:
    model = make_snnet(variants)
    segments, plan = segment_plan(model)
    owner: dict[int, str] = {}
    for name, segment in segments.items():
        for p in segment.parameters():
            assert id(p) not in owner, f"{name} and {owner.get(id(p))} share a parameter"
            owner[id(p)] = name
    assert set(owner) == {id(p) for p in model.parameters()}
    uses = {name: sum(name in chain for chain in plan.values()) for name in segments}
    assert min(uses.values()) >= 1
    # the largest anchor's first piece runs in that anchor and in every stitch that leaves it (Slow-to-Fast)
    largest, next_one = variants[-1], variants[-2]
    assert uses[plan[largest][0]] == 1 + len(STITCH_PLANS[(largest, next_one)])
    assert all(len(set(chain)) == len(chain) <= 6 for chain in plan.values())
    stitched = [c for c in plan if c not in variants]
    assert len(stitched) == sum(len(STITCH_PLANS[(b, a)]) for a, b in itertools.pairwise(variants))
    assert all(sum(n.startswith("stitch.") for n in plan[c]) == 1 for c in stitched)


def _independent_flops(net: StarNet) -> int:
    """FLOPs of a plain StarNet at 32x32, counted on the network itself (not through the SN-Net plan)."""
    total = [2 * net.head.in_features * net.head.out_features]

    def count(conv: nn.Module, _: tuple, out: torch.Tensor) -> None:
        total[0] += 2 * out.numel() * conv.weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    return total[0]


def test_configs_are_ordered_by_flops_between_the_anchors() -> None:
    model = make_snnet(PAIR)
    stats = config_stats(model, torch.zeros(2, 3, 32, 32))
    names = model.config_names()
    assert (names[0], names[-1]) == PAIR
    flops = [stats[n]["flops"] for n in names]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    for variant in PAIR:
        net = model.anchors[variant]
        assert stats[variant]["flops"] == _independent_flops(net)
        assert stats[variant]["param_bytes"] == 4 * sum(p.numel() for p in net.parameters())
    stitch = model.stitches[model._paths[names[1]].stitch]
    assert stats[names[1]]["param_bytes"] > stats[names[0]]["param_bytes"] + 4 * stitch.weight.numel()


def test_least_squares_init_beats_a_random_stitch(images: torch.Tensor) -> None:
    model = make_snnet(PAIR)
    fit, held_out = images[:64], images[64:]
    random_fit, random_held_out = stitch_errors(model, fit), stitch_errors(model, held_out)
    ls_fit = lstsq_init(model, fit, ridge=1e-6)
    ls_held_out = stitch_errors(model, held_out)
    assert set(ls_fit) == set(random_fit) == set(model.config_names()) - set(PAIR)
    for config in ls_fit:
        assert ls_fit[config] < 0.5 * random_fit[config] and ls_fit[config] < 1.0
        assert ls_held_out[config] < 0.5 * random_held_out[config]
    # a least-squares optimum: nudging any stitch's weights only makes the fit worse
    with torch.no_grad():
        for conv in model.stitches.values():
            conv.weight.add_(1e-2 * torch.randn_like(conv.weight))
    assert all(e > ls_fit[c] for c, e in stitch_errors(model, fit).items())


def test_unknown_config_names_the_known_ones() -> None:
    model = make_snnet(PAIR)
    with pytest.raises(ValueError, match=r"'s075'.*s050.*s100\.s2b0-s050\.s2b1.*s100"):
        model.set_config("s075")
    assert model.config == "s100"


def test_anchors_must_go_small_to_large_with_a_plan() -> None:
    small, large = random_anchor("s050", 0), random_anchor("s100", 1)
    with pytest.raises(ValueError, match=r"small -> large by FLOPs, got \['s100', 's050'\]"):
        SNNet([large, small])
    with pytest.raises(ValueError, match=r"no stitch plan between s050 and s100"):
        SNNet([small, large], plans={("s100", "s150"): ((2, 0, 1),)})
    with pytest.raises(ValueError, match=r"s050 has no block 3 in stage 2"):
        SNNet([small, large], plans={PAIR: ((2, 3, 4),)})


def test_training_reports_every_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # the recipe end to end on stand-ins: random anchors, 64 training images (one joint step), 40 held out
    x_train, y_train, x_test, y_test = load_digits_images(32, 0, "corrupted")
    monkeypatch.setattr(snnet, "load_digits_images", lambda *_: (x_train[:64], y_train[:64], x_test[:40],
                                                                 y_test[:40]))
    monkeypatch.setattr(snnet, "train_starnet_digits", lambda v, **_: (random_anchor(v, 0), {"value": 0.1}))
    model, result = train_snnet_digits(PAIR, epochs=1, progress=False)
    assert (result["metric"], result["direction"]) == ("top1 on digits-corrupted", "higher")
    assert (result["data"], result["corruption"]) == ("digits-corrupted", "corrupted")
    names = [c["name"] for c in result["configs"]]
    assert names == model.config_names() and model.config == names[-1] and not model.training
    stats = config_stats(model, torch.zeros(1, 3, 32, 32))
    for c in result["configs"]:
        assert (c["flops"], c["param_bytes"]) == (stats[c["name"]]["flops"], stats[c["name"]]["param_bytes"])
        assert c["value"] in {k / 40 for k in range(41)} and (c["ls_error"] is None) == (c["name"] in PAIR)
    assert result["anchor_top1"] == {"s050": 0.1, "s100": 0.1} and result["train_seconds"] > 0


def test_corrupted_digits_are_a_fixed_harder_test_set() -> None:
    clean = load_digits_images(32, seed=0)
    x_train, y_train, x_test, y_test = load_digits_images(32, 0, "corrupted")
    again = load_digits_images(32, 0, "corrupted")
    for a, b in zip((x_train, y_train, x_test, y_test), again, strict=True):
        np.testing.assert_array_equal(a, b)
    n = len(clean[3])
    assert x_train.shape == (1437, 3, 32, 32) and x_test.shape == (TEST_COPIES * n, 3, 32, 32)
    assert len(y_test) == TEST_COPIES * n == 1800
    assert (x_train.dtype, x_test.dtype, y_train.dtype, y_test.dtype) == (np.float32,) * 2 + (np.int64,) * 2
    # the training split is the clean one (trainers corrupt it per batch); the test labels are the clean
    # ones, once per copy; the images are not: each copy is a different corruption of the clean image
    np.testing.assert_array_equal(x_train, clean[0])
    np.testing.assert_array_equal(y_train, clean[1])
    np.testing.assert_array_equal(y_test, np.tile(clean[3], TEST_COPIES))
    copies = x_test.reshape(TEST_COPIES, n, 3, 32, 32)
    assert np.abs(copies - clean[2]).mean(axis=(2, 3, 4)).min() > 0.3
    assert np.abs(copies[0] - copies[1]).mean(axis=(1, 2, 3)).min() > 0.3
    np.testing.assert_array_equal(copies[..., 0, :, :], copies[..., 2, :, :])  # still a grey image
    assert not np.array_equal(load_digits_images(32, 1, "corrupted")[2], x_test)


def test_test_corruption_is_independent_of_training_draws() -> None:
    x_train, _, x_test, _ = load_digits_images(32, 0, "corrupted")
    clean_test = torch.from_numpy(load_digits_images(32, seed=0)[2])
    # what the trainer does (seed 0, its own generator, the global seed set) draws other corruptions ...
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    trained_on = augment(clean_test.repeat(TEST_COPIES, 1, 1, 1), "corrupted", gen)
    assert (trained_on - torch.from_numpy(x_test)).abs().mean(dim=(1, 2, 3)).min() > 0.3
    # ... and leaves the test set as it was
    torch.manual_seed(123)
    torch.rand(1000)
    np.testing.assert_array_equal(load_digits_images(32, 0, "corrupted")[2], x_test)
    # the training augmentation is fresh per draw, from the generator it is given
    gen = torch.Generator().manual_seed(5)
    batch = torch.from_numpy(x_train[:8])
    first, second = augment(batch, "corrupted", gen), augment(batch, "corrupted", gen)
    assert first.shape == batch.shape and first.dtype == torch.float32 and not torch.equal(first, second)
    torch.testing.assert_close(augment(batch, "corrupted", torch.Generator().manual_seed(5)), first,
                               rtol=0, atol=0)


def test_unknown_corruption_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'foggy'; expected None or one of \['corrupted'\]"):
        load_digits_images(32, 0, "foggy")
    with pytest.raises(ValueError, match=r"'foggy'; expected one of \['corrupted'\]"):
        corrupt_digits(torch.zeros(1, 3, 8, 8), "foggy", torch.Generator())
    with pytest.raises(ValueError, match=r"test_copies must be >= 1, got 0"):
        load_digits_images(32, 0, "corrupted", test_copies=0)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_joint_training_options_freeze_bn_statistics_and_distill(monkeypatch: pytest.MonkeyPatch,
                                                                 freeze_bn: bool) -> None:
    x_train, y_train, x_test, y_test = load_digits_images(32, 0, "corrupted")
    monkeypatch.setattr(snnet, "load_digits_images", lambda *_: (x_train[:128], y_train[:128], x_test[:40],
                                                                 y_test[:40]))
    anchors = {v: random_anchor(v, i) for i, v in enumerate(PAIR)}
    monkeypatch.setattr(snnet, "train_starnet_digits", lambda v, **_: (anchors[v], {"value": 0.1}))
    before = {k: v.clone() for v_name, net in anchors.items() for k, v in
              ((f"{v_name}.{n}", b) for n, b in net.named_buffers() if n.endswith("running_mean"))}
    _, result = train_snnet_digits(PAIR, epochs=1, progress=False, distill=0.5, freeze_bn=freeze_bn)
    after = {f"{v_name}.{n}": b for v_name, net in anchors.items() for n, b in net.named_buffers()
             if n.endswith("running_mean")}
    same = all(torch.equal(before[k], after[k]) for k in before)
    assert same == freeze_bn and (result["distill"], result["freeze_bn"]) == (0.5, freeze_bn)


def test_both_directions_stitch_when_both_plans_are_given() -> None:
    small, large = random_anchor("s050", 0), random_anchor("s100", 1)
    plans = {**STITCH_PLANS, **FAST_TO_SLOW_PLANS}
    model = SNNet([small, large], plans=plans)
    names = model.config_names()
    fronts = {model._paths[n].front for n in names if model._paths[n].back is not None}
    assert fronts == {"s050", "s100"} and len(names) == 2 + len(plans[("s100", "s050")]) + len(
        plans[("s050", "s100")])
    assert (names[0], names[-1]) == PAIR
